//! What operators rely on: the sequencers' status and metrics, the group status command, the
//! audit (which must fail loudly on a corrupted database), and the emergency freeze.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use systest::{bin_dir, Options, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequencers_report_role_epoch_offsets_and_batch_metrics() {
    let options = Options::sequencers(2);
    let stack = Stack::start("ops_status", options).await.unwrap();
    stack.put_sku("m", 10, 10, 300.0).await.unwrap();
    for i in 0..5 {
        assert_eq!(
            stack
                .reserve("m", "u", 1, &format!("k{i}"))
                .await
                .unwrap()
                .0,
            201
        );
    }
    let active = stack
        .wait_active_and_standby(Duration::from_secs(10))
        .await
        .unwrap();
    let doc = stack.sequencer_status(active).await.unwrap();
    assert_eq!(
        (doc["role"].as_str(), doc["epoch"].as_u64()),
        (Some("active"), Some(1))
    );
    assert_eq!(
        doc["committed_offset"], 6,
        "one admin command and five reservations decided"
    );
    assert!(doc["batches_committed"].as_u64().unwrap() >= 1);
    // The standby has replayed the same batches.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stack.sequencer_status(1 - active).await.unwrap()["committed_offset"] != 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "the standby never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let metrics = stack.sequencer_metrics(active).await.unwrap();
    for series in [
        "sequencer_batch_commit_seconds_bucket",
        "sequencer_batch_size_bucket",
        "sequencer_decisions_total{partition=\"0\",outcome=\"held\"} 5",
        "sequencer_is_active{partition=\"0\"} 1",
        "sequencer_epoch{partition=\"0\"} 1",
        "sequencer_lag{partition=\"0\"} 0",
        "sequencer_oversell_skus{partition=\"0\"} 0",
        "sequencer_sku_units{sku=\"m\",state=\"held\"} 5",
    ] {
        assert!(metrics.contains(series), "missing {series} in:\n{metrics}");
    }

    let peers = format!(
        "http://127.0.0.1:{},http://127.0.0.1:{}",
        stack.sequencers[0].status_port, stack.sequencers[1].status_port
    );
    let out = Command::new(bin_dir().join("sequencer"))
        .args([
            "status",
            "--database-url",
            &stack.database_url,
            "--peers",
            &peers,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("epoch 1") && text.contains("role active") && text.contains("role standby"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_fails_loudly_on_a_corrupted_database() {
    let stack = Stack::start("ops_audit", Options::default()).await.unwrap();
    stack.put_sku("a", 10, 10, 300.0).await.unwrap();
    let (_, held) = stack.reserve("a", "u", 2, "k").await.unwrap();
    let clean = stack.audit().unwrap();
    assert_eq!(clean["violations"], json!([]));
    assert_eq!(
        (clean["skus"].as_i64(), clean["reservations"].as_i64()),
        (Some(1), Some(1))
    );

    // Corrupt one row behind the system's back: a held reservation marked confirmed.
    sqlx::query("UPDATE reservations SET status = 'confirmed' WHERE reservation_id = $1::uuid")
        .bind(held["reservation_id"].as_str().unwrap())
        .execute(&stack.pool)
        .await
        .unwrap();
    let out = Command::new(bin_dir().join("sequencer"))
        .args(["audit", "--database-url", &stack.database_url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "a violation exits 1: {text}");
    assert!(
        text.contains("VIOLATION counters equal the decision rows"),
        "{text}"
    );
    assert!(
        text.contains("VIOLATION finished reservations have their history event"),
        "{text}"
    );
    assert!(text.contains("audit: FAILED"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emergency_freeze_pauses_every_sku_in_one_call() {
    let stack = Stack::start("ops_freeze", Options::default())
        .await
        .unwrap();
    for sku in ["x", "y", "z"] {
        stack.put_sku(sku, 10, 10, 300.0).await.unwrap();
    }
    let (_, before) = stack.reserve("x", "u", 1, "before").await.unwrap();
    assert_eq!(
        stack.admin("POST", "/v1/admin/freeze", None).await.unwrap(),
        (200, json!({"skus_paused": 3}))
    );
    for sku in ["x", "y", "z"] {
        assert_eq!(
            stack
                .reserve(sku, "v", 1, &format!("frozen-{sku}"))
                .await
                .unwrap(),
            (409, json!({"error": "sale_paused"}))
        );
        assert_eq!(
            stack.get(&format!("/v1/skus/{sku}")).await.unwrap().1["status"],
            "paused"
        );
    }
    // Holds taken before the freeze can still be settled.
    let id = before["reservation_id"].as_str().unwrap();
    assert_eq!(stack.confirm(id).await.unwrap().0, 200);
    let (status, resumed) = stack
        .admin("POST", "/v1/admin/skus/y/resume", None)
        .await
        .unwrap();
    assert_eq!((status, resumed["status"].as_str()), (200, Some("on_sale")));
    assert_eq!(stack.reserve("y", "v", 1, "after").await.unwrap().0, 201);
    assert_eq!(
        stack.reserve("x", "v", 1, "after-x").await.unwrap().0,
        409,
        "only y was resumed"
    );
}
