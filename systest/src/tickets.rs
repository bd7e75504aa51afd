//! Following asynchronous requests (tickets) to their decisions.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Stack;

/// Polls `GET /v1/tickets/{ticket}` until it is decided (it must be queued until then) and
/// returns the decided ticket; fails after `within`.
pub async fn until_decided(stack: &Stack, ticket: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = stack.get(&format!("/v1/tickets/{ticket}")).await.unwrap();
        assert_eq!(status, 200, "{body}");
        if body["state"] == "decided" {
            return body;
        }
        assert_eq!(body["state"], "queued", "{body}");
        assert!(Instant::now() < deadline, "{ticket} never decided: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks the decided tickets of one-unit reservations of `sku` by users `u{i}` with keys
/// `k{i}`, in queue order: the first `winners` hold a reservation, the same one the
/// synchronous retry of their key answers; the rest are sold out.
pub async fn assert_decided_in_order(stack: &Stack, sku: &str, decided: &[Value], winners: usize) {
    for (i, d) in decided.iter().enumerate() {
        if i < winners {
            assert_eq!(
                (d["status"].as_i64(), d["user_id"].as_str()),
                (Some(201), Some(format!("u{i}").as_str())),
                "{d}"
            );
            assert_eq!(d["reservation_status"], "held", "{d}");
            let (status, body) = stack
                .reserve(sku, &format!("u{i}"), 1, &format!("k{i}"))
                .await
                .unwrap();
            assert_eq!(status, 201, "{body}");
            assert_eq!(body["reservation_id"], d["reservation_id"], "{body} {d}");
        } else {
            assert_eq!(
                (d["status"].as_i64(), d["error"].as_str()),
                (Some(409), Some("sold_out")),
                "{d}"
            );
        }
    }
}
