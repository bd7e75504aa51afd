//! The named load presets (`flash`, `mixed`, `ramp`), their SKU setup, and the final checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::check::{self, CheckReport};
use crate::hops;
use crate::http;
use crate::load::{self, Kind, Phase, PhaseReport, Pool, Req, Workload};
use crate::ramp::{self, RampResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One hot SKU (10,000 units), ~200k users, 5% retries, then confirms/cancels from winners.
    Flash,
    /// Many SKUs with skewed popularity, 10% reads, 5% retries.
    Mixed,
    /// One hot SKU that never sells out; the rate rises until p99 passes the limit.
    Ramp,
}

#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    #[arg(long, value_enum, default_value = "flash")]
    pub scenario: Scenario,
    #[command(flatten)]
    pub offered: OfferedLoad,
    /// Base URL of the HTTP API; loopback only.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Hard cap on requests of the whole run, whatever rate and duration say.
    #[arg(long, default_value_t = 2_000_000)]
    pub max_requests: u64,
    /// Client-side timeout of one request.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Bearer token of the admin routes (SKU setup); default: $ADMIN_TOKEN or .run/admin_token.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Postgres of the target, for the oversell check over `skus` and `reservations`.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Run `sequencer audit` with this binary against --database-url at the end.
    #[arg(long)]
    pub audit_bin: Option<PathBuf>,
    /// Partitions of the target's requests topic: partition p's database is --database-url's
    /// with `_p{p}` after the name (as `scripts/up` makes them).
    #[arg(long, env = "REQUEST_PARTITIONS", default_value_t = 1)]
    pub partitions: u32,
    /// Units of the hot SKU (flash, ramp) or of each SKU (mixed).
    #[arg(long)]
    pub stock: Option<u64>,
    /// Distinct buyers.
    #[arg(long, default_value_t = 200_000)]
    pub users: u64,
    /// SKUs of the mixed scenario.
    #[arg(long, default_value_t = 500)]
    pub skus: u32,
    /// Percent of reservation requests that are client retries with the same idempotency key.
    #[arg(long, default_value_t = 5)]
    pub retry_pct: u64,
    /// Ramp: each step's rate is the previous one times this factor.
    #[arg(long, default_value_t = 1.5)]
    pub ramp_factor: f64,
    /// Ramp: stop rising at this rate (it also stops once decisions fall under 90% of it).
    #[arg(long, default_value_t = 80_000.0)]
    pub ramp_max: f64,
    /// The p99 a rate must keep to count as sustainable (ramp), and the flash target.
    #[arg(long, default_value_t = 120.0)]
    pub p99_limit_ms: f64,
    /// Skip the confirm/cancel phase of flash.
    #[arg(long)]
    pub no_follow_up: bool,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Name of this run in the report (default: the scenario).
    #[arg(long)]
    pub label: Option<String>,
    /// `/metrics` URLs of the target's ingress and active sequencer: each phase then reports
    /// the latency of every hop of a write (bench/src/hops.rs).
    #[arg(long, value_delimiter = ',')]
    pub metrics: Vec<String>,
    /// Where the JSON report goes.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}

/// The offered load: requests/s, for how long, on how many connections. Asked for on the
/// command line and recorded in the report as it was asked for.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct OfferedLoad {
    /// Offered requests/s (for ramp: the first step's rate).
    #[arg(long, default_value_t = 25_000.0)]
    pub rate: f64,
    /// Seconds of load (for ramp: seconds per step).
    #[arg(long, default_value_t = 60.0)]
    #[serde(rename = "duration_s")]
    pub duration: f64,
    /// Keep-alive connections (each carries one request at a time).
    #[arg(long, default_value_t = 2_000)]
    pub connections: usize,
}

#[derive(Serialize, Clone, Debug)]
pub struct LoadReport {
    pub label: String,
    pub scenario: Scenario,
    pub target: String,
    pub started_at: String,
    #[serde(flatten)]
    pub offered: OfferedLoad,
    pub skus: Vec<String>,
    pub stock_per_sku: u64,
    pub phases: Vec<PhaseReport>,
    pub ramp: Option<RampResult>,
    pub check: CheckReport,
    pub report_path: Option<String>,
}

impl LoadReport {
    /// The main phase (the reservations of flash/mixed, the knee step of ramp).
    pub fn main_phase(&self) -> Option<&PhaseReport> {
        self.phases.first()
    }
}

