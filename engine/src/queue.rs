//! The pre-sale queues (the waiting room). A SKU whose config has a [`wire::QueueWindow`]
//! queues the reservations that arrive between the window's opening and the sale's start,
//! instead of refusing them `sale_not_started`: in log order, up to the window's `max` (beyond:
//! `queue_full`), at most a buyer's per-user limit of units per buyer (beyond:
//! `limit_exceeded`). The first batch at or after the sale's start, while the SKU is not paused,
//! decides the whole queue in queue order before any command of its own (see
//! [`Engine::apply_batch`]), by the same rules as any reservation.
//!
//! A queued request has no decision row yet, so the queue keeps what its decision will need:
//! its request id (the reservation id if granted), user id, key and quantity. A retry of a
//! queued request (same user, key, SKU and quantity) is answered with the first one's place in
//! the queue; another request under its key is refused `idempotency_key_reused`. The queues are
//! not in checkpoints: the persistence layer stores each queued request with the batch that
//! queued it and marks it with the batch that decided it (`queued_requests`), and a restored
//! engine gets the queues back from there ([`Engine::restore_queue`]).

use std::collections::BTreeMap;

use rustc_hash::{FxHashMap, FxHashSet};
use wire::{Outcome, Reject, RequestId};

use crate::output::{BatchOutput, QueuedAt, QueuedRequest, RestoreError};
use crate::state::Engine;
use crate::{SkuIdx, UserIdx};

/// Where a queued request stands: what a retry of it is compared with and answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) sku: SkuIdx,
    pub(crate) position: u32,
    pub(crate) quantity: u32,
    pub(crate) request_id: RequestId,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Queues {
    /// Every non-empty queue, by SKU (ordered: queues are decided in SKU creation order).
    by_sku: BTreeMap<SkuIdx, Vec<QueuedRequest>>,
    /// `(user id, key)` of every queued request.
    by_key: FxHashMap<(String, String), Place>,
    /// Request ids of every queued request: no other command may take one.
    ids: FxHashSet<RequestId>,
    /// Units queued per `(user id, SKU)`: what the per-user limit applies to in the queue.
    units: FxHashMap<(String, SkuIdx), u64>,
}

/// What a new reservation meets at its SKU's queue.
pub(crate) enum AtQueue {
    /// No queue is open (or the SKU is paused): the usual rules decide.
    Closed,
    /// It joins the queue.
    Join,
    /// The queue refuses it (recorded, like any refusal).
    Refuse(Reject),
}

impl Queues {
    pub(crate) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(crate) fn find_key(&self, user_id: &str, key: &str) -> Option<Place> {
        // Allocates: only reached while some queue is not empty.
        self.by_key
            .get(&(user_id.to_owned(), key.to_owned()))
            .copied()
    }

    pub(crate) fn has_id(&self, id: RequestId) -> bool {
        !self.ids.is_empty() && self.ids.contains(&id)
    }

    pub(crate) fn units(&self, user_id: &str, sku: SkuIdx) -> u64 {
        if self.units.is_empty() {
            return 0;
        }
        self.units
            .get(&(user_id.to_owned(), sku))
            .copied()
            .unwrap_or(0)
    }

    fn queue_len(&self, sku: SkuIdx) -> usize {
        self.by_sku.get(&sku).map_or(0, Vec::len)
    }

    /// Appends `request` to the queue of `sku`; its position.
    fn push(&mut self, sku: SkuIdx, request: QueuedRequest) -> u32 {
        let queue = self.by_sku.entry(sku).or_default();
        let position = u32::try_from(queue.len()).expect("queues shorter than 2^32");
        self.by_key.insert(
            (request.user_id.clone(), request.idempotency_key.clone()),
            Place {
                sku,
                position,
                quantity: request.quantity,
                request_id: request.request_id,
            },
        );
        self.ids.insert(request.request_id);
        *self
            .units
            .entry((request.user_id.clone(), sku))
            .or_insert(0) += u64::from(request.quantity);
        queue.push(request);
        position
    }

    /// Removes the whole queue of `sku` and everything that indexes it.
    fn take(&mut self, sku: SkuIdx) -> Vec<QueuedRequest> {
        let queue = self.by_sku.remove(&sku).unwrap_or_default();
        for q in &queue {
            self.by_key
                .remove(&(q.user_id.clone(), q.idempotency_key.clone()));
            self.ids.remove(&q.request_id);
            self.units.remove(&(q.user_id.clone(), sku));
        }
        queue
    }

    /// Every queued request, SKUs in creation order, each queue in order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (SkuIdx, &QueuedRequest)> + '_ {
        self.by_sku
            .iter()
            .flat_map(|(&sku, queue)| queue.iter().map(move |q| (sku, q)))
    }

    fn skus(&self) -> impl Iterator<Item = SkuIdx> + '_ {
        self.by_sku.keys().copied()
    }
}

impl Engine {
    /// When the next queue is due to be decided: the earliest start among the SKUs with a
    /// queue that are not paused (the batch time already, for a queue whose SKU no longer has a
    /// start). The runtime cuts a batch then, even with no command to decide.
    pub fn next_release_ms(&self) -> Option<i64> {
        self.queues
            .skus()
            .map(|i| &self.skus[i as usize])
            .filter(|sku| !sku.paused)
            .map(|sku| sku.config.starts_at_ms.unwrap_or(self.clock_ms))
            .min()
    }

