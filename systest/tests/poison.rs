//! Anything can be appended to the requests topic, not only what an ingress validated. One
//! hostile or broken message must never stop the single writer: it is refused (or skipped, when
//! it is not even a message) and the sale goes on, in the same process.

use std::time::Duration;

use systest::{scalar, Options, Stack};
use wire::{Command, Request, SkuConfig};

fn raw(command: Command, id: u128) -> Vec<u8> {
    wire::encode(&Request {
        request_id: id,
        ingress_id: 0xbad,
        command,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_on_the_requests_topic_are_refused_and_the_sale_goes_on() {
    let mut stack = Stack::start("poison", Options::default()).await.unwrap();
    stack.put_sku("p", 10, 2, 300.0).await.unwrap();
    let pid = stack.sequencers[0].child.as_ref().unwrap().id();
    let base = uuid::Uuid::now_v7().as_u128();
    let reserve = |user: &str, key: &str| Command::Reserve {
        sku: "p".into(),
        user_id: user.into(),
        quantity: 1,
        idempotency_key: key.into(),
    };
    let far_future = SkuConfig {
        total_stock: 5,
        per_user_limit: 1,
        hold_ttl_ms: 60_000,
        starts_at_ms: Some(i64::MAX),
        ends_at_ms: None,
        queue: None,
    };
    let poison = vec![
        // A NUL byte: Postgres text cannot store it, so a decision row would fail every commit.
        raw(reserve("nul\0user", "k1"), base + 1),
        raw(reserve("u1", "key\0"), base + 2),
        // A start time no timestamp can hold.
        raw(
            Command::UpsertSku {
                sku: "far".into(),
                config: far_future,
            },
            base + 3,
        ),
        raw(reserve("", "k2"), base + 4),
        raw(reserve(&"u".repeat(10_000), "k3"), base + 5),
        // Not even one of our messages.
        b"definitely not a request".to_vec(),
        vec![0xFF; 3],
    ];
    stack.produce_requests(&poison).unwrap();

    // The sale goes on: a buyer after the poison is decided, by the same process.
    let (status, body) = stack.reserve("p", "alice", 1, "a-1").await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert!(
        stack.sequencers[0]
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "the sequencer is still running"
    );
    assert_eq!(stack.sequencers[0].child.as_ref().unwrap().id(), pid);
    let doc = stack.sequencer_status(0).await.unwrap();
    assert_eq!(doc["role"], "active", "{doc}");

    // Nothing of the poison was stored; every offset was consumed.
    let stored = stack
        .query_texts("SELECT user_id FROM decisions ORDER BY 1")
        .await
        .unwrap();
    assert_eq!(stored, vec!["alice".to_owned()]);
    let far = scalar(&stack, "SELECT count(*) FROM skus WHERE sku = 'far'").await;
    assert_eq!(far, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let doc = stack.sequencer_status(0).await.unwrap();
        if doc["lag"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "lag stays: {doc}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let audit = stack.audit().unwrap();
    assert_eq!(audit["violations"], serde_json::json!([]), "{audit}");
}
