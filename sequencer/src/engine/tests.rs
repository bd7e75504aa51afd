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
use wire::{
    Command, Outcome, Reject, Request, RequestId, ReservationStatus, ReservationView, SkuConfig,
    SkuView,
};

use super::model::Model;
use super::{
    BatchOutput, Decision, Engine, RestoreError, Snapshot, StoredDecision, Transition,
    HOLD_TTL_MS_MAX, QUANTITY_MAX, STOCK_MAX,
};

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
}

fn config(total_stock: u64, per_user_limit: u32, hold_ttl_ms: u64) -> SkuConfig {
    SkuConfig {
        total_stock,
        per_user_limit,
        hold_ttl_ms,
        starts_at_ms: None,
        ends_at_ms: None,
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
        let up = sale.reqs.upsert(name, cfg);
        assert!(matches!(sale.one(T0, up), Outcome::Sku(_)));
        sale
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

// ---- reserve ----------------------------------------------------------------------------------

#[test]
fn new_sku_starts_with_all_stock_available_and_unpaused() {
    let sale = Sale::with_sku("tv", config(10, 2, 60_000));
    let view = sale.sku("tv");
    assert_eq!(
        (view.total, view.available, view.held, view.sold),
        (10, 10, 0, 0)
    );
    assert!(!view.paused);
    assert_eq!(view.config, config(10, 2, 60_000));
}

#[test]
fn reserve_holds_units_until_batch_time_plus_ttl() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let r = sale.reqs.reserve("tv", "ann", 3, "k");
    let id = r.request_id;
    let outcome = sale.one(T0 + 7, r);
    assert_eq!(
        outcome,
        Outcome::Held {
            reservation_id: id,
            expires_at_ms: T0 + 7 + 60_000
        }
    );
    assert_eq!(sale.counters("tv"), (7, 3, 0));
    assert_eq!(
        sale.engine.reservation(id),
        Some(ReservationView {
            reservation_id: id,
            sku: "tv".into(),
            user_id: "ann".into(),
            quantity: 3,
            status: ReservationStatus::Held,
            expires_at_ms: T0 + 7 + 60_000,
        })
    );
}

#[test]
fn reserve_beyond_available_is_sold_out() {
    let mut sale = Sale::with_sku("tv", config(3, 5, 60_000));
    sale.hold(T0, "tv", "ann", 2, "k");
    assert_eq!(
        sale.reserve(T0, "tv", "bob", 2, "k"),
        rejected(Reject::SoldOut)
    );
    assert_eq!(sale.counters("tv"), (1, 2, 0), "a refusal changes no stock");
    // Exactly the remaining unit is still sold.
    sale.hold(T0, "tv", "bob", 1, "k2");
    assert_eq!(sale.counters("tv"), (0, 3, 0));
    assert_eq!(
        sale.reserve(T0, "tv", "cat", 1, "k"),
        rejected(Reject::SoldOut)
    );
}

#[test]
fn per_user_limit_counts_held_and_confirmed_units() {
    let mut sale = Sale::with_sku("tv", config(100, 3, 60_000));
    let first = sale.hold(T0, "tv", "ann", 2, "k1");
    assert!(matches!(sale.confirm(T0, first), Outcome::Reservation(_)));
    sale.hold(T0, "tv", "ann", 1, "k2");
    // 2 sold + 1 held + 1 > 3.
    assert_eq!(
        sale.reserve(T0, "tv", "ann", 1, "k3"),
        rejected(Reject::LimitExceeded)
    );
    // A single request above the limit is refused too.
    assert_eq!(
        sale.reserve(T0, "tv", "bob", 4, "k1"),
        rejected(Reject::LimitExceeded)
    );
    // The limit is per user: bob can still take all of his.
    sale.hold(T0, "tv", "bob", 3, "k2");
    assert_eq!(sale.counters("tv"), (94, 4, 2));
}

#[test]
fn per_user_limit_is_per_sku() {
    let mut sale = Sale::with_sku("tv", config(100, 1, 60_000));
    let up = sale.reqs.upsert("radio", config(100, 1, 60_000));
    sale.one(T0, up);
    sale.hold(T0, "tv", "ann", 1, "k1");
    sale.hold(T0, "radio", "ann", 1, "k2");
    assert_eq!(
        sale.reserve(T0, "tv", "ann", 1, "k3"),
        rejected(Reject::LimitExceeded)
    );
}

#[test]
fn cancelled_and_expired_units_stop_counting_to_the_limit() {
    let mut sale = Sale::with_sku("tv", config(100, 2, 1_000));
    let a = sale.hold(T0, "tv", "ann", 2, "k1");
    assert_eq!(
        sale.reserve(T0, "tv", "ann", 1, "k2"),
        rejected(Reject::LimitExceeded)
    );
    sale.cancel(T0, a);
    let b = sale.hold(T0 + 10, "tv", "ann", 2, "k3");
    assert_eq!(
        sale.reserve(T0 + 10, "tv", "ann", 1, "k4"),
        rejected(Reject::LimitExceeded)
    );
    // b expires at T0 + 1010.
    sale.hold(T0 + 1_010, "tv", "ann", 2, "k5");
    assert_eq!(sale.status(b), ReservationStatus::Expired);
}

#[test]
fn unknown_sku_is_refused_without_recording_so_the_key_stays_free() {
    let mut sale = Sale::new();
    let r = sale.reqs.reserve("ghost", "ann", 1, "k");
    let out = sale.batch(T0, vec![r]);
    assert_eq!(out.outcomes, vec![rejected(Reject::UnknownSku)]);
    assert!(out.decisions.is_empty(), "an input error writes no row");
    assert!(out.skus.is_empty());
    // Once the SKU exists, the same key is decided anew.
    let up = sale.reqs.upsert("ghost", config(10, 2, 1_000));
    sale.one(T0, up);
    let r = sale.reqs.reserve("ghost", "ann", 1, "k");
    let id = r.request_id;
    let out = sale.batch(T0, vec![r]);
    assert_eq!(
        out.decisions,
        vec![Decision {
            command_index: 0,
            request_id: id,
            result: Ok(T0 + 1_000)
        }]
    );
}

#[test]
fn invalid_command_is_refused_without_recording_so_the_key_stays_free() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let r = sale.reqs.reserve("tv", "ann", 0, "k");
    let out = sale.batch(T0, vec![r]);
    assert_eq!(out.outcomes, vec![rejected(Reject::InvalidCommand)]);
    assert!(out.decisions.is_empty(), "an input error writes no row");
    // A corrected retry under the same key is decided, not refused as key reuse.
    sale.hold(T0, "tv", "ann", 1, "k");
    // And a repeat of the invalid request is now key reuse of the granted one.
    assert_eq!(
        sale.reserve(T0, "tv", "ann", 0, "k"),
        rejected(Reject::IdempotencyKeyReused)
    );
}

#[test]
fn zero_or_oversized_quantity_is_an_invalid_command() {
    let mut sale = Sale::with_sku("tv", config(STOCK_MAX, QUANTITY_MAX, 1_000));
    assert_eq!(
        sale.reserve(T0, "tv", "ann", 0, "k1"),
        rejected(Reject::InvalidCommand)
    );
    assert_eq!(
        sale.reserve(T0, "tv", "ann", QUANTITY_MAX + 1, "k2"),
        rejected(Reject::InvalidCommand)
    );
    assert_eq!(
        sale.reserve(T0, "tv", "ann", u32::MAX, "k3"),
        rejected(Reject::InvalidCommand)
    );
    // The largest quantity is accepted.
    sale.hold(T0, "tv", "ann", QUANTITY_MAX, "k4");
    assert_eq!(sale.sku("tv").held, u64::from(QUANTITY_MAX));
}

#[test]
fn request_id_of_a_granted_reservation_cannot_be_reused_by_another_reserve() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let first = sale.reqs.reserve("tv", "ann", 1, "k1");
    let id = first.request_id;
    sale.one(T0, first);
    let mut again = sale.reqs.reserve("tv", "bob", 1, "k1");
    again.request_id = id;
    assert_eq!(sale.one(T0, again), rejected(Reject::InvalidCommand));
    assert_eq!(sale.counters("tv"), (9, 1, 0));
    assert_eq!(sale.engine.reservation(id).unwrap().user_id, "ann");
}

#[test]
fn refusal_reasons_are_checked_in_documented_order() {
    let mut sale = Sale::new();
    let window = SkuConfig {
        starts_at_ms: Some(T0 + 1_000),
        ends_at_ms: Some(T0 + 2_000),
        ..config(1, 1, 1_000)
    };
    let reqs = vec![
        sale.reqs.upsert("paused", config(1, 1, 1_000)),
        sale.reqs.pause("paused"),
        sale.reqs.upsert("window", window),
        sale.reqs.upsert("empty", config(0, 1, 1_000)),
    ];
    sale.batch(T0, reqs);
    let cases: [(&str, u32, Reject); 7] = [
        // unknown sku before invalid quantity
        ("ghost", 0, Reject::UnknownSku),
        // invalid quantity before paused
        ("paused", 0, Reject::InvalidCommand),
        // paused before limit and stock
        ("paused", 2, Reject::SalePaused),
        // sale window before limit and stock (batch time T0 < starts_at)
        ("window", 2, Reject::SaleNotStarted),
        // limit before stock
        ("empty", 2, Reject::LimitExceeded),
        ("empty", 1, Reject::SoldOut),
        ("window", 1, Reject::SaleNotStarted),
    ];
    for (i, (sku, quantity, want)) in cases.into_iter().enumerate() {
        let got = sale.reserve(T0, sku, "ann", quantity, &format!("k{i}"));
        assert_eq!(got, rejected(want), "reserve {quantity} of {sku}");
    }
    // Once the window is open, limit comes before stock there too.
    assert_eq!(
        sale.reserve(T0 + 1_000, "window", "bob", 2, "k"),
        rejected(Reject::LimitExceeded)
    );
}

// ---- idempotency ------------------------------------------------------------------------------

#[test]
fn repeated_key_returns_first_outcome_and_changes_nothing() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let first = sale.reqs.reserve("tv", "ann", 2, "k");
    let id = first.request_id;
    let want = Outcome::Held {
        reservation_id: id,
        expires_at_ms: T0 + 60_000,
    };
    assert_eq!(sale.one(T0, first), want);
    // Later, with a new request id: the same answer, original expiry, no new decision.
    let repeat = sale.reqs.reserve("tv", "ann", 2, "k");
    let out = sale.batch(T0 + 5_000, vec![repeat]);
    assert_eq!(out.outcomes, vec![want.clone()]);
    assert!(out.decisions.is_empty(), "a replay writes no decision row");
    assert!(out.skus.is_empty(), "a replay changes no sku");
    assert_eq!(sale.counters("tv"), (8, 2, 0));
    // Even after the reservation moved on, the key keeps answering its first outcome.
    sale.confirm(T0 + 6_000, id);
    assert_eq!(sale.reserve(T0 + 7_000, "tv", "ann", 2, "k"), want);
    assert_eq!(sale.counters("tv"), (8, 0, 2));
}

#[test]
fn repeated_key_in_the_same_batch_reserves_once() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let a = sale.reqs.reserve("tv", "ann", 2, "k");
    let b = sale.reqs.reserve("tv", "ann", 2, "k");
    let id = a.request_id;
    let out = sale.batch(T0, vec![a, b]);
    let held = Outcome::Held {
        reservation_id: id,
        expires_at_ms: T0 + 60_000,
    };
    assert_eq!(out.outcomes, vec![held.clone(), held]);
    assert_eq!(out.decisions.len(), 1);
    assert_eq!(sale.counters("tv"), (8, 2, 0));
}

#[test]
fn repeated_key_replays_a_refusal_even_after_stock_returns() {
    let mut sale = Sale::with_sku("tv", config(1, 5, 60_000));
    let a = sale.hold(T0, "tv", "ann", 1, "k");
    assert_eq!(
        sale.reserve(T0, "tv", "bob", 1, "k"),
        rejected(Reject::SoldOut)
    );
    sale.cancel(T0, a);
    assert_eq!(
        sale.reserve(T0, "tv", "bob", 1, "k"),
        rejected(Reject::SoldOut)
    );
    assert_eq!(sale.counters("tv"), (1, 0, 0));
}

#[test]
fn same_key_different_quantity_is_key_reused_and_not_recorded() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let first = sale.reqs.reserve("tv", "ann", 1, "k");
    let id = first.request_id;
    sale.one(T0, first);
    let reuse = sale.reqs.reserve("tv", "ann", 2, "k");
    let out = sale.batch(T0, vec![reuse]);
    assert_eq!(out.outcomes, vec![rejected(Reject::IdempotencyKeyReused)]);
    assert!(out.decisions.is_empty(), "key reuse is not recorded");
    assert_eq!(sale.counters("tv"), (9, 1, 0));
    // The key still means its first request, not the refused one.
    assert_eq!(
        sale.reserve(T0, "tv", "ann", 1, "k"),
        Outcome::Held {
            reservation_id: id,
            expires_at_ms: T0 + 60_000
        }
    );
    assert_eq!(
        sale.reserve(T0, "tv", "ann", 2, "k"),
        rejected(Reject::IdempotencyKeyReused)
    );
}

