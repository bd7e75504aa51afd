//! The ingress's side of Kafka: append a request, then wait for its outcome.
//!
//! Requests go to the requests topic through an idempotent producer (acks=all). Every ingress
//! reads the whole outcomes topic from the offset that was its end at start-up, but decodes only
//! the messages keyed with its own id; each reply completes the waiting HTTP request, if any.
//! The producer's delivery report (the append's offset) and the reply meet in `pending.rs`, so
//! a request's task is woken once.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use wire::{IngressId, Outcome, OutcomeBatch, Request, RequestId, StockUpdate};

use crate::metrics::HopTimers;
use crate::pending::{Pending, Reply};
use crate::producer::{self, AppendHealth, Delivery, ProducerSlot};
use crate::stock::StockFeed;

/// Why a request got no decided outcome.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Definitely not appended (local queue full): safe to answer 503.
    #[error("the producer queue is full")]
    Overloaded,
    /// Appended or maybe appended, but no outcome arrived in time: answer 504, retry is safe.
    #[error("no outcome within the timeout: {0}")]
    Unknown(String),
    /// Appended at `offset` (acknowledged), but no outcome arrived in time: 504, and a ticket.
    #[error("no outcome within the timeout: {detail}")]
    Late { offset: i64, detail: String },
}

pub struct Bus {
    pub ingress_id: IngressId,
    producer: Arc<ProducerSlot>,
    requests_topic: String,
    /// The requests topic's partition count: each request goes to its partition
    /// (`wire::partition::of_command`).
    pub partitions: u32,
    pending: Arc<Pending>,
    outcome_timeout: Duration,
    pub health: Arc<BusHealth>,
    /// The newest committed counters per SKU, for the live stock streams.
    pub stock: Arc<StockFeed>,
}

#[derive(Default)]
pub struct BusHealth {
    /// The outcomes reader has its start offset and is polling.
    pub listening: AtomicBool,
    pub outcome_messages: AtomicU64,
    pub replies_delivered: AtomicU64,
    pub replies_unclaimed: AtomicU64,
    pub last_poll_ms: AtomicI64,
}

