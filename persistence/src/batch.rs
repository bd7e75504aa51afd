//! Writing one decided batch: ONE transaction, bulk statements, fenced.
//!
//! The first statement moves the fence (`sequencer_state.next_offset`) forward, and only if the
//! row still holds this writer's epoch and the offset it expects. That statement takes the row
//! lock, so a second writer blocks behind it and then fails its own fence; a deposed writer fails
//! at once. Then grants are inserted with `UNNEST` (one statement for the whole batch, not one
//! per row), refusals stored as one row of arrays, transitions applied, counters upserted and the
//! batch row with its outbox written.
//! Any CHECK violation (an oversell) aborts the whole batch. The last statement extends the
//! writer's lease from the database's clock just before COMMIT, so a batch held up inside its
//! transaction never lets the lease lapse while it holds the state row's lock. (Extending it in
//! the fence statement too would be undone by a rollback and overwritten by a commit.)

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;
use wire::{Reject, RequestId, ReservationStatus, ReserveRef, SkuView};

use crate::ts;

/// A new decision row, borrowing the strings from the decoded requests.
#[derive(Debug, Clone)]
pub struct DecisionRow<'a> {
    /// The request decided; its id is the reservation's.
    pub request: ReserveRef<'a>,
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
    /// Reservations that joined a pre-sale queue (`queued_requests`); `result` is unused.
    pub queued: Vec<(DecisionRow<'a>, u32)>,
    /// Queued reservations this batch decided: `(request id, Ok(expires_at_ms) or Err(reason))`.
    /// Each gets its decision row from its `queued_requests` row.
    pub released: Vec<(RequestId, Result<i64, Reject>)>,
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

/// `query` with `args` bound to `$1`, `$2`, … in order.
macro_rules! bind_all {
    ($query:expr, $($arg:expr),+ $(,)?) => {
        $query$(.bind($arg))+
    };
}

/// Commits `batch` in one transaction on `conn`.
pub async fn commit_batch(
    conn: &mut PgConnection,
    batch: &BatchRecord<'_>,
) -> Result<(), CommitError> {
    let mut tx: Transaction<'_, Postgres> = sqlx::Connection::begin(conn).await?;
    let moved = bind_all!(
        sqlx::query(
            "UPDATE sequencer_state
                SET next_offset = $1, batch_seq = $2, clock_ms = $3
              WHERE id = 1 AND epoch = $4 AND next_offset = $5 AND batch_seq = $2 - 1",
        ),
        batch.next_offset,
        batch.batch_seq as i64,
        batch.batch_time_ms,
        batch.epoch as i64,
        batch.first_offset,
    )
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
    // One statement a kind of row, in this order; a kind the batch has none of sends nothing.
    let statements = [
        release_queued(batch),
        insert_grants(batch),
        insert_refusals(batch),
        insert_queued(batch),
        apply_transitions(batch),
        upsert_skus(batch),
        insert_admin_keys(batch),
    ];
    for statement in statements.into_iter().flatten() {
        statement.run(&mut tx, batch.batch_seq).await?;
    }
    // The last statement extends the lease again, in the same round trip: whatever waited in
    // between (a lock on a table, a slow disk), the lease runs from just before the commit.
    // The state row is already locked by this transaction, so this never waits.
    bind_all!(
        sqlx::query(
            "WITH lease AS (
               UPDATE sequencer_state
                  SET lease_expires_at = GREATEST(lease_expires_at,
                                                  clock_timestamp() + make_interval(secs => $10))
                WHERE id = 1 AND epoch = $2)
             INSERT INTO batches (batch_seq, epoch, first_offset, next_offset, decided_at, commands,
                                  decisions, transitions, outbox)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        ),
        batch.batch_seq as i64,
        batch.epoch as i64,
        batch.first_offset,
        batch.next_offset,
        ts(batch.batch_time_ms),
        (batch.next_offset - batch.first_offset) as i32,
        batch.decisions.len() as i32,
        batch.transitions.len() as i32,
        &batch.outbox,
        batch.lease.as_secs_f64(),
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

fn insert_admin_keys<'b>(batch: &'b BatchRecord<'_>) -> Option<Statement<'b>> {
    if batch.admin_keys.is_empty() {
        return None;
    }
    let keys: Vec<&str> = batch.admin_keys.iter().map(|a| a.idempotency_key).collect();
    let commands: Vec<&[u8]> = batch.admin_keys.iter().map(|a| &a.command[..]).collect();
    let outcomes: Vec<&[u8]> = batch.admin_keys.iter().map(|a| &a.outcome[..]).collect();
    let query = bind_all!(
        sqlx::query(
            "INSERT INTO admin_commands (idempotency_key, command, outcome, batch_seq, decided_at)
             SELECT k, c, o, $4, $5 FROM UNNEST($1::text[], $2::bytea[], $3::bytea[]) AS t(k, c, o)",
        ),
        keys,
        commands,
        outcomes,
        batch.batch_seq as i64,
        ts(batch.batch_time_ms),
    );
    Some(Statement::new(
        query,
        "admin keys inserted",
        batch.admin_keys.len(),
    ))
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

/// Queued reservations decided by this batch: each `queued_requests` row is marked with the
/// batch, and its decision row is inserted from it (the strings were stored when it was queued).
fn release_queued<'b>(batch: &'b BatchRecord<'_>) -> Option<Statement<'b>> {
    if batch.released.is_empty() {
        return None;
    }
    let n = batch.released.len();
    let ids = uuids(batch.released.iter().map(|r| r.0));
    let (statuses, reasons, expiries) = result_columns(batch.released.iter().map(|r| r.1));
    let query = bind_all!(
        sqlx::query(
            "WITH released AS (
               UPDATE queued_requests q SET released_batch = $5
                 FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[]) AS t(id, st, r, e)
                WHERE q.request_id = t.id AND q.released_batch IS NULL
             RETURNING q.request_id, q.user_id, q.idempotency_key, q.sku, q.quantity,
                       q.request_offset, t.st, t.r, t.e)
             INSERT INTO reservations (reservation_id, user_id, idempotency_key, sku, quantity, status,
                                       reject_reason, decided_at, expires_at, updated_at,
                                       request_offset, batch_seq)
             SELECT request_id, user_id, idempotency_key, sku, quantity, st, r, $6, e, $6,
                    request_offset, $5
               FROM released",
        ),
        ids,
        statuses,
        reasons,
        expiries,
        batch.batch_seq as i64,
        ts(batch.batch_time_ms),
    );
    Some(Statement::new(query, "queued requests decided", n))
}

/// Reservations that joined a pre-sale queue in this batch.
fn insert_queued<'b>(batch: &'b BatchRecord<'_>) -> Option<Statement<'b>> {
    if batch.queued.is_empty() {
        return None;
    }
    let q = &batch.queued;
    let c = RequestColumns::of(q.iter().map(|(d, _)| d));
    let positions: Vec<i32> = q.iter().map(|&(_, p)| p as i32).collect();
    let query = bind_all!(
        sqlx::query(
            "INSERT INTO queued_requests (request_id, user_id, idempotency_key, sku, quantity, position,
                                          request_offset, queued_batch)
             SELECT *, $8 FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[],
                                      $6::int4[], $7::int8[])",
        ),
        c.ids,
        c.users,
        c.keys,
        c.skus,
        c.quantities,
        positions,
        c.offsets,
        batch.batch_seq as i64,
    );
    Some(Statement::new(query, "queued requests inserted", q.len()))
}

