//! Reserve: the rules of a new reservation and its idempotency key.

use super::*;

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
    let (mut sale, _) = Sale::ann_holding(config(3, 5, 60_000), 2);
    sale.refuses(T0, "tv", "bob", 2, "k", Reject::SoldOut);
    assert_eq!(sale.counters("tv"), (1, 2, 0), "a refusal changes no stock");
    // Exactly the remaining unit is still sold.
    sale.hold(T0, "tv", "bob", 1, "k2");
    assert_eq!(sale.counters("tv"), (0, 3, 0));
    sale.refuses(T0, "tv", "cat", 1, "k", Reject::SoldOut);
}

#[test]
fn per_user_limit_counts_held_and_confirmed_units() {
    let mut sale = Sale::with_sku("tv", config(100, 3, 60_000));
    let first = sale.hold(T0, "tv", "ann", 2, "k1");
    assert!(matches!(sale.confirm(T0, first), Outcome::Reservation(_)));
    sale.hold(T0, "tv", "ann", 1, "k2");
    // 2 sold + 1 held + 1 > 3.
    sale.refuses(T0, "tv", "ann", 1, "k3", Reject::LimitExceeded);
    // A single request above the limit is refused too.
    sale.refuses(T0, "tv", "bob", 4, "k1", Reject::LimitExceeded);
    // The limit is per user: bob can still take all of his.
    sale.hold(T0, "tv", "bob", 3, "k2");
    assert_eq!(sale.counters("tv"), (94, 4, 2));
}

#[test]
fn per_user_limit_is_per_sku() {
    let mut sale = Sale::with_sku("tv", config(100, 1, 60_000));
    sale.add_sku("radio", config(100, 1, 60_000));
    sale.hold(T0, "tv", "ann", 1, "k1");
    sale.hold(T0, "radio", "ann", 1, "k2");
    sale.refuses(T0, "tv", "ann", 1, "k3", Reject::LimitExceeded);
}

#[test]
fn cancelled_and_expired_units_stop_counting_to_the_limit() {
    let mut sale = Sale::with_sku("tv", config(100, 2, 1_000));
    let a = sale.hold(T0, "tv", "ann", 2, "k1");
    sale.refuses(T0, "tv", "ann", 1, "k2", Reject::LimitExceeded);
    sale.cancel(T0, a);
    let b = sale.hold(T0 + 10, "tv", "ann", 2, "k3");
    sale.refuses(T0 + 10, "tv", "ann", 1, "k4", Reject::LimitExceeded);
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
    sale.add_sku("ghost", config(10, 2, 1_000));
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
    sale.refuses(T0, "tv", "ann", 0, "k", Reject::IdempotencyKeyReused);
}

#[test]
fn zero_or_oversized_quantity_is_an_invalid_command() {
    let mut sale = Sale::with_sku("tv", config(STOCK_MAX, QUANTITY_MAX, 1_000));
    sale.refuses(T0, "tv", "ann", 0, "k1", Reject::InvalidCommand);
    sale.refuses(
        T0,
        "tv",
        "ann",
        QUANTITY_MAX + 1,
        "k2",
        Reject::InvalidCommand,
    );
    sale.refuses(T0, "tv", "ann", u32::MAX, "k3", Reject::InvalidCommand);
    // The largest quantity is accepted.
    sale.hold(T0, "tv", "ann", QUANTITY_MAX, "k4");
    assert_eq!(sale.sku("tv").held, u64::from(QUANTITY_MAX));
}

#[test]
fn request_id_of_a_granted_reservation_cannot_be_reused_by_another_reserve() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let id = sale.hold(T0, "tv", "ann", 1, "k1");
    let reuse = sale.reqs.reserve_as(id, "tv", "bob", 1, "k1");
    assert_eq!(sale.one(T0, reuse), rejected(Reject::InvalidCommand));
    assert_eq!(sale.counters("tv"), (9, 1, 0));
    assert_eq!(sale.engine.reservation(id).unwrap().user_id, "ann");
}

#[test]
fn refusal_reasons_are_checked_in_documented_order() {
    let mut sale = Sale::new();
    let window = starting_at(T0 + 1_000, ending_at(T0 + 2_000, config(1, 1, 1_000)));
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
    sale.refuses(T0 + 1_000, "window", "bob", 2, "k", Reject::LimitExceeded);
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
    let (mut sale, a) = Sale::ann_holding(config(1, 5, 60_000), 1);
    sale.refuses(T0, "tv", "bob", 1, "k", Reject::SoldOut);
    sale.cancel(T0, a);
    sale.refuses(T0, "tv", "bob", 1, "k", Reject::SoldOut);
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
    sale.refuses(T0, "tv", "ann", 2, "k", Reject::IdempotencyKeyReused);
}

#[test]
fn same_key_different_sku_is_key_reused() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    sale.add_sku("radio", config(10, 5, 60_000));
    sale.hold(T0, "tv", "ann", 1, "k");
    sale.refuses(T0, "radio", "ann", 1, "k", Reject::IdempotencyKeyReused);
    assert_eq!(sale.counters("radio"), (10, 0, 0));
    // Also when the first use was a refusal, and for an unknown SKU.
    sale.refuses(T0, "tv", "bob", 9, "k", Reject::LimitExceeded);
    sale.refuses(T0, "ghost", "bob", 9, "k", Reject::IdempotencyKeyReused);
}

#[test]
fn same_key_for_different_users_is_independent() {
    let (mut sale, a) = Sale::ann_holding(config(10, 5, 60_000), 1);
    let b = sale.hold(T0, "tv", "bob", 2, "k");
    assert_ne!(a, b);
    assert_eq!(sale.counters("tv"), (7, 3, 0));
}
