//! The sequencer's own small HTTP surface: liveness, readiness and a status document an operator
//! (or `sequencer status`) reads to see the role, epoch, committed offset and lag.
//!
//! It also holds [`Status`], the counters the runtime writes and these endpoints, the metrics and
//! the periodic log read; the runtime imports it, never the other way round.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use wire::{Outcome, Reject};

use crate::clock::now_ms;

pub const ROLE_STARTING: u8 = 0;
pub const ROLE_STANDBY: u8 = 1;
pub const ROLE_ACTIVE: u8 = 2;
pub const ROLE_STOPPED: u8 = 3;
/// The requests log lost what Postgres decided: nothing is decided until `rebase-log`.
pub const ROLE_LOG_LOST: u8 = 4;

pub const LOADED_FROM_CHECKPOINT: u8 = 1;
pub const LOADED_FROM_ROWS: u8 = 2;

/// What the status endpoint and the logs report; written by the runtime, read by anyone.
#[derive(Debug, Default)]
pub struct Status {
    /// The partition of the requests log these figures are about.
    pub partition: i32,
    pub role: AtomicU8,
    pub epoch: AtomicU64,
    pub committed_offset: AtomicI64,
    pub applied_batch_seq: AtomicU64,
    pub log_end: Arc<AtomicI64>,
    pub last_batch_ms: AtomicI64,
    pub batches_committed: AtomicU64,
    pub decisions: AtomicU64,
    pub commands: AtomicU64,
    pub last_commit_us: AtomicU64,
    pub last_batch_size: AtomicU64,
    /// The active is retrying a failed commit (Postgres unreachable): not ready.
    pub commit_failing: AtomicBool,
    /// When a standby last followed the leader's batches successfully (Unix ms).
    pub last_follow_ms: AtomicI64,
    /// Newest batch this process wrote a checkpoint for (0: none).
    pub checkpoint_batch_seq: Arc<AtomicU64>,
    /// How the state was last loaded ([`LOADED_FROM_CHECKPOINT`], [`LOADED_FROM_ROWS`]; 0 before
    /// a load) and how long it took.
    pub loaded_from: AtomicU8,
    pub load_ms: AtomicU64,
    /// The generation of the requests log this process reads.
    pub log_generation: AtomicI64,
    /// Why the requests log is lost, while it is (role `log_lost`).
    pub log_lost: std::sync::Mutex<Option<String>>,
}

impl Status {
    pub fn loaded_from_name(&self) -> Option<&'static str> {
        match self.loaded_from.load(Ordering::Relaxed) {
            LOADED_FROM_CHECKPOINT => Some("checkpoint"),
            LOADED_FROM_ROWS => Some("rows"),
            _ => None,
        }
    }

    pub fn role_name(&self) -> &'static str {
        match self.role.load(Ordering::Relaxed) {
            ROLE_STANDBY => "standby",
            ROLE_ACTIVE => "active",
            ROLE_STOPPED => "stopped",
            ROLE_LOG_LOST => "log_lost",
            _ => "starting",
        }
    }
}

#[derive(Serialize)]
pub struct StatusDoc {
    pub node_id: String,
    /// The first served partition (0 unless SEQUENCER_PARTITIONS says otherwise), at the top
    /// level as before partitions existed.
    #[serde(flatten)]
    pub first: PartitionDoc,
    pub last_batch_at_ms: i64,
    pub last_batch_size: u64,
    pub last_commit_us: u64,
    pub commands_decided: u64,
    pub decisions_written: u64,
    /// Where the state was last loaded from: "checkpoint" or "rows" (absent before a load).
    pub loaded_from: Option<&'static str>,
    /// How long that load took (reading and rebuilding, before the replay of later batches).
    pub load_ms: u64,
    /// Newest batch this process wrote a checkpoint for (0: none yet).
    pub checkpoint_batch_seq: u64,
    /// The generation of the requests log this process reads.
    pub log_generation: i64,
    /// Why the requests log is lost (role `log_lost`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_lost: Option<String>,
    /// Since the log reader last made progress (a poll returned); absent before it started.
    pub reader_poll_age_ms: Option<i64>,
    /// Whether `/readyz` answers 200 (every served partition is ready), and why not (the same
    /// text it answers).
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
    /// Every partition this process serves, in partition order.
    pub partitions: Vec<PartitionEntry>,
}

