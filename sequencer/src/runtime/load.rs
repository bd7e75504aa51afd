//! Start-up: load the engine from a checkpoint or from Postgres's rows, check the requests log
//! against what Postgres decided, and wait out a lost log until the operator's rebase.

use super::*;

impl Sequencer {
    pub(super) fn load_position(&self) -> anyhow::Result<Position> {
        // The generation first: the offsets of the state loaded next belong to it.
        let generation = self.rt.block_on(loggen::current(&self.pool))?;
        let started = Instant::now();
        let (mut engine, next_offset) = self.load_engine(&generation)?;
        self.load_admin_keys(&mut engine)?;
        self.load_queues(&mut engine)?;
        engine.reserve_room(self.config.engine_headroom);
        let load_ms = started.elapsed().as_millis() as u64;
        self.status.load_ms.store(load_ms, Ordering::Relaxed);
        metrics::gauge!("sequencer_state_load_seconds", "partition" => crate::status::partition_label(self.config.partition)).set(load_ms as f64 / 1000.0);
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

    /// The admin keys of the batches the engine holds: neither checkpoints nor decision rows
    /// carry them. Keys of later batches come back as those are replayed from the log.
    fn load_admin_keys(&self, engine: &mut Engine) -> anyhow::Result<()> {
        let rows = self.rt.block_on(persistence::batch::admin_keys_up_to(
            &self.bulk_pool,
            engine.batch_seq(),
        ))?;
        let mut keys = Vec::with_capacity(rows.len());
        for (idempotency_key, command, outcome) in rows {
            let outcome = wire::decode(&outcome).with_context(|| {
                format!("admin_commands: the outcome of key {idempotency_key:?} does not decode")
            })?;
            keys.push(engine::AdminKeyRecord {
                idempotency_key,
                command,
                outcome,
            });
        }
        engine.restore_admin_keys(keys);
        Ok(())
    }

    /// The pre-sale queues as they stood after the engine's batch: neither checkpoints nor
    /// decision rows carry them. Later batches' queued requests come back as those are replayed.
    fn load_queues(&self, engine: &mut Engine) -> anyhow::Result<()> {
        let rows = self.rt.block_on(persistence::batch::queued_as_of(
            &self.bulk_pool,
            engine.batch_seq(),
        ))?;
        let queued = rows
            .into_iter()
            .map(
                |(id, sku, user_id, idempotency_key, quantity)| engine::QueuedRequest {
                    request_id: id.as_u128(),
                    sku,
                    user_id,
                    idempotency_key,
                    quantity: quantity as u32,
                },
            );
        engine
            .restore_queue(queued)
            .context("queued_requests disagree with the loaded state")?;
        if engine.queued().next().is_some() {
            tracing::info!(queued = engine.queued().count(), "pre-sale queues loaded");
        }
        Ok(())
    }

    /// The engine and the log offset it resumes from: from the newest checkpoint when there is
    /// one (its batches after it are then replayed by [`Sequencer::follow`]), else from the rows.
    /// A checkpoint that fails its checks is reported and the rows are used instead: they are
    /// the truth, the checkpoint only a faster way to it.
    pub(super) fn load_engine(
        &self,
        generation: &loggen::LogGeneration,
    ) -> anyhow::Result<(Engine, i64)> {
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
            Ok(Some(stored)) => {
                match crate::checkpointer::load(&self.rt, &self.bulk_pool, &stored, state.hash_seed)
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
                        metrics::counter!("sequencer_checkpoint_load_failures_total", "partition" => crate::status::partition_label(self.config.partition)).increment(1);
                        tracing::error!(
                            error = format!("{e:#}"),
                            checkpoint_batch_seq = stored.batch_seq,
                            "checkpoint refused; loading the state from the rows instead (slower)"
                        );
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                metrics::counter!("sequencer_checkpoint_load_failures_total", "partition" => crate::status::partition_label(self.config.partition)).increment(1);
                tracing::error!(error = %e, "checkpoint unreadable; loading the state from the rows instead (slower)");
            }
        }
        let (state, restorer) = self.rt.block_on(snapshot::stream_rows(
            &self.bulk_pool,
            |state, skus| {
                Ok(Restorer::new(
                    state.hash_seed,
                    state.batch_seq,
                    state.clock_ms,
                    skus,
                )?)
            },
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
    pub(super) fn check_log(
        &self,
        consumer_config: &rdkafka::ClientConfig,
        generation: loggen::LogGeneration,
        next_offset: i64,
    ) -> anyhow::Result<LogIdentity> {
        let now = self.rt.block_on(loggen::current(&self.pool))?;
        if now.generation != generation.generation {
            bail!("the requests log was rebased while the state was loading; loading again");
        }
        let mut identity = LogIdentity::of(
            &generation,
            &self.config.requests_topic,
            self.config.partition,
        );
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
    pub(super) fn wait_for_rebase(&self, lost: LogLost) -> anyhow::Result<()> {
        self.status.role.store(ROLE_LOG_LOST, Ordering::Relaxed);
        *self.status.log_lost.lock().expect("status lock") = Some(lost.message.clone());
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
    pub(super) fn log_whole_again(&self, generation: loggen::LogGeneration) -> bool {
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
        let identity = LogIdentity::of(
            &generation,
            &self.config.requests_topic,
            self.config.partition,
        );
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
}
