//! The leader's checkpoint writer. The decide loop encodes what the engine appended since the
//! chain's last checkpoint (a few ms: `memcpy`s and one pass over the new rows) and hands it to
//! this writer's own thread, which compresses and stores it beside the batches. The decide loop
//! never waits for it: while a write is in flight, the next checkpoint is simply not due.
//!
//! The writer tracks where the chain in Postgres ends (its number of deltas and the engine
//! cursor after the last one). After any failure it reads that back from Postgres before the
//! next checkpoint, so a chain extended by another writer (an earlier leader) is continued, never
//! forked: a delta's number is its primary key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use persistence::checkpoint::{self, NewCheckpoint};
use sqlx::PgPool;
use tokio::runtime::Handle;

use anyhow::{anyhow, bail, Context};
use tokio::runtime::Runtime;

use engine::{checkpoint_head_meta, CheckpointCursor, CheckpointLoader, Engine};

/// When a checkpoint is due: after this many batches or this long, whichever comes first (and
/// only if at least one batch was committed since the last).
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    pub batches: u64,
    pub interval: Duration,
}

/// Where the stored chain ends.
#[derive(Debug, Clone, Copy, Default)]
struct ChainEnd {
    deltas: u32,
    cursor: CheckpointCursor,
    batch_seq: u64,
}

struct Job {
    new: NewCheckpoint,
    end: ChainEnd,
}

pub struct Checkpointer {
    cadence: Cadence,
    /// `None` until read from Postgres, and again after a failed write.
    chain: Arc<Mutex<Option<ChainEnd>>>,
    jobs: Sender<Job>,
    last_at: Instant,
    /// Newest batch a checkpoint was written for, for the status endpoint.
    pub written_batch_seq: Arc<AtomicU64>,
}

impl Checkpointer {
    /// Starts the writer thread. `pool` should be one without the writer's lock timeouts: a
    /// large delta takes longer to send than a lease lasts.
    pub fn start(
        cadence: Cadence,
        pool: PgPool,
        runtime: Handle,
        written_batch_seq: Arc<AtomicU64>,
        partition: i32,
    ) -> Checkpointer {
        let p = crate::status::partition_label(partition);
        // One job at a time: a checkpoint that would queue behind another is not due yet.
        let (jobs, inbox) = crossbeam_channel::bounded::<Job>(0);
        let chain = Arc::new(Mutex::new(None));
        let (chain_w, written) = (chain.clone(), written_batch_seq.clone());
        thread::Builder::new()
            .name(format!("checkpoint-p{partition}"))
            .spawn(move || {
                for job in inbox {
                    let started = Instant::now();
                    let raw = job.new.delta.as_ref().map_or(0, |(_, d)| d.len());
                    match runtime.block_on(checkpoint::write(&pool, &job.new)) {
                        Ok(()) => {
                            *chain_w.lock().expect("chain lock") = Some(job.end);
                            written.store(job.new.batch_seq, Ordering::Relaxed);
                            metrics::counter!("sequencer_checkpoints_total", "partition" => p.clone()).increment(1);
                            metrics::histogram!("sequencer_checkpoint_write_seconds", "partition" => p.clone())
                                .record(started.elapsed().as_secs_f64());
                            metrics::gauge!("sequencer_checkpoint_batch_seq", "partition" => p.clone())
                                .set(job.new.batch_seq as f64);
                            tracing::info!(
                                batch_seq = job.new.batch_seq,
                                deltas = job.new.deltas,
                                delta_bytes = raw,
                                decisions = job.new.decisions,
                                write_ms = started.elapsed().as_millis() as u64,
                                "checkpoint written"
                            );
                        }
                        Err(e) => {
                            metrics::counter!("sequencer_checkpoint_failures_total", "partition" => p.clone()).increment(1);
                            tracing::warn!(error = %e, batch_seq = job.new.batch_seq,
                                "checkpoint not written; will read the chain back and retry later");
                            let end = runtime.block_on(read_chain_end(&pool)).ok();
                            *chain_w.lock().expect("chain lock") = end;
                        }
                    }
                }
            })
            .expect("spawning the checkpoint writer");
        Checkpointer {
            cadence,
            chain,
            jobs,
            last_at: Instant::now(),
            written_batch_seq,
        }
    }

