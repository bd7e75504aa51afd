//! The working core, end to end: HTTP -> requests topic -> sequencer -> one Postgres transaction
//! per batch -> outcomes topic -> HTTP. Every test runs the real binaries against the real
//! Postgres and the real broker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use systest::load::{under_load, verify, UnderLoad};
use systest::{scalar, Options, Stack};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Sends every `(user, key, quantity)` at `concurrency` requests in flight; returns the answers.
async fn send_all(
    stack: &Arc<Stack>,
    sku: &str,
    requests: Vec<(String, String, i64)>,
    concurrency: usize,
) -> Vec<(String, String, u16, Value)> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    for (user, key, quantity) in requests {
        let (stack, gate, sku) = (stack.clone(), gate.clone(), sku.to_owned());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore open");
            let (status, body) = stack
                .reserve(&sku, &user, quantity, &key)
                .await
                .expect("HTTP round trip");
            (user, key, status, body)
        });
    }
    let mut answers = Vec::new();
    while let Some(r) = tasks.join_next().await {
        answers.push(r.expect("task"));
    }
    answers
}

fn assert_audit_clean(stack: &Stack) -> Value {
    let report = stack.audit().expect("audit runs");
    assert_eq!(
        report["violations"],
        json!([]),
        "audit found violations: {report}"
    );
    report
}