/// The requests queued by batches up to `batch_seq` and not decided by them, each SKU's in
/// queue order: `(request id, sku, user id, key, quantity)`. What an engine loaded at that
/// batch must hold in its queues (later ones come back as their batches are replayed).
pub async fn queued_as_of(
    pool: &sqlx::PgPool,
    batch_seq: u64,
) -> Result<Vec<(Uuid, String, String, String, i32)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT request_id, sku, user_id, idempotency_key, quantity FROM queued_requests
          WHERE queued_batch <= $1 AND (released_batch IS NULL OR released_batch > $1)
          ORDER BY queued_batch, position",
    )
    .bind(batch_seq as i64)
    .fetch_all(pool)
    .await
}

/// The columns a decision row and a queued request both take from the request: id, user, key,
/// SKU, quantity and log offset.
#[derive(Default)]
struct RequestColumns<'a> {
    ids: Vec<Uuid>,
    users: Vec<&'a str>,
    keys: Vec<&'a str>,
    skus: Vec<&'a str>,
    quantities: Vec<i32>,
    offsets: Vec<i64>,
}

impl<'a> RequestColumns<'a> {
    fn of<'r>(rows: impl IntoIterator<Item = &'r DecisionRow<'a>>) -> Self
    where
        'a: 'r,
    {
        let mut c = RequestColumns::default();
        for d in rows {
            let r = d.request;
            c.ids.push(Uuid::from_u128(r.request_id));
            c.users.push(r.user_id);
            c.keys.push(r.idempotency_key);
            c.skus.push(r.sku);
            c.quantities.push(r.quantity as i32);
            c.offsets.push(d.request_offset);
        }
        c
    }
}

