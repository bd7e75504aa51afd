//! Reading the requests log: one partition, assigned explicitly at the offset Postgres says is
//! next. Kafka consumer-group offsets are never read or committed: Postgres is the only record of
//! what has been decided.
//!
//! A reader thread polls the broker and hands raw messages to the decide loop through a bounded
//! channel, so a slow commit pushes back on fetching instead of growing memory.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::topic::{self, TopicState};

/// Messages buffered between the reader and the decide loop. About 1 s of the target load:
/// enough to keep batches full, small enough that a crash loses no more than re-reading it.
pub const READ_AHEAD_MESSAGES_MAX: usize = 32_768;
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How far before a target offset reading starts. Apache Kafka answers a fetch that starts
/// inside a record batch with the whole batch and the client drops the records before the
/// target, so there this costs reading and discarding up to this many small messages once per
/// (re)start (a few ms). It stays because not every Kafka-API broker does that: tansu 0.6 with
/// memory storage (`BROKER=tansu`) returns nothing for such a fetch, and the reader would wait
/// for ever. It must cover one producer record batch (librdkafka's `batch.num.messages` is
/// 10,000 by default). Correct on any broker: offsets below the target are never handed on.
const MID_BATCH_LOOKBACK: i64 = 16_384;

/// When the log reader thread of each partition last made progress (a poll returned, or it
/// handed a message on or waited on a full channel), unix ms; 0 = no reader running. One reader
/// per partition and process at a time.
static READER_ALIVE_MS: [AtomicI64; wire::partition::PARTITIONS_MAX as usize] =
    [const { AtomicI64::new(0) }; wire::partition::PARTITIONS_MAX as usize];

/// When partition `partition`'s reader last made progress (0: none running).
pub fn reader_alive_ms(partition: i32) -> i64 {
    READER_ALIVE_MS[partition as usize].load(Ordering::Relaxed)
}

/// A reader that has made no progress for this long is stalled (stopped, or stuck in a call):
/// the sequencer is then not ready. Fifty poll timeouts: never reached by a healthy reader, even
/// while the broker is away (a poll still returns every POLL_TIMEOUT then).
pub const READER_STALL_MAX_MS: i64 = 5_000;

/// How long the reader has made no progress, when that is more than [`READER_STALL_MAX_MS`].
pub fn reader_stalled_for(now_ms: i64, alive_ms: i64) -> Option<i64> {
    let age = now_ms - alive_ms;
    (alive_ms == 0 || age > READER_STALL_MAX_MS).then_some(age)
}

/// Exits the process (code 1: a restart fixes it) once a log reader has made no progress for
/// more than `exit_ms`: a stuck reader holds no lock, but a leader whose reader is stuck keeps
/// its lease and decides nothing, so only its exit lets a standby take over.
pub async fn exit_when_reader_stalls(exit_ms: i64) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = crate::clock::now_ms();
        let stalled = READER_ALIVE_MS
            .iter()
            .enumerate()
            .find_map(|(partition, alive)| {
                let alive = alive.load(Ordering::Relaxed);
                // 0: no reader running.
                let ms = (alive != 0)
                    .then(|| reader_stalled_for(now, alive))
                    .flatten()?;
                (ms > exit_ms).then_some((partition, ms))
            });
        if let Some((partition, ms)) = stalled {
            tracing::error!(
                partition,
                stalled_ms = ms,
                "the log reader has made no progress for {ms} ms (READER_STALL_EXIT_MS \
                 {exit_ms}): exiting with code 1 so that a standby takes over"
            );
            std::process::exit(1);
        }
    }
}

/// Drill knob `FAULT_READER_STALL_AT_OFFSET`: the reader hangs before it reads this offset, as
/// one stuck in a call would (no progress, no error), until the process stops.
fn stall_at_offset() -> Option<i64> {
    std::env::var("FAULT_READER_STALL_AT_OFFSET")
        .ok()
        .and_then(|v| v.parse().ok())
}

fn reader_alive(partition: i32) {
    READER_ALIVE_MS[partition as usize].store(crate::clock::now_ms(), Ordering::Relaxed);
}

/// Clears [`READER_ALIVE_MS`] when the reader thread ends (the log found lost, or the reader
/// stopped for a role change or a reload): no reader running is not a stalled reader, and a
/// sequencer waiting for `rebase-log` or loading its state must not be made to exit.
struct ReaderGone(i32);

impl Drop for ReaderGone {
    fn drop(&mut self) {
        READER_ALIVE_MS[self.0 as usize].store(0, Ordering::Relaxed);
    }
}

