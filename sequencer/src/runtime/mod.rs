//! The sequencer process: follow while another leads, lead when the lease is ours.
//!
//! Start-up, warm standby and takeover are one path. The process loads a snapshot from Postgres
//! once, then *follows*: for each batch committed by the leader (its offsets and batch time are in
//! the `batches` table) it reads the same requests from the log and replays them through the
//! deterministic engine, checking that it produced byte-for-byte the outbox the leader stored.
//! When the lease lapses it bumps the epoch, replays the few batches it has not seen yet,
//! re-publishes recent outboxes and starts deciding: a takeover costs a catch-up, not a reload.
//!
//! Leading is a loop on one thread (the business-logic thread): cut a batch from the log, decide
//! it, commit it in one fenced transaction, publish its outcomes. Nothing is published before the
//! commit returns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use crossbeam_channel::RecvTimeoutError;
use persistence::batch::{commit_batch, CommitError};
use persistence::checkpoint;
use persistence::snapshot::{self, BatchHeader};
use persistence::{lease, loggen, AdminKeyRow, BatchRecord, DecisionRow, TransitionRow};
use sqlx::PgPool;
use tokio::runtime::Runtime;
use wire::{Command, Reject, Request, RequestId, ReserveRef};

use crate::checkpointer::{Cadence, Checkpointer};
use crate::clock::now_ms;
use crate::clock::DatabaseClock;
use crate::log::{self, LogEvent, LogIdentity, LogLost, LogReader};
use crate::publish::{build_outbox, decode_outbox, Publisher};
use crate::status::{
    Status, LOADED_FROM_CHECKPOINT, LOADED_FROM_ROWS, ROLE_ACTIVE, ROLE_LOG_LOST, ROLE_STANDBY,
    ROLE_STOPPED,
};
use engine::{BatchOutput, DecisionRef, Engine, RestoreError, Restorer};

mod commit;
mod follow;
mod lead;
mod load;

#[derive(Debug, Clone)]
pub struct Config {
    /// This partition's database (`persistence::layout`).
    pub database_url: String,
    /// The partition of the requests topic this writer decides, and the topic's partition count.
    pub partition: i32,
    pub partitions: u32,
    /// Take a free lease only this long after start (0: at once); see `LEAD_PARTITIONS`.
    pub lead_after: Duration,
    /// This process is a preferred writer of the partition (`LEAD_PARTITIONS`): as a standby it
    /// asks a leader that is not to hand the partition back; as a leader it hands back nothing.
    pub preferred: bool,
    pub brokers: String,
    pub requests_topic: String,
    pub outcomes_topic: String,
    pub node_id: String,
    pub batch_size_max: usize,
    pub batch_size_backlog_max: usize,
    pub linger: Duration,
    /// `fetch.wait.max.ms` of the requests consumers.
    pub fetch_wait_max_ms: u64,
    pub lease: Duration,
    pub renew_every: Duration,
    pub standby_poll: Duration,
    pub republish_window: Duration,
    pub takeover_timeout: Duration,
    pub status_addr: Option<SocketAddr>,
    /// How often the leader writes a checkpoint of the engine state.
    pub checkpoint: Cadence,
    /// Decisions the engine makes room for when it is loaded (`Engine::reserve_room`), so
    /// that no table grows on the decide thread during the next sale.
    pub engine_headroom: usize,
    /// On a lost requests log, exit (code 4) at once instead of waiting, not ready, for
    /// `sequencer rebase-log`.
    pub exit_on_log_lost: bool,
}

/// Pause before retrying after Postgres or the broker could not be reached.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Why the process stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    #[error("shut down on request")]
    Shutdown,
    /// The partition's preferred writer asked for it back: this leader finished its batch,
    /// released the lease, and goes on as a standby.
    #[error("handed back to its preferred writer")]
    HandBack,
    /// Another sequencer holds a newer epoch: this one's fence failed or its lease was taken,
    /// and it wrote nothing after that. Safe to restart as a standby (exit code 3).
    #[error("deposed: {0}")]
    Deposed(String),
    /// Cannot go on now, nothing is wrong with the data: Postgres or the broker unreachable, the
    /// log reader died. A restart (as a standby) may fix it (exit code 1).
    #[error("failed: {0}")]
    Failed(String),
    /// Postgres and the engine disagree about an invariant (a CHECK or UNIQUE violated by a
    /// batch, rows that do not add up): restarting blindly would meet the same state. Stop and
    /// audit (exit code 5).
    #[error("FATAL: {0}")]
    Fatal(String),
    #[error(transparent)]
    LogLost(LogLost),
}

