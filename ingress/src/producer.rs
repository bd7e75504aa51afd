//! The requests producer, and the watchdog that replaces it when it is wedged.
//!
//! librdkafka's idempotent producer sometimes never recovers from a broker restart: the
//! broker is back and other clients use it, but this client keeps its requests queued on the
//! connection (`REQTMOUT ... 0 in-flight, N out-queue`) and every append times out, for as long
//! as the process lives. Nothing in its configuration brings it back; a new client does.
//!
//! So every append's delivery report goes to [`AppendHealth`] (and to the waiting request, see
//! [`Delivery`]), and [`watch`] checks once a second: when appends
//! have failed and none has been acknowledged for longer than an append may take (the message
//! timeout), and brand-new clients have reached the broker and found the requests topic's
//! leader for [`BROKER_BACK_GRACE_MS`] (time enough for a healthy producer to reconnect and get
//! its producer id after a restart), the producer is wedged, not the broker: the watchdog puts
//! a new producer in its place. The
//! old one is dropped once every append it held has failed (a request whose append failed got a
//! 504 and retries with its key: nothing is lost or decided twice).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use metrics::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use wire::{now_ms, RequestId};

use crate::pending::Pending;

/// The requests producer: its delivery reports go straight to the waiting requests.
pub type RequestsProducer = ThreadedProducer<Delivery>;

/// What the producer does with a delivery report (on librdkafka's polling thread): it tells the
/// waiting request (see `pending.rs`) and the watchdog. Each message carries its request id.
#[derive(Clone)]
pub struct Delivery {
    pub pending: Arc<Pending>,
    pub health: Arc<AppendHealth>,
    pub append_latency: Histogram,
}

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = Box<RequestId>;

    fn delivery(&self, result: &DeliveryResult<'_>, id: Box<RequestId>) {
        match result {
            Ok(message) => {
                self.health.delivered();
                if let Some(took) = self.pending.appended(*id, message.offset()) {
                    self.append_latency.record(took.as_secs_f64());
                }
            }
            Err((e, _)) => {
                self.health.failed();
                self.pending
                    .not_appended(*id, format!("append failed: {e}"));
            }
        }
    }
}

/// The appends' record, for the watchdog.
pub struct AppendHealth {
    /// Unix ms of the last acknowledged append; start-up and each replacement count as one.
    delivered_ms: AtomicI64,
    /// Appends that failed (a full local queue aside) since the last acknowledged one.
    failed_since_delivery: AtomicU64,
}

impl Default for AppendHealth {
    fn default() -> AppendHealth {
        AppendHealth {
            delivered_ms: AtomicI64::new(now_ms()),
            failed_since_delivery: AtomicU64::new(0),
        }
    }
}

impl AppendHealth {
    pub fn delivered(&self) {
        self.delivered_ms.store(now_ms(), Ordering::Relaxed);
        self.failed_since_delivery.store(0, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.failed_since_delivery.fetch_add(1, Ordering::Relaxed);
    }
}

/// How long the broker must have been reachable by a new client, while the producer still
/// delivers nothing, before the producer counts as wedged. A healthy one reconnects within its
/// reconnect backoff (at most 1 s) and then acquires its producer id.
pub const BROKER_BACK_GRACE_MS: i64 = 3_000;

pub struct ProducerSlot {
    current: RwLock<RequestsProducer>,
    config: ClientConfig,
    delivery: Delivery,
    replaced_ms: AtomicI64,
    /// How many times the watchdog replaced the producer.
    pub replacements: AtomicU64,
}

impl ProducerSlot {
    /// A slot whose producers are made from `config`; the first from `first` instead when given
    /// (a drill: a first producer that reaches no broker is wedged from the start).
    pub fn new(
        config: ClientConfig,
        first: Option<ClientConfig>,
        delivery: Delivery,
    ) -> anyhow::Result<ProducerSlot> {
        let producer = first
            .as_ref()
            .unwrap_or(&config)
            .create_with_context(delivery.clone())
            .context("creating the requests producer")?;
        Ok(ProducerSlot {
            current: RwLock::new(producer),
            config,
            delivery,
            replaced_ms: AtomicI64::new(now_ms()),
            replacements: AtomicU64::new(0),
        })
    }