/// What the operator is told whenever the log is found lost.
pub const RECOVERY_HINT: &str = "Every decision committed so far is safe in Postgres, and nothing \
    will be decided from this log. To go on with the requests log as it is now, run `sequencer \
    rebase-log` (docs/OPERATIONS.md, \"Lost requests log\"); the sequencers pick the new log \
    generation up by themselves. To resume the old log instead, restore the broker's data of \
    that topic.";

pub enum LogEvent {
    Message {
        offset: i64,
        payload: Vec<u8>,
        /// The message's CreateTime (stamped by the ingress's producer), if the broker kept one.
        created_ms: Option<i64>,
    },
    /// The log no longer holds what it must (see [`LogLost`]): the reader has stopped and the
    /// decide loop must stop with this explanation.
    Lost(String),
}

/// The requests log of one generation as Postgres records it (`log_generations`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogIdentity {
    pub generation: i64,
    pub topic: String,
    /// The topic id recorded for this generation (`None`: not recorded, or a broker without ids).
    pub topic_id: Option<String>,
    /// The first offset decided in this generation.
    pub base_offset: i64,
    /// The partition of the topic this database's writer decides.
    pub partition: i32,
}

impl LogIdentity {
    /// The log of `generation` as recorded, or the configured topic when none is recorded yet.
    pub fn of(
        generation: &persistence::loggen::LogGeneration,
        configured_topic: &str,
        partition: i32,
    ) -> LogIdentity {
        LogIdentity {
            generation: generation.generation,
            topic: generation
                .topic
                .clone()
                .unwrap_or_else(|| configured_topic.to_owned()),
            topic_id: generation.topic_id.clone(),
            base_offset: generation.base_offset,
            partition,
        }
    }
}

pub fn consumer_config(brokers: &str, node_id: &str, fetch_wait_max_ms: u64) -> ClientConfig {
    kafka_config::requests_reader(
        brokers,
        format!("flash-sequencer-{node_id}"),
        fetch_wait_max_ms,
    )
}

/// The low and high watermarks of the identity's partition, with a clear error when the topic
/// or the partition is missing.
pub fn watermarks(
    consumer: &BaseConsumer,
    identity: &LogIdentity,
    timeout: Duration,
) -> anyhow::Result<(i64, i64)> {
    let (topic, partition) = (identity.topic.as_str(), identity.partition);
    consumer
        .fetch_watermarks(topic, partition, timeout)
        .with_context(|| {
            format!(
                "reading the log end of topic {topic:?} partition {partition} (does it exist \
                 with REQUEST_PARTITIONS partitions? is the broker up?)"
            )
        })
}

/// The requests log no longer holds what Postgres has decided, or is not the log Postgres's
/// offsets refer to: the topic was deleted or recreated, truncated, or expired before being
/// read. No retry can fix it, and going on would skip or re-decide requests. The sequencer stops
/// deciding (exit code 4, or it waits, not ready, for `sequencer rebase-log`).
#[derive(Debug, thiserror::Error)]
#[error("requests log lost (generation {generation}): {message}")]
pub struct LogLost {
    pub generation: i64,
    pub message: String,
}

fn lost(identity: &LogIdentity, message: String) -> anyhow::Error {
    LogLost {
        generation: identity.generation,
        message,
    }
    .into()
}

/// Librdkafka's answers that mean "the broker does not have this offset". With
/// `auto.offset.reset=error` an out-of-range fetch or a detected truncation arrives as
/// `AutoOffsetReset`, after which librdkafka stops fetching the partition.
fn is_offset_lost(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::OffsetOutOfRange
            | RDKafkaErrorCode::AutoOffsetReset
            | RDKafkaErrorCode::LogTruncation
    )
}

fn is_topic_unknown(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownTopicId
            | RDKafkaErrorCode::UnknownPartition
    )
}

/// Whether the topic is still the one `identity` names: `Some(why)` when it is gone or another
/// topic now has its name. Asked twice, a moment apart, before saying "gone", so one odd answer
/// from a broker that is just starting cannot stop the sale. Broker trouble is `None` (unknown).
fn topic_replaced<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    identity: &LogIdentity,
) -> Option<String> {
    let topic = &identity.topic;
    for attempt in 0..2 {
        let state = topic::describe(client, topic, Duration::from_secs(2)).ok()?;
        match (state, &identity.topic_id) {
            (TopicState::Missing, _) if attempt == 0 => thread::sleep(Duration::from_millis(300)),
            (TopicState::Missing, _) => {
                return Some(format!("topic {topic:?} no longer exists (it was deleted)"))
            }
            (TopicState::Exists { id: Some(now) }, Some(was)) if now != *was => {
                return Some(format!(
                    "topic {topic:?} was deleted and created again: its topic id is {now}, \
                     but the offsets in Postgres refer to the topic with id {was}"
                ))
            }
            _ => return None,
        }
    }
    None
}

