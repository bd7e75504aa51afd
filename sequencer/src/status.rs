//! The sequencer's own small HTTP surface: liveness, readiness and a status document an operator
//! (or `sequencer status`) reads to see the role, epoch, committed offset and lag.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::runtime::{now_ms, Status, ROLE_ACTIVE, ROLE_STANDBY};

#[derive(Serialize)]
pub struct StatusDoc {
    pub node_id: String,
    pub role: &'static str,
    pub epoch: u64,
    pub committed_offset: i64,
    pub log_end_offset: i64,
    pub lag: i64,
    pub batch_seq: u64,
    pub last_batch_at_ms: i64,
    pub last_batch_age_ms: Option<i64>,
    pub last_batch_size: u64,
    pub last_commit_us: u64,
    pub batches_committed: u64,
    pub commands_decided: u64,
    pub decisions_written: u64,
}

#[derive(Clone)]
struct Ctx {
    node_id: Arc<str>,
    status: Arc<Status>,
}

pub fn doc(node_id: &str, s: &Status) -> StatusDoc {
    let committed = s.committed_offset.load(Ordering::Relaxed);
    let log_end = s.log_end.load(Ordering::Relaxed);
    let last = s.last_batch_ms.load(Ordering::Relaxed);
    StatusDoc {
        node_id: node_id.to_owned(),
        role: s.role_name(),
        epoch: s.epoch.load(Ordering::Relaxed),
        committed_offset: committed,
        log_end_offset: log_end,
        lag: (log_end - committed).max(0),
        batch_seq: s.applied_batch_seq.load(Ordering::Relaxed),
        last_batch_at_ms: last,
        last_batch_age_ms: (last > 0).then(|| now_ms() - last),
        last_batch_size: s.last_batch_size.load(Ordering::Relaxed),
        last_commit_us: s.last_commit_us.load(Ordering::Relaxed),
        batches_committed: s.batches_committed.load(Ordering::Relaxed),
        commands_decided: s.commands.load(Ordering::Relaxed),
        decisions_written: s.decisions.load(Ordering::Relaxed),
    }
}

pub async fn serve(addr: SocketAddr, node_id: String, status: Arc<Status>) -> anyhow::Result<()> {
    let ctx = Ctx {
        node_id: node_id.into(),
        status,
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_doc))
        .with_state(ctx);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn status_doc(State(ctx): State<Ctx>) -> Json<StatusDoc> {
    Json(doc(&ctx.node_id, &ctx.status))
}

/// Ready when deciding (active) or following (standby): either way the process is doing its job.
async fn readyz(State(ctx): State<Ctx>) -> (StatusCode, &'static str) {
    match ctx.status.role.load(Ordering::Relaxed) {
        ROLE_ACTIVE => (StatusCode::OK, "active\n"),
        ROLE_STANDBY => (StatusCode::OK, "standby\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
    }
}

/// Every `every`, one log line with the same figures as `/status`, so the logs alone tell an
/// operator who was active, at which epoch, how far behind, and when the last batch committed.
pub async fn log_periodically(node_id: String, status: Arc<Status>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let d = doc(&node_id, &status);
        tracing::info!(
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