#[test]
fn same_key_different_sku_is_key_reused() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let up = sale.reqs.upsert("radio", config(10, 5, 60_000));
    sale.one(T0, up);
    sale.hold(T0, "tv", "ann", 1, "k");
    assert_eq!(
        sale.reserve(T0, "radio", "ann", 1, "k"),
        rejected(Reject::IdempotencyKeyReused)
    );
    assert_eq!(sale.counters("radio"), (10, 0, 0));
    // Also when the first use was a refusal, and for an unknown SKU.
    assert_eq!(
        sale.reserve(T0, "tv", "bob", 9, "k"),
        rejected(Reject::LimitExceeded)
    );
    assert_eq!(
        sale.reserve(T0, "ghost", "bob", 9, "k"),
        rejected(Reject::IdempotencyKeyReused)
    );
}

#[test]
fn same_key_for_different_users_is_independent() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let a = sale.hold(T0, "tv", "ann", 1, "k");
    let b = sale.hold(T0, "tv", "bob", 2, "k");
    assert_ne!(a, b);
    assert_eq!(sale.counters("tv"), (7, 3, 0));
}

// ---- expiry -----------------------------------------------------------------------------------

#[test]
fn expired_hold_returns_units_and_later_buyer_gets_them() {
    let mut sale = Sale::with_sku("tv", config(1, 1, 1_000));
    let a = sale.hold(T0, "tv", "ann", 1, "k");
    assert_eq!(
        sale.reserve(T0 + 999, "tv", "bob", 1, "k1"),
        rejected(Reject::SoldOut)
    );
    assert_eq!(sale.status(a), ReservationStatus::Held);
    // At exactly expires_at the hold is released before the batch's commands are decided.
    let r = sale.reqs.reserve("tv", "bob", 1, "k2");
    let out = sale.batch(T0 + 1_000, vec![r]);
    assert_eq!(
        out.transitions,
        vec![Transition {
            reservation_id: a,
            status: ReservationStatus::Expired,
            at_ms: T0 + 1_000
        }]
    );
    assert!(matches!(out.outcomes[0], Outcome::Held { .. }));
    assert_eq!(sale.status(a), ReservationStatus::Expired);
    assert_eq!(sale.counters("tv"), (0, 1, 0));
}

#[test]
fn expiry_happens_in_a_batch_without_commands() {
    let mut sale = Sale::with_sku("tv", config(5, 5, 1_000));
    let a = sale.hold(T0, "tv", "ann", 2, "k");
    let out = sale.batch(T0 + 5_000, vec![]);
    assert!(out.outcomes.is_empty());
    assert_eq!(out.transitions.len(), 1);
    assert_eq!(out.transitions[0].reservation_id, a);
    assert_eq!(out.skus, vec![sale.sku("tv")]);
    assert_eq!(sale.counters("tv"), (5, 0, 0));
}

#[test]
fn expiries_are_reported_earliest_first() {
    let mut sale = Sale::new();
    let reqs = vec![
        sale.reqs.upsert("slow", config(5, 5, 3_000)),
        sale.reqs.upsert("fast", config(5, 5, 1_000)),
    ];
    sale.batch(T0, reqs);
    let slow = sale.hold(T0, "slow", "ann", 1, "k1");
    let fast = sale.hold(T0, "fast", "ann", 1, "k2");
    let out = sale.batch(T0 + 10_000, vec![]);
    let ids: Vec<_> = out.transitions.iter().map(|t| t.reservation_id).collect();
    assert_eq!(ids, vec![fast, slow]);
    // The skus are still reported in creation order.
    let names: Vec<_> = out.skus.iter().map(|s| s.sku.as_str()).collect();
    assert_eq!(names, vec!["slow", "fast"]);
}

#[test]
fn next_expiry_is_the_earliest_live_hold() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    assert_eq!(sale.engine.next_expiry_ms(), None);
    let a = sale.hold(T0, "tv", "ann", 1, "k");
    let b = sale.hold(T0 + 100, "tv", "bob", 1, "k");
    assert_eq!(sale.engine.next_expiry_ms(), Some(T0 + 1_000));
    sale.cancel(T0 + 200, a);
    assert_eq!(sale.engine.next_expiry_ms(), Some(T0 + 1_100));
    sale.confirm(T0 + 300, b);
    assert_eq!(sale.engine.next_expiry_ms(), None);
}

// ---- confirm and cancel -----------------------------------------------------------------------

#[test]
fn confirm_moves_held_to_sold() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let id = sale.hold(T0, "tv", "ann", 3, "k");
    let r = sale.reqs.confirm(id);
    let out = sale.batch(T0 + 50, vec![r]);
    assert_eq!(
        out.outcomes,
        vec![Outcome::Reservation(ReservationView {
            reservation_id: id,
            sku: "tv".into(),
            user_id: "ann".into(),
            quantity: 3,
            status: ReservationStatus::Confirmed,
            expires_at_ms: T0 + 60_000,
        })]
    );
    assert_eq!(
        out.transitions,
        vec![Transition {
            reservation_id: id,
            status: ReservationStatus::Confirmed,
            at_ms: T0 + 50
        }]
    );
    assert_eq!(sale.counters("tv"), (7, 0, 3));
    // A confirmed reservation never expires.
    let out = sale.batch(T0 + 120_000, vec![]);
    assert!(out.transitions.is_empty());
    assert_eq!(sale.counters("tv"), (7, 0, 3));
}

#[test]
fn confirm_twice_is_a_no_op_that_answers_the_same() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let id = sale.hold(T0, "tv", "ann", 3, "k");
    let first = sale.confirm(T0, id);
    let r = sale.reqs.confirm(id);
    let out = sale.batch(T0 + 1, vec![r]);
    assert_eq!(out.outcomes, vec![first]);
    assert!(out.transitions.is_empty());
    assert!(out.skus.is_empty());
    assert_eq!(sale.counters("tv"), (7, 0, 3));
}

#[test]
fn cancel_returns_units_to_available() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let id = sale.hold(T0, "tv", "ann", 3, "k");
    let r = sale.reqs.cancel(id);
    let out = sale.batch(T0 + 5, vec![r]);
    assert!(matches!(
        &out.outcomes[0],
        Outcome::Reservation(v) if v.status == ReservationStatus::Cancelled
    ));
    assert_eq!(
        out.transitions,
        vec![Transition {
            reservation_id: id,
            status: ReservationStatus::Cancelled,
            at_ms: T0 + 5
        }]
    );
    assert_eq!(sale.counters("tv"), (10, 0, 0));
    // Cancelling again answers the same and releases nothing twice.
    let again = sale.cancel(T0 + 6, id);
    assert!(matches!(again, Outcome::Reservation(v) if v.status == ReservationStatus::Cancelled));
    assert_eq!(sale.counters("tv"), (10, 0, 0));
    // Cancelled units do not come back at expiry time either.
    let out = sale.batch(T0 + 120_000, vec![]);
    assert!(out.transitions.is_empty());
    assert_eq!(sale.counters("tv"), (10, 0, 0));
}

#[test]
fn cancel_after_confirm_is_refused() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let id = sale.hold(T0, "tv", "ann", 3, "k");
    sale.confirm(T0, id);
    assert_eq!(sale.cancel(T0, id), rejected(Reject::ReservationConfirmed));
    assert_eq!(sale.status(id), ReservationStatus::Confirmed);
    assert_eq!(sale.counters("tv"), (7, 0, 3));
}

#[test]
fn confirm_after_cancel_is_refused() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let id = sale.hold(T0, "tv", "ann", 3, "k");
    sale.cancel(T0, id);
    assert_eq!(sale.confirm(T0, id), rejected(Reject::ReservationCancelled));
    assert_eq!(sale.status(id), ReservationStatus::Cancelled);
    assert_eq!(sale.counters("tv"), (10, 0, 0));
}

#[test]
fn confirm_after_expiry_is_refused() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let id = sale.hold(T0, "tv", "ann", 3, "k");
    assert_eq!(
        sale.confirm(T0 + 1_000, id),
        rejected(Reject::ReservationExpired)
    );
    assert_eq!(
        sale.cancel(T0 + 1_000, id),
        rejected(Reject::ReservationExpired)
    );
    assert_eq!(sale.status(id), ReservationStatus::Expired);
    assert_eq!(sale.counters("tv"), (10, 0, 0));
}

#[test]
fn confirm_one_ms_before_expiry_succeeds() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let id = sale.hold(T0, "tv", "ann", 3, "k");
    assert!(matches!(
        sale.confirm(T0 + 999, id),
        Outcome::Reservation(_)
    ));
    assert_eq!(sale.counters("tv"), (7, 0, 3));
}

#[test]
fn confirm_or_cancel_of_unknown_reservation_is_refused() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    assert_eq!(
        sale.confirm(T0, 999_999),
        rejected(Reject::UnknownReservation)
    );
    assert_eq!(
        sale.cancel(T0, 999_999),
        rejected(Reject::UnknownReservation)
    );
    // A refused reservation has no reservation to confirm.
    let refused = sale.reqs.reserve("tv", "ann", 0, "k");
    let refused_id = refused.request_id;
    sale.one(T0, refused);
    assert_eq!(
        sale.confirm(T0, refused_id),
        rejected(Reject::UnknownReservation)
    );
}

#[test]
fn confirm_in_the_same_batch_as_the_hold_works() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let r = sale.reqs.reserve("tv", "ann", 2, "k");
    let id = r.request_id;
    let c = sale.reqs.confirm(id);
    let out = sale.batch(T0, vec![r, c]);
    assert!(matches!(out.outcomes[1], Outcome::Reservation(_)));
    assert_eq!(sale.counters("tv"), (8, 0, 2));
}

#[test]
fn confirm_and_cancel_are_allowed_while_paused_or_after_the_sale_ended() {
    let cfg = SkuConfig {
        ends_at_ms: Some(T0 + 500),
        ..config(10, 5, 60_000)
    };
    let mut sale = Sale::with_sku("tv", cfg);
    let a = sale.hold(T0, "tv", "ann", 1, "k1");
    let b = sale.hold(T0, "tv", "bob", 1, "k1");
    let p = sale.reqs.pause("tv");
    sale.one(T0, p);
    assert!(matches!(
        sale.confirm(T0 + 1_000, a),
        Outcome::Reservation(_)
    ));
    assert!(matches!(
        sale.cancel(T0 + 1_000, b),
        Outcome::Reservation(_)
    ));
    assert_eq!(sale.counters("tv"), (9, 0, 1));
}

// ---- admin ------------------------------------------------------------------------------------

#[test]
fn upsert_below_held_plus_sold_is_refused() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let a = sale.hold(T0, "tv", "ann", 3, "k");
    sale.hold(T0, "tv", "bob", 2, "k");
    sale.confirm(T0, a);
    // held 2 + sold 3 = 5 committed
    let low = sale.reqs.upsert("tv", config(4, 5, 60_000));
    assert_eq!(sale.one(T0, low), rejected(Reject::StockBelowCommitted));
    assert_eq!(
        sale.sku("tv").config,
        config(10, 5, 60_000),
        "refused: nothing changes"
    );
    let exact = sale.reqs.upsert("tv", config(5, 5, 60_000));
    let Outcome::Sku(view) = sale.one(T0, exact) else {
        panic!("lowering to exactly the committed units is allowed")
    };
    assert_eq!(
        (view.total, view.available, view.held, view.sold),
        (5, 0, 2, 3)
    );
}

#[test]
fn upsert_of_existing_sku_keeps_counters_and_recomputes_available() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    sale.hold(T0, "tv", "ann", 3, "k");
    let p = sale.reqs.pause("tv");
    sale.one(T0, p);
    let up = sale.reqs.upsert("tv", config(20, 2, 5_000));
    let Outcome::Sku(view) = sale.one(T0, up) else {
        panic!("upsert refused")
    };
    assert_eq!(
        (view.total, view.available, view.held, view.sold),
        (20, 17, 3, 0)
    );
    assert_eq!(view.config, config(20, 2, 5_000));
    assert!(view.paused, "an upsert does not resume a paused sku");
    // The new limit and TTL apply to new reservations (ann already holds 3 > 2).
    let r = sale.reqs.resume("tv");
    sale.one(T0, r);
    assert_eq!(
        sale.reserve(T0, "tv", "ann", 1, "k2"),
        rejected(Reject::LimitExceeded)
    );
    let bob = sale.hold(T0, "tv", "bob", 2, "k");
    assert_eq!(
        sale.engine.reservation(bob).unwrap().expires_at_ms,
        T0 + 5_000
    );
}

