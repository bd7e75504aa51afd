//! A deliberately naive reference model of the allocation rules, for the property tests.
//!
//! Nothing here is clever, so that it is easy to check by reading:
//! - state is three plain `Vec`s (SKUs, reservation rows, idempotency records) scanned linearly;
//! - the stock counters are never stored: `held`, `sold` and `available` are recomputed from the
//!   reservation rows every time they are asked for, so they cannot drift the way the engine's
//!   incrementally maintained counters could;
//! - a user's holding on a SKU is likewise a sum over the rows.
//!
//! It shares nothing with the engine but its output types and limits. The property tests feed
//! both the same batches and require identical [`BatchOutput`]s after every batch.

use wire::{
    Command, Outcome, Reject, Request, RequestId, ReservationStatus, ReservationView, SkuConfig,
    SkuView,
};

mod admin;

use crate::{BatchOutput, Decision, QueuedAt, QueuedRequest, Released, Transition, QUANTITY_MAX};

#[derive(Debug, Clone)]
struct ModelSku {
    name: String,
    config: SkuConfig,
    paused: bool,
    /// The pre-sale queue, in order.
    queue: Vec<ModelQueued>,
}

#[derive(Debug, Clone)]
struct ModelQueued {
    id: RequestId,
    user: String,
    key: String,
    quantity: u32,
}

/// What a new reservation gets.
enum Fate {
    Granted(RequestId),
    Refused(Reject),
    /// It joins its SKU's pre-sale queue.
    Queued,
}

#[derive(Debug, Clone)]
struct ModelReservation {
    id: RequestId,
    sku: String,
    user: String,
    quantity: u32,
    status: ReservationStatus,
    expires_at_ms: i64,
}

/// What the first reserve under a `(user, key)` asked for and got.
#[derive(Debug, Clone)]
struct KeyRecord {
    user: String,
    key: String,
    sku: String,
    quantity: u32,
    decision: Result<RequestId, Reject>,
}

#[derive(Debug, Clone, Default)]
pub struct Model {
    clock_ms: i64,
    batch_seq: u64,
    /// In creation order.
    skus: Vec<ModelSku>,
    /// Every granted reservation, whatever its status now.
    reservations: Vec<ModelReservation>,
    keys: Vec<KeyRecord>,
    /// Request id of every decision row written so far (grants and recorded refusals).
    decision_rows: Vec<RequestId>,
    /// Names of the SKUs the current batch changed (reset at the start of every batch).
    touched: Vec<String>,
    /// Keyed admin commands applied: (key, encoded command, first outcome).
    admin_keys: Vec<(String, Vec<u8>, Outcome)>,
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clock_ms(&self) -> i64 {
        self.clock_ms
    }

    pub fn batch_seq(&self) -> u64 {
        self.batch_seq
    }

    pub fn apply_batch(&mut self, now_ms: i64, requests: &[Request]) -> BatchOutput {
        self.batch_seq += 1;
        if now_ms > self.clock_ms {
            self.clock_ms = now_ms;
        }
        self.touched.clear();
        let mut out = BatchOutput {
            batch_seq: self.batch_seq,
            batch_time_ms: self.clock_ms,
            ..BatchOutput::default()
        };

        // 1. Expiry: every hold due at or before the batch time, earliest first (ties by id).
        let mut due: Vec<(i64, RequestId)> = self
            .reservations
            .iter()
            .filter(|r| r.status == ReservationStatus::Held && r.expires_at_ms <= self.clock_ms)
            .map(|r| (r.expires_at_ms, r.id))
            .collect();
        due.sort();
        for (_, id) in due {
            let sku = {
                let r = self.reservation_mut(id).expect("due hold exists");
                r.status = ReservationStatus::Expired;
                r.sku.clone()
            };
            self.touch(&sku);
            out.transitions.push(Transition {
                reservation_id: id,
                status: ReservationStatus::Expired,
                at_ms: self.clock_ms,
            });
        }

        // 2. The pre-sale queues whose sale has started (SKU not paused), in creation order,
        //    each in queue order, decided like any reservation.
        for i in 0..self.skus.len() {
            let sku = &self.skus[i];
            let started = sku.config.starts_at_ms.is_none_or(|t| self.clock_ms >= t);
            if sku.paused || !started {
                continue;
            }
            let name = sku.name.clone();
            for q in std::mem::take(&mut self.skus[i].queue) {
                self.reserve(None, q.id, &name, &q.user, q.quantity, &q.key, &mut out);
            }
        }

        // 3. One outcome per command, in order.
        for (index, request) in requests.iter().enumerate() {
            let outcome = self.decide(index as u32, request, &mut out);
            out.outcomes.push(outcome);
        }

        // 4. The SKUs this batch changed, in creation order.
        out.skus = self
            .skus
            .iter()
            .filter(|s| self.touched.contains(&s.name))
            .map(|s| self.view(s))
            .collect();
        out
    }