    /// The producer to append with now (a cheap handle).
    pub fn current(&self) -> RequestsProducer {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The appends' record the watchdog reads.
    pub fn health(&self) -> &AppendHealth {
        &self.delivery.health
    }

    fn looks_wedged(&self, now_ms: i64, stuck_ms: i64) -> bool {
        looks_wedged(
            now_ms,
            self.health().delivered_ms.load(Ordering::Relaxed),
            self.health().failed_since_delivery.load(Ordering::Relaxed),
            self.replaced_ms.load(Ordering::Relaxed),
            stuck_ms,
        )
    }

    /// Puts a new producer in place and returns the old one.
    fn replace(&self) -> anyhow::Result<RequestsProducer> {
        let fresh: RequestsProducer = self
            .config
            .create_with_context(self.delivery.clone())
            .context("creating a new requests producer")?;
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            fresh,
        );
        let now = now_ms();
        self.replaced_ms.store(now, Ordering::Relaxed);
        self.health().delivered();
        self.replacements.fetch_add(1, Ordering::Relaxed);
        Ok(old)
    }
}

/// The watchdog's rule, apart from the broker check: appends have failed, none has been
/// acknowledged for more than `stuck_ms`, and the producer was not replaced within `stuck_ms`.
pub fn looks_wedged(
    now_ms: i64,
    delivered_ms: i64,
    failed_since_delivery: u64,
    replaced_ms: i64,
    stuck_ms: i64,
) -> bool {
    failed_since_delivery > 0 && now_ms - delivered_ms > stuck_ms && now_ms - replaced_ms > stuck_ms
}

/// Whether a client that shares nothing with the producer reaches the broker and finds a
/// leader for the requests topic's partition 0. Blocking.
fn broker_serves(base: &ClientConfig, topic: &str) -> anyhow::Result<()> {
    let client: BaseConsumer = base.create()?;
    let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(2))?;
    let leader = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(|t| t.partitions().iter().find(|p| p.id() == 0))
        .map(|p| p.leader());
    match leader {
        Some(leader) if leader >= 0 => Ok(()),
        _ => anyhow::bail!("no leader for {topic:?} partition 0"),
    }
}

/// Checks the producer once a second and replaces it when it is wedged (see the module doc).
/// `stuck` is longer than any append may take: the message timeout plus a margin.
pub async fn watch(
    slot: Arc<ProducerSlot>,
    probe_config: ClientConfig,
    topic: String,
    stuck: Duration,
) {
    let stuck_ms = stuck.as_millis() as i64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retired: Option<(RequestsProducer, i64)> = None;
    // Since when new clients have found the broker serving while the producer looked wedged.
    let mut reachable_since: Option<i64> = None;
    loop {
        tick.tick().await;
        let now = now_ms();
        // Every append the old producer held has failed by now; dropping it joins its threads,
        // so that happens off the async workers.
        if let Some((_, at)) = &retired {
            if now - at > stuck_ms {
                let (old, _) = retired.take().expect("checked");
                let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            }
        }
        if !slot.looks_wedged(now, stuck_ms) {
            reachable_since = None;
            continue;
        }
        let (config, t) = (probe_config.clone(), topic.clone());
        match tokio::task::spawn_blocking(move || broker_serves(&config, &t)).await {
            Ok(Ok(())) => {}
            // The broker is down or has no leader: a new producer would not help.
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "appends fail and the broker does not answer either");
                reachable_since = None;
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "broker check panicked");
                reachable_since = None;
                continue;
            }
        }
        // The broker is back: give the producer its chance to reconnect first.
        if now - *reachable_since.get_or_insert(now) < BROKER_BACK_GRACE_MS {
            continue;
        }
        reachable_since = None;
        match slot.replace() {
            Ok(old) => {
                tracing::warn!(
                    stuck_ms,
                    grace_ms = BROKER_BACK_GRACE_MS,
                    "no append acknowledged while new clients reach the broker: \
                     replaced the requests producer"
                );
                if let Some((older, _)) = retired.replace((old, now)) {
                    let _ = tokio::task::spawn_blocking(move || drop(older)).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot replace the wedged requests producer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::looks_wedged;

    const STUCK: i64 = 6_000;

    #[test]
    fn a_producer_is_wedged_only_after_failures_and_no_delivery_for_the_bound() {
        let now = 100_000;
        // Failing, nothing delivered for longer than the bound, not replaced lately.
        assert!(looks_wedged(now, now - STUCK - 1, 3, 0, STUCK));
        // No failure: a quiet producer is not wedged, however long since its last append.
        assert!(!looks_wedged(now, now - 10 * STUCK, 0, 0, STUCK));
        // Failing, but something was acknowledged within the bound (a broker blip).
        assert!(!looks_wedged(now, now - STUCK, 3, 0, STUCK));
        // Replaced within the bound: the new producer gets its chance first.
        assert!(!looks_wedged(now, now - STUCK - 1, 3, now - STUCK, STUCK));
        assert!(looks_wedged(
            now,
            now - STUCK - 1,
            3,
            now - STUCK - 1,
            STUCK
        ));
    }
}
