//! Cold start and takeover at scale: how long a sequencer takes to decide again after every
//! sequencer died, with millions of decisions stored, and how long a following standby takes to
//! take over.
//!
//! The state is made on the real path: the requests go into a fresh topic and a release
//! `sequencer run` decides them, writing its rows, batches and checkpoints as it would in a sale
//! (every request a new buyer, one hot SKU, so nearly every decision is a refusal). At each size
//! the sequencer is SIGKILLed and a new process started; the figures are read from its `/status`
//! (how the state was loaded and how long that took) and from the clock: spawn to active, and
//! spawn to the first new request decided.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;
use harness::topics::Topology;
use serde::Serialize;
use wire::{Command as WireCommand, Request, SkuConfig};

use crate::stack::{wait_http, Infra, Proc};

/// One, five and ten million stored decisions: a sale, a busy day, a busy week.
const DEFAULT_SIZES: &str = "1000000,5000000,10000000";

#[derive(Clone, Debug, clap::Args)]
pub struct ColdStartArgs {
    /// Stored decisions at which a cold start is measured, ascending (each adds to the last).
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_SIZES)]
    pub sizes: Vec<u64>,
    /// Units of the hot SKU.
    #[arg(long, default_value_t = 10_000)]
    pub stock: u64,
    /// Requests produced to the topic at a time (bounds the generator's memory).
    #[arg(long, default_value_t = 500_000)]
    pub chunk: u64,
    #[arg(long, default_value_t = 19_185)]
    pub status_port: u16,
    #[arg(long, default_value_t = 19_186)]
    pub standby_status_port: u16,
    /// Give up on any one wait after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    #[command(flatten)]
    pub infra: Infra,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct ColdStart {
    pub decisions: u64,
    /// Seconds the real sequencer took to decide the requests added for this size.
    pub fill_s: f64,
    /// Batches committed after the newest checkpoint when the sequencer was killed (replayed
    /// from the log by the new process).
    pub batches_after_checkpoint: u64,
    pub loaded_from: String,
    /// Reading and rebuilding the state, as the new process reports it.
    pub load_ms: u64,
    /// Spawn of the new process to its `/readyz` saying active.
    pub ready_ms: u64,
    /// Spawn of the new process to a request produced at spawn being committed.
    pub first_decision_ms: u64,
    /// Resident memory of the new process once active.
    pub rss_mib: f64,
    /// Checkpoint deltas stored: uncompressed and stored bytes.
    pub checkpoint_raw_mib: f64,
    pub checkpoint_stored_mib: f64,
    /// Postgres's size of the reservations table with its indexes.
    pub reservations_mib: f64,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct Takeover {
    pub decisions: u64,
    /// SIGKILL of the leader to the standby reporting active.
    pub active_ms: u64,
    /// SIGKILL of the leader to a request produced at the kill being committed by the standby.
    pub first_decision_ms: u64,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct ColdStartReport {
    pub cold_starts: Vec<ColdStart>,
    pub takeover: Option<Takeover>,
}

struct Run {
    infra: Infra,
    topology: Topology,
    sku: String,
    ingress_id: u64,
    base_id: u128,
    /// Next log offset to produce (= requests produced so far).
    produced: u64,
    spawned: u32,
}

impl Run {
    fn request(&self, n: u64) -> Request {
        Request {
            request_id: self.base_id + u128::from(n),
            ingress_id: self.ingress_id,
            command: WireCommand::Reserve {
                sku: self.sku.clone(),
                user_id: format!("buyer-{n}"),
                quantity: 1,
                idempotency_key: format!("k-{n}"),
            },
        }
    }

    fn produce(&mut self, payloads: Vec<Vec<u8>>) -> anyhow::Result<()> {
        let n = payloads.len() as u64;
        harness::topics::produce(
            &self.infra.brokers,
            &self.topology.requests_topic,
            &payloads,
        )?;
        self.produced += n;
        Ok(())
    }

    fn produce_reserves(&mut self, upto: u64, chunk: u64) -> anyhow::Result<()> {
        while self.produced < upto {
            let end = (self.produced + chunk).min(upto);
            let payloads = (self.produced..end)
                .map(|n| wire::encode(&self.request(n)))
                .collect();
            self.produce(payloads)?;
        }
        Ok(())
    }

    fn spawn(&mut self, port: u16) -> anyhow::Result<Proc> {
        self.spawned += 1;
        let name = format!("coldstart-sequencer-{}", self.spawned);
        let mut cmd =
            self.topology
                .sequencer(&self.infra.bin_dir(), &name, &format!("127.0.0.1:{port}"));
        cmd.env("BATCH_SIZE_MAX", "2000")
            .env("BATCH_SIZE_BACKLOG_MAX", "2000");
        let log = self.infra.log_file(&name)?;
        Proc::spawn(&name, cmd, log)
    }
}

async fn status(port: u16) -> Option<serde_json::Value> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
    let r = crate::http::once(addr, "GET", "/status", "", b"", Duration::from_millis(500))
        .await
        .ok()?;
    serde_json::from_slice(&r.body).ok()
}

/// Waits until the process on `port` has committed every offset below `offset`.
async fn wait_committed(
    port: u16,
    offset: u64,
    proc_: &mut Proc,
    within: Duration,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + within;
    let mut last_print = Instant::now();
    loop {
        proc_.check_alive()?;
        if let Some(doc) = status(port).await {
            let committed = doc["committed_offset"].as_i64().unwrap_or(0);
            if doc["role"] == "active" && committed >= offset as i64 {
                return Ok(doc);
            }
            if last_print.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "coldstart: committed {committed}/{offset} ({})",
                    doc["role"]
                );
                last_print = Instant::now();
            }
        }
        if Instant::now() > deadline {
            bail!("offset {offset} not committed within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn rss_mib(proc_: &Proc) -> f64 {
    let Some(pid) = proc_.child.as_ref().map(|c| c.id()) else {
        return 0.0;
    };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn kill(proc_: &mut Proc) {
    if let Some(mut c) = proc_.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

async fn sizes(database_url: &str) -> anyhow::Result<(f64, f64, f64)> {
    let pool = sqlx::PgPool::connect(database_url).await?;
    let (raw, stored, table): (i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(raw_bytes), 0)::int8, coalesce(sum(octet_length(body)), 0)::int8,
                pg_total_relation_size('reservations')
           FROM checkpoint_deltas",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
    Ok((mib(raw), mib(stored), mib(table)))
}

pub async fn run(args: &ColdStartArgs) -> anyhow::Result<ColdStartReport> {
    let infra = args.infra.clone();
    let within = Duration::from_secs(args.timeout_s);
    let suffix = format!("cold_{:06x}", crate::rand32() & 0xFF_FFFF);
    let fresh = infra.fresh_topology(&suffix).await?;
    let database_url = fresh.topology.database_url.clone();
    let mut run = Run {
        infra: infra.clone(),
        topology: fresh.topology.clone(),
        sku: format!("cold-{suffix}"),
        ingress_id: u64::from(crate::rand32()),
        base_id: uuid::Uuid::now_v7().as_u128(),
        produced: 0,
        spawned: 0,
    };
    let upsert = Request {
        request_id: run.base_id - 1,
        ingress_id: run.ingress_id,
        command: WireCommand::UpsertSku {
            sku: run.sku.clone(),
            config: SkuConfig {
                total_stock: args.stock,
                per_user_limit: 1,
                hold_ttl_ms: 3_600_000,
                starts_at_ms: None,
                ends_at_ms: None,
                queue: None,
            },
        },
    };
    let mut report = ColdStartReport::default();
    // Offsets: 0 is the SKU, then the reserves; each measured size adds reserves, then one probe.
    run.produce(vec![wire::encode(&upsert)])?;
    let mut leader = run.spawn(args.status_port)?;
    let port = args.status_port;
    let mut decisions = 0u64;
    for &size in &args.sizes {
        let target = run.produced + size.saturating_sub(decisions);
        let filling = Instant::now();
        eprintln!("coldstart: producing up to offset {target} and deciding it");
        run.produce_reserves(target, args.chunk)?;
        let doc = wait_committed(port, target, &mut leader, within).await?;
        let fill_s = filling.elapsed().as_secs_f64();
        // Every reserve is a new buyer with a new key: one decision each (offset 0 is the SKU).
        decisions = run.produced - 1;
        let batch_seq = doc["batch_seq"].as_u64().unwrap_or(0);
        let checkpoint = doc["checkpoint_batch_seq"].as_u64().unwrap_or(0);
        kill(&mut leader);
        let (raw, stored, table) = sizes(&database_url).await?;
        eprintln!(
            "coldstart: {decisions} decisions stored; SIGKILLed the sequencer; starting a new one"
        );
        let spawned = Instant::now();
        leader = run.spawn(port)?;
        let probe = run.request(run.produced);
        run.produce(vec![wire::encode(&probe)])?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        wait_http(addr, "/readyz", Some("active"), within, &mut leader).await?;
        let ready_ms = spawned.elapsed().as_millis() as u64;
        let doc = wait_committed(port, run.produced, &mut leader, within).await?;
        let first_decision_ms = spawned.elapsed().as_millis() as u64;
        let row = ColdStart {
            decisions,
            fill_s,
            batches_after_checkpoint: batch_seq.saturating_sub(checkpoint),
            loaded_from: doc["loaded_from"].as_str().unwrap_or("?").to_owned(),
            load_ms: doc["load_ms"].as_u64().unwrap_or(0),
            ready_ms,
            first_decision_ms,
            rss_mib: rss_mib(&leader),
            checkpoint_raw_mib: raw,
            checkpoint_stored_mib: stored,
            reservations_mib: table,
        };
        decisions = run.produced - 1;
        eprintln!("coldstart: {row:?}");
        report.cold_starts.push(row);
    }
    // Takeover: a standby that follows, then SIGKILL of the leader.
    let mut standby = run.spawn(args.standby_status_port)?;
    let standby_addr: SocketAddr = format!("127.0.0.1:{}", args.standby_status_port).parse()?;
    wait_http(
        standby_addr,
        "/readyz",
        Some("standby"),
        within,
        &mut standby,
    )
    .await?;
    // Let it follow a few batches so it is caught up, as a standby is in a sale.
    for _ in 0..3 {
        let probe = run.request(run.produced);
        run.produce(vec![wire::encode(&probe)])?;
        wait_committed(port, run.produced, &mut leader, within).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let killed = Instant::now();
    kill(&mut leader);
    let probe = run.request(run.produced);
    run.produce(vec![wire::encode(&probe)])?;
    wait_http(
        standby_addr,
        "/readyz",
        Some("active"),
        within,
        &mut standby,
    )
    .await?;
    let active_ms = killed.elapsed().as_millis() as u64;
    wait_committed(args.standby_status_port, run.produced, &mut standby, within).await?;
    let takeover = Takeover {
        decisions: run.produced - 1,
        active_ms,
        first_decision_ms: killed.elapsed().as_millis() as u64,
    };
    eprintln!("coldstart: takeover {takeover:?}");
    report.takeover = Some(takeover);
    let audit = crate::check::run_audit(&infra.bin("sequencer"), &database_url);
    standby.stop();
    if !audit.clean {
        bail!("audit after the cold-start benchmark: {}", audit.summary);
    }
    infra.remove(&fresh);
    print(&report);
    Ok(report)
}

pub fn print(r: &ColdStartReport) {
    println!("── cold start (every sequencer SIGKILLed, a new process started) ──");
    println!("| stored decisions | loaded from | load | spawn to active | spawn to first new decision | batches replayed | RSS | checkpoint (raw / stored) | reservations table |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in &r.cold_starts {
        println!(
            "| {} | {} | {} ms | {} ms | {} ms | {} | {:.0} MiB | {:.0} / {:.0} MiB | {:.0} MiB |",
            c.decisions,
            c.loaded_from,
            c.load_ms,
            c.ready_ms,
            c.first_decision_ms,
            c.batches_after_checkpoint,
            c.rss_mib,
            c.checkpoint_raw_mib,
            c.checkpoint_stored_mib,
            c.reservations_mib
        );
    }
    if let Some(t) = &r.takeover {
        println!(
            "takeover by a following standby at {} decisions: SIGKILL to active {} ms, to the first new decision {} ms",
            t.decisions, t.active_ms, t.first_decision_ms
        );
    }
}
