//! The answer of `GET /v1/ops/summary`: what the ops console shows besides the SKUs, as this
//! ingress last sampled it (once a second). Read-only, and nothing in it is a secret: counts,
//! rates, roles and epochs, and the limits this ingress enforces.

use serde::Serialize;
use utoipa::ToSchema;

use super::sample::PeerStatus;

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct OpsSummaryOut {
    /// When this ingress took the sample (RFC 3339, UTC); a new one every second.
    #[schema(format = DateTime)]
    pub sampled_at: String,
    pub ingress: IngressOut,
    pub log: LogOut,
    pub throughput: ThroughputOut,
    /// The fence row in Postgres (who holds the writer's lease); null while Postgres does not
    /// answer.
    pub writer: Option<WriterOut>,
    /// The pre-sale queues that hold requests (decided when their sale starts), by SKU name, at
    /// most 1000; null while Postgres does not answer.
    pub presale_queues: Option<Vec<PresaleQueueOut>>,
    /// Each sequencer of SEQUENCER_STATUS_URLS, in that order, as its `/status` answered; empty
    /// when the ingress has none configured.
    pub sequencers: Vec<SequencerOut>,
    /// Every alert of docs/OPERATIONS.md ("Alerts worth setting"), as this ingress evaluates it.
    pub alerts: Vec<AlertOut>,
}

/// This ingress's queues and their bounds.
#[derive(Serialize, ToSchema, Clone, Debug, Default)]
pub struct IngressOut {
    /// Writes waiting for their outcome here, and their bound (IN_FLIGHT_MAX).
    pub writes_in_flight: u64,
    pub in_flight_max: u64,
    /// Requests handed to the producer and not yet acknowledged by the broker.
    pub producer_queue_depth: u64,
    /// Open live stock streams, and their bound (STREAM_SUBSCRIBERS_MAX).
    pub stock_streams: u64,
    pub stream_subscribers_max: u64,
    /// Open HTTP connections, and their bound (CONNECTIONS_MAX).
    pub connections_open: u64,
    pub connections_max: u64,
}

/// The requests log: how far it goes and how far it is decided.
#[derive(Serialize, ToSchema, Clone, Debug, Default)]
pub struct LogOut {
    /// The requests topic's end, as last measured (null before the first measurement).
    pub end_offset: Option<i64>,
    /// The offset committed in Postgres: every request before it is decided.
    pub committed_offset: Option<i64>,
    /// Requests waiting in the log (end minus committed): the queue every ingress shares. Null
    /// while the measurement is older than 5 s.
    pub lag: Option<i64>,
    /// Buyers' writes are refused with 503 `overloaded` above this lag (LAG_MAX; 0: off).
    pub lag_max: u64,
}

/// Decisions over the last few seconds.
#[derive(Serialize, ToSchema, Clone, Debug, Default)]
pub struct ThroughputOut {
    /// The window the figures are over (up to 10 s; shorter just after the ingress started).
    pub window_s: f64,
    /// Requests decided per second (the committed offset's moves).
    pub decisions_per_s: Option<f64>,
    /// Batches committed per second.
    pub batches_per_s: Option<f64>,
    /// Requests per committed batch.
    pub batch_size_mean: Option<f64>,
    /// Median and 99th percentile of the active sequencer's batch commit time (fence to
    /// COMMIT), from its `sequencer_batch_commit_seconds`; null without commits in the window
    /// or without SEQUENCER_STATUS_URLS.
    pub commit_p50_ms: Option<f64>,
    pub commit_p99_ms: Option<f64>,
}

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct WriterOut {
    /// Bumped by every new leader; a batch commits only under the newest.
    pub epoch: u64,
    /// The sequencer holding (or last holding) the lease.
    pub leader: Option<String>,
    /// Until the lease lapses (negative: lapsed that long ago), by the database's clock.
    pub lease_remaining_ms: i64,
    pub committed_offset: i64,
    pub batch_seq: u64,
    /// Since the newest batch was decided (null before the first).
    pub last_batch_age_ms: Option<i64>,
}

/// One SKU's pre-sale queue.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct PresaleQueueOut {
    #[schema(example = "tee-1")]
    pub sku: String,
    /// Requests waiting in it (its bound is the SKU's `queue.max`).
    pub waiting: u64,
}

/// One sequencer, as its `/status` answered.
#[derive(Serialize, ToSchema, Clone, Debug, Default)]
pub struct SequencerOut {
    /// Its place in SEQUENCER_STATUS_URLS, from 1.
    pub index: u32,
    /// Whether it answered this second; the other fields are null when it did not.
    pub reachable: bool,
    #[serde(flatten)]
    pub status: PeerStatus,
}

/// One alert of docs/OPERATIONS.md and where it stands.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct AlertOut {
    /// Its name in docs/OPERATIONS.md ("Alerts worth setting").
    #[schema(example = "no writer")]
    pub name: &'static str,
    /// page or warning, as in deploy/prometheus/alerts.yml.
    pub severity: &'static str,
    /// firing; pending (the condition holds, not yet for as long as the alert needs); ok; or
    /// unknown (what it needs is not measured here, e.g. no SEQUENCER_STATUS_URLS).
    #[schema(example = "ok")]
    pub state: &'static str,
    /// What this ingress evaluates.
    pub condition: &'static str,
    /// What it found, when firing or pending; why not, when unknown.
    pub detail: Option<String>,
    /// The runbooks of docs/OPERATIONS.md to follow.
    pub runbook: &'static str,
    /// Since when the condition has held, while firing or pending.
    #[schema(format = DateTime)]
    pub since: Option<String>,
}