/// The `status`, `reject_reason` and `expires_at` columns of new decision rows.
type ResultColumns = (
    Vec<&'static str>,
    Vec<Option<&'static str>>,
    Vec<Option<chrono::DateTime<chrono::Utc>>>,
);

fn result_columns(results: impl Iterator<Item = Result<i64, Reject>>) -> ResultColumns {
    let mut columns: ResultColumns = Default::default();
    for result in results {
        let (status, reason, expiry) = match result {
            Ok(expires_at_ms) => ("held", None, Some(ts(expires_at_ms))),
            Err(reason) => ("rejected", Some(reason.code()), None),
        };
        columns.0.push(status);
        columns.1.push(reason);
        columns.2.push(expiry);
    }
    columns
}

/// Granted decisions, one `reservations` row each (they are read by id and change status).
fn insert_grants<'b>(batch: &'b BatchRecord<'_>) -> Option<Statement<'b>> {
    let grants = || batch.decisions.iter().filter(|d| d.result.is_ok());
    let n = grants().count();
    if n == 0 {
        return None;
    }
    let c = RequestColumns::of(grants());
    let (statuses, reasons, expiries) = result_columns(grants().map(|d| d.result));
    let query = bind_all!(
        sqlx::query(
            "INSERT INTO reservations (reservation_id, user_id, idempotency_key, sku, quantity, status,
                                       reject_reason, decided_at, expires_at, updated_at,
                                       request_offset, batch_seq)
             SELECT id, u, k, s, q, st, r, $10, e, $10, o, $11
               FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[],
                           $7::text[], $8::timestamptz[], $9::int8[])
                    AS t(id, u, k, s, q, st, r, e, o)",
        ),
        c.ids,
        c.users,
        c.keys,
        c.skus,
        c.quantities,
        statuses,
        reasons,
        expiries,
        c.offsets,
        ts(batch.batch_time_ms),
        batch.batch_seq as i64,
    );
    Some(Statement::new(query, "decision rows inserted", n))
}

/// The batch's refusals, as ONE `refusals` row of parallel arrays in decision order: no heap
/// tuple and no index entry per refusal (migration 0009).
fn insert_refusals<'b>(batch: &'b BatchRecord<'_>) -> Option<Statement<'b>> {
    let refusals = || batch.decisions.iter().filter(|d| d.result.is_err());
    // None when the batch refused nobody.
    refusals().next()?;
    let c = RequestColumns::of(refusals());
    let reasons: Vec<&str> = refusals()
        .filter_map(|d| d.result.err().map(Reject::code))
        .collect();
    let query = bind_all!(
        sqlx::query(
            "INSERT INTO refusals (request_ids, user_ids, idempotency_keys, skus, quantities,
                                   reasons, request_offsets, batch_seq)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        ),
        c.ids,
        c.users,
        c.keys,
        c.skus,
        c.quantities,
        reasons,
        c.offsets,
        batch.batch_seq as i64,
    );
    Some(Statement::new(query, "refusal rows inserted", 1))
}

fn apply_transitions<'b>(batch: &'b BatchRecord<'_>) -> Option<Statement<'b>> {
    if batch.transitions.is_empty() {
        return None;
    }
    let n = batch.transitions.len();
    let ids = uuids(batch.transitions.iter().map(|t| t.reservation_id));
    let statuses: Vec<&str> = batch
        .transitions
        .iter()
        .map(|t| t.status.as_str())
        .collect();
    let ats: Vec<_> = batch.transitions.iter().map(|t| ts(t.at_ms)).collect();
    // Every transition leaves `held`; a row not in `held` means Postgres and the engine disagree
    // (fewer rows moved, so fewer events inserted). Each move is recorded as an event.
    let query = bind_all!(
        sqlx::query(
            "WITH moved AS (
               UPDATE reservations r SET status = t.st, updated_at = t.at
                 FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) AS t(id, st, at)
                WHERE r.reservation_id = t.id AND r.status = 'held'
             RETURNING r.reservation_id, t.st, t.at)
             INSERT INTO reservation_events (reservation_id, status, at, batch_seq)
             SELECT reservation_id, st, at, $4 FROM moved",
        ),
        ids,
        statuses,
        ats,
        batch.batch_seq as i64,
    );
    Some(Statement::new(query, "held reservations moved", n))
}

