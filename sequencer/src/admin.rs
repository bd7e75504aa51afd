//! Operator commands that are not the decide loop: creating the topics and showing the group.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

/// Creates each topic with ONE partition (the log's order is the fairness order) unless it
/// exists already. Plain Kafka admin API: works against Kafka, Redpanda or tansu.
pub async fn create_topics(brokers: &str, topics: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(topic) => println!("created topic {topic}"),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => println!("topic {topic} exists"),
            Err((topic, code)) => bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Deletes topics (the whole log with them). For wiping a test stack (`scripts/down --wipe` on a
/// broker these scripts did not start) and for tests; never part of normal operation.
pub async fn delete_topics(brokers: &str, topics: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.delete_topics(&names, &options).await? {
        match result {
            Ok(topic) => println!("deleted topic {topic}"),
            Err((topic, RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                println!("topic {topic} does not exist")
            }
            Err((topic, code)) => bail!("deleting topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// GETs `url` (plain http://host:port/path) and returns the body; a tiny client so the
/// sequencer binary needs no HTTP client library for one operator command.
pub fn http_get(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/"), |(h, p)| (h, p));
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let addr = host
        .parse()
        .with_context(|| format!("{host} is not host:port"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (_, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    Ok(body.to_owned())
}
