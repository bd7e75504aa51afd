//! The ingress's read path: single-row lookups by primary key, straight from the system of record
//! (so a GET never shows anything that is not committed).

use sqlx::{PgPool, Row};
use uuid::Uuid;
use wire::SkuView;

use crate::ms;
use crate::snapshot::{sku_from_row, SKU_COLUMNS};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRecord {
    pub reservation_id: Uuid,
    pub user_id: String,
    pub sku: String,
    pub quantity: u32,
    /// held, confirmed, cancelled or expired.
    pub status: String,
    pub expires_at_ms: i64,
    pub decided_at_ms: i64,
}

/// A granted reservation by id. Refusals have no public id and are not returned.
pub async fn reservation(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<ReservationRecord>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT reservation_id, user_id, sku, quantity, status, expires_at, decided_at
           FROM reservations WHERE reservation_id = $1 AND status <> 'rejected'",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(record_from_row).transpose()
}

fn record_from_row(row: &sqlx::postgres::PgRow) -> Result<ReservationRecord, sqlx::Error> {
    Ok(ReservationRecord {
        reservation_id: row.try_get("reservation_id")?,
        user_id: row.try_get("user_id")?,
        sku: row.try_get("sku")?,
        quantity: row.try_get::<i32, _>("quantity")? as u32,
        status: row.try_get("status")?,
        expires_at_ms: ms(row.try_get("expires_at")?),
        decided_at_ms: ms(row.try_get("decided_at")?),
    })
}

/// The decision of request `id`, granted or refused: `Ok(reservation)` or `Err(reason code)`;
/// `None` while it has none (a queued request before its sale starts).
pub async fn decision(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<Result<ReservationRecord, String>>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT reservation_id, user_id, sku, quantity, status, reject_reason, expires_at,
                decided_at
           FROM reservations WHERE reservation_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    if let Some(reason) = row.try_get::<Option<String>, _>("reject_reason")? {
        return Ok(Some(Err(reason)));
    }
    Ok(Some(Ok(record_from_row(&row)?)))
}

/// The outbox of the newest batch that decided log offset `offset` (a ticket's request), if
/// one has; and the committed offset (`sequencer_state.next_offset`) read in the same
/// statement, so that "not decided yet" and "decided" cannot both be missed between two reads.
pub async fn decided_at_offset(
    pool: &PgPool,
    offset: i64,
) -> Result<(Option<Vec<u8>>, i64), sqlx::Error> {
    let row = sqlx::query(
        "SELECT (SELECT outbox FROM batches
                  WHERE next_offset > $1 AND first_offset <= $1
                  ORDER BY batch_seq DESC LIMIT 1) AS outbox,
                next_offset
           FROM sequencer_state WHERE id = 1",
    )
    .bind(offset)
    .fetch_one(pool)
    .await?;
    Ok((row.try_get("outbox")?, row.try_get("next_offset")?))
}

/// [`sku`], with the batch that last changed it (`updated_batch`): where a live stream of its
/// counters starts.
pub async fn sku_and_batch(
    pool: &PgPool,
    name: &str,
) -> Result<Option<(SkuView, u64)>, sqlx::Error> {
    let Some(row) = sqlx::query(&format!(
        "SELECT {SKU_COLUMNS}, updated_batch FROM skus WHERE sku = $1"
    ))
    .bind(name)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let batch: i64 = row.try_get("updated_batch")?;
    Ok(Some((sku_from_row(&row)?, batch as u64)))
}

/// At most `limit` SKUs ordered by name, those after `after` when given (a page of the list:
/// the next page starts after the last name of this one). One index range scan of the primary
/// key.
pub async fn skus(
    pool: &PgPool,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<SkuView>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {SKU_COLUMNS} FROM skus WHERE $1::text IS NULL OR sku > $1 ORDER BY sku LIMIT $2"
    ))
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?
    .iter()
    .map(sku_from_row)
    .collect()
}

/// The requests waiting in each pre-sale queue that has any, by SKU name (at most `limit` SKUs):
/// one scan of the index of waiting requests.
pub async fn queue_lengths(pool: &PgPool, limit: u32) -> Result<Vec<(String, u64)>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sku, count(*) FROM queued_requests WHERE released_batch IS NULL
          GROUP BY sku ORDER BY sku LIMIT $1",
    )
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(sku, n)| (sku, n as u64)).collect())
}

/// The writer as Postgres sees it: the fence row, and the time since its newest batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterView {
    pub epoch: u64,
    /// The node holding (or last holding) the lease; none after a graceful release.
    pub leader: Option<String>,
    /// Until the lease lapses, by the database's clock (negative: lapsed that long ago).
    pub lease_remaining_ms: i64,
    /// The committed offset: the next log offset to decide.
    pub next_offset: i64,
    pub batch_seq: u64,
    /// Since the newest batch was decided, by the database's clock; none before the first.
    pub last_batch_age_ms: Option<i64>,
}

/// [`WriterView`], in one statement (two primary-key lookups).
pub async fn writer(pool: &PgPool) -> Result<WriterView, sqlx::Error> {
    let row = sqlx::query(
        "SELECT s.epoch, s.leader, s.next_offset, s.batch_seq,
                GREATEST(LEAST(EXTRACT(EPOCH FROM (s.lease_expires_at - now())) * 1000,
                               9e15), -9e15)::int8 AS lease_remaining_ms,
                (EXTRACT(EPOCH FROM (now() - b.decided_at)) * 1000)::int8 AS last_batch_age_ms
           FROM sequencer_state s LEFT JOIN batches b ON b.batch_seq = s.batch_seq
          WHERE s.id = 1",
    )
    .fetch_one(pool)
    .await?;
    Ok(WriterView {
        epoch: row.try_get::<i64, _>("epoch")? as u64,
        leader: row.try_get("leader")?,
        lease_remaining_ms: row.try_get("lease_remaining_ms")?,
        next_offset: row.try_get("next_offset")?,
        batch_seq: row.try_get::<i64, _>("batch_seq")? as u64,
        last_batch_age_ms: row.try_get("last_batch_age_ms")?,
    })
}

pub async fn sku(pool: &PgPool, name: &str) -> Result<Option<SkuView>, sqlx::Error> {
    Ok(sku_and_batch(pool, name).await?.map(|(view, _)| view))
}