/// Refuses to start when the log does not hold every offset Postgres has decided in this
/// generation, or is not the topic they refer to. Returns the topic id the broker reports, for
/// the caller to record. Broker trouble (nothing answers) is an ordinary error the caller
/// retries; only a definitive answer is a [`LogLost`].
///
/// The checks, in order: the topic exists and has the recorded topic id (a recreated topic has
/// another); its first offset is at most `next_offset` (nothing undecided was deleted); its end
/// is at least `next_offset` (on brokers that report topic ids, whose high watermark is exact);
/// and the last decided message (`next_offset - 1`) can be read back: the proof on any broker,
/// including those that report the high watermark per record batch.
pub fn check_log(
    config: &ClientConfig,
    identity: &LogIdentity,
    next_offset: i64,
) -> anyhow::Result<Option<String>> {
    let topic = identity.topic.as_str();
    let consumer: BaseConsumer = config.create().context("creating the log check consumer")?;
    let decided_here = next_offset > identity.base_offset;
    let described = topic::describe(consumer.client(), topic, Duration::from_secs(10))
        .unwrap_or_else(|e| {
            // A broker without DescribeTopics, or one not answering: go on without the topic id
            // (the watermarks below fail if nothing answers; the watcher asks again later).
            tracing::warn!(error = %e, "could not describe topic {topic:?}; checking without its topic id");
            TopicState::Exists { id: None }
        });
    let topic_id = match described {
        TopicState::Missing if identity.topic_id.is_some() || decided_here => {
            return Err(lost(
                identity,
                format!(
                    "topic {topic:?} does not exist, but Postgres has decided its offsets \
                     {}..{next_offset}. {RECOVERY_HINT}",
                    identity.base_offset
                ),
            ))
        }
        TopicState::Missing => {
            anyhow::bail!(
                "topic {topic:?} does not exist (yet?): create it (sequencer create-topics)"
            )
        }
        TopicState::Exists { id } => id,
    };
    if let (Some(now), Some(was)) = (&topic_id, &identity.topic_id) {
        if now != was {
            return Err(lost(
                identity,
                format!(
                    "topic {topic:?} is not the log Postgres's offsets refer to: it was deleted \
                     and created again (topic id {now}, recorded {was}). {RECOVERY_HINT}"
                ),
            ));
        }
    }
    let (low, high) = watermarks(&consumer, identity, Duration::from_secs(10))?;
    if low > next_offset {
        return Err(lost(
            identity,
            format!(
                "topic {topic:?} starts at offset {low}, but offsets from {next_offset} were never \
                 decided: retention or a record deletion removed requests before they were \
                 sequenced. Refusing to skip them. {RECOVERY_HINT}"
            ),
        ));
    }
    if high < next_offset && topic_id.is_some() {
        return Err(lost(
            identity,
            format!(
                "topic {topic:?} ends at offset {high}, but Postgres has already decided every \
                 offset below {next_offset}: the log lost messages (truncated, or the broker lost \
                 its data). {RECOVERY_HINT}"
            ),
        ));
    }
    if !decided_here {
        return Ok(topic_id);
    }
    let last_decided = next_offset - 1;
    let mut assignment = TopicPartitionList::new();
    let start = (last_decided - MID_BATCH_LOOKBACK).max(low);
    assignment.add_partition_offset(topic, identity.partition, Offset::Offset(start))?;
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last_seen: Option<i64> = None;
    while std::time::Instant::now() < deadline {
        match consumer.poll(POLL_TIMEOUT) {
            Some(Ok(m)) if m.offset() >= last_decided => return Ok(topic_id),
            Some(Ok(m)) => last_seen = Some(m.offset()),
            None => continue,
            Some(Err(KafkaError::MessageConsumption(code))) if is_offset_lost(code) => {
                return Err(lost(
                    identity,
                    format!(
                        "topic {topic:?} has no offset {last_decided} (the broker answered \
                         {code}; the log ends near {high}), but Postgres has already decided \
                         every offset below {next_offset}. The log was recreated or truncated. \
                         Refusing to skip or re-decide anything. {RECOVERY_HINT}"
                    ),
                ))
            }
            Some(Err(e)) => tracing::warn!(error = %e, "log check: consumer error"),
        }
    }
    if let Some(seen) = last_seen {
        // The log answered, and it ends before what Postgres has decided.
        return Err(lost(
            identity,
            format!(
                "topic {topic:?} ends at offset {seen}, but Postgres has already decided every \
                 offset below {next_offset}. The log was recreated or truncated. Refusing to \
                 skip or re-decide anything. {RECOVERY_HINT}"
            ),
        ));
    }
    anyhow::bail!(
        "could not read offset {last_decided} of {topic:?} within 10 s (broker unreachable?)"
    )
}

