//! A leader whose log reader hangs (no progress, no error) says so and steps aside.
//!
//! The drill knob `FAULT_READER_STALL_AT_OFFSET` makes the active sequencer's reader hang before
//! offset 5, as one stuck in a call would. The sequencer must stop saying it is ready within
//! about 5 s, and exit with code 1 after READER_STALL_EXIT_MS, so that the standby takes over
//! and decides what the stuck one never read; retried writes get one outcome each.

use std::time::{Duration, Instant};

use serde_json::json;
use systest::{scalar, Options, Stack};

const STALL_AT: i64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_reader_hangs_is_not_ready_then_exits_and_the_standby_decides() {
    let options = Options::sequencers(2)
        .with_lease_ms(3_000, 500)
        .with_outcome_timeout_ms(3_000)
        .with_sequencer_env(0, "FAULT_READER_STALL_AT_OFFSET", &STALL_AT.to_string())
        .with_sequencer_env(0, "READER_STALL_EXIT_MS", "9000");
    let mut stack = Stack::start("reader_stall", options).await.unwrap();
    // The knob is on sequencer 0: make it the leader.
    if stack
        .wait_for_active(Duration::from_secs(30))
        .await
        .unwrap()
        == 1
    {
        stack.signal_sequencer(1, "KILL").unwrap();
        stack
            .wait_role(0, "active", Duration::from_secs(30))
            .await
            .unwrap();
        stack.spawn_sequencer(1).unwrap();
    }
    stack
        .wait_role(1, "standby", Duration::from_secs(30))
        .await
        .unwrap();

    // Offsets 0..5: the SKU and four holds, decided before the reader hangs.
    stack.put_sku("r", 100, 1, 300.0).await.unwrap();
    for i in 1..STALL_AT {
        let (status, body) = stack.reserve_one("r", i).await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    // These reach the log and are never read by the leader.
    let mut stuck = Vec::new();
    for i in STALL_AT..STALL_AT + 3 {
        let (status, body) = stack.reserve_one("r", i).await.unwrap();
        assert!(status == 504 || status == 503, "{status} {body}");
        stuck.push(i);
    }

    // Not ready, and the reason is the reader.
    let readyz = format!(
        "http://127.0.0.1:{}/readyz",
        stack.sequencers[0].status_port
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(r) = stack.http.get(&readyz).send().await {
            let code = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            if code == 503 {
                assert!(text.contains("log reader"), "{text}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the leader with a hung reader stayed ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // It exits with code 1 (a restart fixes it) and the standby takes over.
    let code = stack
        .wait_sequencer_exit(0, Duration::from_secs(30))
        .unwrap();
    assert_eq!(code, Some(1), "exit code of the stalled leader");
    stack
        .wait_role(1, "active", Duration::from_secs(30))
        .await
        .unwrap();

    // The stuck writes were in the log: retried with their keys, each is decided once.
    for i in stuck {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = stack.reserve_one("r", i).await.unwrap();
            if status == 201 {
                break;
            }
            assert!(
                Instant::now() < deadline && (status == 503 || status == 504),
                "{status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let row = stack.sku_row("r").await.unwrap();
    assert_eq!(row["held"], STALL_AT + 2, "{row:?}");
    let holds = scalar(
        &stack,
        "SELECT count(*) FROM decisions WHERE sku = 'r' AND status = 'held'",
    )
    .await;
    assert_eq!(holds, STALL_AT + 2);
    let report = stack.audit().unwrap();
    assert_eq!(report["violations"], json!([]), "{report}");
}
