//! Writing one decided batch: ONE transaction, bulk statements, fenced.
//!
//! The first statement moves the fence (`sequencer_state.next_offset`) forward, and only if the
//! row still holds this writer's epoch and the offset it expects. That statement takes the row
//! lock, so a second writer blocks behind it and then fails its own fence; a deposed writer fails
//! at once. Then decisions are inserted with `UNNEST` (one statement for the whole batch, not one
//! per row), transitions applied, counters upserted and the batch row with its outbox written.
//! Any CHECK violation (an oversell) aborts the whole batch. The last statement extends the
//! writer's lease from the database's clock just before COMMIT, so a batch held up inside its
//! transaction never lets the lease lapse while it holds the state row's lock. (Extending it in
//! the fence statement too would be undone by a rollback and overwritten by a commit.)

use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;
use wire::{Reject, RequestId, ReservationStatus, SkuView};

use crate::ts;

/// A new decision row, borrowing the strings from the decoded requests.
#[derive(Debug, Clone)]
pub struct DecisionRow<'a> {
    pub reservation_id: RequestId,
    pub user_id: &'a str,
    pub idempotency_key: &'a str,
    pub sku: &'a str,
    pub quantity: u32,
    /// `Ok(expires_at_ms)` for a hold, `Err(reason)` for a refusal.
    pub result: Result<i64, Reject>,
    pub request_offset: i64,
}

#[derive(Debug, Clone)]
pub struct TransitionRow {
    pub reservation_id: RequestId,
    pub status: ReservationStatus,
    pub at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct BatchRecord<'a> {
    pub epoch: u64,
    pub batch_seq: u64,
    /// First log offset decided by this batch; `next_offset` is one past the last.
    pub first_offset: i64,
    pub next_offset: i64,
    pub batch_time_ms: i64,
    /// The writer's lease length: committing a batch extends the lease to at least this long
    /// after the commit, so a commit slowed by a lock cannot let the lease lapse behind it
    /// (renewals queue behind the batch's lock on the state row).
    pub lease: std::time::Duration,
    pub decisions: Vec<DecisionRow<'a>>,
    pub transitions: Vec<TransitionRow>,
    pub skus: Vec<SkuView>,
    /// Keyed admin commands this batch applied (usually none).
    pub admin_keys: Vec<AdminKeyRow<'a>>,
    /// Encoded outcomes to publish after commit (re-published after a takeover).
    pub outbox: Vec<u8>,
}

/// An admin command applied under its idempotency key (table `admin_commands`).
#[derive(Debug, Clone)]
pub struct AdminKeyRow<'a> {
    pub idempotency_key: &'a str,
    /// The inner command, wire-encoded.
    pub command: Vec<u8>,
    /// Its outcome, wire-encoded.
    pub outcome: Vec<u8>,
}

