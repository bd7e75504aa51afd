//! A bounded background load of reservation requests, and the check that every answer it got is
//! what Postgres recorded: the "nothing lost, nothing decided twice" verdict after a fault.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::Stack;

#[derive(Debug, Clone)]
pub struct Answer {
    pub user: String,
    pub key: String,
    pub status: u16,
    pub body: Value,
    /// `X-Request-Id`: the id the command carried through the log.
    pub request_id: Option<String>,
}

/// A closed-loop load: `concurrency` requests in flight, each buyer distinct, at most `count`
/// requests and at most `duration_max` long. Stops early when `stop` is set.
pub struct Load {
    pub stop: Arc<AtomicBool>,
    pub answered: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<Vec<Answer>>,
}

impl Load {
    pub fn start(
        stack: &Stack,
        sku: &str,
        prefix: &str,
        count: usize,
        concurrency: usize,
        duration_max: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let (http, base, sku, prefix) = (
            stack.http.clone(),
            stack.base.clone(),
            sku.to_owned(),
            prefix.to_owned(),
        );
        let (stop2, answered2) = (stop.clone(), answered.clone());
        let handle = tokio::spawn(async move {
            let gate = Arc::new(Semaphore::new(concurrency));
            let deadline = Instant::now() + duration_max;
            let mut tasks = JoinSet::new();
            for i in 0..count {
                let permit = gate.clone().acquire_owned().await.expect("semaphore open");
                if stop2.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let (http, base, sku, answered) =
                    (http.clone(), base.clone(), sku.clone(), answered2.clone());
                let (user, key) = (format!("{prefix}-buyer-{i}"), format!("{prefix}-try-{i}"));
                tasks.spawn(async move {
                    let _permit = permit;
                    let r = http
                        .post(format!("{base}/v1/reservations"))
                        .json(&json!({"sku": sku, "user_id": user, "quantity": 1, "idempotency_key": key}))
                        .send()
                        .await;
                    let (status, body, request_id) = match r {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let id = r
                                .headers()
                                .get("x-request-id")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            (status, r.json::<Value>().await.unwrap_or(Value::Null), id)
                        }
                        Err(e) => (0, Value::String(e.to_string()), None),
                    };
                    answered.fetch_add(1, Ordering::Relaxed);
                    Answer { user, key, status, body, request_id }
                });
            }
            let mut answers = Vec::new();
            while let Some(a) = tasks.join_next().await {
                answers.push(a.expect("load task"));
            }
            answers
        });
        Load {
            stop,
            answered,
            handle,
        }
    }

    pub async fn finish(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("load task")
    }

    pub async fn wait(self) -> Vec<Answer> {
        self.handle.await.expect("load task")
    }

    /// Runs a load of `count` buyers to its end (at most 60 s) and returns every answer.
    pub async fn run(
        stack: &Stack,
        sku: &str,
        prefix: &str,
        count: usize,
        concurrency: usize,
    ) -> Vec<Answer> {
        let load = Load::start(
            stack,
            sku,
            prefix,
            count,
            concurrency,
            Duration::from_secs(60),
        );
        load.wait().await
    }
}

/// The answers that are not a hold (201), as status and body: empty when every buyer got a unit.
pub fn not_held(answers: &[Answer]) -> Vec<(u16, Value)> {
    answers
        .iter()
        .filter(|a| a.status != 201)
        .map(|a| (a.status, a.body.clone()))
        .collect()
}

#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub held: usize,
    pub refused: usize,
    pub timed_out: usize,
    pub errors_5xx: usize,
    pub retried_ok: usize,
}

/// Checks every answer against Postgres: a 201 or 409 is recorded exactly once with the same
/// outcome; a 504 retried with the same key gets a definitive answer, and the original
/// reservation if there was one; every request ends with exactly one decision row; a request
/// that reached the log was the one decided. Then the audit must be clean.
pub async fn verify(stack: &Stack, sku: &str, answers: &[Answer]) -> anyhow::Result<Verdict> {
    verify_with(stack, sku, answers, true).await
}

