//! What the console's sampler records each second, and the last minutes of it: the windows its
//! rates and alerts are computed over.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use persistence::reads::WriterView;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::prom::{increase, Scrape};
use crate::admission::LagMonitor;
use crate::bus::Bus;

/// How much history is kept: the longest window an alert looks at ("checkpoints stalled").
pub const HISTORY_MS: i64 = 5 * 60_000;

/// One second's sample.
#[derive(Clone, Debug, Default)]
pub struct Tick {
    /// Unix ms, this host's clock.
    pub at_ms: i64,
    pub ingress: IngressTick,
    /// The fence row; `None` when Postgres did not answer.
    pub writer: Option<WriterView>,
    /// Requests waiting in each pre-sale queue that has any; `None` when Postgres did not answer.
    pub queues: Option<Vec<(String, u64)>>,
    /// Each configured sequencer; `None` when it did not answer.
    pub peers: Vec<Option<PeerTick>>,
}

/// This ingress's own figures (its `/metrics`, its lag monitor, its bounds).
#[derive(Clone, Debug, Default)]
pub struct IngressTick {
    pub answers: Answers,
    pub connections: Connections,
    pub log: LogPosition,
    pub queues: Queues,
}

/// Answers, all and by status (`ingress_http_requests_total`), but those of `/readyz`: its 503
/// says "not ready" (while starting, say), not "refused".
#[derive(Clone, Debug, Default)]
pub struct Answers {
    pub all: f64,
    pub status_503: f64,
    pub status_504: f64,
    /// Writes refused with 503 `no_sequencer` (`ingress_admission_refused_total`).
    pub refused_no_sequencer: f64,
}

impl Answers {
    /// The answers counted in this ingress's own Prometheus text.
    pub fn read(scrape: &Scrape) -> Answers {
        let answers = |status: Option<&str>| {
            let mut labels = vec![];
            labels.extend(status.map(|s| ("status", s)));
            let all = scrape.sum("ingress_http_requests_total", &labels);
            labels.push(("route", "/readyz"));
            let probes = scrape.sum("ingress_http_requests_total", &labels);
            all.unwrap_or(0.0) - probes.unwrap_or(0.0)
        };
        Answers {
            all: answers(None),
            status_503: answers(Some("503")),
            status_504: answers(Some("504")),
            refused_no_sequencer: scrape
                .sum(
                    "ingress_admission_refused_total",
                    &[("reason", "no_sequencer")],
                )
                .unwrap_or(0.0),
        }
    }
}

/// HTTP connections: open now, refused so far, and their bound (CONNECTIONS_MAX).
#[derive(Clone, Debug, Default)]
pub struct Connections {
    pub open: f64,
    pub refused: f64,
    pub max: f64,
}

impl Connections {
    /// The connections of this ingress's own Prometheus text, under the bound `max`.
    pub fn read(scrape: &Scrape, max: f64) -> Connections {
        Connections {
            open: scrape.value("ingress_http_connections_open").unwrap_or(0.0),
            refused: scrape
                .value("ingress_http_connections_refused_total")
                .unwrap_or(0.0),
            max,
        }
    }
}

/// The requests log's end and the committed offset as last measured, and the lag when the
/// measurement is fresh.
#[derive(Clone, Debug, Default)]
pub struct LogPosition {
    pub end: Option<i64>,
    pub committed: Option<i64>,
    pub lag: Option<i64>,
}

impl LogPosition {
    /// As the lag monitor of admission last measured it (nothing before its first measurement).
    pub fn measured(lag: &LagMonitor, now_ms: i64) -> LogPosition {
        let measured = lag.measured_ms.load(Ordering::Relaxed) > 0;
        LogPosition {
            end: measured.then(|| lag.high_watermark.load(Ordering::Relaxed)),
            committed: measured.then(|| lag.committed_offset.load(Ordering::Relaxed)),
            lag: lag.current_lag(now_ms),
        }
    }
}

/// What waits on this ingress: writes for their outcome, requests for the broker, and the open
/// live stock streams.
#[derive(Clone, Debug, Default)]
pub struct Queues {
    pub writes_in_flight: u64,
    pub producer_queue_depth: u64,
    pub stock_streams: u64,
}

impl Queues {
    pub fn of(bus: &Bus) -> Queues {
        Queues {
            writes_in_flight: bus.in_flight() as u64,
            producer_queue_depth: bus.producer_queue_depth().max(0) as u64,
            stock_streams: bus.stock.subscribers() as u64,
        }
    }
}

/// What a sequencer's `/status` says: the fields the console shows, as the summary passes
/// them on (all null when it did not answer).
#[derive(Clone, Debug, Default, Deserialize, Serialize, ToSchema)]
pub struct PeerStatus {
    pub node_id: Option<String>,
    /// starting, standby, active, stopped or log_lost.
    pub role: Option<String>,
    pub epoch: Option<u64>,
    /// What its `/readyz` says, and why not.
    pub ready: Option<bool>,
    pub not_ready: Option<String>,
    pub lag: Option<i64>,
    pub committed_offset: Option<i64>,
    pub last_batch_age_ms: Option<i64>,
    pub last_batch_size: Option<u64>,
    /// Its last batch's commit time, in microseconds.
    pub last_commit_us: Option<u64>,
}