/// The fence refused the commit: another writer holds a newer epoch or has moved the offset.
/// The only safe reaction is to stop writing.
#[derive(Debug, thiserror::Error)]
#[error("fenced: sequencer_state no longer holds epoch {epoch} at offset {expected_offset} (another sequencer has taken over); this writer must stop")]
pub struct Fenced {
    pub epoch: u64,
    pub expected_offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// The database refused or failed. If it failed during COMMIT the outcome is unknown and
    /// must be resolved by reading `sequencer_state` back.
    #[error("database error while committing batch: {0}")]
    Database(#[from] sqlx::Error),
    #[error("batch {batch_seq}: {what}")]
    Inconsistent { batch_seq: u64, what: String },
}

/// Commits `batch` in one transaction on `conn`.
pub async fn commit_batch(
    conn: &mut PgConnection,
    batch: &BatchRecord<'_>,
) -> Result<(), CommitError> {
    let mut tx: Transaction<'_, Postgres> = sqlx::Connection::begin(conn).await?;
    let moved = sqlx::query(
        "UPDATE sequencer_state
            SET next_offset = $1, batch_seq = $2, clock_ms = $3
          WHERE id = 1 AND epoch = $4 AND next_offset = $5 AND batch_seq = $2 - 1",
    )
    .bind(batch.next_offset)
    .bind(batch.batch_seq as i64)
    .bind(batch.batch_time_ms)
    .bind(batch.epoch as i64)
    .bind(batch.first_offset)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved != 1 {
        tx.rollback().await?;
        return Err(Fenced {
            epoch: batch.epoch,
            expected_offset: batch.first_offset,
        }
        .into());
    }
    insert_decisions(&mut tx, batch).await?;
    apply_transitions(&mut tx, batch).await?;
    upsert_skus(&mut tx, batch).await?;
    insert_admin_keys(&mut tx, batch).await?;
    // The last statement extends the lease again, in the same round trip: whatever waited in
    // between (a lock on a table, a slow disk), the lease runs from just before the commit.
    // The state row is already locked by this transaction, so this never waits.
    sqlx::query(
        "WITH lease AS (
           UPDATE sequencer_state
              SET lease_expires_at = GREATEST(lease_expires_at,
                                              clock_timestamp() + make_interval(secs => $10))
            WHERE id = 1 AND epoch = $2)
         INSERT INTO batches (batch_seq, epoch, first_offset, next_offset, decided_at, commands,
                              decisions, transitions, outbox)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(batch.batch_seq as i64)
    .bind(batch.epoch as i64)
    .bind(batch.first_offset)
    .bind(batch.next_offset)
    .bind(ts(batch.batch_time_ms))
    .bind((batch.next_offset - batch.first_offset) as i32)
    .bind(batch.decisions.len() as i32)
    .bind(batch.transitions.len() as i32)
    .bind(&batch.outbox)
    .bind(batch.lease.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn insert_admin_keys(
    tx: &mut Transaction<'_, Postgres>,
    batch: &BatchRecord<'_>,
) -> Result<(), CommitError> {
    if batch.admin_keys.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = batch.admin_keys.iter().map(|a| a.idempotency_key).collect();
    let commands: Vec<&[u8]> = batch.admin_keys.iter().map(|a| &a.command[..]).collect();
    let outcomes: Vec<&[u8]> = batch.admin_keys.iter().map(|a| &a.outcome[..]).collect();
    let inserted = sqlx::query(
        "INSERT INTO admin_commands (idempotency_key, command, outcome, batch_seq, decided_at)
         SELECT k, c, o, $4, $5 FROM UNNEST($1::text[], $2::bytea[], $3::bytea[]) AS t(k, c, o)",
    )
    .bind(&keys)
    .bind(&commands)
    .bind(&outcomes)
    .bind(batch.batch_seq as i64)
    .bind(ts(batch.batch_time_ms))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    expect_rows(batch, "admin keys inserted", inserted, keys.len())
}

/// The admin keys applied by batches up to `batch_seq`: what an engine loaded at that batch
/// must know (later ones come back as their batches are replayed from the log).
pub async fn admin_keys_up_to(
    pool: &sqlx::PgPool,
    batch_seq: u64,
) -> Result<Vec<(String, Vec<u8>, Vec<u8>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT idempotency_key, command, outcome FROM admin_commands WHERE batch_seq <= $1",
    )
    .bind(batch_seq as i64)
    .fetch_all(pool)
    .await
}

async fn insert_decisions(
    tx: &mut Transaction<'_, Postgres>,
    batch: &BatchRecord<'_>,
) -> Result<(), CommitError> {
    if batch.decisions.is_empty() {
        return Ok(());
    }
    let n = batch.decisions.len();
    let mut ids = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut skus = Vec::with_capacity(n);
    let mut quantities = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut reasons: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut expiries = Vec::with_capacity(n);
    let mut offsets = Vec::with_capacity(n);
    for d in &batch.decisions {
        ids.push(Uuid::from_u128(d.reservation_id));
        users.push(d.user_id);
        keys.push(d.idempotency_key);
        skus.push(d.sku);
        quantities.push(d.quantity as i32);
        match d.result {
            Ok(expires_at_ms) => {
                statuses.push("held");
                reasons.push(None);
                expiries.push(Some(ts(expires_at_ms)));
            }
            Err(reason) => {
                statuses.push("rejected");
                reasons.push(Some(reason.code()));
                expiries.push(None);
            }
        }
        offsets.push(d.request_offset);
    }
    let inserted = sqlx::query(
        "INSERT INTO reservations (reservation_id, user_id, idempotency_key, sku, quantity, status,
                                   reject_reason, decided_at, expires_at, updated_at,
                                   request_offset, batch_seq)
         SELECT id, u, k, s, q, st, r, $10, e, $10, o, $11
           FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[],
                       $7::text[], $8::timestamptz[], $9::int8[])
                AS t(id, u, k, s, q, st, r, e, o)",
    )
    .bind(&ids)
    .bind(&users)
    .bind(&keys)
    .bind(&skus)
    .bind(&quantities)
    .bind(&statuses)
    .bind(&reasons)
    .bind(&expiries)
    .bind(&offsets)
    .bind(ts(batch.batch_time_ms))
    .bind(batch.batch_seq as i64)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    expect_rows(batch, "decision rows inserted", inserted, n)
}