pub fn admin_token(arg: &Option<String>) -> String {
    if let Some(t) = arg {
        return t.clone();
    }
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../.run/admin_token");
    std::fs::read_to_string(file)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// splitmix64: a fast, well-mixed deterministic hash of the request index.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

const SEED_RETRY: u64 = 0x5EED_0001;
const SEED_BACK: u64 = 0x5EED_0002;
const SEED_USER: u64 = 0x5EED_0003;
const SEED_SKU: u64 = 0x5EED_0004;
const SEED_READ: u64 = 0x5EED_0005;

/// The first attempt behind request `i`: a retry repeats an attempt sent shortly before it.
fn first_attempt(mut i: u64, retry_pct: u64) -> u64 {
    while i > 0 && mix(i ^ SEED_RETRY) % 100 < retry_pct {
        i -= 1 + mix(i ^ SEED_BACK) % i.min(500);
    }
    i
}

fn reserve(run: &str, sku: &str, slot: u32, user: &str, orig: u64) -> Req {
    Req {
        method: "POST",
        path: "/v1/reservations".into(),
        body: format!(
            r#"{{"sku":"{sku}","user_id":"{user}","quantity":1,"idempotency_key":"{run}-{orig}"}}"#
        )
        .into_bytes(),
        kind: Kind::Reserve { orig, slot },
    }
}

fn flash_workload(run: Arc<str>, sku: Arc<str>, users: u64, retry_pct: u64) -> Workload {
    Arc::new(move |i| {
        let orig = first_attempt(i, retry_pct);
        let user = format!("u{}", mix(orig ^ SEED_USER) % users);
        reserve(&run, &sku, 0, &user, orig)
    })
}

fn mixed_workload(run: Arc<str>, skus: Arc<Vec<String>>, users: u64, retry_pct: u64) -> Workload {
    Arc::new(move |i| {
        let pick = |n: u64| {
            // Skewed popularity: u^3 puts most traffic on the first few SKUs.
            let u = (mix(n ^ SEED_SKU) % 1_000_000) as f64 / 1_000_000.0;
            ((skus.len() as f64 * u * u * u) as usize).min(skus.len() - 1)
        };
        if mix(i ^ SEED_READ) % 100 < 10 {
            return Req {
                method: "GET",
                path: format!("/v1/skus/{}", skus[pick(i)]),
                body: Vec::new(),
                kind: Kind::Read,
            };
        }
        let orig = first_attempt(i, retry_pct);
        let slot = pick(orig);
        let user = format!("u{}", mix(orig ^ SEED_USER) % users);
        reserve(&run, &skus[slot], slot as u32, &user, orig)
    })
}

fn ramp_workload(run: Arc<str>, sku: Arc<str>) -> Workload {
    // Every request a new buyer: every decision is a grant on the hot row, the costliest case.
    Arc::new(move |i| reserve(&run, &sku, 0, &format!("r{i}"), i))
}

fn settle_workload(winners: Arc<Vec<u128>>) -> Workload {
    // 70% confirmed, 20% cancelled, 10% left held.
    Arc::new(move |i| {
        let id = uuid::Uuid::from_u128(winners[i as usize]);
        let (path, kind) = if i % 10 < 7 {
            (format!("/v1/reservations/{id}/confirm"), Kind::Confirm)
        } else {
            (format!("/v1/reservations/{id}/cancel"), Kind::Cancel)
        };
        Req {
            method: "POST",
            path,
            body: Vec::new(),
            kind,
        }
    })
}

/// Creates (or resets) `skus` with `stock` units each through the admin API.
pub async fn setup_skus(
    addr: SocketAddr,
    token: &str,
    skus: &[String],
    stock: u64,
    per_user_limit: u32,
) -> anyhow::Result<()> {
    let auth: Arc<str> = format!("Authorization: Bearer {token}\r\n").into();
    let body = format!(
        r#"{{"total_stock":{stock},"per_user_limit":{per_user_limit},"hold_ttl_seconds":300}}"#
    );
    for chunk in skus.chunks(32) {
        let mut set = tokio::task::JoinSet::new();
        for sku in chunk {
            let (auth, body, path) = (auth.clone(), body.clone(), format!("/v1/admin/skus/{sku}"));
            set.spawn(async move {
                let r = http::once(
                    addr,
                    "PUT",
                    &path,
                    &auth,
                    body.as_bytes(),
                    Duration::from_secs(30),
                )
                .await?;
                if r.status != 200 {
                    bail!(
                        "PUT {path} answered {}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    );
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
    }
    Ok(())
}

/// Runs a whole scenario: setup, load phases, follow-up, checks. Writes nothing to disk.
pub async fn run(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    let addr = http::parse_target(&args.target)?;
    let token = admin_token(&args.admin_token);
    let run_id: Arc<str> = format!("{:08x}", crate::rand32()).into();
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| format!("{:?}", args.scenario).to_lowercase());
    let started_at = chrono::Utc::now().to_rfc3339();
    let timeout = Duration::from_millis(args.timeout_ms);
    let (skus, stock, limit): (Vec<String>, u64, u32) = match args.scenario {
        Scenario::Flash => (
            vec![format!("flash-{run_id}")],
            args.stock.unwrap_or(10_000),
            2,
        ),
        Scenario::Mixed => (
            (0..args.skus.max(1))
                .map(|i| format!("mix-{run_id}-{i}"))
                .collect(),
            args.stock.unwrap_or(200),
            2,
        ),
        Scenario::Ramp => (
            vec![format!("ramp-{run_id}")],
            args.stock.unwrap_or(1_000_000_000),
            1,
        ),
    };
    eprintln!(
        "bench: {label}: setting up {} sku(s) with {stock} units on {addr}",
        skus.len()
    );
    setup_skus(addr, &token, &skus, stock, limit)
        .await
        .context("creating the scenario's SKUs (is the admin token right?)")?;
    let mut pool = Pool::open(addr, args.offered.connections).await?;
    let mut phases = Vec::new();
    let mut ramp = None;
    let mut winners_by_slot: Vec<u64> = vec![0; skus.len()];
    match args.scenario {
        Scenario::Flash | Scenario::Mixed => {
            let workload = if args.scenario == Scenario::Flash {
                flash_workload(
                    run_id.clone(),
                    skus[0].clone().into(),
                    args.users,
                    args.retry_pct,
                )
            } else {
                mixed_workload(
                    run_id.clone(),
                    Arc::new(skus.clone()),
                    args.users,
                    args.retry_pct,
                )
            };
            let phase = Phase {
                label: format!("{label}: reservations"),
                rate: args.offered.rate,
                duration: Duration::from_secs_f64(args.offered.duration),
                max_requests: args.max_requests,
                index_base: 0,
            };
            let (report, stats) = measured_phase(&mut pool, &phase, workload, timeout, args).await;
            let winners: Vec<(u128, u32)> = {
                let w = stats.winners.lock().unwrap();
                let mut v: Vec<(u128, u32)> = w.values().copied().collect();
                v.sort_unstable();
                v
            };
            for (_, slot) in &winners {
                winners_by_slot[*slot as usize] += 1;
            }
            let sent = report.sent;
            phases.push(report);
            if args.scenario == Scenario::Flash && !args.no_follow_up && !winners.is_empty() {
                let ids: Arc<Vec<u128>> = Arc::new(winners.iter().map(|w| w.0).collect());
                let n = (ids.len() as u64).min(args.max_requests.saturating_sub(sent));
                let rate = args.offered.rate.min(5_000.0);
                let phase = Phase {
                    label: format!("{label}: confirm 70% / cancel 20% of winners"),
                    rate,
                    duration: Duration::from_secs_f64(n as f64 / rate),
                    max_requests: n,
                    index_base: 0,
                };
                let (report, _) =
                    load::run_phase(&mut pool, &phase, settle_workload(ids), timeout, args.quiet)
                        .await;
                load::print_phase(&report);
                phases.push(report);
            }
        }
        Scenario::Ramp => {
            let workload = ramp_workload(run_id.clone(), skus[0].as_str().into());
            let (steps, result) = ramp::run(&mut pool, args, workload, timeout).await;
            // The knee step first, so `main_phase` is the sustainable one.
            let mut steps = steps;
            if let Some(k) = result.knee {
                if let Some(pos) = steps.iter().position(|s| s.offered_rate == k.offered_rate) {
                    let knee = steps.remove(pos);
                    steps.insert(0, knee);
                }
            }
            phases = steps;
            result.print();
            ramp = Some(result);
        }
    }
    drop(pool);
    let check = check::run(
        addr,
        &skus,
        &winners_by_slot,
        args.database_url.as_deref(),
        args.audit_bin.as_deref(),
        args.partitions,
    )
    .await;
    check::print(&check);
    Ok(LoadReport {
        label,
        scenario: args.scenario,
        target: args.target.clone(),
        started_at,
        offered: args.offered.clone(),
        skus: if skus.len() > 20 {
            vec![format!(
                "{} .. {} ({} skus)",
                skus[0],
                skus[skus.len() - 1],
                skus.len()
            )]
        } else {
            skus
        },
        stock_per_sku: stock,
        phases,
        ramp,
        check,
        report_path: None,
    })
}

/// Runs and prints one phase; with `--metrics`, also the latency of each hop during it.
pub(crate) async fn measured_phase(
    pool: &mut Pool,
    phase: &Phase,
    workload: Workload,
    timeout: Duration,
    args: &LoadArgs,
) -> (PhaseReport, Arc<load::Stats>) {
    let before = hops::scrape(&args.metrics).await;
    let (mut report, stats) = load::run_phase(pool, phase, workload, timeout, args.quiet).await;
    if !args.metrics.is_empty() {
        report.hops = hops::between(&before, &hops::scrape(&args.metrics).await);
    }
    load::print_phase(&report);
    hops::print(&report.hops);
    (report, stats)
}

/// Writes the JSON report under `dir` and returns its path.
pub fn write_report(dir: &std::path::Path, report: &LoadReport) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let path = dir.join(format!(
        "load-{}-{stamp}.json",
        report.label.replace(['/', ' '], "_")
    ));
    std::fs::write(&path, serde_json::to_vec_pretty(report)?)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_offered_load_keeps_the_report_s_keys() {
        let offered = super::OfferedLoad {
            rate: 25_000.0,
            duration: 60.0,
            connections: 2_000,
        };
        let v = serde_json::json!({"rate": 25_000.0, "duration_s": 60.0, "connections": 2_000});
        assert_eq!(serde_json::to_value(offered).unwrap(), v);
    }
}
