//! Storing and reading checkpoints of the engine state (the bytes are the engine's; see
//! `engine/src/checkpoint.rs`). This layer owns what the bytes look like on disk:
//! zstd compression, a CRC-32 over the uncompressed bytes checked on every read, and the fence.
//!
//! A checkpoint is written beside the batches, never inside a batch's transaction: it is large
//! and the decide loop must not wait for it. It is still fenced like a batch: the head is only
//! inserted if the batch it describes is committed under the writer's epoch, so a deposed or
//! confused writer can never publish the state of a batch that did not commit. Two writers can
//! never both extend the chain: a delta's number is its primary key.

use futures_util::TryStreamExt;
use sqlx::{PgPool, Row};

/// zstd level for checkpoint bodies: level 1 compresses at hundreds of MB/s, and a start-up
/// decompresses at over a GB/s.
const ZSTD_LEVEL: i32 = 1;
/// Heads kept: the newest and the one before it.
pub const HEADS_KEPT: i64 = 2;

/// A head as stored.
#[derive(Debug, Clone)]
pub struct StoredCheckpoint {
    pub batch_seq: u64,
    pub epoch: u64,
    pub next_offset: i64,
    /// Deltas 1..=deltas make up the state.
    pub deltas: u32,
    pub decisions: u64,
    /// Verified against its checksum.
    pub head: Vec<u8>,
}

/// What a writer hands over: the delta since the chain's last one (if anything was appended)
/// and the head.
#[derive(Debug, Clone)]
pub struct NewCheckpoint {
    pub epoch: u64,
    pub batch_seq: u64,
    pub next_offset: i64,
    pub decisions: u64,
    /// The number this checkpoint's delta gets (`None`: nothing appended since the last one).
    pub delta: Option<(u32, Vec<u8>)>,
    /// Deltas 1..=deltas make up the state, this one's included.
    pub deltas: u32,
    pub head: Vec<u8>,
    /// Drop the stored chain first: this checkpoint's delta 1 holds the whole state.
    pub restart_chain: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointStoreError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("checkpoint delta {0} exists already: another writer extended the chain")]
    Superseded(u32),
    #[error("batch {batch_seq} is not committed under epoch {epoch}: checkpoint not written")]
    NotCommitted { batch_seq: u64, epoch: u64 },
    #[error("checkpoint {what} fails its checksum or does not decompress: {why}")]
    Corrupt { what: String, why: String },
    #[error("checkpoint deltas are not contiguous: expected delta {expected}, found {found}")]
    MissingDelta { expected: u32, found: u32 },
}

fn crc(bytes: &[u8]) -> i64 {
    i64::from(crc32fast::hash(bytes))
}

/// Writes one checkpoint in one transaction and prunes heads older than the newest
/// [`HEADS_KEPT`]. Deltas are never pruned: together they are the state.
pub async fn write(pool: &PgPool, c: &NewCheckpoint) -> Result<(), CheckpointStoreError> {
    let compressed = match &c.delta {
        Some((seq, raw)) => {
            let body = zstd::bulk::compress(raw, ZSTD_LEVEL).map_err(|e| {
                CheckpointStoreError::Corrupt {
                    what: format!("delta {seq}"),
                    why: e.to_string(),
                }
            })?;
            Some((*seq, raw.len(), crc(raw), body))
        }
        None => None,
    };
    let mut tx = pool.begin().await?;
    if c.restart_chain {
        sqlx::query("DELETE FROM checkpoints")
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM checkpoint_deltas")
            .execute(&mut *tx)
            .await?;
    }
    if let Some((seq, raw_len, checksum, body)) = &compressed {
        let inserted = sqlx::query(
            "INSERT INTO checkpoint_deltas (delta_seq, batch_seq, raw_bytes, checksum, body)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (delta_seq) DO NOTHING",
        )
        .bind(*seq as i32)
        .bind(c.batch_seq as i64)
        .bind(*raw_len as i64)
        .bind(checksum)
        .bind(body)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted != 1 {
            return Err(CheckpointStoreError::Superseded(*seq));
        }
    }
    let inserted = sqlx::query(
        "INSERT INTO checkpoints (batch_seq, epoch, next_offset, deltas, decisions, checksum, head)
         SELECT $1, $2, $3, $4, $5, $6, $7
          WHERE EXISTS (SELECT 1 FROM batches WHERE batch_seq = $1 AND epoch = $2)
         ON CONFLICT (batch_seq) DO NOTHING",
    )
    .bind(c.batch_seq as i64)
    .bind(c.epoch as i64)
    .bind(c.next_offset)
    .bind(c.deltas as i32)
    .bind(c.decisions as i64)
    .bind(crc(&c.head))
    .bind(&c.head)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted != 1 {
        return Err(CheckpointStoreError::NotCommitted {
            batch_seq: c.batch_seq,
            epoch: c.epoch,
        });
    }
    sqlx::query(
        "DELETE FROM checkpoints WHERE batch_seq < (
             SELECT min(batch_seq) FROM (
                 SELECT batch_seq FROM checkpoints ORDER BY batch_seq DESC LIMIT $1) newest)",
    )
    .bind(HEADS_KEPT)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The newest checkpoint (at or before `batch_seq_max`, when given), its head verified.