#[test]
fn upsert_with_invalid_config_is_refused() {
    let mut sale = Sale::new();
    let invalid = [
        config(STOCK_MAX + 1, 1, 1),
        config(1, 0, 1),
        config(1, QUANTITY_MAX + 1, 1),
        config(1, 1, 0),
        config(1, 1, HOLD_TTL_MS_MAX + 1),
        SkuConfig {
            starts_at_ms: Some(T0),
            ends_at_ms: Some(T0),
            ..config(1, 1, 1)
        },
        SkuConfig {
            starts_at_ms: Some(T0 + 1),
            ends_at_ms: Some(T0),
            ..config(1, 1, 1)
        },
    ];
    for cfg in invalid {
        let up = sale.reqs.upsert("tv", cfg.clone());
        assert_eq!(
            sale.one(T0, up),
            rejected(Reject::InvalidCommand),
            "{cfg:?}"
        );
    }
    assert_eq!(sale.engine.sku("tv"), None);
    let edges = [
        config(STOCK_MAX, QUANTITY_MAX, HOLD_TTL_MS_MAX),
        config(0, 1, 1),
        SkuConfig {
            starts_at_ms: Some(T0),
            ends_at_ms: Some(T0 + 1),
            ..config(1, 1, 1)
        },
    ];
    for cfg in edges {
        let up = sale.reqs.upsert("tv", cfg.clone());
        assert!(matches!(sale.one(T0, up), Outcome::Sku(_)), "{cfg:?}");
    }
}

#[test]
fn restock_adds_to_total_and_available() {
    let mut sale = Sale::with_sku("tv", config(2, 5, 60_000));
    sale.hold(T0, "tv", "ann", 2, "k");
    let r = sale.reqs.restock("tv", 3);
    let Outcome::Sku(view) = sale.one(T0, r) else {
        panic!("restock refused")
    };
    assert_eq!(
        (view.total, view.available, view.held, view.sold),
        (5, 3, 2, 0)
    );
    assert_eq!(view.config.total_stock, 5);
    sale.hold(T0, "tv", "bob", 3, "k");
}

#[test]
fn restock_refuses_unknown_sku_zero_quantity_and_overflow() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let r = sale.reqs.restock("ghost", 1);
    assert_eq!(sale.one(T0, r), rejected(Reject::UnknownSku));
    let r = sale.reqs.restock("tv", 0);
    assert_eq!(sale.one(T0, r), rejected(Reject::InvalidCommand));
    let r = sale.reqs.restock("tv", STOCK_MAX - 9);
    assert_eq!(sale.one(T0, r), rejected(Reject::StockOverflow));
    let r = sale.reqs.restock("tv", u64::MAX);
    assert_eq!(sale.one(T0, r), rejected(Reject::StockOverflow));
    assert_eq!(sale.sku("tv").total, 10);
    let r = sale.reqs.restock("tv", STOCK_MAX - 10);
    assert!(matches!(sale.one(T0, r), Outcome::Sku(v) if v.total == STOCK_MAX));
}

#[test]
fn pause_refuses_new_reservations_and_resume_reopens_the_sale() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let p = sale.reqs.pause("tv");
    assert!(matches!(sale.one(T0, p), Outcome::Sku(v) if v.paused));
    assert_eq!(
        sale.reserve(T0, "tv", "ann", 1, "k1"),
        rejected(Reject::SalePaused)
    );
    assert_eq!(sale.counters("tv"), (10, 0, 0));
    let r = sale.reqs.resume("tv");
    assert!(matches!(sale.one(T0, r), Outcome::Sku(v) if !v.paused));
    sale.hold(T0, "tv", "ann", 1, "k2");
}

#[test]
fn pause_or_resume_of_unknown_sku_is_refused() {
    let mut sale = Sale::new();
    let p = sale.reqs.pause("ghost");
    assert_eq!(sale.one(T0, p), rejected(Reject::UnknownSku));
    let r = sale.reqs.resume("ghost");
    assert_eq!(sale.one(T0, r), rejected(Reject::UnknownSku));
    assert_eq!(sale.engine.skus().count(), 0, "pause does not create a sku");
}

#[test]
fn pause_all_pauses_every_sku() {
    let mut sale = Sale::new();
    let reqs = vec![
        sale.reqs.upsert("a", config(5, 5, 1_000)),
        sale.reqs.upsert("b", config(5, 5, 1_000)),
        sale.reqs.upsert("c", config(5, 5, 1_000)),
        sale.reqs.pause("b"),
    ];
    sale.batch(T0, reqs);
    let freeze = sale.reqs.pause_all();
    let out = sale.batch(T0, vec![freeze]);
    assert_eq!(out.outcomes, vec![Outcome::Frozen { skus_paused: 2 }]);
    assert!(sale.engine.skus().all(|s| s.paused));
    let names: Vec<_> = out.skus.iter().map(|s| s.sku.as_str()).collect();
    assert_eq!(
        names,
        vec!["a", "c"],
        "only the skus it changed are reported"
    );
    for sku in ["a", "b", "c"] {
        assert_eq!(
            sale.reserve(T0, sku, "ann", 1, sku),
            rejected(Reject::SalePaused)
        );
    }
    let again = sale.reqs.pause_all();
    let out = sale.batch(T0, vec![again]);
    assert_eq!(out.outcomes, vec![Outcome::Frozen { skus_paused: 0 }]);
    assert!(out.skus.is_empty());
    // A sku created after the freeze is not paused by it.
    let up = sale.reqs.upsert("d", config(5, 5, 1_000));
    sale.one(T0, up);
    sale.hold(T0, "d", "ann", 1, "d");
}

#[test]
fn sale_window_is_enforced() {
    let cfg = SkuConfig {
        starts_at_ms: Some(T0 + 1_000),
        ends_at_ms: Some(T0 + 2_000),
        ..config(10, 10, 60_000)
    };
    let mut sale = Sale::with_sku("tv", cfg);
    assert_eq!(
        sale.reserve(T0 + 999, "tv", "ann", 1, "k1"),
        rejected(Reject::SaleNotStarted)
    );
    sale.hold(T0 + 1_000, "tv", "ann", 1, "k2");
    sale.hold(T0 + 1_999, "tv", "ann", 1, "k3");
    assert_eq!(
        sale.reserve(T0 + 2_000, "tv", "ann", 1, "k4"),
        rejected(Reject::SaleEnded)
    );
    assert_eq!(sale.counters("tv"), (8, 2, 0));
}

#[test]
fn open_ended_sale_windows_apply_only_their_bound() {
    let mut sale = Sale::new();
    let starts = SkuConfig {
        starts_at_ms: Some(T0 + 1_000),
        ..config(10, 10, 60_000)
    };
    let ends = SkuConfig {
        ends_at_ms: Some(T0 + 1_000),
        ..config(10, 10, 60_000)
    };
    let reqs = vec![
        sale.reqs.upsert("starts", starts),
        sale.reqs.upsert("ends", ends),
    ];
    sale.batch(T0, reqs);
    assert_eq!(
        sale.reserve(T0, "starts", "ann", 1, "k1"),
        rejected(Reject::SaleNotStarted)
    );
    sale.hold(T0, "ends", "ann", 1, "k2");
    sale.hold(T0 + 1_000_000, "starts", "ann", 1, "k3");
    assert_eq!(
        sale.reserve(T0 + 1_000_000, "ends", "ann", 1, "k4"),
        rejected(Reject::SaleEnded)
    );
}

// ---- batches ----------------------------------------------------------------------------------

#[test]
fn batch_time_never_goes_backwards() {
    let cfg = SkuConfig {
        ends_at_ms: Some(T0 + 3_000),
        ..config(10, 10, 1_000)
    };
    let mut sale = Sale::with_sku("tv", cfg);
    let r = sale.reqs.reserve("tv", "ann", 1, "k1");
    let out = sale.batch(T0 + 2_500, vec![r]);
    assert_eq!(out.batch_time_ms, T0 + 2_500);
    // The clock steps back: the batch still runs at T0 + 2500.
    let r = sale.reqs.reserve("tv", "ann", 1, "k2");
    let id = r.request_id;
    let out = sale.batch(T0 + 100, vec![r]);
    assert_eq!(out.batch_time_ms, T0 + 2_500);
    assert_eq!(sale.engine.clock_ms(), T0 + 2_500);
    assert_eq!(
        out.outcomes,
        vec![Outcome::Held {
            reservation_id: id,
            expires_at_ms: T0 + 3_500
        }]
    );
    // Once the sale has ended, an earlier batch time does not reopen it.
    let out = sale.batch(T0 + 3_000, vec![]);
    assert_eq!(out.batch_time_ms, T0 + 3_000);
    assert_eq!(
        sale.reserve(T0, "tv", "bob", 1, "k"),
        rejected(Reject::SaleEnded)
    );
    // And expiries that happened do not un-happen; the ones due still fire on time.
    let out = sale.batch(T0 + 3_500, vec![]);
    assert_eq!(out.transitions.len(), 2);
    let out = sale.batch(T0, vec![]);
    assert_eq!(out.batch_time_ms, T0 + 3_500);
    assert!(out.transitions.is_empty());
    assert_eq!(sale.counters("tv"), (10, 0, 0));
}

#[test]
fn batch_seq_counts_batches_including_empty_ones() {
    let mut sale = Sale::new();
    assert_eq!(sale.engine.batch_seq(), 0);
    assert_eq!(sale.batch(T0, vec![]).batch_seq, 1);
    assert_eq!(sale.batch(T0, vec![]).batch_seq, 2);
    let r = sale.reqs.pause_all();
    assert_eq!(sale.batch(T0, vec![r]).batch_seq, 3);
    assert_eq!(sale.engine.batch_seq(), 3);
}

#[test]
fn decisions_and_transitions_are_reported_for_persistence() {
    let mut sale = Sale::with_sku("tv", config(5, 2, 1_000));
    let earlier = sale.hold(T0, "tv", "ann", 1, "k1");
    let expiring = sale.hold(T0 + 20, "tv", "cat", 1, "k1");
    let now = T0 + 100;
    let bob = sale.reqs.reserve("tv", "bob", 1, "k1");
    let granted = bob.request_id;
    let reqs = vec![
        bob,                                        // 0: granted
        sale.reqs.reserve("tv", "bob", 3, "k2"),    // 1: refused (limit)
        sale.reqs.reserve("tv", "bob", 1, "k1"),    // 2: replay of 0
        sale.reqs.reserve("tv", "bob", 2, "k1"),    // 3: key reused
        sale.reqs.confirm(earlier),                 // 4: held -> confirmed
        sale.reqs.confirm(earlier),                 // 5: no-op
        sale.reqs.cancel(granted),                  // 6: held -> cancelled
        sale.reqs.reserve("ghost", "bob", 1, "k3"), // 7: input error (unknown sku): no row
        sale.reqs.cancel(earlier),                  // 8: refused (confirmed)
        sale.reqs.reserve("tv", "dan", 0, "k1"),    // 9: input error (quantity 0): no row
        sale.reqs.reserve("tv", "dan", 3, "k1"),    // 10: refused (limit)
    ];
    let ids: Vec<_> = reqs.iter().map(|r| r.request_id).collect();
    let out = sale.batch(now, reqs);
    assert_eq!(out.batch_time_ms, now);
    assert_eq!(
        out.decisions,
        vec![
            Decision {
                command_index: 0,
                request_id: ids[0],
                result: Ok(now + 1_000)
            },
            Decision {
                command_index: 1,
                request_id: ids[1],
                result: Err(Reject::LimitExceeded)
            },
            Decision {
                command_index: 10,
                request_id: ids[10],
                result: Err(Reject::LimitExceeded)
            },
        ]
    );
    assert_eq!(
        out.transitions,
        vec![
            Transition {
                reservation_id: earlier,
                status: ReservationStatus::Confirmed,
                at_ms: now
            },
            Transition {
                reservation_id: granted,
                status: ReservationStatus::Cancelled,
                at_ms: now
            },
        ]
    );
    assert_eq!(out.skus, vec![sale.sku("tv")]);
    assert_eq!(
        out.outcomes[2],
        Outcome::Held {
            reservation_id: granted,
            expires_at_ms: now + 1_000
        }
    );
    assert_eq!(out.outcomes[3], rejected(Reject::IdempotencyKeyReused));
    assert_eq!(out.outcomes[8], rejected(Reject::ReservationConfirmed));
    // cat's hold is the only one left.
    assert_eq!(sale.counters("tv"), (3, 1, 1));
    // Expiry is reported as a transition at the batch time, with no decision.
    let out = sale.batch(T0 + 5_000, vec![]);
    assert!(out.decisions.is_empty());
    assert_eq!(
        out.transitions,
        vec![Transition {
            reservation_id: expiring,
            status: ReservationStatus::Expired,
            at_ms: T0 + 5_000
        }]
    );
}

