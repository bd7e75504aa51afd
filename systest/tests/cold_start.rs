//! The day after a big sale: a million decisions stored, every sequencer killed, both started
//! again. The system must decide again within seconds (from a checkpoint, replaying only what
//! came after it), and every earlier decision must be intact: replays of old keys get their
//! first outcomes, the audit is clean.
//!
//! The million decisions are made on the real path: raw request messages appended to the
//! requests topic (as an ingress would), decided by the real sequencer, which writes its rows,
//! batches and checkpoints as in a sale.

use std::time::{Duration, Instant};

use serde_json::Value;
use systest::{Options, Stack};
use wire::{Command, Request};

const DECISIONS: u64 = 1_000_000;
const STOCK: u64 = 1_000;

fn request(base: u128, n: u64) -> Request {
    Request {
        request_id: base + u128::from(n),
        // No ingress waits for these outcomes.
        ingress_id: 0x5eed,
        command: Command::Reserve {
            sku: "hot".into(),
            user_id: format!("buyer-{n}"),
            quantity: 1,
            idempotency_key: format!("k-{n}"),
        },
    }
}

/// Waits until some sequencer is active and has committed everything below `offset`.
async fn wait_committed(stack: &Stack, offset: i64, within: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + within;
    let mut last_print = Instant::now();
    loop {
        for i in 0..stack.sequencers.len() {
            if let Some(doc) = stack.sequencer_status(i).await {
                if doc["role"] == "active" && doc["committed_offset"].as_i64() >= Some(offset) {
                    return Ok(doc);
                }
                if doc["role"] == "active" && last_print.elapsed() > Duration::from_secs(10) {
                    eprintln!("committed {} of {offset}", doc["committed_offset"]);
                    last_print = Instant::now();
                }
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "offset {offset} not committed within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_million_decisions_a_cold_start_decides_again_within_seconds_and_keeps_every_decision(
) -> anyhow::Result<()> {
    let mut stack = Stack::start(
        "coldstart",
        Options {
            sequencers: 2,
            batch_size_max: 2_000,
            batch_size_backlog_max: 2_000,
            ..Options::default()
        },
    )
    .await?;
    stack.put_sku("hot", STOCK, 1, 3_600.0).await?;
    let base = uuid::Uuid::now_v7().as_u128();
    let payloads: Vec<Vec<u8>> = (0..DECISIONS)
        .map(|n| wire::encode(&request(base, n)))
        .collect();
    stack.produce_requests(&payloads)?;
    drop(payloads);
    // Offset 0 is the SKU; the reserves follow it.
    let end = DECISIONS as i64 + 1;
    wait_committed(&stack, end, Duration::from_secs(900)).await?;
    // Once traffic stops, a checkpoint of the last batch is written within
    // CHECKPOINT_INTERVAL_MS (5 s). Waiting for that one, not for any: a checkpoint written
    // mid-load would leave the restart a long delta to encode on its first checkpoint, which a
    // debug build takes seconds over (the decide thread encodes deltas), and the test would be
    // timing-dependent.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if checkpoint_of_last_batch(&stack).await? {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no checkpoint of the last batch written within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM decisions")
        .fetch_one(&stack.pool)
        .await?;
    assert_eq!(stored, DECISIONS as i64, "one decision row per request");

    // What a sample of buyers was told, from the rows: the first STOCK got holds.
    let sample: Vec<u64> = (0..20)
        .chain((0..200).map(|i| STOCK + i * (DECISIONS - STOCK) / 200))
        .collect();
    let users: Vec<String> = sample.iter().map(|n| format!("buyer-{n}")).collect();
    let rows: Vec<(String, String, uuid::Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT user_id, idempotency_key, reservation_id, status, reject_reason FROM decisions
          WHERE user_id = ANY($1)",
    )
    .bind(&users)
    .fetch_all(&stack.pool)
    .await?;
    assert_eq!(rows.len(), sample.len(), "one decision per sampled buyer");
    let first: Vec<(u64, uuid::Uuid, String, Option<String>)> = rows
        .into_iter()
        .map(|(user, key, id, status, reason)| {
            let n: u64 = user["buyer-".len()..].parse().expect("a sampled buyer");
            assert_eq!(key, format!("k-{n}"), "buyer {n}'s key");
            (n, id, status, reason)
        })
        .collect();

    // Every sequencer dies; both come back.
    for i in 0..stack.sequencers.len() {
        stack.signal_sequencer(i, "KILL")?;
    }
    let restarted = Instant::now();
    for i in 0..stack.sequencers.len() {
        stack.spawn_sequencer(i)?;
    }
    // A new buyer is decided again (held or refused, but decided), within a bound.
    let bound = Duration::from_secs(60);
    let decided = loop {
        let (status, body) = stack.reserve("hot", "late-buyer", 1, "late-1").await?;
        if status == 201 || status == 409 {
            break body;
        }
        assert!(
            status == 503 || status == 504,
            "while restarting: {status} {body}"
        );
        assert!(
            restarted.elapsed() < bound,
            "no decision within {bound:?} of the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = restarted.elapsed();
    eprintln!("cold start with {DECISIONS} decisions: first new decision {took:?} after the restart ({decided})");
    let active = stack.wait_for_active(Duration::from_secs(10)).await?;
    let doc = stack
        .sequencer_status(active)
        .await
        .expect("active answers");
    assert_eq!(
        doc["loaded_from"], "checkpoint",
        "the state came from a checkpoint, not the rows: {doc}"
    );

    // Every sampled buyer's retry gets the first outcome.
    for (n, id, status, reason) in first {
        let (code, body) = stack
            .reserve("hot", &format!("buyer-{n}"), 1, &format!("k-{n}"))
            .await?;
        match (status.as_str(), reason.as_deref()) {
            ("held", None) => {
                assert_eq!(code, 201, "buyer {n}: {body}");
                assert_eq!(body["reservation_id"], id.to_string(), "buyer {n}");
            }
            ("rejected", Some(reason)) => {
                assert_eq!(code, 409, "buyer {n}: {body}");
                assert_eq!(body["error"], reason, "buyer {n}");
            }
            other => panic!("buyer {n}: unexpected row {other:?}"),
        }
    }
    let stored_after: i64 = sqlx::query_scalar("SELECT count(*) FROM decisions")
        .fetch_one(&stack.pool)
        .await?;
    assert_eq!(
        stored_after,
        DECISIONS as i64 + 1,
        "replays wrote nothing; the late buyer one row"
    );
    let row = stack.sku_row("hot").await?;
    assert_eq!(row["held"] + row["sold"], STOCK as i64, "{row:?}");

    // The new leader goes on extending the checkpoint chain it loaded.
    let before: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT max(batch_seq) FROM checkpoints), (SELECT count(*) FROM checkpoint_deltas)",
    )
    .fetch_one(&stack.pool)
    .await?;
    let more: Vec<Vec<u8>> = (DECISIONS..DECISIONS + 20_000)
        .map(|n| wire::encode(&request(base, n)))
        .collect();
    stack.produce_requests(&more)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let after: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT max(batch_seq) FROM checkpoints), (SELECT count(*) FROM checkpoint_deltas)",
        )
        .fetch_one(&stack.pool)
        .await?;
        if after.0 > before.0 && after.1 > before.1 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no new checkpoint after the restart: before {before:?}, now {after:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The audit compares the newest checkpoint with the rows, and notices when they differ.
    let audit = stack.audit()?;
    assert_eq!(audit["violations"], serde_json::json!([]), "{audit}");
    assert!(
        audit["checkpoint_batch_seq"].as_u64() > Some(0),
        "the audit compared a checkpoint: {audit}"
    );
    // Buyer 5000 was refused (sold out): its refusal is an element of its batch's arrays.
    let tampered = sqlx::query(
        "UPDATE refusals f SET reasons[t.i] = 'limit_exceeded'
           FROM (SELECT batch_seq, i FROM refusals, generate_subscripts(user_ids, 1) AS i
                  WHERE user_ids[i] = 'buyer-5000' AND idempotency_keys[i] = 'k-5000') t
          WHERE f.batch_seq = t.batch_seq",
    )
    .execute(&stack.pool)
    .await?
    .rows_affected();
    assert_eq!(tampered, 1, "buyer 5000's refusal is stored once");
    let audit = stack.audit()?;
    let violations = audit["violations"].to_string();
    assert!(
        violations.contains("checkpoint of batch") && violations.contains("buyer-5000"),
        "a row that differs from the checkpoint is reported: {audit}"
    );
    Ok(())
}

/// Checkpoints stored so far.
async fn checkpoint_of_last_batch(stack: &Stack) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM checkpoints
                         WHERE batch_seq = (SELECT max(batch_seq) FROM batches))",
    )
    .fetch_one(&stack.pool)
    .await?)
}