pub async fn latest(
    pool: &PgPool,
    batch_seq_max: Option<u64>,
) -> Result<Option<StoredCheckpoint>, CheckpointStoreError> {
    let batch_seq_max = batch_seq_max.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let row = sqlx::query(
        "SELECT batch_seq, epoch, next_offset, deltas, decisions, checksum, head
           FROM checkpoints WHERE batch_seq <= $1 ORDER BY batch_seq DESC LIMIT 1",
    )
    .bind(batch_seq_max)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let head: Vec<u8> = row.try_get("head")?;
    let batch_seq = row.try_get::<i64, _>("batch_seq")? as u64;
    if crc(&head) != row.try_get::<i64, _>("checksum")? {
        return Err(CheckpointStoreError::Corrupt {
            what: format!("head of batch {batch_seq}"),
            why: "checksum mismatch".into(),
        });
    }
    Ok(Some(StoredCheckpoint {
        batch_seq,
        epoch: row.try_get::<i64, _>("epoch")? as u64,
        next_offset: row.try_get("next_offset")?,
        deltas: row.try_get::<i32, _>("deltas")? as u32,
        decisions: row.try_get::<i64, _>("decisions")? as u64,
        head,
    }))
}

/// Streams deltas 1..=`deltas` in order, each decompressed and verified, to `each`. Holds one
/// delta in memory at a time.
pub async fn read_deltas(
    pool: &PgPool,
    deltas: u32,
    mut each: impl FnMut(u32, Vec<u8>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut rows = sqlx::query(
        "SELECT delta_seq, raw_bytes, checksum, body FROM checkpoint_deltas
          WHERE delta_seq <= $1 ORDER BY delta_seq",
    )
    .bind(deltas as i32)
    .fetch(pool);
    let mut expected = 1u32;
    while let Some(row) = rows.try_next().await? {
        let seq = row.try_get::<i32, _>("delta_seq")? as u32;
        if seq != expected {
            return Err(CheckpointStoreError::MissingDelta {
                expected,
                found: seq,
            }
            .into());
        }
        let raw_len = row.try_get::<i64, _>("raw_bytes")? as usize;
        let body: Vec<u8> = row.try_get("body")?;
        let corrupt = |why: String| CheckpointStoreError::Corrupt {
            what: format!("delta {seq}"),
            why,
        };
        let raw = zstd::bulk::decompress(&body, raw_len).map_err(|e| corrupt(e.to_string()))?;
        if raw.len() != raw_len || crc(&raw) != row.try_get::<i64, _>("checksum")? {
            return Err(corrupt("checksum or length mismatch".into()).into());
        }
        each(seq, raw)?;
        expected += 1;
    }
    if expected != deltas + 1 {
        return Err(CheckpointStoreError::MissingDelta { expected, found: 0 }.into());
    }
    Ok(())
}

/// Sizes of what is stored, for the status endpoint, the benchmark and the docs.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckpointSizes {
    pub heads: i64,
    pub deltas: i64,
    pub raw_bytes: i64,
    pub stored_bytes: i64,
}

pub async fn sizes(pool: &PgPool) -> Result<CheckpointSizes, sqlx::Error> {
    let row = sqlx::query(
        "SELECT (SELECT count(*) FROM checkpoints) AS heads, count(*) AS deltas,
                coalesce(sum(raw_bytes), 0)::int8 AS raw_bytes,
                coalesce(sum(octet_length(body)), 0)::int8 AS stored_bytes
           FROM checkpoint_deltas",
    )
    .fetch_one(pool)
    .await?;
    Ok(CheckpointSizes {
        heads: row.try_get("heads")?,
        deltas: row.try_get("deltas")?,
        raw_bytes: row.try_get("raw_bytes")?,
        stored_bytes: row.try_get("stored_bytes")?,
    })
}