#[test]
fn only_touched_skus_are_reported() {
    let mut sale = Sale::new();
    let reqs = vec![
        sale.reqs.upsert("a", config(5, 2, 1_000)),
        sale.reqs.upsert("b", config(5, 2, 1_000)),
        sale.reqs.upsert("c", config(0, 2, 1_000)),
    ];
    let out = sale.batch(T0, reqs);
    let names =
        |out: &BatchOutput| -> Vec<String> { out.skus.iter().map(|s| s.sku.clone()).collect() };
    assert_eq!(names(&out), ["a", "b", "c"]);

    let r = sale.reqs.reserve("b", "ann", 1, "k1");
    let b_hold = r.request_id;
    let out = sale.batch(T0, vec![r]);
    assert_eq!(out.skus, vec![sale.sku("b")]);

    // Refusals, replays and no-op moves change nothing, so report nothing.
    let reqs = vec![
        sale.reqs.reserve("c", "ann", 1, "k2"),     // sold out
        sale.reqs.reserve("a", "ann", 3, "k3"),     // limit
        sale.reqs.reserve("b", "ann", 1, "k1"),     // replay
        sale.reqs.reserve("ghost", "ann", 1, "k4"), // unknown
        sale.reqs.confirm(424_242),                 // unknown reservation
        sale.reqs.upsert("a", config(1, 0, 1_000)), // invalid
        sale.reqs.restock("a", 0),                  // invalid
    ];
    let out = sale.batch(T0, reqs);
    assert!(out.skus.is_empty(), "{:?}", out.skus);

    // Pause and resume report their sku.
    let r = sale.reqs.pause("c");
    let out = sale.batch(T0, vec![r]);
    assert_eq!(names(&out), ["c"]);
    assert!(out.skus[0].paused);

    // Several changes are reported once each, in creation order, with their final state.
    let reqs = vec![
        sale.reqs.reserve("b", "bob", 1, "k1"),
        sale.reqs.restock("a", 1),
        sale.reqs.reserve("b", "cat", 1, "k1"),
    ];
    let out = sale.batch(T0, reqs);
    assert_eq!(out.skus, vec![sale.sku("a"), sale.sku("b")]);
    assert_eq!(out.skus[1].held, 3);

    // A confirm reports its sku.
    let r = sale.reqs.confirm(b_hold);
    let out = sale.batch(T0, vec![r]);
    assert_eq!(names(&out), ["b"]);

    // Expiry reports the skus it released.
    let out = sale.batch(T0 + 1_000, vec![]);
    assert_eq!(names(&out), ["b"]);
    assert_eq!(out.skus[0].held, 0);
    let out = sale.batch(T0 + 2_000, vec![]);
    assert!(out.skus.is_empty());
}

// ---- restore ----------------------------------------------------------------------------------

fn tv_view(available: u64, held: u64, sold: u64) -> SkuView {
    SkuView {
        sku: "tv".into(),
        total: 10,
        available,
        held,
        sold,
        config: config(10, 5, 1_000),
        paused: false,
    }
}

fn stored(
    request_id: RequestId,
    user: &str,
    key: &str,
    quantity: u32,
    status: Result<ReservationStatus, Reject>,
    expires_at_ms: i64,
) -> StoredDecision {
    StoredDecision {
        request_id,
        user_id: user.into(),
        idempotency_key: key.into(),
        sku: "tv".into(),
        quantity,
        status,
        expires_at_ms,
    }
}

/// tv: 10 total; ann holds 3, bob bought 1 and cancelled 2, cat was refused.
fn small_snapshot() -> Snapshot {
    Snapshot {
        batch_seq: 7,
        clock_ms: T0 + 100,
        skus: vec![tv_view(6, 3, 1)],
        decisions: vec![
            stored(1, "ann", "k1", 3, Ok(ReservationStatus::Held), T0 + 1_000),
            stored(
                2,
                "bob",
                "k1",
                1,
                Ok(ReservationStatus::Confirmed),
                T0 + 500,
            ),
            stored(
                3,
                "bob",
                "k2",
                2,
                Ok(ReservationStatus::Cancelled),
                T0 + 600,
            ),
            stored(4, "cat", "k1", 9, Err(Reject::LimitExceeded), 0),
        ],
    }
}

#[test]
fn restore_rebuilds_keys_holdings_and_expiries() {
    let mut snapshot = small_snapshot();
    let lamp = SkuView {
        sku: "lamp".into(),
        paused: true,
        ..tv_view(10, 0, 0)
    };
    snapshot.skus.push(lamp.clone());
    let mut engine = Engine::restore(snapshot).expect("valid snapshot");
    engine.check_invariants();
    assert_eq!((engine.batch_seq(), engine.clock_ms()), (7, T0 + 100));
    assert_eq!(
        engine.skus().collect::<Vec<_>>(),
        vec![tv_view(6, 3, 1), lamp]
    );
    assert_eq!(
        engine.reservation(3).unwrap().status,
        ReservationStatus::Cancelled
    );
    assert_eq!(engine.next_expiry_ms(), Some(T0 + 1_000));
    let mut reqs = Reqs { next_id: 100 };
    let batch = vec![
        reqs.reserve("tv", "ann", 3, "k1"),   // replay of 1
        reqs.reserve("tv", "cat", 9, "k1"),   // replay of 4
        reqs.reserve("tv", "bob", 2, "k2"),   // replay of 3 (cancelled since)
        reqs.reserve("tv", "bob", 3, "k2"),   // key reused
        reqs.reserve("tv", "ann", 3, "k2"),   // 3 held + 3 > 5
        reqs.reserve("tv", "bob", 4, "k3"),   // 1 sold + 4 <= 5 (the cancelled 2 do not count)
        reqs.reserve("lamp", "bob", 1, "k4"), // still paused
    ];
    let out = engine.apply_batch(T0 + 200, &batch);
    engine.check_invariants();
    assert_eq!(out.batch_seq, 8);
    assert_eq!(
        out.outcomes,
        vec![
            Outcome::Held {
                reservation_id: 1,
                expires_at_ms: T0 + 1_000
            },
            rejected(Reject::LimitExceeded),
            Outcome::Held {
                reservation_id: 3,
                expires_at_ms: T0 + 600
            },
            rejected(Reject::IdempotencyKeyReused),
            rejected(Reject::LimitExceeded),
            Outcome::Held {
                reservation_id: batch[5].request_id,
                expires_at_ms: T0 + 1_200
            },
            rejected(Reject::SalePaused),
        ]
    );
    let out = engine.apply_batch(T0 + 1_000, &[]);
    engine.check_invariants();
    assert_eq!(
        out.transitions,
        vec![Transition {
            reservation_id: 1,
            status: ReservationStatus::Expired,
            at_ms: T0 + 1_000
        }]
    );
}

#[test]
fn restore_refuses_counters_that_disagree_with_rows() {
    let mut snapshot = small_snapshot();
    // Still available + held + sold == total, but one unit more held than the rows say.
    snapshot.skus = vec![tv_view(5, 4, 1)];
    match Engine::restore(snapshot) {
        Err(RestoreError::CountersDisagree {
            sku,
            held_counter,
            sold_counter,
            held_rows,
            sold_rows,
        }) => {
            assert_eq!(sku, "tv");
            assert_eq!((held_counter, sold_counter), (4, 1));
            assert_eq!((held_rows, sold_rows), (3, 1));
        }
        other => panic!("expected CountersDisagree, got {other:?}"),
    }
    let mut snapshot = small_snapshot();
    snapshot.skus = vec![tv_view(6, 3, 1)];
    snapshot.decisions[1].status = Ok(ReservationStatus::Cancelled);
    assert!(matches!(
        Engine::restore(snapshot),
        Err(RestoreError::CountersDisagree { sold_rows: 0, .. })
    ));
}

#[test]
fn restore_refuses_a_duplicate_idempotency_key() {
    let mut snapshot = small_snapshot();
    snapshot
        .decisions
        .push(stored(5, "cat", "k1", 1, Err(Reject::SoldOut), 0));
    match Engine::restore(snapshot) {
        Err(RestoreError::DuplicateKey { user_id, key }) => {
            assert_eq!((user_id.as_str(), key.as_str()), ("cat", "k1"));
        }
        other => panic!("expected DuplicateKey, got {other:?}"),
    }
}

#[test]
fn restore_refuses_a_reservation_on_an_unknown_sku() {
    let mut snapshot = small_snapshot();
    let mut d = stored(5, "dan", "k1", 1, Ok(ReservationStatus::Cancelled), T0);
    d.sku = "radio".into();
    snapshot.decisions.push(d);
    assert!(matches!(
        Engine::restore(snapshot),
        Err(RestoreError::UnknownSku { request_id: 5, .. })
    ));
}

#[test]
fn restore_refuses_a_broken_stock_invariant() {
    let mut snapshot = small_snapshot();
    snapshot.skus = vec![tv_view(7, 3, 1)];
    assert!(matches!(
        Engine::restore(snapshot),
        Err(RestoreError::StockInvariant { .. })
    ));
}

// ---- duplicate request ids --------------------------------------------------------------------

/// Every decision row is inserted into `reservations` keyed by its request id (the PRIMARY KEY
/// of that table), so two decision rows must never carry the same request id. Otherwise the
/// commit fails with a unique violation, the runtime stops, and any sequencer that takes over
/// replays the same log, decides the same way and fails the same way: the sale is wedged until an
/// operator intervenes. Request ids come from the ingress (UUIDv7), so only a buggy or hostile
/// producer repeats one, which is exactly what `InvalidCommand` exists to absorb.
#[test]
fn decision_rows_never_share_a_request_id() {
    let mut sale = Sale::with_sku("tv", config(1, 5, 60_000));
    let mut seen = std::collections::BTreeSet::new();
    let mut rows = |out: &BatchOutput| {
        for d in &out.decisions {
            assert!(
                seen.insert(d.request_id),
                "request id {} gets a second decision row: {out:?}",
                d.request_id
            );
        }
    };
    // (a) The id of a granted reservation, reused under another key: refused, no row (holds).
    let ann = sale.reqs.reserve("tv", "ann", 1, "k1");
    let ann_id = ann.request_id;
    rows(&sale.batch(T0, vec![ann]));
    let mut dup = sale.reqs.reserve("tv", "bob", 1, "k1");
    dup.request_id = ann_id;
    rows(&sale.batch(T0, vec![dup]));
    // (b) The id of a refusal, reused under another key once stock is back: refused as invalid,
    // no second row.
    let cat = sale.reqs.reserve("tv", "cat", 1, "k1"); // sold out
    let cat_id = cat.request_id;
    rows(&sale.batch(T0, vec![cat]));
    let cancel = sale.reqs.cancel(ann_id);
    sale.batch(T0, vec![cancel]);
    let mut dup = sale.reqs.reserve("tv", "dan", 1, "k1");
    dup.request_id = cat_id;
    let out = sale.batch(T0, vec![dup]);
    assert_eq!(out.outcomes, vec![rejected(Reject::InvalidCommand)]);
    rows(&out);
}

#[test]
fn one_batch_never_writes_two_decision_rows_with_the_same_id() {
    let mut sale = Sale::with_sku("tv", config(0, 5, 60_000));
    let a = sale.reqs.reserve("tv", "ann", 1, "k1");
    let mut b = sale.reqs.reserve("tv", "bob", 1, "k1");
    b.request_id = a.request_id;
    let out = sale.batch(T0, vec![a, b]);
    assert_eq!(
        out.outcomes,
        vec![rejected(Reject::SoldOut), rejected(Reject::InvalidCommand)]
    );
    let mut ids: Vec<_> = out.decisions.iter().map(|d| d.request_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), out.decisions.len(), "{:?}", out.decisions);
}

// ---- properties -------------------------------------------------------------------------------

/// "ghost" is never created, so it is always an unknown SKU; "c" exists only once an op creates it.
const SKUS: [&str; 4] = ["a", "b", "c", "ghost"];
const USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];

#[derive(Debug, Clone)]
enum Target {
    /// One of the fresh reserve requests issued so far (granted or not).
    Issued(Index),
    /// Most likely no reservation at all.
    Random(RequestId),
}

