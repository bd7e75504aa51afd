//! What the ops console (`GET /ops`) shows besides the SKUs, sampled once a second in the
//! background and served as it stands by `GET /v1/ops/summary` (so that however many consoles
//! watch, each ingress reads Postgres and the sequencers once a second, never per request):
//! - this ingress's queues and bounds, and its own `/metrics` (answers by status, refusals,
//!   connections);
//! - the requests log's end and the committed offset (the lag monitor of admission);
//! - the fence row in Postgres (`persistence::reads::writer`): epoch, leader, lease, the
//!   committed offset and batch, whose moves give decisions/s and the batch size;
//! - the requests waiting in each pre-sale queue (`persistence::reads::queue_lengths`);
//! - each sequencer of SEQUENCER_STATUS_URLS: its `/status` (role, epoch, ...) and `/metrics`
//!   (commit time, the series the alerts read);
//! - the alerts of docs/OPERATIONS.md over the last minutes of those samples ([`alerts`]).

pub mod alerts;
pub mod prom;
pub mod sample;
pub mod summary;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prom::{quantile, Scrape};
use sample::{
    Answers, Connections, History, IngressTick, LogPosition, PeerStatus, PeerTick, Queues, Tick,
};
use summary::{
    IngressOut, LogOut, OpsSummaryOut, PresaleQueueOut, SequencerOut, ThroughputOut, WriterOut,
};

use crate::bus::now_ms;
use crate::http::{rfc3339, App};

/// How often the console's figures are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The window of decisions/s, batch size and commit time.
const RATE_WINDOW_MS: i64 = 10_000;
/// Most pre-sale queues in a summary.
const QUEUES_MAX: u32 = 1000;

/// The sequencers to ask and the newest summary.
pub struct Console {
    /// Base URLs of the sequencers' status servers (`http://host:port`).
    peers: Vec<String>,
    latest: Mutex<Arc<OpsSummaryOut>>,
}

impl Console {
    /// `peers`: SEQUENCER_STATUS_URLS, comma-separated base URLs (empty: none).
    pub fn new(peers: &str) -> Console {
        let peers = peers
            .split(',')
            .map(|p| p.trim().trim_end_matches('/').to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        Console {
            peers,
            latest: Mutex::new(Arc::new(OpsSummaryOut {
                sampled_at: rfc3339(now_ms()),
                ingress: IngressOut::default(),
                log: LogOut::default(),
                throughput: ThroughputOut::default(),
                writer: None,
                presale_queues: None,
                sequencers: Vec::new(),
                alerts: Vec::new(),
            })),
        }
    }

    /// The newest summary (at most [`SAMPLE_EVERY`] old once the sampler runs).
    pub fn latest(&self) -> Arc<OpsSummaryOut> {
        self.latest.lock().expect("console lock").clone()
    }
}

/// Samples every [`SAMPLE_EVERY`] for as long as the process lives.
pub async fn run(app: Arc<App>) {
    let client = match reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_millis(900))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the ops console's HTTP client; no console figures");
            return;
        }
    };
    let mut history = History::default();
    let mut alerting = alerts::Alerting::default();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let sample = sample(&app, &client).await;
        history.push(sample);
        let summary = summarise(&app, &history, alerting.evaluate(&history));
        *app.console.latest.lock().expect("console lock") = Arc::new(summary);
    }
}

async fn sample(app: &App, client: &reqwest::Client) -> Tick {
    let peers = futures_util::future::join_all(
        app.console
            .peers
            .iter()
            .map(|base| ask_sequencer(client, base)),
    );
    let (writer, queues, peers) = tokio::join!(
        // Partition 0's writer, and its SKUs' queues.
        persistence::reads::writer(&app.pools[0]),
        persistence::reads::queue_lengths(&app.pools[0], QUEUES_MAX),
        peers
    );
    let now = now_ms();
    let scrape = Scrape::parse(&app.metrics.render());
    let ingress = IngressTick {
        answers: Answers::read(&scrape),
        connections: Connections::read(&scrape, app.config.connections_max as f64),
        log: LogPosition::measured(app.admission.lag(0), now),
        queues: Queues::of(&app.bus),
    };
    Tick {
        at_ms: now,
        ingress,
        writer: writer
            .inspect_err(|e| tracing::debug!(error = %e, "console: the fence row"))
            .ok(),
        queues: queues.ok(),
        peers,
    }
}

