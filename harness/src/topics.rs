//! Topics on the broker, made and removed with the sequencer's own subcommands, and the
//! environment every process of one system shares.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

/// The processes' log filter: `info`, or FLASH_RUST_LOG (for example `info,librdkafka=debug`
/// with KAFKA_DEBUG=eos,broker to see the Kafka clients' own lines).
fn log_filter() -> String {
    std::env::var("FLASH_RUST_LOG").unwrap_or_else(|_| "info".into())
}

/// Where one system lives: its database and its two topics on one broker.
#[derive(Clone, Debug)]
pub struct Topology {
    pub database_url: String,
    pub brokers: String,
    pub requests_topic: String,
    pub outcomes_topic: String,
    /// The requests topic's partition count (REQUEST_PARTITIONS); partition p's database is
    /// `database_url`'s with `_p{p}` after the name.
    pub partitions: u32,
}

impl Topology {
    /// `sequencer run` on this topology as node `node_id`, its status endpoint on `status_addr`,
    /// logging at info (or FLASH_RUST_LOG). The caller adds batch sizes, lease timings and the like.
    pub fn sequencer(&self, bin_dir: &Path, node_id: &str, status_addr: &str) -> Command {
        let mut cmd = Command::new(bin_dir.join("sequencer"));
        cmd.arg("run")
            .env("DATABASE_URL", &self.database_url)
            .env("KAFKA_BROKERS", &self.brokers)
            .env("REQUESTS_TOPIC", &self.requests_topic)
            .env("OUTCOMES_TOPIC", &self.outcomes_topic)
            .env("REQUEST_PARTITIONS", self.partitions.to_string())
            .env("NODE_ID", node_id)
            .env("STATUS_ADDR", status_addr)
            .env("RUST_LOG", log_filter());
        cmd
    }

    /// `ingress` on this topology, listening on `listen_addr`, logging at info (or FLASH_RUST_LOG).
    pub fn ingress(&self, bin_dir: &Path, listen_addr: &str, admin_token: &str) -> Command {
        let mut cmd = Command::new(bin_dir.join("ingress"));
        cmd.env("LISTEN_ADDR", listen_addr)
            .env("DATABASE_URL", &self.database_url)
            .env("KAFKA_BROKERS", &self.brokers)
            .env("REQUESTS_TOPIC", &self.requests_topic)
            .env("OUTCOMES_TOPIC", &self.outcomes_topic)
            .env("REQUEST_PARTITIONS", self.partitions.to_string())
            .env("ADMIN_TOKEN", admin_token)
            .env("RUST_LOG", log_filter());
        cmd
    }
}

/// `sequencer create-topics` for the requests topic `topics[0]` and the outcomes topic
/// `topics[1]` (the same when only one is given), retried for up to 30 s: a broker that has just
/// opened its port may still be electing its controller.
pub fn create_topics(bin_dir: &Path, brokers: &str, topics: &[&str]) -> anyhow::Result<()> {
    create_partitioned_topics(bin_dir, brokers, topics, 1)
}

/// [`create_topics`] with a requests topic of `partitions` partitions.
pub fn create_partitioned_topics(
    bin_dir: &Path,
    brokers: &str,
    topics: &[&str],
    partitions: u32,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(bin_dir.join("sequencer"))
            .args([
                "create-topics",
                "--brokers",
                brokers,
                "--requests-topic",
                topics[0],
                "--request-partitions",
                &partitions.to_string(),
            ])
            .args([
                "--outcomes-topic",
                topics.get(1).copied().unwrap_or(topics[0]),
            ])
            .output()
            .context("running sequencer create-topics")?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "create-topics failed (is the broker up on {brokers}?): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `sequencer delete-topics`: deletes topics and every message in them.
pub fn delete_topics(bin_dir: &Path, brokers: &str, topics: &[&str]) -> anyhow::Result<()> {
    crate::run_ok(
        Command::new(bin_dir.join("sequencer"))
            .args(["delete-topics", "--brokers", brokers])
            .args(topics),
        "sequencer delete-topics",
    )
}

/// Appends raw messages to `topic`, as any producer could (idempotent, every replica
/// acknowledging), and waits until the broker has them all.
pub fn produce(brokers: &str, topic: &str, payloads: &[Vec<u8>]) -> anyhow::Result<()> {
    produce_to(brokers, topic, payloads, |_| None)
}

/// [`produce`], each payload to the partition `partition_of` names (`None`: the producer's
/// choice).
pub fn produce_to(
    brokers: &str,
    topic: &str,
    payloads: &[Vec<u8>],
    partition_of: impl Fn(usize) -> Option<i32>,
) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("creating a producer")?;
    for (i, p) in payloads.iter().enumerate() {
        let mut record: BaseRecord<'_, (), [u8]> = BaseRecord::to(topic).payload(&p[..]);
        if let Some(partition) = partition_of(i) {
            record = record.partition(partition);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => bail!("producing to {topic}: {e}"),
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing produced messages")?;
    Ok(())
}