    fn decide(&mut self, index: u32, request: &Request, out: &mut BatchOutput) -> Outcome {
        match &request.command {
            Command::Reserve {
                sku,
                user_id,
                quantity,
                idempotency_key,
            } => self.reserve(
                Some(index),
                request.request_id,
                sku,
                user_id,
                *quantity,
                idempotency_key,
                out,
            ),
            Command::Confirm { reservation_id } => {
                self.settle(*reservation_id, ReservationStatus::Confirmed, out)
            }
            Command::Cancel { reservation_id } => {
                self.settle(*reservation_id, ReservationStatus::Cancelled, out)
            }
            Command::Admin {
                idempotency_key,
                command,
            } => self.keyed_admin(index, request, idempotency_key, command, out),
            Command::UpsertSku { sku, config } => self.upsert(sku, config),
            Command::Restock { sku, quantity } => self.restock(sku, *quantity),
            Command::Pause { sku } => self.set_paused(sku, true),
            Command::Resume { sku } => self.set_paused(sku, false),
            Command::PauseAll => self.pause_all(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn reserve(
        &mut self,
        index: Option<u32>,
        request_id: RequestId,
        sku: &str,
        user: &str,
        quantity: u32,
        key: &str,
        out: &mut BatchOutput,
    ) -> Outcome {
        if let Some(record) = self.keys.iter().find(|k| k.user == user && k.key == key) {
            if record.sku != sku || record.quantity != quantity {
                // Not recorded: the key keeps meaning its first request.
                return Outcome::Rejected(Reject::IdempotencyKeyReused);
            }
            return match record.decision {
                Ok(id) => Outcome::Held {
                    reservation_id: id,
                    expires_at_ms: self.reservation_row(id).expect("granted").expires_at_ms,
                },
                Err(reason) => Outcome::Rejected(reason),
            };
        }
        for s in &self.skus {
            if let Some(position) = s.queue.iter().position(|q| q.user == user && q.key == key) {
                let q = &s.queue[position];
                if s.name != sku || q.quantity != quantity {
                    return Outcome::Rejected(Reject::IdempotencyKeyReused);
                }
                return self.queued(&s.name, q.id, position);
            }
        }

        let decision = match self.new_reservation(request_id, sku, user, quantity) {
            Fate::Granted(id) => Ok(id),
            Fate::Refused(reason @ (Reject::UnknownSku | Reject::InvalidCommand)) => {
                // An answer about the input, not a decision about stock: nothing is recorded,
                // no row is written, and the key stays free for a corrected retry.
                return Outcome::Rejected(reason);
            }
            Fate::Refused(reason) => Err(reason),
            Fate::Queued => {
                let s = self.sku_mut(sku).expect("known sku");
                s.queue.push(ModelQueued {
                    id: request_id,
                    user: user.to_owned(),
                    key: key.to_owned(),
                    quantity,
                });
                let position = s.queue.len() - 1;
                out.queued.push(QueuedAt {
                    command_index: index.expect("queued from a command"),
                    request_id,
                    position: position as u32,
                });
                return self.queued(sku, request_id, position);
            }
        };
        self.keys.push(KeyRecord {
            user: user.to_owned(),
            key: key.to_owned(),
            sku: sku.to_owned(),
            quantity,
            decision,
        });
        let result = match decision {
            Ok(id) => Ok(self
                .reservation_row(id)
                .expect("just granted")
                .expires_at_ms),
            Err(reason) => Err(reason),
        };
        self.decision_rows.push(request_id);
        match index {
            Some(index) => out.decisions.push(Decision {
                command_index: index,
                request_id,
                result,
            }),
            None => out.released.push(Released { request_id, result }),
        }
        match result {
            Ok(expires_at_ms) => Outcome::Held {
                reservation_id: request_id,
                expires_at_ms,
            },
            Err(reason) => Outcome::Rejected(reason),
        }
    }

    /// The answer to a queued request (and to its retries).
    fn queued(&self, sku: &str, id: RequestId, position: usize) -> Outcome {
        let starts_at = self.sku_row(sku).expect("known sku").config.starts_at_ms;
        Outcome::Queued {
            reservation_id: id,
            position: position as u32,
            starts_at_ms: starts_at.unwrap_or(self.clock_ms),
        }
    }

    fn new_reservation(
        &mut self,
        request_id: RequestId,
        sku_name: &str,
        user: &str,
        quantity: u32,
    ) -> Fate {
        match self.check_new_reservation(request_id, sku_name, user, quantity) {
            Ok(true) => Fate::Queued,
            Ok(false) => {
                let now = self.clock_ms;
                let ttl = self.sku_row(sku_name).expect("known").config.hold_ttl_ms as i64;
                self.reservations.push(ModelReservation {
                    id: request_id,
                    sku: sku_name.to_owned(),
                    user: user.to_owned(),
                    quantity,
                    status: ReservationStatus::Held,
                    expires_at_ms: now + ttl,
                });
                self.touch(sku_name);
                Fate::Granted(request_id)
            }
            Err(reason) => Fate::Refused(reason),
        }
    }

    /// The rules of a new reservation: `Ok(true)` if it joins the queue, `Ok(false)` if granted.
    fn check_new_reservation(
        &self,
        request_id: RequestId,
        sku_name: &str,
        user: &str,
        quantity: u32,
    ) -> Result<bool, Reject> {
        let now = self.clock_ms;
        let Some(sku) = self.sku_row(sku_name) else {
            return Err(Reject::UnknownSku);
        };
        // "Duplicate request id" means: the id already names a decision row, granted or not,
        // or a queued request.
        let id_taken = self.decision_rows.contains(&request_id)
            || self
                .skus
                .iter()
                .any(|s| s.queue.iter().any(|q| q.id == request_id));
        if quantity == 0 || quantity > QUANTITY_MAX || id_taken {
            return Err(Reject::InvalidCommand);
        }
        if sku.paused {
            return Err(Reject::SalePaused);
        }
        let limit = u64::from(sku.config.per_user_limit);
        if let Some(starts_at) = sku.config.starts_at_ms {
            let queue_open = sku
                .config
                .queue
                .as_ref()
                .is_some_and(|q| q.opens_at_ms <= now);
            if now < starts_at && queue_open {
                let max = sku.config.queue.as_ref().expect("open").max as usize;
                if sku.queue.len() >= max {
                    return Err(Reject::QueueFull);
                }
                let queued: u64 = sku
                    .queue
                    .iter()
                    .filter(|q| q.user == user)
                    .map(|q| u64::from(q.quantity))
                    .sum();
                if self.holding(user, sku_name) + queued + u64::from(quantity) > limit {
                    return Err(Reject::LimitExceeded);
                }
                return Ok(true);
            }
            if now < starts_at {
                return Err(Reject::SaleNotStarted);
            }
        }
        if let Some(ends_at) = sku.config.ends_at_ms {
            if now >= ends_at {
                return Err(Reject::SaleEnded);
            }
        }
        if self.holding(user, sku_name) + u64::from(quantity) > limit {
            return Err(Reject::LimitExceeded);
        }
        if self.available(sku_name) < u64::from(quantity) {
            return Err(Reject::SoldOut);
        }
        Ok(false)
    }

    fn settle(&mut self, id: RequestId, to: ReservationStatus, out: &mut BatchOutput) -> Outcome {
        let now = self.clock_ms;
        let Some(current) = self.reservation_row(id).map(|r| r.status) else {
            return Outcome::Rejected(Reject::UnknownReservation);
        };
        if current == ReservationStatus::Held {
            let sku = {
                let r = self.reservation_mut(id).expect("present");
                r.status = to;
                r.sku.clone()
            };
            self.touch(&sku);
            out.transitions.push(Transition {
                reservation_id: id,
                status: to,
                at_ms: now,
            });
        } else if current != to {
            return Outcome::Rejected(match current {
                ReservationStatus::Expired => Reject::ReservationExpired,
                ReservationStatus::Cancelled => Reject::ReservationCancelled,
                ReservationStatus::Confirmed => Reject::ReservationConfirmed,
                ReservationStatus::Held => unreachable!("handled above"),
            });
        }
        // Held -> `to` just happened, or `to` had already happened: answer with the row.
        Outcome::Reservation(self.reservation(id).expect("present"))
    }

    // ---- queries -------------------------------------------------------------------------------

    /// Every SKU in creation order, counters recomputed from the rows.
    pub fn sku_views(&self) -> Vec<SkuView> {
        self.skus.iter().map(|s| self.view(s)).collect()
    }

    pub fn sku_view(&self, name: &str) -> Option<SkuView> {
        self.sku_row(name).map(|s| self.view(s))
    }

    pub fn reservation(&self, id: RequestId) -> Option<ReservationView> {
        self.reservation_row(id).map(|r| ReservationView {
            reservation_id: r.id,
            sku: r.sku.clone(),
            user_id: r.user.clone(),
            quantity: r.quantity,
            status: r.status,
            expires_at_ms: r.expires_at_ms,
        })
    }

    /// Every queued request, SKUs in creation order, each queue in order.
    pub fn queued_requests(&self) -> Vec<QueuedRequest> {
        self.skus
            .iter()
            .flat_map(|s| {
                s.queue.iter().map(|q| QueuedRequest {
                    request_id: q.id,
                    sku: s.name.clone(),
                    user_id: q.user.clone(),
                    idempotency_key: q.key.clone(),
                    quantity: q.quantity,
                })
            })
            .collect()
    }

    /// The earliest start among the unpaused SKUs with a queue (the clock if one has none).
    pub fn next_release_ms(&self) -> Option<i64> {
        self.skus
            .iter()
            .filter(|s| !s.queue.is_empty() && !s.paused)
            .map(|s| s.config.starts_at_ms.unwrap_or(self.clock_ms))
            .min()
    }

    /// Earliest expiry among the current holds.
    pub fn next_expiry_ms(&self) -> Option<i64> {
        self.reservations
            .iter()
            .filter(|r| r.status == ReservationStatus::Held)
            .map(|r| r.expires_at_ms)
            .min()
    }

    fn view(&self, sku: &ModelSku) -> SkuView {
        let held = self.units(&sku.name, ReservationStatus::Held);
        let sold = self.units(&sku.name, ReservationStatus::Confirmed);
        SkuView {
            sku: sku.name.clone(),
            total: sku.config.total_stock,
            available: self.available(&sku.name),
            held,
            sold,
            config: sku.config.clone(),
            paused: sku.paused,
        }
    }

    /// Units of `sku` in reservations with `status`.
    fn units(&self, sku: &str, status: ReservationStatus) -> u64 {
        self.reservations
            .iter()
            .filter(|r| r.sku == sku && r.status == status)
            .map(|r| u64::from(r.quantity))
            .sum()
    }

    /// Total minus held minus sold; panics (a model-level oversell) if that is negative.
    fn available(&self, sku: &str) -> u64 {
        let total = self.sku_row(sku).expect("known sku").config.total_stock;
        let committed = self.units(sku, ReservationStatus::Held)
            + self.units(sku, ReservationStatus::Confirmed);
        total
            .checked_sub(committed)
            .unwrap_or_else(|| panic!("model oversold sku {sku}: total {total} < {committed}"))
    }

    /// Units `user` holds or bought on `sku`: what the per-user limit applies to.
    fn holding(&self, user: &str, sku: &str) -> u64 {
        self.reservations
            .iter()
            .filter(|r| r.user == user && r.sku == sku)
            .filter(|r| {
                matches!(
                    r.status,
                    ReservationStatus::Held | ReservationStatus::Confirmed
                )
            })
            .map(|r| u64::from(r.quantity))
            .sum()
    }

    fn sku_row(&self, name: &str) -> Option<&ModelSku> {
        self.skus.iter().find(|s| s.name == name)
    }

    fn sku_mut(&mut self, name: &str) -> Option<&mut ModelSku> {
        self.skus.iter_mut().find(|s| s.name == name)
    }

    fn reservation_row(&self, id: RequestId) -> Option<&ModelReservation> {
        self.reservations.iter().find(|r| r.id == id)
    }

    fn reservation_mut(&mut self, id: RequestId) -> Option<&mut ModelReservation> {
        self.reservations.iter_mut().find(|r| r.id == id)
    }

    fn touch(&mut self, sku: &str) {
        if !self.touched.iter().any(|s| s == sku) {
            self.touched.push(sku.to_owned());
        }
    }
}
