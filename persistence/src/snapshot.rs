//! Reading the state back from the rows (the slow path of a start-up, taken when there is no
//! checkpoint yet: see [`crate::checkpoint`]), and the committed batches a standby replays.
//!
//! Rows are read in one REPEATABLE READ transaction, so the counters, the rows and the committed
//! offset are from the same instant: the engine rebuilt from them resumes exactly at
//! `state.next_offset`.

use futures_util::TryStreamExt;
use sqlx::{PgPool, Row};
use uuid::Uuid;
use wire::{QueueWindow, Reject, ReservationStatus, SkuConfig, SkuView, StoredDecision};

use crate::lease::{read_state, SequencerState};
use crate::ms;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("reservation {id}: unknown status {status:?} / reason {reason:?}")]
    BadRow {
        id: Uuid,
        status: String,
        reason: Option<String>,
    },
    #[error(transparent)]
    Rejected(#[from] anyhow::Error),
}

/// Streams the whole state from the rows, in one REPEATABLE READ READ ONLY transaction:
/// `on_header` gets the fence row and the SKUs, then `on_row` every decision in decision order
/// (the same `StoredDecision` refilled, so nothing is allocated per row). Nothing is collected:
/// memory stays that of the consumer, whatever the number of rows.
///
/// Pass a pool without the writer's lock timeouts (`crate::connect`): a large state takes
/// longer to read than a lease lasts, and a reader holds no lock a writer needs.
pub async fn stream_rows<R>(
    pool: &PgPool,
    on_header: impl FnOnce(&SequencerState, Vec<SkuView>) -> anyhow::Result<R>,
    mut on_row: impl FnMut(&mut R, &StoredDecision) -> anyhow::Result<()>,
) -> Result<(SequencerState, R), LoadError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let state = read_state(&mut *tx).await?;
    let skus = sqlx::query(&format!(
        "SELECT {SKU_COLUMNS} FROM skus ORDER BY updated_batch, sku"
    ))
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(sku_from_row)
    .collect::<Result<Vec<_>, _>>()?;
    let mut sink = on_header(&state, skus)?;
    let mut rows = sqlx::query(
        "SELECT reservation_id, user_id, idempotency_key, sku, quantity, status, reject_reason,
                expires_at
           FROM decisions ORDER BY batch_seq, request_offset",
    )
    .fetch(&mut *tx);
    let mut d = empty_decision();
    while let Some(row) = rows.try_next().await? {
        fill_decision(&row, "status", &mut d)?;
        on_row(&mut sink, &d)?;
    }
    drop(rows);
    tx.commit().await?;
    Ok((state, sink))
}

/// Streams the decisions of batches up to `batch_seq`, in decision order, each with the status
/// it had right after that batch (later moves, from `reservation_events`, undone): what a
/// checkpoint of that batch must hold, for the audit to compare.
pub async fn stream_rows_as_of(
    pool: &PgPool,
    batch_seq: u64,
    mut on_row: impl FnMut(&StoredDecision) -> anyhow::Result<()>,
) -> Result<(), LoadError> {
    let mut rows = sqlx::query(
        "SELECT r.reservation_id, r.user_id, r.idempotency_key, r.sku, r.quantity,
                r.reject_reason, r.expires_at,
                coalesce(e.status, CASE WHEN r.status = 'rejected' THEN 'rejected' ELSE 'held' END)
                    AS status_then
           FROM decisions r
           LEFT JOIN reservation_events e
                  ON e.reservation_id = r.reservation_id AND e.batch_seq <= $1
          WHERE r.batch_seq <= $1
          ORDER BY r.batch_seq, r.request_offset",
    )
    .bind(batch_seq as i64)
    .fetch(pool);
    let mut d = empty_decision();
    while let Some(row) = rows.try_next().await? {
        fill_decision(&row, "status_then", &mut d)?;
        on_row(&d)?;
    }
    Ok(())
}

fn empty_decision() -> StoredDecision {
    StoredDecision {
        request_id: 0,
        user_id: String::new(),
        idempotency_key: String::new(),
        sku: String::new(),
        quantity: 0,
        status: Err(Reject::SoldOut),
        expires_at_ms: 0,
    }
}