    /// Reads where the stored chain ends (a new leader calls this before its first batch).
    pub fn refresh(&self, runtime: &Handle, pool: &PgPool) -> anyhow::Result<()> {
        let end = runtime.block_on(read_chain_end(pool))?;
        self.written_batch_seq
            .store(end.batch_seq, Ordering::Relaxed);
        *self.chain.lock().expect("chain lock") = Some(end);
        Ok(())
    }

    /// Called after each committed batch: hands a checkpoint of `engine` to the writer when one
    /// is due and the writer is free. `next_offset` is where the log resumes after this state.
    pub fn after_commit(&mut self, engine: &Engine, epoch: u64, next_offset: i64) {
        let Some(chain) = *self.chain.lock().expect("chain lock") else {
            return;
        };
        let batches = engine.batch_seq().saturating_sub(chain.batch_seq);
        let due = batches >= self.cadence.batches
            || (batches > 0 && self.last_at.elapsed() >= self.cadence.interval);
        if !due || chain.batch_seq > engine.batch_seq() {
            return;
        }
        let cursor = engine.checkpoint_cursor();
        // Continue the stored chain, or start it anew when it ends where this engine cannot
        // describe the difference (see `Engine::can_continue_chain`).
        // With no head stored (none written yet, or an operator deleted them), deltas left
        // behind cannot be trusted to line up: start anew too.
        let restart_chain = chain.deltas == 0 || !engine.can_continue_chain(&chain.cursor);
        let (base, base_deltas) = if restart_chain {
            (CheckpointCursor::default(), 0)
        } else {
            (chain.cursor, chain.deltas)
        };
        let appended = cursor != base;
        let deltas = base_deltas + u32::from(appended);
        let new = NewCheckpoint {
            epoch,
            batch_seq: engine.batch_seq(),
            next_offset,
            decisions: cursor.rows,
            delta: appended.then(|| (deltas, engine.encode_delta(&base))),
            deltas,
            head: engine.encode_head(),
            restart_chain,
        };
        let end = ChainEnd {
            deltas,
            cursor,
            batch_seq: engine.batch_seq(),
        };
        match self.jobs.try_send(Job { new, end }) {
            Ok(()) => self.last_at = Instant::now(),
            Err(TrySendError::Full(_)) => {} // still writing the previous one
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("the checkpoint writer stopped; no more checkpoints")
            }
        }
    }
}

async fn read_chain_end(pool: &PgPool) -> anyhow::Result<ChainEnd> {
    Ok(match checkpoint::latest(pool, None).await? {
        Some(stored) => {
            let meta = checkpoint_head_meta(&stored.head)?;
            ChainEnd {
                deltas: stored.deltas,
                cursor: meta.cursor,
                batch_seq: stored.batch_seq,
            }
        }
        None => ChainEnd::default(),
    })
}

/// Loads the engine from a stored checkpoint: the deltas are streamed from Postgres on the
/// runtime while this thread applies them, so reading and decoding overlap; then the head.
pub fn load(
    rt: &Runtime,
    pool: &PgPool,
    stored: &checkpoint::StoredCheckpoint,
    hash_seed: u64,
) -> anyhow::Result<Engine> {
    let (deltas_tx, deltas_rx) = crossbeam_channel::bounded::<Vec<u8>>(2);
    let (pool, count) = (pool.clone(), stored.deltas);
    let reading = rt.spawn(async move {
        checkpoint::read_deltas(&pool, count, |_, raw| {
            deltas_tx
                .send(raw)
                .map_err(|_| anyhow!("the checkpoint loader stopped"))
        })
        .await
    });
    let mut loader = CheckpointLoader::new(hash_seed);
    let mut applied = Ok(());
    for raw in deltas_rx {
        applied = loader.apply_delta(&raw);
        if applied.is_err() {
            break;
        }
    }
    let read = rt.block_on(reading).context("checkpoint reader task")?;
    applied?;
    read?;
    let engine = loader.finish(&stored.head)?;
    if engine.batch_seq() != stored.batch_seq {
        bail!(
            "checkpoint head says batch {} but is stored as batch {}",
            engine.batch_seq(),
            stored.batch_seq
        );
    }
    Ok(engine)
}
