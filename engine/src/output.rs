//! What the engine hands back: the outputs of a batch (what the persistence layer writes in one
//! transaction), the snapshot a restore starts from, and why a restore is refused.

use wire::{Outcome, Reject, RequestId, ReservationStatus};

/// A new decision row: one per reserve command that was not a replay of an earlier key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index of the command within the batch (the caller owns the strings; no copies here).
    pub command_index: u32,
    pub request_id: RequestId,
    /// `Ok(expires_at_ms)` for a hold, `Err(reason)` for a refusal.
    pub result: Result<i64, Reject>,
}

/// A reservation changed status within the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub reservation_id: RequestId,
    pub status: ReservationStatus,
    pub at_ms: i64,
}

/// Everything one batch decided and changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutput {
    pub batch_seq: u64,
    pub batch_time_ms: i64,
    /// One per command, in command order.
    pub outcomes: Vec<Outcome>,
    pub decisions: Vec<Decision>,
    pub transitions: Vec<Transition>,
    /// Final state of every SKU the batch changed, in SKU creation order.
    pub skus: Vec<wire::SkuView>,
    /// Keyed admin commands applied by this batch (not their replays): each key is stored with
    /// its command and outcome in the batch's transaction.
    pub admin_keys: Vec<AdminKeyApplied>,
    /// Reservations that joined a pre-sale queue in this batch, in command order.
    pub queued: Vec<QueuedAt>,
    /// Queued reservations this batch decided (their queues' sales started), in queue order,
    /// SKUs in creation order, before every command of the batch. Each is a new decision row
    /// whose strings are the queued request's (stored when it was queued).
    pub released: Vec<Released>,
}

/// A reserve command that joined its SKU's pre-sale queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedAt {
    /// Index of the command within the batch (its strings are found there).
    pub command_index: u32,
    pub request_id: RequestId,
    /// Requests queued before it on its SKU.
    pub position: u32,
}

/// A queued reservation decided when its sale started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub request_id: RequestId,
    /// `Ok(expires_at_ms)` for a hold, `Err(reason)` for a refusal.
    pub result: Result<i64, Reject>,
}

/// A reservation waiting in its SKU's pre-sale queue: what a restored engine needs to decide it
/// at the sale's start (`queued_requests`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRequest {
    pub request_id: RequestId,
    pub sku: String,
    pub user_id: String,
    pub idempotency_key: String,
    pub quantity: u32,
}

/// A keyed admin command applied for the first time under its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminKeyApplied {
    /// Index of the `Command::Admin` within the batch (its key and outcome are found there).
    pub command_index: u32,
    /// The inner command, encoded (`wire::encode`): what a retry under the key must repeat.
    pub command: Vec<u8>,
}

/// A stored admin key: what a restored engine needs to treat a retry as a retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminKeyRecord {
    pub idempotency_key: String,
    /// The inner command, encoded (`wire::encode`).
    pub command: Vec<u8>,
    /// What the first application answered; every retry gets it again.
    pub outcome: Outcome,
}

/// The engine's whole state as persisted: what start-up and takeover load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The seed of the engine's keyed hash (`sequencer_state.hash_seed`).
    pub hash_seed: u64,
    pub batch_seq: u64,
    pub clock_ms: i64,
    pub skus: Vec<wire::SkuView>,
    pub decisions: Vec<wire::StoredDecision>,
    /// Admin keys applied up to `batch_seq` (`admin_commands`).
    pub admin_keys: Vec<AdminKeyRecord>,
    /// The pre-sale queues as they stood after `batch_seq`, each SKU's in queue order.
    pub queued: Vec<QueuedRequest>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("decision {request_id:032x} names sku {sku:?}, which is not in the snapshot")]
    UnknownSku { request_id: RequestId, sku: String },
    #[error("request id {request_id:032x} has two decision rows in the snapshot")]
    DuplicateRequestId { request_id: RequestId },
    #[error("idempotency key ({user_id:?}, {key:?}) appears twice in the snapshot")]
    DuplicateKey { user_id: String, key: String },
    #[error("sku {sku}: counters say held {held_counter}/sold {sold_counter} but the reservations add up to held {held_rows}/sold {sold_rows}")]
    CountersDisagree {
        sku: String,
        held_counter: u64,
        sold_counter: u64,
        held_rows: u64,
        sold_rows: u64,
    },
    #[error("sku {sku}: available + held + sold != total")]
    StockInvariant { sku: String },
    #[error("sku {sku} appears twice")]
    DuplicateSku { sku: String },
    #[error("user {user_id:?} appears twice")]
    DuplicateUser { user_id: String },
    #[error("queued request {request_id:032x} is queued twice, or also has a decision row")]
    DuplicateQueued { request_id: RequestId },
}
