//! Postgres, the system of record.
//!
//! [`batch`] writes one decided batch in one fenced transaction; [`lease`] holds the writer's
//! epoch and lease; [`snapshot`] reads the whole state back at start-up; [`reads`] serves the
//! ingress's GET routes; [`audit`] re-checks every invariant from the rows alone.

pub mod audit;
pub mod batch;
pub mod lease;
pub mod reads;
pub mod snapshot;

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use batch::{BatchRecord, DecisionRow, Fenced, TransitionRow};

/// Opens a pool. `max_connections` is small on purpose: the sequencer writes through one
/// connection at a time, and the ingress only reads single rows.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.application_name("flash-sequencer"))
        .await?;
    Ok(pool)
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
