//! The librdkafka settings every Kafka client of the system starts from. The ingress and the
//! sequencer each add their own (group id, offset reset, linger, queue sizes, timeouts). Both
//! take where the log is ([`LogArgs`]) the same way.

use rdkafka::config::ClientConfig;

/// Where the log is: the broker and the two topics, from the command line or the environment
/// (`#[command(flatten)]` in the ingress's and the sequencer's arguments).
#[derive(clap::Args, Clone, Debug)]
pub struct LogArgs {
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    #[arg(long, env = "REQUESTS_TOPIC", default_value = "reservation-requests")]
    pub requests_topic: String,
    #[arg(long, env = "OUTCOMES_TOPIC", default_value = "reservation-outcomes")]
    pub outcomes_topic: String,
    /// How many partitions the requests topic has: every SKU lives in one of them
    /// (`wire::partition`), each decided by its own fenced writer. Fixed for a store once it
    /// has SKUs.
    #[arg(long, env = "REQUEST_PARTITIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=wire::partition::PARTITIONS_MAX as i64))]
    pub request_partitions: u32,
}

/// The partition count of `topic` from the broker's metadata; `None` when there is no such topic
/// (or it is not ready yet).
pub fn partition_count<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<Option<usize>> {
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| anyhow::anyhow!("reading the metadata of topic {topic:?}: {e}"))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().len()))
}

/// Why a store refuses a requests topic with `found` partitions.
pub fn partition_count_differs(topic: &str, found: usize, partitions: u32) -> anyhow::Error {
    anyhow::anyhow!(
        "topic {topic:?} has {found} partitions, but REQUEST_PARTITIONS is {partitions}: every \
         process of a store must agree on the count (it decides where each SKU lives)"
    )
}

/// Checks that `topic` exists with exactly `partitions` partitions.
pub fn check_partition_count<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    partitions: u32,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    match partition_count(client, topic, timeout)? {
        Some(n) if n == partitions as usize => Ok(()),
        Some(n) => Err(partition_count_differs(topic, n, partitions)),
        None => anyhow::bail!(
            "topic {topic:?} does not exist (create it: sequencer create-topics, with \
             REQUEST_PARTITIONS={partitions})"
        ),
    }
}

/// An empty client configuration, with librdkafka's own debug contexts when `KAFKA_DEBUG` names
/// them (for example `eos,broker,protocol`): its log lines go to this process's log at debug
/// level (`RUST_LOG=info,librdkafka=debug`).
pub fn base() -> ClientConfig {
    let mut config = ClientConfig::new();
    if let Ok(contexts) = std::env::var("KAFKA_DEBUG") {
        config.set("debug", contexts);
    }
    config
}

/// A client of `brokers` tuned for latency and broker restarts.
fn client(brokers: &str) -> ClientConfig {
    let mut config = base();
    config
        .set("bootstrap.servers", brokers)
        // librdkafka leaves Nagle on by default: small requests then wait for delayed ACKs
        // (tens of ms on loopback). Every hop here is latency-critical.
        .set("socket.nagle.disable", "true")
        // Reconnect quickly after a broker restart (librdkafka's defaults back off to 10 s).
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "1000");
    config
}

/// A consumer that is assigned its partition and offset (never subscribes, never commits
/// offsets to Kafka: the offset of record is elsewhere) and gets each message as soon as it is
/// there. `auto_offset_reset` is what an offset the broker does not have does.
pub fn assigned_consumer(
    brokers: &str,
    group_id: String,
    fetch_wait_max_ms: u64,
    auto_offset_reset: &str,
) -> ClientConfig {
    let mut config = client(brokers);
    config
        // Required by librdkafka even though no group protocol is used (assign, never subscribe).
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", auto_offset_reset)
        .set("fetch.wait.max.ms", fetch_wait_max_ms.to_string())
        .set("fetch.min.bytes", "1")
        .set("enable.partition.eof", "false");
    config
}

/// The reader of the requests log (the sequencer's, and the benchmark's probe of the broker's
/// read rate): an [`assigned_consumer`] that never jumps silently to the start or end of the
/// log (an offset the broker does not have surfaces as an error, which the sequencer turns into
/// a lost log) and keeps a deep local queue fed under a backlog.
pub fn requests_reader(brokers: &str, group_id: String, fetch_wait_max_ms: u64) -> ClientConfig {
    let mut config = assigned_consumer(brokers, group_id, fetch_wait_max_ms, "error");
    config.set("queued.max.messages.kbytes", "65536");
    // Once librdkafka's local queue holds `queued.min.messages` (100,000), it postpones the next
    // fetch by `fetch.queue.backoff.ms`. Its default, 1000 ms, is longer than the decide loop
    // takes to drain that queue under a backlog (~0.5 s at 200k decisions/s): the loop then sat
    // idle for up to ~600 ms every second waiting for a fetch. 10 ms keeps the queue fed; the
    // queue itself stays bounded by the same thresholds.
    config.set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string());
    config
}

/// `fetch.queue.backoff.ms` of [`requests_reader`].
pub const FETCH_QUEUE_BACKOFF_MS: u64 = 10;

/// An idempotent producer acknowledged by every in-sync replica: librdkafka's retries (through
/// broker restarts, until `message.timeout.ms`) never write a message twice.
pub fn idempotent_producer(brokers: &str) -> ClientConfig {
    let mut config = client(brokers);
    config.set("enable.idempotence", "true").set("acks", "all");
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The requests reader keeps its local queue fed under a backlog (librdkafka's 1 s default
    /// back-off idled the decide loop half of every second) and never jumps silently to another
    /// offset (the sequencer must see a missing offset as a lost log).
    #[test]
    fn the_requests_reader_fetches_again_quickly_and_never_resets_its_offset() {
        let config = requests_reader("127.0.0.1:9092", "g".into(), 100);
        assert_eq!(config.get("fetch.queue.backoff.ms"), Some("10"));
        assert_eq!(config.get("auto.offset.reset"), Some("error"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert_eq!(config.get("fetch.wait.max.ms"), Some("100"));
    }
}
