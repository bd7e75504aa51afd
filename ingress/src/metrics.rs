//! The ingress's Prometheus metrics, rendered on `GET /metrics` by `metrics-exporter-prometheus`.
//!
//! The recorder is owned here rather than installed globally, and every series the hot path
//! touches is a handle registered once: a request costs two clock reads, one counter increment,
//! one histogram sample and two gauge updates, with no label building and no registry lookup.
//! Values that already live in atomics elsewhere (outcome counters, producer queue depth, lag)
//! are copied into their series when a scrape renders, so they cost nothing per request.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use rustc_hash::FxHashMap;

/// Latency buckets in seconds; 0.12 is the p99 target of the 25k requests/s scenario.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.12, 0.15, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

const HTTP_REQUESTS: &str = "ingress_http_requests_total";
const HTTP_DURATION: &str = "ingress_http_request_duration_seconds";
const APPEND_DURATION: &str = "ingress_append_seconds";
const OUTCOME_DELAY: &str = "ingress_outcome_delay_seconds";

/// Statuses the API answers; each gets a lazily registered handle per route.
const STATUSES: [u16; 16] = [
    200, 201, 400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 500, 502, 503, 504,
];

static META: Metadata<'static> = Metadata::new("ingress", Level::INFO, Some(module_path!()));

/// Why a write was refused before it reached the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// IN_FLIGHT_MAX writes already wait on this ingress.
    InFlight = 0,
    /// The sequencer is more than LAG_MAX messages behind the log.
    Lag = 1,
    /// The user's token bucket is empty.
    RateLimited = 2,
    /// librdkafka's local queue is full.
    QueueFull = 3,
    /// No sequencer has committed for STALL_MAX_MS while requests wait.
    NoSequencer = 4,
}

impl Refusal {
    const LABELS: [&'static str; 5] = [
        "in_flight",
        "lag",
        "rate_limited",
        "queue_full",
        "no_sequencer",
    ];
}

struct RouteSeries {
    method: &'static str,
    route: &'static str,
    latency: Histogram,
    by_status: [OnceLock<Counter>; STATUSES.len()],
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    routes: Vec<RouteSeries>,
    /// Requests that matched no route (404) or no method (405), by status.
    unmatched: Mutex<FxHashMap<u16, Counter>>,
    http_in_flight: Gauge,
    refusals: [Counter; 5],
    pub writes_in_flight: Gauge,
    pub producer_queue_depth: Gauge,
    pub producer_replacements: Counter,
    pub outcome_messages: Counter,
    pub outcomes_received: Counter,
    pub outcomes_unclaimed: Counter,
    pub sequencer_lag: Gauge,
    pub lag_signal_age: Gauge,
    pub broker_ok_age: Gauge,
    pub rate_limiter_keys: Gauge,
    /// Open HTTP connections (bounded by CONNECTIONS_MAX).
    pub connections_open: Gauge,
    /// Open live stock streams (bounded by STREAM_SUBSCRIBERS_MAX).
    pub stock_streams: Gauge,
    pub stock_updates: Counter,
    connections_refused: Counter,
    /// The two Kafka hops a write's latency is made of, seen from the ingress (handed to the bus).
    pub hops: HopTimers,
}

/// Histograms the bus records into, one sample per append and one per outcome message.
#[derive(Clone)]
pub struct HopTimers {
    pub append: Histogram,
    pub outcome_delay: Histogram,
}

