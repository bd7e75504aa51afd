//! Leading: take the lease's epoch, catch up, re-publish recent outboxes, then cut batches from
//! the log while the lease holds.

use super::*;

/// Most batches re-published by a new leader.
const REPUBLISH_BATCHES_MAX: i64 = 2_000;
/// The leader re-measures its offset to the database clock every this many lease renewals.
const CLOCK_MEASURE_EVERY_RENEWALS: u64 = 8;
/// Longest idle wait: how late at most an expiry batch is cut when no traffic arrives.
const IDLE_TICK: Duration = Duration::from_millis(50);

impl Sequencer {
    pub(super) fn lead(
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
        let handback = Arc::new(AtomicBool::new(false));
        let clock = self.clock.clone();
        self.rt
            .block_on(clock.measure(&self.pool))
            .map_err(|e| Stop::Failed(format!("reading the database clock: {e}")))?;
        let renewer = self.rt.spawn(
            Renewal {
                pool: self.pool.clone(),
                epoch,
                lease_len: self.config.lease,
                every: self.config.renew_every,
                lost: lease_lost.clone(),
                clock: clock.clone(),
                // A preferred writer keeps its partition; another watches for a hand-back.
                handback: (!self.config.preferred)
                    .then(|| (handback.clone(), self.config.node_id.clone())),
            }
            .run(),
        );
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
            self.config.partition,
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
        let flags = LeadFlags {
            lease_lost: &lease_lost,
            handback: &handback,
        };
        let result = self.decide_loop(position, epoch, &publisher, flags, &mut checkpointer);
        drop(renewer);
        publisher.flush(Duration::from_secs(5));
        if matches!(result, Err(Stop::Shutdown | Stop::HandBack)) {
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

    pub(super) fn republish_recent(&self, publisher: &Publisher) -> anyhow::Result<()> {
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

    pub(super) fn decide_loop(
        &self,
        position: &mut Position,
        epoch: u64,
        publisher: &Publisher,
        flags: LeadFlags<'_>,
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
            if flags.lease_lost.load(Ordering::Relaxed) {
                return Err(Stop::Deposed(format!(
                    "lease of epoch {epoch} lost to another sequencer"
                )));
            }
            if self.shutdown.load(Ordering::Relaxed) {
                return Err(Stop::Shutdown);
            }
            if flags.handback.load(Ordering::Relaxed) {
                tracing::info!(epoch, "handing the partition back to its preferred writer");
                return Err(Stop::HandBack);
            }
            check_log_whole(position)?;
            messages.clear();
            let wait = match next_due_ms(&mut position.engine) {
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
                    let due = next_due_ms(&mut position.engine)
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
    pub(super) fn fill_batch(
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
}

/// When the engine next has work without a command: a hold to expire or a pre-sale queue to
/// decide. An empty batch is cut then.
fn next_due_ms(engine: &mut Engine) -> Option<i64> {
    match (engine.next_expiry_ms(), engine.next_release_ms()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Aborts a background task when the owner goes away, whichever way it leaves.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
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
                const N: usize = wire::partition::PARTITIONS_MAX as usize;
                static WAIT: [OnceLock<metrics::Histogram>; N] = [const { OnceLock::new() }; N];
                WAIT[log.partition as usize]
                    .get_or_init(|| {
                        let p = crate::status::partition_label(log.partition);
                        metrics::histogram!("sequencer_request_wait_seconds", "partition" => p)
                    })
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

/// Renews the lease every `every`; flags `lost` the moment the database says the epoch is gone.
/// What the decide loop watches besides the shutdown flag.
#[derive(Clone, Copy)]
pub(super) struct LeadFlags<'a> {
    /// The renewer found the lease lost: stop writing.
    lease_lost: &'a AtomicBool,
    /// The partition's preferred writer asked for it back.
    handback: &'a AtomicBool,
}

/// The leader's lease renewal, every `every` until aborted.
struct Renewal {
    pool: PgPool,
    epoch: u64,
    lease_len: Duration,
    every: Duration,
    lost: Arc<AtomicBool>,
    clock: DatabaseClock,
    /// For a leader that does not prefer the partition: the flag to raise when its preferred
    /// writer asks for it back, and this process's node id.
    handback: Option<(Arc<AtomicBool>, String)>,
}

impl Renewal {
    async fn run(self) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for renewal in 0u64.. {
            tick.tick().await;
            match lease::renew(&self.pool, self.epoch, self.lease_len).await {
                Ok(true) => {
                    // Clocks drift slowly: re-measure the offset every few renewals.
                    if renewal % CLOCK_MEASURE_EVERY_RENEWALS == 0 {
                        if let Err(e) = self.clock.measure(&self.pool).await {
                            tracing::warn!(error = %e, "database clock not read; keeping the last offset");
                        }
                    }
                    if let Some((flag, me)) = &self.handback {
                        if let Ok(Some(to)) = lease::handback_asked(&self.pool).await {
                            if to != *me {
                                flag.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                }
                Ok(false) => {
                    tracing::error!(
                        epoch = self.epoch,
                        "lease lost: another sequencer holds a newer epoch"
                    );
                    self.lost.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, epoch = self.epoch, "lease renewal failed; will retry")
                }
            }
        }
    }
}
