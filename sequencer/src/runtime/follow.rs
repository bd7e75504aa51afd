//! Following: a standby (or a new leader catching up) replays the batches the leader committed,
//! reading the same requests from the log and checking it decides them byte for byte alike.

use super::*;

/// Batches read from Postgres per follow step; bounds memory when a standby is far behind.
const FOLLOW_BATCHES_MAX: i64 = 512;

impl Sequencer {
    /// Replays committed batches after the engine's last one; with `until`, keeps going until
    /// that batch has been applied (takeover), otherwise applies what is there now.
    pub(super) fn follow(&self, position: &mut Position, until: Option<u64>) -> anyhow::Result<()> {
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
    pub(super) fn check_generation(&self, position: &Position) -> anyhow::Result<()> {
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

    pub(super) fn replay(
        &self,
        position: &mut Position,
        header: &BatchHeader,
    ) -> anyhow::Result<()> {
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
        // The replies must be the leader's, byte for byte. The stock update beside them is
        // derived from the same state and left out of the comparison, so that batches written
        // by a version that did not publish one replay alike.
        let replies = |outbox: crate::publish::Outbox| -> Vec<_> {
            outbox
                .messages
                .into_iter()
                .filter(|m| m.ingress_id != wire::STOCK_UPDATES)
                .collect()
        };
        let ours = replies(build_outbox(header.epoch, &out, &requests));
        let leaders = decode_outbox(&header.outbox).map(replies);
        if leaders.as_ref().ok() != Some(&ours) {
            bail!(
                "replaying batch {} did not reproduce the leader's outcomes: this replica diverged",
                header.batch_seq
            );
        }
        position.next_offset = header.next_offset;
        self.publish_position(&position.engine, position.next_offset);
        metrics::counter!("sequencer_replayed_batches_total", "partition" => crate::status::partition_label(self.config.partition)).increment(1);
        Ok(())
    }
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
