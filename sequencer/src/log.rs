//! Reading the requests log: one partition, assigned explicitly at the offset Postgres says is
//! next. Kafka consumer-group offsets are never read or committed: Postgres is the only record of
//! what has been decided.
//!
//! A reader thread polls the broker and hands raw messages to the decide loop through a bounded
//! channel, so a slow commit pushes back on fetching instead of growing memory.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
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

/// Messages buffered between the reader and the decide loop. About 1 s of the target load:
/// enough to keep batches full, small enough that a crash loses no more than re-reading it.
pub const READ_AHEAD_MESSAGES_MAX: usize = 32_768;
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How far before a target offset reading starts. Some brokers (tansu 0.6 with memory storage,
/// seen here) return nothing for a fetch that starts inside a record batch, instead of the batch
/// for the client to filter; starting earlier makes the batch that holds the target arrive. It
/// must cover one producer batch (librdkafka's `batch.num.messages` is 10,000 by default). On a
/// broker that behaves it only costs reading and discarding a few thousand small messages.
const MID_BATCH_LOOKBACK: i64 = 16_384;

pub enum LogEvent {
    Message {
        offset: i64,
        payload: Vec<u8>,
        /// The message's CreateTime (stamped by the ingress's producer), if the broker kept one.
        created_ms: Option<i64>,
    },
    /// The reader cannot go on; the decide loop must stop with this explanation.
    Fatal(String),
}

pub fn consumer_config(brokers: &str, node_id: &str, fetch_wait_max_ms: u64) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        // librdkafka leaves Nagle on by default: small requests then wait for delayed ACKs
        // (tens of ms on loopback). Every hop here is latency-critical.
        .set("socket.nagle.disable", "true")
        // Required by librdkafka even though no group protocol is used (assign, never subscribe).
        .set("group.id", format!("flash-sequencer-{node_id}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Never jump silently to the start or end of the log.
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", fetch_wait_max_ms.to_string())
        .set("fetch.min.bytes", "1")
        .set("queued.max.messages.kbytes", "65536")
        .set("enable.partition.eof", "false");
    config
}

/// The low and high watermarks of partition 0, with a clear error when the topic is missing.
pub fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<(i64, i64)> {
    consumer
        .fetch_watermarks(topic, 0, timeout)
        .with_context(|| {
            format!("reading the log end of topic {topic:?} (does it exist? is the broker up?)")
        })
}

/// The log does not hold the next offset to decide: a condition no retry can fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LogGap(pub String);

/// Refuses to start when the log does not hold every offset Postgres has decided: the topic was
/// recreated, truncated or expired. Skipping or re-deciding silently would break exactly-once.
///
/// The proof is reading the last decided message itself (offset `next_offset - 1`), not the
/// broker's reported high watermark, which some brokers report per record batch rather than per
/// record. Broker trouble (nothing answers) is an ordinary error the caller retries; only a log
/// that answers "no such offset" is a [`LogGap`].
pub fn check_log_covers(
    config: &ClientConfig,
    topic: &str,
    next_offset: i64,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = config.create().context("creating the log check consumer")?;
    let (low, high) = watermarks(&consumer, topic, Duration::from_secs(10))?;
    if low > next_offset {
        return Err(LogGap(format!(
            "topic {topic:?} starts at offset {low}, but offsets from {next_offset} were never \
             decided: retention deleted requests before they were sequenced. Refusing to skip them."
        ))
        .into());
    }
    if next_offset == 0 {
        return Ok(());
    }
    let last_decided = next_offset - 1;
    let mut assignment = TopicPartitionList::new();
    let start = (last_decided - MID_BATCH_LOOKBACK).max(low);
    assignment.add_partition_offset(topic, 0, Offset::Offset(start))?;
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last_seen: Option<i64> = None;
    while std::time::Instant::now() < deadline {
        match consumer.poll(POLL_TIMEOUT) {
            Some(Ok(m)) if m.offset() >= last_decided => return Ok(()),
            Some(Ok(m)) => last_seen = Some(m.offset()),
            None => continue,
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange))) => {
                return Err(LogGap(format!(
                    "topic {topic:?} has no offset {last_decided} (it ends near {high}), but \
                     Postgres has already decided every offset below {next_offset}. The log was \
                     recreated or truncated (a broker with memory storage loses its topics when \
                     restarted). Refusing to skip or re-decide anything. To start a new sale log, \
                     reset the database as well (scripts/down --wipe); to resume, restore the \
                     topic's data."
                ))
                .into())
            }
            Some(Err(e)) => tracing::warn!(error = %e, "log check: consumer error"),
        }
    }
    if let Some(seen) = last_seen {
        // The log answered, and it ends before what Postgres has decided.
        return Err(LogGap(format!(
            "topic {topic:?} ends at offset {seen}, but Postgres has already decided every offset \
             below {next_offset}. The log was recreated or truncated. Refusing to skip or \
             re-decide anything (scripts/down --wipe resets a test stack)."
        ))
        .into());
    }
    anyhow::bail!(
        "could not read offset {last_decided} of {topic:?} within 10 s (broker unreachable?)"
    )
}