#[derive(Debug, Clone)]
enum Op {
    /// A reserve under the user's next key ("k0", "k1", ... per user, so the same key strings
    /// recur across users).
    Reserve {
        sku: usize,
        user: usize,
        quantity: u32,
    },
    /// The same user and key as an earlier reserve: the same request again (a client retry), or
    /// with `change` a different SKU and quantity (key reuse, unless the dice pick the same).
    Retry {
        pick: Index,
        change: Option<(usize, u32)>,
    },
    /// A reserve under a fresh key whose request id repeats an earlier reserve's (a buggy
    /// producer).
    ReserveReusingId {
        pick: Index,
        sku: usize,
        user: usize,
        quantity: u32,
    },
    Confirm(Target),
    Cancel(Target),
    Upsert {
        sku: usize,
        config: SkuConfig,
    },
    Restock {
        sku: usize,
        quantity: u64,
    },
    Pause(usize),
    Resume(usize),
    PauseAll,
    /// Ends the batch; the next one is `dt` ms later (earlier when negative: the clock stepped back).
    Cut {
        dt: i64,
    },
}

fn sku() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0usize), 4 => Just(1usize), 2 => Just(2usize), 1 => Just(3usize)]
}

fn quantity() -> impl Strategy<Value = u32> {
    prop_oneof![12 => 1u32..=3, 1 => Just(4), 1 => Just(0), 1 => Just(QUANTITY_MAX + 1)]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        8 => any::<Index>().prop_map(Target::Issued),
        1 => (0u128..400).prop_map(Target::Random),
    ]
}

fn sku_config() -> impl Strategy<Value = SkuConfig> {
    let total = prop_oneof![10 => 0u64..=12, 1 => Just(STOCK_MAX), 1 => Just(STOCK_MAX + 1)];
    let limit = prop_oneof![10 => 1u32..=4, 1 => Just(0), 1 => Just(QUANTITY_MAX + 1)];
    let ttl = prop_oneof![
        10 => 1u64..=3_000,
        1 => Just(0),
        1 => Just(HOLD_TTL_MS_MAX),
        1 => Just(HOLD_TTL_MS_MAX + 1)
    ];
    let starts = proptest::option::weighted(0.25, (T0 - 2_000)..(T0 + 8_000));
    let ends = proptest::option::weighted(0.25, T0..(T0 + 15_000));
    (total, limit, ttl, starts, ends).prop_map(
        |(total_stock, per_user_limit, hold_ttl_ms, starts_at_ms, ends_at_ms)| SkuConfig {
            total_stock,
            per_user_limit,
            hold_ttl_ms,
            starts_at_ms,
            ends_at_ms,
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    let user = 0..USERS.len();
    prop_oneof![
        30 => (sku(), user.clone(), quantity())
            .prop_map(|(sku, user, quantity)| Op::Reserve { sku, user, quantity }),
        10 => (any::<Index>(), proptest::option::weighted(0.25, (sku(), quantity())))
            .prop_map(|(pick, change)| Op::Retry { pick, change }),
        1 => (any::<Index>(), sku(), user, quantity())
            .prop_map(|(pick, sku, user, quantity)| Op::ReserveReusingId {
                pick, sku, user, quantity
            }),
        8 => target().prop_map(Op::Confirm),
        5 => target().prop_map(Op::Cancel),
        4 => (0..SKUS.len() - 1, sku_config()).prop_map(|(sku, config)| Op::Upsert { sku, config }),
        2 => (sku(), prop_oneof![8 => 1u64..=5, 1 => Just(0), 1 => Just(STOCK_MAX)])
            .prop_map(|(sku, quantity)| Op::Restock { sku, quantity }),
        2 => sku().prop_map(Op::Pause),
        6 => sku().prop_map(Op::Resume),
        1 => Just(Op::PauseAll),
        12 => prop_oneof![8 => 0i64..=600, 2 => 600i64..=3_000, 1 => -2_000i64..0]
            .prop_map(|dt| Op::Cut { dt }),
    ]
}

fn ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 0..=max)
}

/// An earlier fresh reserve: what a retry repeats.
#[derive(Debug, Clone)]
struct Issued {
    request_id: RequestId,
    user: usize,
    key: String,
    sku: usize,
    quantity: u32,
}

/// Turns ops into timed batches of requests. Pure: it never looks at an engine, so the same ops
/// always give the same batches.
#[derive(Debug, Clone)]
struct Script {
    reqs: Reqs,
    now: i64,
    issued: Vec<Issued>,
    keys_used: [usize; USERS.len()],
}

impl Script {
    /// Starts with a batch at `T0` that creates "a" and "b" (more SKUs come from the ops).
    fn start() -> (Self, (i64, Vec<Request>)) {
        let mut reqs = Reqs::new();
        let setup = vec![
            reqs.upsert("a", config(6, 3, 3_000)),
            reqs.upsert("b", config(3, 2, 1_500)),
        ];
        let script = Self {
            reqs,
            now: T0,
            issued: Vec::new(),
            keys_used: [0; USERS.len()],
        };
        (script, (T0, setup))
    }

    fn fresh_key(&mut self, user: usize) -> String {
        let key = format!("k{}", self.keys_used[user]);
        self.keys_used[user] += 1;
        key
    }

    fn batches(&mut self, ops: &[Op]) -> Vec<(i64, Vec<Request>)> {
        let mut batches = Vec::new();
        let mut current = Vec::new();
        for op in ops {
            let request = match op {
                Op::Cut { dt } => {
                    batches.push((self.now, std::mem::take(&mut current)));
                    self.now += dt;
                    continue;
                }
                &Op::Reserve {
                    sku,
                    user,
                    quantity,
                } => {
                    let key = self.fresh_key(user);
                    let r = self.reqs.reserve(SKUS[sku], USERS[user], quantity, &key);
                    self.issued.push(Issued {
                        request_id: r.request_id,
                        user,
                        key,
                        sku,
                        quantity,
                    });
                    r
                }
                Op::Retry { pick, change } => {
                    if self.issued.is_empty() {
                        continue;
                    }
                    let first = pick.get(&self.issued);
                    let (sku, quantity) = change.unwrap_or((first.sku, first.quantity));
                    let (user, key) = (USERS[first.user], first.key.clone());
                    self.reqs.reserve(SKUS[sku], user, quantity, &key)
                }
                &Op::ReserveReusingId {
                    ref pick,
                    sku,
                    user,
                    quantity,
                } => {
                    let key = self.fresh_key(user);
                    let mut r = self.reqs.reserve(SKUS[sku], USERS[user], quantity, &key);
                    if !self.issued.is_empty() {
                        r.request_id = pick.get(&self.issued).request_id;
                    }
                    r
                }
                Op::Confirm(t) => {
                    let id = self.resolve(t);
                    self.reqs.confirm(id)
                }
                Op::Cancel(t) => {
                    let id = self.resolve(t);
                    self.reqs.cancel(id)
                }
                Op::Upsert { sku, config } => self.reqs.upsert(SKUS[*sku], config.clone()),
                Op::Restock { sku, quantity } => self.reqs.restock(SKUS[*sku], *quantity),
                Op::Pause(sku) => self.reqs.pause(SKUS[*sku]),
                Op::Resume(sku) => self.reqs.resume(SKUS[*sku]),
                Op::PauseAll => self.reqs.pause_all(),
            };
            current.push(request);
        }
        batches.push((self.now, current));
        batches
    }

    fn resolve(&self, target: &Target) -> RequestId {
        match target {
            Target::Issued(i) if !self.issued.is_empty() => i.get(&self.issued).request_id,
            Target::Issued(_) => 0,
            Target::Random(id) => *id,
        }
    }
}

fn all_batches(ops: &[Op]) -> Vec<(i64, Vec<Request>)> {
    let (mut script, setup) = Script::start();
    let mut batches = vec![setup];
    batches.extend(script.batches(ops));
    batches
}

/// A check that does not need the model: every `(user, key)` keeps answering its first recorded
/// outcome to the same request, and key reuse to a different one.
#[derive(Default)]
struct IdempotencyLedger {
    first: BTreeMap<(String, String), (String, u32, Outcome)>,
}

impl IdempotencyLedger {
    fn check(&mut self, requests: &[Request], out: &BatchOutput) {
        for (request, outcome) in requests.iter().zip(&out.outcomes) {
            let Command::Reserve {
                sku,
                user_id,
                quantity,
                idempotency_key,
            } = &request.command
            else {
                continue;
            };
            let k = (user_id.clone(), idempotency_key.clone());
            match self.first.get(&k) {
                None => {
                    assert_ne!(*outcome, rejected(Reject::IdempotencyKeyReused));
                    // Input errors are answered but not recorded: the key stays free.
                    let input_error = [Reject::UnknownSku, Reject::InvalidCommand]
                        .map(rejected)
                        .contains(outcome);
                    if !input_error {
                        self.first
                            .insert(k, (sku.clone(), *quantity, outcome.clone()));
                    }
                }
                Some((s, q, first)) if s == sku && q == quantity => {
                    assert_eq!(outcome, first, "{k:?} answered differently");
                }
                Some(_) => assert_eq!(*outcome, rejected(Reject::IdempotencyKeyReused)),
            }
        }
    }
}

fn assert_same_state(engine: &mut Engine, model: &Model, ids: &[RequestId]) {
    assert_eq!(engine.clock_ms(), model.clock_ms());
    assert_eq!(engine.batch_seq(), model.batch_seq());
    let views: Vec<SkuView> = engine.skus().collect();
    assert_eq!(views, model.sku_views());
    for v in &views {
        assert_eq!(v.available + v.held + v.sold, v.total, "{v:?}");
        assert_eq!(v.total, v.config.total_stock);
    }
    for &id in ids {
        assert_eq!(
            engine.reservation(id),
            model.reservation(id),
            "reservation {id}"
        );
    }
    assert_eq!(engine.next_expiry_ms(), model.next_expiry_ms());
}

