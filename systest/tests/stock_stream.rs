//! The live stock stream (`GET /v1/skus/{sku}/events`, Server-Sent Events) on the real path:
//! the sequencer publishes each committed batch's counters with its outcomes, the ingress fans
//! them out. Counts are committed ones, coalesced to at most 10 events a second, and the stream
//! goes on across a failover; the number of streams is bounded.

use std::time::{Duration, Instant};

use serde_json::Value;
use systest::{assert_error, Options, Stack};

/// One SSE event: its `event`, `id` and `data` (JSON), and when it arrived.
#[derive(Debug)]
struct SseEvent {
    event: String,
    id: Option<u64>,
    data: Value,
    at: Instant,
}

struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(stack: &Stack, sku: &str) -> reqwest::Response {
        stack
            .http
            .get(format!("{}/v1/skus/{sku}/events", stack.base))
            .send()
            .await
            .unwrap()
    }

    fn new(response: reqwest::Response) -> EventStream {
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        EventStream {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (comments, the heartbeats, skipped), or `None` after `within`.
    async fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue; // a comment: the heartbeat
                }
                return Some(SseEvent {
                    event,
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                    at: Instant::now(),
                });
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .ok()?
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Events until one shows `available`; all of them.
    async fn until_available(&mut self, available: i64, within: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + within;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(e) = self.next(left).await else {
                panic!("no event with available {available} within {within:?}: {events:?}");
            };
            let done = e.data["available"] == available;
            events.push(e);
            if done {
                return events;
            }
        }
    }
}

fn check_counts(e: &SseEvent) {
    assert_eq!(e.event, "stock", "{e:?}");
    let d = &e.data;
    let n = |k: &str| d[k].as_i64().unwrap();
    assert_eq!(n("available") + n("held") + n("sold"), n("total"), "{e:?}");
    assert!(d["status"].is_string(), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_shows_committed_counts_falling_coalesced_and_across_a_failover() {
    let mut stack = Stack::start(
        "stock_stream",
        Options {
            sequencers: 2,
            extra_ingress_env: vec![("STREAM_SUBSCRIBERS_MAX".into(), "3".into())],
            ..Options::default()
        },
    )
    .await
    .unwrap();
    stack.put_sku("tv", 100, 1, 300.0).await.unwrap();

    // At once: the counts as committed.
    let mut stream = EventStream::new(EventStream::open(&stack, "tv").await);
    let first = stream.next(Duration::from_secs(5)).await.unwrap();
    check_counts(&first);
    assert_eq!(first.data["available"], 100);
    assert_eq!(first.data["status"], "on_sale");

    // 40 reservations, 8 at a time: the stream follows them down to 60, never ahead of
    // Postgres and never going back up, at most one event per 100 ms.
    // Read while the reservations go on, so that arrival times mean something.
    let reader = tokio::spawn(async move {
        let events = stream.until_available(60, Duration::from_secs(15)).await;
        (stream, events)
    });
    for round in 0..5 {
        reserve_all(&stack, round * 8..round * 8 + 8).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (mut stream, events) = reader.await.unwrap();
    let mut previous = &first;
    for e in &events {
        check_counts(e);
        assert!(
            e.data["available"].as_i64() < previous.data["available"].as_i64(),
            "counts only fall here: {previous:?} then {e:?}"
        );
        assert!(
            e.id > previous.id,
            "ids are the committing batches: {previous:?} {e:?}"
        );
        assert!(
            e.at.duration_since(previous.at) >= Duration::from_millis(80),
            "more than 10 events a second: {previous:?} then {e:?}"
        );
        previous = e;
    }
    println!(
        "40 reservations in 5 rounds: {} events over {:?}",
        events.len(),
        previous.at.duration_since(first.at)
    );
    assert!(
        events.len() >= 3,
        "rounds 250 ms apart are seen apart: {events:?}"
    );
    let row = stack.sku_row("tv").await.unwrap();
    assert_eq!(
        row["available"], 60,
        "the last event is what Postgres holds"
    );
    assert_eq!(previous.data["held"], 40);

    // Unknown SKUs: 404, no stream.
    let (status, body) = stack.get("/v1/skus/nope/events").await.unwrap();
    assert_error(status, &body, (404, "unknown_sku"));

    // Bounded: two more streams fit (three in all), the fourth gets 503 with Retry-After.
    let second = EventStream::new(EventStream::open(&stack, "tv").await);
    let _third = EventStream::new(EventStream::open(&stack, "tv").await);
    let over = EventStream::open(&stack, "tv").await;
    assert_eq!(over.status(), 503);
    assert!(over.headers().contains_key("retry-after"));
    let body: Value = over.json().await.unwrap();
    assert_eq!(body["error"], "overloaded", "{body}");
    let metrics = stack.ingress_metrics().await.unwrap();
    assert!(metrics.contains("ingress_stock_streams 3"), "{metrics}");
    drop(second);

    // Failover: the standby's batches are published too, and the same stream goes on.
    let active = stack
        .wait_for_active(Duration::from_secs(10))
        .await
        .unwrap();
    stack.signal_sequencer(active, "KILL").unwrap();
    stack
        .wait_for_active(Duration::from_secs(10))
        .await
        .unwrap();
    reserve_all(&stack, 40..50).await;
    let events = stream.until_available(50, Duration::from_secs(10)).await;
    events.iter().for_each(check_counts);
    // A pause is a change of the SKU too.
    let (status, _) = stack
        .admin("POST", "/v1/admin/skus/tv/pause", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let paused = stream.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(paused.data["status"], "paused", "{paused:?}");
}

/// Buyers `range` reserve one unit of "tv" each, all at once; every one is granted.
async fn reserve_all(stack: &Stack, range: std::ops::Range<usize>) {
    futures_util::future::join_all(range.map(|i| async move {
        let (status, body) = stack.reserve_one("tv", i).await.unwrap();
        assert_eq!(status, 201, "{body}");
    }))
    .await;
}
