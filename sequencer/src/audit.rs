//! The part of `sequencer audit` that needs the engine: the newest checkpoint, loaded exactly as a
//! start-up would load it, compared row by row with the decisions Postgres holds for the same
//! batches (each with the status it had right after the checkpoint's batch). The rest of the
//! audit is SQL over the rows alone (`persistence::audit`).

use persistence::checkpoint;
use persistence::snapshot;
use sqlx::PgPool;
use tokio::runtime::Runtime;
use wire::StoredDecision;

use engine::DecisionRef;

/// Most differences listed before the comparison stops counting them one by one.
const DIFFERENCES_LISTED_MAX: usize = 20;

/// Violations found comparing the newest checkpoint with the rows, and the batch it describes
/// (`None`: no checkpoint to compare).
pub fn checkpoint_against_rows(
    rt: &Runtime,
    pool: &PgPool,
) -> anyhow::Result<(Option<u64>, Vec<String>)> {
    let Some(stored) = rt.block_on(checkpoint::latest(pool, None))? else {
        return Ok((None, Vec::new()));
    };
    let batch_seq = stored.batch_seq;
    let hash_seed = rt.block_on(persistence::lease::read_state(pool))?.hash_seed;
    let engine = match crate::checkpointer::load(rt, pool, &stored, hash_seed) {
        Ok(engine) => engine,
        Err(e) => {
            return Ok((
                Some(batch_seq),
                vec![format!(
                    "checkpoint of batch {batch_seq} does not load: {e:#}"
                )],
            ))
        }
    };
    let mut violations = Vec::new();
    let mut i = 0usize;
    rt.block_on(snapshot::stream_rows_as_of(pool, batch_seq, |row| {
        let same = engine
            .decision(i)
            .is_some_and(|d| same_decision(&d, row));
        if !same && violations.len() < DIFFERENCES_LISTED_MAX {
            violations.push(format!(
                "checkpoint of batch {batch_seq}: decision {i} is {:?} in the checkpoint but {:032x} ({}, {}, {:?}) in the rows",
                engine.decision(i).map(|d| (d.request.request_id, d.request.user_id.to_owned(), d.status)),
                row.request_id,
                row.user_id,
                row.idempotency_key,
                row.status
            ));
        }
        i += 1;
        Ok(())
    }))?;
    if i != engine.decision_count() {
        violations.push(format!(
            "checkpoint of batch {batch_seq} holds {} decisions, the rows of those batches {i}",
            engine.decision_count()
        ));
    }
    Ok((Some(batch_seq), violations))
}

fn same_decision(d: &DecisionRef<'_>, row: &StoredDecision) -> bool {
    d.request == row.request() && d.status == row.status && d.expires_at_ms == row.expires_at_ms
}
