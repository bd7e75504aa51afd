//! The state machine: [`Engine::apply_batch`] and the rules of every command (reserve, confirm,
//! cancel, the SKU admin commands), run through the prefetch pipeline described in the crate
//! docs.

use std::cmp::Reverse;

use wire::{
    Command, Outcome, Reject, Request, RequestId, ReservationStatus, ReservationView, SkuView,
};

use crate::index::{prefetch, HashKey, Hashes};
use crate::output::{BatchOutput, Decision, QueuedRequest, Released, Transition};
use crate::queue::AtQueue;
use crate::state::{refusal_text, split_id, Engine, Reservation, Sku, Span};
use crate::{RowIdx, SkuIdx, UserIdx, QUANTITY_MAX};

/// Commands between two stages of the prefetch pipeline (see [`Engine::apply_batch`]).
const STAGE: usize = 2;
/// The pipeline keeps the hashes of the commands in flight by command index modulo this.
const RING: usize = 8;
const _: () = assert!(RING > 3 * STAGE && RING.is_power_of_two());

/// A reserve command as [`Engine::reserve`] decides it: the command's fields, where it stands in
/// its batch, and the hashes of its keys (computed once, when it entered the pipeline).
#[derive(Debug, Clone, Copy)]
struct NewReserve<'a> {
    /// Index of the command within the batch; `None` for a queued request decided at its
    /// sale's start.
    index: Option<u32>,
    request_id: RequestId,
    sku: &'a str,
    user_id: &'a str,
    quantity: u32,
    /// The idempotency key.
    key: &'a str,
    hashes: Hashes,
}

impl<'a> NewReserve<'a> {
    /// The reserve command `request` at `index` in its batch, with the hashes it entered the
    /// pipeline with; `None` if `request` is no reserve.
    fn of(index: u32, request: &'a Request, hashes: Option<Hashes>) -> Option<Self> {
        let Command::Reserve {
            sku,
            user_id,
            quantity,
            idempotency_key,
        } = &request.command
        else {
            return None;
        };
        Some(NewReserve {
            index: Some(index),
            request_id: request.request_id,
            sku,
            user_id,
            quantity: *quantity,
            key: idempotency_key,
            hashes: hashes.expect("a reserve is hashed"),
        })
    }
}

impl Engine {
    /// An empty engine whose indexes hash with `seed` (`sequencer_state.hash_seed`).
    pub fn with_hash_seed(seed: u64) -> Self {
        Engine {
            hash_key: HashKey::new(seed),
            ..Engine::default()
        }
    }

    /// The seed of the engine's keyed hash.
    pub fn hash_seed(&self) -> u64 {
        self.hash_key.seed()
    }

    pub fn new() -> Self {
        Self::default()
    }

    pub fn batch_seq(&self) -> u64 {
        self.batch_seq
    }

    pub fn clock_ms(&self) -> i64 {
        self.clock_ms
    }

    /// Earliest expiry among current holds, so the runtime can cut an empty batch in time.
    pub fn next_expiry_ms(&mut self) -> Option<i64> {
        while let Some(Reverse((at, id))) = self.expiries.peek().copied() {
            if self.live_hold(id, at).is_some() {
                return Some(at);
            }
            self.expiries.pop();
        }
        None
    }

    pub fn sku(&self, name: &str) -> Option<SkuView> {
        self.sku_index
            .get(name)
            .map(|&i| self.skus[i as usize].view())
    }

