//! The allocation engine: a deterministic state machine that decides a batch of commands against
//! in-memory stock. No IO, no clock reads, no randomness: time is an input (the batch time), so
//! the same starting state, batch boundaries and batch times always give the same outcomes. That
//! is what lets a standby replay the log and what makes the engine testable against a model.
//!
//! One call to [`Engine::apply_batch`] does, in order:
//! 1. expire every hold whose expiry is at or before the batch time (held -> available);
//! 2. decide each command in log order and produce exactly one outcome for it;
//! 3. assert the stock invariant on every SKU the batch touched.
//!
//! Alongside the outcomes it returns what changed ([`BatchOutput`]) so the persistence layer can
//! write the batch as one transaction without re-deriving anything.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::{FxHashMap, FxHashSet};
pub use wire::StoredDecision;
use wire::{
    Command, Outcome, Reject, Request, RequestId, ReservationStatus, ReservationView, SkuConfig,
    SkuView,
};

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;

pub use wire::limits::{HOLD_TTL_MS_MAX, QUANTITY_MAX, STOCK_MAX};

pub type SkuIdx = u32;
type UserIdx = u32;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Sku {
    name: String,
    config: SkuConfig,
    available: u64,
    held: u64,
    sold: u64,
    paused: bool,
    /// `batch_seq` of the last batch that changed this SKU; avoids a set for dirty tracking.
    dirty_in_batch: u64,
}

impl Sku {
    fn total(&self) -> u64 {
        self.config.total_stock
    }

    fn view(&self) -> SkuView {
        SkuView {
            sku: self.name.clone(),
            total: self.total(),
            available: self.available,
            held: self.held,
            sold: self.sold,
            config: self.config.clone(),
            paused: self.paused,
        }
    }

    fn check_stock_invariant(&self) {
        let sum = self
            .available
            .checked_add(self.held)
            .and_then(|s| s.checked_add(self.sold));
        assert_eq!(
            sum,
            Some(self.total()),
            "stock invariant broken on sku {}: available {} + held {} + sold {} != total {}",
            self.name,
            self.available,
            self.held,
            self.sold,
            self.total()
        );
        assert!(
            self.total() <= STOCK_MAX,
            "sku {} total over STOCK_MAX",
            self.name
        );
    }
}

/// What a repeated `(user_id, idempotency_key)` gets back, and what it must match.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IdempotencyRecord {
    /// The SKU name the key was first used with (an unknown SKU has no index to point at).
    sku: Box<str>,
    quantity: u32,
    /// The reservation it created, or why it was refused.
    decision: Result<RequestId, Reject>,
}

#[derive(Debug, Default, Clone)]
struct User {
    name: String,
    keys: FxHashMap<Box<str>, IdempotencyRecord>,
    /// Units held or sold per SKU: what the per-user limit is checked against.
    holdings: FxHashMap<SkuIdx, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    sku: SkuIdx,
    user: UserIdx,
    quantity: u32,
    status: ReservationStatus,
    expires_at_ms: i64,
}

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
    pub skus: Vec<SkuView>,
}

/// The engine's whole state as persisted: what start-up and takeover load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub batch_seq: u64,
    pub clock_ms: i64,
    pub skus: Vec<SkuView>,
    pub decisions: Vec<StoredDecision>,
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
}

#[derive(Debug, Default, Clone)]
pub struct Engine {
    skus: Vec<Sku>,
    sku_index: FxHashMap<String, SkuIdx>,
    users: Vec<User>,
    user_index: FxHashMap<String, UserIdx>,
    reservations: FxHashMap<RequestId, Reservation>,
    /// Request ids of recorded refusals. With `reservations`, every id that has a decision row:
    /// a foreign producer reusing one must be refused, not allowed to write a second row with the
    /// same primary key (which would fail the commit on every replay and stall the sale).
    refused_ids: FxHashSet<RequestId>,
    /// Holds ordered by expiry; entries whose reservation left `held` are skipped when popped.
    expiries: BinaryHeap<Reverse<(i64, RequestId)>>,
    /// Time of the last batch: batch time never goes backwards, even if the wall clock does.
    clock_ms: i64,
    batch_seq: u64,
}