fn upsert_skus<'b>(batch: &'b BatchRecord<'_>) -> Option<Statement<'b>> {
    if batch.skus.is_empty() {
        return None;
    }
    let s = &batch.skus;
    let names: Vec<&str> = s.iter().map(|v| v.sku.as_str()).collect();
    let int8 = |f: fn(&SkuView) -> u64| s.iter().map(|v| f(v) as i64).collect::<Vec<i64>>();
    let limits: Vec<i32> = s.iter().map(|v| v.config.per_user_limit as i32).collect();
    let starts: Vec<_> = s.iter().map(|v| v.config.starts_at_ms.map(ts)).collect();
    let ends: Vec<_> = s.iter().map(|v| v.config.ends_at_ms.map(ts)).collect();
    let paused: Vec<bool> = s.iter().map(|v| v.paused).collect();
    let queue_opens: Vec<_> = s
        .iter()
        .map(|v| v.config.queue.as_ref().map(|q| ts(q.opens_at_ms)))
        .collect();
    let queue_max: Vec<Option<i32>> = s
        .iter()
        .map(|v| v.config.queue.as_ref().map(|q| q.max as i32))
        .collect();
    let query = bind_all!(
        sqlx::query(
            "INSERT INTO skus (sku, total, available, held, sold, per_user_limit, hold_ttl_ms,
                               starts_at, ends_at, paused, queue_opens_at, queue_max, updated_batch)
             SELECT *, $13 FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[],
                                       $6::int4[], $7::int8[], $8::timestamptz[], $9::timestamptz[],
                                       $10::bool[], $11::timestamptz[], $12::int4[])
             ON CONFLICT (sku) DO UPDATE SET
                 total = EXCLUDED.total, available = EXCLUDED.available, held = EXCLUDED.held,
                 sold = EXCLUDED.sold, per_user_limit = EXCLUDED.per_user_limit,
                 hold_ttl_ms = EXCLUDED.hold_ttl_ms, starts_at = EXCLUDED.starts_at,
                 ends_at = EXCLUDED.ends_at, paused = EXCLUDED.paused,
                 queue_opens_at = EXCLUDED.queue_opens_at, queue_max = EXCLUDED.queue_max,
                 updated_batch = EXCLUDED.updated_batch",
        ),
        names,
        int8(|v| v.total),
        int8(|v| v.available),
        int8(|v| v.held),
        int8(|v| v.sold),
        limits,
        int8(|v| v.config.hold_ttl_ms),
        starts,
        ends,
        paused,
        queue_opens,
        queue_max,
        batch.batch_seq as i64,
    );
    // One row each, inserted or updated.
    Some(Statement::new(query, "SKU rows written", s.len()))
}

/// Request ids as the `uuid` column values they are stored as.
fn uuids(ids: impl Iterator<Item = RequestId>) -> Vec<Uuid> {
    ids.map(Uuid::from_u128).collect()
}

/// One statement of a batch's transaction, and how many rows it must touch.
struct Statement<'q> {
    query: Query<'q, Postgres, PgArguments>,
    /// What the rows are, for the error when Postgres touched another number of them.
    what: &'static str,
    rows: usize,
}

impl<'q> Statement<'q> {
    fn new(query: Query<'q, Postgres, PgArguments>, what: &'static str, rows: usize) -> Self {
        Statement { query, what, rows }
    }

    /// Runs it in `tx`; a count other than `rows` means Postgres and the engine disagree.
    async fn run(
        self,
        tx: &mut Transaction<'_, Postgres>,
        batch_seq: u64,
    ) -> Result<(), CommitError> {
        let got = self.query.execute(&mut **tx).await?.rows_affected();
        if got as usize == self.rows {
            return Ok(());
        }
        Err(CommitError::Inconsistent {
            batch_seq,
            what: format!(
                "{}: expected {}, Postgres reports {got}",
                self.what, self.rows
            ),
        })
    }
}
