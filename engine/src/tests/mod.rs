//! Tests of the allocation engine.
//!
//! - Unit tests, one per rule, named after the behaviour they pin down.
//! - Property tests over random command streams cut into random batches: after every batch the
//!   engine must agree with the naive reference model in [`super::model`], pass its own
//!   invariant check, and keep `available + held + sold == total`; the same stream must give the
//!   same outputs twice; and an engine restored from its visible state must behave exactly like
//!   the original from then on.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::Index;
use wire::limits::QUEUE_MAX;
use wire::{
    Command, Outcome, QueueWindow, Reject, Request, RequestId, ReservationStatus, ReservationView,
    SkuConfig, SkuView,
};

use crate::model::Model;
use crate::{
    AdminKeyRecord, BatchOutput, Decision, Engine, QueuedRequest, Released, RestoreError, Snapshot,
    StoredDecision, Transition, HOLD_TTL_MS_MAX, QUANTITY_MAX, STOCK_MAX,
};

mod admin;
mod batches;
mod checkpoint;
mod hashing;
mod invariants;
mod layout;
mod properties;
mod queue;
mod reserve;
mod restore;
mod script;
mod settle;

use script::*;

/// A realistic batch time to start from (sale windows are absolute Unix milliseconds).
const T0: i64 = 1_700_000_000_000;

// ---- helpers ----------------------------------------------------------------------------------

/// Builds requests with the ids 1, 2, 3, ... in the order they are built.
#[derive(Debug, Clone)]
struct Reqs {
    next_id: RequestId,
}

impl Reqs {
    fn new() -> Self {
        Self { next_id: 1 }
    }

    fn with(&mut self, command: Command) -> Request {
        let request_id = self.next_id;
        self.next_id += 1;
        Request {
            request_id,
            ingress_id: 7,
            command,
        }
    }

    fn reserve(&mut self, sku: &str, user: &str, quantity: u32, key: &str) -> Request {
        self.with(Command::Reserve {
            sku: sku.into(),
            user_id: user.into(),
            quantity,
            idempotency_key: key.into(),
        })
    }

    /// A reserve under the request id `id` (one another command may have taken).
    fn reserve_as(
        &mut self,
        id: RequestId,
        sku: &str,
        user: &str,
        quantity: u32,
        key: &str,
    ) -> Request {
        Request {
            request_id: id,
            ..self.reserve(sku, user, quantity, key)
        }
    }

    fn confirm(&mut self, reservation_id: RequestId) -> Request {
        self.with(Command::Confirm { reservation_id })
    }

    fn cancel(&mut self, reservation_id: RequestId) -> Request {
        self.with(Command::Cancel { reservation_id })
    }

    fn upsert(&mut self, sku: &str, config: SkuConfig) -> Request {
        self.with(Command::UpsertSku {
            sku: sku.into(),
            config,
        })
    }

    fn restock(&mut self, sku: &str, quantity: u64) -> Request {
        self.with(Command::Restock {
            sku: sku.into(),
            quantity,
        })
    }

    fn pause(&mut self, sku: &str) -> Request {
        self.with(Command::Pause { sku: sku.into() })
    }

    fn resume(&mut self, sku: &str) -> Request {
        self.with(Command::Resume { sku: sku.into() })
    }

    fn pause_all(&mut self) -> Request {
        self.with(Command::PauseAll)
    }

    /// `admin` (a request built by one of the admin helpers) under an idempotency key.
    fn keyed(&mut self, key: &str, admin: Request) -> Request {
        self.with(Command::Admin {
            idempotency_key: key.into(),
            command: Box::new(admin.command),
        })
    }

    /// A restock of `quantity` units of `sku` under the admin idempotency key `key`.
    fn keyed_restock(&mut self, key: &str, sku: &str, quantity: u64) -> Request {
        let restock = self.restock(sku, quantity);
        self.keyed(key, restock)
    }
}

fn config(total_stock: u64, per_user_limit: u32, hold_ttl_ms: u64) -> SkuConfig {
    SkuConfig {
        total_stock,
        per_user_limit,
        hold_ttl_ms,
        starts_at_ms: None,
        ends_at_ms: None,
        queue: None,
    }
}

/// `cfg` with its sale starting at `at_ms`.
fn starting_at(at_ms: i64, cfg: SkuConfig) -> SkuConfig {
    SkuConfig {
        starts_at_ms: Some(at_ms),
        ..cfg
    }
}

/// `cfg` with its sale ending at `at_ms`.
fn ending_at(at_ms: i64, cfg: SkuConfig) -> SkuConfig {
    SkuConfig {
        ends_at_ms: Some(at_ms),
        ..cfg
    }
}

