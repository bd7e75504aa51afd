//! Expiry, confirm and cancel: how a hold ends.

use super::*;

#[test]
fn expired_hold_returns_units_and_later_buyer_gets_them() {
    let (mut sale, a) = Sale::ann_holding(config(1, 1, 1_000), 1);
    sale.refuses(T0 + 999, "tv", "bob", 1, "k1", Reject::SoldOut);
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
    let (mut sale, a) = Sale::ann_holding(config(5, 5, 1_000), 2);
    let out = sale.batch(T0 + 5_000, vec![]);
    assert!(out.outcomes.is_empty());
    assert_eq!(out.transitions.len(), 1);
    assert_eq!(out.transitions[0].reservation_id, a);
    assert_eq!(out.skus, vec![sale.sku("tv")]);
    assert_eq!(sale.counters("tv"), (5, 0, 0));
}

#[test]
fn expiries_are_reported_earliest_first() {
    let mut sale = Sale::with_skus(&[("slow", config(5, 5, 3_000)), ("fast", config(5, 5, 1_000))]);
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
    let (mut sale, id) = Sale::ann_holding(config(10, 5, 60_000), 3);
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
    let (mut sale, id) = Sale::ann_holding(config(10, 5, 60_000), 3);
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
    let (mut sale, id) = Sale::ann_holding(config(10, 5, 60_000), 3);
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

/// Confirms or cancels a reservation (the two ways to settle a hold).
type Settle = fn(&mut Sale, i64, RequestId) -> Outcome;

#[test]
fn a_settled_reservation_refuses_to_be_settled_the_other_way() {
    // (settled by, then tried, refusal, status it keeps, counters it keeps)
    let cases = [
        (
            Sale::confirm as Settle,
            Sale::cancel as Settle,
            Reject::ReservationConfirmed,
            ReservationStatus::Confirmed,
            (7, 0, 3),
        ),
        (
            Sale::cancel as Settle,
            Sale::confirm as Settle,
            Reject::ReservationCancelled,
            ReservationStatus::Cancelled,
            (10, 0, 0),
        ),
    ];
    for (settle, other, refusal, status, counters) in cases {
        let (mut sale, id) = Sale::ann_holding(config(10, 5, 60_000), 3);
        settle(&mut sale, T0, id);
        assert_eq!(other(&mut sale, T0, id), rejected(refusal));
        assert_eq!(sale.status(id), status);
        assert_eq!(sale.counters("tv"), counters);
    }
}

#[test]
fn confirm_after_expiry_is_refused() {
    let (mut sale, id) = Sale::ann_holding(config(10, 5, 1_000), 3);
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
    let (mut sale, id) = Sale::ann_holding(config(10, 5, 1_000), 3);
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
    let mut sale = Sale::with_sku("tv", ending_at(T0 + 500, config(10, 5, 60_000)));
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
