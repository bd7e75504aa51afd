//! The pre-sale queue (the waiting room), on the real path: reservations between the queue's
//! opening and the sale's start are answered 202 with a ticket and their place in the queue,
//! the queue is bounded (409 `queue_full`), a retry keeps its place, and at the start the queue
//! is decided in order before anything that arrives later. The queue survives a SIGKILL of the
//! active sequencer (the standby rebuilt it from the log) and a restart from Postgres (the
//! restarted sequencer loads it from `queued_requests`), and the audit stays clean.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use systest::tickets::{assert_decided_in_order, until_decided};
use systest::{assert_error, scalar, Options, Stack};

/// Queued requests the SKU's queue holds.
const QUEUE_MAX: usize = 6;
/// Units on sale: the first three in the queue get one each.
const STOCK: u64 = 3;

/// Sends reservations until one is decided (not 503/504): a takeover may be in progress.
async fn reserve_decided(stack: &Stack, user: &str, key: &str) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = stack.reserve("drop", user, 1, key).await.unwrap();
        if ![503, 504].contains(&status) || Instant::now() > deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_waiting_room_queues_in_order_survives_failover_and_restart_and_decides_first() {
    let mut stack = Stack::start(
        "presale_queue",
        Options {
            sequencers: 2,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    // Room for two takeovers and a restart before the start, on a busy 2-core machine.
    let starts_at_ms = wire::now_ms() + 25_000;
    let (status, sku) = stack
        .admin(
            "PUT",
            "/v1/admin/skus/drop",
            Some(json!({
                "total_stock": STOCK,
                "per_user_limit": 1,
                "hold_ttl_seconds": 300,
                "starts_at": wire::rfc3339(starts_at_ms),
                "queue": {"opens_at": wire::rfc3339(wire::now_ms() - 1_000), "max": QUEUE_MAX},
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{sku}");
    assert_eq!(sku["status"], "queueing", "{sku}");
    assert_eq!(sku["queue"]["max"], QUEUE_MAX, "{sku}");

    // A queue that does not open before the start is refused with its reason.
    let (status, body) = stack
        .admin(
            "PUT",
            "/v1/admin/skus/late",
            Some(json!({
                "total_stock": 1, "per_user_limit": 1, "hold_ttl_seconds": 300,
                "starts_at": wire::rfc3339(starts_at_ms),
                "queue": {"opens_at": wire::rfc3339(starts_at_ms), "max": 5},
            })),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["detail"].as_str()),
        (422, Some("queue.opens_at must be before starts_at")),
        "{body}"
    );

    // Six buyers queue, in order, each with a ticket; the seventh finds the queue full.
    let mut tickets = Vec::new();
    for i in 0..QUEUE_MAX {
        let (status, body) = stack.reserve_one("drop", i).await.unwrap();
        assert_eq!(status, 202, "u{i}: {body}");
        assert_eq!(body["position"], i, "u{i}: {body}");
        let eta = body["eta_ms"].as_u64().expect("an ETA: the start is known");
        // Until the start, and its place at the measured decide rate after it.
        assert!(eta > 10_000 && eta <= 60_000, "u{i}: {body}");
        tickets.push(body["ticket_id"].as_str().unwrap().to_owned());
    }
    let (status, full) = stack.reserve("drop", "u6", 1, "k6").await.unwrap();
    assert_error(status, &full, (409, "queue_full"));
    // A retry keeps its place; its own ticket follows the same request.
    let (status, again) = stack.reserve("drop", "u2", 1, "k2").await.unwrap();
    assert_eq!(
        (status, again["position"].as_i64()),
        (202, Some(2)),
        "{again}"
    );
    let (status, t) = stack
        .get(&format!("/v1/tickets/{}", tickets[4]))
        .await
        .unwrap();
    assert_eq!(
        (status, t["state"].as_str(), t["position"].as_i64()),
        (200, Some("queued"), Some(4)),
        "{t}"
    );
    let queued_rows = scalar(
        &stack,
        "SELECT count(*) FROM queued_requests WHERE released_batch IS NULL",
    )
    .await;
    assert_eq!(queued_rows, QUEUE_MAX as i64, "the queue is in Postgres");

    // The active dies; the standby takes over with the queue it rebuilt from the log.
    let first = stack
        .wait_for_active(Duration::from_secs(10))
        .await
        .unwrap();
    stack.signal_sequencer(first, "KILL").unwrap();
    let second = 1 - first;
    stack
        .wait_role(second, "active", Duration::from_secs(15))
        .await
        .unwrap();
    // The killed one comes back and loads the queue from Postgres; then the second dies too,
    // so the queue is decided by the one that loaded it.
    stack.spawn_sequencer(first).unwrap();
    stack
        .wait_role(first, "standby", Duration::from_secs(30))
        .await
        .unwrap();
    stack.signal_sequencer(second, "KILL").unwrap();
    stack
        .wait_role(first, "active", Duration::from_secs(15))
        .await
        .unwrap();
    assert!(
        wire::now_ms() < starts_at_ms,
        "the failovers took until after the start: the test proves less than it should"
    );
    let (status, t) = stack
        .get(&format!("/v1/tickets/{}", tickets[5]))
        .await
        .unwrap();
    assert_eq!((status, t["state"].as_str()), (200, Some("queued")), "{t}");

    // After the start, a newcomer is decided after the whole queue: the stock is gone.
    tokio::time::sleep(Duration::from_millis(
        (starts_at_ms - wire::now_ms()).max(0) as u64 + 100,
    ))
    .await;
    let (status, late) = reserve_decided(&stack, "late", "k").await;
    assert_error(status, &late, (409, "sold_out"));
    let mut decided = Vec::new();
    for ticket in &tickets {
        decided.push(until_decided(&stack, ticket, Duration::from_secs(10)).await);
    }
    // The first three get a unit each, the one the synchronous retry of their key answers.
    assert_decided_in_order(&stack, "drop", &decided, STOCK as usize).await;
    // All six were decided by one batch, before the newcomer's.
    let batches = scalar(
        &stack,
        "SELECT count(DISTINCT batch_seq) FROM decisions WHERE user_id ~ '^u[0-5]$'",
    )
    .await;
    assert_eq!(batches, 1, "the queue is decided in one batch");
    let before = scalar(
        &stack,
        "SELECT count(*) FROM decisions q, decisions l
              WHERE q.user_id ~ '^u[0-5]$' AND l.user_id = 'late' AND q.batch_seq < l.batch_seq",
    )
    .await;
    assert_eq!(
        before, QUEUE_MAX as i64,
        "every queued request before the newcomer"
    );
    let row = stack.sku_row("drop").await.unwrap();
    assert_eq!((row["held"], row["available"]), (STOCK as i64, 0));
    let report = stack.audit().unwrap();
    assert_eq!(report["violations"], json!([]), "{report}");
}
