//! The sequencer alone: a requests topic pre-filled with N reserve commands, ONE release
//! `sequencer run` on a fresh database, timed until its committed offset reaches the end.
//!
//! Nothing was added to the sequencer for this: rates come from the `batches` table (each
//! batch's `decided_at` and `commands`) and from polling `/status`. The "commit latency" figures
//! are (a) the sequencer's own `last_commit_us`, sampled every 10 ms (a sample of batches, not all
//! of them), and (b) the interval between consecutive batches' `decided_at`, which is the whole
//! cycle (fill + decide + commit + publish) at millisecond resolution.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde::Serialize;
use sqlx::Row;
use wire::{Command as WireCommand, Request, SkuConfig};

use crate::check::{self, AuditResult};
use crate::http;
use crate::load::Latency;
use crate::stack::{wait_http, Infra, Proc};

#[derive(Clone, Debug, clap::Args)]
pub struct PipelineArgs {
    /// Reserve commands pre-filled into the topic.
    #[arg(long, default_value_t = 200_000)]
    pub requests: u64,
    /// BATCH_SIZE_MAX (and BATCH_SIZE_BACKLOG_MAX) of the sequencer; several values run one
    /// after the other.
    #[arg(long, value_delimiter = ',', default_value = "250,2000")]
    pub batch_sizes: Vec<usize>,
    /// Units of the hot SKU (the rest of the requests are refused sold_out or limit_exceeded).
    #[arg(long, default_value_t = 10_000)]
    pub stock: u64,
    /// Distinct buyers.
    #[arg(long, default_value_t = 200_000)]
    pub users: u64,
    /// Percent of requests that repeat an earlier idempotency key.
    #[arg(long, default_value_t = 5)]
    pub retry_pct: u64,
    /// Port of the sequencer's status endpoint.
    #[arg(long, default_value_t = 19_181)]
    pub status_port: u16,
    /// Give up waiting for the sequencer after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
    #[command(flatten)]
    pub infra: Infra,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct PipelineReport {
    pub batch_size_max: usize,
    pub requests: u64,
    pub prefill_s: f64,
    pub prefill_rate: f64,
    /// A bare rdkafka consumer with the sequencer's fetch settings reading the pre-filled topic
    /// and doing nothing else: the ceiling the broker puts on the pipeline.
    pub broker_read_rate: f64,
    pub broker_read_s: f64,
    /// Mean time of one `fetch_watermarks` call (a broker round trip), over 20 calls. The
    /// sequencer's log reader makes one every 64 messages (sequencer/src/log.rs).
    pub watermark_query_ms: f64,
    /// From the sequencer turning active to the committed offset reaching the end (wall clock).
    pub drain_s: f64,
    pub decisions_per_s_wall: f64,
    /// Commands / (last batch decided_at - first batch decided_at), from the `batches` table.
    pub decisions_per_s_batches: f64,
    pub batches: u64,
    pub batch_size: Latency,
    pub batch_size_mean: f64,
    /// `last_commit_us` as sampled from /status (in ms).
    pub commit_ms_sampled: Latency,
    /// Interval between consecutive batches' decided_at (ms resolution).
    pub batch_interval_ms: Latency,
    pub audit: Option<AuditResult>,
}

/// The hot SKU of a pre-fill: `--stock` units, 2 per buyer, holds of 5 minutes.
pub(crate) fn hot_sku(args: &PipelineArgs) -> SkuConfig {
    SkuConfig {
        total_stock: args.stock,
        per_user_limit: 2,
        hold_ttl_ms: 300_000,
        starts_at_ms: None,
        ends_at_ms: None,
        queue: None,
    }
}

/// Encodes the pre-fill: one UpsertSku, then N reserves on the hot SKU.
fn messages(args: &PipelineArgs, sku: &str, run: &str) -> Vec<Vec<u8>> {
    let ingress_id = u64::from(crate::rand32());
    let base = uuid::Uuid::now_v7().as_u128();
    let mut out = Vec::with_capacity(args.requests as usize + 1);
    out.push(wire::encode(&Request {
        request_id: base,
        ingress_id,
        command: WireCommand::UpsertSku {
            sku: sku.to_owned(),
            config: hot_sku(args),
        },
    }));
    for i in 0..args.requests {
        let orig = if i > 0 && crate::scenario::mix(i ^ 0xA1) % 100 < args.retry_pct {
            i - 1 - crate::scenario::mix(i ^ 0xA2) % i.min(500)
        } else {
            i
        };
        let user = crate::scenario::mix(orig ^ 0xA3) % args.users;
        out.push(wire::encode(&Request {
            request_id: base + 1 + u128::from(i),
            ingress_id,
            command: WireCommand::Reserve {
                sku: sku.to_owned(),
                user_id: format!("u{user}"),
                quantity: 1,
                idempotency_key: format!("{run}-{orig}"),
            },
        }));
    }
    out
}

/// Reads the whole topic once with the sequencer's consumer settings
/// (`kafka_config::requests_reader`) and nothing else; returns (seconds, messages/s).
fn read_probe(brokers: &str, topic: &str, total: i64) -> anyhow::Result<(f64, f64, f64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer =
        kafka_config::requests_reader(brokers, "flash-bench-read-probe".into(), 5).create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(0))?;
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut seen = 0i64;
    while seen < total {
        if Instant::now() > deadline {
            bail!("read probe: only {seen} of {total} messages in 120 s");
        }
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            seen = seen.max(m.offset() + 1);
        }
    }
    let s = started.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..20 {
        consumer.fetch_watermarks(topic, 0, Duration::from_secs(5))?;
    }
    let watermark_ms = t.elapsed().as_secs_f64() * 1000.0 / 20.0;
    Ok((s, total as f64 / s, watermark_ms))
}

