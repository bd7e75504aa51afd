//! The edge of the system, against the real binaries, Postgres and broker: metrics, readiness,
//! admission control (in-flight and lag bounds), per-user rate limits, JWT identity, the OpenAPI
//! description, and a hostile-input sweep over every route.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use harness::jwt::hs256;
use serde_json::{json, Value};
use systest::{assert_error, scalar, stack_with_ingress_env, Options, Stack, ADMIN_TOKEN};

/// `(method, path template)` of a route.
type Route = (&'static str, &'static str);

const JWT_SECRET: &str = "systest-jwt-secret-0123456789abcdef";

/// Every route of the v1 API and the operations routes, as the README documents them.
const ROUTES: [(&str, &str); 19] = [
    ("post", "/v1/reservations"),
    ("get", "/v1/reservations/{id}"),
    ("post", "/v1/reservations/{id}/confirm"),
    ("post", "/v1/reservations/{id}/cancel"),
    ("get", "/v1/skus"),
    ("get", "/v1/skus/{sku}"),
    ("get", "/v1/skus/{sku}/events"),
    ("get", "/v1/tickets/{id}"),
    ("put", "/v1/admin/skus/{sku}"),
    ("post", "/v1/admin/skus/{sku}/restock"),
    ("post", "/v1/admin/skus/{sku}/pause"),
    ("post", "/v1/admin/skus/{sku}/resume"),
    ("post", "/v1/admin/freeze"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/v1/ops/summary"),
    ("get", "/ops"),
];

/// A sequencer that can be stopped for a few seconds without its lease lapsing (nor the
/// ingress calling it stalled: STALL_MAX_MS is a minute unless `extra` says otherwise).
fn patient(extra: &[(&str, &str)]) -> Options {
    Options::default()
        .with_lease_ms(30_000, 1_000)
        .with_outcome_timeout_ms(20_000)
        .with_ingress_env(&[("STALL_MAX_MS", "60000")])
        .with_ingress_env(extra)
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let r = request.send().await.expect("HTTP round trip");
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        retry_after,
        body,
    }
}

fn reserve(stack: &Stack, body: Value) -> reqwest::RequestBuilder {
    stack
        .http
        .post(format!("{}/v1/reservations", stack.base))
        .json(&body)
}

async fn metrics_text(stack: &Stack) -> String {
    let r = stack.get_response("/metrics").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain"), "{ct}");
    r.text().await.unwrap()
}

