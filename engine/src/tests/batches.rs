//! Batches: batch time and sequence, and what a batch reports for persistence.

use super::*;

#[test]
fn batch_time_never_goes_backwards() {
    let mut sale = Sale::with_sku("tv", ending_at(T0 + 3_000, config(10, 10, 1_000)));
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
    sale.refuses(T0, "tv", "bob", 1, "k", Reject::SaleEnded);
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
