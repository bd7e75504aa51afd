//! Operations: liveness, readiness and the Prometheus metrics of this ingress.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::dto::{ReadyChecks, ReadyOut, StatusOut};
use super::state::App;
use crate::bus::now_ms;
use crate::metrics::sync_counter;

#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    summary = "Liveness: the process answers",
    responses((status = 200, description = "alive", body = StatusOut))
)]
pub(crate) async fn healthz() -> Json<StatusOut> {
    Json(StatusOut { status: "ok" })
}

#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    summary = "Readiness: the outcomes reader polls and the producer reaches the broker",
    responses(
        (status = 200, description = "ready", body = ReadyOut),
        (status = 503, description = "not ready, with the failing checks", body = ReadyOut),
    )
)]
pub(crate) async fn readyz(State(app): State<Arc<App>>) -> Response {
    let health = &app.bus.health;
    let (ready, body) = readiness(
        now_ms(),
        health.listening.load(Ordering::Relaxed),
        health.last_poll_ms.load(Ordering::Relaxed),
        app.admission.broker_ok_ms(),
        app.config.ready_broker_max_age_ms,
        app.admission.stalled_for(now_ms()),
    );
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Ready when the outcomes reader polled within 2 s and the producer reached the broker within
/// `broker_max_age_ms` (times in unix ms; 0 = never).
fn readiness(
    now: i64,
    listening: bool,
    last_poll_ms: i64,
    broker_ok_ms: i64,
    broker_max_age_ms: i64,
    stalled_for_ms: Option<i64>,
) -> (bool, ReadyOut) {
    let reader_ok = listening && now - last_poll_ms < 2_000;
    let broker_ok = broker_ok_ms > 0 && now - broker_ok_ms <= broker_max_age_ms;
    let sequencer_ok = stalled_for_ms.is_none();
    let checks = ReadyChecks {
        outcomes_reader: if reader_ok { "ok" } else { "not_polling" },
        broker: if broker_ok { "ok" } else { "unreachable" },
        sequencer: if sequencer_ok { "ok" } else { "stalled" },
    };
    if reader_ok && broker_ok && sequencer_ok {
        let body = ReadyOut {
            status: "ready",
            checks,
            detail: None,
        };
        return (true, body);
    }
    let mut problems = Vec::new();
    if !reader_ok {
        problems.push("the outcomes reader is not polling the broker".to_owned());
    }
    if !broker_ok {
        problems.push(if broker_ok_ms == 0 {
            "the producer has not reached the broker yet".to_owned()
        } else {
            format!(
                "the producer has not reached the broker for {} ms",
                now - broker_ok_ms
            )
        });
    }
    if let Some(ms) = stalled_for_ms {
        problems.push(format!(
            "no sequencer has committed anything for {ms} ms while requests wait in the log"
        ));
    }
    let body = ReadyOut {
        status: "not_ready",
        checks,
        detail: Some(problems.join("; ")),
    };
    (false, body)
}

#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    summary = "Prometheus text exposition of the ingress's metrics",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"))
)]
pub(crate) async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    refresh_gauges(&app);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// Copies the values kept in atomics elsewhere into their series, once per scrape.
fn refresh_gauges(app: &App) {
    let m = &app.metrics;
    let now = now_ms();
    let health = &app.bus.health;
    m.writes_in_flight.set(app.bus.in_flight() as f64);
    m.stock_streams.set(app.bus.stock.subscribers() as f64);
    sync_counter(&m.stock_updates, &app.bus.stock.updates);
    m.producer_queue_depth
        .set(f64::from(app.bus.producer_queue_depth()));
    sync_counter(&m.producer_replacements, app.bus.producer_replacements());
    sync_counter(&m.outcome_messages, &health.outcome_messages);
    m.outcomes_received.absolute(
        health.replies_delivered.load(Ordering::Relaxed)
            + health.replies_unclaimed.load(Ordering::Relaxed),
    );
    sync_counter(&m.outcomes_unclaimed, &health.replies_unclaimed);
    let lags = app.admission.lags();
    let lag: i64 = lags.iter().map(|l| l.lag.load(Ordering::Relaxed)).sum();
    m.sequencer_lag.set(lag as f64);
    let age = |ms: i64| {
        if ms == 0 {
            f64::INFINITY
        } else {
            (now - ms).max(0) as f64 / 1000.0
        }
    };
    // The oldest partition's lag signal: a stale one is what matters.
    let oldest = lags
        .iter()
        .map(|l| l.measured_ms.load(Ordering::Relaxed))
        .min();
    m.lag_signal_age.set(age(oldest.unwrap_or(0)));
    m.broker_ok_age.set(age(app.admission.broker_ok_ms()));
    if let Some(limiter) = &app.admission.limiter {
        m.rate_limiter_keys.set(limiter.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_a_polling_reader_and_a_recent_broker_round_trip() {
        let now = 1_000_000;
        let (ok, body) = readiness(now, true, now - 100, now - 500, 3_000, None);
        assert!(ok);
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"status": "ready", "checks": {"outcomes_reader": "ok", "broker": "ok", "sequencer": "ok"}})
        );
        let (ok, body) = readiness(now, true, now - 100, now - 3_001, 3_000, None);
        assert!(!ok);
        assert_eq!(body.checks.broker, "unreachable");
        assert_eq!(body.checks.outcomes_reader, "ok");
        assert!(body.detail.unwrap().contains("3001 ms"));
        let (ok, body) = readiness(now, true, now - 100, 0, 3_000, None);
        assert!(!ok);
        assert!(body.detail.unwrap().contains("not reached the broker yet"));
        let (ok, body) = readiness(now, true, now - 2_500, now, 3_000, None);
        assert!(!ok);
        assert_eq!(body.checks.outcomes_reader, "not_polling");
        let (ok, _) = readiness(now, false, now, now, 3_000, None);
        assert!(!ok);
        let (ok, body) = readiness(now, true, now, now, 3_000, Some(4_200));
        assert!(!ok);
        assert_eq!(body.checks.sequencer, "stalled");
        assert!(body.detail.unwrap().contains("4200 ms"));
    }
}