    /// Every queued request, SKUs in creation order, each queue in order.
    pub fn queued(&self) -> impl Iterator<Item = &QueuedRequest> + '_ {
        self.queues.entries().map(|(_, q)| q)
    }

    /// Requests waiting in every queue.
    pub fn queued_len(&self) -> usize {
        self.queues.len()
    }

    /// Requests waiting in the queue of `sku`.
    pub fn queue_len(&self, sku: &str) -> usize {
        self.sku_index
            .get(sku)
            .map_or(0, |&i| self.queues.queue_len(i))
    }

    /// Adds the queued requests stored in Postgres (`queued_requests`) to a restored engine, in
    /// queue order: those queued by the batches it holds and not decided by them.
    pub fn restore_queue(
        &mut self,
        queued: impl IntoIterator<Item = QueuedRequest>,
    ) -> Result<(), RestoreError> {
        for q in queued {
            let Some(&sku) = self.sku_index.get(&q.sku) else {
                return Err(RestoreError::UnknownSku {
                    request_id: q.request_id,
                    sku: q.sku,
                });
            };
            let hashes = self
                .hash_key
                .hashes(q.request_id, &q.user_id, &q.idempotency_key);
            if self.queues.has_id(q.request_id)
                || self
                    .queues
                    .find_key(&q.user_id, &q.idempotency_key)
                    .is_some()
                || self.find_request(hashes.request, q.request_id).is_some()
                || self
                    .find_key(hashes.key, &q.user_id, &q.idempotency_key)
                    .is_some()
            {
                return Err(RestoreError::DuplicateQueued {
                    request_id: q.request_id,
                });
            }
            self.queues.push(sku, q);
        }
        Ok(())
    }

    /// The queues' invariants (part of [`Engine::check_invariants`]): every queued request is
    /// indexed once by id and by key with its place, names its queue's SKU, has no decision
    /// row, and the queued units per buyer add up.
    pub(crate) fn check_queues(&self) {
        let mut units: FxHashMap<(String, SkuIdx), u64> = FxHashMap::default();
        let mut count = 0;
        for (&sku, queue) in &self.queues.by_sku {
            assert!(!queue.is_empty(), "an empty queue is kept");
            for (position, q) in queue.iter().enumerate() {
                count += 1;
                assert_eq!(
                    q.sku, self.skus[sku as usize].name,
                    "queued under another SKU"
                );
                assert_eq!(
                    self.queues.find_key(&q.user_id, &q.idempotency_key),
                    Some(Place {
                        sku,
                        position: position as u32,
                        quantity: q.quantity,
                        request_id: q.request_id,
                    }),
                    "queued request {:032x} is not indexed at its place",
                    q.request_id
                );
                assert!(self.queues.ids.contains(&q.request_id));
                let id_hash = self.hash_key.request(q.request_id);
                assert!(
                    self.find_request(id_hash, q.request_id).is_none(),
                    "queued request {:032x} also has a decision row",
                    q.request_id
                );
                *units.entry((q.user_id.clone(), sku)).or_insert(0) += u64::from(q.quantity);
            }
        }
        assert_eq!(self.queues.len(), count, "queued ids != queued requests");
        assert_eq!(
            self.queues.by_key.len(),
            count,
            "queued keys != queued requests"
        );
        assert_eq!(
            self.queues.units, units,
            "queued units per buyer do not add up"
        );
    }

    /// What a new reservation of `quantity` units of `sku` by `user_id` meets at the queue.
    #[cold]
    #[inline(never)]
    pub(crate) fn at_queue(
        &self,
        sku: SkuIdx,
        user: Option<UserIdx>,
        user_id: &str,
        quantity: u32,
    ) -> AtQueue {
        let s = &self.skus[sku as usize];
        if s.paused || !s.config.queue_open_at(self.clock_ms) {
            return AtQueue::Closed;
        }
        let max = s.config.queue.as_ref().map_or(0, |q| q.max);
        if self.queues.queue_len(sku) >= max as usize {
            return AtQueue::Refuse(Reject::QueueFull);
        }
        let holding = user.map_or(0, |user| self.holding(user, sku));
        let queued = self.queues.units(user_id, sku);
        if holding + queued + u64::from(quantity) > u64::from(s.config.per_user_limit) {
            return AtQueue::Refuse(Reject::LimitExceeded);
        }
        AtQueue::Join
    }

    /// Queues the reserve command at `index`; [`Engine::at_queue`] has said it joins.
    pub(crate) fn enqueue(
        &mut self,
        index: u32,
        request: QueuedRequest,
        sku: SkuIdx,
        out: &mut BatchOutput,
    ) -> Outcome {
        let request_id = request.request_id;
        let position = self.queues.push(sku, request);
        out.queued.push(QueuedAt {
            command_index: index,
            request_id,
            position,
        });
        self.queued_outcome(sku, request_id, position)
    }

    /// The answer to a queued request and to its retries.
    pub(crate) fn queued_outcome(&self, sku: SkuIdx, id: RequestId, position: u32) -> Outcome {
        Outcome::Queued {
            reservation_id: id,
            position,
            starts_at_ms: self.skus[sku as usize]
                .config
                .starts_at_ms
                .unwrap_or(self.clock_ms),
        }
    }

    /// Takes the queues that are due at the batch time: the SKU is not paused and its sale has
    /// started (or no longer has a start). SKUs in creation order.
    pub(crate) fn take_due_queues(&mut self) -> Vec<(SkuIdx, Vec<QueuedRequest>)> {
        if self.queues.is_empty() {
            return Vec::new();
        }
        let now = self.clock_ms;
        let due: Vec<SkuIdx> = self
            .queues
            .skus()
            .filter(|&i| {
                let sku = &self.skus[i as usize];
                !sku.paused && sku.config.starts_at_ms.is_none_or(|t| now >= t)
            })
            .collect();
        due.into_iter()
            .map(|sku| (sku, self.queues.take(sku)))
            .collect()
    }
}