/// Refills `d` from a reservations row whose status is in column `status_column`.
fn fill_decision(
    row: &sqlx::postgres::PgRow,
    status_column: &str,
    d: &mut StoredDecision,
) -> Result<(), LoadError> {
    let id: Uuid = row.try_get("reservation_id")?;
    let status: &str = row.try_get(status_column)?;
    let reason: Option<&str> = row.try_get("reject_reason")?;
    let parsed = match (ReservationStatus::parse(status), reason) {
        (Some(s), None) => Some(Ok(s)),
        (None, Some(r)) if status == "rejected" => Reject::from_code(r).map(Err),
        _ => None,
    };
    let Some(parsed) = parsed else {
        return Err(LoadError::BadRow {
            id,
            status: status.to_owned(),
            reason: reason.map(str::to_owned),
        });
    };
    let expires_at: Option<chrono::DateTime<chrono::Utc>> = row.try_get("expires_at")?;
    d.request_id = id.as_u128();
    refill(&mut d.user_id, row.try_get("user_id")?);
    refill(&mut d.idempotency_key, row.try_get("idempotency_key")?);
    refill(&mut d.sku, row.try_get("sku")?);
    d.quantity = row.try_get::<i32, _>("quantity")? as u32;
    d.status = parsed;
    d.expires_at_ms = expires_at.map(ms).unwrap_or(0);
    Ok(())
}

fn refill(buffer: &mut String, value: &str) {
    buffer.clear();
    buffer.push_str(value);
}

/// The columns of `skus` that [`sku_from_row`] reads.
pub(crate) const SKU_COLUMNS: &str = "sku, total, available, held, sold, per_user_limit, \
     hold_ttl_ms, starts_at, ends_at, paused, queue_opens_at, queue_max";

pub(crate) fn sku_from_row(row: &sqlx::postgres::PgRow) -> Result<SkuView, sqlx::Error> {
    let starts: Option<chrono::DateTime<chrono::Utc>> = row.try_get("starts_at")?;
    let ends: Option<chrono::DateTime<chrono::Utc>> = row.try_get("ends_at")?;
    let queue_opens: Option<chrono::DateTime<chrono::Utc>> = row.try_get("queue_opens_at")?;
    let queue_max: Option<i32> = row.try_get("queue_max")?;
    Ok(SkuView {
        sku: row.try_get("sku")?,
        total: row.try_get::<i64, _>("total")? as u64,
        available: row.try_get::<i64, _>("available")? as u64,
        held: row.try_get::<i64, _>("held")? as u64,
        sold: row.try_get::<i64, _>("sold")? as u64,
        config: SkuConfig {
            total_stock: row.try_get::<i64, _>("total")? as u64,
            per_user_limit: row.try_get::<i32, _>("per_user_limit")? as u32,
            hold_ttl_ms: row.try_get::<i64, _>("hold_ttl_ms")? as u64,
            starts_at_ms: starts.map(ms),
            ends_at_ms: ends.map(ms),
            queue: queue_opens.zip(queue_max).map(|(opens, max)| QueueWindow {
                opens_at_ms: ms(opens),
                max: max as u32,
            }),
        },
        paused: row.try_get("paused")?,
    })
}

/// A committed batch as the standby and the republisher need it.
#[derive(Debug, Clone)]
pub struct BatchHeader {
    pub batch_seq: u64,
    pub epoch: u64,
    pub first_offset: i64,
    pub next_offset: i64,
    pub decided_at_ms: i64,
    pub outbox: Vec<u8>,
}

/// Committed batches with `batch_seq > after`, oldest first, at most `limit` of them.
pub async fn batches_after(
    pool: &PgPool,
    after: u64,
    limit: i64,
) -> Result<Vec<BatchHeader>, sqlx::Error> {
    sqlx::query(
        "SELECT batch_seq, epoch, first_offset, next_offset, decided_at, outbox
           FROM batches WHERE batch_seq > $1 ORDER BY batch_seq LIMIT $2",
    )
    .bind(after as i64)
    .bind(limit)
    .fetch_all(pool)
    .await?
    .iter()
    .map(|row| {
        Ok(BatchHeader {
            batch_seq: row.try_get::<i64, _>("batch_seq")? as u64,
            epoch: row.try_get::<i64, _>("epoch")? as u64,
            first_offset: row.try_get("first_offset")?,
            next_offset: row.try_get("next_offset")?,
            decided_at_ms: ms(row.try_get("decided_at")?),
            outbox: row.try_get("outbox")?,
        })
    })
    .collect()
}

/// The batches decided in the last `window_ms` before the latest one (at most `limit`), oldest
/// first: what a new leader publishes again in case the old one died between commit and publish.
pub async fn recent_batches(
    pool: &PgPool,
    window_ms: i64,
    limit: i64,
) -> Result<Vec<BatchHeader>, sqlx::Error> {
    let from: Option<i64> = sqlx::query_scalar(
        "SELECT min(batch_seq) FROM (
             SELECT batch_seq FROM batches
              WHERE decided_at >= (SELECT max(decided_at) FROM batches) - make_interval(secs => $1)
              ORDER BY batch_seq DESC LIMIT $2) recent",
    )
    .bind(window_ms as f64 / 1000.0)
    .bind(limit)
    .fetch_one(pool)
    .await?;
    match from {
        Some(first) => batches_after(pool, (first - 1) as u64, limit).await,
        None => Ok(Vec::new()),
    }
}
