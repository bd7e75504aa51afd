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
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use crossbeam_channel::RecvTimeoutError;
use persistence::batch::{commit_batch, CommitError};
use persistence::checkpoint;
use persistence::snapshot::{self, BatchHeader};
use persistence::{lease, loggen, BatchRecord, DecisionRow, TransitionRow};
use sqlx::PgPool;
use tokio::runtime::Runtime;
use wire::{Command, Request};

use crate::checkpointer::{Cadence, Checkpointer};
use crate::clock::DatabaseClock;
use crate::log::{self, LogEvent, LogIdentity, LogLost, LogReader};
use crate::publish::{build_outbox, decode_outbox, Publisher};
use engine::{BatchOutput, DecisionRef, Engine, RestoreError, Restorer};

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
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
    /// On a lost requests log, exit (code 4) at once instead of waiting, not ready, for
    /// `sequencer rebase-log`.
    pub exit_on_log_lost: bool,
}

/// Batches read from Postgres per follow step; bounds memory when a standby is far behind.
const FOLLOW_BATCHES_MAX: i64 = 512;
/// Most batches re-published by a new leader.
const REPUBLISH_BATCHES_MAX: i64 = 2_000;
/// Longest wait between retries of a failed commit.
const COMMIT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Pause before retrying after Postgres or the broker could not be reached.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// The leader re-measures its offset to the database clock every this many lease renewals.
const CLOCK_MEASURE_EVERY_RENEWALS: u64 = 8;
/// Longest idle wait: how late at most an expiry batch is cut when no traffic arrives.
const IDLE_TICK: Duration = Duration::from_millis(50);

pub const ROLE_STARTING: u8 = 0;
pub const ROLE_STANDBY: u8 = 1;
pub const ROLE_ACTIVE: u8 = 2;
pub const ROLE_STOPPED: u8 = 3;
/// The requests log lost what Postgres decided: nothing is decided until `rebase-log`.
pub const ROLE_LOG_LOST: u8 = 4;

pub const LOADED_FROM_CHECKPOINT: u8 = 1;
pub const LOADED_FROM_ROWS: u8 = 2;

/// What the status endpoint and the logs report; written by the runtime, read by anyone.
#[derive(Debug, Default)]
pub struct Status {
    pub role: AtomicU8,
    pub epoch: AtomicU64,
    pub committed_offset: AtomicI64,
    pub applied_batch_seq: AtomicU64,
    pub log_end: Arc<AtomicI64>,
    pub last_batch_ms: AtomicI64,
    pub batches_committed: AtomicU64,
    pub decisions: AtomicU64,
    pub commands: AtomicU64,
    pub last_commit_us: AtomicU64,
    pub last_batch_size: AtomicU64,
    /// The active is retrying a failed commit (Postgres unreachable): not ready.
    pub commit_failing: AtomicBool,
    /// When a standby last followed the leader's batches successfully (Unix ms).
    pub last_follow_ms: AtomicI64,
    /// Newest batch this process wrote a checkpoint for (0: none).
    pub checkpoint_batch_seq: Arc<AtomicU64>,
    /// How the state was last loaded ([`LOADED_FROM_CHECKPOINT`], [`LOADED_FROM_ROWS`]; 0 before
    /// a load) and how long it took.
    pub loaded_from: AtomicU8,
    pub load_ms: AtomicU64,
    /// The generation of the requests log this process reads.
    pub log_generation: AtomicI64,
    /// Why the requests log is lost, while it is (role `log_lost`).
    pub log_lost: std::sync::Mutex<Option<String>>,
}

