//! Which partitions of the requests topic this process serves and leads first, each one's
//! database, and the check that the topic has the partition count the store was made with.

use std::time::Duration;

use kafka_config::LogArgs;

/// Which database each partition uses, which partitions this process serves and which it
/// leads first.
pub struct Layout {
    pub database_urls: Vec<String>,
    pub served: Vec<u32>,
    pub lead: Vec<u32>,
}

impl Layout {
    pub fn from_args(
        database_url: &str,
        database_urls: &[String],
        partitions: u32,
        served: &[u32],
        lead: Option<&[u32]>,
    ) -> anyhow::Result<Layout> {
        let database_urls =
            persistence::layout::database_urls(database_url, database_urls, partitions)?;
        let served: Vec<u32> = if served.is_empty() {
            (0..partitions).collect()
        } else {
            let mut v = served.to_vec();
            v.sort_unstable();
            v.dedup();
            v
        };
        let lead = lead.map_or_else(|| served.clone(), <[u32]>::to_vec);
        if let Some(p) = served.iter().chain(&lead).find(|&&p| p >= partitions) {
            anyhow::bail!(
                "partition {p} named in SEQUENCER_PARTITIONS or LEAD_PARTITIONS, but the \
                 requests topic has {partitions} (REQUEST_PARTITIONS)"
            );
        }
        Ok(Layout {
            database_urls,
            served,
            lead,
        })
    }
}

/// Refuses a requests topic whose partition count is not REQUEST_PARTITIONS. A broker that does
/// not answer, or a topic not created yet, is not refused here: the writers wait for both.
pub fn check_topic_partitions(log: &LogArgs) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = kafka_config::base()
        .set("bootstrap.servers", &log.brokers)
        .create()?;
    let topic = &log.requests_topic;
    match kafka_config::partition_count(consumer.client(), topic, Duration::from_secs(5)) {
        Ok(Some(n)) if n != log.request_partitions as usize => Err(
            kafka_config::partition_count_differs(topic, n, log.request_partitions),
        ),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!("cannot check the requests topic's partitions yet: {e:#}");
            Ok(())
        }
    }
}