impl Engine {
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
            match self.reservations.get(&id) {
                Some(r) if r.status == ReservationStatus::Held && r.expires_at_ms == at => {
                    return Some(at)
                }
                _ => {
                    self.expiries.pop();
                }
            }
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
        self.reservations.get(&id).map(|r| self.view_of(id, r))
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
        for (index, request) in requests.iter().enumerate() {
            let outcome = self.decide(index as u32, request, &mut out);
            out.outcomes.push(outcome);
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
            let Some(r) = self.reservations.get(&id) else {
                continue;
            };
            if r.status != ReservationStatus::Held || r.expires_at_ms != at {
                continue;
            }
            self.release_hold(id, ReservationStatus::Expired);
            out.transitions.push(Transition {
                reservation_id: id,
                status: ReservationStatus::Expired,
                at_ms: now,
            });
        }
    }

    fn decide(&mut self, index: u32, request: &Request, out: &mut BatchOutput) -> Outcome {
        let now = self.clock_ms;
        match &request.command {
            Command::Reserve {
                sku,
                user_id,
                quantity,
                idempotency_key,
            } => self.reserve(
                index,
                request.request_id,
                sku,
                user_id,
                *quantity,
                idempotency_key,
                out,
            ),
            Command::Confirm { reservation_id } => {
                self.settle(*reservation_id, ReservationStatus::Confirmed, now, out)
            }
            Command::Cancel { reservation_id } => {
                self.settle(*reservation_id, ReservationStatus::Cancelled, now, out)
            }
            Command::UpsertSku { sku, config } => self.upsert_sku(sku, config),
            Command::Restock { sku, quantity } => self.restock(sku, *quantity),
            Command::Pause { sku } => self.set_paused(sku, true),
            Command::Resume { sku } => self.set_paused(sku, false),
            Command::PauseAll => {
                let mut paused = 0;
                for sku in &mut self.skus {
                    if !sku.paused {
                        sku.paused = true;
                        sku.dirty_in_batch = self.batch_seq;
                        paused += 1;
                    }
                }
                Outcome::Frozen {
                    skus_paused: paused,
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn reserve(
        &mut self,
        index: u32,
        request_id: RequestId,
        sku_name: &str,
        user_id: &str,
        quantity: u32,
        key: &str,
        out: &mut BatchOutput,
    ) -> Outcome {
        let user = self.user_idx(user_id);
        if let Some(record) = self.users[user as usize].keys.get(key) {
            // A repeat: same request gets the first outcome and changes nothing; a different
            // request under the same key is refused and not recorded.
            if &*record.sku != sku_name || record.quantity != quantity {
                return Outcome::Rejected(Reject::IdempotencyKeyReused);
            }
            return match record.decision {
                Ok(reservation_id) => {
                    let r = &self.reservations[&reservation_id];
                    Outcome::Held {
                        reservation_id,
                        expires_at_ms: r.expires_at_ms,
                    }
                }
                Err(reason) => Outcome::Rejected(reason),
            };
        }
        let decision = self.grant_or_refuse(request_id, sku_name, user, quantity);
        if let Err(reason @ (Reject::UnknownSku | Reject::InvalidCommand)) = decision {
            // Answers about the input, not decisions about stock: nothing is recorded and the
            // key stays free, so a corrected retry (or one after the SKU exists) is decided anew.
            return Outcome::Rejected(reason);
        }
        if decision.is_err() {
            self.refused_ids.insert(request_id);
        }
        let result = decision.map(|_| self.reservations[&request_id].expires_at_ms);
        self.users[user as usize].keys.insert(
            key.into(),
            IdempotencyRecord {
                sku: sku_name.into(),
                quantity,
                decision,
            },
        );
        out.decisions.push(Decision {
            command_index: index,
            request_id,
            result,
        });
        match result {
            Ok(expires_at_ms) => Outcome::Held {
                reservation_id: request_id,
                expires_at_ms,
            },
            Err(reason) => Outcome::Rejected(reason),
        }
    }

    /// The rules of a new reservation, in the order a buyer would want them explained.
    fn grant_or_refuse(
        &mut self,
        request_id: RequestId,
        sku_name: &str,
        user: UserIdx,
        quantity: u32,
    ) -> Result<RequestId, Reject> {
        let now = self.clock_ms;
        let &sku_idx = self.sku_index.get(sku_name).ok_or(Reject::UnknownSku)?;
        let sku = &self.skus[sku_idx as usize];
        if quantity == 0 || quantity > QUANTITY_MAX || self.has_decision(request_id) {
            return Err(Reject::InvalidCommand);
        }
        if sku.paused {
            return Err(Reject::SalePaused);
        }
        if sku.config.starts_at_ms.is_some_and(|t| now < t) {
            return Err(Reject::SaleNotStarted);
        }
        if sku.config.ends_at_ms.is_some_and(|t| now >= t) {
            return Err(Reject::SaleEnded);
        }
        let holding = self.users[user as usize]
            .holdings
            .get(&sku_idx)
            .copied()
            .unwrap_or(0);
        if holding + u64::from(quantity) > u64::from(sku.config.per_user_limit) {
            return Err(Reject::LimitExceeded);
        }
        if sku.available < u64::from(quantity) {
            return Err(Reject::SoldOut);
        }
        let expires_at_ms = now.saturating_add(sku.config.hold_ttl_ms as i64);
        let sku = &mut self.skus[sku_idx as usize];
        sku.available -= u64::from(quantity);
        sku.held += u64::from(quantity);
        sku.dirty_in_batch = self.batch_seq;
        let limit = u64::from(sku.config.per_user_limit);
        let holding = self.users[user as usize]
            .holdings
            .entry(sku_idx)
            .or_insert(0);
        *holding += u64::from(quantity);
        assert!(*holding <= limit, "per-user limit broken by a grant");
        self.reservations.insert(
            request_id,
            Reservation {
                sku: sku_idx,
                user,
                quantity,
                status: ReservationStatus::Held,
                expires_at_ms,
            },
        );
        self.expiries.push(Reverse((expires_at_ms, request_id)));
        Ok(request_id)
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
        let Some(r) = self.reservations.get(&id) else {
            return Outcome::Rejected(Reject::UnknownReservation);
        };
        let changed = match (r.status, to) {
            (ReservationStatus::Held, ReservationStatus::Confirmed) => {
                let (sku, quantity) = (r.sku as usize, u64::from(r.quantity));
                let sku = &mut self.skus[sku];
                sku.held -= quantity;
                sku.sold += quantity;
                sku.dirty_in_batch = self.batch_seq;
                self.reservations.get_mut(&id).expect("present").status = to;
                true
            }
            (ReservationStatus::Held, _) => {
                self.release_hold(id, to);
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
        Outcome::Reservation(self.view_of(id, &self.reservations[&id]))
    }

    /// Held -> cancelled or expired: the units go back on sale and stop counting to the limit.
    fn release_hold(&mut self, id: RequestId, to: ReservationStatus) {
        let r = self
            .reservations
            .get_mut(&id)
            .expect("release of unknown hold");
        assert_eq!(
            r.status,
            ReservationStatus::Held,
            "release of a non-held reservation"
        );
        r.status = to;
        let (sku_idx, user, quantity) = (r.sku, r.user, u64::from(r.quantity));
        let sku = &mut self.skus[sku_idx as usize];
        sku.held -= quantity;
        sku.available += quantity;
        sku.dirty_in_batch = self.batch_seq;
        let holdings = &mut self.users[user as usize].holdings;
        let holding = holdings.get_mut(&sku_idx).expect("hold without holding");
        *holding -= quantity;
    }

    fn upsert_sku(&mut self, name: &str, config: &SkuConfig) -> Outcome {
        if !config_is_valid(config) {
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        let batch_seq = self.batch_seq;
        let sku = match self.sku_index.get(name) {
            Some(&i) => {
                let sku = &mut self.skus[i as usize];
                let committed = sku.held + sku.sold;
                if config.total_stock < committed {
                    return Outcome::Rejected(Reject::StockBelowCommitted);
                }
                sku.available = config.total_stock - committed;
                sku.config = config.clone();
                sku
            }
            None => {
                let idx = SkuIdx::try_from(self.skus.len()).expect("fewer than 2^32 skus");
                self.sku_index.insert(name.to_owned(), idx);
                self.skus.push(Sku {
                    name: name.to_owned(),
                    config: config.clone(),
                    available: config.total_stock,
                    held: 0,
                    sold: 0,
                    paused: false,
                    dirty_in_batch: 0,
                });
                self.skus.last_mut().expect("just pushed")
            }
        };
        sku.dirty_in_batch = batch_seq;
        Outcome::Sku(sku.view())
    }

    fn restock(&mut self, name: &str, quantity: u64) -> Outcome {
        let Some(&i) = self.sku_index.get(name) else {
            return Outcome::Rejected(Reject::UnknownSku);
        };
        if quantity == 0 {
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        let sku = &mut self.skus[i as usize];
        match sku.total().checked_add(quantity) {
            Some(total) if total <= STOCK_MAX => {
                sku.config.total_stock = total;
                sku.available += quantity;
                sku.dirty_in_batch = self.batch_seq;
                Outcome::Sku(sku.view())
            }
            _ => Outcome::Rejected(Reject::StockOverflow),
        }
    }

    fn set_paused(&mut self, name: &str, paused: bool) -> Outcome {
        let Some(&i) = self.sku_index.get(name) else {
            return Outcome::Rejected(Reject::UnknownSku);
        };
        let sku = &mut self.skus[i as usize];
        sku.paused = paused;
        sku.dirty_in_batch = self.batch_seq;
        Outcome::Sku(sku.view())
    }

    fn has_decision(&self, request_id: RequestId) -> bool {
        self.reservations.contains_key(&request_id) || self.refused_ids.contains(&request_id)
    }

    fn user_idx(&mut self, name: &str) -> UserIdx {
        if let Some(&i) = self.user_index.get(name) {
            return i;
        }
        let i = UserIdx::try_from(self.users.len()).expect("fewer than 2^32 users");
        self.user_index.insert(name.to_owned(), i);
        self.users.push(User {
            name: name.to_owned(),
            ..User::default()
        });
        i
    }

    fn view_of(&self, id: RequestId, r: &Reservation) -> ReservationView {
        ReservationView {
            reservation_id: id,
            sku: self.skus[r.sku as usize].name.clone(),
            user_id: self.users[r.user as usize].name.clone(),
            quantity: r.quantity,
            status: r.status,
            expires_at_ms: r.expires_at_ms,
        }
    }

    /// Rebuilds the engine from what Postgres holds, and refuses a snapshot whose counters do
    /// not match its reservation rows: the invariants are checked again after reading back.
    pub fn restore(snapshot: Snapshot) -> Result<Engine, RestoreError> {
        let mut engine = Engine {
            batch_seq: snapshot.batch_seq,
            clock_ms: snapshot.clock_ms,
            ..Engine::default()
        };
        for view in snapshot.skus {
            let idx = engine.skus.len() as SkuIdx;
            engine.sku_index.insert(view.sku.clone(), idx);
            let sku = Sku {
                name: view.sku,
                config: view.config,
                available: view.available,
                held: view.held,
                sold: view.sold,
                paused: view.paused,
                dirty_in_batch: 0,
            };
            if sku
                .available
                .checked_add(sku.held)
                .and_then(|s| s.checked_add(sku.sold))
                != Some(sku.total())
            {
                return Err(RestoreError::StockInvariant { sku: sku.name });
            }
            engine.skus.push(sku);
        }
        let mut rows_held = vec![0u64; engine.skus.len()];
        let mut rows_sold = vec![0u64; engine.skus.len()];
        for d in snapshot.decisions {
            if engine.has_decision(d.request_id) {
                return Err(RestoreError::DuplicateRequestId {
                    request_id: d.request_id,
                });
            }
            let user = engine.user_idx(&d.user_id);
            let decision = match d.status {
                Ok(status) => {
                    let &sku =
                        engine
                            .sku_index
                            .get(&d.sku)
                            .ok_or_else(|| RestoreError::UnknownSku {
                                request_id: d.request_id,
                                sku: d.sku.clone(),
                            })?;
                    let quantity = u64::from(d.quantity);
                    match status {
                        ReservationStatus::Held => {
                            rows_held[sku as usize] += quantity;
                            engine
                                .expiries
                                .push(Reverse((d.expires_at_ms, d.request_id)));
                        }
                        ReservationStatus::Confirmed => rows_sold[sku as usize] += quantity,
                        ReservationStatus::Cancelled | ReservationStatus::Expired => {}
                    }
                    if matches!(
                        status,
                        ReservationStatus::Held | ReservationStatus::Confirmed
                    ) {
                        *engine.users[user as usize].holdings.entry(sku).or_insert(0) += quantity;
                    }
                    engine.reservations.insert(
                        d.request_id,
                        Reservation {
                            sku,
                            user,
                            quantity: d.quantity,
                            status,
                            expires_at_ms: d.expires_at_ms,
                        },
                    );
                    Ok(d.request_id)
                }
                Err(reason) => {
                    engine.refused_ids.insert(d.request_id);
                    Err(reason)
                }
            };
            let record = IdempotencyRecord {
                sku: d.sku.into(),
                quantity: d.quantity,
                decision,
            };
            let keys = &mut engine.users[user as usize].keys;
            if keys
                .insert(d.idempotency_key.clone().into(), record)
                .is_some()
            {
                return Err(RestoreError::DuplicateKey {
                    user_id: d.user_id,
                    key: d.idempotency_key,
                });
            }
        }
        for (i, sku) in engine.skus.iter().enumerate() {
            if sku.held != rows_held[i] || sku.sold != rows_sold[i] {
                return Err(RestoreError::CountersDisagree {
                    sku: sku.name.clone(),
                    held_counter: sku.held,
                    sold_counter: sku.sold,
                    held_rows: rows_held[i],
                    sold_rows: rows_sold[i],
                });
            }
        }
        Ok(engine)
    }

    /// Every invariant, checked from scratch (O(state)): used by tests after every batch and
    /// by the runtime after a restore. Panics with a description of the first violation.
    pub fn check_invariants(&self) {
        let mut held = vec![0u64; self.skus.len()];
        let mut sold = vec![0u64; self.skus.len()];
        let mut holdings: FxHashMap<(UserIdx, SkuIdx), u64> = FxHashMap::default();
        for r in self.reservations.values() {
            let q = u64::from(r.quantity);
            match r.status {
                ReservationStatus::Held => held[r.sku as usize] += q,
                ReservationStatus::Confirmed => sold[r.sku as usize] += q,
                _ => continue,
            }
            *holdings.entry((r.user, r.sku)).or_insert(0) += q;
        }
        for (i, sku) in self.skus.iter().enumerate() {
            sku.check_stock_invariant();
            assert_eq!(
                sku.held, held[i],
                "sku {}: held counter != held reservations",
                sku.name
            );
            assert_eq!(
                sku.sold, sold[i],
                "sku {}: sold counter != confirmed reservations",
                sku.name
            );
        }
        for (u, user) in self.users.iter().enumerate() {
            for (&sku, &units) in &user.holdings {
                let expected = holdings.get(&(u as UserIdx, sku)).copied().unwrap_or(0);
                assert_eq!(
                    units, expected,
                    "user {} holdings on sku {} drifted",
                    user.name, sku
                );
            }
        }
        for ((u, sku), units) in holdings {
            let recorded = self.users[u as usize].holdings.get(&sku).copied();
            assert_eq!(
                recorded,
                Some(units),
                "holding missing for user {}",
                self.users[u as usize].name
            );
        }
    }
}

pub fn config_is_valid(config: &SkuConfig) -> bool {
    config.total_stock <= STOCK_MAX
        && (1..=QUANTITY_MAX).contains(&config.per_user_limit)
        && (1..=HOLD_TTL_MS_MAX).contains(&config.hold_ttl_ms)
        && match (config.starts_at_ms, config.ends_at_ms) {
            (Some(s), Some(e)) => s < e,
            _ => true,
        }
}
