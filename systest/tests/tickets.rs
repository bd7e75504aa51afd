//! Tickets: `Prefer: respond-async` answers 202 with a place in the log's queue, and
//! `GET /v1/tickets/{id}` follows the request to its decision, across a SIGKILL of the active
//! sequencer; a synchronous reservation whose outcome is late gets a ticket with its 504.

use std::time::Duration;

use serde_json::{json, Value};
use systest::tickets::{assert_decided_in_order, until_decided};
use systest::{Options, Stack};

async fn reserve_async(stack: &Stack, user: &str, key: &str) -> (u16, Option<String>, Value) {
    let r = stack
        .http
        .post(format!("{}/v1/reservations", stack.base))
        .header("prefer", "respond-async")
        .json(&json!({"sku": "tv", "user_id": user, "quantity": 1, "idempotency_key": key}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let location = r
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, location, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ticket_shows_its_place_in_the_queue_then_its_decision_across_a_failover() {
    let options = Options::sequencers(2).with_outcome_timeout_ms(1_500);
    let mut stack = Stack::start("tickets", options).await.unwrap();
    stack.put_sku("tv", 3, 1, 300.0).await.unwrap();

    // While nothing decides, five tickets queue up behind each other in the log.
    let active = stack.freeze_sequencers().await.unwrap();
    let standby = 1 - active;
    let mut tickets = Vec::new();
    for i in 0..5 {
        let (status, location, body) =
            reserve_async(&stack, &format!("u{i}"), &format!("k{i}")).await;
        assert_eq!(status, 202, "{body}");
        let ticket = body["ticket_id"].as_str().unwrap().to_owned();
        assert_eq!(
            location.as_deref(),
            Some(format!("/v1/tickets/{ticket}").as_str())
        );
        tickets.push((ticket, body));
    }
    // Positions count the requests ahead: they grow by one per ticket, whatever the ingress's
    // last reading of the committed offset was.
    let mut positions = Vec::new();
    for (ticket, _) in &tickets {
        let (status, body) = stack.get(&format!("/v1/tickets/{ticket}")).await.unwrap();
        assert_eq!(
            (status, body["state"].as_str()),
            (200, Some("queued")),
            "{body}"
        );
        positions.push(body["position"].as_i64().unwrap());
    }
    assert!(positions[0] >= 0, "{positions:?}");
    assert!(
        positions.windows(2).all(|w| w[1] == w[0] + 1),
        "one more ahead of each: {positions:?}"
    );
    // A synchronous reservation now waits in vain: its 504 carries a ticket.
    let (status, late) = stack.reserve("tv", "u5", 1, "k5").await.unwrap();
    assert_eq!(status, 504, "{late}");
    let late_ticket = late["ticket_id"]
        .as_str()
        .expect("a 504 of an appended request has a ticket")
        .to_owned();

    // The active dies while frozen; the standby wakes, takes over and decides the queue in log
    // order: three units, the first three tickets get them.
    stack.signal_sequencer(active, "KILL").unwrap();
    stack.signal_sequencer(standby, "CONT").unwrap();
    let mut decided = Vec::new();
    for (ticket, _) in &tickets {
        decided.push(until_decided(&stack, ticket, Duration::from_secs(30)).await);
    }
    assert_decided_in_order(&stack, "tv", &decided, 3).await;
    let d = until_decided(&stack, &late_ticket, Duration::from_secs(30)).await;
    assert_eq!(
        (d["status"].as_i64(), d["error"].as_str()),
        (Some(409), Some("sold_out")),
        "{d}"
    );

    // A ticket that names no request: 404 unknown_ticket.
    for bogus in [
        "nope".to_owned(),
        format!("{}.0", uuid::Uuid::now_v7()),
        format!("{}.-3", uuid::Uuid::now_v7()),
    ] {
        let (status, body) = stack.get(&format!("/v1/tickets/{bogus}")).await.unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("unknown_ticket")),
            "{bogus}: {body}"
        );
    }
    let row = stack.sku_row("tv").await.unwrap();
    assert_eq!((row["held"], row["available"]), (3, 0));
    let report = stack.audit().unwrap();
    assert_eq!(report["violations"], json!([]), "{report}");
}