pub struct Sequencer {
    config: Config,
    rt: Runtime,
    /// The writer's pool: commits, the lease. Its sessions abort a transaction left idle for a
    /// lease (see `persistence::connect_writer`).
    pool: PgPool,
    /// Loading state and writing checkpoints: long reads and writes that must not run under
    /// the writer's timeouts, and must not take the writer's connections.
    bulk_pool: PgPool,
    /// The batch clock: the database's (see `clock.rs`).
    clock: DatabaseClock,
    pub status: Arc<Status>,
    shutdown: Arc<AtomicBool>,
}

/// A follower/leader's view of the log: the engine plus the reader positioned right after the
/// last batch the engine has applied.
struct Position {
    engine: Engine,
    next_offset: i64,
    /// The log generation `next_offset` and the reader belong to.
    log: LogIdentity,
    reader: LogReader,
}

impl Sequencer {
    pub fn new(config: Config, shutdown: Arc<AtomicBool>) -> anyhow::Result<Sequencer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (pool, bulk_pool) = rt.block_on(async {
            let pool = persistence::connect_writer(&config.database_url, 4, config.lease).await?;
            persistence::migrate(&pool).await?;
            persistence::layout::claim(&pool, config.partition as u32, config.partitions).await?;
            let bulk_pool = persistence::connect(&config.database_url, 2).await?;
            anyhow::Ok((pool, bulk_pool))
        })?;
        let status = Arc::new(Status {
            partition: config.partition,
            ..Status::default()
        });
        Ok(Sequencer {
            config,
            rt,
            pool,
            bulk_pool,
            clock: DatabaseClock::default(),
            status,
            shutdown,
        })
    }

    pub fn runtime(&self) -> &Runtime {
        &self.rt
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs until shutdown (Ok) or until this process must stop (Err). Trouble reaching Postgres
    /// or the broker is waited out with a retry; a log shorter than what Postgres has decided, a
    /// fenced commit or a broken invariant is not.
    pub fn run(&self) -> anyhow::Result<()> {
        self.status.role.store(ROLE_STANDBY, Ordering::Relaxed);
        let started = Instant::now();
        // Whether another process led this partition since this one started: then a lapsed
        // lease is a failover, taken at once, not a start-up race to leave to the preferred
        // process (`lead_after`).
        let mut seen_led = false;
        // When this preferred standby last asked the leader for the partition back.
        let mut asked_at: Option<Instant> = None;
        let mut position: Option<Position> = None;
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                self.status.role.store(ROLE_STOPPED, Ordering::Relaxed);
                return Ok(());
            }
            let p = match position.as_mut() {
                Some(p) => p,
                None => match self.load_position() {
                    Ok(mut p) => {
                        // Replay what was committed after the loaded state before competing for
                        // the lease, so that a leader starts (nearly) caught up.
                        if let Err(e) = self.follow(&mut p, None) {
                            tracing::warn!(
                                error = format!("{e:#}"),
                                "catch-up after load failed; reloading"
                            );
                            std::thread::sleep(RETRY_PAUSE);
                            continue;
                        }
                        tracing::info!(node = %self.config.node_id, batch_seq = p.engine.batch_seq(),
                            next_offset = p.next_offset, "state loaded; following until the lease is free");
                        position.insert(p)
                    }
                    Err(e) => match e.downcast::<LogLost>() {
                        Ok(lost) => {
                            self.wait_for_rebase(lost)?;
                            continue;
                        }
                        Err(e) if e.downcast_ref::<RestoreError>().is_some() => {
                            // Rows that do not add up: another try reads the same rows.
                            return Err(Stop::Fatal(format!("{e:#}")).into());
                        }
                        Err(e) => {
                            tracing::warn!(
                                error = format!("{e:#}"),
                                "cannot load state yet; retrying"
                            );
                            std::thread::sleep(RETRY_PAUSE);
                            continue;
                        }
                    },
                },
            };
            let acquired = if !seen_led && started.elapsed() < self.config.lead_after {
                // Another process leads this partition first, if it is up.
                if let Ok(s) = self.rt.block_on(lease::read_state(&self.pool)) {
                    seen_led = s.lease_remaining_ms > 0;
                }
                Ok(None)
            } else {
                self.rt.block_on(lease::try_acquire(
                    &self.pool,
                    &self.config.node_id,
                    self.config.lease,
                ))
            };
            match acquired {
                Ok(Some(state)) => {
                    let result = self.lead(p, state.epoch, state.batch_seq);
                    self.status.role.store(ROLE_STOPPED, Ordering::Relaxed);
                    if let Err(Stop::HandBack) = result {
                        // Follow from a fresh state, as a standby of the preferred writer.
                        position = None;
                        self.status.role.store(ROLE_STANDBY, Ordering::Relaxed);
                        continue;
                    }
                    if let Err(Stop::LogLost(lost)) = result {
                        // Not deposed: the log is gone. Wait for the operator's rebase, then
                        // start over from Postgres like a fresh process.
                        position = None;
                        self.wait_for_rebase(lost)?;
                        continue;
                    }
                    return match result {
                        Ok(()) | Err(Stop::Shutdown) => Ok(()),
                        Err(e) => Err(e.into()),
                    };
                }
                Ok(None) => {
                    let followed = self.follow(p, None);
                    if followed.is_ok() {
                        self.status
                            .last_follow_ms
                            .store(now_ms(), Ordering::Relaxed);
                        // Caught up with a leader that may not prefer this partition: ask for it
                        // back, at most once a second (a no-op while no one else leads).
                        if self.config.preferred
                            && asked_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                        {
                            asked_at = Some(Instant::now());
                            let node = &self.config.node_id;
                            if let Err(e) =
                                self.rt.block_on(lease::request_handback(&self.pool, node))
                            {
                                tracing::warn!(error = %e, "could not ask for the partition back");
                            }
                        }
                    }
                    if let Err(e) = followed {
                        // A replay that disagrees with the leader, or a gap: start over from a
                        // fresh snapshot rather than lead from a doubtful state.
                        tracing::error!(
                            error = format!("{e:#}"),
                            "following failed; reloading state from Postgres"
                        );
                        position = None;
                    }
                    std::thread::sleep(self.config.standby_poll);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease attempt failed (Postgres unreachable or the fence row locked); retrying");
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
    }

    fn publish_position(&self, engine: &Engine, next_offset: i64) {
        self.status
            .applied_batch_seq
            .store(engine.batch_seq(), Ordering::Relaxed);
        self.status
            .committed_offset
            .store(next_offset, Ordering::Relaxed);
    }
}

fn check_log_whole(position: &Position) -> Result<(), Stop> {
    match position.reader.lost() {
        Some(why) => Err(Stop::LogLost(LogLost {
            generation: position.log.generation,
            message: why.to_owned(),
        })),
        None => Ok(()),
    }
}

/// Decodes the messages at or after `first_offset`. A message that does not decode is logged and
/// skipped (it still counts as consumed): one bad producer must not stop the sale.
fn decode_messages(messages: &[(i64, Vec<u8>)], first_offset: i64) -> (Vec<Request>, Vec<i64>) {
    let mut requests = Vec::with_capacity(messages.len());
    let mut offsets = Vec::with_capacity(messages.len());
    for (offset, payload) in messages {
        if *offset < first_offset {
            continue;
        }
        match wire::decode::<Request>(payload) {
            Ok(r) => {
                requests.push(r);
                offsets.push(*offset);
            }
            Err(e) => tracing::error!(offset, error = %e, "undecodable request skipped"),
        }
    }
    (requests, offsets)
}
