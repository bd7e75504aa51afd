//! One clock: a sequencer whose host clock is two minutes ahead leads without noticing. Both
//! sequencers lead in turn (the first is killed), one of them skewed; every batch is stamped
//! with the database's time, and a hold taken under one leader expires on time under the other.

use std::time::Duration;

use systest::{scalar, Options, Stack};

const SKEW_MS: i64 = 120_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_with_a_skewed_host_clock_decides_on_the_database_clock() {
    let options = Options::sequencers(2).with_sequencer_env(
        1,
        "FAULT_HOST_CLOCK_SKEW_MS",
        &SKEW_MS.to_string(),
    );
    let mut stack = Stack::start("clock_skew", options).await.unwrap();
    let first = stack
        .wait_for_active(Duration::from_secs(30))
        .await
        .unwrap();
    // Holds for 60 s: a leader two minutes ahead would expire them at its first batch.
    stack.put_sku("clock", 10, 1, 60.0).await.unwrap();
    let (status, held) = stack
        .reserve("clock", "before", 1, "k-before")
        .await
        .unwrap();
    assert_eq!(status, 201, "{held}");

    let second = stack
        .kill_and_wait_active(first, Duration::from_secs(30))
        .await
        .unwrap();
    assert_ne!(first, second);
    let (status, body) = stack.reserve("clock", "after", 1, "k-after").await.unwrap();
    assert_eq!(status, 201, "{body}");

    // The first hold is still held under the second leader, with its original expiry.
    let id = held["reservation_id"].as_str().unwrap();
    let (status, now) = stack.get(&format!("/v1/reservations/{id}")).await.unwrap();
    assert_eq!(status, 200, "{now}");
    assert_eq!(
        now["status"], "held",
        "the hold outlived the takeover: {now}"
    );
    assert_eq!(now["expires_at"], held["expires_at"]);

    // Every batch either leader cut carries the database's time, to within a few seconds.
    let worst_ms: f64 = sqlx::query_scalar(
        "SELECT max(abs(EXTRACT(EPOCH FROM (decided_at - now())) * 1000))::float8 FROM batches",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    let batches = scalar(&stack, "SELECT count(*) FROM batches").await;
    assert!(batches >= 3, "both leaders committed batches ({batches})");
    assert!(
        worst_ms < 30_000.0,
        "a batch was stamped {worst_ms} ms away from the database's clock (host skew {SKEW_MS} ms)"
    );
    let report = stack.audit().unwrap();
    assert_eq!(report["violations"], serde_json::json!([]), "{report}");
}