impl Bus {
    pub fn start(
        log: &kafka_config::LogArgs,
        outcome_timeout: Duration,
        fetch_wait_max_ms: u64,
        produce_linger_ms: u64,
        hops: HopTimers,
    ) -> anyhow::Result<Bus> {
        let (brokers, requests_topic, outcomes_topic) = (
            &log.brokers[..],
            &log.requests_topic[..],
            &log.outcomes_topic[..],
        );
        // Never wire::STOCK_UPDATES, the key every ingress reads stock updates under.
        let ingress_id: IngressId = rand_u64().max(1);
        let mut producer_config = kafka_config::idempotent_producer(brokers);
        producer_config
            // Many concurrent requests share a produce request (PRODUCE_LINGER_MS).
            .set("linger.ms", produce_linger_ms.to_string())
            .set("queue.buffering.max.messages", "200000")
            // An append not acknowledged within the outcome timeout fails (504, outcome unknown:
            // it may still be in the log and be decided; a retry with the same key gets that
            // decision). Until then librdkafka retries it through broker restarts, and the
            // idempotent producer keeps the retries from being written twice.
            .set(
                "message.timeout.ms",
                outcome_timeout.as_millis().max(1000).to_string(),
            );
        // Drill knob: the first producer bootstraps from these addresses instead. One where
        // nothing listens makes a producer that never delivers while the broker is fine, the
        // case the watchdog is for; its replacements use BROKERS. Its messages time out only
        // after 10 minutes: like the wedged producer seen after broker restarts, it reports
        // neither a delivery nor a failure, and only the outcome deadline answers the client.
        let first = std::env::var("FAULT_FIRST_PRODUCER_BROKERS").ok().map(|b| {
            let mut c = producer_config.clone();
            c.set("bootstrap.servers", b);
            c.set("message.timeout.ms", "600000");
            c
        });
        let pending = Arc::new(Pending::default());
        let delivery = Delivery {
            pending: pending.clone(),
            health: Arc::new(AppendHealth::default()),
            append_latency: hops.append,
        };
        let slot = Arc::new(ProducerSlot::new(producer_config, first, delivery)?);
        let mut probe_config = kafka_config::base();
        probe_config.set("bootstrap.servers", brokers);
        // Longer than any append may take (the message timeout), so that only a producer that
        // has failed every append for that long is replaced.
        let stuck = outcome_timeout.max(Duration::from_secs(1)) + Duration::from_secs(1);
        tokio::spawn(producer::watch(
            slot.clone(),
            probe_config,
            requests_topic.to_owned(),
            stuck,
        ));
        let health = Arc::new(BusHealth::default());
        let consumer: BaseConsumer = kafka_config::assigned_consumer(
            brokers,
            format!("flash-ingress-{ingress_id:016x}"),
            fetch_wait_max_ms,
            "latest",
        )
        .create()
        .context("creating the outcomes consumer")?;
        // Start exactly at today's end: every outcome for a request sent after this is at or
        // beyond it. (Offset::End would be resolved later, possibly after our first outcome.)
        let (_, high) = consumer
            .fetch_watermarks(outcomes_topic, 0, Duration::from_secs(10))
            .with_context(|| {
                format!("reading the end of topic {outcomes_topic:?}: does it exist?")
            })?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(outcomes_topic, 0, Offset::Offset(high))?;
        consumer.assign(&tpl)?;
        let stock = Arc::new(StockFeed::default());
        let (p, h, outcome_delay, feed) = (
            pending.clone(),
            health.clone(),
            hops.outcome_delay.clone(),
            stock.clone(),
        );
        std::thread::Builder::new()
            .name("outcomes-reader".into())
            .spawn(move || listen(consumer, ingress_id, &p, &h, &outcome_delay, &feed))?;
        tracing::info!(
            ingress_id = format!("{ingress_id:016x}"),
            start_offset = high,
            "outcomes reader started"
        );
        Ok(Bus {
            ingress_id,
            producer: slot,
            requests_topic: requests_topic.to_owned(),
            partitions: log.request_partitions,
            pending,
            outcome_timeout,
            health,
            stock,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Messages handed to librdkafka and not yet acknowledged (or failed) by the broker.
    pub fn producer_queue_depth(&self) -> i32 {
        self.producer.current().in_flight_count()
    }

    /// How many times the watchdog replaced a wedged producer.
    pub fn producer_replacements(&self) -> &AtomicU64 {
        &self.producer.replacements
    }

    /// A handle for probing the broker through the producer's own client.
    pub fn broker_probe(&self) -> BrokerProbe {
        BrokerProbe {
            producer: self.producer.clone(),
            requests_topic: self.requests_topic.clone(),
        }
    }

    /// Appends `request` to the log and waits for its outcome; the outcome and the request's
    /// log offset.
    pub async fn call(&self, request: &Request) -> Result<(Outcome, i64), SendError> {
        match self.send(request, true).await? {
            Reply::Decided { outcome, offset } => Ok((outcome, offset)),
            other => Err(mismatched(other)),
        }
    }

    /// Appends `request` and returns its log offset, without waiting for its outcome (a ticket's
    /// write: `Prefer: respond-async`).
    pub async fn append_only(&self, request: &Request) -> Result<i64, SendError> {
        match self.send(request, false).await? {
            Reply::Appended { offset } => Ok(offset),
            other => Err(mismatched(other)),
        }
    }

    /// Appends `request` and waits, up to the outcome timeout, for what `wants_outcome` asks:
    /// its outcome (after its append), or only its append. One wake-up per request: the
    /// delivery report and the outcome meet in [`Pending`].
    async fn send(&self, request: &Request, wants_outcome: bool) -> Result<Reply, SendError> {
        let id = request.request_id;
        let deadline = tokio::time::Instant::now() + self.outcome_timeout;
        let rx = self.pending.insert(id, wants_outcome);
        // Removed however this future ends: answered, timed out, or dropped because the client
        // went away (the HTTP server drops the handler). Otherwise a waiter whose outcome never
        // comes would hold its IN_FLIGHT_MAX slot for good.
        let _waiting = Waiting {
            pending: &self.pending,
            id,
        };
        self.append(request)?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Reply::NotAppended { error })) => Err(SendError::Unknown(error)),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(SendError::Unknown("the outcomes reader stopped".into())),
            Err(_) => match self.pending.remove(id) {
                Some(Some(offset)) => Err(SendError::Late {
                    offset,
                    detail: "the sequencer did not answer in time".into(),
                }),
                // A wedged producer may never report a delivery or a failure for the messages
                // it holds: the deadline answers the client, and the watchdog counts it.
                Some(None) => {
                    self.producer.health().failed();
                    Err(SendError::Unknown(APPEND_UNACKNOWLEDGED.into()))
                }
                // Completed between the timeout and the removal: too late to wait for it.
                None => Err(SendError::Unknown("no outcome within the timeout".into())),
            },
        }
    }

