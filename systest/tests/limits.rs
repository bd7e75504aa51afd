//! Honest readiness and the HTTP server's limits, against the real binaries, Postgres and
//! broker: writes are refused at once (503 `no_sequencer`) while no sequencer commits, a slow
//! client cannot hold a connection past the header or body deadline, and connections over
//! CONNECTIONS_MAX are refused while the earlier ones are served.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use systest::{scalar, stack_with_ingress_env, Options, Stack, ADMIN_TOKEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(stack: &Stack) -> String {
    stack.base.trim_start_matches("http://").to_owned()
}

async fn ingress_ready(stack: &Stack) -> (u16, Value) {
    stack.get("/readyz").await.unwrap()
}

/// Reads one HTTP/1.1 response (headers and a Content-Length body) or up to EOF; `None` when
/// the connection was closed (or reset) before any byte came. Gives up after `within`.
async fn read_response(stream: &mut TcpStream, within: Duration) -> Option<(u16, String)> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => panic!("no answer and no close within {within:?}: {buf:?}"),
            Ok(Ok(n)) => n,
            Ok(Err(_)) => 0,
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    if buf.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    Some((status, text))
}

/// True when the server closed the connection within `within` (EOF or reset), false when it
/// was still open then.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: ingress\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_get_503_at_once_while_no_sequencer_commits_and_a_quiet_sale_stays_ready() {
    // Outcomes would time out after two minutes, the client gives up after 15 s: a 503 can
    // only come from the stall check.
    let options = Options::sequencers(2)
        .with_lease_ms(30_000, 1_000)
        .with_outcome_timeout_ms(120_000)
        .with_ingress_env(&[("STALL_MAX_MS", "1000")]);
    let mut stack = Stack::start("stall", options).await.unwrap();
    stack.put_sku("s", 100, 5, 300.0).await.unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let base = stack.base.clone();
    let reserve = |user: &str, key: &str| {
        client
            .post(format!("{base}/v1/reservations"))
            .json(&json!({"sku": "s", "user_id": user, "quantity": 1, "idempotency_key": key}))
    };

    // A quiet sale, longer than STALL_MAX_MS without a commit, is no stall.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (code, ready) = ingress_ready(&stack).await;
    assert_eq!(code, 200, "{ready}");

    // Both sequencers paused; one buyer gets appended and waits.
    stack.signal_sequencer(0, "STOP").unwrap();
    stack.signal_sequencer(1, "STOP").unwrap();
    let waiting = tokio::spawn(reserve("early", "early").send());
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let (code, body) = ingress_ready(&stack).await;
        if code == 503 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the ingress stayed ready while nothing was committed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ready["checks"]["sequencer"], "stalled", "{ready}");
    assert!(
        ready["detail"].as_str().unwrap().contains("no sequencer"),
        "{ready}"
    );

    // New buyers are refused at once, with Retry-After, and nothing is appended for them.
    for i in 0..3 {
        let r = reserve(&format!("late-{i}"), &format!("late-{i}"))
            .send()
            .await
            .expect("an answer well before the outcome timeout");
        assert_eq!(r.status().as_u16(), 503);
        assert!(r.headers().contains_key("retry-after"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "no_sequencer", "{body}");
    }
    // The operator's commands are exempt: the pause is appended and waits for a sequencer.
    let pause = tokio::spawn(
        client
            .post(format!("{}/v1/admin/skus/s/pause", stack.base))
            .bearer_auth(ADMIN_TOKEN)
            .send(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = stack.get("/v1/skus/s").await.unwrap();
        let metrics = stack.ingress_metrics().await.unwrap();
        if metrics.contains("ingress_writes_in_flight 2") {
            break;
        }
        assert!(Instant::now() < deadline, "the pause was not admitted: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stack.signal_sequencer(0, "CONT").unwrap();
    stack.signal_sequencer(1, "CONT").unwrap();
    let early = waiting.await.unwrap().unwrap();
    assert_eq!(early.status().as_u16(), 201);
    let paused = pause.await.unwrap().unwrap();
    assert_eq!(paused.status().as_u16(), 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = ingress_ready(&stack).await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready again: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = scalar(&stack, "SELECT count(*) FROM decisions").await;
    assert_eq!(n, 1, "the refused buyers left no trace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_after_the_header_and_body_deadlines() {
    // One second for the header and one for the body.
    let deadlines = [
        ("HEADER_READ_TIMEOUT_MS", "1000"),
        ("BODY_READ_TIMEOUT_MS", "1000"),
    ];
    let stack = stack_with_ingress_env("slowloris", &deadlines).await;

    // Half a header, then nothing: closed after the header deadline.
    let mut half = TcpStream::connect(addr(&stack)).await.unwrap();
    half.write_all(b"POST /v1/reservations HTTP/1.1\r\nHost: ingress\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut half, Duration::from_secs(10)).await,
        "a half-sent header held the connection"
    );

    // A whole header, then a body trickled a byte every 200 ms: one deadline for the whole
    // body (not per chunk), 408 and the connection closed.
    let mut slow = TcpStream::connect(addr(&stack)).await.unwrap();
    slow.write_all(
        b"POST /v1/reservations HTTP/1.1\r\nHost: ingress\r\nContent-Type: application/json\r\n\
          Content-Length: 200\r\n\r\n{",
    )
    .await
    .unwrap();
    let (mut reader, mut writer) = slow.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if writer.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(8), reader.read_to_end(&mut buf)).await;
    trickle.abort();
    let text = String::from_utf8_lossy(&buf);
    assert!(
        read.is_ok(),
        "the trickled body held the connection: {text}"
    );
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");

    // Prompt clients are unaffected.
    let (s, _) = stack.get("/healthz").await.unwrap();
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_while_the_held_ones_are_served() {
    const MAX: usize = 4;
    let stack = stack_with_ingress_env(
        "connmax",
        &[
            ("CONNECTIONS_MAX", "4"),
            ("HEADER_READ_TIMEOUT_MS", "60000"),
        ],
    )
    .await;
    // The stack's own client may hold a few idle connections already: open more until one is
    // refused, which must happen by the (MAX+1)th.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..=MAX {
        let mut c = TcpStream::connect(addr(&stack)).await.unwrap();
        c.write_all(HEALTHZ).await.unwrap();
        match read_response(&mut c, Duration::from_secs(10)).await {
            Some((200, _)) => held.push(c),
            Some((503, text)) => {
                refused = Some((c, text));
                break;
            }
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    let (mut over, text) = refused.expect("no connection was refused over CONNECTIONS_MAX");
    assert!(text.contains("\"overloaded\""), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );
    assert!(
        closed_within(&mut over, Duration::from_secs(5)).await,
        "the refused connection was left open"
    );
    // The held connections are still served.
    for c in &mut held {
        c.write_all(HEALTHZ).await.unwrap();
        let (s, _) = read_response(c, Duration::from_secs(10)).await.unwrap();
        assert_eq!(s, 200);
    }
    // Once they close, new connections are accepted again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = TcpStream::connect(addr(&stack)).await.unwrap();
        c.write_all(HEALTHZ).await.unwrap();
        if let Some((200, _)) = read_response(&mut c, Duration::from_secs(10)).await {
            break;
        }
        assert!(Instant::now() < deadline, "no connection accepted again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
