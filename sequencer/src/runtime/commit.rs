//! One batch: decide it, commit it in one fenced transaction (retrying what is worth retrying),
//! then hand its outcomes to the publisher.

use super::*;

/// Longest wait between retries of a failed commit.
const COMMIT_BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Sequencer {
    pub(super) fn decide_and_commit(
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
        // Only reached with messages, a due expiry or a due queue; every applied batch must commit, since
        // the engine's batch_seq has moved and the fence expects the next one.
        // The database's time, whatever this host's clock says (clock.rs).
        let out = position.engine.apply_batch(self.clock.now_ms(), &requests);
        let outbox = build_outbox(epoch, &out, &requests);
        let record = batch_record(
            epoch,
            self.config.lease,
            first_offset..next_offset,
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
        crate::status::record_batch(
            self.config.partition,
            &out,
            requests.len(),
            decide,
            started.elapsed(),
        );
        metrics::gauge!("sequencer_queued_requests", "partition" => crate::status::partition_label(self.config.partition)).set(position.engine.queued_len() as f64);
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
    pub(super) fn commit_with_retry(
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
            metrics::counter!("sequencer_commit_retries_total", "partition" => crate::status::partition_label(self.config.partition)).increment(1);
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

fn is_integrity_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code.starts_with("23"))
}

fn batch_record<'a>(
    epoch: u64,
    lease: Duration,
    decided: std::ops::Range<i64>,
    out: &BatchOutput,
    requests: &'a [Request],
    offsets: &[i64],
    outbox: Vec<u8>,
) -> BatchRecord<'a> {
    let reserve = |i: u32, id: RequestId, result: Result<i64, Reject>| {
        let i = i as usize;
        let (sku, user_id, quantity, idempotency_key) = requests[i]
            .command
            .as_reserve()
            .expect("decisions and queued requests come from reserve commands only");
        DecisionRow {
            request: ReserveRef {
                request_id: id,
                user_id,
                idempotency_key,
                sku,
                quantity,
            },
            result,
            request_offset: offsets[i],
        }
    };
    let decisions = out
        .decisions
        .iter()
        .map(|d| reserve(d.command_index, d.request_id, d.result))
        .collect();
    let queued = out
        .queued
        .iter()
        .map(|q| {
            let row = reserve(q.command_index, q.request_id, Err(Reject::SaleNotStarted));
            (row, q.position)
        })
        .collect();
    let released = out
        .released
        .iter()
        .map(|r| (r.request_id, r.result))
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
    let admin_keys = out
        .admin_keys
        .iter()
        .map(|a| {
            let i = a.command_index as usize;
            let Command::Admin {
                idempotency_key, ..
            } = &requests[i].command
            else {
                unreachable!("admin keys come from keyed admin commands only")
            };
            AdminKeyRow {
                idempotency_key,
                command: a.command.clone(),
                outcome: wire::encode(&out.outcomes[i]),
            }
        })
        .collect();
    BatchRecord {
        epoch,
        batch_seq: out.batch_seq,
        first_offset: decided.start,
        next_offset: decided.end,
        batch_time_ms: out.batch_time_ms,
        lease,
        decisions,
        transitions,
        skus: out.skus.clone(),
        admin_keys,
        queued,
        released,
        outbox,
    }
}