pub struct LogReader {
    pub events: Receiver<LogEvent>,
    /// Set once, by the reader or the watcher, when the log is found lost; the decide loop and
    /// the replay check it before every commit and every batch they apply.
    lost: Arc<OnceLock<String>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
    watcher: Option<thread::JoinHandle<()>>,
}

impl LogReader {
    /// Starts reading the log of `identity` (its partition) at `from_offset`. `log_end` is kept
    /// up to date with the high watermark so the runtime can report lag cheaply.
    pub fn start(
        config: &ClientConfig,
        identity: &LogIdentity,
        from_offset: i64,
        log_end: Arc<AtomicI64>,
    ) -> anyhow::Result<LogReader> {
        let topic = identity.topic.as_str();
        let consumer: BaseConsumer = config.create().context("creating the requests consumer")?;
        let (low, high) = watermarks(&consumer, identity, Duration::from_secs(10))?;
        // A new reader may follow a rebased log: the end of the old one means nothing here.
        log_end.store(high, Ordering::Relaxed);
        reader_alive(identity.partition);
        let mut assignment = TopicPartitionList::new();
        let start = (from_offset - MID_BATCH_LOOKBACK).max(low).min(from_offset);
        assignment.add_partition_offset(topic, identity.partition, Offset::Offset(start))?;
        consumer.assign(&assignment)?;
        let (tx, rx) = crossbeam_channel::bounded(READ_AHEAD_MESSAGES_MAX);
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(OnceLock::new());
        let reader = Reader {
            identity: identity.clone(),
            stop: stop.clone(),
            lost: lost.clone(),
            log_end: log_end.clone(),
        };
        let handle = thread::Builder::new()
            .name("log-reader".into())
            .spawn(move || reader.read_loop(consumer, from_offset, tx))?;
        // The log end is a synchronous broker round trip (about 10 ms on some brokers): asking it
        // from the reader thread would stall reading, so a second consumer asks it on its own,
        // and checks that the topic is still the one Postgres's offsets refer to.
        let consumer: BaseConsumer = config.create().context("creating the log-end consumer")?;
        let watcher = Reader {
            identity: identity.clone(),
            stop: stop.clone(),
            lost: lost.clone(),
            log_end,
        };
        let watcher = thread::Builder::new()
            .name("log-end".into())
            .spawn(move || watcher.watch(consumer))?;
        Ok(LogReader {
            events: rx,
            lost,
            stop,
            handle: Some(handle),
            watcher: Some(watcher),
        })
    }

    /// Why the log is lost, once the reader or the watcher has found it so.
    pub fn lost(&self) -> Option<&str> {
        self.lost.get().map(String::as_str)
    }
}

impl Drop for LogReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock a reader stuck on a full channel.
        while self.events.try_recv().is_ok() {}
        for h in [self.handle.take(), self.watcher.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
    }
}

/// What the reader and the watcher threads share.
struct Reader {
    identity: LogIdentity,
    stop: Arc<AtomicBool>,
    lost: Arc<OnceLock<String>>,
    log_end: Arc<AtomicI64>,
}

/// How often the watcher asks the log end (for the lag figure) and the topic id.
const WATCH_EVERY: Duration = Duration::from_millis(500);

impl Reader {
    fn set_lost(&self, why: String) -> String {
        let why = format!("{why}. {RECOVERY_HINT}");
        tracing::error!(
            generation = self.identity.generation,
            topic = %self.identity.topic,
            "requests log lost: {why}"
        );
        self.lost.get_or_init(|| why).clone()
    }

