//! One clock for every sequencer: the batch time is the database's clock, not the host's.
//!
//! Batch time decides when holds expire and when sale windows open and close. If each leader
//! used its own clock, a standby whose clock is ahead would expire holds early after a takeover
//! (and one behind would open a sale late). So the leader measures the offset between its clock
//! and Postgres's (a query timed on both sides: the database's reading is taken to be at the
//! midpoint of the round trip) when it takes the lease and again with every lease renewal, and
//! cuts batches at `own clock + offset`. The offset is exact to within half a round trip on
//! loopback, a millisecond or two; the engine keeps batch time monotonic whatever happens.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::PgPool;

/// The host's wall clock, in Unix milliseconds (the batch clock is [`DatabaseClock`]).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Beyond this offset a warning is logged: decisions stay correct (they use the database's
/// time), but a host clock this far off is worth fixing.
pub const SKEW_WARN_MS: i64 = 1_000;

/// The leader's view of the database clock.
#[derive(Debug, Default, Clone)]
pub struct DatabaseClock {
    offset_ms: Arc<AtomicI64>,
}

impl DatabaseClock {
    /// The database's time now, as far as this process can tell.
    pub fn now_ms(&self) -> i64 {
        now_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Measures the offset once.
    pub async fn measure(&self, pool: &PgPool) -> Result<i64, sqlx::Error> {
        let before = now_ms();
        let database = persistence::lease::database_clock_ms(pool).await?;
        let after = now_ms();
        let offset = database - (before + after) / 2;
        let previous = self.offset_ms.swap(offset, Ordering::Relaxed);
        metrics::gauge!("sequencer_clock_offset_ms").set(offset as f64);
        if offset.abs() > SKEW_WARN_MS && (previous - offset).abs() > SKEW_WARN_MS / 10 {
            tracing::warn!(
                offset_ms = offset,
                "this host's clock is more than {SKEW_WARN_MS} ms away from the database's; \
                 decisions use the database's time, but fix the host's clock (NTP)"
            );
        }
        Ok(offset)
    }
}
