//! A wedged requests producer is replaced, without restarting the ingress.
//!
//! After a broker restart librdkafka's producer sometimes never delivers again while the broker
//! serves everyone else. The drill knob `FAULT_FIRST_PRODUCER_BROKERS` makes the ingress's first
//! producer talk to an address where nothing listens: every append fails although the broker
//! is fine, as in that case, and reports neither a delivery nor a failure for 10 minutes (so
//! only the ingress's own deadline answers the client). The watchdog must notice (appends failing, none acknowledged for
//! longer than the outcome timeout, a new client reaching the broker) and put a new producer in
//! its place; writes are then decided again, and the retried ones get a single outcome.

use std::time::{Duration, Instant};

use systest::{free_port, Options, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_producer_that_cannot_deliver_while_the_broker_serves_is_replaced() {
    let nowhere = format!("127.0.0.1:{}", free_port());
    let stack = Stack::start(
        "producer_watchdog",
        Options {
            outcome_timeout_ms: 2_000,
            extra_ingress_env: vec![("FAULT_FIRST_PRODUCER_BROKERS".into(), nowhere)],
            wait_ingress_ready: false,
            ..Options::default()
        },
    )
    .await
    .unwrap();

    // Until the watchdog acts, the SKU cannot be created: no append is acknowledged. The wedged
    // producer reports nothing at all (its messages would time out after 10 minutes), yet every
    // attempt is answered within the outcome timeout, and counts as a failed append.
    let started = Instant::now();
    let mut failed = 0;
    loop {
        let answer = tokio::time::timeout(
            Duration::from_millis(2_000 + 3_000),
            stack.put_sku("w", 100, 5, 60.0),
        )
        .await
        .expect("an append the producer never reports on is answered at the outcome timeout");
        match answer {
            Ok(_) => break,
            Err(e) => {
                failed += 1;
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "the wedged producer was never replaced ({failed} failed attempts, last: {e})"
                );
            }
        }
    }
    assert!(
        failed >= 1,
        "the first producer delivered: the drill did not wedge it"
    );

    // The new producer serves: writes are decided, each retried key once.
    let mut first = serde_json::Value::Null;
    for i in 0..20 {
        let (status, body) = stack.reserve_one("w", i).await.unwrap();
        assert_eq!(status, 201, "{body}");
        if i == 0 {
            first = body;
        }
    }
    let (status, again) = stack.reserve("w", "u0", 1, "k0").await.unwrap();
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["reservation_id"], first["reservation_id"], "{again}");
    let row = stack.sku_row("w").await.unwrap();
    assert_eq!(row["held"], 20, "{row:?}");

    let metrics = stack.ingress_metrics().await.unwrap();
    assert!(
        metrics.contains("ingress_producer_replacements_total 1"),
        "{metrics}"
    );
    stack.wait_ready(Duration::from_secs(10)).await.unwrap();
    let report = stack.audit().unwrap();
    assert_eq!(report["violations"], serde_json::json!([]), "{report}");
}