pub struct LogReader {
    pub events: Receiver<LogEvent>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
    watcher: Option<thread::JoinHandle<()>>,
}

impl LogReader {
    /// Starts reading `topic` partition 0 at `from_offset`. `log_end` is kept up to date with the
    /// high watermark so the runtime can report lag cheaply.
    pub fn start(
        config: &ClientConfig,
        topic: &str,
        from_offset: i64,
        log_end: Arc<AtomicI64>,
    ) -> anyhow::Result<LogReader> {
        let consumer: BaseConsumer = config.create().context("creating the requests consumer")?;
        let (low, _) = watermarks(&consumer, topic, Duration::from_secs(10))?;
        let mut assignment = TopicPartitionList::new();
        let start = (from_offset - MID_BATCH_LOOKBACK).max(low).min(from_offset);
        assignment.add_partition_offset(topic, 0, Offset::Offset(start))?;
        consumer.assign(&assignment)?;
        let (tx, rx) = crossbeam_channel::bounded(READ_AHEAD_MESSAGES_MAX);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_reader = stop.clone();
        let reader_topic = topic.to_owned();
        let reader_end = log_end.clone();
        let handle = thread::Builder::new()
            .name("log-reader".into())
            .spawn(move || {
                read_loop(
                    consumer,
                    &reader_topic,
                    from_offset,
                    tx,
                    &stop_reader,
                    &reader_end,
                )
            })?;
        // The log end is a synchronous broker round trip (about 10 ms on some brokers): asking it
        // from the reader thread would stall reading, so a second consumer asks it on its own.
        let watcher: BaseConsumer = config.create().context("creating the log-end consumer")?;
        let (stop_watcher, watcher_topic) = (stop.clone(), topic.to_owned());
        let watcher = thread::Builder::new()
            .name("log-end".into())
            .spawn(move || watch_log_end(watcher, &watcher_topic, &stop_watcher, &log_end))?;
        Ok(LogReader {
            events: rx,
            stop,
            handle: Some(handle),
            watcher: Some(watcher),
        })
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

/// Hands on every message from `from_offset` on, in order and without a hole: messages before
/// it (the lookback) are dropped, and an offset that jumps ahead is a fatal gap, never a skip.
fn read_loop(
    consumer: BaseConsumer,
    topic: &str,
    from_offset: i64,
    tx: Sender<LogEvent>,
    stop: &AtomicBool,
    log_end: &AtomicI64,
) {
    let mut expected = from_offset;
    while !stop.load(Ordering::Relaxed) {
        let event = match consumer.poll(POLL_TIMEOUT) {
            None => continue,
            Some(Ok(m)) if m.offset() < expected => continue,
            Some(Ok(m)) if m.offset() > expected => LogEvent::Fatal(format!(
                "the broker delivered offset {} of {topic:?} where {expected} was expected: \
                 offsets {expected}..{} are missing from what it served. Refusing to skip them \
                 (the requests topic must be neither compacted nor written transactionally)",
                m.offset(),
                m.offset()
            )),
            Some(Ok(m)) => {
                expected += 1;
                log_end.fetch_max(m.offset() + 1, Ordering::Relaxed);
                LogEvent::Message {
                    offset: m.offset(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    created_ms: m.timestamp().to_millis(),
                }
            }
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange))) => {
                LogEvent::Fatal(format!(
                    "the broker says the next offset of {topic:?} is out of range: the log was \
                     truncated or recreated under a running sequencer"
                ))
            }
            Some(Err(e)) => {
                // Transient broker trouble: librdkafka retries by itself; keep polling.
                tracing::warn!(error = %e, "requests consumer error");
                continue;
            }
        };
        let fatal = matches!(event, LogEvent::Fatal(_));
        // Blocks while the decide loop is behind: back-pressure, bounded memory.
        if !offer(&tx, event, stop) || fatal {
            return;
        }
    }
}

/// How often the log end (for the lag figure) is asked of the broker.
const LOG_END_POLL: Duration = Duration::from_millis(500);

fn watch_log_end(consumer: BaseConsumer, topic: &str, stop: &AtomicBool, log_end: &AtomicI64) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, high)) = consumer.fetch_watermarks(topic, 0, Duration::from_millis(500)) {
            log_end.fetch_max(high, Ordering::Relaxed);
        }
        thread::sleep(LOG_END_POLL);
    }
}

/// Keeps offering `event` until it is taken (true) or the reader must stop (false).
fn offer(tx: &Sender<LogEvent>, mut event: LogEvent, stop: &AtomicBool) -> bool {
    loop {
        match tx.send_timeout(event, POLL_TIMEOUT) {
            Ok(()) => return true,
            Err(crossbeam_channel::SendTimeoutError::Timeout(e)) => {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                event = e;
            }
            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return false,
        }
    }
}