/// One served partition of the requests log: this process's role in it and how far it is.
#[derive(Serialize)]
pub struct PartitionDoc {
    pub partition: i32,
    pub role: &'static str,
    pub epoch: u64,
    pub committed_offset: i64,
    pub log_end_offset: i64,
    pub lag: i64,
    pub batch_seq: u64,
    pub last_batch_age_ms: Option<i64>,
    pub batches_committed: u64,
}

/// A partition in the `partitions` array: its figures and whether it is ready.
#[derive(Serialize)]
pub struct PartitionEntry {
    #[serde(flatten)]
    pub doc: PartitionDoc,
    pub ready: bool,
}

#[derive(Clone)]
struct Ctx {
    node_id: Arc<str>,
    /// One per served partition, in partition order.
    statuses: Arc<[Arc<Status>]>,
    metrics: PrometheusHandle,
}

/// Batch sizes and commit latencies are histograms with buckets fitted to the targets: batches of
/// about 250, commits of about 10 ms.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("sequencer_batch_commit_seconds".into()),
            &[
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("sequencer_batch_decide_seconds".into()),
            &[0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05],
        )?
        .set_buckets_for_metric(
            Matcher::Full("sequencer_request_wait_seconds".into()),
            &[
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.075, 0.1, 0.12, 0.25, 0.5, 1.0, 2.5,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("sequencer_batch_size".into()),
            &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0],
        )?
        .install_recorder()?;
    Ok(handle)
}

/// Per committed batch: a handful of series updates, nothing per request.
pub fn record_batch(
    partition: i32,
    out: &engine::BatchOutput,
    commands: usize,
    decide: std::time::Duration,
    commit: std::time::Duration,
) {
    let p = partition_label(partition);
    metrics::histogram!("sequencer_batch_decide_seconds", "partition" => p.clone())
        .record(decide.as_secs_f64());
    metrics::histogram!("sequencer_batch_commit_seconds", "partition" => p.clone())
        .record(commit.as_secs_f64());
    metrics::histogram!("sequencer_batch_size", "partition" => p.clone()).record(commands as f64);
    metrics::counter!("sequencer_batches_total", "partition" => p.clone()).increment(1);
    metrics::counter!("sequencer_commands_total", "partition" => p.clone())
        .increment(commands as u64);
    // Decisions of the batch's commands and of the queued requests it decided at their start.
    let mut by_outcome = [0u64; Reject::ALL.len() + 1];
    let slot = |result: Result<(), Reject>| result.map_or_else(|r| 1 + r as usize, |()| 0);
    let commands = out.outcomes.iter().filter_map(|o| match o {
        Outcome::Held { .. } => Some(slot(Ok(()))),
        Outcome::Rejected(r) => Some(slot(Err(*r))),
        _ => None,
    });
    let released = out.released.iter().map(|r| slot(r.result.map(|_| ())));
    for i in commands.chain(released) {
        by_outcome[i] += 1;
    }
    if !out.queued.is_empty() {
        metrics::counter!("sequencer_decisions_total", "partition" => p.clone(), "outcome" => "queued")
            .increment(out.queued.len() as u64);
    }
    for (i, &n) in by_outcome.iter().enumerate().filter(|(_, &n)| n > 0) {
        let outcome = if i == 0 {
            "held"
        } else {
            Reject::ALL[i - 1].code()
        };
        metrics::counter!("sequencer_decisions_total", "partition" => p.clone(), "outcome" => outcome)
            .increment(n);
    }
    for sku in &out.skus {
        for (state, units) in [
            ("available", sku.available),
            ("held", sku.held),
            ("sold", sku.sold),
        ] {
            metrics::gauge!("sequencer_sku_units", "sku" => sku.sku.clone(), "state" => state)
                .set(units as f64);
        }
    }
}

