//! Postgres, the system of record.
//!
//! [`batch`] writes one decided batch in one fenced transaction; [`lease`] holds the writer's
//! epoch and lease; [`checkpoint`] stores compact checkpoints of the engine state that a start-up
//! loads; [`snapshot`] streams the state from the rows when there is none; [`reads`] serves the
//! ingress's GET routes; [`audit`] re-checks every invariant from the rows alone; [`loggen`] keeps
//! the generations of the requests log (which topic the committed offsets refer to).

pub mod audit;
pub mod batch;
pub mod checkpoint;
pub mod layout;
pub mod lease;
pub mod loggen;
pub mod reads;
pub mod snapshot;

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use batch::{AdminKeyRow, BatchRecord, DecisionRow, Fenced, TransitionRow};

/// Opens a pool. `max_connections` is small on purpose: the sequencer writes through one
/// connection at a time, and the ingress only reads single rows.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    pool(url.parse()?, max_connections).await
}

/// Opens the pool a sequencer writes through. Two session settings bound how long a writer that
/// stops mid-transaction (SIGSTOP, a VM pause) can hold the fence row's lock:
/// `idle_in_transaction_session_timeout` makes Postgres abort a transaction whose client has been
/// silent for `lock_hold_max`, and `lock_timeout` makes a lease attempt that waits that long fail
/// and retry instead of queueing behind a paused writer forever. Without them a leader paused
/// between its fence update and COMMIT would block every takeover for as long as it stays paused.
pub async fn connect_writer(
    url: &str,
    max_connections: u32,
    lock_hold_max: Duration,
) -> anyhow::Result<PgPool> {
    let ms = lock_hold_max.as_millis().max(1).to_string();
    let options = url.parse::<PgConnectOptions>()?.options([
        ("idle_in_transaction_session_timeout", ms.as_str()),
        ("lock_timeout", ms.as_str()),
    ]);
    pool(options, max_connections).await
}

async fn pool(options: PgConnectOptions, max_connections: u32) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.application_name("flash-sequencer"))
        .await?)
}

/// Applies the embedded migrations (idempotent; takes an advisory lock so that two processes
/// starting at once do not race).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("./migrations").run(pool).await?;
    Ok(())
}

pub(crate) fn ts(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .expect("milliseconds within chrono's range")
}

pub(crate) fn ms(ts: DateTime<Utc>) -> i64 {
    ts.timestamp_millis()
}
