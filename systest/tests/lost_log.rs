//! The requests topic deleted and created again mid-sale: the sequencers stop loudly (not
//! ready, `log_lost`, the metric, exit code 4), nothing is decided from the new log until the
//! documented recovery (`sequencer rebase-log`), and after it every earlier reservation is
//! intact, 504'd buyers retry to a definitive answer and new reservations are decided.

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use systest::load::{not_held, verify_with, wait_decided, Answer, Load};
use systest::{bin_dir, create_topics, delete_topics, Options, Stack};

/// Every reservation row of `sku`: id -> (status, user, key).
async fn rows(stack: &Stack, sku: &str) -> HashMap<String, (String, String, String)> {
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT reservation_id::text, status, user_id, idempotency_key FROM decisions
          WHERE sku = $1",
    )
    .bind(sku)
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, s, u, k)| (id, (s, u, k)))
        .collect()
}

fn rebase_log(stack: &Stack, extra: &[&str]) -> (i32, String) {
    let out = Command::new(bin_dir().join("sequencer"))
        .args(["rebase-log", "--database-url", &stack.database_url])
        .args([
            "--brokers",
            &stack.brokers,
            "--requests-topic",
            &stack.requests_topic,
        ])
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

async fn get_text(stack: &Stack, i: usize, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{}{path}", stack.sequencers[i].status_port);
    let r = stack.http.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Waits until every sequencer reports `log_lost` (a role it keeps until the log is rebased).
async fn wait_all_log_lost(stack: &Stack, within: Duration) {
    for i in 0..stack.sequencers.len() {
        stack.wait_role(i, "log_lost", within).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recreated_requests_topic_stops_the_sale_loudly_and_rebase_log_recovers_it() {
    let options = Options::sequencers(2).with_outcome_timeout_ms(3_000);
    let mut stack = Stack::start("lost_log", options).await.unwrap();
    stack.put_sku("hot", 1_000, 1, 300.0).await.unwrap();

    // Before the loss: 400 buyers served; one hold confirmed, one cancelled.
    let before = Load::run(&stack, "hot", "before", 400, 32).await;
    assert!(before.iter().all(|a| a.status == 201), "all 400 held");
    let confirmed = before[0].body["reservation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cancelled = before[1].body["reservation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, _) = stack.confirm(&confirmed).await.unwrap();
    assert_eq!(s, 200);
    let (s, _) = stack.cancel(&cancelled).await.unwrap();
    assert_eq!(s, 200);

    // Mid-sale, under load: the requests topic is deleted and created again (empty, offset 0).
    let during = Load::start(&stack, "hot", "during", 400, 16, Duration::from_secs(60));
    wait_decided(&stack, "hot", 450).await.unwrap();
    let rows_before = rows(&stack, "hot").await;
    delete_topics(&stack.brokers, &[&stack.requests_topic]).unwrap();
    create_topics(
        &stack.brokers,
        &[&stack.requests_topic, &stack.outcomes_topic],
    )
    .unwrap();

    // Loud: every sequencer stops deciding and says why (role, /readyz, metric, log).
    wait_all_log_lost(&stack, Duration::from_secs(20)).await;
    let during = during.wait().await;
    for i in 0..2 {
        let (code, text) = get_text(&stack, i, "/readyz").await;
        assert_eq!(code, 503, "{text}");
        assert!(
            text.contains("requests log lost") && text.contains("rebase-log"),
            "{text}"
        );
        let (_, metrics) = get_text(&stack, i, "/metrics").await;
        assert!(
            metrics.contains("sequencer_log_lost{partition=\"0\"} 1"),
            "{metrics}"
        );
    }
    // Nothing is decided from the new log meanwhile, though buyers keep appending to it.
    let decided = rows(&stack, "hot").await.len();
    let probe = stack.reserve("hot", "probe", 1, "probe-1").await.unwrap();
    assert_eq!(probe.0, 504, "no decision without a sequencer: {probe:?}");
    assert_eq!(rows(&stack, "hot").await.len(), decided);

    // A sequencer stopped in that state exits 4 (not 3, "deposed"); started again, its start-up
    // check finds the same loss.
    let code = stack.signal_and_wait_exit(1, "TERM", Duration::from_secs(10));
    assert_eq!(code.unwrap(), Some(4));
    stack.spawn_sequencer(1).unwrap();
    wait_all_log_lost(&stack, Duration::from_secs(30)).await;

    // The documented recovery: rebase-log (a dry run first changes nothing).
    let (code, text) = rebase_log(&stack, &["--dry-run"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("dry run"), "{text}");
    let (code, text) = rebase_log(&stack, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("rebased: generation 2"), "{text}");
    println!("{text}");
    // A second rebase finds the log whole and refuses.
    let (code, text) = rebase_log(&stack, &[]);
    assert_eq!(code, 1, "{text}");

    // The sequencers come back by themselves: one active, one standby.
    stack
        .wait_active_and_standby(Duration::from_secs(30))
        .await
        .unwrap();

    // Every reservation decided before the loss is intact, statuses included.
    let rows_after = rows(&stack, "hot").await;
    for (id, row) in &rows_before {
        assert_eq!(rows_after.get(id), Some(row), "reservation {id} changed");
    }
    assert_eq!(rows_after[&confirmed].0, "confirmed");
    assert_eq!(rows_after[&cancelled].0, "cancelled");

    // New reservations are decided, on the new log generation.
    let after = Load::run(&stack, "hot", "after", 100, 16).await;
    let refused = not_held(&after);
    assert!(refused.is_empty(), "after the rebase: {refused:?}");
    let gen2: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM decisions r JOIN log_generations g ON g.generation = 2
          WHERE r.batch_seq >= g.first_batch_seq AND r.user_id LIKE 'after-%'",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(
        gen2, 100,
        "the new reservations are decided in generation 2"
    );

    // Every answer accounted for: definitive ones stored once, 504s retried to a definitive
    // answer (the original hold when there was one), one decision per request, audit clean.
    let mut answers: Vec<Answer> = before;
    answers.extend(during);
    answers.extend(after);
    answers.push(Answer {
        user: "probe".into(),
        key: "probe-1".into(),
        status: probe.0,
        body: probe.1,
        request_id: None,
    });
    let verdict = verify_with(&stack, "hot", &answers, false).await.unwrap();
    println!("lost log and rebase: {verdict:?}");
    let audit = stack.audit().unwrap();
    assert_eq!(audit["log_generation"], 2, "{audit}");
    let row = stack.sku_row("hot").await.unwrap();
    assert_eq!(row["available"] + row["held"] + row["sold"], 1_000);
}

/// Deletes every record of the topic (Kafka's DeleteRecords up to the end): the log's start moves
/// past offsets no sequencer has read yet.
async fn truncate_to_end(brokers: &str, topic: &str) -> i64 {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::End)
        .unwrap();
    let result = admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .unwrap();
    let e = &result.elements()[0];
    e.error().unwrap();
    e.offset().to_raw().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_deleted_before_they_were_read_stop_the_sequencer_until_rebase_log() {
    let options = Options::default().with_outcome_timeout_ms(2_000);
    let mut stack = Stack::start("truncated_log", options).await.unwrap();
    stack.put_sku("hot", 500, 1, 300.0).await.unwrap();
    let before = Load::run(&stack, "hot", "before", 100, 16).await;
    assert!(before.iter().all(|a| a.status == 201));

    // The sequencer is frozen while 50 requests are appended; then the log is truncated past
    // them (what retention does to requests nobody read in time) before it wakes up. They go in
    // two rounds: a fetch the reader had parked at the broker before the freeze is answered with
    // the first round into the frozen process's socket (it reads those on waking, rightly); the
    // second round has no fetch in flight, so only the broker held it.
    stack.signal_sequencer(0, "STOP").unwrap();
    let mut unread = Vec::new();
    for round in ["unread-1", "unread-2"] {
        let load = Load::start(&stack, "hot", round, 25, 25, Duration::from_secs(60));
        let deadline = Instant::now() + Duration::from_secs(10);
        while load.answered.load(Ordering::Relaxed) < 25 {
            assert!(
                Instant::now() < deadline,
                "the 25 requests of {round} did not time out"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unread.extend(load.wait().await);
    }
    assert!(unread.iter().all(|a| a.status == 504), "undecided: 504");
    let log_start = truncate_to_end(&stack.brokers, &stack.requests_topic).await;
    stack.signal_sequencer(0, "CONT").unwrap();

    // The running reader hits an offset the broker no longer has: loud, not a silent stall.
    wait_all_log_lost(&stack, Duration::from_secs(20)).await;
    let doc = stack.sequencer_status(0).await.unwrap();
    let why = doc["log_lost"].as_str().unwrap().to_owned();
    assert!(why.contains("no longer has offset"), "{why}");
    // Restarted, the start-up check says the same in its own words.
    let code = stack.signal_and_wait_exit(0, "TERM", Duration::from_secs(10));
    assert_eq!(code.unwrap(), Some(4));
    stack.spawn_sequencer(0).unwrap();
    wait_all_log_lost(&stack, Duration::from_secs(30)).await;
    let doc = stack.sequencer_status(0).await.unwrap();
    let why = doc["log_lost"].as_str().unwrap().to_owned();
    assert!(
        why.contains(&format!("starts at offset {log_start}")),
        "{why}"
    );

    // Recovery: continue at the log's start; the lost requests' buyers retry with their keys.
    let (code, text) = rebase_log(&stack, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("continue at offset {log_start}")),
        "{text}"
    );
    stack
        .wait_for_active(Duration::from_secs(30))
        .await
        .unwrap();
    let after = Load::run(&stack, "hot", "after", 50, 16).await;
    assert!(after.iter().all(|a| a.status == 201));
    let mut answers = before;
    answers.extend(unread);
    answers.extend(after);
    let verdict = verify_with(&stack, "hot", &answers, false).await.unwrap();
    println!("truncated log and rebase: {verdict:?}");
    assert_eq!(verdict.held, 150, "100 before, 50 after");
    assert_eq!(
        verdict.retried_ok, 50,
        "every lost request retried to a decision"
    );
    assert_eq!(stack.sku_row("hot").await.unwrap()["held"], 200);
}