/// Every `every`, counts the SKUs whose stored counters break the invariant (the CHECK
/// constraints make this impossible; the gauge is the alarm that would prove otherwise).
pub async fn watch_oversell(partition: i32, pool: sqlx::PgPool, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let broken = persistence::audit::count_stock_broken(&pool).await;
        match broken {
            Ok(n) => metrics::gauge!("sequencer_oversell_skus", "partition" => partition_label(partition))
                .set(n as f64),
            Err(e) => tracing::warn!(error = %e, "oversell check could not run"),
        }
    }
}

fn partition_doc(s: &Status, now: i64) -> PartitionDoc {
    let committed = s.committed_offset.load(Ordering::Relaxed);
    let log_end = s.log_end.load(Ordering::Relaxed);
    let last = s.last_batch_ms.load(Ordering::Relaxed);
    PartitionDoc {
        partition: s.partition,
        role: s.role_name(),
        epoch: s.epoch.load(Ordering::Relaxed),
        committed_offset: committed,
        log_end_offset: log_end,
        lag: (log_end - committed).max(0),
        batch_seq: s.applied_batch_seq.load(Ordering::Relaxed),
        last_batch_age_ms: (last > 0).then(|| now - last),
        batches_committed: s.batches_committed.load(Ordering::Relaxed),
    }
}

/// The status document of a process serving `statuses` (at least one; the first is described
/// at the top level, every one in `partitions`). Ready when every served partition is.
pub fn doc(node_id: &str, statuses: &[Arc<Status>]) -> StatusDoc {
    let s = &statuses[0];
    let now = now_ms();
    let partitions: Vec<PartitionEntry> = statuses
        .iter()
        .map(|s| PartitionEntry {
            doc: partition_doc(s, now),
            ready: readiness(s, now).0,
        })
        .collect();
    let (mut ready, mut why) = readiness(s, now);
    if let Some(p) = statuses.iter().skip(1).find(|p| !readiness(p, now).0) {
        ready = false;
        why = format!("partition {}: {}", p.partition, readiness(p, now).1);
    }
    let alive = crate::log::reader_alive_ms(s.partition);
    StatusDoc {
        node_id: node_id.to_owned(),
        first: partition_doc(s, now),
        last_batch_at_ms: s.last_batch_ms.load(Ordering::Relaxed),
        last_batch_size: s.last_batch_size.load(Ordering::Relaxed),
        last_commit_us: s.last_commit_us.load(Ordering::Relaxed),
        commands_decided: s.commands.load(Ordering::Relaxed),
        decisions_written: s.decisions.load(Ordering::Relaxed),
        loaded_from: s.loaded_from_name(),
        load_ms: s.load_ms.load(Ordering::Relaxed),
        checkpoint_batch_seq: s.checkpoint_batch_seq.load(Ordering::Relaxed),
        log_generation: s.log_generation.load(Ordering::Relaxed),
        log_lost: s.log_lost.lock().expect("status lock").clone(),
        reader_poll_age_ms: (alive > 0).then(|| now - alive),
        ready,
        not_ready: (!ready).then_some(why),
        partitions,
    }
}

pub async fn serve(
    addr: SocketAddr,
    node_id: String,
    statuses: Vec<Arc<Status>>,
    metrics: PrometheusHandle,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !statuses.is_empty(),
        "a status endpoint serves at least one partition"
    );
    let ctx = Ctx {
        node_id: node_id.into(),
        statuses: statuses.into(),
        metrics,
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_doc))
        .route("/metrics", get(metrics_text))
        .with_state(ctx);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// Figures that live in the runtime's atomics are copied into gauges at scrape time: free per batch.
