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
    /// One pool per partition of the requests log (its database), in partition order.
    pub pools: Vec<PgPool>,
    pub config: AppConfig,
    pub metrics: Arc<Metrics>,
    /// In-flight and lag bounds, the stall check and the per-user token buckets.
    pub admission: Admission,
    /// Buyer identity from a JWT; `None` when JWT verification is off.
    pub jwt: Option<JwtVerifier>,
    /// What the ops console shows, sampled once a second.
    pub console: Console,
}

impl App {
    /// The database of the partition `sku` lives in.
    pub fn pool_of_sku(&self, sku: &str) -> &PgPool {
        &self.pools[wire::partition::partition_of(sku, self.bus.partitions) as usize]
    }

    /// The database of the partition a reservation or request id was tagged with; `None` when
    /// the id names no partition (then it names nothing stored either).
    pub fn pool_of_id(&self, id: u128) -> Option<&PgPool> {
        wire::partition::of_id(id, self.bus.partitions).map(|p| &self.pools[p as usize])
    }

    /// The partition `sku` lives in.
    pub fn partition_of_sku(&self, sku: &str) -> u32 {
        wire::partition::partition_of(sku, self.bus.partitions)
    }
}

tokio::task_local! {
    /// The id of the HTTP request being handled (set by the router's tracking layer).
    pub(super) static REQUEST_ID: std::cell::Cell<u128>;
}

/// The current HTTP request's id; a fresh one outside a request (never the case for routes).
pub(super) fn current_request_id() -> u128 {
    REQUEST_ID
        .try_with(|id| id.get())
        .unwrap_or_else(|_| Uuid::now_v7().as_u128())
}

/// Makes `id` the current request's id: the one `X-Request-Id` returns (a write's id tagged with
/// its partition, see `wire::partition::tag`, so that the header still names the command in
/// the log).
pub(super) fn set_current_request_id(id: u128) {
    let _ = REQUEST_ID.try_with(|current| current.set(id));
}
