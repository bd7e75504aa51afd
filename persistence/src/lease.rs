//! Who may write: a lease with a monotonically increasing epoch, kept in `sequencer_state`.
//!
//! Time is Postgres's `now()` only, so sequencers on different hosts never compare their own
//! clocks. The lease is about liveness (when may a standby take over); safety comes from the
//! fence in every batch commit, which checks the epoch in the same transaction.

use std::time::Duration;

use sqlx::{PgPool, Row};

/// The fenced row as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequencerState {
    pub epoch: u64,
    pub next_offset: i64,
    pub batch_seq: u64,
    pub clock_ms: i64,
    /// The seed of the engine's keyed hash (set once, at migration).
    pub hash_seed: u64,
    pub leader: Option<String>,
    /// Milliseconds until the current lease lapses (negative when it has lapsed).
    pub lease_remaining_ms: i64,
}

const SELECT_STATE: &str = "SELECT epoch, next_offset, batch_seq, clock_ms, hash_seed, leader,
        (EXTRACT(EPOCH FROM (lease_expires_at - now())) * 1000)::float8 AS remaining_ms
   FROM sequencer_state WHERE id = 1";

fn state_from_row(row: &sqlx::postgres::PgRow) -> Result<SequencerState, sqlx::Error> {
    let remaining: Option<f64> = row.try_get("remaining_ms")?;
    Ok(SequencerState {
        epoch: row.try_get::<i64, _>("epoch")? as u64,
        next_offset: row.try_get("next_offset")?,
        batch_seq: row.try_get::<i64, _>("batch_seq")? as u64,
        clock_ms: row.try_get("clock_ms")?,
        hash_seed: row.try_get::<i64, _>("hash_seed")? as u64,
        leader: row.try_get("leader")?,
        // '-infinity' lease: lapsed long ago.
        lease_remaining_ms: remaining
            .filter(|r| r.is_finite())
            .map(|r| r as i64)
            .unwrap_or(i64::MIN),
    })
}

pub async fn read_state<'e, E: sqlx::PgExecutor<'e>>(db: E) -> Result<SequencerState, sqlx::Error> {
    let row = sqlx::query(SELECT_STATE).fetch_one(db).await?;
    state_from_row(&row)
}

/// Takes the lease if it has lapsed (or was released), bumping the epoch. Returns the new state
/// when this caller is now the leader, `None` when someone else holds a live lease.
pub async fn try_acquire(
    pool: &PgPool,
    holder: &str,
    lease: Duration,
) -> Result<Option<SequencerState>, sqlx::Error> {
    let row = sqlx::query(
        "UPDATE sequencer_state
            SET epoch = epoch + 1, leader = $1,
                lease_expires_at = now() + make_interval(secs => $2),
                handback_to = NULL, handback_at = NULL
          WHERE id = 1 AND lease_expires_at < now()
            AND (handback_to IS NULL OR handback_to = $1
                 OR handback_at < clock_timestamp() - make_interval(secs => $3))
      RETURNING epoch, next_offset, batch_seq, clock_ms, hash_seed, leader,
                (EXTRACT(EPOCH FROM (lease_expires_at - now())) * 1000)::float8 AS remaining_ms",
    )
    .bind(holder)
    .bind(lease.as_secs_f64())
    .bind(HANDBACK_VALID.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(state_from_row).transpose()
}

/// Extends the lease of `epoch`. `Ok(false)` means the lease was lost: stop writing. Never
/// shortens it: a renewal that queued behind a batch's commit (which extended the lease from
/// its own, later time) leaves the later expiry in place.
pub async fn renew(pool: &PgPool, epoch: u64, lease: Duration) -> Result<bool, sqlx::Error> {
    let renewed = sqlx::query(
        "UPDATE sequencer_state
            SET lease_expires_at = GREATEST(lease_expires_at,
                                            clock_timestamp() + make_interval(secs => $2))
          WHERE id = 1 AND epoch = $1",
    )
    .bind(epoch as i64)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    Ok(renewed == 1)
}

/// How long a hand-back request holds: meanwhile a released lease is left to the process that
/// asked for it; after it, anyone takes a lapsed lease again.
pub const HANDBACK_VALID: Duration = Duration::from_secs(3);

/// Asks whoever leads this partition now (not `holder`) to hand it back to `holder`, its
/// preferred writer; renews an older request. Nothing happens while no one else leads.
pub async fn request_handback(pool: &PgPool, holder: &str) -> Result<bool, sqlx::Error> {
    let asked = sqlx::query(
        "UPDATE sequencer_state SET handback_to = $1, handback_at = clock_timestamp()
          WHERE id = 1 AND leader IS DISTINCT FROM $1 AND lease_expires_at > clock_timestamp()",
    )
    .bind(holder)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(asked == 1)
}

/// Who asked the leader to hand this partition back, if a request is still valid.
pub async fn handback_asked(pool: &PgPool) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT handback_to FROM sequencer_state
          WHERE id = 1 AND handback_at > clock_timestamp() - make_interval(secs => $1)",
    )
    .bind(HANDBACK_VALID.as_secs_f64())
    .fetch_optional(pool)
    .await
    .map(Option::flatten)
}

/// Gives the lease up at once (graceful handover): a standby can take it on its next try.
pub async fn release(pool: &PgPool, epoch: u64) -> Result<bool, sqlx::Error> {
    let released = sqlx::query(
        "UPDATE sequencer_state SET lease_expires_at = 'epoch', leader = NULL
          WHERE id = 1 AND epoch = $1",
    )
    .bind(epoch as i64)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(released == 1)
}

/// Postgres's clock now, in Unix milliseconds (`clock_timestamp()`: the time of the call, not
/// of the transaction). Every sequencer decides with this clock, not its own (see
/// `sequencer::clock`).
pub async fn database_clock_ms(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8")
        .fetch_one(pool)
        .await
}