pub(crate) async fn status(addr: SocketAddr) -> Option<serde_json::Value> {
    let r = http::once(addr, "GET", "/status", "", b"", Duration::from_millis(500))
        .await
        .ok()?;
    serde_json::from_slice(&r.body).ok()
}

/// One release `sequencer run` on `topology` with batches of at most `batch_size` (a fixed cap:
/// no growth of batches under backlog, which would otherwise grow every run's batches to the
/// backlog maximum), once it is active (for every partition it leads).
pub(crate) async fn drain_sequencer(
    infra: &Infra,
    topology: &harness::topics::Topology,
    status_addr: SocketAddr,
    batch_size: usize,
    log: &str,
) -> anyhow::Result<Proc> {
    let mut cmd = topology.sequencer(&infra.bin_dir(), "bench-drain", &status_addr.to_string());
    cmd.env("BATCH_SIZE_MAX", batch_size.to_string())
        .env("BATCH_SIZE_BACKLOG_MAX", batch_size.to_string());
    let mut proc_ = Proc::spawn("sequencer", cmd, infra.log_file(log)?)?;
    wait_http(
        status_addr,
        "/readyz",
        Some("active"),
        Duration::from_secs(60),
        &mut proc_,
    )
    .await?;
    Ok(proc_)
}

pub async fn run_one(args: &PipelineArgs, batch_size_max: usize) -> anyhow::Result<PipelineReport> {
    let infra = &args.infra;
    let suffix = format!("pipe{batch_size_max}_{:06x}", crate::rand32() & 0xFF_FFFF);
    let fresh = infra.fresh_topology(&suffix).await?;
    let topology = &fresh.topology;
    let (database_url, requests_topic) = (
        topology.database_url.clone(),
        topology.requests_topic.clone(),
    );
    let sku = format!("pipe-{suffix}");
    eprintln!(
        "pipeline: encoding and producing {} requests to {requests_topic}",
        args.requests + 1
    );
    let payloads = messages(args, &sku, &suffix);
    let t = Instant::now();
    let brokers = infra.brokers.clone();
    let topic = requests_topic.clone();
    tokio::task::spawn_blocking(move || harness::topics::produce(&brokers, &topic, &payloads))
        .await??;
    let prefill_s = t.elapsed().as_secs_f64();
    let total = args.requests as i64 + 1;
    let (brokers, topic) = (infra.brokers.clone(), requests_topic.clone());
    let (broker_read_s, broker_read_rate, watermark_query_ms) =
        tokio::task::spawn_blocking(move || read_probe(&brokers, &topic, total)).await??;
    eprintln!(
        "pipeline: pre-filled in {prefill_s:.1} s; a bare consumer reads it back at {broker_read_rate:.0} msg/s; one watermark query takes {watermark_query_ms:.1} ms; starting one sequencer with BATCH_SIZE_MAX={batch_size_max}"
    );
    let status_addr: SocketAddr = format!("127.0.0.1:{}", args.status_port).parse()?;
    let log = format!("pipeline-{batch_size_max}-sequencer");
    let mut proc_ = drain_sequencer(infra, topology, status_addr, batch_size_max, &log).await?;
    let started = Instant::now();
    let mut commit_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut last_batches = 0;
    let mut last_print = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_s);
    let finished = loop {
        proc_.check_alive()?;
        if let Some(doc) = status(status_addr).await {
            let committed = doc["committed_offset"].as_i64().unwrap_or(0);
            let batches = doc["batches_committed"].as_u64().unwrap_or(0);
            if batches != last_batches {
                commit_us.saturating_record(doc["last_commit_us"].as_u64().unwrap_or(0).max(1));
                last_batches = batches;
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                eprintln!(
                    "pipeline [{:>4.0}s] committed offset {committed}/{total}, {batches} batches, last batch {} commands, commit {} us",
                    started.elapsed().as_secs_f64(),
                    doc["last_batch_size"],
                    doc["last_commit_us"]
                );
                last_print = Instant::now();
            }
            if committed >= total {
                break started.elapsed();
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the sequencer did not reach offset {total} within {}s",
                args.timeout_s
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    proc_.stop();
    // Batch sizes and intervals from the table.
    let pool = sqlx::PgPool::connect(&database_url).await?;
    let rows = sqlx::query(
        "SELECT (extract(epoch FROM decided_at) * 1000)::bigint, commands FROM batches
          WHERE commands > 0 ORDER BY batch_seq",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    let mut sizes = Histogram::<u64>::new_with_bounds(1, 1_000_000, 3)?;
    let mut intervals = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut prev: Option<i64> = None;
    let (mut first_ms, mut last_ms, mut commands) = (None, 0i64, 0i64);
    for r in &rows {
        let (at, n): (i64, i32) = (r.get(0), r.get(1));
        sizes.saturating_record(n.max(1) as u64);
        if let Some(p) = prev {
            // Microseconds in the histogram so Latency::of reports ms.
            intervals.saturating_record(((at - p).max(0) * 1000).max(1) as u64);
        }
        prev = Some(at);
        first_ms.get_or_insert(at);
        last_ms = at;
        commands += i64::from(n);
    }
    let span_ms = (last_ms - first_ms.unwrap_or(last_ms)).max(1);
    let audit = check::run_audit(&infra.bin("sequencer"), &database_url);
    infra.remove(&fresh);
    let drain_s = finished.as_secs_f64();
    let size_lat = Latency::of(&sizes);
    let report = PipelineReport {
        batch_size_max,
        requests: args.requests,
        prefill_s,
        prefill_rate: total as f64 / prefill_s,
        broker_read_rate,
        broker_read_s,
        watermark_query_ms,
        drain_s,
        decisions_per_s_wall: total as f64 / drain_s,
        decisions_per_s_batches: commands as f64 * 1000.0 / span_ms as f64,
        batches: rows.len() as u64,
        batch_size: Latency {
            // Latency::of divides by 1000; batch sizes are plain counts.
            p50_ms: size_lat.p50_ms * 1000.0,
            p90_ms: size_lat.p90_ms * 1000.0,
            p99_ms: size_lat.p99_ms * 1000.0,
            p999_ms: size_lat.p999_ms * 1000.0,
            max_ms: size_lat.max_ms * 1000.0,
            mean_ms: size_lat.mean_ms * 1000.0,
            samples: size_lat.samples,
        },
        batch_size_mean: sizes.mean(),
        commit_ms_sampled: Latency::of(&commit_us),
        batch_interval_ms: Latency::of(&intervals),
        audit: Some(audit),
    };
    print(&report);
    Ok(report)
}

pub fn print(r: &PipelineReport) {
    println!("── pipeline, BATCH_SIZE_MAX={} ──", r.batch_size_max);
    println!(
        "  {} requests pre-filled in {:.1} s ({:.0}/s); a bare consumer reads them at {:.0}/s; the sequencer drained them in {:.2} s",
        r.requests, r.prefill_s, r.prefill_rate, r.broker_read_rate, r.drain_s
    );
    println!(
        "  one broker watermark query (fetch_watermarks): {:.1} ms",
        r.watermark_query_ms
    );
    println!(
        "  decisions/s: {:.0} (wall, incl. start-up poll) / {:.0} (batches table, first to last batch)",
        r.decisions_per_s_wall, r.decisions_per_s_batches
    );
    println!(
        "  {} batches; size p50 {:.0} p90 {:.0} p99 {:.0} max {:.0} mean {:.1}",
        r.batches,
        r.batch_size.p50_ms,
        r.batch_size.p90_ms,
        r.batch_size.p99_ms,
        r.batch_size.max_ms,
        r.batch_size_mean
    );
    println!(
        "  commit ms (sampled last_commit_us, {} samples): p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        r.commit_ms_sampled.samples,
        r.commit_ms_sampled.p50_ms,
        r.commit_ms_sampled.p90_ms,
        r.commit_ms_sampled.p99_ms,
        r.commit_ms_sampled.max_ms
    );
    println!(
        "  batch-to-batch interval ms: p50 {:.0} p90 {:.0} p99 {:.0} max {:.0}",
        r.batch_interval_ms.p50_ms,
        r.batch_interval_ms.p90_ms,
        r.batch_interval_ms.p99_ms,
        r.batch_interval_ms.max_ms
    );
    if let Some(a) = &r.audit {
        println!("  sequencer audit: {}", a.summary);
    }
}
