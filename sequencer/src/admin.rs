//! Operator commands that are not the decide loop: creating the topics, showing the group
//! (`sequencer status`) and auditing every partition (`sequencer audit`).

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

/// Creates each `(topic, partitions)` unless it exists already: the requests topic with
/// REQUEST_PARTITIONS partitions (each partition's order is the fairness order of its SKUs),
/// the outcomes topic with one. Plain Kafka admin API: works against Kafka, Redpanda or tansu.
pub async fn create_topics(brokers: &str, topics: &[(String, u32)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, n)| NewTopic::new(t, *n as i32, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(topic) => println!("created topic {topic}"),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => println!("topic {topic} exists"),
            Err((topic, code)) => bail!("creating topic {topic}: {code}"),
        }
    }
    // A topic just created may take a moment to show its partitions in the metadata.
    for (topic, partitions) in topics {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let checked = kafka_config::check_partition_count(
                admin.inner(),
                topic,
                *partitions,
                Duration::from_secs(5),
            );
            match checked {
                Ok(()) => break,
                Err(e) if std::time::Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
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

/// GETs `url` (plain http://host:port/path) and returns the body. An answer that is not 2xx is
/// an error naming the status and carrying the body. No proxy: it only talks to this host and
/// its peers.
pub async fn http_get(url: &str) -> anyhow::Result<String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(2))
        .build()
        .context("building the HTTP client")?;
    let response = client.get(url).send().await?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {body}");
    }
    Ok(body)
}

/// `sequencer audit`: every partition's database audited (and its newest checkpoint compared with
/// the rows); the report printed as text or JSON. Exit code 0 clean, 1 violations, 2 the audit
/// could not run.
pub fn audit(database_urls: &[String], json: bool) -> u8 {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut reports = Vec::new();
    for url in database_urls {
        let report = (|| {
            let pool = rt.block_on(persistence::connect(url, 2))?;
            let mut report = rt.block_on(persistence::audit::run(&pool))?;
            let (checked, violations) = crate::audit::checkpoint_against_rows(&rt, &pool)?;
            report.checkpoint_batch_seq = checked;
            report.violations.extend(violations);
            anyhow::Ok(report)
        })();
        match report {
            Ok(r) => reports.push(r),
            Err(e) => {
                eprintln!(
                    "audit could not run on {}: {e:#}",
                    persistence::layout::redacted(url)
                );
                return 2;
            }
        }
    }
    let several = reports.len() > 1;
    let clean = reports.iter().all(|r| r.is_clean());
    if json {
        let doc = if several {
            serde_json::to_string_pretty(&reports)
        } else {
            serde_json::to_string_pretty(&reports[0])
        };
        println!("{}", doc.expect("serializable"));
    } else {
        for report in &reports {
            println!(
                "{}audited {} skus, {} reservations, {} batches, committed offset {} (log generation {}), checkpoint {}",
                if several { format!("partition {}: ", report.partition) } else { String::new() },
                report.skus,
                report.reservations,
                report.batches,
                report.committed_offset,
                report.log_generation,
                report
                    .checkpoint_batch_seq
                    .map_or("none".to_owned(), |b| format!(
                        "of batch {b} compared with the rows"
                    ))
            );
            for v in &report.violations {
                println!("VIOLATION {v}");
            }
        }
        println!(
            "{}",
            if clean {
                "audit: clean"
            } else {
                "audit: FAILED"
            }
        );
    }
    u8::from(!clean)
}

/// `sequencer status`: the fence row of every partition and each peer's `/status`, a row per
/// partition. Exit code 0, or 1 when a database or a peer does not answer.
pub fn status(database_urls: &[String], peers: &[String]) -> u8 {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut healthy = true;
    for (partition, url) in database_urls.iter().enumerate() {
        let state = rt.block_on(async {
            let pool = persistence::connect(url, 1).await?;
            anyhow::Ok(persistence::lease::read_state(&pool).await?)
        });
        match state {
            Ok(s) => println!(
                "postgres partition {partition}: epoch {} leader {} lease {} committed offset {} batch {}",
                s.epoch,
                s.leader.as_deref().unwrap_or("-"),
                if s.lease_remaining_ms >= 0 {
                    format!("valid for {} ms", s.lease_remaining_ms)
                } else {
                    "lapsed".to_owned()
                },
                s.next_offset,
                s.batch_seq
            ),
            Err(e) => {
                healthy = false;
                println!("postgres partition {partition}: unreachable ({e:#})");
            }
        }
    }
    for peer in peers {
        let url = format!("{}/status", peer.trim_end_matches('/'));
        let doc = rt.block_on(http_get(&url));
        match doc.and_then(|b| Ok(serde_json::from_str::<serde_json::Value>(&b)?)) {
            Ok(doc) => {
                println!(
                    "{peer}: {} ready {} (last batch {} commands, commit {} us)",
                    doc["node_id"].as_str().unwrap_or("?"),
                    doc["ready"],
                    doc["last_batch_size"],
                    doc["last_commit_us"],
                );
                for p in doc["partitions"].as_array().into_iter().flatten() {
                    println!(
                        "{peer}:   partition {} role {} epoch {} committed {} lag {} batch {} last batch {} ms ago",
                        p["partition"],
                        p["role"].as_str().unwrap_or("?"),
                        p["epoch"],
                        p["committed_offset"],
                        p["lag"],
                        p["batch_seq"],
                        p["last_batch_age_ms"],
                    );
                }
            }
            Err(e) => {
                healthy = false;
                println!("{peer}: unreachable ({e:#})");
            }
        }
    }
    u8::from(!healthy)
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use axum::routing::get;
    use axum::Router;

    use super::http_get;

    /// Serves `/ok` (200) and `/down` (503) on a free local port; returns the base URL.
    async fn server() -> String {
        let app = Router::new()
            .route("/ok", get(|| async { "all good" }))
            .route(
                "/down",
                get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "lease lapsed") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_2xx_answer_gives_its_body() {
        let base = server().await;
        assert_eq!(http_get(&format!("{base}/ok")).await.unwrap(), "all good");
    }

    #[tokio::test]
    async fn a_non_2xx_answer_is_an_error_with_its_status_and_body() {
        let base = server().await;
        let e = http_get(&format!("{base}/down"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("503"), "{e}");
        assert!(e.contains("lease lapsed"), "{e}");
    }
}