/// The value of one series (`name` or `name{labels}`, spelled as the exporter renders it).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// How many writes the ingress refused for `reason` (its admission counter).
fn refused_count(text: &str, reason: &str) -> Option<f64> {
    let series = format!(r#"ingress_admission_refused_total{{reason="{reason}"}}"#);
    sample(text, &series)
}

async fn key_was_written(stack: &Stack, key: &str) -> bool {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM decisions WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(&stack.pool)
        .await
        .unwrap()
        > 0
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token_for(user: &str) -> String {
    hs256(&json!({"sub": user, "exp": now_s() + 300}), JWT_SECRET)
}

/// Waits until the series reaches a value accepted by `ok`.
async fn wait_for_sample(stack: &Stack, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics_text(stack).await;
        if let Some(v) = sample(&text, series) {
            if ok(v) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached the expected value:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_requests_latency_in_flight_queue_depth_outcomes_and_lag() {
    // Rate limiting off: one user may send as fast as it likes.
    let stack = stack_with_ingress_env("metrics", &[("RATE_LIMIT_PER_USER_PER_S", "0")]).await;
    stack.put_sku("m", 3, 100, 300.0).await.unwrap();
    let mut held = 0;
    for i in 0..30 {
        let a = send(reserve(
            &stack,
            json!({"sku": "m", "user_id": "fast", "quantity": 1, "idempotency_key": format!("k{i}")}),
        ))
        .await;
        match a.status {
            201 => held += 1,
            409 => assert_eq!(a.body["error"], "sold_out"),
            other => panic!("one user, rate limiting off: got {other} {}", a.body),
        }
    }
    assert_eq!(held, 3);
    assert_eq!(stack.get("/v1/skus/m").await.unwrap().0, 200);
    assert_eq!(stack.get("/nowhere").await.unwrap().0, 404);

    let text = metrics_text(&stack).await;
    let count = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    let r = r#"method="POST",route="/v1/reservations""#;
    assert_eq!(
        count(&format!(
            "ingress_http_requests_total{{{r},status=\"201\"}}"
        )),
        3.0
    );
    assert_eq!(
        count(&format!(
            "ingress_http_requests_total{{{r},status=\"409\"}}"
        )),
        27.0
    );
    assert_eq!(
        count(
            r#"ingress_http_requests_total{method="PUT",route="/v1/admin/skus/{sku}",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        count(r#"ingress_http_requests_total{method="GET",route="/v1/skus/{sku}",status="200"}"#),
        1.0
    );
    assert_eq!(
        count(r#"ingress_http_requests_total{method="any",route="unmatched",status="404"}"#),
        1.0
    );
    // A latency histogram per route: cumulative buckets ending in +Inf, a sum and a count.
    assert!(text.contains("# TYPE ingress_http_request_duration_seconds histogram"));
    assert_eq!(
        count(&format!(
            "ingress_http_request_duration_seconds_bucket{{{r},le=\"+Inf\"}}"
        )),
        30.0
    );
    assert_eq!(
        count(&format!(
            "ingress_http_request_duration_seconds_count{{{r}}}"
        )),
        30.0
    );
    assert!(count(&format!("ingress_http_request_duration_seconds_sum{{{r}}}")) > 0.0);
    let fast = count(&format!(
        "ingress_http_request_duration_seconds_bucket{{{r},le=\"5\"}}"
    ));
    assert_eq!(fast, 30.0, "every reservation answered within 5 s");
    // This scrape itself is in flight while it renders.
    assert_eq!(count("ingress_http_requests_in_flight"), 1.0);
    assert_eq!(count("ingress_writes_in_flight"), 0.0);
    assert!(
        count("ingress_outcomes_received_total") >= 31.0,
        "30 reservations + 1 upsert"
    );
    assert!(
        count("ingress_outcome_messages_total") >= count("ingress_outcomes_received_total") / 250.0
    );
    assert_eq!(count("ingress_outcomes_unclaimed_total"), 0.0);
    assert!(count("ingress_lag_signal_age_seconds") < 5.0);
    assert!(count("ingress_broker_last_ok_age_seconds") < 3.0);
    for reason in [
        "in_flight",
        "lag",
        "rate_limited",
        "queue_full",
        "no_sequencer",
    ] {
        assert_eq!(
            count(&format!(
                "ingress_admission_refused_total{{reason=\"{reason}\"}}"
            )),
            0.0
        );
    }
    assert!(text.contains("# HELP ingress_http_requests_total"));

    // Readiness reports each check.
    let (s, ready) = stack.get("/readyz").await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        ready["checks"],
        json!({"outcomes_reader": "ok", "broker": "ok", "sequencer": "ok"})
    );
    assert!(count("ingress_http_connections_open") >= 1.0);
    assert_eq!(count("ingress_http_connections_refused_total"), 0.0);

    // The lag settles at 0 once the sequencer has committed everything, and the producer's
    // queue is empty once every request has been delivered (all were answered).
    wait_for_sample(&stack, "ingress_sequencer_lag_messages", |v| v == 0.0).await;
    wait_for_sample(&stack, "ingress_producer_queue_depth", |v| v == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_rate_limit_answers_429_with_retry_after_and_writes_nothing() {
    let stack = stack_with_ingress_env(
        "ratelimit",
        &[
            ("RATE_LIMIT_PER_USER_PER_S", "1"),
            ("RATE_LIMIT_BURST", "2"),
        ],
    )
    .await;
    stack.put_sku("rl", 100, 50, 300.0).await.unwrap();
    let body = |user: &str, key: &str| json!({"sku": "rl", "user_id": user, "quantity": 1, "idempotency_key": key});
    for k in ["g1", "g2"] {
        assert_eq!(send(reserve(&stack, body("greedy", k))).await.status, 201);
    }
    let refused = send(reserve(&stack, body("greedy", "g3"))).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.body["error"], "rate_limited");
    let wait: u64 = refused
        .retry_after
        .expect("429 carries Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    // Another buyer is not affected.
    assert_eq!(
        send(reserve(&stack, body("patient", "p1"))).await.status,
        201
    );
    // Nothing of the refused request reached the log or Postgres.
    assert!(!key_was_written(&stack, "g3").await);
    // After Retry-After, the same request goes through (its key was never used).
    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(100)).await;
    assert_eq!(
        send(reserve(&stack, body("greedy", "g3"))).await.status,
        201
    );
    assert_eq!(
        scalar(
            &stack,
            "SELECT count(*) FROM decisions WHERE user_id = 'greedy'"
        )
        .await,
        3
    );
    let text = metrics_text(&stack).await;
    assert_eq!(refused_count(&text, "rate_limited"), Some(1.0));
    assert_eq!(
        sample(
            &text,
            r#"ingress_http_requests_total{method="POST",route="/v1/reservations",status="429"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_bound_answers_503_with_retry_after_at_once_and_appends_nothing() {
    let options = patient(&[("IN_FLIGHT_MAX", "1")]);
    let mut stack = Stack::start("inflight", options).await.unwrap();
    stack.put_sku("f", 10, 5, 300.0).await.unwrap();
    stack.signal_sequencer(0, "STOP").unwrap();
    let first = {
        let (http, base) = (stack.http.clone(), stack.base.clone());
        tokio::spawn(async move {
            send(http.post(format!("{base}/v1/reservations")).json(
                &json!({"sku": "f", "user_id": "u1", "quantity": 1, "idempotency_key": "waits"}),
            ))
            .await
        })
    };
    wait_for_sample(&stack, "ingress_writes_in_flight", |v| v == 1.0).await;
    // Answered while the sequencer is still stopped: refused at once, not queued behind it.
    let refused = send(reserve(
        &stack,
        json!({"sku": "f", "user_id": "u2", "quantity": 1, "idempotency_key": "refused"}),
    ))
    .await;
    // An admin command is never refused by the bound: the freeze must always get through.
    let pause = {
        let (http, base) = (stack.http.clone(), stack.base.clone());
        tokio::spawn(async move {
            send(
                http.post(format!("{base}/v1/admin/skus/f/pause"))
                    .bearer_auth(systest::ADMIN_TOKEN),
            )
            .await
        })
    };
    wait_for_sample(&stack, "ingress_writes_in_flight", |v| v == 2.0).await;
    stack.signal_sequencer(0, "CONT").unwrap();
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.body["error"], "overloaded");
    assert_eq!(refused.retry_after.as_deref(), Some("1"));
    let first = first.await.unwrap();
    assert_eq!(first.status, 201, "{}", first.body);
    let pause = pause.await.unwrap();
    assert_eq!(
        (pause.status, pause.body["status"].as_str()),
        (200, Some("paused")),
        "{}",
        pause.body
    );
    assert!(!key_was_written(&stack, "refused").await);
    assert!(key_was_written(&stack, "waits").await);
    assert_eq!(scalar(&stack, "SELECT count(*) FROM decisions").await, 1);
    let text = metrics_text(&stack).await;
    assert_eq!(refused_count(&text, "in_flight"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_in_flight_slot_at_once() {
    // Outcomes would take two minutes to time out; the slots must be freed long before
    // (wait_for_sample gives up after 20 s).
    let options = patient(&[]).with_outcome_timeout_ms(120_000);
    let mut stack = Stack::start("goneaway", options).await.unwrap();
    stack.put_sku("g", 10, 5, 300.0).await.unwrap();
    stack.signal_sequencer(0, "STOP").unwrap();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    for i in 0..5 {
        let sent = impatient
            .post(format!("{}/v1/reservations", stack.base))
            .json(&json!({"sku": "g", "user_id": format!("u{i}"), "quantity": 1, "idempotency_key": format!("gone-{i}")}))
            .send()
            .await;
        assert!(sent.is_err(), "no answer while the sequencer is stopped");
    }
    wait_for_sample(&stack, "ingress_writes_in_flight", |v| v == 0.0).await;
    stack.signal_sequencer(0, "CONT").unwrap();
}

/// Sends a reservation in the background (the stack stays free for signalling).
fn spawn_reserve(stack: &Stack, body: Value) -> tokio::task::JoinHandle<Answer> {
    let request = reserve(stack, body);
    tokio::spawn(send(request))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_bound_answers_503_when_the_sequencer_falls_behind_but_lets_admin_through() {
    let options = patient(&[("LAG_MAX", "3")]);
    let mut stack = Stack::start("lag", options).await.unwrap();
    stack.put_sku("l", 100, 5, 300.0).await.unwrap();
    stack.put_sku("other", 1, 1, 300.0).await.unwrap();
    wait_for_sample(&stack, "ingress_sequencer_lag_messages", |v| v == 0.0).await;
    stack.signal_sequencer(0, "STOP").unwrap();
    // Five buyers get appended while the sequencer is stopped: the log runs 5 ahead.
    let early: Vec<_> = (0..5)
        .map(|i| {
            spawn_reserve(
                &stack,
                json!({"sku": "l", "user_id": format!("early-{i}"), "quantity": 1, "idempotency_key": format!("early-{i}")}),
            )
        })
        .collect();
    wait_for_sample(&stack, "ingress_sequencer_lag_messages", |v| v >= 5.0).await;

    // Answered while the sequencer is stopped: refused at once, not queued behind it.
    let refused = send(reserve(
        &stack,
        json!({"sku": "l", "user_id": "late", "quantity": 1, "idempotency_key": "late"}),
    ))
    .await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.body["error"], "overloaded");
    assert!(
        refused.body["detail"].as_str().unwrap().contains("behind"),
        "{}",
        refused.body
    );
    assert_eq!(refused.retry_after.as_deref(), Some("1"));
    // Confirm and cancel are buyers' writes too.
    let unknown = "0190f2a4-0000-7000-8000-000000000000";
    let (s, b) = stack.cancel(unknown).await.unwrap();
    assert_error(s, &b, (503, "overloaded"));
    // An operator's pause is not refused by the lag bound: it waits for the sequencer.
    let pause = tokio::spawn(send(
        stack
            .http
            .post(format!("{}/v1/admin/skus/other/pause", stack.base))
            .bearer_auth(ADMIN_TOKEN),
    ));
    wait_for_sample(&stack, "ingress_writes_in_flight", |v| v == 6.0).await;

    stack.signal_sequencer(0, "CONT").unwrap();
    for task in early {
        let a = task.await.unwrap();
        assert_eq!(a.status, 201, "{}", a.body);
    }
    let paused = pause.await.unwrap();
    assert_eq!(
        (paused.status, paused.body["status"].as_str()),
        (200, Some("paused"))
    );
    // Once the sequencer has caught up, buyers are admitted again.
    wait_for_sample(&stack, "ingress_sequencer_lag_messages", |v| v <= 3.0).await;
    let admitted = send(reserve(
        &stack,
        json!({"sku": "l", "user_id": "late", "quantity": 1, "idempotency_key": "late-2"}),
    ))
    .await;
    assert_eq!(admitted.status, 201, "{}", admitted.body);
    assert!(
        !key_was_written(&stack, "late").await,
        "the refused request left no trace"
    );
    assert_eq!(scalar(&stack, "SELECT count(*) FROM decisions").await, 6);
    let text = metrics_text(&stack).await;
    assert_eq!(refused_count(&text, "lag"), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_makes_the_token_subject_the_buyer() {
    let stack = stack_with_ingress_env("jwt", &[("JWT_HS256_SECRET", JWT_SECRET)]).await;
    stack.put_sku("j", 10, 5, 300.0).await.unwrap();
    let with = |token: &str, body: Value| reserve(&stack, body).bearer_auth(token);
    let body = |user: Option<&str>, key: &str| match user {
        Some(u) => json!({"sku": "j", "user_id": u, "quantity": 1, "idempotency_key": key}),
        None => json!({"sku": "j", "quantity": 1, "idempotency_key": key}),
    };
    let alice = token_for("alice");

    let cases = [
        (
            "no token",
            reserve(&stack, body(Some("alice"), "n1")),
            401,
            "unauthorized",
        ),
        (
            "forged signature",
            with(
                &hs256(
                    &json!({"sub": "alice", "exp": now_s() + 300}),
                    "not-the-secret-0123456789abcdefghij",
                ),
                body(Some("alice"), "n2"),
            ),
            401,
            "unauthorized",
        ),
        (
            "expired",
            with(
                &hs256(&json!({"sub": "alice", "exp": now_s() - 120}), JWT_SECRET),
                body(Some("alice"), "n3"),
            ),
            401,
            "unauthorized",
        ),
        (
            "no subject",
            with(
                &hs256(&json!({"exp": now_s() + 300}), JWT_SECRET),
                body(None, "n4"),
            ),
            401,
            "unauthorized",
        ),
        (
            "admin token is not a buyer token",
            with(ADMIN_TOKEN, body(Some("alice"), "n5")),
            401,
            "unauthorized",
        ),
        (
            "someone else's user_id",
            with(&alice, body(Some("bob"), "n6")),
            403,
            "forbidden",
        ),
    ];
    for (what, request, status, code) in cases {
        let a = send(request).await;
        assert_eq!(
            (a.status, a.body["error"].as_str()),
            (status, Some(code)),
            "{what}: {}",
            a.body
        );
    }
    assert_eq!(
        scalar(&stack, "SELECT count(*) FROM decisions").await,
        0,
        "refusals wrote nothing"
    );

    // A valid token: the buyer is the subject, with or without a matching user_id in the body.
    let a = send(with(&alice, body(None, "a1"))).await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.body["user_id"], "alice");
    let id = a.body["reservation_id"].as_str().unwrap().to_owned();
    let owner: String =
        sqlx::query_scalar("SELECT user_id FROM decisions WHERE reservation_id::text = $1")
            .bind(&id)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(owner, "alice", "the row's user is the token's subject");
    assert_eq!(
        send(with(&alice, body(Some("alice"), "a2"))).await.status,
        201
    );

    // Reservations by id act for their owner only.
    let bob = token_for("bob");
    let url = |suffix: &str| format!("{}/v1/reservations/{id}{suffix}", stack.base);
    let a = send(stack.http.get(url(""))).await;
    assert_error(a.status, &a.body, (401, "unauthorized"));
    let a = send(stack.http.get(url("")).bearer_auth(&bob)).await;
    assert_error(a.status, &a.body, (403, "forbidden"));
    let a = send(stack.http.post(url("/cancel")).bearer_auth(&bob)).await;
    assert_error(a.status, &a.body, (403, "forbidden"));
    let a = send(stack.http.post(url("/confirm"))).await;
    assert_error(a.status, &a.body, (401, "unauthorized"));
    let a = send(stack.http.get(url("")).bearer_auth(&alice)).await;
    assert_eq!((a.status, a.body["status"].as_str()), (200, Some("held")));
    let a = send(stack.http.post(url("/cancel")).bearer_auth(&alice)).await;
    assert_eq!(
        (a.status, a.body["status"].as_str()),
        (200, Some("cancelled"))
    );

    // Admin routes still take the admin token, never a buyer's JWT.
    let a = send(
        stack
            .http
            .post(format!("{}/v1/admin/skus/j/pause", stack.base))
            .bearer_auth(&alice),
    )
    .await;
    assert_error(a.status, &a.body, (401, "unauthorized"));

    let users = stack
        .query_texts("SELECT DISTINCT user_id FROM decisions")
        .await
        .unwrap();
    assert_eq!(users, ["alice"]);
    assert_eq!(stack.sku_row("j").await.unwrap()["held"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_json_describes_every_route_and_every_described_route_is_served() {
    let stack = Stack::start("openapi", Options::default()).await.unwrap();
    let (status, doc) = stack.get("/openapi.json").await.unwrap();
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut described = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            described.insert((method.clone(), path.clone()));
        }
    }
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(described, expected);
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["securitySchemes"]["admin_token"].is_object());

    // Every described operation is routed: it never falls through to the router's own 404/405.
    for (method, path) in &described {
        let concrete = path
            .replace("{id}", "0190f2a4-0000-7000-8000-000000000000")
            .replace("{sku}", "no-such-sku");
        let a = send(
            stack
                .http
                .request(
                    method.to_uppercase().parse().unwrap(),
                    format!("{}{concrete}", stack.base),
                )
                .header("content-type", "application/json")
                .body("{}"),
        )
        .await;
        let code = a.body.get("error").and_then(Value::as_str);
        assert!(
            code != Some("not_found") && code != Some("method_not_allowed"),
            "{method} {path} is described but not served: {} {}",
            a.status,
            a.body
        );
    }
}

/// The stable error codes a client can meet on a refused request.
const STABLE_CODES: [&str; 9] = [
    "invalid_request",
    "payload_too_large",
    "unsupported_media_type",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "unknown_reservation",
    "unknown_sku",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_on_every_route_gets_a_stable_4xx_and_writes_nothing() {
    let stack = stack_with_ingress_env("hostile", &[("JWT_HS256_SECRET", JWT_SECRET)]).await;
    stack.put_sku("good", 5, 2, 300.0).await.unwrap();
    let sku_before = stack.sku_row("good").await.unwrap();
    let batches_before = scalar(
        &stack,
        "SELECT coalesce(max(batch_seq), 0)::int8 FROM batches",
    )
    .await;

    let base = stack.base.clone();
    let http = stack.http.clone();
    let user = token_for("mallory");
    let forged = hs256(
        &json!({"sub": "mallory", "exp": now_s() + 300}),
        "forged-secret-forged-secret-forged!!",
    );
    let alg_none = {
        // {"alg":"none","typ":"JWT"} . {"sub":"mallory","exp":9999999999} . (no signature)
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo5OTk5OTk5OTk5fQ."
            .to_owned()
    };
    // Over the 4 KiB body limit, yet small enough for the server to have read it all from the
    // socket when it answers early: a server that closes with unread bytes makes the kernel
    // reset the connection, and the client may then lose the answer (a TCP matter, not ours).
    let huge = "x".repeat(6_000);
    let uuid = "0190f2a4-0000-7000-8000-000000000000";
    let ids = [
        "12345".to_owned(),
        "ü🦀".to_owned(),
        "9".repeat(300),
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd".to_owned(),
        "%00".to_owned(),
        "' OR 1=1 --".to_owned(),
    ];
    let skus = [
        "ü🦀".to_owned(),
        "a".repeat(65),
        "a%2Fb".to_owned(),
        "%3Cscript%3E".to_owned(),
        "%00".to_owned(),
        "' OR 1=1 --".to_owned(),
    ];
    // Bodies that are wrong in every way but syntactically harmless to send.
    let bad_reserve_bodies: Vec<String> = vec![
        String::new(),
        "null".into(),
        "[1,2]".into(),
        "\"just a string\"".into(),
        r#"{"sku":"good","quantity":"1"}"#.into(),
        r#"{"sku":"good","quantity":1e400}"#.into(),
        r#"{"sku":"good","quantity":99999999999999999999999}"#.into(),
        r#"{"sku":"good","quantity":-1}"#.into(),
        r#"{"sku":"good","quantity":0}"#.into(),
        r#"{"sku":"good","quantity":1.5}"#.into(),
        r#"{"sku":"good","quantity":true}"#.into(),
        r#"{"sku":["good"],"quantity":1}"#.into(),
        r#"{"sku":"g\u00fcd","quantity":1}"#.into(),
        r#"{"sku":"good🦀","quantity":1}"#.into(),
        format!(r#"{{"sku":"{}","quantity":1}}"#, "a".repeat(65)),
        r#"{"sku":"good","quantity":1,"idempotency_key":""}"#.into(),
        format!(
            r#"{{"sku":"good","quantity":1,"idempotency_key":"{}"}}"#,
            "k".repeat(129)
        ),
        r#"{"sku":"good","quantity":1,"idempotency_key":"a\u0007b"}"#.into(),
        r#"{"sku":"good","quantity":1,"user_id":"someone-else"}"#.into(),
        r#"{"sku":"good","quantity":1,"user_id":"mallory\u0000"}"#.into(),
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        r#"{"sku":"good","quantity":1"#.into(),
        "\u{feff}{}".into(),
    ];
    let bad_upsert_bodies: &[&str] = &[
        "",
        "{}",
        r#"{"total_stock":"100","per_user_limit":1,"hold_ttl_seconds":1}"#,
        r#"{"total_stock":-1,"per_user_limit":1,"hold_ttl_seconds":1}"#,
        r#"{"total_stock":1000000000001,"per_user_limit":1,"hold_ttl_seconds":1}"#,
        r#"{"total_stock":99999999999999999999999,"per_user_limit":1,"hold_ttl_seconds":1}"#,
        r#"{"total_stock":1,"per_user_limit":0,"hold_ttl_seconds":1}"#,
        r#"{"total_stock":1,"per_user_limit":1000001,"hold_ttl_seconds":1}"#,
        r#"{"total_stock":1,"per_user_limit":1,"hold_ttl_seconds":0}"#,
        r#"{"total_stock":1,"per_user_limit":1,"hold_ttl_seconds":-5}"#,
        r#"{"total_stock":1,"per_user_limit":1,"hold_ttl_seconds":1e300}"#,
        r#"{"total_stock":1,"per_user_limit":1,"hold_ttl_seconds":NaN}"#,
        r#"{"total_stock":1,"per_user_limit":1,"hold_ttl_seconds":1,"starts_at":"yesterday"}"#,
        r#"{"total_stock":1,"per_user_limit":1,"hold_ttl_seconds":1,"starts_at":"2030-01-02T00:00:00Z","ends_at":"2030-01-01T00:00:00Z"}"#,
        r#"{"total_stock":1,"per_user_limit":1,"hold_ttl_seconds":1,"ends_at":"२०३०-०१-०१"}"#,
    ];
    let bad_restock_bodies: &[&str] = &[
        "",
        "{}",
        r#"{"quantity":0}"#,
        r#"{"quantity":-5}"#,
        r#"{"quantity":"5"}"#,
        r#"{"quantity":1000000000001}"#,
        r#"{"quantity":1e30}"#,
        r#"{"quantity":null}"#,
    ];

    // (route, what, request)
    let mut cases: Vec<((&str, &str), String, reqwest::RequestBuilder)> = Vec::new();
    let json_post = |url: String, body: String| {
        http.post(url)
            .header("content-type", "application/json")
            .body(body)
    };

    // POST /v1/reservations
    let r = ("post", "/v1/reservations");
    let url = format!("{base}/v1/reservations");
    let valid = r#"{"sku":"good","quantity":1,"idempotency_key":"never"}"#.to_owned();
    let valid_post = || json_post(url.clone(), valid.clone());
    for (what, request) in [
        ("no token", valid_post()),
        ("forged token", valid_post().bearer_auth(&forged)),
        ("alg none", valid_post().bearer_auth(&alg_none)),
        ("garbage token", valid_post().bearer_auth("a.b.c")),
        ("basic auth", valid_post().basic_auth("mallory", Some("pw"))),
        ("admin token", valid_post().bearer_auth(ADMIN_TOKEN)),
    ] {
        cases.push((r, what.into(), request));
    }
    for (i, b) in bad_reserve_bodies.iter().enumerate() {
        cases.push((
            r,
            format!("bad body #{i} {:.60}", b),
            json_post(url.clone(), b.clone()).bearer_auth(&user),
        ));
    }
    cases.push((
        r,
        "oversized".into(),
        json_post(
            url.clone(),
            format!(r#"{{"sku":"good","quantity":1,"user_id":"{huge}"}}"#),
        )
        .bearer_auth(&user),
    ));
    cases.push((
        r,
        "text/plain".into(),
        http.post(url.clone())
            .header("content-type", "text/plain")
            .body(valid.clone())
            .bearer_auth(&user),
    ));
    cases.push((
        r,
        "two content types".into(),
        json_post(url.clone(), valid.clone())
            .header("content-type", "text/plain")
            .bearer_auth(&user),
    ));
    cases.push((
        r,
        "invalid utf-8".into(),
        http.post(url.clone())
            .header("content-type", "application/json")
            .body(vec![b'{', 0xff, 0xfe, b'}'])
            .bearer_auth(&user),
    ));
    cases.push((
        r,
        "non-ascii idempotency header".into(),
        http.post(url.clone())
            .header("content-type", "application/json")
            .header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(&[0xe2, 0x98, 0x83]).unwrap(),
            )
            .body(r#"{"sku":"good","quantity":1}"#)
            .bearer_auth(&user),
    ));
    cases.push((
        r,
        "key header and body differ".into(),
        json_post(url.clone(), valid.clone())
            .header("idempotency-key", "other")
            .bearer_auth(&user),
    ));

    // Reservations by id.
    for (r, method, suffix) in [
        (("get", "/v1/reservations/{id}"), "GET", ""),
        (
            ("post", "/v1/reservations/{id}/confirm"),
            "POST",
            "/confirm",
        ),
        (("post", "/v1/reservations/{id}/cancel"), "POST", "/cancel"),
    ] {
        let req = |id: &str| {
            http.request(
                method.parse().unwrap(),
                format!("{base}/v1/reservations/{id}{suffix}"),
            )
        };
        cases.push((r, "no token".into(), req(uuid)));
        cases.push((r, "forged token".into(), req(uuid).bearer_auth(&forged)));
        cases.push((r, "alg none".into(), req(uuid).bearer_auth(&alg_none)));
        cases.push((r, "unknown id".into(), req(uuid).bearer_auth(&user)));
        for id in &ids {
            cases.push((r, format!("id {id:.40}"), req(id).bearer_auth(&user)));
        }
        cases.push((
            r,
            "body on a bodiless route".into(),
            req(uuid).bearer_auth(&user).body(huge.clone()),
        ));
    }

    // GET /v1/skus/{sku}
    let r = ("get", "/v1/skus/{sku}");
    for sku in &skus {
        cases.push((
            r,
            format!("sku {sku:.40}"),
            http.get(format!("{base}/v1/skus/{sku}")),
        ));
    }
    cases.push((
        r,
        "unknown sku".into(),
        http.get(format!("{base}/v1/skus/nope")),
    ));

    // Admin routes: every auth failure, then valid auth with hostile input.
    let no_bodies: &[&str] = &[];
    let admin_routes: [(Route, &str, &str, &[&str]); 5] = [
        (
            ("put", "/v1/admin/skus/{sku}"),
            "PUT",
            "/v1/admin/skus/{sku}",
            bad_upsert_bodies,
        ),
        (
            ("post", "/v1/admin/skus/{sku}/restock"),
            "POST",
            "/v1/admin/skus/{sku}/restock",
            bad_restock_bodies,
        ),
        (
            ("post", "/v1/admin/skus/{sku}/pause"),
            "POST",
            "/v1/admin/skus/{sku}/pause",
            no_bodies,
        ),
        (
            ("post", "/v1/admin/skus/{sku}/resume"),
            "POST",
            "/v1/admin/skus/{sku}/resume",
            no_bodies,
        ),
        (
            ("post", "/v1/admin/freeze"),
            "POST",
            "/v1/admin/freeze",
            no_bodies,
        ),
    ];
    for (r, method, template, bodies) in admin_routes {
        let req = |sku: &str| {
            http.request(
                method.parse().unwrap(),
                format!("{base}{}", template.replace("{sku}", sku)),
            )
            .header("content-type", "application/json")
        };
        let fine = r#"{"total_stock":1,"per_user_limit":1,"hold_ttl_seconds":1,"quantity":1}"#;
        let fine_req = || req("good").body(fine);
        let unicode = reqwest::header::HeaderValue::from_bytes("Bearer ü🦀".as_bytes()).unwrap();
        for (what, request) in [
            ("no token", fine_req()),
            (
                "wrong token",
                fine_req().bearer_auth("systest-admin-token-0123456788"),
            ),
            (
                "token prefix",
                fine_req().bearer_auth(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
            ),
            (
                "token plus a byte",
                fine_req().bearer_auth(format!("{ADMIN_TOKEN}x")),
            ),
            ("buyer jwt", fine_req().bearer_auth(&user)),
            ("forged jwt", fine_req().bearer_auth(&forged)),
            (
                "lowercase scheme",
                fine_req().header("authorization", format!("bearer {ADMIN_TOKEN}")),
            ),
            ("unicode token", fine_req().header("authorization", unicode)),
        ] {
            cases.push((r, what.into(), request));
        }
        if template.contains("{sku}") {
            for sku in &skus {
                cases.push((
                    r,
                    format!("sku {sku:.40}"),
                    req(sku).bearer_auth(ADMIN_TOKEN).body(fine),
                ));
            }
        }
        for (i, b) in bodies.iter().enumerate() {
            cases.push((
                r,
                format!("bad body #{i} {:.60}", b),
                req("good").bearer_auth(ADMIN_TOKEN).body(*b),
            ));
        }
        if !bodies.is_empty() {
            cases.push((
                r,
                "oversized".into(),
                req("good")
                    .bearer_auth(ADMIN_TOKEN)
                    .body(format!(r#"{{"pad":"{huge}"}}"#)),
            ));
            let url = format!("{base}{}", template.replace("{sku}", "good"));
            cases.push((
                r,
                "text/plain".into(),
                http.request(method.parse().unwrap(), url.clone())
                    .bearer_auth(ADMIN_TOKEN)
                    .header("content-type", "text/plain")
                    .body(fine),
            ));
            cases.push((
                r,
                "two content types".into(),
                req("good")
                    .bearer_auth(ADMIN_TOKEN)
                    .header("content-type", "text/plain")
                    .body(fine),
            ));
        }
    }

    // Every route refuses the methods it does not serve; the operations routes have no other
    // input to be hostile with.
    for (method, path) in ROUTES {
        let concrete = path.replace("{id}", uuid).replace("{sku}", "good");
        for wrong in ["DELETE", "PATCH", "PUT", "POST"] {
            if wrong.eq_ignore_ascii_case(method) {
                continue;
            }
            cases.push((
                (method, path),
                format!("{wrong} instead of {method}"),
                http.request(wrong.parse().unwrap(), format!("{base}{concrete}"))
                    .bearer_auth(ADMIN_TOKEN)
                    .header("content-type", "application/json")
                    .body(huge.clone()),
            ));
        }
    }

    let covered: BTreeSet<(&str, &str)> = cases.iter().map(|c| c.0).collect();
    assert_eq!(
        covered,
        ROUTES.iter().copied().collect::<BTreeSet<_>>(),
        "every route is attacked"
    );
    let total = cases.len();
    for (route, what, request) in cases {
        let a = send(request).await;
        let code = a.body.get("error").and_then(Value::as_str);
        assert!(
            (400..500).contains(&a.status) && code.is_some_and(|c| STABLE_CODES.contains(&c)),
            "{} {} / {what}: answered {} {}",
            route.0,
            route.1,
            a.status,
            a.body
        );
    }
    eprintln!("hostile sweep: {total} requests, every one a 4xx with a stable code");

    assert_eq!(
        scalar(&stack, "SELECT count(*) FROM decisions").await,
        0,
        "nothing written"
    );
    assert_eq!(
        stack.sku_row("good").await.unwrap(),
        sku_before,
        "the SKU is untouched"
    );
    let paused: bool = sqlx::query_scalar("SELECT paused FROM skus WHERE sku = 'good'")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert!(!paused);
    assert_eq!(scalar(&stack, "SELECT count(*) FROM skus").await, 1);
    // Nothing reached the sequencer either: no batch carried a command.
    let commands: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(commands), 0)::int8 FROM batches WHERE batch_seq > $1",
    )
    .bind(batches_before)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(commands, 0, "no hostile request was appended to the log");
    // The ingress is still healthy.
    assert_eq!(stack.get("/readyz").await.unwrap().0, 200);
}
