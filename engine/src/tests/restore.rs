//! Restore from Postgres's rows, and decision rows never sharing a request id.

use super::*;

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
        hash_seed: 0x5eed,
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
        admin_keys: Vec::new(),
        queued: Vec::new(),
    }
}

/// Why [`small_snapshot`], changed by `change`, is refused.
fn refusal(change: impl FnOnce(&mut Snapshot)) -> RestoreError {
    let mut snapshot = small_snapshot();
    change(&mut snapshot);
    match Engine::restore(snapshot) {
        Ok(_) => panic!("the changed snapshot was restored"),
        Err(e) => e,
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
    // Still available + held + sold == total, but one unit more held than the rows say.
    match refusal(|s| s.skus = vec![tv_view(5, 4, 1)]) {
        RestoreError::CountersDisagree {
            sku,
            held_counter,
            sold_counter,
            held_rows,
            sold_rows,
        } => {
            assert_eq!(sku, "tv");
            assert_eq!((held_counter, sold_counter), (4, 1));
            assert_eq!((held_rows, sold_rows), (3, 1));
        }
        other => panic!("expected CountersDisagree, got {other:?}"),
    }
    let bob_cancelled = refusal(|s| s.decisions[1].status = Ok(ReservationStatus::Cancelled));
    assert!(matches!(
        bob_cancelled,
        RestoreError::CountersDisagree { sold_rows: 0, .. }
    ));
}

#[test]
fn restore_refuses_a_duplicate_idempotency_key() {
    let again = stored(5, "cat", "k1", 1, Err(Reject::SoldOut), 0);
    match refusal(|s| s.decisions.push(again)) {
        RestoreError::DuplicateKey { user_id, key } => {
            assert_eq!((user_id.as_str(), key.as_str()), ("cat", "k1"));
        }
        other => panic!("expected DuplicateKey, got {other:?}"),
    }
}

#[test]
fn restore_refuses_a_reservation_on_an_unknown_sku() {
    let mut d = stored(5, "dan", "k1", 1, Ok(ReservationStatus::Cancelled), T0);
    d.sku = "radio".into();
    assert!(matches!(
        refusal(|s| s.decisions.push(d)),
        RestoreError::UnknownSku { request_id: 5, .. }
    ));
}

#[test]
fn restore_refuses_a_broken_stock_invariant() {
    assert!(matches!(
        refusal(|s| s.skus = vec![tv_view(7, 3, 1)]),
        RestoreError::StockInvariant { .. }
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
    let dup = sale.reqs.reserve_as(ann_id, "tv", "bob", 1, "k1");
    rows(&sale.batch(T0, vec![dup]));
    // (b) The id of a refusal, reused under another key once stock is back: refused as invalid,
    // no second row.
    let cat = sale.reqs.reserve("tv", "cat", 1, "k1"); // sold out
    let cat_id = cat.request_id;
    rows(&sale.batch(T0, vec![cat]));
    let cancel = sale.reqs.cancel(ann_id);
    sale.batch(T0, vec![cancel]);
    let dup = sale.reqs.reserve_as(cat_id, "tv", "dan", 1, "k1");
    let out = sale.batch(T0, vec![dup]);
    assert_eq!(out.outcomes, vec![rejected(Reject::InvalidCommand)]);
    rows(&out);
}

#[test]
fn one_batch_never_writes_two_decision_rows_with_the_same_id() {
    let mut sale = Sale::with_sku("tv", config(0, 5, 60_000));
    let a = sale.reqs.reserve("tv", "ann", 1, "k1");
    let b = sale.reqs.reserve_as(a.request_id, "tv", "bob", 1, "k1");
    let out = sale.batch(T0, vec![a, b]);
    assert_eq!(
        out.outcomes,
        vec![rejected(Reject::SoldOut), rejected(Reject::InvalidCommand)]
    );
    let mut ids: Vec<_> = out.decisions.iter().map(|d| d.request_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), out.decisions.len(), "{:?}", out.decisions);
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
        hash_seed: u64::MAX,
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
        admin_keys: Vec::new(),
        queued: Vec::new(),
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
    let mut d = stored(5, "dan", "k1", 1, Err(Reject::SoldOut), 0);
    d.sku = "radio".into();
    assert!(matches!(
        refusal(|s| s.decisions.push(d)),
        RestoreError::UnknownSku { request_id: 5, sku } if sku == "radio"
    ));
}

#[test]
fn restore_refuses_a_key_both_granted_and_refused() {
    for refusal_first in [false, true] {
        // ann's k1 is the hold of row 1; add a refusal under the same key.
        let refused = stored(5, "ann", "k1", 3, Err(Reject::SoldOut), 0);
        let at = if refusal_first { 0 } else { 4 };
        assert!(matches!(
            refusal(|s| s.decisions.insert(at, refused)),
            RestoreError::DuplicateKey { user_id, key } if user_id == "ann" && key == "k1"
        ));
    }
    // The same request id twice, once refused and once granted.
    let granted = stored(4, "dan", "k9", 1, Ok(ReservationStatus::Cancelled), T0);
    assert!(matches!(
        refusal(|s| s.decisions.push(granted)),
        RestoreError::DuplicateRequestId { request_id: 4 }
    ));
}

#[test]
fn restored_refusal_id_cannot_be_reused() {
    let mut engine = Engine::restore(small_snapshot()).expect("valid snapshot");
    let mut reqs = Reqs { next_id: 100 };
    let reuse = reqs.reserve_as(4, "tv", "dan", 1, "fresh"); // cat's refusal
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
fn a_restored_engine_hashes_with_the_stored_seed() {
    let snapshot = small_snapshot();
    let engine = Engine::restore(snapshot.clone()).unwrap();
    assert_eq!(engine.hash_seed(), snapshot.hash_seed);
    engine.check_invariants();
}