/// A system the test's tasks share, with one SKU on sale (holds of five minutes).
async fn shared_stack(test: &str, sku: &str, total: u64, per_user_limit: u32) -> Arc<Stack> {
    let stack = Stack::start(test, Options::default()).await.unwrap();
    stack
        .put_sku(sku, total, per_user_limit, 300.0)
        .await
        .unwrap();
    Arc::new(stack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_buyers_get_exactly_the_stock_and_never_more() {
    let stack = shared_stack("concurrency", "hot", 1_000, 2).await;
    let requests = (0..20_000)
        .map(|i| (format!("user-{}", i % 5_000), format!("key-{i}"), 1))
        .collect();
    let answers = send_all(&stack, "hot", requests, 256).await;

    let mut by_code: HashMap<String, usize> = HashMap::new();
    let mut held_ids = Vec::new();
    for (_, _, status, body) in &answers {
        match status {
            201 => {
                assert_eq!(body["status"], "held");
                held_ids.push(body["reservation_id"].as_str().unwrap().to_owned());
            }
            409 => {
                *by_code
                    .entry(body["error"].as_str().unwrap().to_owned())
                    .or_default() += 1
            }
            other => panic!("unexpected answer {other}: {body}"),
        }
    }
    assert_eq!(
        held_ids.len(),
        1_000,
        "exactly the stock is held; refusals: {by_code:?}"
    );
    let refused: usize = by_code.values().sum();
    assert_eq!(refused, 19_000);
    assert!(
        by_code
            .keys()
            .all(|c| c == "sold_out" || c == "limit_exceeded"),
        "{by_code:?}"
    );

    let row = stack.sku_row("hot").await.unwrap();
    assert_eq!((row["held"], row["available"], row["sold"]), (1_000, 0, 0));
    // Postgres agrees with the engine: every grant is held, every refusal a recorded decision,
    // and nothing else was written.
    let rows_by_status = stack
        .query_texts("SELECT status || ' ' || count(*) FROM decisions GROUP BY status ORDER BY 1")
        .await
        .unwrap();
    assert_eq!(rows_by_status, ["held 1000", "rejected 19000"]);
    let granted_ids = stack
        .query_texts("SELECT reservation_id::text FROM decisions WHERE status = 'held'")
        .await
        .unwrap();
    held_ids.sort();
    let mut granted_ids = granted_ids;
    granted_ids.sort();
    assert_eq!(
        held_ids, granted_ids,
        "the ids clients heard are the rows in Postgres"
    );
    let over_limit: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT user_id FROM decisions WHERE status = 'held'
                               GROUP BY user_id HAVING sum(quantity) > 2) x",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(over_limit, 0, "no buyer holds more than the per-user limit");
    assert_audit_clean(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_sent_three_times_reserves_once_and_answers_identically() {
    let stack = shared_stack("idempotency", "idem", 10, 5).await;
    let concurrent = send_all(
        &stack,
        "idem",
        vec![("alice".into(), "once".into(), 2); 3],
        3,
    )
    .await;
    let sequential = stack.reserve("idem", "alice", 2, "once").await.unwrap();
    let bodies: Vec<&Value> = concurrent
        .iter()
        .map(|a| &a.3)
        .chain([&sequential.1])
        .collect();
    for (_, _, status, _) in &concurrent {
        assert_eq!(*status, 201);
    }
    assert_eq!(sequential.0, 201);
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "identical answers: {bodies:?}"
    );

    // The header form of the key is the same key.
    let via_header = stack
        .http
        .post(format!("{}/v1/reservations", stack.base))
        .header("Idempotency-Key", "once")
        .json(&json!({"sku": "idem", "user_id": "alice", "quantity": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(via_header.status().as_u16(), 201);
    assert_eq!(&via_header.json::<Value>().await.unwrap(), bodies[0]);

    // Same key, different request: refused, and nothing more is reserved.
    let reused = stack.reserve("idem", "alice", 3, "once").await.unwrap();
    assert_eq!(reused, (422, json!({"error": "idempotency_key_reused"})));
    // Another user's identical key is another request.
    assert_eq!(
        stack.reserve("idem", "bob", 2, "once").await.unwrap().0,
        201
    );

    let rows = scalar(
        &stack,
        "SELECT count(*) FROM decisions WHERE user_id = 'alice'",
    )
    .await;
    assert_eq!(rows, 1, "one decision row for alice's key");
    let row = stack.sku_row("idem").await.unwrap();
    assert_eq!((row["held"], row["available"]), (4, 6));
    assert_audit_clean(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_confirm_cancel_and_expire_move_stock_as_specified() {
    let stack = Stack::start("lifecycle", Options::default()).await.unwrap();
    stack.put_sku("life", 3, 3, 300.0).await.unwrap();

    let (s, r1) = stack.reserve("life", "ann", 1, "a1").await.unwrap();
    assert_eq!(s, 201);
    let id1 = r1["reservation_id"].as_str().unwrap().to_owned();
    let (s, c) = stack.confirm(&id1).await.unwrap();
    assert_eq!((s, c["status"].as_str()), (200, Some("confirmed")));
    let row = stack.sku_row("life").await.unwrap();
    assert_eq!((row["available"], row["held"], row["sold"]), (2, 0, 1));
    assert_eq!(
        stack.confirm(&id1).await.unwrap().0,
        200,
        "confirm is idempotent"
    );
    assert_eq!(
        stack.cancel(&id1).await.unwrap(),
        (409, json!({"error": "reservation_confirmed"}))
    );

    let (_, r2) = stack.reserve("life", "ann", 1, "a2").await.unwrap();
    let id2 = r2["reservation_id"].as_str().unwrap().to_owned();
    assert_eq!(stack.sku_row("life").await.unwrap()["held"], 1);
    let (s, c) = stack.cancel(&id2).await.unwrap();
    assert_eq!((s, c["status"].as_str()), (200, Some("cancelled")));
    let row = stack.sku_row("life").await.unwrap();
    assert_eq!(
        (row["available"], row["held"], row["sold"]),
        (2, 0, 1),
        "cancel returns the units"
    );
    assert_eq!(
        stack.confirm(&id2).await.unwrap(),
        (409, json!({"error": "reservation_cancelled"}))
    );
    let (s, g) = stack.get(&format!("/v1/reservations/{id2}")).await.unwrap();
    assert_eq!((s, g["status"].as_str()), (200, Some("cancelled")));

    // Expiry: one unit, a one-second hold; the sequencer releases it without any traffic.
    stack.put_sku("short", 1, 1, 1.0).await.unwrap();
    let (s, first) = stack.reserve("short", "first", 1, "f").await.unwrap();
    assert_eq!(s, 201);
    let first_id = first["reservation_id"].as_str().unwrap().to_owned();
    assert_eq!(
        stack.reserve("short", "second", 1, "s1").await.unwrap(),
        (409, json!({"error": "sold_out"}))
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, g) = stack
            .get(&format!("/v1/reservations/{first_id}"))
            .await
            .unwrap();
        if g["status"] == "expired" {
            break;
        }
        assert!(Instant::now() < deadline, "hold never expired: {g}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = stack.sku_row("short").await.unwrap();
    assert_eq!(
        (row["available"], row["held"]),
        (1, 0),
        "the expired hold's unit is back"
    );
    assert_eq!(
        stack.reserve("short", "second", 1, "s2").await.unwrap().0,
        201,
        "a later buyer gets it"
    );
    assert_eq!(
        stack.confirm(&first_id).await.unwrap(),
        (409, json!({"error": "reservation_expired"}))
    );
    let events = stack
        .query_texts("SELECT status FROM reservation_events ORDER BY at")
        .await
        .unwrap();
    assert_eq!(
        events,
        ["confirmed", "cancelled", "expired"],
        "every move out of held is in the history"
    );

    let unknown = "0190f2a4-0000-7000-8000-000000000000";
    assert_eq!(
        stack
            .get(&format!("/v1/reservations/{unknown}"))
            .await
            .unwrap()
            .0,
        404
    );
    assert_eq!(
        stack.confirm(unknown).await.unwrap(),
        (404, json!({"error": "unknown_reservation"}))
    );
    let (s, sku) = stack.get("/v1/skus/short").await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        (
            sku["total"].as_i64(),
            sku["held"].as_i64(),
            sku["status"].as_str()
        ),
        (Some(1), Some(1), Some("sold_out"))
    );
    assert_audit_clean(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sequencer_killed_mid_load_loses_nothing_and_decides_nothing_twice() {
    // Small batches, so that commits often end inside one of the ingress's produce batches and
    // the restarted sequencer must resume reading in the middle of one.
    let options = Options {
        batch_size_max: 10,
        batch_size_backlog_max: 10,
        ..Options::default().with_outcome_timeout_ms(3_000)
    };
    let mut stack = Stack::start("crash", options).await.unwrap();
    let UnderLoad { load, .. } = under_load(&stack, "crashy", 2_000, 3_000, 64, 400)
        .await
        .unwrap();
    stack.signal_sequencer(0, "KILL").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.spawn_sequencer(0).unwrap();
    stack
        .wait_for_active(Duration::from_secs(30))
        .await
        .unwrap();
    let answers = load.wait().await;

    // Every definitive answer is recorded exactly once with the same outcome; every 504 retried
    // with its key gets the original outcome, and the original request (never a retry) is the
    // one decided: no log message was skipped.
    let verdict = verify(&stack, "crashy", &answers).await.unwrap();
    assert_eq!(verdict.errors_5xx, 0, "{verdict:?}");
    let row = stack.sku_row("crashy").await.unwrap();
    assert_eq!(
        row["held"], 2_000,
        "3000 distinct buyers for 2000 units: all units held"
    );
    eprintln!("crash test: {verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let stack = Stack::start("badinput", Options::default()).await.unwrap();
    stack.put_sku("good", 5, 2, 300.0).await.unwrap();
    let url = |p: &str| format!("{}{p}", stack.base);
    let post_raw = |body: &'static str, ct: &'static str| {
        stack
            .http
            .post(url("/v1/reservations"))
            .header("content-type", ct)
            .body(body)
    };
    let post_json = |body: &'static str| post_raw(body, "application/json");
    let put_good = |body: Value| stack.http.put(url("/v1/admin/skus/good")).json(&body);
    // Reservation bodies refused 422 invalid_request, by what is wrong with them.
    let invalid_bodies = [
        ("not an object", "[1,2]"),
        ("missing quantity", r#"{"sku":"good","user_id":"u"}"#),
        (
            "quantity zero",
            r#"{"sku":"good","user_id":"u","quantity":0}"#,
        ),
        (
            "quantity negative",
            r#"{"sku":"good","user_id":"u","quantity":-3}"#,
        ),
        (
            "quantity huge",
            r#"{"sku":"good","user_id":"u","quantity":99999999999999999999999}"#,
        ),
        (
            "quantity fractional",
            r#"{"sku":"good","user_id":"u","quantity":1.5}"#,
        ),
        (
            "quantity as string",
            r#"{"sku":"good","user_id":"u","quantity":"1"}"#,
        ),
        ("empty sku", r#"{"sku":"","user_id":"u","quantity":1}"#),
        (
            "sku with a slash",
            r#"{"sku":"a/b","user_id":"u","quantity":1}"#,
        ),
        (
            "control char in user",
            r#"{"sku":"good","user_id":"u\u0000","quantity":1}"#,
        ),
    ];
    let mut cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = invalid_bodies
        .into_iter()
        .map(|(what, body)| (what, post_json(body), 422, "invalid_request"))
        .collect();
    cases.extend([
        (
            "malformed JSON",
            post_json("{\"sku\": "),
            400,
            "invalid_request",
        ),
        (
            "text/plain body",
            post_raw(r#"{"sku":"good","user_id":"u","quantity":1}"#, "text/plain"),
            415,
            "unsupported_media_type",
        ),
        (
            "unknown sku",
            post_json(r#"{"sku":"nope","user_id":"u","quantity":1}"#),
            404,
            "unknown_sku",
        ),
        (
            "quantity above the per-user limit",
            post_json(r#"{"sku":"good","user_id":"u","quantity":3}"#),
            409,
            "limit_exceeded",
        ),
        (
            "reservation id not a uuid",
            stack.http.get(url("/v1/reservations/12345")),
            404,
            "unknown_reservation",
        ),
        (
            "unknown route",
            stack.http.get(url("/v2/whatever")),
            404,
            "not_found",
        ),
        (
            "wrong method",
            stack.http.delete(url("/v1/reservations")),
            405,
            "method_not_allowed",
        ),
        (
            "admin negative stock",
            put_good(json!({"total_stock": -1, "per_user_limit": 1, "hold_ttl_seconds": 1}))
                .bearer_auth(systest::ADMIN_TOKEN),
            422,
            "invalid_request",
        ),
    ]);
    // Admin routes without the admin token: 401 unauthorized.
    let one_unit = json!({"total_stock": 1, "per_user_limit": 1, "hold_ttl_seconds": 1});
    let unauthorized = [
        ("admin without token", put_good(one_unit.clone())),
        (
            "admin with wrong token",
            put_good(one_unit).bearer_auth("systest-admin-token-0123456788"),
        ),
        (
            "admin restock without token",
            stack
                .http
                .post(url("/v1/admin/skus/good/restock"))
                .json(&json!({"quantity": 5})),
        ),
        (
            "freeze without token",
            stack.http.post(url("/v1/admin/freeze")),
        ),
    ];
    cases.extend(unauthorized.map(|(what, request)| (what, request, 401, "unauthorized")));
    for (what, request, status, code) in cases {
        let r = request.send().await.unwrap();
        let got = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{what}: {body}"
        );
    }
    let oversized = format!(
        r#"{{"sku":"good","user_id":"{}","quantity":1}}"#,
        "x".repeat(6_000)
    );
    let r = stack
        .http
        .post(url("/v1/reservations"))
        .header("content-type", "application/json")
        .body(oversized)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "payload_too_large"
    );

    // Only the limit_exceeded refusal is a decision about stock; nothing else was written.
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, reject_reason FROM decisions")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![("rejected".to_owned(), Some("limit_exceeded".to_owned()))]
    );
    let row = stack.sku_row("good").await.unwrap();
    assert_eq!(
        (row["total"], row["available"], row["held"]),
        (5, 5, 0),
        "the sku is untouched"
    );
    assert_audit_clean(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id_that_names_its_decision_row() {
    let stack = Stack::start("request_id", Options::default())
        .await
        .unwrap();
    stack.put_sku("trace", 1, 1, 300.0).await.unwrap();
    let reserve =
        |user: &str, key: &str| {
            stack.http.post(format!("{}/v1/reservations", stack.base))
            .json(&json!({"sku": "trace", "user_id": user, "quantity": 1, "idempotency_key": key}))
            .send()
        };
    let header = |r: &reqwest::Response| r.headers()["x-request-id"].to_str().unwrap().to_owned();

    let granted = reserve("ann", "a").await.unwrap();
    let granted_id = header(&granted);
    let body: Value = granted.json().await.unwrap();
    assert_eq!(
        body["reservation_id"].as_str(),
        Some(granted_id.as_str()),
        "a grant's request id is its reservation id"
    );

    let refused = reserve("bob", "b").await.unwrap();
    let refused_id = header(&refused);
    assert_eq!(refused.status().as_u16(), 409);
    let row: (String, Option<String>) = sqlx::query_as(
        "SELECT user_id, reject_reason FROM decisions WHERE reservation_id = $1::uuid",
    )
    .bind(&refused_id)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        ("bob".to_owned(), Some("sold_out".to_owned())),
        "the refusal's row is keyed by the request id"
    );

    let read = stack.get_response("/v1/skus/trace").await.unwrap();
    assert!(
        read.headers().contains_key("x-request-id"),
        "reads carry one too"
    );
    assert_ne!(header(&read), refused_id);
}