/// [`verify`]; with `log_kept` false (the requests log was lost), a 504'd request may have been
/// lost with the log before it was decided, so its retry may be the one decided.
pub async fn verify_with(
    stack: &Stack,
    sku: &str,
    answers: &[Answer],
    log_kept: bool,
) -> anyhow::Result<Verdict> {
    let mut v = Verdict::default();
    let mut unknown = Vec::new();
    for a in answers {
        match a.status {
            201 | 409 => {
                let rows = decisions(stack, sku, a).await?;
                ensure!(
                    rows.len() == 1,
                    "{}/{} answered {} {} but has {} rows",
                    a.user,
                    a.key,
                    a.status,
                    a.body,
                    rows.len()
                );
                if a.status == 201 {
                    v.held += 1;
                    ensure!(
                        Some(rows[0].0.as_str()) == a.body["reservation_id"].as_str(),
                        "reservation id differs for {}",
                        a.user
                    );
                } else {
                    v.refused += 1;
                    ensure!(
                        rows[0].2.as_deref() == a.body["error"].as_str(),
                        "refusal differs for {}",
                        a.user
                    );
                }
            }
            504 => {
                v.timed_out += 1;
                ensure!(
                    a.body["error"] == "outcome_unknown",
                    "504 without outcome_unknown: {}",
                    a.body
                );
                unknown.push(a);
            }
            s if s >= 500 || s == 0 => {
                v.errors_5xx += 1;
                unknown.push(a);
            }
            other => bail!("unexpected answer {other}: {}", a.body),
        }
    }
    for a in unknown {
        let before = decisions(stack, sku, a)
            .await?
            .into_iter()
            .find(|(_, status, _)| status != "rejected")
            .map(|(id, ..)| id);
        let (status, body) = retry_until_definitive(stack, sku, &a.user, &a.key).await?;
        if let Some(id) = before {
            ensure!(
                status == 201 && body["reservation_id"].as_str() == Some(id.as_str()),
                "retry of {}/{} did not return its original reservation {id}: {status} {body}",
                a.user,
                a.key
            );
        }
        // The original request was appended to the log, so it must be the one decided: a
        // decision under the retry's id means the original message was skipped, never decided.
        // Only a 504 can follow an append: a 503 (queue full, no sequencer) refused the request
        // before the log, and a 504 whose append failed never reached it either (one whose
        // append was not acknowledged in time may or may not have: nothing to check).
        let appended = log_kept
            && a.status == 504
            && !a.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("append failed") || d.contains("not acknowledged"));
        if let (true, Some(original)) = (appended, &a.request_id) {
            let decided = decisions(stack, sku, a)
                .await?
                .into_iter()
                .next()
                .map(|(id, ..)| id);
            ensure!(
                decided.as_deref() == Some(original.as_str()),
                "{}/{}: the original request {original} was never decided (decision: {decided:?}): a log message was skipped",
                a.user,
                a.key
            );
        }
        v.retried_ok += 1;
    }
    // After the retries every request sent has exactly one decision row on this SKU.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM decisions WHERE sku = $1")
        .bind(sku)
        .fetch_one(stack.pool_for(sku))
        .await?;
    ensure!(
        rows as usize == answers.len(),
        "{rows} decision rows on {sku} for {} requests: not every request was decided exactly once",
        answers.len()
    );
    let report = stack.audit()?;
    let reports = report
        .as_array()
        .cloned()
        .unwrap_or_else(|| vec![report.clone()]);
    ensure!(
        reports.iter().all(|r| r["violations"] == json!([])),
        "audit found violations: {report}"
    );
    Ok(v)
}

/// The decision rows of an answer's buyer and key: reservation id, status, refusal reason.
async fn decisions(
    stack: &Stack,
    sku: &str,
    a: &Answer,
) -> anyhow::Result<Vec<(String, String, Option<String>)>> {
    Ok(sqlx::query_as(
        "SELECT reservation_id::text, status, reject_reason FROM decisions
          WHERE user_id = $1 AND idempotency_key = $2",
    )
    .bind(&a.user)
    .bind(&a.key)
    .fetch_all(stack.pool_for(sku))
    .await?)
}

async fn retry_until_definitive(
    stack: &Stack,
    sku: &str,
    user: &str,
    key: &str,
) -> anyhow::Result<(u16, Value)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = stack.reserve(sku, user, 1, key).await?;
        if status == 201 || status == 409 {
            return Ok((status, body));
        }
        ensure!(
            Instant::now() < deadline,
            "retry of {user}/{key} still {status} after 30 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Milliseconds from `fault_at_ms` (Unix ms) to the first batch committed under an epoch newer
/// than `old_epoch`, waiting up to `within`.
pub async fn takeover_gap_ms(
    stack: &Stack,
    old_epoch: i64,
    fault_at_ms: i64,
    within: Duration,
) -> anyhow::Result<i64> {
    takeover_gap_ms_in(&stack.pool, old_epoch, fault_at_ms, within).await
}

/// [`takeover_gap_ms`] of the partition whose database is `pool`.
pub async fn takeover_gap_ms_in(
    pool: &sqlx::PgPool,
    old_epoch: i64,
    fault_at_ms: i64,
    within: Duration,
) -> anyhow::Result<i64> {
    let deadline = Instant::now() + within;
    loop {
        let first: Option<f64> = sqlx::query_scalar(
            "SELECT (EXTRACT(EPOCH FROM decided_at) * 1000)::float8 FROM batches
              WHERE epoch > $1 ORDER BY batch_seq LIMIT 1",
        )
        .bind(old_epoch)
        .fetch_optional(pool)
        .await?;
        if let Some(at) = first {
            return Ok(at as i64 - fault_at_ms);
        }
        ensure!(
            Instant::now() < deadline,
            "no batch under a new epoch within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub use wire::now_ms;

/// Waits until at least `at_least` decisions on `sku` are committed: the moment to inject a
/// fault mid-load.
pub async fn wait_decided(stack: &Stack, sku: &str, at_least: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM decisions WHERE sku = $1")
            .bind(sku)
            .fetch_one(&stack.pool)
            .await?;
        if n >= at_least {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {n} decisions on {sku} after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The writer epoch in the fence row.
pub async fn epoch(stack: &Stack) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT epoch FROM sequencer_state")
        .fetch_one(&stack.pool)
        .await?)
}

/// Where a fault is injected: a running load on one SKU, with the active sequencer and the epoch
/// it held when the load started.
pub struct UnderLoad {
    pub load: Load,
    pub active: usize,
    pub old_epoch: i64,
}

/// Creates `sku` with `stock` units (limit 1 per buyer), starts `count` distinct buyers at
/// `concurrency`, and returns once `decided` of them are committed: the moment for a fault.
pub async fn under_load(
    stack: &Stack,
    sku: &str,
    stock: u64,
    count: usize,
    concurrency: usize,
    decided: i64,
) -> anyhow::Result<UnderLoad> {
    stack.put_sku(sku, stock, 1, 300.0).await?;
    let active = stack.wait_for_active(Duration::from_secs(30)).await?;
    let old_epoch = epoch(stack).await?;
    let load = Load::start(
        stack,
        sku,
        sku,
        count,
        concurrency,
        Duration::from_secs(120),
    );
    wait_decided(stack, sku, decided).await?;
    Ok(UnderLoad {
        load,
        active,
        old_epoch,
    })
}
