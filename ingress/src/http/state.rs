//! What every handler shares: the process's clients, its configuration and the id of the
//! request being handled.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::admission::Admission;
use crate::auth::JwtVerifier;
use crate::bus::Bus;
use crate::console::Console;
use crate::metrics::Metrics;

pub struct AppConfig {
    pub admin_token: String,
    pub body_bytes_max: usize,
    /// `/readyz` fails when the producer has not reached the broker for this long.
    pub ready_broker_max_age_ms: i64,
    /// Longest a request body may take to arrive, in total (408 and the connection closed).
    pub body_read_timeout: Duration,
    /// Most live stock streams open at once on this ingress (503 above).
    pub stream_subscribers_max: usize,
    /// Most open HTTP connections (the ops console shows how near it is).
    pub connections_max: usize,
}

pub struct App {
    pub bus: Bus,
    pub pool: PgPool,
    pub config: AppConfig,
    pub metrics: Arc<Metrics>,
    /// In-flight and lag bounds, the stall check and the per-user token buckets.
    pub admission: Admission,
    /// Buyer identity from a JWT; `None` when JWT verification is off.
    pub jwt: Option<JwtVerifier>,
    /// What the ops console shows, sampled once a second.
    pub console: Console,
}

tokio::task_local! {
    /// The id of the HTTP request being handled (set by the router's tracking layer).
    pub(super) static REQUEST_ID: u128;
}

/// The current HTTP request's id; a fresh one outside a request (never the case for routes).
pub(super) fn current_request_id() -> u128 {
    REQUEST_ID
        .try_with(|id| *id)
        .unwrap_or_else(|_| Uuid::now_v7().as_u128())
}