/// Every id a request in `batches` used or pointed at.
fn ids_in(batches: &[(i64, Vec<Request>)]) -> Vec<RequestId> {
    let mut ids: Vec<RequestId> = batches
        .iter()
        .flat_map(|(_, b)| b)
        .flat_map(|r| match r.command {
            Command::Confirm { reservation_id } | Command::Cancel { reservation_id } => {
                vec![r.request_id, reservation_id]
            }
            _ => vec![r.request_id],
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Rebuilds what Postgres would hold after `history` (the batches and what the engine said
/// about them): one row per decision, moved on by the transitions.
fn snapshot_of(engine: &Engine, history: &[(Vec<Request>, BatchOutput)]) -> Snapshot {
    let mut decisions: Vec<StoredDecision> = Vec::new();
    let mut granted: BTreeMap<RequestId, usize> = BTreeMap::new();
    for (requests, out) in history {
        for d in &out.decisions {
            let request = &requests[d.command_index as usize];
            assert_eq!(request.request_id, d.request_id);
            let Command::Reserve {
                sku,
                user_id,
                quantity,
                idempotency_key,
            } = &request.command
            else {
                panic!("decision for a command that is not a reserve: {request:?}");
            };
            let (status, expires_at_ms) = match d.result {
                Ok(expires_at_ms) => {
                    let clash = granted.insert(d.request_id, decisions.len());
                    assert!(clash.is_none(), "two grants with id {}", d.request_id);
                    (Ok(ReservationStatus::Held), expires_at_ms)
                }
                Err(reason) => (Err(reason), 0),
            };
            decisions.push(StoredDecision {
                request_id: d.request_id,
                user_id: user_id.clone(),
                idempotency_key: idempotency_key.clone(),
                sku: sku.clone(),
                quantity: *quantity,
                status,
                expires_at_ms,
            });
        }
        for t in &out.transitions {
            let row = &mut decisions[granted[&t.reservation_id]];
            assert_eq!(
                row.status,
                Ok(ReservationStatus::Held),
                "{t:?} leaves a non-held row"
            );
            row.status = Ok(t.status);
        }
    }
    // The rows agree with what the engine shows.
    for (&id, &i) in &granted {
        let view = engine
            .reservation(id)
            .expect("granted reservation is visible");
        let row = &decisions[i];
        assert_eq!(row.status, Ok(view.status));
        assert_eq!(
            (
                row.sku.as_str(),
                row.user_id.as_str(),
                row.quantity,
                row.expires_at_ms
            ),
            (
                view.sku.as_str(),
                view.user_id.as_str(),
                view.quantity,
                view.expires_at_ms
            )
        );
    }
    Snapshot {
        batch_seq: engine.batch_seq(),
        clock_ms: engine.clock_ms(),
        skus: engine.skus().collect(),
        decisions,
    }
}

/// Applies `batches` to `engine`, keeping each batch's requests with what it decided.
fn record_batches(
    engine: &mut Engine,
    batches: &[(i64, Vec<Request>)],
) -> Vec<(Vec<Request>, BatchOutput)> {
    batches
        .iter()
        .map(|(now, requests)| (requests.clone(), engine.apply_batch(*now, requests)))
        .collect()
}

/// A new engine that has applied `batches`, and its history (see [`record_batches`]).
fn run_recording(batches: &[(i64, Vec<Request>)]) -> (Engine, Vec<(Vec<Request>, BatchOutput)>) {
    let mut engine = Engine::new();
    let history = record_batches(&mut engine, batches);
    (engine, history)
}

fn proptest_config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures are reported with the shrunk case; no regression files in the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(proptest_config(1024))]

    #[test]
    fn engine_agrees_with_model_after_every_batch(ops in ops(200)) {
        let batches = all_batches(&ops);
        let ids = ids_in(&batches);
        let mut engine = Engine::new();
        let mut model = Model::new();
        let mut ledger = IdempotencyLedger::default();
        for (now, requests) in &batches {
            let got = engine.apply_batch(*now, requests);
            let want = model.apply_batch(*now, requests);
            prop_assert_eq!(&got, &want, "batch at {} of {:?}", now, requests);
            engine.check_invariants();
            ledger.check(requests, &got);
            assert_same_state(&mut engine, &model, &ids);
        }
    }

}

proptest! {
    #![proptest_config(proptest_config(256))]

    #[test]
    fn same_stream_gives_same_outputs(ops in ops(200)) {
        let batches = all_batches(&ops);
        let mut first = Engine::new();
        let mut second = Engine::new();
        for (now, requests) in &batches {
            let a = first.apply_batch(*now, requests);
            let b = second.apply_batch(*now, requests);
            prop_assert_eq!(a, b);
        }
        for id in ids_in(&batches) {
            prop_assert_eq!(first.reservation(id), second.reservation(id));
        }
        prop_assert_eq!(first.skus().collect::<Vec<_>>(), second.skus().collect::<Vec<_>>());
    }

    #[test]
    fn restored_engine_continues_exactly_like_the_original(
        before in ops(120),
        after in ops(120),
    ) {
        let (mut script, setup) = Script::start();
        let mut first_part = vec![setup];
        first_part.extend(script.batches(&before));
        let second_part = script.batches(&after);

        let (mut original, history) = run_recording(&first_part);
        let snapshot = snapshot_of(&original, &history);
        let mut restored = Engine::restore(snapshot).expect("a real snapshot restores");
        restored.check_invariants();
        let mut all = first_part;
        all.extend(second_part.iter().cloned());
        assert_continue_alike(&mut original, &mut restored, &second_part, &ids_in(&all))?;
    }
}

// ---- the hash indexes, holdings and restore of the arena layout -------------------------------
//
// The engine keeps users, idempotency keys and request ids in insert-only indexes keyed by 32-bit
// hashes. These tests search for real 32-bit collisions of the engine's own hashes (a birthday
// search, so they keep working if the hash function changes) and pin down that equal hashes are
// never mistaken for equal keys, plus the edges of the holdings kept in the user row.

use super::Hashes;

/// Two different values of `make(0..)` whose `hash` is equal: a birthday search.
fn colliding<T: Clone + PartialEq + std::fmt::Debug>(
    make: impl Fn(u32) -> T,
    hash: impl Fn(&T) -> u32,
) -> (T, T) {
    let mut seen: std::collections::HashMap<u32, T> = std::collections::HashMap::new();
    for i in 0..4_000_000 {
        let value = make(i);
        if let Some(earlier) = seen.insert(hash(&value), value.clone()) {
            assert_ne!(earlier, value);
            return (earlier, value);
        }
    }
    panic!("no 32-bit collision found");
}

/// Runs the batches through the engine and the naive model and insists they agree on every
/// output and on every reservation and SKU afterwards; returns the engine's outputs.
fn agree_with_model(batches: &[(i64, Vec<Request>)]) -> (Engine, Vec<BatchOutput>) {
    let mut engine = Engine::new();
    let mut model = Model::new();
    let mut outs = Vec::new();
    for (now, requests) in batches {
        let got = engine.apply_batch(*now, requests);
        let want = model.apply_batch(*now, requests);
        assert_eq!(got, want, "batch at {now} of {requests:?}");
        engine.check_invariants();
        outs.push(got);
    }
    let ids = ids_in(batches);
    assert_same_state(&mut engine, &model, &ids);
    (engine, outs)
}

fn held(reservation_id: RequestId, expires_at_ms: i64) -> Outcome {
    Outcome::Held {
        reservation_id,
        expires_at_ms,
    }
}

#[test]
fn users_whose_ids_share_a_32_bit_hash_are_told_apart() {
    let (a, b) = colliding(|i| format!("user-{i}"), |u| Hashes::new(0, u, "").user);
    let mut sale = Sale::with_sku("tv", config(10, 2, 1_000));
    let ra = sale.hold(T0, "tv", &a, 2, "k");
    // Not a repeat of a's key, and not counted against a's limit.
    let rb = sale.hold(T0, "tv", &b, 2, "k");
    assert_ne!(ra, rb);
    assert_eq!(
        sale.reserve(T0, "tv", &a, 1, "k2"),
        rejected(Reject::LimitExceeded)
    );
    assert_eq!(sale.reserve(T0, "tv", &b, 2, "k"), held(rb, T0 + 1_000));
    assert_eq!(sale.reserve(T0, "tv", &a, 2, "k"), held(ra, T0 + 1_000));
    assert_eq!(sale.engine.reservation(ra).unwrap().user_id, a);
    assert_eq!(sale.engine.reservation(rb).unwrap().user_id, b);
    // Releasing b's hold frees b's limit only.
    assert!(matches!(sale.cancel(T0, rb), Outcome::Reservation(_)));
    assert_eq!(
        sale.reserve(T0, "tv", &a, 1, "k3"),
        rejected(Reject::LimitExceeded)
    );
    sale.hold(T0, "tv", &b, 1, "k3");
}

#[test]
fn same_key_of_users_whose_key_hashes_collide_is_not_a_repeat() {
    // Different users, the same key string, the same 32-bit (user, key) hash.
    let (a, b) = colliding(|i| format!("buyer-{i}"), |u| Hashes::new(0, u, "kk").key);
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let ra = sale.hold(T0, "tv", &a, 1, "kk");
    // Another quantity: a repeat of a's key would be IdempotencyKeyReused.
    let rb = sale.hold(T0, "tv", &b, 2, "kk");
    assert_ne!(ra, rb);
    assert_eq!(sale.counters("tv"), (7, 3, 0));
    assert_eq!(sale.reserve(T0, "tv", &a, 1, "kk"), held(ra, T0 + 1_000));
    assert_eq!(sale.reserve(T0, "tv", &b, 2, "kk"), held(rb, T0 + 1_000));
}

#[test]
fn keys_of_one_user_sharing_a_32_bit_hash_are_told_apart() {
    let (k1, k2) = colliding(|i| format!("key-{i}"), |k| Hashes::new(0, "ann", k).key);
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    sale.engine.apply_batch(T0, &[]);
    let r1 = sale.hold(T0, "tv", "ann", 1, &k1);
    // A different quantity under the colliding key: a new decision, not a reuse of k1.
    let r2 = sale.hold(T0 + 10, "tv", "ann", 2, &k2);
    assert_ne!(r1, r2);
    assert_eq!(
        sale.reserve(T0 + 20, "tv", "ann", 1, &k1),
        held(r1, T0 + 1_000)
    );
    assert_eq!(
        sale.reserve(T0 + 20, "tv", "ann", 2, &k2),
        held(r2, T0 + 1_010)
    );
    assert_eq!(
        sale.reserve(T0 + 20, "tv", "ann", 2, &k1),
        rejected(Reject::IdempotencyKeyReused)
    );
}

#[test]
fn request_ids_sharing_a_32_bit_hash_are_told_apart() {
    let (id1, id2) = colliding(
        |i| RequestId::from(i) << 40 | 1,
        |&id| Hashes::new(id, "", "").request,
    );
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let mut a = sale.reqs.reserve("tv", "ann", 1, "k");
    a.request_id = id1;
    let mut b = sale.reqs.reserve("tv", "bob", 1, "k");
    b.request_id = id2;
    let out = sale.batch(T0, vec![a, b]);
    // The second id is not "already decided" just because its hash is.
    assert_eq!(
        out.outcomes,
        vec![held(id1, T0 + 1_000), held(id2, T0 + 1_000)]
    );
    assert!(matches!(sale.confirm(T0, id2), Outcome::Reservation(v) if v.user_id == "bob"));
    assert_eq!(sale.status(id1), ReservationStatus::Held);
    assert_eq!(sale.status(id2), ReservationStatus::Confirmed);
    assert!(matches!(sale.cancel(T0, id1), Outcome::Reservation(v) if v.user_id == "ann"));
    assert_eq!(sale.counters("tv"), (9, 0, 1));
    // And a refusal under an id whose hash is shared is still found as a decided id.
    let (id3, id4) = colliding(
        |i| RequestId::from(i) << 80 | 7,
        |&id| Hashes::new(id, "", "").request,
    );
    let mut c = sale.reqs.reserve("tv", "cat", 9, "k");
    c.request_id = id3;
    assert_eq!(
        sale.batch(T0, vec![c]).outcomes,
        vec![rejected(Reject::LimitExceeded)]
    );
    let mut d = sale.reqs.reserve("tv", "dan", 1, "k");
    d.request_id = id3;
    let mut e = sale.reqs.reserve("tv", "eve", 1, "k");
    e.request_id = id4;
    assert_eq!(
        sale.batch(T0, vec![d, e]).outcomes,
        vec![rejected(Reject::InvalidCommand), held(id4, T0 + 1_000)]
    );
}

#[test]
fn lookups_survive_index_growth_and_agree_with_the_model() {
    let mut reqs = Reqs::new();
    let mut batches = vec![(T0, vec![reqs.upsert("tv", config(10_000, 3, 60_000))])];
    // 3 000 users with two keys each, in batches of 500: every index grows many times, also in
    // the middle of a batch.
    let mut first = Vec::new();
    for chunk in 0..12 {
        let batch: Vec<Request> = (0..500)
            .map(|i| {
                let n = chunk * 500 + i;
                let r = reqs.reserve(
                    "tv",
                    &format!("u{}", n / 2),
                    1 + (n % 2) as u32,
                    &format!("k{}", n % 2),
                );
                first.push(r.clone());
                r
            })
            .collect();
        batches.push((T0 + 1 + chunk as i64, batch));
    }
    // Every request again (repeats), then every id under a fresh key (reused ids), then a
    // confirm of every other one.
    batches.push((T0 + 100, first.clone()));
    let reused: Vec<Request> = first
        .iter()
        .map(|r| Request {
            command: Command::Reserve {
                sku: "tv".into(),
                user_id: "new".into(),
                quantity: 1,
                idempotency_key: format!("fresh{}", r.request_id),
            },
            ..r.clone()
        })
        .collect();
    batches.push((T0 + 101, reused));
    let confirms = first
        .iter()
        .step_by(2)
        .map(|r| reqs.confirm(r.request_id))
        .collect();
    batches.push((T0 + 102, confirms));
    let (_, outs) = agree_with_model(&batches);
    let repeats = &outs[13].outcomes;
    assert!(repeats.iter().all(|o| matches!(o, Outcome::Held { .. })));
    assert!(outs[14]
        .outcomes
        .iter()
        .all(|o| *o == rejected(Reject::InvalidCommand)));
}

#[test]
fn edge_case_strings_are_distinct_keys() {
    let long_user = "u".repeat(128);
    let long_key = "k".repeat(128);
    let wide = "é".repeat(64); // 128 bytes, not ASCII
                               // Pairs whose concatenations collide ("a" + "bc" = "ab" + "c"): a refusal keeps its user id
                               // and key as one text, so the boundary between them must be kept exactly.
    let pairs: Vec<(String, String)> = vec![
        ("a".into(), "bcd".into()),
        ("ab".into(), "cd".into()),
        ("abc".into(), "d".into()),
        ("a".into(), "bc".into()),
        ("ab".into(), "c".into()),
        (long_user.clone(), long_key.clone()),
        (long_user.clone(), format!("{}j", "k".repeat(127))),
        (format!("{}v", "u".repeat(127)), long_key.clone()),
        (wide.clone(), wide.clone()),
        ("用户".into(), "キー".into()),
        ("ü".into(), "u".into()),
    ];
    // Once granted, once refused (a paused SKU): each pair twice in one batch (the second a
    // repeat), different quantities per pair so that mixing two pairs up would show as a key
    // reuse.
    for refused in [false, true] {
        let mut reqs = Reqs::new();
        let mut setup = vec![reqs.upsert("tv", config(1_000, 10, 60_000))];
        if refused {
            setup.push(reqs.with(Command::Pause { sku: "tv".into() }));
        }
        let mut batches = vec![(T0, setup)];
        let batch: Vec<Request> = pairs
            .iter()
            .enumerate()
            .flat_map(|(i, (u, k))| {
                let q = 1 + (i % 3) as u32;
                [reqs.reserve("tv", u, q, k), reqs.reserve("tv", u, q, k)]
            })
            .collect();
        batches.push((T0, batch));
        let (engine, outs) = agree_with_model(&batches);
        let outcomes = &outs[1].outcomes;
        for (i, (u, _)) in pairs.iter().enumerate() {
            let (first, again) = (&outcomes[2 * i], &outcomes[2 * i + 1]);
            assert_eq!(first, again, "pair {i}");
            if refused {
                assert_eq!(*first, rejected(Reject::SalePaused), "pair {i}");
                continue;
            }
            let Outcome::Held { reservation_id, .. } = first else {
                panic!("pair {i} not held: {first:?}");
            };
            assert_eq!(&engine.reservation(*reservation_id).unwrap().user_id, u);
        }
    }
}

/// Strings no ingress would send (empty, control characters, too long) from a foreign producer:
/// decided `InvalidCommand`, recorded nowhere, and the engine goes on.
#[test]
fn commands_with_strings_the_system_cannot_store_are_invalid_commands() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let bad: Vec<(&str, String, String)> = vec![
        ("tv", String::new(), "k".into()),
        ("tv", "u".into(), String::new()),
        ("tv", "a\0".into(), "k".into()),
        ("tv", "u".into(), "k\u{7f}".into()),
        ("tv", "\u{85}u".into(), "k".into()),
        ("tv", "u".repeat(129), "k".into()),
        ("tv", "u".into(), "k".repeat(129)),
        ("t v", "u".into(), "k".into()),
        ("", "u".into(), "k".into()),
    ];
    let requests: Vec<Request> = bad
        .iter()
        .map(|(sku, u, k)| sale.reqs.reserve(sku, u, 1, k))
        .collect();
    let out = sale.batch(T0, requests);
    assert!(out
        .outcomes
        .iter()
        .all(|o| *o == rejected(Reject::InvalidCommand)));
    assert!(out.decisions.is_empty());
    let far = SkuConfig {
        starts_at_ms: Some(i64::MAX),
        ..config(10, 5, 60_000)
    };
    let before = SkuConfig {
        starts_at_ms: Some(-1),
        ..config(10, 5, 60_000)
    };
    let upserts = vec![
        sale.reqs.upsert("far", far),
        sale.reqs.upsert("old", before),
    ];
    let out = sale.batch(T0 + 1, upserts);
    assert_eq!(
        out.outcomes,
        vec![
            rejected(Reject::InvalidCommand),
            rejected(Reject::InvalidCommand)
        ]
    );
    assert!(sale.engine.sku("far").is_none() && sale.engine.sku("old").is_none());
    sale.engine.check_invariants();
}

#[test]
fn repeated_granted_key_answers_the_original_hold_after_confirm_cancel_or_expiry() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let confirmed = sale.hold(T0, "tv", "ann", 1, "a");
    let cancelled = sale.hold(T0 + 1, "tv", "bob", 1, "b");
    let expired = sale.hold(T0 + 2, "tv", "cat", 1, "c");
    sale.confirm(T0 + 3, confirmed);
    sale.cancel(T0 + 3, cancelled);
    sale.batch(T0 + 5_000, vec![]);
    assert_eq!(sale.status(expired), ReservationStatus::Expired);
    let before = sale.counters("tv");
    assert_eq!(
        sale.reserve(T0 + 5_000, "tv", "ann", 1, "a"),
        held(confirmed, T0 + 1_000)
    );
    assert_eq!(
        sale.reserve(T0 + 5_000, "tv", "bob", 1, "b"),
        held(cancelled, T0 + 1_001)
    );
    assert_eq!(
        sale.reserve(T0 + 5_000, "tv", "cat", 1, "c"),
        held(expired, T0 + 1_002)
    );
    assert_eq!(
        sale.reserve(T0 + 5_000, "tv", "cat", 2, "c"),
        rejected(Reject::IdempotencyKeyReused)
    );
    assert_eq!(sale.counters("tv"), before);
}