impl Status {
    pub fn loaded_from_name(&self) -> Option<&'static str> {
        match self.loaded_from.load(Ordering::Relaxed) {
            LOADED_FROM_CHECKPOINT => Some("checkpoint"),
            LOADED_FROM_ROWS => Some("rows"),
            _ => None,
        }
    }

    pub fn role_name(&self) -> &'static str {
        match self.role.load(Ordering::Relaxed) {
            ROLE_STANDBY => "standby",
            ROLE_ACTIVE => "active",
            ROLE_STOPPED => "stopped",
            ROLE_LOG_LOST => "log_lost",
            _ => "starting",
        }
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Why the process stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    #[error("shut down on request")]
    Shutdown,
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
            let bulk_pool = persistence::connect(&config.database_url, 2).await?;
            anyhow::Ok((pool, bulk_pool))
        })?;
        Ok(Sequencer {
            config,
            rt,
            pool,
            bulk_pool,
            clock: DatabaseClock::default(),
            status: Arc::new(Status::default()),
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
            let acquired = self.rt.block_on(lease::try_acquire(
                &self.pool,
                &self.config.node_id,
                self.config.lease,
            ));
            match acquired {
                Ok(Some(state)) => {
                    let result = self.lead(p, state.epoch, state.batch_seq);
                    self.status.role.store(ROLE_STOPPED, Ordering::Relaxed);
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

    fn load_position(&self) -> anyhow::Result<Position> {
        // The generation first: the offsets of the state loaded next belong to it.
        let generation = self.rt.block_on(loggen::current(&self.pool))?;
        let started = Instant::now();
        let (engine, next_offset) = self.load_engine(&generation)?;
        let load_ms = started.elapsed().as_millis() as u64;
        self.status.load_ms.store(load_ms, Ordering::Relaxed);
        metrics::gauge!("sequencer_state_load_seconds").set(load_ms as f64 / 1000.0);
        let consumer_config = log::consumer_config(
            &self.config.brokers,
            &self.config.node_id,
            self.config.fetch_wait_max_ms,
        );
        let log = self.check_log(&consumer_config, generation, next_offset)?;
        self.publish_position(&engine, next_offset);
        let reader = LogReader::start(
            &consumer_config,
            &log,
            next_offset,
            self.status.log_end.clone(),
        )?;
        Ok(Position {
            engine,
            next_offset,
            log,
            reader,
        })
    }

    /// The engine and the log offset it resumes from: from the newest checkpoint when there is
    /// one (its batches after it are then replayed by [`Sequencer::follow`]), else from the rows.
    /// A checkpoint that fails its checks is reported and the rows are used instead: they are
    /// the truth, the checkpoint only a faster way to it.
    fn load_engine(&self, generation: &loggen::LogGeneration) -> anyhow::Result<(Engine, i64)> {
        let started = Instant::now();
        let state = self.rt.block_on(lease::read_state(&self.bulk_pool))?;
        match self
            .rt
            .block_on(checkpoint::latest(&self.bulk_pool, Some(state.batch_seq)))
        {
            // Its offset is in an older log generation (a `rebase-log` came after it): the
            // batches after it cannot be replayed from the current log. The next leader writes
            // a checkpoint of the new generation within CHECKPOINT_INTERVAL_MS.
            Ok(Some(stored)) if (stored.batch_seq as i64) < generation.first_batch_seq => {
                tracing::info!(
                    checkpoint_batch_seq = stored.batch_seq,
                    generation = generation.generation,
                    "the newest checkpoint predates the log generation; loading the rows"
                );
            }
            Ok(Some(stored)) => match crate::checkpointer::load(&self.rt, &self.bulk_pool, &stored)
            {
                Ok(engine) => {
                    self.status
                        .loaded_from
                        .store(LOADED_FROM_CHECKPOINT, Ordering::Relaxed);
                    tracing::info!(
                        checkpoint_batch_seq = stored.batch_seq,
                        committed_batch_seq = state.batch_seq,
                        decisions = stored.decisions,
                        deltas = stored.deltas,
                        load_ms = started.elapsed().as_millis() as u64,
                        "state loaded from a checkpoint; replaying the batches after it"
                    );
                    return Ok((engine, stored.next_offset));
                }
                Err(e) => {
                    metrics::counter!("sequencer_checkpoint_load_failures_total").increment(1);
                    tracing::error!(
                        error = format!("{e:#}"),
                        checkpoint_batch_seq = stored.batch_seq,
                        "checkpoint refused; loading the state from the rows instead (slower)"
                    );
                }
            },
            Ok(None) => {}
            Err(e) => {
                metrics::counter!("sequencer_checkpoint_load_failures_total").increment(1);
                tracing::error!(error = %e, "checkpoint unreadable; loading the state from the rows instead (slower)");
            }
        }
        let (state, restorer) = self.rt.block_on(snapshot::stream_rows(
            &self.bulk_pool,
            |state, skus| Ok(Restorer::new(state.batch_seq, state.clock_ms, skus)?),
            |restorer, d| Ok(restorer.add(DecisionRef::from(d))?),
        ))?;
        let engine = restorer
            .finish()
            .context("the state in Postgres is inconsistent")?;
        self.status
            .loaded_from
            .store(LOADED_FROM_ROWS, Ordering::Relaxed);
        tracing::info!(
            batch_seq = state.batch_seq,
            load_ms = started.elapsed().as_millis() as u64,
            "state loaded from the rows (no checkpoint yet)"
        );
        Ok((engine, state.next_offset))
    }

    /// The log `next_offset` refers to (`generation`, read before the snapshot), checked against
    /// the broker: [`LogLost`] when it no longer holds what Postgres decided. The first
    /// sequencer to see a generation's topic records its name and topic id.
    fn check_log(
        &self,
        consumer_config: &rdkafka::ClientConfig,
        generation: loggen::LogGeneration,
        next_offset: i64,
    ) -> anyhow::Result<LogIdentity> {
        let now = self.rt.block_on(loggen::current(&self.pool))?;
        if now.generation != generation.generation {
            bail!("the requests log was rebased while the state was loading; loading again");
        }
        let mut identity = LogIdentity {
            generation: generation.generation,
            topic: generation
                .topic
                .clone()
                .unwrap_or_else(|| self.config.requests_topic.clone()),
            topic_id: generation.topic_id.clone(),
            base_offset: generation.base_offset,
        };
        if identity.topic != self.config.requests_topic {
            return Err(LogLost {
                generation: identity.generation,
                message: format!(
                    "this database's requests log (generation {}) is topic {:?}, but this \
                     sequencer reads REQUESTS_TOPIC={:?}. Fix the configuration; or, if the log \
                     really moved to that topic, run `sequencer rebase-log` with \
                     --requests-topic {:?}",
                    identity.generation,
                    identity.topic,
                    self.config.requests_topic,
                    self.config.requests_topic
                ),
            }
            .into());
        }
        let seen_id = log::check_log(consumer_config, &identity, next_offset)?;
        if generation.topic.is_none() || (generation.topic_id.is_none() && seen_id.is_some()) {
            let recorded = self.rt.block_on(loggen::record_topic(
                &self.pool,
                identity.generation,
                &identity.topic,
                seen_id.as_deref(),
            ))?;
            if recorded.topic_id.is_some() && recorded.topic_id != seen_id {
                return Err(LogLost {
                    generation: identity.generation,
                    message: format!(
                        "topic {:?} has id {seen_id:?}, but id {:?} was recorded for this log \
                         generation: the topic was recreated. {}",
                        identity.topic,
                        recorded.topic_id,
                        log::RECOVERY_HINT
                    ),
                }
                .into());
            }
            identity.topic_id = recorded.topic_id;
        }
        self.status
            .log_generation
            .store(identity.generation, Ordering::Relaxed);
        Ok(identity)
    }

    /// The requests log is lost: decide nothing, say so (role `log_lost`, `/readyz` 503, the
    /// `sequencer_log_lost` gauge, an error line every 30 s), and wait until either an operator
    /// has started a new log generation (`sequencer rebase-log`) or the old log is whole again.
    /// Then the caller loads the state afresh. Err (exit code 4) on shutdown, or at once with
    /// `exit_on_log_lost`.
    fn wait_for_rebase(&self, lost: LogLost) -> anyhow::Result<()> {
        self.status.role.store(ROLE_LOG_LOST, Ordering::Relaxed);
        *self.status.log_lost.lock().expect("status lock") = Some(lost.message.clone());
        metrics::gauge!("sequencer_log_lost").set(1.0);
        tracing::error!(
            generation = lost.generation,
            "{lost}; deciding nothing until `sequencer rebase-log` starts a new log generation"
        );
        if self.config.exit_on_log_lost {
            return Err(lost.into());
        }
        let (mut reminded, mut rechecked) = (Instant::now(), Instant::now());
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                return Err(lost.into());
            }
            std::thread::sleep(Duration::from_millis(250));
            let recovered = match self.rt.block_on(loggen::current(&self.pool)) {
                Ok(g) if g.generation > lost.generation => {
                    tracing::info!(
                        generation = g.generation,
                        topic = g.topic.as_deref().unwrap_or("?"),
                        base_offset = g.base_offset,
                        "the requests log was rebased to a new generation; loading the state"
                    );
                    true
                }
                Ok(g) if rechecked.elapsed() >= Duration::from_secs(5) => {
                    rechecked = Instant::now();
                    self.log_whole_again(g)
                }
                Ok(_) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the log generation (Postgres?)");
                    false
                }
            };
            if recovered {
                *self.status.log_lost.lock().expect("status lock") = None;
                metrics::gauge!("sequencer_log_lost").set(0.0);
                self.status.role.store(ROLE_STANDBY, Ordering::Relaxed);
                return Ok(());
            }
            if reminded.elapsed() >= Duration::from_secs(30) {
                reminded = Instant::now();
                tracing::error!(generation = lost.generation, "still waiting: {lost}");
            }
        }
    }

    /// Whether the log of `generation` holds what Postgres decided again (its topic restored,
    /// or a detection that a broker's later answers contradict).
    fn log_whole_again(&self, generation: loggen::LogGeneration) -> bool {
        if generation
            .topic
            .as_ref()
            .is_some_and(|t| *t != self.config.requests_topic)
        {
            return false; // a configuration to fix (or a rebase onto the configured topic)
        }
        let Ok(state) = self.rt.block_on(lease::read_state(&self.pool)) else {
            return false;
        };
        let identity = LogIdentity {
            generation: generation.generation,
            topic: generation
                .topic
                .unwrap_or_else(|| self.config.requests_topic.clone()),
            topic_id: generation.topic_id,
            base_offset: generation.base_offset,
        };
        let config = log::consumer_config(
            &self.config.brokers,
            &self.config.node_id,
            self.config.fetch_wait_max_ms,
        );
        match log::check_log(&config, &identity, state.next_offset) {
            Ok(_) => {
                tracing::info!(
                    "the requests log holds every decided offset again; loading the state"
                );
                true
            }
            Err(_) => false,
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

    /// Replays committed batches after the engine's last one; with `until`, keeps going until
    /// that batch has been applied (takeover), otherwise applies what is there now.
    fn follow(&self, position: &mut Position, until: Option<u64>) -> anyhow::Result<()> {
        loop {
            let headers = self.rt.block_on(snapshot::batches_after(
                &self.pool,
                position.engine.batch_seq(),
                FOLLOW_BATCHES_MAX,
            ))?;
            // After the headers: a batch of a newer generation is only committed after its
            // rebase, so if the generation is still ours, every header read is of our log.
            self.check_generation(position)?;
            if headers.is_empty() {
                if let Some(target) = until {
                    if position.engine.batch_seq() < target {
                        bail!("batch {target} is committed but not readable");
                    }
                }
                return Ok(());
            }
            for header in &headers {
                self.replay(position, header)?;
            }
            if until.is_some_and(|t| position.engine.batch_seq() >= t) {
                return Ok(());
            }
        }
    }

    /// Fails when this replica's log is lost or no longer the current generation (a rebase):
    /// the caller then reloads the state from Postgres, which positions it on the new log.
    fn check_generation(&self, position: &Position) -> anyhow::Result<()> {
        if let Some(why) = position.reader.lost() {
            return Err(LogLost {
                generation: position.log.generation,
                message: why.to_owned(),
            }
            .into());
        }
        let current = self.rt.block_on(loggen::current(&self.pool))?;
        if current.generation != position.log.generation {
            bail!(
                "the requests log was rebased to generation {} (this replica read generation {})",
                current.generation,
                position.log.generation
            );
        }
        Ok(())
    }

    fn replay(&self, position: &mut Position, header: &BatchHeader) -> anyhow::Result<()> {
        if header.batch_seq != position.engine.batch_seq() + 1
            || header.first_offset != position.next_offset
        {
            bail!(
                "batch {} covers offsets [{}, {}), but this replica is at batch {} offset {}",
                header.batch_seq,
                header.first_offset,
                header.next_offset,
                position.engine.batch_seq(),
                position.next_offset
            );
        }
        let (requests, _offsets) = read_range(
            &position.reader,
            header.first_offset,
            header.next_offset,
            self.config.takeover_timeout,
        )?;
        let out = position.engine.apply_batch(header.decided_at_ms, &requests);
        let outbox = wire::encode(&build_outbox(header.epoch, &out, &requests));
        if outbox != header.outbox {
            bail!(
                "replaying batch {} did not reproduce the leader's outcomes: this replica diverged",
                header.batch_seq
            );
        }
        position.next_offset = header.next_offset;
        self.publish_position(&position.engine, position.next_offset);
        metrics::counter!("sequencer_replayed_batches_total").increment(1);
        Ok(())
    }

    fn lead(
        &self,
        position: &mut Position,
        epoch: u64,
        committed_batch_seq: u64,
    ) -> Result<(), Stop> {
        let failed = |e: anyhow::Error| Stop::Failed(format!("{e:#}"));
        self.status.epoch.store(epoch, Ordering::Relaxed);
        tracing::info!(epoch, "lease taken; catching up before deciding");
        let took_over_at = Instant::now();
        // Renew from the start: a catch-up (or a reload) can take longer than a lease, and a
        // leader deposed while catching up would only have cost the sale a second takeover.
        let lease_lost = Arc::new(AtomicBool::new(false));
        let clock = self.clock.clone();
        self.rt
            .block_on(clock.measure(&self.pool))
            .map_err(|e| Stop::Failed(format!("reading the database clock: {e}")))?;
        let renewer = self.rt.spawn(renew_lease(
            self.pool.clone(),
            epoch,
            self.config.lease,
            self.config.renew_every,
            lease_lost.clone(),
            clock.clone(),
        ));
        let renewer = AbortOnDrop(renewer);
        if let Err(e) = self.follow(position, Some(committed_batch_seq)) {
            tracing::warn!(error = %e, "catch-up by replay failed; reloading state from Postgres");
            *position = self
                .load_position()
                .map_err(|e| match e.downcast::<LogLost>() {
                    Ok(lost) => Stop::LogLost(lost),
                    Err(e) if e.downcast_ref::<RestoreError>().is_some() => {
                        Stop::Fatal(format!("{e:#}"))
                    }
                    Err(e) => failed(e),
                })?;
            self.follow(position, Some(committed_batch_seq))
                .map_err(failed)?;
        }
        let publisher =
            Publisher::new(&self.config.brokers, &self.config.outcomes_topic).map_err(failed)?;
        self.republish_recent(&publisher).map_err(failed)?;
        let mut checkpointer = Checkpointer::start(
            self.config.checkpoint,
            self.bulk_pool.clone(),
            self.rt.handle().clone(),
            self.status.checkpoint_batch_seq.clone(),
        );
        if let Err(e) = checkpointer.refresh(self.rt.handle(), &self.bulk_pool) {
            tracing::warn!(
                error = format!("{e:#}"),
                "cannot read the checkpoint chain; checkpoints wait until a write succeeds"
            );
        }
        self.status.role.store(ROLE_ACTIVE, Ordering::Relaxed);
        tracing::info!(
            epoch,
            batch_seq = position.engine.batch_seq(),
            next_offset = position.next_offset,
            ready_ms = took_over_at.elapsed().as_millis() as u64,
            "active: deciding"
        );
        let result = self.decide_loop(position, epoch, &publisher, &lease_lost, &mut checkpointer);
        drop(renewer);
        publisher.flush(Duration::from_secs(5));
        if matches!(result, Err(Stop::Shutdown)) {
            // Graceful handover: the current batch is committed and published; give the lease up
            // so a standby takes over at its next poll instead of waiting for expiry.
            match self.rt.block_on(lease::release(&self.pool, epoch)) {
                Ok(true) => tracing::info!(epoch, "lease released for handover"),
                Ok(false) => tracing::warn!(epoch, "lease was already lost at shutdown"),
                Err(e) => tracing::warn!(error = %e, "could not release the lease; it will lapse"),
            }
        }
        result
    }

    fn republish_recent(&self, publisher: &Publisher) -> anyhow::Result<()> {
        let window_ms = self.config.republish_window.as_millis() as i64;
        let recent = self.rt.block_on(snapshot::recent_batches(
            &self.pool,
            window_ms,
            REPUBLISH_BATCHES_MAX,
        ))?;
        for header in &recent {
            publisher.publish(&decode_outbox(&header.outbox)?);
        }
        if !recent.is_empty() {
            tracing::info!(batches = recent.len(), "re-published recent outcomes");
        }
        Ok(())
    }

    fn decide_loop(
        &self,
        position: &mut Position,
        epoch: u64,
        publisher: &Publisher,
        lease_lost: &AtomicBool,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), Stop> {
        // The pooled connection returns itself to the pool on drop through a Tokio task; this
        // thread is not a runtime worker, so it enters the runtime's context for the loop.
        let _context = self.rt.enter();
        let mut conn = self
            .rt
            .block_on(self.pool.acquire())
            .map_err(|e| Stop::Failed(format!("no database connection: {e}")))?;
        let mut messages: Vec<(i64, Vec<u8>)> =
            Vec::with_capacity(self.config.batch_size_backlog_max);
        loop {
            if lease_lost.load(Ordering::Relaxed) {
                return Err(Stop::Deposed(format!(
                    "lease of epoch {epoch} lost to another sequencer"
                )));
            }
            if self.shutdown.load(Ordering::Relaxed) {
                return Err(Stop::Shutdown);
            }
            check_log_whole(position)?;
            messages.clear();
            let wait = match position.engine.next_expiry_ms() {
                Some(at) => Duration::from_millis(
                    (at - self.clock.now_ms()).clamp(0, IDLE_TICK.as_millis() as i64) as u64,
                ),
                None => IDLE_TICK,
            };
            match position.reader.events.recv_timeout(wait) {
                Ok(event) => {
                    take(event, &mut messages, &position.log)?;
                    self.fill_batch(position, &mut messages)?;
                }
                Err(RecvTimeoutError::Timeout) => {
                    let due = position
                        .engine
                        .next_expiry_ms()
                        .is_some_and(|at| at <= self.clock.now_ms());
                    if !due {
                        // Quiet: a good moment for a checkpoint of the last batches of a burst,
                        // which no later commit would otherwise trigger.
                        checkpointer.after_commit(&position.engine, epoch, position.next_offset);
                        continue;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    check_log_whole(position)?;
                    return Err(Stop::Failed("the log reader stopped".into()));
                }
            }
            self.decide_and_commit(position, epoch, &messages, publisher, &mut conn)?;
            checkpointer.after_commit(&position.engine, epoch, position.next_offset);
        }
    }

    /// Takes whatever is already waiting, up to the batch limit, then waits at most `linger`.
    /// Under a backlog (more than a normal batch already waiting) the limit grows to
    /// `batch_size_backlog_max`: one transaction then carries more, exactly when it matters.
    fn fill_batch(
        &self,
        position: &Position,
        messages: &mut Vec<(i64, Vec<u8>)>,
    ) -> Result<(), Stop> {
        let deadline = Instant::now() + self.config.linger;
        let limit = if position.reader.events.len() >= self.config.batch_size_max {
            self.config.batch_size_backlog_max
        } else {
            self.config.batch_size_max
        };
        while messages.len() < limit {
            match position.reader.events.try_recv() {
                Ok(event) => take(event, messages, &position.log)?,
                Err(_) => match position.reader.events.recv_deadline(deadline) {
                    Ok(event) => take(event, messages, &position.log)?,
                    Err(_) => break,
                },
            }
        }
        Ok(())
    }

    fn decide_and_commit(
        &self,
        position: &mut Position,
        epoch: u64,
        messages: &[(i64, Vec<u8>)],
        publisher: &Publisher,
        conn: &mut sqlx::pool::PoolConnection<sqlx::Postgres>,
    ) -> Result<(), Stop> {
        let deciding = Instant::now();
        let first_offset = position.next_offset;
        let (requests, offsets) = decode_messages(messages, first_offset);
        let next_offset = messages
            .last()
            .map_or(first_offset, |(o, _)| (o + 1).max(first_offset));
        // Only reached with messages or a due expiry; every applied batch must commit, since
        // the engine's batch_seq has moved and the fence expects the next one.
        // The database's time, whatever this host's clock says (clock.rs).
        let out = position.engine.apply_batch(self.clock.now_ms(), &requests);
        let outbox = build_outbox(epoch, &out, &requests);
        let record = batch_record(
            epoch,
            first_offset,
            next_offset,
            &out,
            &requests,
            &offsets,
            wire::encode(&outbox),
        );
        let span = tracing::debug_span!(
            "batch",
            epoch,
            batch_seq = out.batch_seq,
            first_offset,
            next_offset,
            commands = requests.len(),
            commit_us = tracing::field::Empty
        );
        let _in_batch = span.enter();
        let started = Instant::now();
        let decide = started - deciding;
        // The watcher may have found the topic replaced while this batch was read from it.
        check_log_whole(position)?;
        self.commit_with_retry(conn, &record)?;
        self.status.commit_failing.store(false, Ordering::Relaxed);
        let commit_us = started.elapsed().as_micros() as u64;
        span.record("commit_us", commit_us);
        publisher.publish(&outbox);
        position.next_offset = next_offset;
        let s = &self.status;
        self.publish_position(&position.engine, next_offset);
        s.last_batch_ms.store(out.batch_time_ms, Ordering::Relaxed);
        s.batches_committed.fetch_add(1, Ordering::Relaxed);
        s.decisions
            .fetch_add(out.decisions.len() as u64, Ordering::Relaxed);
        s.commands
            .fetch_add(requests.len() as u64, Ordering::Relaxed);
        s.last_commit_us.store(commit_us, Ordering::Relaxed);
        s.last_batch_size
            .store(requests.len() as u64, Ordering::Relaxed);
        crate::status::record_batch(&out, requests.len(), decide, started.elapsed());
        tracing::debug!(
            epoch,
            batch_seq = out.batch_seq,
            first_offset,
            next_offset,
            commands = requests.len(),
            commit_us,
            "batch committed"
        );
        Ok(())
    }

    /// Commits, retrying with backoff while Postgres is unreachable. A failure during COMMIT
    /// leaves the outcome unknown, so before each retry the fence row is read back: if it already
    /// shows this batch, the commit did happen.
    fn commit_with_retry(
        &self,
        conn: &mut sqlx::pool::PoolConnection<sqlx::Postgres>,
        record: &BatchRecord<'_>,
    ) -> Result<(), Stop> {
        let mut backoff = Duration::from_millis(25);
        loop {
            let error = match self.rt.block_on(commit_batch(conn, record)) {
                Ok(()) => return Ok(()),
                Err(CommitError::Fenced(f)) => return Err(Stop::Deposed(f.to_string())),
                Err(CommitError::Inconsistent { batch_seq, what }) => {
                    return Err(Stop::Fatal(format!("batch {batch_seq} refused: {what}")))
                }
                Err(CommitError::Database(e)) if is_integrity_violation(&e) => {
                    // A CHECK or UNIQUE failed: the engine and the database disagree about an
                    // invariant. Never retry that; stop and let an operator audit.
                    return Err(Stop::Fatal(format!(
                        "batch {} violates a database constraint: {e}",
                        record.batch_seq
                    )));
                }
                Err(CommitError::Database(e)) => e,
            };
            tracing::warn!(error = %error, batch_seq = record.batch_seq, ?backoff, "commit failed; retrying");
            metrics::counter!("sequencer_commit_retries_total").increment(1);
            self.status.commit_failing.store(true, Ordering::Relaxed);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(COMMIT_BACKOFF_MAX);
            if self.shutdown.load(Ordering::Relaxed) && backoff >= COMMIT_BACKOFF_MAX {
                return Err(Stop::Failed(
                    "shut down while the database was unreachable".into(),
                ));
            }
            let Ok(fresh) = self.rt.block_on(self.pool.acquire()) else {
                continue;
            };
            *conn = fresh;
            let Ok(state) = self.rt.block_on(lease::read_state(&mut **conn)) else {
                continue;
            };
            if state.epoch != record.epoch {
                return Err(Stop::Deposed(format!(
                    "epoch {} superseded by {} while retrying",
                    record.epoch, state.epoch
                )));
            }
            if state.batch_seq == record.batch_seq && state.next_offset == record.next_offset {
                tracing::info!(
                    batch_seq = record.batch_seq,
                    "the failed commit had in fact committed"
                );
                return Ok(());
            }
        }
    }
}

/// Aborts a background task when the owner goes away, whichever way it leaves.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn is_integrity_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code.starts_with("23"))
}

/// Moves a message into the batch being filled, and records how long it took to get here: from
/// the ingress handing it to its producer to the decide loop taking it (the append, the fetch,
/// and the wait in the read-ahead queue behind the batch being committed).
fn take(
    event: LogEvent,
    messages: &mut Vec<(i64, Vec<u8>)>,
    log: &LogIdentity,
) -> Result<(), Stop> {
    match event {
        LogEvent::Message {
            offset,
            payload,
            created_ms,
        } => {
            if let Some(created) = created_ms {
                static WAIT: OnceLock<metrics::Histogram> = OnceLock::new();
                WAIT.get_or_init(|| metrics::histogram!("sequencer_request_wait_seconds"))
                    .record((now_ms() - created).max(0) as f64 / 1000.0);
            }
            messages.push((offset, payload));
            Ok(())
        }
        LogEvent::Lost(message) => Err(Stop::LogLost(LogLost {
            generation: log.generation,
            message,
        })),
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

/// Reads exactly the messages of `[first, next)` from the reader (a standby's replay).
fn read_range(
    reader: &LogReader,
    first: i64,
    next: i64,
    timeout: Duration,
) -> anyhow::Result<(Vec<Request>, Vec<i64>)> {
    let mut messages = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut last = first - 1;
    while last + 1 < next {
        match reader.events.recv_deadline(deadline) {
            Ok(LogEvent::Message {
                offset, payload, ..
            }) => {
                if offset >= next {
                    bail!("log offset {offset} arrived before the end {next} of the batch being replayed");
                }
                last = offset;
                messages.push((offset, payload));
            }
            Ok(LogEvent::Lost(why)) => return Err(anyhow!(why)),
            Err(_) => bail!("timed out reading offsets [{first}, {next}) from the log"),
        }
    }
    Ok(decode_messages(&messages, first))
}

fn batch_record<'a>(
    epoch: u64,
    first_offset: i64,
    next_offset: i64,
    out: &BatchOutput,
    requests: &'a [Request],
    offsets: &[i64],
    outbox: Vec<u8>,
) -> BatchRecord<'a> {
    let decisions = out
        .decisions
        .iter()
        .map(|d| {
            let i = d.command_index as usize;
            let Command::Reserve {
                sku,
                user_id,
                quantity,
                idempotency_key,
            } = &requests[i].command
            else {
                unreachable!("decisions come from reserve commands only")
            };
            DecisionRow {
                reservation_id: d.request_id,
                user_id,
                idempotency_key,
                sku,
                quantity: *quantity,
                result: d.result,
                request_offset: offsets[i],
            }
        })
        .collect();
    let transitions = out
        .transitions
        .iter()
        .map(|t| TransitionRow {
            reservation_id: t.reservation_id,
            status: t.status,
            at_ms: t.at_ms,
        })
        .collect();
    BatchRecord {
        epoch,
        batch_seq: out.batch_seq,
        first_offset,
        next_offset,
        batch_time_ms: out.batch_time_ms,
        decisions,
        transitions,
        skus: out.skus.clone(),
        outbox,
    }
}

/// Renews the lease every `every`; flags `lost` the moment the database says the epoch is gone.
async fn renew_lease(
    pool: PgPool,
    epoch: u64,
    lease_len: Duration,
    every: Duration,
    lost: Arc<AtomicBool>,
    clock: DatabaseClock,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for renewal in 0u64.. {
        tick.tick().await;
        match lease::renew(&pool, epoch, lease_len).await {
            Ok(true) => {
                // Clocks drift slowly: re-measure the offset every few renewals.
                if renewal % CLOCK_MEASURE_EVERY_RENEWALS == 0 {
                    if let Err(e) = clock.measure(&pool).await {
                        tracing::warn!(error = %e, "database clock not read; keeping the last offset");
                    }
                }
            }
            Ok(false) => {
                tracing::error!(epoch, "lease lost: another sequencer holds a newer epoch");
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => tracing::warn!(error = %e, epoch, "lease renewal failed; will retry"),
        }
    }
}
