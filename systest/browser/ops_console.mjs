// Drives the ops console (GET /ops) in Debian's headless chromium with playwright-core, for
// systest/tests/ops_console.rs, which starts the stack, makes the reservations and checks the
// refusals. The two talk in lines: this script prints READY, SAW <n>, REFUSED <status> <code>,
// PAUSED and DONE on stdout (or FAIL <why>, and exits 1), and reads RESERVED <n> on stdin.
//
// Environment: BASE_URL (the ingress), SKU, EXPECT_AVAILABLE (its count when the page opens),
// QUEUED_SKU and EXPECT_QUEUED (a SKU whose pre-sale queue holds requests, and its queue cell),
// ADMIN_TOKEN, SCREENSHOT (where to save the page), FLASH_CHROMIUM (the browser; default
// /usr/bin/chromium). playwright-core downloads no browser: it runs that one.

import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

// A failure: thrown, reported as FAIL <why> once the browser is closed.
class Failure extends Error {}
function fail(why) {
  throw new Failure(why);
}
const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) fail(`${name} is not set`);
  return v;
};
const say = (line) => console.log(line);
const WAIT = 20_000;

const lines = createInterface({ input: process.stdin });
const nextLine = (() => {
  const queue = [];
  const waiting = [];
  lines.on("line", (l) => (waiting.length ? waiting.shift()(l) : queue.push(l)));
  return () => (queue.length ? Promise.resolve(queue.shift()) : new Promise((r) => waiting.push(r)));
})();

let browser;
try {
  const base = env("BASE_URL");
  const sku = env("SKU");
  const expectAvailable = Number(env("EXPECT_AVAILABLE"));
  const token = env("ADMIN_TOKEN");
  const screenshot = env("SCREENSHOT");
  const queuedSku = env("QUEUED_SKU");
  const expectQueued = env("EXPECT_QUEUED");
  const executablePath = env("FLASH_CHROMIUM", "/usr/bin/chromium");
  browser = await chromium.launch({
    executablePath,
    headless: true,
    // As root (CI) chromium needs --no-sandbox; /dev/shm may be small in containers.
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  }).catch((e) => fail(`cannot start ${executablePath}: ${e.message.split("\n")[0]}`));

  const page = await browser.newPage({ viewport: { width: 1440, height: 1080 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  // An answer of 4xx is logged by chromium as "Failed to load resource": the 401 below is meant.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) {
      problems.push(`console error: ${m.text()}`);
    }
  });

  const response = await page.goto(`${base}/ops`);
  if (response.status() !== 200) fail(`GET /ops answered ${response.status()}`);

  const row = page.locator(`#skus tr[data-sku="${sku}"]`);
  // The count the page shows for the SKU, as a number.
  const shown = async () => Number((await row.locator("td.available").innerText()).replace(/[^0-9]/g, ""));
  const waitShown = async (n) => {
    const deadline = Date.now() + WAIT;
    let last;
    while (Date.now() < deadline) {
      last = await shown().catch(() => undefined);
      if (last === n) return;
      await page.waitForTimeout(100);
    }
    fail(`the page shows ${last} available for ${sku}, not ${n}`);
  };

  await waitShown(expectAvailable);
  // Its live stream is open (the dot turns green on the stream's first event).
  await row.locator(".live.on").waitFor({ timeout: WAIT })
    .catch(() => fail(`no live stream for ${sku}`));
  // The summary: both sequencers with their roles, the writer's epoch, every alert.
  await page.locator("#sequencers td.role", { hasText: "active" }).first().waitFor({ timeout: WAIT })
    .catch(() => fail("no sequencer shown as active"));
  await page.locator("#sequencers td.role", { hasText: "standby" }).first().waitFor({ timeout: WAIT })
    .catch(() => fail("no sequencer shown as standby"));
  await page.locator("#writer-epoch").waitFor({ timeout: WAIT }).catch(() => fail("no writer epoch shown"));
  const alerts = await page.locator("#alert-table tbody tr").count();
  if (alerts < 14) fail(`${alerts} alerts listed, not the 14 of docs/OPERATIONS.md`);
  if ((await page.locator("#ready").innerText()) !== "ingress ready") fail("the ingress is not shown ready");
  await page.locator(`#skus tr[data-sku="${queuedSku}"] td.queue`, { hasText: expectQueued })
    .waitFor({ timeout: WAIT })
    .catch(() => fail(`${queuedSku}'s pre-sale queue is not shown as ${expectQueued}`));
  say("READY");

  // The test reserves; the count falls on the page.
  const reserved = (await nextLine()).match(/^RESERVED (\d+)$/);
  if (!reserved) fail("expected RESERVED <n> on stdin");
  await waitShown(Number(reserved[1]));
  say(`SAW ${reserved[1]}`);

  // A wrong token: the page shows the API's refusal and its code.
  const pause = row.locator('button[data-op="pause"]');
  await page.fill("#token", "not-the-admin-token-at-all");
  await page.click("#token-set");
  await pause.click();
  const refused = page.locator('#log .entry[data-op="pause"][data-status="401"]');
  await refused.waitFor({ timeout: WAIT }).catch(() => fail("a wrong token's 401 is not shown"));
  const refusal = await refused.locator(".result").innerText();
  if (!refusal.includes("401 unauthorized")) fail(`the refusal shows ${JSON.stringify(refusal)}`);
  say("REFUSED 401 unauthorized");

  // The right token: pause the SKU from its row.
  await page.fill("#token", token);
  await page.click("#token-set");
  await pause.click();
  await page.locator('#log .entry[data-op="pause"][data-status="200"]').waitFor({ timeout: WAIT })
    .catch(() => fail("the pause was not answered 200"));
  await row.locator("td.status", { hasText: "paused" }).waitFor({ timeout: WAIT })
    .catch(() => fail(`${sku} is not shown paused`));
  say("PAUSED");

  await page.waitForTimeout(1200); // one more summary, so the picture is current
  await page.screenshot({ path: screenshot, fullPage: true });
  if (problems.length) fail(problems.join("; "));
  say("DONE");
} catch (e) {
  say(`FAIL ${e instanceof Failure ? e.message : e.message.split("\n")[0]}`);
  process.exitCode = 1;
} finally {
  if (browser) await browser.close();
  lines.close();
  process.stdin.destroy();
}