#[test]
fn holdings_on_several_skus_are_counted_and_released_per_sku() {
    let mut reqs = Reqs::new();
    let mut batches = vec![(
        T0,
        vec![
            reqs.upsert("a", config(10, 2, 1_000)),
            reqs.upsert("b", config(10, 2, 1_000)),
            reqs.upsert("c", config(10, 2, 2_000)),
        ],
    )];
    // ann's first SKU is "a" (kept in the user row), then "b" and "c" (in the map).
    let a1 = reqs.reserve("a", "ann", 2, "1");
    let b1 = reqs.reserve("b", "ann", 2, "2");
    let c1 = reqs.reserve("c", "ann", 1, "3");
    let (ida, idb, idc) = (a1.request_id, b1.request_id, c1.request_id);
    batches.push((
        T0,
        vec![
            a1,
            b1,
            c1,
            reqs.reserve("a", "ann", 1, "4"), // limit on a
            reqs.reserve("b", "ann", 1, "5"), // limit on b
            reqs.reserve("c", "ann", 1, "6"), // c: 1 + 1 <= 2
            reqs.reserve("c", "ann", 1, "7"), // limit on c
        ],
    ));
    // Cancel b (map), confirm c's first hold (kept), then a expires (row).
    batches.push((T0 + 10, vec![reqs.cancel(idb), reqs.confirm(idc)]));
    batches.push((
        T0 + 20,
        vec![
            reqs.reserve("b", "ann", 2, "8"),  // b freed
            reqs.reserve("a", "ann", 1, "9"),  // a still held
            reqs.reserve("c", "ann", 1, "10"), // c: 1 sold + 1 held
        ],
    ));
    batches.push((
        T0 + 1_000,
        vec![
            reqs.reserve("a", "ann", 2, "11"), // a expired: freed
            reqs.reserve("b", "ann", 1, "12"), // b's hold of T0+20 still there
        ],
    ));
    let (engine, outs) = agree_with_model(&batches);
    assert_eq!(
        outs[1].outcomes[3..],
        [
            rejected(Reject::LimitExceeded),
            rejected(Reject::LimitExceeded),
            outs[1].outcomes[5].clone(),
            rejected(Reject::LimitExceeded)
        ]
    );
    assert!(matches!(outs[1].outcomes[5], Outcome::Held { .. }));
    assert!(matches!(outs[3].outcomes[0], Outcome::Held { .. }));
    assert_eq!(outs[3].outcomes[1], rejected(Reject::LimitExceeded));
    assert_eq!(outs[3].outcomes[2], rejected(Reject::LimitExceeded));
    assert_eq!(
        engine.reservation(ida).unwrap().status,
        ReservationStatus::Expired
    );
    assert!(matches!(outs[4].outcomes[0], Outcome::Held { .. }));
    assert_eq!(outs[4].outcomes[1], rejected(Reject::LimitExceeded));
    engine.check_invariants();
}

#[test]
fn restore_rebuilds_holdings_from_held_and_confirmed_rows_only() {
    let sku = |name: &str, held, sold| SkuView {
        sku: name.into(),
        total: 10,
        available: 10 - held - sold,
        held,
        sold,
        config: config(10, 3, 1_000),
        paused: false,
    };
    let row = |id, sku: &str, key: &str, quantity, status| StoredDecision {
        sku: sku.into(),
        ..stored(id, "ann", key, quantity, status, T0 + 1_000)
    };
    let snapshot = Snapshot {
        batch_seq: 3,
        clock_ms: T0,
        skus: vec![sku("a", 0, 0), sku("b", 2, 0), sku("c", 0, 1)],
        decisions: vec![
            // ann's first row is a cancelled one on "a": it must not count (nor pin "a" as the
            // SKU kept in the user row with units).
            row(1, "a", "1", 3, Ok(ReservationStatus::Cancelled)),
            row(2, "a", "2", 3, Ok(ReservationStatus::Expired)),
            row(3, "b", "3", 2, Ok(ReservationStatus::Held)),
            row(4, "c", "4", 1, Ok(ReservationStatus::Confirmed)),
            row(5, "c", "5", 3, Err(Reject::LimitExceeded)),
        ],
    };
    let mut engine = Engine::restore(snapshot).expect("valid snapshot");
    engine.check_invariants();
    let mut reqs = Reqs { next_id: 100 };
    let out = engine.apply_batch(
        T0 + 1,
        &[
            reqs.reserve("a", "ann", 3, "x"), // nothing counts on a
            reqs.reserve("b", "ann", 2, "y"), // 2 held + 2 > 3
            reqs.reserve("b", "ann", 1, "z"), // 2 held + 1 <= 3
            reqs.reserve("c", "ann", 3, "w"), // 1 sold + 3 > 3
            reqs.reserve("c", "ann", 3, "5"), // replay of the refusal
        ],
    );
    engine.check_invariants();
    assert!(matches!(out.outcomes[0], Outcome::Held { .. }));
    assert_eq!(out.outcomes[1], rejected(Reject::LimitExceeded));
    assert!(matches!(out.outcomes[2], Outcome::Held { .. }));
    assert_eq!(out.outcomes[3], rejected(Reject::LimitExceeded));
    assert_eq!(out.outcomes[4], rejected(Reject::LimitExceeded));
    // Expiry of the restored hold on b releases b's holding.
    let out = engine.apply_batch(T0 + 1_000, &[reqs.reserve("b", "ann", 2, "v")]);
    engine.check_invariants();
    assert_eq!(out.transitions.len(), 1);
    assert!(matches!(out.outcomes[0], Outcome::Held { .. }));
}

#[test]
fn restore_refuses_a_refusal_on_an_unknown_sku() {
    let mut snapshot = small_snapshot();
    let mut d = stored(5, "dan", "k1", 1, Err(Reject::SoldOut), 0);
    d.sku = "radio".into();
    snapshot.decisions.push(d);
    assert!(matches!(
        Engine::restore(snapshot),
        Err(RestoreError::UnknownSku { request_id: 5, sku }) if sku == "radio"
    ));
}

#[test]
fn restore_refuses_a_key_both_granted_and_refused() {
    for refusal_first in [false, true] {
        let mut snapshot = small_snapshot();
        // ann's k1 is the hold of row 1; add a refusal under the same key.
        let refusal = stored(5, "ann", "k1", 3, Err(Reject::SoldOut), 0);
        if refusal_first {
            snapshot.decisions.insert(0, refusal);
        } else {
            snapshot.decisions.push(refusal);
        }
        assert!(matches!(
            Engine::restore(snapshot),
            Err(RestoreError::DuplicateKey { user_id, key }) if user_id == "ann" && key == "k1"
        ));
    }
    // The same request id twice, once refused and once granted.
    let mut snapshot = small_snapshot();
    snapshot.decisions.push(stored(
        4,
        "dan",
        "k9",
        1,
        Ok(ReservationStatus::Cancelled),
        T0,
    ));
    assert!(matches!(
        Engine::restore(snapshot),
        Err(RestoreError::DuplicateRequestId { request_id: 4 })
    ));
}

#[test]
fn restored_refusal_id_cannot_be_reused() {
    let mut engine = Engine::restore(small_snapshot()).expect("valid snapshot");
    let mut reqs = Reqs { next_id: 100 };
    let mut reuse = reqs.reserve("tv", "dan", 1, "fresh");
    reuse.request_id = 4; // cat's refusal
    let out = engine.apply_batch(T0 + 200, &[reuse, reqs.confirm(4), reqs.cancel(4)]);
    assert_eq!(
        out.outcomes,
        vec![
            rejected(Reject::InvalidCommand),
            rejected(Reject::UnknownReservation),
            rejected(Reject::UnknownReservation)
        ]
    );
    assert!(out.decisions.is_empty());
    assert_eq!(engine.reservation(4), None);
    engine.check_invariants();
}

#[test]
fn commands_in_flight_in_the_prefetch_pipeline_are_decided_as_one_by_one() {
    // A user created by the first command and used again by the next ones (all inside the
    // pipeline's window), interleaved with settles of the holds just made.
    let mut reqs = Reqs::new();
    let setup = vec![
        reqs.upsert("tv", config(6, 3, 1_000)),
        reqs.upsert("pc", config(6, 3, 1_000)),
    ];
    let first = reqs.reserve("tv", "new", 1, "a");
    let first_id = first.request_id;
    let commands = vec![
        first.clone(),
        reqs.reserve("tv", "new", 1, "a"),
        reqs.reserve("tv", "new", 2, "a"),
        reqs.reserve("pc", "new", 3, "b"),
        reqs.confirm(first_id),
        reqs.reserve("tv", "new", 2, "c"),
        reqs.reserve("tv", "new", 1, "d"),
        reqs.cancel(first_id),
        reqs.reserve("tv", "other", 3, "a"),
        reqs.reserve("pc", "new", 1, "e"),
        reqs.reserve("tv", "new", 1, "a"),
        reqs.reserve("tv", "other", 3, "z"),
    ];
    let mut one_batch = Engine::new();
    one_batch.apply_batch(T0, &setup);
    let together = one_batch.apply_batch(T0 + 1, &commands);
    one_batch.check_invariants();
    let mut one_by_one = Engine::new();
    one_by_one.apply_batch(T0, &setup);
    let separately: Vec<Outcome> = commands
        .iter()
        .map(|c| {
            one_by_one
                .apply_batch(T0 + 1, std::slice::from_ref(c))
                .outcomes
                .remove(0)
        })
        .collect();
    assert_eq!(together.outcomes, separately);
    assert_eq!(together.outcomes[1], held(first_id, T0 + 1_001));
    assert_eq!(together.outcomes[2], rejected(Reject::IdempotencyKeyReused));
    assert_eq!(together.outcomes[6], rejected(Reject::LimitExceeded));
    agree_with_model(&[(T0, setup), (T0 + 1, commands)]);
}

