//! Log generations: which requests log the committed offsets refer to (migration 0004).
//!
//! A generation is a contiguous range of batches (`batch_seq >= first_batch_seq` up to the next
//! generation's) whose offsets are positions in one Kafka topic, identified by name and topic id.
//! [`rebase`] starts a new generation after the log was lost: in ONE transaction it locks the
//! fence row, checks that nothing moved since the operator looked, bumps the writer epoch (no
//! writer of the old log can commit again, exactly as after a lease takeover), lapses the lease
//! and moves the committed offset to the new log's base offset.

use sqlx::{PgPool, Row};

/// One row of `log_generations`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogGeneration {
    pub generation: i64,
    /// `None` until a sequencer has recorded the topic it reads.
    pub topic: Option<String>,
    /// The Kafka topic id (`None`: not recorded yet, or a broker that reports none).
    pub topic_id: Option<String>,
    pub base_offset: i64,
    pub first_batch_seq: i64,
    pub epoch: i64,
    pub previous_next_offset: Option<i64>,
    pub started_at_ms: i64,
    pub reason: String,
}

const SELECT: &str = "SELECT generation, topic, topic_id, base_offset, first_batch_seq, epoch,
        previous_next_offset, (EXTRACT(EPOCH FROM started_at) * 1000)::int8 AS started_at_ms,
        reason
   FROM log_generations";

fn from_row(row: &sqlx::postgres::PgRow) -> Result<LogGeneration, sqlx::Error> {
    Ok(LogGeneration {
        generation: row.try_get("generation")?,
        topic: row.try_get("topic")?,
        topic_id: row.try_get("topic_id")?,
        base_offset: row.try_get("base_offset")?,
        first_batch_seq: row.try_get("first_batch_seq")?,
        epoch: row.try_get("epoch")?,
        previous_next_offset: row.try_get("previous_next_offset")?,
        started_at_ms: row.try_get("started_at_ms")?,
        reason: row.try_get("reason")?,
    })
}

/// The generation decisions are made in now (the newest).
pub async fn current<'e, E: sqlx::PgExecutor<'e>>(db: E) -> Result<LogGeneration, sqlx::Error> {
    let row = sqlx::query(&format!("{SELECT} ORDER BY generation DESC LIMIT 1"))
        .fetch_one(db)
        .await?;
    from_row(&row)
}

/// Every generation, oldest first.
pub async fn all(pool: &PgPool) -> Result<Vec<LogGeneration>, sqlx::Error> {
    sqlx::query(&format!("{SELECT} ORDER BY generation"))
        .fetch_all(pool)
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// Records the topic (and its id, when the broker reports one) of `generation` where none is
/// recorded yet, and returns the row as it now stands: the first sequencer to see the log
/// records what it saw, everyone after compares against that.
pub async fn record_topic(
    pool: &PgPool,
    generation: i64,
    topic: &str,
    topic_id: Option<&str>,
) -> Result<LogGeneration, sqlx::Error> {
    sqlx::query(
        "UPDATE log_generations
            SET topic = coalesce(topic, $2), topic_id = coalesce(topic_id, $3)
          WHERE generation = $1 AND (topic IS NULL OR (topic_id IS NULL AND $3::text IS NOT NULL))",
    )
    .bind(generation)
    .bind(topic)
    .bind(topic_id)
    .execute(pool)
    .await?;
    let row = sqlx::query(&format!("{SELECT} WHERE generation = $1"))
        .bind(generation)
        .fetch_one(pool)
        .await?;
    from_row(&row)
}

/// What the operator saw when deciding to rebase: the rebase happens only if it still holds.
#[derive(Debug, Clone)]
pub struct RebaseRequest {
    pub expected_generation: i64,
    pub expected_batch_seq: u64,
    pub expected_next_offset: i64,
    pub topic: String,
    pub topic_id: Option<String>,
    pub base_offset: i64,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RebaseError {
    #[error(
        "the state moved since it was checked (now generation {generation}, batch {batch_seq}, \
         next offset {next_offset}): nothing was changed; check the log again"
    )]
    Moved {
        generation: i64,
        batch_seq: u64,
        next_offset: i64,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Starts a new generation in one fenced transaction (see the module documentation). Returns
/// the new generation; its `epoch` is the bumped writer epoch.
pub async fn rebase(pool: &PgPool, request: &RebaseRequest) -> Result<LogGeneration, RebaseError> {
    let mut tx = pool.begin().await?;
    // The fence row's lock: a batch commit in flight finishes before this, or fails after it.
    let state =
        sqlx::query("SELECT batch_seq, next_offset FROM sequencer_state WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
    let batch_seq = state.try_get::<i64, _>("batch_seq")? as u64;
    let next_offset: i64 = state.try_get("next_offset")?;
    let generation = current(&mut *tx).await?.generation;
    if generation != request.expected_generation
        || batch_seq != request.expected_batch_seq
        || next_offset != request.expected_next_offset
    {
        tx.rollback().await?;
        return Err(RebaseError::Moved {
            generation,
            batch_seq,
            next_offset,
        });
    }
    let epoch: i64 = sqlx::query_scalar(
        "UPDATE sequencer_state
            SET epoch = epoch + 1, next_offset = $1, leader = NULL, lease_expires_at = 'epoch'
          WHERE id = 1
      RETURNING epoch",
    )
    .bind(request.base_offset)
    .fetch_one(&mut *tx)
    .await?;
    let row = sqlx::query(
        "INSERT INTO log_generations (generation, topic, topic_id, base_offset, first_batch_seq,
                                      epoch, previous_next_offset, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
      RETURNING generation, topic, topic_id, base_offset, first_batch_seq, epoch,
                previous_next_offset, (EXTRACT(EPOCH FROM started_at) * 1000)::int8 AS started_at_ms,
                reason",
    )
    .bind(generation + 1)
    .bind(&request.topic)
    .bind(&request.topic_id)
    .bind(request.base_offset)
    .bind(batch_seq as i64 + 1)
    .bind(epoch)
    .bind(next_offset)
    .bind(&request.reason)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(from_row(&row)?)
}