/// Decrements the in-flight gauge when the request ends, also when its future is dropped.
pub struct InFlightGuard<'a>(&'a Gauge);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl Metrics {
    /// `routes` are the `(method, path template)` of every route, in the router's order.
    pub fn new(routes: &[(&'static str, &'static str)]) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), LATENCY_BUCKETS)
            .expect("latency buckets are not empty")
            .set_buckets_for_metric(Matcher::Full(APPEND_DURATION.into()), LATENCY_BUCKETS)
            .expect("latency buckets are not empty")
            .set_buckets_for_metric(Matcher::Full(OUTCOME_DELAY.into()), LATENCY_BUCKETS)
            .expect("latency buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(KeyName::from_const_str(name), unit, help.into());
        };
        describe(
            HTTP_REQUESTS,
            None,
            "HTTP requests answered, by method, route template and status",
        );
        describe(
            HTTP_DURATION,
            Some(Unit::Seconds),
            "time from request to response per route (writes include waiting for the outcome)",
        );
        describe(
            APPEND_DURATION,
            Some(Unit::Seconds),
            "hop 1 of a write: handing the request to the producer until the broker acknowledges it (linger.ms plus the broker's append)",
        );
        describe(
            OUTCOME_DELAY,
            Some(Unit::Seconds),
            "last hop of a write: the sequencer publishing an outcome message (after COMMIT) until this ingress reads it; millisecond resolution, from the message's CreateTime",
        );
        describe(
            "ingress_http_requests_in_flight",
            None,
            "HTTP requests being handled now",
        );
        describe(
            "ingress_stock_streams",
            None,
            "open live stock streams, GET /v1/skus/{sku}/events (bounded by STREAM_SUBSCRIBERS_MAX)",
        );
        describe(
            "ingress_stock_updates_total",
            None,
            "stock updates (one per committed batch that changed SKUs) read from the outcomes topic",
        );
        describe(
            "ingress_writes_in_flight",
            None,
            "commands appended and waiting for their outcome (bounded by IN_FLIGHT_MAX)",
        );
        describe(
            "ingress_producer_queue_depth",
            None,
            "messages in librdkafka's queue not yet acknowledged by the broker",
        );
        describe(
            "ingress_producer_replacements_total",
            None,
            "times a wedged requests producer was replaced by a new one (appends failing while a new client reaches the broker)",
        );
        describe(
            "ingress_admission_refused_total",
            None,
            "writes refused before reaching the log, by reason (in_flight, lag, no_sequencer, rate_limited, queue_full)",
        );
        describe(
            "ingress_outcome_messages_total",
            None,
            "messages read from the outcomes topic (all ingresses' batches)",
        );
        describe(
            "ingress_outcomes_received_total",
            None,
            "replies addressed to this ingress",
        );
        describe(
            "ingress_outcomes_unclaimed_total",
            None,
            "replies no request was waiting for (timed out already, or re-published after a failover)",
        );
        describe(
            "ingress_sequencer_lag_messages",
            None,
            "requests-topic end offset minus the offset committed in Postgres",
        );
        describe(
            "ingress_lag_signal_age_seconds",
            Some(Unit::Seconds),
            "age of the last successful lag measurement",
        );
        describe(
            "ingress_broker_last_ok_age_seconds",
            Some(Unit::Seconds),
            "age of the producer's last successful round trip to the broker",
        );
        describe(
            "ingress_rate_limiter_keys",
            None,
            "users tracked by the per-user rate limiter",
        );

        let counter = |name: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&Key::from_parts(name, labels), &META)
        };
        let gauge =
            |name: &'static str| recorder.register_gauge(&Key::from_static_name(name), &META);
        let routes = routes
            .iter()
            .map(|&(method, route)| RouteSeries {
                method,
                route,
                latency: recorder.register_histogram(
                    &Key::from_parts(
                        HTTP_DURATION,
                        vec![Label::new("method", method), Label::new("route", route)],
                    ),
                    &META,
                ),
                by_status: std::array::from_fn(|_| OnceLock::new()),
            })
            .collect();
        let refusals = std::array::from_fn(|i| {
            counter(
                "ingress_admission_refused_total",
                vec![Label::new("reason", Refusal::LABELS[i])],
            )
        });
        Metrics {
            routes,
            unmatched: Mutex::default(),
            http_in_flight: gauge("ingress_http_requests_in_flight"),
            refusals,
            writes_in_flight: gauge("ingress_writes_in_flight"),
            producer_queue_depth: gauge("ingress_producer_queue_depth"),
            producer_replacements: counter("ingress_producer_replacements_total", vec![]),
            outcome_messages: counter("ingress_outcome_messages_total", vec![]),
            outcomes_received: counter("ingress_outcomes_received_total", vec![]),
            outcomes_unclaimed: counter("ingress_outcomes_unclaimed_total", vec![]),
            sequencer_lag: gauge("ingress_sequencer_lag_messages"),
            lag_signal_age: gauge("ingress_lag_signal_age_seconds"),
            broker_ok_age: gauge("ingress_broker_last_ok_age_seconds"),
            rate_limiter_keys: gauge("ingress_rate_limiter_keys"),
            connections_open: gauge("ingress_http_connections_open"),
            stock_streams: gauge("ingress_stock_streams"),
            stock_updates: counter("ingress_stock_updates_total", vec![]),
            connections_refused: counter("ingress_http_connections_refused_total", vec![]),
            hops: HopTimers {
                append: recorder.register_histogram(&Key::from_static_name(APPEND_DURATION), &META),
                outcome_delay: recorder
                    .register_histogram(&Key::from_static_name(OUTCOME_DELAY), &META),
            },
            recorder,
            handle,
        }
    }

    pub fn request_started(&self) -> InFlightGuard<'_> {
        self.http_in_flight.increment(1.0);
        InFlightGuard(&self.http_in_flight)
    }

    /// Records one answered request of route `route` (an index into the routes given to `new`).
    pub fn request_done(&self, route: usize, status: u16, elapsed: Duration) {
        let series = &self.routes[route];
        series.latency.record(elapsed.as_secs_f64());
        match STATUSES.iter().position(|&s| s == status) {
            Some(i) => series.by_status[i]
                .get_or_init(|| self.status_counter(series.method, series.route, status))
                .increment(1),
            // A status the API never answers on purpose: rare, so registering it each time is fine.
            None => self
                .status_counter(series.method, series.route, status)
                .increment(1),
        }
    }

    /// Counts a request that matched no route or no method.
    pub fn unmatched(&self, status: u16) {
        let mut map = self.unmatched.lock().expect("metrics lock");
        map.entry(status)
            .or_insert_with(|| self.status_counter("any", "unmatched", status))
            .increment(1);
    }

    /// A connection over CONNECTIONS_MAX was refused.
    pub fn connection_refused(&self) {
        self.connections_refused.increment(1);
    }

    pub fn refused(&self, why: Refusal) {
        self.refusals[why as usize].increment(1);
    }

    fn status_counter(&self, method: &'static str, route: &'static str, status: u16) -> Counter {
        let labels = vec![
            Label::new("method", method),
            Label::new("route", route),
            Label::new("status", status.to_string()),
        ];
        self.recorder
            .register_counter(&Key::from_parts(HTTP_REQUESTS, labels), &META)
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram samples into their buckets; call about once a second so that memory
    /// stays bounded between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// Copies a monotonically increasing atomic into a counter.
pub fn sync_counter(counter: &Counter, value: &std::sync::atomic::AtomicU64) {
    counter.absolute(value.load(Ordering::Relaxed));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_histogram_buckets_and_status_labels() {
        let m = Metrics::new(&[("POST", "/v1/reservations"), ("GET", "/v1/skus/{sku}")]);
        {
            let _g = m.request_started();
            m.request_done(0, 201, Duration::from_millis(3));
            m.request_done(0, 409, Duration::from_millis(2));
            m.request_done(1, 418, Duration::from_millis(1));
        }
        m.refused(Refusal::Lag);
        m.unmatched(404);
        let text = m.render();
        assert!(
            text.contains(r#"ingress_http_requests_total{method="POST",route="/v1/reservations",status="201"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"status="409"} 1"#), "{text}");
        assert!(
            text.contains(r#"route="/v1/skus/{sku}",status="418"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"ingress_http_request_duration_seconds_bucket{method="POST",route="/v1/reservations",le="0.005"} 2"#),
            "{text}"
        );
        assert!(text.contains("# TYPE ingress_http_request_duration_seconds histogram"));
        assert!(text.contains(r#"ingress_admission_refused_total{reason="lag"} 1"#));
        assert!(text.contains(r#"route="unmatched",status="404"} 1"#));
        assert!(text.contains("ingress_http_requests_in_flight 0"), "{text}");
    }
}
