//! Rebuilding an engine from Postgres's rows, one decision at a time, so that a caller can stream
//! them from the database instead of holding every row in memory first. The slow path of a
//! start-up: taken when no checkpoint exists yet (see `checkpoint.rs` for the fast one).
//!
//! Whatever the rows say is checked as it is read: a request id or an idempotency key twice, a
//! decision about a SKU that does not exist, and at the end counters that disagree with the
//! reservations they count. A database that fails any of these is refused, never served.

use std::cmp::Reverse;

use wire::{Reject, ReservationStatus, ReserveRef, SkuView, StoredDecision};

use crate::output::{RestoreError, Snapshot};
use crate::state::{refusal_text, split_id, Engine, Reservation, Sku, Span};
use crate::SkuIdx;

/// One decision row as read from the database, borrowing its strings from the row.
#[derive(Debug, Clone, Copy)]
pub struct DecisionRef<'a> {
    pub request: ReserveRef<'a>,
    /// The reservation's current status, or why the request was refused.
    pub status: Result<ReservationStatus, Reject>,
    pub expires_at_ms: i64,
}

impl<'a> From<&'a StoredDecision> for DecisionRef<'a> {
    fn from(d: &'a StoredDecision) -> Self {
        DecisionRef {
            request: d.request(),
            status: d.status,
            expires_at_ms: d.expires_at_ms,
        }
    }
}

/// An engine being rebuilt from rows: SKUs first, then every decision in decision order.
pub struct Restorer {
    engine: Engine,
}

impl Restorer {
    /// `hash_seed` is the stored state's (`Snapshot::hash_seed`).
    pub fn new(
        hash_seed: u64,
        batch_seq: u64,
        clock_ms: i64,
        skus: Vec<SkuView>,
    ) -> Result<Restorer, RestoreError> {
        let mut engine = Engine {
            batch_seq,
            clock_ms,
            ..Engine::with_hash_seed(hash_seed)
        };
        engine.set_skus(skus)?;
        Ok(Restorer { engine })
    }

    /// Adds the next decision row.
    pub fn add(&mut self, d: DecisionRef<'_>) -> Result<(), RestoreError> {
        let engine = &mut self.engine;
        let r = d.request;
        let hashes = engine
            .hash_key
            .hashes(r.request_id, r.user_id, r.idempotency_key);
        if engine.find_request(hashes.request, r.request_id).is_some() {
            return Err(RestoreError::DuplicateRequestId {
                request_id: r.request_id,
            });
        }
        // Refusals too: only decisions about a known SKU are ever recorded.
        let Some(&sku) = engine.sku_index.get(r.sku) else {
            return Err(RestoreError::UnknownSku {
                request_id: r.request_id,
                sku: r.sku.to_owned(),
            });
        };
        if engine
            .find_key(hashes.key, r.user_id, r.idempotency_key)
            .is_some()
        {
            return Err(RestoreError::DuplicateKey {
                user_id: r.user_id.to_owned(),
                key: r.idempotency_key.to_owned(),
            });
        }
        let (user, key) = if d.status.is_ok() {
            let user = match engine.find_user(hashes.user, r.user_id) {
                Some(user) => user,
                None => engine.add_user(hashes.user, r.user_id),
            };
            (user, Span::push(&mut engine.keys, r.idempotency_key))
        } else {
            refusal_text(&mut engine.keys, r.user_id, r.idempotency_key)
        };
        let row = Reservation {
            request_id: split_id(r.request_id),
            expires_at_ms: d.expires_at_ms,
            key,
            user,
            sku,
            quantity: r.quantity,
            status: d.status,
        };
        let idx = engine.decisions.len() as u32;
        if let Ok(status) = d.status {
            if status != ReservationStatus::Held {
                engine.settled.push((idx, status));
            }
        }
        engine.record(row, hashes);
        Ok(())
    }

    /// Derives what follows from the rows (holdings, expiries) and checks the counters.
    pub fn finish(mut self) -> Result<Engine, RestoreError> {
        self.engine.derive_from_rows()?;
        self.engine.settled_from_rows = self.engine.settled.len() as u64;
        Ok(self.engine)
    }
}

impl Engine {
    /// Rebuilds the engine from what Postgres holds, and refuses a snapshot whose counters do
    /// not match its reservation rows: the invariants are checked again after reading back.
    pub fn restore(snapshot: Snapshot) -> Result<Engine, RestoreError> {
        let mut restorer = Restorer::new(
            snapshot.hash_seed,
            snapshot.batch_seq,
            snapshot.clock_ms,
            snapshot.skus,
        )?;
        for d in &snapshot.decisions {
            restorer.add(DecisionRef::from(d))?;
        }
        let mut engine = restorer.finish()?;
        engine.restore_admin_keys(snapshot.admin_keys);
        engine.restore_queue(snapshot.queued)?;
        Ok(engine)
    }

    /// Decision row `i` (in decision order) as it stands now, for comparing with the rows.
    pub fn decision(&self, i: usize) -> Option<DecisionRef<'_>> {
        let r = self.decisions.get(i)?;
        Some(DecisionRef {
            request: ReserveRef {
                request_id: r.request_id(),
                user_id: self.row_user_id(r),
                idempotency_key: self.key(r),
                sku: &self.skus[r.sku as usize].name,
                quantity: r.quantity,
            },
            status: r.status,
            expires_at_ms: r.expires_at_ms,
        })
    }

    /// Decision rows recorded.
    pub fn decision_count(&self) -> usize {
        self.decisions.len()
    }

    /// Installs the SKUs of a snapshot or checkpoint, each checked for the stock invariant.
    pub(super) fn set_skus(&mut self, skus: Vec<SkuView>) -> Result<(), RestoreError> {
        for view in skus {
            let idx = SkuIdx::try_from(self.skus.len()).expect("fewer than 2^32 skus");
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
            if self.sku_index.insert(sku.name.clone(), idx).is_some() {
                return Err(RestoreError::DuplicateSku { sku: sku.name });
            }
            self.skus.push(sku);
        }
        Ok(())
    }

    /// After the rows are in: rebuilds the per-user holdings and the expiry queue from them, and
    /// refuses counters that do not add up to the reservations they count. The rows are the
    /// truth a restart trusts; these checks are what makes trusting them safe.
    pub(super) fn derive_from_rows(&mut self) -> Result<(), RestoreError> {
        let mut rows_held = vec![0u64; self.skus.len()];
        let mut rows_sold = vec![0u64; self.skus.len()];
        let mut expiries = Vec::new();
        for i in 0..self.decisions.len() {
            let r = &self.decisions[i];
            let Ok(status) = r.status else { continue };
            let (sku, user, quantity) = (r.sku, r.user, u64::from(r.quantity));
            match status {
                ReservationStatus::Held => {
                    rows_held[sku as usize] += quantity;
                    expiries.push(Reverse((r.expires_at_ms, r.request_id())));
                }
                ReservationStatus::Confirmed => rows_sold[sku as usize] += quantity,
                ReservationStatus::Cancelled | ReservationStatus::Expired => continue,
            }
            *self.holding_mut(user, sku) += quantity;
        }
        // From a vector in one go: O(n), where pushing one by one is O(n log n).
        self.expiries = expiries.into();
        for (i, sku) in self.skus.iter().enumerate() {
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
        Ok(())
    }
}