    /// Hands `request` to the producer; its delivery report goes to [`Pending`].
    fn append(&self, request: &Request) -> Result<(), SendError> {
        let partition =
            wire::partition::of_command(&request.command, request.request_id, self.partitions)
                .ok_or_else(|| {
                    SendError::Unknown("internal error: a request for no partition".into())
                })?;
        let payload = wire::encode(request);
        let record = BaseRecord::with_opaque_to(&self.requests_topic, Box::new(request.request_id))
            .partition(partition as i32)
            .payload(&payload[..]);
        let record: BaseRecord<'_, (), [u8], Box<RequestId>> = record;
        match self.producer.current().send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::Overloaded)
            }
            Err((e, _)) => {
                self.producer.health().failed();
                Err(SendError::Unknown(format!("append failed: {e}")))
            }
        }
    }
}

/// A reply of the other kind than the waiter asked for: `Pending` never gives one.
fn mismatched(reply: Reply) -> SendError {
    tracing::error!(?reply, "a waiter got a reply of the wrong kind");
    SendError::Unknown("internal error: mismatched reply".into())
}

/// The 504 detail of an append the producer neither acknowledged nor failed in time: it may
/// still reach the log (and be decided), so only a retry with the key tells.
pub const APPEND_UNACKNOWLEDGED: &str =
    "append not acknowledged within the outcome timeout (it may still be appended)";

/// Removes a request from [`Pending`] when dropped.
struct Waiting<'a> {
    pending: &'a Pending,
    id: RequestId,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.pending.remove(self.id);
    }
}

/// Round trips to the broker through the producer's client (so a success proves that the
/// producer itself reaches the partition's leader). Blocking: call from a blocking thread.
#[derive(Clone)]
pub struct BrokerProbe {
    producer: Arc<ProducerSlot>,
    requests_topic: String,
}

impl BrokerProbe {
    /// The requests topic's partition count (`None`: no such topic yet).
    pub fn requests_partitions(&self) -> anyhow::Result<Option<usize>> {
        kafka_config::partition_count(
            self.producer.current().client(),
            &self.requests_topic,
            Duration::from_secs(5),
        )
    }

    /// The end offset of the requests topic's partition `partition`.
    pub fn requests_high_watermark(&self, partition: u32) -> Result<i64, KafkaError> {
        let (_, high) = self.producer.current().client().fetch_watermarks(
            &self.requests_topic,
            partition as i32,
            Duration::from_millis(1_000),
        )?;
        Ok(high)
    }
}

fn listen(
    consumer: BaseConsumer,
    ingress_id: IngressId,
    pending: &Pending,
    health: &BusHealth,
    outcome_delay: &Histogram,
    stock: &StockFeed,
) {
    let my_key = wire::ingress_key(ingress_id);
    let stock_key = wire::ingress_key(wire::STOCK_UPDATES);
    health.listening.store(true, Ordering::Relaxed);
    loop {
        let polled = consumer.poll(Duration::from_millis(100));
        health.last_poll_ms.store(now_ms(), Ordering::Relaxed);
        let message = match polled {
            None => continue,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "outcomes consumer error");
                continue;
            }
        };
        health.outcome_messages.fetch_add(1, Ordering::Relaxed);
        if message.key() == Some(&stock_key[..]) {
            match wire::decode::<StockUpdate>(message.payload().unwrap_or_default()) {
                Ok(update) => stock.publish(update),
                Err(e) => {
                    tracing::error!(offset = message.offset(), error = %e, "undecodable stock update");
                }
            }
            continue;
        }
        if message.key() != Some(&my_key[..]) {
            continue;
        }
        // CreateTime is stamped by the sequencer's producer when it queues the message, right
        // after COMMIT: same-host clocks here; across hosts this includes their clock offset.
        if let Some(created) = message.timestamp().to_millis() {
            outcome_delay.record((now_ms() - created).max(0) as f64 / 1000.0);
        }
        let batch: OutcomeBatch = match wire::decode(message.payload().unwrap_or_default()) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(offset = message.offset(), error = %e, "undecodable outcome message");
                continue;
            }
        };
        for reply in batch.replies {
            // No one waiting: a request that already timed out, or a re-published batch.
            if pending.decided(reply.request_id, reply.outcome) {
                health.replies_delivered.fetch_add(1, Ordering::Relaxed);
            } else {
                health.replies_unclaimed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub use wire::now_ms;

fn rand_u64() -> u64 {
    let b = uuid::Uuid::new_v4().as_u128();
    (b as u64) ^ ((b >> 64) as u64)
}