/// Every series carries the `partition` label.
async fn metrics_text(State(ctx): State<Ctx>) -> String {
    let now = now_ms();
    for s in ctx.statuses.iter() {
        let d = partition_doc(s, now);
        let p = partition_label(s.partition);
        let role = s.role.load(Ordering::Relaxed);
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        metrics::gauge!("sequencer_role", "partition" => p.clone()).set(f64::from(role));
        metrics::gauge!("sequencer_is_active", "partition" => p.clone())
            .set(flag(role == ROLE_ACTIVE));
        metrics::gauge!("sequencer_epoch", "partition" => p.clone()).set(d.epoch as f64);
        metrics::gauge!("sequencer_committed_offset", "partition" => p.clone())
            .set(d.committed_offset as f64);
        metrics::gauge!("sequencer_log_end_offset", "partition" => p.clone())
            .set(d.log_end_offset as f64);
        metrics::gauge!("sequencer_lag", "partition" => p.clone()).set(d.lag as f64);
        metrics::gauge!("sequencer_batch_seq", "partition" => p.clone()).set(d.batch_seq as f64);
        metrics::gauge!("sequencer_log_generation", "partition" => p.clone())
            .set(s.log_generation.load(Ordering::Relaxed) as f64);
        metrics::gauge!("sequencer_log_lost", "partition" => p.clone())
            .set(flag(role == ROLE_LOG_LOST));
        metrics::gauge!("sequencer_last_batch_age_seconds", "partition" => p)
            .set(d.last_batch_age_ms.map_or(-1.0, |ms| ms as f64 / 1000.0));
    }
    ctx.metrics.render()
}

/// The value of the `partition` label on every per-partition series.
pub fn partition_label(partition: i32) -> String {
    partition.to_string()
}

async fn status_doc(State(ctx): State<Ctx>) -> Json<StatusDoc> {
    Json(doc(&ctx.node_id, &ctx.statuses))
}

/// Ready when deciding and committing (active), or following the leader's batches (standby):
/// an active stuck retrying a commit, or a standby that has not followed for 5 s, is not; nor is
/// one whose log reader has stalled (no poll for READER_STALL_MAX_MS: it would never see a new
/// request), nor one whose requests log is lost (the answer says why and what to do).
async fn readyz(State(ctx): State<Ctx>) -> (StatusCode, String) {
    let d = doc(&ctx.node_id, &ctx.statuses);
    let (ready, text) = (
        d.ready,
        d.not_ready.unwrap_or_else(|| d.first.role.to_owned()),
    );
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("{text}\n"))
}

/// `(ready, what /readyz says)`.
fn readiness(s: &Status, now: i64) -> (bool, String) {
    let role = s.role.load(Ordering::Relaxed);
    if role == ROLE_LOG_LOST {
        let why = s.log_lost.lock().expect("status lock").clone();
        return (
            false,
            format!("requests log lost: {}", why.unwrap_or_default()),
        );
    }
    let reader = crate::log::reader_stalled_for(now, crate::log::reader_alive_ms(s.partition));
    let (ready, text) = match role {
        ROLE_ACTIVE if !s.commit_failing.load(Ordering::Relaxed) => (true, "active"),
        ROLE_ACTIVE => (false, "active, but commits are failing"),
        ROLE_STANDBY if now - s.last_follow_ms.load(Ordering::Relaxed) < 5_000 => (true, "standby"),
        ROLE_STANDBY => (false, "standby, but not following"),
        _ => return (false, "not ready".into()),
    };
    match reader {
        Some(ms) if ready => (
            false,
            format!(
                "{text}, but the log reader has made no progress for {ms} ms (stalled: \
                 restart this sequencer)"
            ),
        ),
        _ => (ready, text.into()),
    }
}

/// Every `every`, one log line with the same figures as `/status`, so the logs alone tell an
/// operator who was active, at which epoch, how far behind, and when the last batch committed.
pub async fn log_periodically(status: Arc<Status>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let d = partition_doc(&status, now_ms());
        tracing::info!(
            partition = d.partition,
            role = d.role,
            epoch = d.epoch,
            committed_offset = d.committed_offset,
            lag = d.lag,
            batch_seq = d.batch_seq,
            last_batch_age_ms = d.last_batch_age_ms,
            batches_committed = d.batches_committed,
            "status"
        );
    }
}
