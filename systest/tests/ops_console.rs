//! The ops console on the real path: `GET /v1/skus` and `GET /v1/ops/summary` against a running
//! stack, and the page itself (`GET /ops`) in a real headless browser: Debian's `chromium`,
//! driven by `playwright-core` (systest/browser/ops_console.mjs). The page shows a SKU's count,
//! the count falls as this test reserves over HTTP, a pre-sale queue's length is shown, an
//! operator's wrong token is refused with
//! the API's code, the right one pauses the SKU from the page, and this test then sees
//! reservations refused `sale_paused`.
//!
//! Needs `node`, the browser (`FLASH_CHROMIUM`, default /usr/bin/chromium) and
//! systest/browser/node_modules: `scripts/test` installs them (scripts/lib.sh,
//! `ensure_chromium` and `ensure_browser_test`). Without them the test fails, saying so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use systest::{assert_error, Options, Stack, ADMIN_TOKEN};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const BROWSER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/browser");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sku_list_and_the_ops_summary_answer_from_postgres_and_the_sequencers() {
    let stack = two_sequencers("ops_summary").await;
    for sku in ["b-2", "a-1", "c-3"] {
        stack.put_sku(sku, 10, 2, 300.0).await.unwrap();
    }
    assert_eq!(stack.reserve("b-2", "ann", 2, "k1").await.unwrap().0, 201);
    // A sale that starts later, with its pre-sale queue open: a reservation waits in it.
    put_presale(&stack, "d-4", 5, 10).await;
    assert_eq!(stack.reserve("d-4", "bob", 1, "k2").await.unwrap().0, 202);

    // Every SKU, by name, with the fields of GET /v1/skus/{sku}.
    let (status, list) = stack.get("/v1/skus").await.unwrap();
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> = list["skus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sku"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a-1", "b-2", "c-3", "d-4"]);
    assert_eq!(list["next_after"], Value::Null);
    let (_, one) = stack.get("/v1/skus/b-2").await.unwrap();
    assert_eq!(
        list["skus"][1], one,
        "the list holds what GET /v1/skus/{{sku}} answers"
    );
    assert_eq!(
        (one["available"].as_i64(), one["held"].as_i64()),
        (Some(8), Some(2))
    );
    let (status, after) = stack.get("/v1/skus?after=a-1").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(after["skus"].as_array().unwrap().len(), 3, "{after}");
    let (status, bad) = stack.get("/v1/skus?after=no%20such%20name").await.unwrap();
    assert_error(status, &bad, (422, "invalid_request"));

    // The summary, sampled once a second: the writer from Postgres, both sequencers with their
    // roles and the same epoch, decisions counted, every alert of docs/OPERATIONS.md evaluated.
    let summary = wait_summary(&stack, |s| {
        s["sequencers"]
            .as_array()
            .is_some_and(|q| q.len() == 2 && q.iter().all(|q| q["reachable"] == true))
            && s["throughput"]["decisions_per_s"].is_number()
    })
    .await;
    let mut roles: Vec<&str> = summary["sequencers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["role"].as_str().unwrap())
        .collect();
    roles.sort();
    assert_eq!(roles, ["active", "standby"], "{summary}");
    let writer = &summary["writer"];
    assert!(writer["epoch"].as_u64().unwrap() >= 1, "{summary}");
    assert!(
        writer["lease_remaining_ms"].as_i64().unwrap() > 0,
        "{summary}"
    );
    let active = summary["sequencers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["role"] == "active")
        .unwrap();
    assert_eq!(active["epoch"], writer["epoch"], "{summary}");
    assert_eq!(active["node_id"], writer["leader"], "{summary}");
    assert_eq!(
        summary["presale_queues"],
        json!([{"sku": "d-4", "waiting": 1}]),
        "{summary}"
    );
    assert_eq!(summary["ingress"]["connections_max"], 10_000);
    assert_eq!(summary["log"]["lag_max"], 50_000);
    let alerts = summary["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 14, "{summary}");
    for a in alerts {
        // "checkpoints stalled" may be pending: the leader's first checkpoint comes after 5 s.
        assert_ne!(a["state"], "firing", "a healthy stack fires nothing: {a}");
        assert_ne!(a["state"], "unknown", "every alert is measured here: {a}");
    }

    // A writer gone: the summary says so within seconds.
    let i = stack
        .wait_for_active(Duration::from_secs(10))
        .await
        .unwrap();
    let mut stack = stack;
    stack.signal_sequencer(i, "STOP").unwrap();
    stack.signal_sequencer(1 - i, "STOP").unwrap();
    let summary = wait_summary(&stack, |s| {
        s["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "no writer" && a["state"] == "firing")
    })
    .await;
    let unreachable = summary["sequencers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["reachable"] == false)
        .count();
    assert_eq!(unreachable, 2, "{summary}");
    stack.signal_sequencer(i, "CONT").unwrap();
    stack.signal_sequencer(1 - i, "CONT").unwrap();
}

/// A stack with an active and a standby sequencer, for the console to show both.
async fn two_sequencers(name: &str) -> Stack {
    let options = Options {
        sequencers: 2,
        ..Options::default()
    };
    Stack::start(name, options).await.unwrap()
}

/// A sale of `total` units that starts in 2999, its pre-sale queue (at most `max` requests) open
/// since 2000: reservations wait in it.
async fn put_presale(stack: &Stack, sku: &str, total: u64, max: u32) {
    let body = json!({"total_stock": total, "per_user_limit": 1, "hold_ttl_seconds": 300,
                      "starts_at": "2999-01-01T00:00:00Z",
                      "queue": {"opens_at": "2000-01-01T00:00:00Z", "max": max}});
    let path = format!("/v1/admin/skus/{sku}");
    let (status, body) = stack.admin("PUT", &path, Some(body)).await.unwrap();
    assert_eq!(status, 200, "{body}");
}

/// `buyers` buyers reserve one unit of `sku` each; every one is answered `status`.
async fn reserve_each(stack: &Stack, sku: &str, buyers: usize, status: u16) {
    for i in 0..buyers {
        let buyer = format!("{sku}-buyer-{i}");
        let (answered, body) = stack.reserve(sku, &buyer, 1, "k").await.unwrap();
        assert_eq!(answered, status, "{body}");
    }
}

/// The summary once `done` holds for it (within 20 s).
async fn wait_summary(stack: &Stack, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, summary) = stack.get("/v1/ops/summary").await.unwrap();
        assert_eq!(status, 200, "{summary}");
        if done(&summary) {
            return summary;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the summary never got there: {summary}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The browser (`FLASH_CHROMIUM`, else Debian's /usr/bin/chromium), or a failure saying how to
/// get it.
fn chromium() -> PathBuf {
    let path = PathBuf::from(
        std::env::var_os("FLASH_CHROMIUM").unwrap_or_else(|| "/usr/bin/chromium".into()),
    );
    assert!(
        path.is_file(),
        "no browser at {} (FLASH_CHROMIUM): run scripts/test, which installs Debian's chromium \
         (scripts/lib.sh, ensure_chromium), or point FLASH_CHROMIUM at one",
        path.display()
    );
    path
}

/// systest/browser with its node_modules, or a failure saying how to get them.
fn browser_dir() -> &'static Path {
    let dir = Path::new(BROWSER_DIR);
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .is_file(),
        "{}/node_modules has no playwright-core: run scripts/test, which runs `npm ci` there \
         (scripts/lib.sh, ensure_browser_test)",
        dir.display()
    );
    dir
}

/// The browser script's stdout, a line at a time.
struct Script {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    said: Vec<String>,
}

impl Script {
    /// The next line, which must start with `expected`; fails on `FAIL ...`, on the script
    /// ending, and after `within`.
    async fn expect(&mut self, expected: &str, within: Duration) -> String {
        let line = tokio::time::timeout(within, self.lines.next_line()).await;
        let line = match line {
            Ok(Ok(Some(line))) => line,
            Ok(_) => panic!(
                "the browser script ended before saying {expected} (said {:?}; stderr in {})",
                self.said,
                stderr_path().display()
            ),
            Err(_) => panic!(
                "the browser script did not say {expected} within {within:?} (said {:?})",
                self.said
            ),
        };
        self.said.push(line.clone());
        assert!(
            line.starts_with(expected),
            "the browser script: {line} (expected {expected}; said {:?}; stderr in {})",
            self.said,
            stderr_path().display()
        );
        line
    }

    async fn tell(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }
}

fn stderr_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/systest-logs/ops-console-browser.stderr"
    ))
}

/// Where the page's screenshot goes (docs/ops-console.png is one of these).
fn screenshot_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/ops-console.png"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_count_falling_and_pauses_a_sku_from_the_page() {
    let (chromium, dir) = (chromium(), browser_dir());
    let stack = two_sequencers("ops_console").await;
    stack.put_sku("tee-1", 100, 5, 300.0).await.unwrap();
    // Two more, for a page that looks like a sale.
    stack.put_sku("cap-7", 40, 2, 300.0).await.unwrap();
    stack.put_sku("mug-2", 250, 4, 600.0).await.unwrap();
    reserve_each(&stack, "cap-7", 6, 201).await;
    // A sale that starts later: three buyers wait in its pre-sale queue.
    put_presale(&stack, "poster-3", 500, 50).await;
    reserve_each(&stack, "poster-3", 3, 202).await;

    std::fs::create_dir_all(stderr_path().parent().unwrap()).unwrap();
    let node = std::env::var_os("FLASH_NODE").unwrap_or_else(|| "node".into());
    let mut child = Command::new(&node)
        .arg("ops_console.mjs")
        .current_dir(dir)
        .env("BASE_URL", &stack.base)
        .env("SKU", "tee-1")
        .env("EXPECT_AVAILABLE", "100")
        .env("QUEUED_SKU", "poster-3")
        .env("EXPECT_QUEUED", "3 / 50")
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SCREENSHOT", screenshot_path())
        .env("FLASH_CHROMIUM", &chromium)
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr_path()).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("starting {node:?} (node.js, for the browser script): {e}; scripts/test installs it")
        });
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut script = Script {
        child,
        lines,
        said: Vec::new(),
    };

    // Chromium starts and the page shows 100 available, on a live stream.
    script.expect("READY", Duration::from_secs(90)).await;

    // Ten buyers reserve one each: the page's count falls to 90.
    for i in 0..10 {
        let (status, body) = stack.reserve_one("tee-1", i).await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    script.tell("RESERVED 90").await;
    script.expect("SAW 90", Duration::from_secs(30)).await;

    // A wrong token is refused with the API's code, shown on the page; the right one pauses.
    script
        .expect("REFUSED 401 unauthorized", Duration::from_secs(30))
        .await;
    script.expect("PAUSED", Duration::from_secs(30)).await;

    // The pause the page sent is what the sequencer decides from now on.
    let (status, body) = stack
        .reserve("tee-1", "late-buyer", 1, "k-late")
        .await
        .unwrap();
    assert_error(status, &body, (409, "sale_paused"));
    let (_, sku) = stack.get("/v1/skus/tee-1").await.unwrap();
    assert_eq!(sku["status"], "paused", "{sku}");
    assert_eq!(sku["available"], 90, "{sku}");

    script.expect("DONE", Duration::from_secs(30)).await;
    let status = tokio::time::timeout(Duration::from_secs(30), script.child.wait())
        .await
        .expect("the browser script did not exit")
        .unwrap();
    assert!(status.success(), "the browser script exited {status}");
    let png = std::fs::read(screenshot_path()).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is no PNG");
    println!("screenshot: {}", screenshot_path().display());
}