async fn apply_transitions(
    tx: &mut Transaction<'_, Postgres>,
    batch: &BatchRecord<'_>,
) -> Result<(), CommitError> {
    if batch.transitions.is_empty() {
        return Ok(());
    }
    let n = batch.transitions.len();
    let ids: Vec<Uuid> = batch
        .transitions
        .iter()
        .map(|t| Uuid::from_u128(t.reservation_id))
        .collect();
    let statuses: Vec<&str> = batch
        .transitions
        .iter()
        .map(|t| t.status.as_str())
        .collect();
    let ats: Vec<_> = batch.transitions.iter().map(|t| ts(t.at_ms)).collect();
    // Every transition leaves `held`; a row not in `held` means Postgres and the engine disagree.
    let updated = sqlx::query(
        "UPDATE reservations r SET status = t.st, updated_at = t.at
           FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) AS t(id, st, at)
          WHERE r.reservation_id = t.id AND r.status = 'held'",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&ats)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    expect_rows(batch, "held reservations moved", updated, n)?;
    sqlx::query(
        "INSERT INTO reservation_events (reservation_id, status, at, batch_seq)
         SELECT id, st, at, $4 FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) AS t(id, st, at)",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&ats)
    .bind(batch.batch_seq as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn upsert_skus(
    tx: &mut Transaction<'_, Postgres>,
    batch: &BatchRecord<'_>,
) -> Result<(), CommitError> {
    if batch.skus.is_empty() {
        return Ok(());
    }
    let s = &batch.skus;
    let names: Vec<&str> = s.iter().map(|v| v.sku.as_str()).collect();
    let int8 = |f: fn(&SkuView) -> u64| s.iter().map(|v| f(v) as i64).collect::<Vec<i64>>();
    let limits: Vec<i32> = s.iter().map(|v| v.config.per_user_limit as i32).collect();
    let starts: Vec<_> = s.iter().map(|v| v.config.starts_at_ms.map(ts)).collect();
    let ends: Vec<_> = s.iter().map(|v| v.config.ends_at_ms.map(ts)).collect();
    let paused: Vec<bool> = s.iter().map(|v| v.paused).collect();
    sqlx::query(
        "INSERT INTO skus (sku, total, available, held, sold, per_user_limit, hold_ttl_ms,
                           starts_at, ends_at, paused, updated_batch)
         SELECT *, $11 FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[],
                                   $6::int4[], $7::int8[], $8::timestamptz[], $9::timestamptz[],
                                   $10::bool[])
         ON CONFLICT (sku) DO UPDATE SET
             total = EXCLUDED.total, available = EXCLUDED.available, held = EXCLUDED.held,
             sold = EXCLUDED.sold, per_user_limit = EXCLUDED.per_user_limit,
             hold_ttl_ms = EXCLUDED.hold_ttl_ms, starts_at = EXCLUDED.starts_at,
             ends_at = EXCLUDED.ends_at, paused = EXCLUDED.paused,
             updated_batch = EXCLUDED.updated_batch",
    )
    .bind(&names)
    .bind(int8(|v| v.total))
    .bind(int8(|v| v.available))
    .bind(int8(|v| v.held))
    .bind(int8(|v| v.sold))
    .bind(&limits)
    .bind(int8(|v| v.config.hold_ttl_ms))
    .bind(&starts)
    .bind(&ends)
    .bind(&paused)
    .bind(batch.batch_seq as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn expect_rows(
    batch: &BatchRecord<'_>,
    what: &str,
    got: u64,
    want: usize,
) -> Result<(), CommitError> {
    if got as usize == want {
        return Ok(());
    }
    Err(CommitError::Inconsistent {
        batch_seq: batch.batch_seq,
        what: format!("{what}: expected {want}, Postgres reports {got}"),
    })
}