    /// Hands on every message from `from_offset` on, in order and without a hole: messages
    /// before it (the lookback) are dropped; an offset that jumps ahead, an offset the broker no
    /// longer has, or a topic that was deleted or replaced stops the reader with
    /// [`LogEvent::Lost`], never a skip.
    fn read_loop(&self, consumer: BaseConsumer, from_offset: i64, tx: Sender<LogEvent>) {
        let _gone = ReaderGone(self.identity.partition);
        let topic = self.identity.topic.as_str();
        let mut expected = from_offset;
        let stall_at = stall_at_offset();
        while !self.stop.load(Ordering::Relaxed) {
            if stall_at.is_some_and(|at| expected >= at) {
                tracing::warn!(
                    offset = expected,
                    "FAULT_READER_STALL_AT_OFFSET: the reader hangs"
                );
                while !self.stop.load(Ordering::Relaxed) {
                    thread::sleep(POLL_TIMEOUT);
                }
                return;
            }
            if let Some(why) = self.lost.get() {
                // The watcher found it first.
                let _ = self.offer(&tx, LogEvent::Lost(why.clone()));
                return;
            }
            let polled = consumer.poll(POLL_TIMEOUT);
            reader_alive(self.identity.partition);
            let event = match polled {
                None => continue,
                Some(Ok(m)) if m.offset() < expected => continue,
                Some(Ok(m)) if m.offset() > expected => LogEvent::Lost(self.set_lost(format!(
                    "the broker delivered offset {} of {topic:?} where {expected} was expected: \
                     offsets {expected}..{} are missing from what it served. Refusing to skip \
                     them (the requests topic must be neither compacted nor written \
                     transactionally)",
                    m.offset(),
                    m.offset()
                ))),
                Some(Ok(m)) => {
                    expected += 1;
                    self.log_end.fetch_max(m.offset() + 1, Ordering::Relaxed);
                    LogEvent::Message {
                        offset: m.offset(),
                        payload: m.payload().unwrap_or_default().to_vec(),
                        created_ms: m.timestamp().to_millis(),
                    }
                }
                Some(Err(KafkaError::MessageConsumption(code))) if is_offset_lost(code) => {
                    LogEvent::Lost(self.set_lost(format!(
                        "the broker no longer has offset {expected} of {topic:?} ({code}): the \
                         log was truncated, expired or recreated under a running sequencer"
                    )))
                }
                Some(Err(KafkaError::MessageConsumption(code))) if is_topic_unknown(code) => {
                    match topic_replaced(consumer.client(), &self.identity) {
                        Some(why) => LogEvent::Lost(self.set_lost(why)),
                        None => {
                            tracing::warn!(%code, "requests consumer: topic not known right now");
                            continue;
                        }
                    }
                }
                Some(Err(e)) => {
                    // Transient broker trouble (a restart, a connection lost): librdkafka
                    // reconnects and fetches again from the same offset by itself.
                    tracing::warn!(error = %e, "requests consumer error");
                    continue;
                }
            };
            let lost = matches!(event, LogEvent::Lost(_));
            // Blocks while the decide loop is behind: back-pressure, bounded memory.
            if !self.offer(&tx, event) || lost {
                return;
            }
        }
    }

    /// Keeps offering `event` until it is taken (true) or the reader must stop (false).
    fn offer(&self, tx: &Sender<LogEvent>, mut event: LogEvent) -> bool {
        loop {
            match tx.send_timeout(event, POLL_TIMEOUT) {
                Ok(()) => return true,
                Err(crossbeam_channel::SendTimeoutError::Timeout(e)) => {
                    // Waiting for the decide loop (back-pressure) is not a stalled reader.
                    reader_alive(self.identity.partition);
                    if self.stop.load(Ordering::Relaxed) {
                        return false;
                    }
                    event = e;
                }
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return false,
            }
        }
    }

    /// Every [`WATCH_EVERY`]: the log end for the lag figure, and whether the topic is still the
    /// one Postgres's offsets refer to (librdkafka keeps fetching the same offsets from a topic
    /// created again under the same name, so only its topic id tells).
    fn watch(&self, consumer: BaseConsumer) {
        let topic = self.identity.topic.as_str();
        while !self.stop.load(Ordering::Relaxed) && self.lost.get().is_none() {
            if let Ok((_, high)) = consumer.fetch_watermarks(
                topic,
                self.identity.partition,
                Duration::from_millis(500),
            ) {
                self.log_end.fetch_max(high, Ordering::Relaxed);
            }
            if let Some(why) = topic_replaced(consumer.client(), &self.identity) {
                self.set_lost(why);
                return;
            }
            thread::sleep(WATCH_EVERY);
        }
    }
}

#[cfg(test)]
mod reader_stall_tests {
    use super::*;

    #[test]
    fn a_reader_without_progress_for_the_bound_is_stalled() {
        let now = 1_000_000;
        assert_eq!(reader_stalled_for(now, now - 100), None);
        assert_eq!(reader_stalled_for(now, now - READER_STALL_MAX_MS), None);
        assert_eq!(
            reader_stalled_for(now, now - READER_STALL_MAX_MS - 1),
            Some(READER_STALL_MAX_MS + 1)
        );
        assert!(reader_stalled_for(now, 0).is_some(), "no reader started");
    }
}
