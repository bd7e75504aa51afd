//! Publishing outcomes, strictly after the batch has committed (invariant 5).
//!
//! A batch's replies are grouped into one message per ingress, keyed by the ingress id, so each
//! ingress skips other ingresses' messages by key. The same encoded messages are stored in the
//! batch's Postgres row (the outbox) in the commit transaction; a new leader publishes the last
//! few batches again, so an answer lost to a crash between commit and publish still arrives.
//! Ingresses ignore replies they have already delivered, so publishing twice is harmless.

use std::time::Duration;

use anyhow::Context;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use rustc_hash::FxHashMap;
use wire::{IngressId, OutcomeBatch, Reply, Request, StockUpdate};

use engine::BatchOutput;

pub use wire::{Outbox, OutboxMessage};

/// Groups the batch's replies per ingress, plus one [`StockUpdate`] (under
/// [`wire::STOCK_UPDATES`]) when the batch changed SKUs; in ascending ingress id (deterministic).
pub fn build_outbox(epoch: u64, out: &BatchOutput, requests: &[Request]) -> Outbox {
    let mut per_ingress: FxHashMap<IngressId, Vec<Reply>> = FxHashMap::default();
    for (request, outcome) in requests.iter().zip(&out.outcomes) {
        per_ingress
            .entry(request.ingress_id)
            .or_default()
            .push(Reply {
                request_id: request.request_id,
                outcome: outcome.clone(),
            });
    }
    let mut messages: Vec<OutboxMessage> = per_ingress
        .into_iter()
        .map(|(ingress_id, replies)| OutboxMessage {
            ingress_id,
            payload: wire::encode(&OutcomeBatch {
                epoch,
                batch_seq: out.batch_seq,
                batch_time_ms: out.batch_time_ms,
                replies,
            }),
        })
        .collect();
    if !out.skus.is_empty() {
        // For every ingress's live stock streams: the counters this batch changed.
        messages.push(OutboxMessage {
            ingress_id: wire::STOCK_UPDATES,
            payload: wire::encode(&StockUpdate {
                epoch,
                batch_seq: out.batch_seq,
                batch_time_ms: out.batch_time_ms,
                skus: out.skus.clone(),
            }),
        });
    }
    messages.sort_by_key(|m| m.ingress_id);
    Outbox { messages }
}

pub struct DeliveryLogger;

impl ClientContext for DeliveryLogger {}

impl ProducerContext for DeliveryLogger {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        if let Err((e, _)) = result {
            // The decision is durable; the ingress will time out (504, safe to retry) and a
            // retry returns the committed outcome.
            tracing::error!(error = %e, "outcome message not delivered");
        }
    }
}

pub struct Publisher {
    producer: ThreadedProducer<DeliveryLogger>,
    topic: String,
}

/// How long `publish` waits for room in the producer queue before giving up on a message.
const QUEUE_FULL_WAIT_MAX: Duration = Duration::from_secs(5);

impl Publisher {
    pub fn new(brokers: &str, topic: &str) -> anyhow::Result<Publisher> {
        // Through a broker restart librdkafka keeps retrying for message.timeout.ms (5 min by
        // default), reconnecting quickly.
        let producer = kafka_config::idempotent_producer(brokers)
            // Outcomes are latency-critical: a reply waits on this message.
            .set("linger.ms", "1")
            .set("queue.buffering.max.messages", "100000")
            .create_with_context(DeliveryLogger)
            .context("creating the outcomes producer")?;
        Ok(Publisher {
            producer,
            topic: topic.to_owned(),
        })
    }

    pub fn publish(&self, outbox: &Outbox) {
        for m in &outbox.messages {
            let key = wire::ingress_key(m.ingress_id);
            let mut record = BaseRecord::to(&self.topic)
                .key(&key[..])
                .payload(&m.payload[..]);
            let started = std::time::Instant::now();
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if started.elapsed() < QUEUE_FULL_WAIT_MAX =>
                    {
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => {
                        tracing::error!(error = %e, "outcome message not queued");
                        break;
                    }
                }
            }
        }
    }

    /// Waits for queued outcomes to reach the broker (graceful shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "outcomes not all flushed before exit");
        }
    }
}

pub fn decode_outbox(bytes: &[u8]) -> Result<Outbox, wire::WireError> {
    wire::decode(bytes)
}
