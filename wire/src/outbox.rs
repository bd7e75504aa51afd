//! The outcomes topic's messages: the replies of a committed batch for each ingress, the stock
//! updates every ingress reads, and the outbox a batch stores them in until they are published.

use bincode::{Decode, Encode};

use crate::{decode, IngressId, Outcome, RequestId, SkuView};

/// One reply to one request.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub request_id: RequestId,
    pub outcome: Outcome,
}

/// The replies of one committed batch meant for one ingress.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct OutcomeBatch {
    pub epoch: u64,
    pub batch_seq: u64,
    pub batch_time_ms: i64,
    pub replies: Vec<Reply>,
}

/// A committed batch's outcome messages, as stored in its `batches.outbox` row (and published
/// after COMMIT): one [`OutcomeBatch`] per ingress, and a [`StockUpdate`] under
/// [`STOCK_UPDATES`]. A ticket's outcome is read back from here.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq, Default)]
pub struct Outbox {
    pub messages: Vec<OutboxMessage>,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    pub ingress_id: IngressId,
    /// `encode(&OutcomeBatch)`, or `encode(&StockUpdate)` under [`STOCK_UPDATES`].
    pub payload: Vec<u8>,
}

impl Outbox {
    /// The outcome of request `id` in this batch, if it is one of its commands.
    pub fn outcome_of(&self, id: RequestId) -> Option<Outcome> {
        self.messages
            .iter()
            .filter(|m| m.ingress_id != STOCK_UPDATES)
            .filter_map(|m| decode::<OutcomeBatch>(&m.payload).ok())
            .flat_map(|b| b.replies)
            .find(|r| r.request_id == id)
            .map(|r| r.outcome)
    }
}

/// The ingress id under whose key ([`ingress_key`]) the outcomes topic carries
/// [`StockUpdate`]s, read by every ingress. No ingress uses it as its own id.
pub const STOCK_UPDATES: IngressId = 0;

/// The counters of every SKU a committed batch changed, published with its outcomes for every
/// ingress (the live stock streams). Counts are committed ones: published after COMMIT.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct StockUpdate {
    pub epoch: u64,
    pub batch_seq: u64,
    pub batch_time_ms: i64,
    pub skus: Vec<SkuView>,
}

/// The Kafka key of an outcomes message: the ingress it is meant for.
pub fn ingress_key(ingress_id: IngressId) -> [u8; 8] {
    ingress_id.to_be_bytes()
}