#[test]
#[should_panic(expected = "drifted")]
fn check_invariants_catches_a_drifted_first_sku_holding() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    sale.hold(T0, "tv", "ann", 2, "k");
    sale.engine.users[0].units += 1;
    sale.engine.check_invariants();
}

#[test]
#[should_panic(expected = "holding missing")]
fn check_invariants_catches_a_missing_holding_on_a_further_sku() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let up = sale.reqs.upsert("pc", config(10, 5, 1_000));
    sale.one(T0, up);
    sale.hold(T0, "tv", "ann", 2, "k");
    sale.hold(T0, "pc", "ann", 1, "k2");
    sale.engine.more_holdings.clear();
    sale.engine.check_invariants();
}

#[test]
#[should_panic(expected = "not indexed by key")]
fn check_invariants_catches_a_decision_missing_from_the_key_index() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    sale.hold(T0, "tv", "ann", 2, "k");
    sale.engine.by_key.slots.iter_mut().for_each(|s| *s = 0);
    sale.engine.check_invariants();
}

#[test]
#[should_panic(expected = "held counter")]
fn check_invariants_catches_a_reservation_status_out_of_step_with_the_counters() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let id = sale.hold(T0, "tv", "ann", 2, "k");
    let row = sale.engine.reservation_row(id).unwrap();
    sale.engine.decisions[row as usize].status = Ok(ReservationStatus::Cancelled);
    sale.engine.check_invariants();
}

// ---- checkpoints ------------------------------------------------------------------------------
//
// A checkpoint is a chain of deltas and a head (see `checkpoint.rs`). Whatever the points at
// which deltas were cut, loading the chain must give an engine that behaves exactly like the
// original from then on; a chain that is broken, reordered or truncated must be refused.

use super::{CheckpointCursor, CheckpointError, CheckpointLoader};

/// Cuts a delta from `chain`'s end and returns the new end.
fn cut(engine: &Engine, chain: &mut Vec<Vec<u8>>, from: CheckpointCursor) -> CheckpointCursor {
    chain.push(engine.encode_delta(&from));
    engine.checkpoint_cursor()
}

fn load(chain: &[Vec<u8>], head: &[u8]) -> Result<Engine, CheckpointError> {
    let mut loader = CheckpointLoader::new();
    for delta in chain {
        loader.apply_delta(delta)?;
    }
    loader.finish(head)
}

/// Runs `second_part` on both engines and checks they answer alike, batch after batch.
fn assert_continue_alike(
    original: &mut Engine,
    loaded: &mut Engine,
    second_part: &[(i64, Vec<Request>)],
    ids: &[RequestId],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(loaded.batch_seq(), original.batch_seq());
    prop_assert_eq!(loaded.clock_ms(), original.clock_ms());
    prop_assert_eq!(
        loaded.skus().collect::<Vec<_>>(),
        original.skus().collect::<Vec<_>>()
    );
    prop_assert_eq!(loaded.next_expiry_ms(), original.next_expiry_ms());
    for (now, requests) in second_part {
        let a = original.apply_batch(*now, requests);
        let b = loaded.apply_batch(*now, requests);
        prop_assert_eq!(&a, &b, "batch at {} of {:?}", now, requests);
    }
    loaded.check_invariants();
    for &id in ids {
        prop_assert_eq!(original.reservation(id), loaded.reservation(id));
    }
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config(256))]

    #[test]
    fn a_checkpoint_chain_loads_an_engine_that_continues_exactly_like_the_original(
        before in ops(160),
        after in ops(80),
        cuts in proptest::collection::vec(any::<Index>(), 0..5),
    ) {
        let (mut script, setup) = Script::start();
        let mut first_part = vec![setup];
        first_part.extend(script.batches(&before));
        let second_part = script.batches(&after);
        let mut cut_after: Vec<usize> = cuts.iter().map(|i| i.index(first_part.len())).collect();
        cut_after.sort_unstable();

        let mut original = Engine::new();
        let mut chain = Vec::new();
        let mut end = CheckpointCursor::default();
        for (i, (now, requests)) in first_part.iter().enumerate() {
            original.apply_batch(*now, requests);
            for _ in cut_after.iter().filter(|&&c| c == i) {
                end = cut(&original, &mut chain, end);
            }
        }
        cut(&original, &mut chain, end);
        let head = original.encode_head();
        let mut loaded = load(&chain, &head).expect("a real chain loads");
        loaded.check_invariants();
        let mut all = first_part;
        all.extend(second_part.iter().cloned());
        assert_continue_alike(&mut original, &mut loaded, &second_part, &ids_in(&all))?;
    }

    /// An engine restored from rows knows where each grant ended up but not when, so a chain
    /// that ends among its restored grants must be started anew; one that ends after them can
    /// be continued.
    #[test]
    fn an_engine_restored_from_rows_continues_or_restarts_a_chain_correctly(
        before in ops(120),
        middle in ops(60),
        after in ops(60),
    ) {
        let (mut script, setup) = Script::start();
        let mut first_part = vec![setup];
        first_part.extend(script.batches(&before));
        let middle_part = script.batches(&middle);
        let second_part = script.batches(&after);

        let (mut original, mut history) = run_recording(&first_part);
        let mut chain = Vec::new();
        let old_end = cut(&original, &mut chain, CheckpointCursor::default());
        history.extend(record_batches(&mut original, &middle_part));
        let restored = Engine::restore(snapshot_of(&original, &history)).expect("restores");
        let continues = restored.can_continue_chain(&old_end);
        let head = restored.encode_head();
        if continues {
            cut(&restored, &mut chain, old_end);
        } else {
            prop_assert!(old_end.settled < restored.checkpoint_cursor().settled);
            chain = vec![restored.encode_delta(&CheckpointCursor::default())];
        }
        let mut loaded = load(&chain, &head).expect("a chain written by a restored engine loads");
        let mut all = first_part;
        all.extend(middle_part);
        all.extend(second_part.iter().cloned());
        let ids = ids_in(&all);
        assert_continue_alike(&mut original, &mut loaded, &second_part, &ids)?;
    }
}

/// A sale with holds, a confirm, a cancel, an expiry and refusals, cut into two deltas.
fn small_chain() -> (Engine, Vec<Vec<u8>>, Vec<u8>, [RequestId; 3]) {
    let mut sale = Sale::with_sku("tv", config(3, 2, 1_000));
    let ann = sale.reqs.reserve("tv", "ann", 2, "k1");
    let bob = sale.reqs.reserve("tv", "bob", 1, "k1");
    let cat = sale.reqs.reserve("tv", "cat", 1, "k1");
    let cat_id = cat.request_id;
    sale.batch(T0, vec![ann.clone(), bob.clone(), cat]);
    let mut chain = Vec::new();
    let end = cut(&sale.engine, &mut chain, CheckpointCursor::default());
    let confirm = sale.reqs.confirm(ann.request_id);
    let dan = sale.reqs.reserve("tv", "dan", 1, "k9");
    sale.batch(T0 + 10, vec![confirm, dan]);
    sale.batch(T0 + 2_000, vec![]); // bob's hold expires
    cut(&sale.engine, &mut chain, end);
    let head = sale.engine.encode_head();
    let ids = [ann.request_id, bob.request_id, cat_id];
    (sale.engine, chain, head, ids)
}

#[test]
fn a_checkpoint_keeps_settled_grants_and_refusals() {
    let (engine, chain, head, [ann, bob, cat]) = small_chain();
    let loaded = load(&chain, &head).expect("loads");
    loaded.check_invariants();
    assert_eq!(
        loaded.skus().collect::<Vec<_>>(),
        engine.skus().collect::<Vec<_>>()
    );
    assert_eq!(
        loaded.reservation(ann).unwrap().status,
        ReservationStatus::Confirmed
    );
    assert_eq!(
        loaded.reservation(bob).unwrap().status,
        ReservationStatus::Expired
    );
    assert_eq!(
        loaded.reservation(cat),
        None,
        "cat was refused: no reservation"
    );
    assert_eq!(loaded.checkpoint_cursor(), engine.checkpoint_cursor());
}

#[test]
fn a_checkpoint_with_a_delta_missing_or_reordered_is_refused() {
    let (_, chain, head, _) = small_chain();
    assert!(matches!(
        load(&chain[1..], &head),
        Err(CheckpointError::OutOfOrder { .. })
    ));
    let reordered = vec![chain[1].clone(), chain[0].clone()];
    assert!(matches!(
        load(&reordered, &head),
        Err(CheckpointError::OutOfOrder { .. })
    ));
    // Every delta present but the head is of another state.
    assert!(matches!(
        load(&chain[..1], &head),
        Err(CheckpointError::OutOfOrder { .. })
    ));
}

#[test]
fn a_truncated_or_padded_checkpoint_is_refused() {
    let (_, chain, head, _) = small_chain();
    for cut_at in [1, 40, chain[0].len() / 2, chain[0].len() - 1] {
        let truncated = vec![chain[0][..cut_at].to_vec(), chain[1].clone()];
        assert!(
            matches!(
                load(&truncated, &head),
                Err(CheckpointError::Malformed { .. })
            ),
            "truncated at {cut_at}"
        );
    }
    let mut padded = chain.clone();
    padded[1].push(0);
    assert!(matches!(
        load(&padded, &head),
        Err(CheckpointError::Malformed { .. })
    ));
    let mut head_padded = head.clone();
    head_padded.push(0);
    assert!(matches!(
        load(&chain, &head_padded),
        Err(CheckpointError::Malformed { .. })
    ));
}

#[test]
fn a_checkpoint_that_settles_a_refusal_is_refused() {
    let (_, mut chain, head, _) = small_chain();
    // The last five bytes of the second delta are its last settled entry (row u32, status u8);
    // point it at row 2, cat's refusal.
    let d = chain[1].len();
    chain[1][d - 5..d - 1].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        load(&chain, &head),
        Err(CheckpointError::BadSettle { row: 2 })
    ));
}

#[test]
fn a_checkpoint_whose_counters_disagree_with_its_rows_is_refused() {
    let (mut engine, chain, _, _) = small_chain();
    engine.skus[0].held += 1;
    engine.skus[0].available -= 1;
    let head = engine.encode_head();
    assert!(matches!(
        load(&chain, &head),
        Err(CheckpointError::Restore(
            RestoreError::CountersDisagree { .. }
        ))
    ));
}

// ---- refusals keep no user ----------------------------------------------------------------------

/// Nearly every buyer of a flash sale is refused and never comes back with a grant, so a refusal
/// creates no user row: it keeps its user id beside its key. The buyer's key must still replay
/// its refusal, also once the same buyer has become a user through a later grant.
#[test]
fn a_refusal_creates_no_user_and_its_key_still_replays_after_the_buyer_is_granted() {
    let mut sale = Sale::with_sku("tv", config(1, 1, 60_000));
    let ann = sale.reqs.reserve("tv", "ann", 1, "k1");
    let bob = sale.reqs.reserve("tv", "bob", 1, "k1");
    let out = sale.batch(T0, vec![ann, bob.clone()]);
    assert_eq!(out.outcomes[1], rejected(Reject::SoldOut));
    assert_eq!(sale.engine.users.len(), 1, "only ann, who was granted");

    let restock = sale.reqs.restock("tv", 1);
    let bob_again = sale.reqs.reserve("tv", "bob", 1, "k2");
    let out = sale.batch(T0 + 10, vec![restock, bob_again.clone()]);
    assert!(matches!(out.outcomes[1], Outcome::Held { .. }));
    assert_eq!(
        sale.engine.users.len(),
        2,
        "bob became a user with his grant"
    );

    let mut replay = bob.clone();
    replay.request_id = 999;
    let other_quantity = sale.reqs.reserve("tv", "bob", 2, "k1");
    let out = sale.batch(T0 + 20, vec![replay, other_quantity]);
    assert_eq!(
        out.outcomes,
        vec![
            rejected(Reject::SoldOut),
            rejected(Reject::IdempotencyKeyReused)
        ]
    );
    sale.engine.check_invariants();
}
