//! Admin commands are safe to retry: a restock carries an `Idempotency-Key` and adds its units
//! once per key, whatever happens between the tries (a 504, a failover, a restart that loads the
//! state from a checkpoint). Real binaries, Postgres and broker, over HTTP.

use std::time::Duration;

use serde_json::{json, Value};
use systest::{assert_error, Options, Stack};

const RESTOCK: &str = "/v1/admin/skus/tee/restock";

async fn restock(stack: &Stack, quantity: u64, key: Option<&str>) -> (u16, Value) {
    stack
        .admin_keyed("POST", RESTOCK, Some(json!({ "quantity": quantity })), key)
        .await
        .unwrap()
}

async fn total(stack: &Stack) -> i64 {
    stack.sku_row("tee").await.unwrap()["total"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_restock_adds_its_units_once_across_a_timeout_a_failover_and_a_restart() {
    let options = Options::sequencers(2)
        .with_outcome_timeout_ms(1_500)
        .with_sequencer_env(0, "CHECKPOINT_INTERVAL_MS", "300")
        .with_sequencer_env(1, "CHECKPOINT_INTERVAL_MS", "300");
    let mut stack = Stack::start("admin_retry", options).await.unwrap();
    stack.put_sku("tee", 10, 1, 60.0).await.unwrap();

    // Without a key a restock is refused before the log: a retry could not be recognised.
    let (code, body) = restock(&stack, 5, None).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"], "idempotency_key_required", "{body}");
    assert_eq!(total(&stack).await, 10);

    // Sent twice under one key: applied once, the same answer twice.
    let (code, first) = restock(&stack, 5, Some("restock-1")).await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["total"], 15, "{first}");
    let (code, again) = restock(&stack, 5, Some("restock-1")).await;
    assert_eq!((code, &again), (200, &first));
    assert_eq!(total(&stack).await, 15, "the retry added nothing");

    // Another command under a used key is refused, and changes nothing.
    let (code, body) = restock(&stack, 7, Some("restock-1")).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"], "idempotency_key_reused", "{body}");
    let (code, body) = stack
        .admin_keyed("POST", "/v1/admin/skus/tee/pause", None, Some("restock-1"))
        .await
        .unwrap();
    assert_error(code, &body, (422, "idempotency_key_reused"));
    assert_eq!(total(&stack).await, 15);

    // The answer is lost (both sequencers frozen: 504 naming the key); the command is decided
    // once they wake, and the operator's retry gets its outcome without adding units again.
    let active = stack.freeze_sequencers().await.unwrap();
    let standby = 1 - active;
    let (code, body) = restock(&stack, 5, Some("restock-2")).await;
    assert_eq!(code, 504, "{body}");
    assert_eq!(body["error"], "outcome_unknown", "{body}");
    assert_eq!(body["idempotency_key"], "restock-2", "{body}");
    stack.signal_sequencer(active, "CONT").unwrap();
    stack.signal_sequencer(standby, "CONT").unwrap();
    let (code, body) = retry_until_decided(&stack, 5, "restock-2").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["total"], 20, "{body}");
    assert_eq!(total(&stack).await, 20);
    // The frozen leader's lease lapsed: if the standby woke first and took over, the old leader
    // was fenced and exited (code 3, safe to restart). Start it again as the standby.
    for i in 0..2 {
        if let Ok(code) = stack.wait_sequencer_exit(i, Duration::from_millis(500)) {
            assert_eq!(code, Some(3), "sequencer {i} exited other than fenced");
            stack.spawn_sequencer(i).unwrap();
        }
    }
    stack
        .wait_active_and_standby(Duration::from_secs(20))
        .await
        .unwrap();

    // Failover: the standby decides now; it followed the log, so it knows both keys.
    let active = stack
        .wait_for_active(Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await; // a checkpoint of the keyed batches
    let new_active = stack
        .kill_and_wait_active(active, Duration::from_secs(10))
        .await
        .unwrap();
    assert_ne!(new_active, active);
    let (code, body) = restock(&stack, 5, Some("restock-1")).await;
    assert_eq!(
        (code, &body),
        (200, &first),
        "the first answer, after a failover"
    );
    assert_eq!(total(&stack).await, 20);

    // Restart: the killed one comes back and loads its state (from a checkpoint, which does not
    // carry the keys: they come from admin_commands); then it is the only one left.
    stack.spawn_sequencer(active).unwrap();
    stack
        .wait_role(active, "standby", Duration::from_secs(20))
        .await
        .unwrap();
    // "standby" is reported from the start; loaded_from once the state is loaded.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let doc = loop {
        let doc = stack.sequencer_status(active).await.unwrap_or_default();
        if !doc["loaded_from"].is_null() || std::time::Instant::now() > deadline {
            break doc;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(doc["loaded_from"], "checkpoint", "{doc}");
    stack.signal_sequencer(new_active, "KILL").unwrap();
    stack
        .wait_role(active, "active", Duration::from_secs(10))
        .await
        .unwrap();
    for key in ["restock-1", "restock-2"] {
        let (code, body) = restock(&stack, 5, Some(key)).await;
        assert_eq!(code, 200, "{key}: {body}");
        assert_eq!(total(&stack).await, 20, "{key} retried after a restart");
    }
    let (code, body) = restock(&stack, 9, Some("restock-2")).await;
    assert_error(code, &body, (422, "idempotency_key_reused"));

    // A new key adds its units; Postgres holds one row per key.
    let (code, body) = restock(&stack, 1, Some("restock-3")).await;
    assert_eq!((code, body["total"].as_i64()), (200, Some(21)));
    let keys = stack
        .query_texts("SELECT idempotency_key FROM admin_commands ORDER BY batch_seq")
        .await
        .unwrap();
    assert_eq!(keys, ["restock-1", "restock-2", "restock-3"]);
    let audit = stack.audit().unwrap();
    assert_eq!(audit["violations"], json!([]), "{audit}");
}

/// Retries a restock under `key` until it is decided (not 503/504).
async fn retry_until_decided(stack: &Stack, quantity: u64, key: &str) -> (u16, Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = restock(stack, quantity, Some(key)).await;
        if code != 503 && code != 504 {
            return (code, body);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{key} never decided: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