/// Sequencer `base`'s `/status` and `/metrics`; `None` when either does not answer.
async fn ask_sequencer(client: &reqwest::Client, base: &str) -> Option<PeerTick> {
    let get = |path: &'static str| async move {
        let r = client.get(format!("{base}{path}")).send().await.ok()?;
        // /status answers 503 with its document while the sequencer is not ready.
        r.text().await.ok()
    };
    let (status, metrics) = tokio::join!(get("/status"), get("/metrics"));
    let status: PeerStatus = serde_json::from_str(&status?).ok()?;
    Some(PeerTick::new(status, &Scrape::parse(&metrics?)))
}

fn summarise(app: &App, history: &History, alerts: Vec<summary::AlertOut>) -> OpsSummaryOut {
    let now = history.now().cloned().unwrap_or_default();
    let i = &now.ingress;
    OpsSummaryOut {
        sampled_at: rfc3339(now.at_ms),
        ingress: IngressOut {
            writes_in_flight: i.queues.writes_in_flight,
            in_flight_max: app.admission.limits.in_flight_max as u64,
            producer_queue_depth: i.queues.producer_queue_depth,
            stock_streams: i.queues.stock_streams,
            stream_subscribers_max: app.config.stream_subscribers_max as u64,
            connections_open: i.connections.open as u64,
            connections_max: app.config.connections_max as u64,
        },
        log: LogOut {
            end_offset: i.log.end,
            committed_offset: i.log.committed,
            lag: i.log.lag,
            lag_max: app.admission.limits.lag_max,
        },
        throughput: throughput(history),
        writer: now.writer.as_ref().map(|w| WriterOut {
            epoch: w.epoch,
            leader: w.leader.clone(),
            lease_remaining_ms: w.lease_remaining_ms,
            committed_offset: w.next_offset,
            batch_seq: w.batch_seq,
            last_batch_age_ms: w.last_batch_age_ms,
        }),
        presale_queues: now.queues.as_ref().map(|queues| {
            queues
                .iter()
                .map(|(sku, waiting)| PresaleQueueOut {
                    sku: sku.clone(),
                    waiting: *waiting,
                })
                .collect()
        }),
        sequencers: now
            .peers
            .iter()
            .enumerate()
            .map(|(index, p)| sequencer_out(index, p.as_ref()))
            .collect(),
        alerts,
    }
}

fn sequencer_out(index: usize, peer: Option<&PeerTick>) -> SequencerOut {
    SequencerOut {
        index: index as u32 + 1,
        reachable: peer.is_some(),
        status: peer.map(|p| p.status.clone()).unwrap_or_default(),
    }
}

/// Decisions/s and batch size from the fence row's moves over the window; commit time from the
/// active sequencer's histogram over the same window.
fn throughput(history: &History) -> ThroughputOut {
    let (Some(start), Some(now)) = (history.start_of(RATE_WINDOW_MS), history.now()) else {
        return ThroughputOut::default();
    };
    let window_ms = now.at_ms - start.at_ms;
    let mut out = ThroughputOut {
        window_s: window_ms as f64 / 1000.0,
        ..ThroughputOut::default()
    };
    if let (Some(old), Some(new)) = (&start.writer, &now.writer) {
        // A rebased log moves the offset back: no rate across it.
        if window_ms > 0 && new.next_offset >= old.next_offset && new.batch_seq >= old.batch_seq {
            let decided = (new.next_offset - old.next_offset) as f64;
            let batches = (new.batch_seq - old.batch_seq) as f64;
            let per_s = |n: f64| n * 1000.0 / window_ms as f64;
            out.decisions_per_s = Some(per_s(decided));
            out.batches_per_s = Some(per_s(batches));
            out.batch_size_mean = (batches > 0.0).then(|| decided / batches);
        }
    }
    let active = now
        .peers
        .iter()
        .position(|p| p.as_ref().is_some_and(PeerTick::is_active));
    if let Some(i) = active {
        let (old, new) = (history.peer_start(i, RATE_WINDOW_MS), now.peers[i].as_ref());
        if let (Some(old), Some(new)) = (old, new) {
            let ms = |q| quantile(q, &old.commit_buckets, &new.commit_buckets).map(|s| s * 1000.0);
            out.commit_p50_ms = ms(0.5);
            out.commit_p99_ms = ms(0.99);
        }
    }
    out
}