/// An engine and a request builder; every batch is followed by the full invariant check.
struct Sale {
    engine: Engine,
    reqs: Reqs,
}

impl Sale {
    fn new() -> Self {
        Self {
            engine: Engine::new(),
            reqs: Reqs::new(),
        }
    }

    /// A sale with one SKU created at `T0`.
    fn with_sku(name: &str, cfg: SkuConfig) -> Self {
        let mut sale = Self::new();
        sale.add_sku(name, cfg);
        sale
    }

    /// A sale of SKU "tv" in which ann holds `quantity` units under key "k", taken at `T0`: where
    /// most settle and expiry tests start. Returns the hold's id.
    fn ann_holding(cfg: SkuConfig, quantity: u32) -> (Self, RequestId) {
        let mut sale = Self::with_sku("tv", cfg);
        let id = sale.hold(T0, "tv", "ann", quantity, "k");
        (sale, id)
    }

    /// A sale with these SKUs, created at `T0` one after another.
    fn with_skus(skus: &[(&str, SkuConfig)]) -> Self {
        let mut sale = Self::new();
        for (name, cfg) in skus {
            sale.add_sku(name, cfg.clone());
        }
        sale
    }

    /// Creates a further SKU at `T0`.
    fn add_sku(&mut self, name: &str, cfg: SkuConfig) {
        let up = self.reqs.upsert(name, cfg);
        self.sku_answer(T0, up, "the SKU is created");
    }

    /// Applies an admin command and insists it answers with the SKU (`expected` says why).
    fn sku_answer(&mut self, now_ms: i64, request: Request, expected: &str) -> SkuView {
        match self.one(now_ms, request) {
            Outcome::Sku(view) => view,
            other => panic!("{expected}; got {other:?}"),
        }
    }

    fn batch(&mut self, now_ms: i64, requests: Vec<Request>) -> BatchOutput {
        let out = self.engine.apply_batch(now_ms, &requests);
        self.engine.check_invariants();
        assert_eq!(
            out.outcomes.len(),
            requests.len(),
            "one outcome per command"
        );
        for view in self.engine.skus() {
            assert_eq!(view.available + view.held + view.sold, view.total);
        }
        out
    }

    fn one(&mut self, now_ms: i64, request: Request) -> Outcome {
        self.batch(now_ms, vec![request]).outcomes.remove(0)
    }

    fn reserve(&mut self, now_ms: i64, sku: &str, user: &str, quantity: u32, key: &str) -> Outcome {
        let r = self.reqs.reserve(sku, user, quantity, key);
        self.one(now_ms, r)
    }

    /// Reserves and insists on a hold; returns the reservation id.
    fn hold(&mut self, now_ms: i64, sku: &str, user: &str, quantity: u32, key: &str) -> RequestId {
        match self.reserve(now_ms, sku, user, quantity, key) {
            Outcome::Held { reservation_id, .. } => reservation_id,
            other => panic!("expected a hold, got {other:?}"),
        }
    }

    /// Reserves and insists on a refusal; returns its reason.
    fn refusal(&mut self, now_ms: i64, sku: &str, user: &str, quantity: u32, key: &str) -> Reject {
        match self.reserve(now_ms, sku, user, quantity, key) {
            Outcome::Rejected(reason) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Asserts that this reserve is refused for `reason`.
    #[track_caller]
    fn refuses(
        &mut self,
        now_ms: i64,
        sku: &str,
        user: &str,
        quantity: u32,
        key: &str,
        reason: Reject,
    ) {
        assert_eq!(self.refusal(now_ms, sku, user, quantity, key), reason);
    }

    fn confirm(&mut self, now_ms: i64, id: RequestId) -> Outcome {
        let r = self.reqs.confirm(id);
        self.one(now_ms, r)
    }

    fn cancel(&mut self, now_ms: i64, id: RequestId) -> Outcome {
        let r = self.reqs.cancel(id);
        self.one(now_ms, r)
    }

    fn sku(&self, name: &str) -> SkuView {
        self.engine.sku(name).expect("sku exists")
    }

    /// `(available, held, sold)` of a SKU.
    fn counters(&self, name: &str) -> (u64, u64, u64) {
        let v = self.sku(name);
        (v.available, v.held, v.sold)
    }

    fn status(&self, id: RequestId) -> ReservationStatus {
        self.engine
            .reservation(id)
            .expect("reservation exists")
            .status
    }
}

fn rejected(reason: Reject) -> Outcome {
    Outcome::Rejected(reason)
}

fn held(reservation_id: RequestId, expires_at_ms: i64) -> Outcome {
    Outcome::Held {
        reservation_id,
        expires_at_ms,
    }
}