/// One sequencer at one tick: its `/status` and the series of its `/metrics` the alerts read.
/// Counters that do not exist yet (created on their first increment) read 0.
#[derive(Clone, Debug, Default)]
pub struct PeerTick {
    pub status: PeerStatus,
    pub oversell_skus: f64,
    pub log_lost: f64,
    pub commit_retries: f64,
    pub batches: f64,
    pub checkpoints: f64,
    pub checkpoint_failures: f64,
    pub checkpoint_load_failures: f64,
    pub state_load_seconds: f64,
    /// `sequencer_batch_commit_seconds` buckets: (upper bound, cumulative count).
    pub commit_buckets: Vec<(f64, f64)>,
}

impl PeerTick {
    pub fn new(status: PeerStatus, scrape: &Scrape) -> PeerTick {
        let v = |name: &str| scrape.value(name).unwrap_or(0.0);
        PeerTick {
            status,
            oversell_skus: v("sequencer_oversell_skus"),
            log_lost: v("sequencer_log_lost"),
            commit_retries: v("sequencer_commit_retries_total"),
            batches: v("sequencer_batches_total"),
            checkpoints: v("sequencer_checkpoints_total"),
            checkpoint_failures: v("sequencer_checkpoint_failures_total"),
            checkpoint_load_failures: v("sequencer_checkpoint_load_failures_total"),
            state_load_seconds: v("sequencer_state_load_seconds"),
            commit_buckets: scrape.buckets("sequencer_batch_commit_seconds"),
        }
    }

    pub fn name(&self, index: usize) -> String {
        self.status
            .node_id
            .clone()
            .unwrap_or_else(|| format!("sequencer {}", index + 1))
    }

    pub fn is_active(&self) -> bool {
        self.status.role.as_deref() == Some("active")
    }
}

/// The ticks of the last [`HISTORY_MS`], oldest first.
#[derive(Default, Debug)]
pub struct History {
    ticks: VecDeque<Tick>,
}

impl History {
    pub fn push(&mut self, tick: Tick) {
        let now = tick.at_ms;
        self.ticks.push_back(tick);
        while self
            .ticks
            .front()
            .is_some_and(|t| now - t.at_ms > HISTORY_MS)
        {
            self.ticks.pop_front();
        }
    }

    /// The newest tick.
    pub fn now(&self) -> Option<&Tick> {
        self.ticks.back()
    }

    /// The oldest tick at most `window_ms` before the newest (the newest itself when it is the
    /// only one): where an increase over that window starts.
    pub fn start_of(&self, window_ms: i64) -> Option<&Tick> {
        let now = self.now()?.at_ms;
        self.ticks.iter().find(|t| now - t.at_ms <= window_ms)
    }

    /// The increase of `f` over the last `window_ms` (0 with a single tick); `None` when `f` has
    /// no value at either end.
    pub fn increase(&self, window_ms: i64, f: impl Fn(&Tick) -> Option<f64>) -> Option<f64> {
        let (old, new) = (f(self.start_of(window_ms)?)?, f(self.now()?)?);
        Some(increase(old, new))
    }

    /// [`History::increase`] of sequencer `index`'s `f`, from the oldest tick in the window that
    /// has it (a sequencer that did not answer then is skipped).
    pub fn peer_increase(
        &self,
        index: usize,
        window_ms: i64,
        f: impl Fn(&PeerTick) -> f64,
    ) -> Option<f64> {
        let newest = self.now()?.peers.get(index)?.as_ref()?;
        let oldest = self.peer_start(index, window_ms)?;
        Some(increase(f(oldest), f(newest)))
    }

    /// Sequencer `index` at the oldest tick within `window_ms` that has it.
    pub fn peer_start(&self, index: usize, window_ms: i64) -> Option<&PeerTick> {
        let now = self.now()?.at_ms;
        self.ticks
            .iter()
            .filter(|t| now - t.at_ms <= window_ms)
            .find_map(|t| t.peers.get(index)?.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readiness_probe_is_no_answer_of_the_503_rate() {
        let scrape = Scrape::parse(
            r#"ingress_http_requests_total{method="GET",route="/readyz",status="503"} 3
ingress_http_requests_total{method="GET",route="/readyz",status="200"} 5
ingress_http_requests_total{method="POST",route="/v1/reservations",status="503"} 2
ingress_http_requests_total{method="POST",route="/v1/reservations",status="201"} 40
ingress_admission_refused_total{reason="no_sequencer"} 2
ingress_http_connections_open 7
"#,
        );
        let answers = Answers::read(&scrape);
        assert_eq!(
            (answers.all, answers.status_503, answers.status_504),
            (42.0, 2.0, 0.0)
        );
        assert_eq!(
            (
                answers.refused_no_sequencer,
                Connections::read(&scrape, 0.0).open
            ),
            (2.0, 7.0)
        );
    }
}