    pub fn skus(&self) -> impl Iterator<Item = SkuView> + '_ {
        self.skus.iter().map(Sku::view)
    }

    pub fn reservation(&self, id: RequestId) -> Option<ReservationView> {
        self.reservation_row(id).map(|row| self.view_of(row))
    }

    /// Decides one batch. `now_ms` is the batch time; it is clamped so it never goes backwards.
    pub fn apply_batch(&mut self, now_ms: i64, requests: &[Request]) -> BatchOutput {
        self.batch_seq += 1;
        self.clock_ms = self.clock_ms.max(now_ms);
        let mut out = BatchOutput {
            batch_seq: self.batch_seq,
            batch_time_ms: self.clock_ms,
            outcomes: Vec::with_capacity(requests.len()),
            decisions: Vec::with_capacity(requests.len()),
            ..BatchOutput::default()
        };
        self.expire_due_holds(&mut out);
        self.release_queues(&mut out);
        // The prefetch pipeline (see the module docs). At each step one command enters: it is
        // hashed and its index slots are prefetched. `STAGE` commands later, its user's slot
        // has arrived and names a user row to prefetch; `STAGE` later still, that row has
        // arrived and says where the user's name is; `STAGE` later it is decided. A command
        // decided before it leaves the pipeline (one creating the user, say) makes a later
        // prefetch useless, never wrong: deciding always does its own lookups.
        let mut ahead = [None; RING];
        for step in 0..requests.len() + 3 * STAGE {
            if let Some(request) = requests.get(step) {
                let hashes = self.hash_key.of(request);
                if let Some(h) = hashes {
                    self.user_index.prefetch(h.user);
                    self.by_key.prefetch(h.key);
                    self.by_request.prefetch(h.request);
                }
                ahead[step % RING] = hashes;
            }
            let stage = |n: usize| step.checked_sub(n * STAGE).filter(|&i| i < requests.len());
            if let Some(h) = stage(1).and_then(|i| ahead[i % RING]) {
                if let Some(user) = self.user_index.find(h.user, |_| true) {
                    prefetch(&self.users[user as usize]);
                }
            }
            if let Some(h) = stage(2).and_then(|i| ahead[i % RING]) {
                if let Some(user) = self.user_index.find(h.user, |_| true) {
                    let name = self.users[user as usize].name;
                    if let Some(byte) = self.names.as_bytes().get(name.start as usize) {
                        prefetch(byte);
                    }
                }
            }
            if let Some(i) = stage(3) {
                let outcome = self.decide(i as u32, &requests[i], ahead[i % RING], &mut out);
                out.outcomes.push(outcome);
            }
        }
        for sku in &self.skus {
            if sku.dirty_in_batch == self.batch_seq {
                sku.check_stock_invariant();
                out.skus.push(sku.view());
            }
        }
        debug_assert_eq!(out.outcomes.len(), requests.len());
        out
    }

    fn expire_due_holds(&mut self, out: &mut BatchOutput) {
        let now = self.clock_ms;
        while let Some(Reverse((at, id))) = self.expiries.peek().copied() {
            if at > now {
                break;
            }
            self.expiries.pop();
            let Some(row) = self.live_hold(id, at) else {
                continue;
            };
            self.release_hold(row, ReservationStatus::Expired);
            out.transitions.push(Transition {
                reservation_id: id,
                status: ReservationStatus::Expired,
                at_ms: now,
            });
        }
    }

    /// Decides every pre-sale queue that is due (see `queue.rs`), each in queue order.
    fn release_queues(&mut self, out: &mut BatchOutput) {
        for (_, queue) in self.take_due_queues() {
            for q in queue {
                let hashes = self
                    .hash_key
                    .hashes(q.request_id, &q.user_id, &q.idempotency_key);
                let released = out.released.len();
                self.reserve(
                    NewReserve {
                        index: None,
                        request_id: q.request_id,
                        sku: &q.sku,
                        user_id: &q.user_id,
                        quantity: q.quantity,
                        key: &q.idempotency_key,
                        hashes,
                    },
                    out,
                );
                // Its key, id and quantity were checked when it joined, and nothing else may
                // take them while it waits: it is decided, never answered about its input.
                assert_eq!(
                    out.released.len(),
                    released + 1,
                    "a queued request is decided"
                );
            }
        }
    }

    /// The row of reservation `id` if it is still held and expires at `at` (an expiry entry
    /// that is not stale).
    fn live_hold(&self, id: RequestId, at: i64) -> Option<RowIdx> {
        self.reservation_row(id).filter(|&row| {
            let r = &self.decisions[row as usize];
            r.status == Ok(ReservationStatus::Held) && r.expires_at_ms == at
        })
    }

    /// `hashes` are those of the command if it is a reserve.
    fn decide(
        &mut self,
        index: u32,
        request: &Request,
        hashes: Option<Hashes>,
        out: &mut BatchOutput,
    ) -> Outcome {
        let now = self.clock_ms;
        if !request.command.fields_ok() {
            // A poison message from a foreign producer: an answer about the input, recorded
            // in the batch's outbox, never a panic or a row Postgres cannot store.
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        if let Some(reserve) = NewReserve::of(index, request, hashes) {
            return self.reserve(reserve, out);
        }
        match &request.command {
            Command::Confirm { reservation_id } => {
                self.settle(*reservation_id, ReservationStatus::Confirmed, now, out)
            }
            Command::Cancel { reservation_id } => {
                self.settle(*reservation_id, ReservationStatus::Cancelled, now, out)
            }
            Command::Admin {
                idempotency_key,
                command,
            } => self.keyed_admin(index, idempotency_key, command, out),
            // `Command::Reserve` is decided above.
            admin => self.admin(admin),
        }
    }

    fn reserve(&mut self, reserve: NewReserve<'_>, out: &mut BatchOutput) -> Outcome {
        let NewReserve {
            index,
            request_id,
            sku: sku_name,
            user_id,
            quantity,
            key,
            hashes,
        } = reserve;
        let sku = self.sku_index.get(sku_name).copied();
        if let Some(row) = self.find_key(hashes.key, user_id, key) {
            // A repeat: same request gets the first outcome and changes nothing; a different
            // request under the same key is refused and not recorded. (SKU names are unique,
            // so comparing indexes compares names; an unknown SKU differs from any record.)
            let record = &self.decisions[row as usize];
            if sku != Some(record.sku) || record.quantity != quantity {
                return Outcome::Rejected(Reject::IdempotencyKeyReused);
            }
            return match record.status {
                Ok(_) => Outcome::Held {
                    reservation_id: record.request_id(),
                    expires_at_ms: record.expires_at_ms,
                },
                Err(reason) => Outcome::Rejected(reason),
            };
        }
        if !self.queues.is_empty() {
            if let Some(place) = self.queues.find_key(user_id, key) {
                // A retry of a queued request: its place in the queue, on the same terms.
                if sku != Some(place.sku) || place.quantity != quantity {
                    return Outcome::Rejected(Reject::IdempotencyKeyReused);
                }
                return self.queued_outcome(place.sku, place.request_id, place.position);
            }
        }
        // Answers about the input, not decisions about stock: nothing is recorded and the key
        // stays free, so a corrected retry (or one after the SKU exists) is decided anew.
        let Some(sku) = sku else {
            return Outcome::Rejected(Reject::UnknownSku);
        };
        if quantity == 0
            || quantity > QUANTITY_MAX
            || self.find_request(hashes.request, request_id).is_some()
            || self.queues.has_id(request_id)
        {
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        let user = self.find_user(hashes.user, user_id);
        // Most SKUs have no queue: one load decides that, and the queue's rules stay off the
        // path of a flash sale's reserves.
        let queued = self.skus[sku as usize].config.queue.is_some();
        let at_queue = if queued {
            self.at_queue(sku, user, user_id, quantity)
        } else {
            AtQueue::Closed
        };
        let decision = match at_queue {
            AtQueue::Closed => self.grant_or_refuse(sku, user, quantity),
            AtQueue::Refuse(reason) => Err(reason),
            AtQueue::Join => {
                let queued = QueuedRequest {
                    request_id,
                    sku: sku_name.to_owned(),
                    user_id: user_id.to_owned(),
                    idempotency_key: key.to_owned(),
                    quantity,
                };
                let index = index.expect("a queued request is decided after its queue closed");
                return self.enqueue(index, queued, sku, out);
            }
        };
        let (user, key) = match decision {
            Ok(expires_at_ms) => {
                let user = match user {
                    Some(user) => user,
                    None => self.add_user(hashes.user, user_id),
                };
                self.take_stock(sku, user, quantity);
                self.expiries.push(Reverse((expires_at_ms, request_id)));
                (user, Span::push(&mut self.keys, key))
            }
            Err(_) => refusal_text(&mut self.keys, user_id, key),
        };
        let row = Reservation {
            request_id: split_id(request_id),
            expires_at_ms: decision.unwrap_or(0),
            key,
            user,
            sku,
            quantity,
            status: decision.map(|_| ReservationStatus::Held),
        };
        self.record(row, hashes);
        match index {
            Some(index) => out.decisions.push(Decision {
                command_index: index,
                request_id,
                result: decision,
            }),
            None => out.released.push(Released {
                request_id,
                result: decision,
            }),
        }
        match decision {
            Ok(expires_at_ms) => Outcome::Held {
                reservation_id: request_id,
                expires_at_ms,
            },
            Err(reason) => Outcome::Rejected(reason),
        }
    }

    /// The rules of a new reservation, in the order a buyer would want them explained (after
    /// the checks of the input itself in [`Engine::reserve`]). Changes nothing; `Ok` is the
    /// expiry of the hold to create.
    fn grant_or_refuse(
        &self,
        sku_idx: SkuIdx,
        user: Option<UserIdx>,
        quantity: u32,
    ) -> Result<i64, Reject> {
        let now = self.clock_ms;
        let sku = &self.skus[sku_idx as usize];
        if sku.paused {
            return Err(Reject::SalePaused);
        }
        if sku.config.starts_at_ms.is_some_and(|t| now < t) {
            return Err(Reject::SaleNotStarted);
        }
        if sku.config.ends_at_ms.is_some_and(|t| now >= t) {
            return Err(Reject::SaleEnded);
        }
        let holding = user.map_or(0, |user| self.holding(user, sku_idx));
        if holding + u64::from(quantity) > u64::from(sku.config.per_user_limit) {
            return Err(Reject::LimitExceeded);
        }
        if sku.available < u64::from(quantity) {
            return Err(Reject::SoldOut);
        }
        Ok(now.saturating_add(sku.config.hold_ttl_ms as i64))
    }

    /// Moves granted units from available to held and counts them to the user's limit.
    fn take_stock(&mut self, sku_idx: SkuIdx, user: UserIdx, quantity: u32) {
        let sku = &mut self.skus[sku_idx as usize];
        sku.available -= u64::from(quantity);
        sku.held += u64::from(quantity);
        sku.dirty_in_batch = self.batch_seq;
        let limit = u64::from(sku.config.per_user_limit);
        let holding = self.holding_mut(user, sku_idx);
        *holding += u64::from(quantity);
        assert!(*holding <= limit, "per-user limit broken by a grant");
    }

    /// Appends a decision row and indexes it; its request id and key, which `hashes` are of,
    /// have just been looked up and not found.
    pub(crate) fn record(&mut self, row: Reservation, hashes: Hashes) {
        let idx = RowIdx::try_from(self.decisions.len()).expect("fewer than 2^32 decisions");
        self.decisions.push(row);
        self.by_request.insert_new(hashes.request, idx);
        self.by_key.insert_new(hashes.key, idx);
    }

    /// Confirm or cancel: only a held reservation moves; repeating a finished move is a no-op
    /// that answers the same; the opposite move after the fact is refused.
    fn settle(
        &mut self,
        id: RequestId,
        to: ReservationStatus,
        now: i64,
        out: &mut BatchOutput,
    ) -> Outcome {
        let Some(row) = self.reservation_row(id) else {
            return Outcome::Rejected(Reject::UnknownReservation);
        };
        let r = &self.decisions[row as usize];
        let status = r.status.expect("reservation_row returns reservations");
        let changed = match (status, to) {
            (ReservationStatus::Held, ReservationStatus::Confirmed) => {
                let (sku, quantity) = (r.sku as usize, u64::from(r.quantity));
                let sku = &mut self.skus[sku];
                sku.held -= quantity;
                sku.sold += quantity;
                sku.dirty_in_batch = self.batch_seq;
                self.decisions[row as usize].status = Ok(to);
                self.settled.push((row, to));
                true
            }
            (ReservationStatus::Held, _) => {
                self.release_hold(row, to);
                true
            }
            (current, wanted) if current == wanted => false,
            (ReservationStatus::Expired, _) => {
                return Outcome::Rejected(Reject::ReservationExpired)
            }
            (ReservationStatus::Cancelled, _) => {
                return Outcome::Rejected(Reject::ReservationCancelled)
            }
            (ReservationStatus::Confirmed, _) => {
                return Outcome::Rejected(Reject::ReservationConfirmed)
            }
        };
        if changed {
            out.transitions.push(Transition {
                reservation_id: id,
                status: to,
                at_ms: now,
            });
        }
        Outcome::Reservation(self.view_of(row))
    }

    /// Held -> cancelled or expired: the units go back on sale and stop counting to the limit.
    fn release_hold(&mut self, row: RowIdx, to: ReservationStatus) {
        let r = &mut self.decisions[row as usize];
        assert_eq!(
            r.status,
            Ok(ReservationStatus::Held),
            "release of a non-held reservation"
        );
        r.status = Ok(to);
        let (sku_idx, user, quantity) = (r.sku, r.user, u64::from(r.quantity));
        self.settled.push((row, to));
        let sku = &mut self.skus[sku_idx as usize];
        sku.held -= quantity;
        sku.available += quantity;
        sku.dirty_in_batch = self.batch_seq;
        let holding = self.holding_mut(user, sku_idx);
        *holding = holding.checked_sub(quantity).expect("hold without holding");
    }
}
