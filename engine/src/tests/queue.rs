//! The pre-sale queue: joining it, its limits, retries, and its decision at the sale's start.

use super::*;

/// The sale starts at `T0 + 10 s`; the queue opens at `T0` and holds `max` requests.
const STARTS: i64 = T0 + 10_000;

fn queued_sale(total_stock: u64, per_user_limit: u32, max: u32) -> Sale {
    let cfg = SkuConfig {
        starts_at_ms: Some(STARTS),
        queue: Some(QueueWindow {
            opens_at_ms: T0,
            max,
        }),
        ..config(total_stock, per_user_limit, 60_000)
    };
    Sale::with_sku("tee", cfg)
}

/// Reserves one unit of the queued SKU at `T0` and insists it queued; returns its id.
fn enqueue(sale: &mut Sale, user: &str, key: &str) -> RequestId {
    match sale.reserve(T0, "tee", user, 1, key) {
        Outcome::Queued { reservation_id, .. } => reservation_id,
        other => panic!("expected to queue, got {other:?}"),
    }
}

fn queued(reservation_id: RequestId, position: u32) -> Outcome {
    Outcome::Queued {
        reservation_id,
        position,
        starts_at_ms: STARTS,
    }
}

#[test]
fn reservations_before_the_start_queue_in_log_order_and_are_decided_first_at_the_start() {
    let mut sale = queued_sale(2, 1, 10);
    let early: Vec<Request> = ["ann", "bob", "cat"]
        .iter()
        .map(|u| sale.reqs.reserve("tee", u, 1, "k"))
        .collect();
    let ids: Vec<RequestId> = early.iter().map(|r| r.request_id).collect();
    let out = sale.batch(T0 + 1_000, early);
    assert_eq!(
        out.outcomes,
        vec![queued(ids[0], 0), queued(ids[1], 1), queued(ids[2], 2)]
    );
    assert!(out.decisions.is_empty(), "queued requests are not decided");
    assert_eq!(out.queued.len(), 3);
    assert_eq!(
        sale.counters("tee"),
        (2, 0, 0),
        "no stock moves while queued"
    );
    assert_eq!(sale.engine.queue_len("tee"), 3);
    assert_eq!(sale.engine.next_release_ms(), Some(STARTS));

    // The first batch at the start decides the queue, in order, before its own command.
    let late = sale.reqs.reserve("tee", "dan", 1, "k");
    let out = sale.batch(STARTS, vec![late]);
    assert_eq!(
        out.released,
        vec![
            Released {
                request_id: ids[0],
                result: Ok(STARTS + 60_000)
            },
            Released {
                request_id: ids[1],
                result: Ok(STARTS + 60_000)
            },
            Released {
                request_id: ids[2],
                result: Err(Reject::SoldOut)
            },
        ]
    );
    assert_eq!(
        out.outcomes,
        vec![rejected(Reject::SoldOut)],
        "dan came later"
    );
    assert_eq!(sale.counters("tee"), (0, 2, 0));
    assert_eq!(sale.status(ids[0]), ReservationStatus::Held);
    assert_eq!(sale.engine.queue_len("tee"), 0);
    assert_eq!(sale.engine.next_release_ms(), None);
}

#[test]
fn the_queue_is_bounded_and_a_buyer_queues_at_most_the_per_user_limit() {
    let mut sale = queued_sale(10, 2, 3);
    let ann = sale.reserve(T0, "tee", "ann", 2, "a1");
    assert!(matches!(ann, Outcome::Queued { position: 0, .. }));
    assert_eq!(
        sale.reserve(T0, "tee", "ann", 1, "a2"),
        rejected(Reject::LimitExceeded),
        "ann has 2 units queued, her limit"
    );
    sale.reserve(T0, "tee", "bob", 1, "b");
    sale.reserve(T0, "tee", "cat", 1, "c");
    assert_eq!(
        sale.reserve(T0, "tee", "dan", 1, "d"),
        rejected(Reject::QueueFull)
    );
    // Refusals are decisions like any other: recorded, so a retry gets the same answer.
    assert_eq!(
        sale.reserve(STARTS + 1, "tee", "dan", 1, "d"),
        rejected(Reject::QueueFull)
    );
}

#[test]
fn a_retry_of_a_queued_request_gets_its_place_and_then_its_decision() {
    let mut sale = queued_sale(1, 1, 10);
    let first = sale.reqs.reserve("tee", "ann", 1, "k");
    let id = first.request_id;
    assert_eq!(sale.one(T0, first), queued(id, 0));
    assert_eq!(sale.reserve(T0 + 5, "tee", "ann", 1, "k"), queued(id, 0));
    assert_eq!(
        sale.reserve(T0 + 6, "tee", "ann", 2, "k"),
        rejected(Reject::IdempotencyKeyReused),
        "another quantity under a queued key"
    );
    assert_eq!(
        sale.engine.queue_len("tee"),
        1,
        "retries do not queue again"
    );
    assert_eq!(
        sale.reserve(STARTS, "tee", "ann", 1, "k"),
        held(id, STARTS + 60_000),
        "decided at the start, first in the batch"
    );
}

#[test]
fn a_request_id_of_a_queued_request_cannot_be_taken_by_another_command() {
    let mut sale = queued_sale(5, 1, 10);
    let id = enqueue(&mut sale, "ann", "k");
    let reuse = sale.reqs.reserve_as(id, "tee", "bob", 1, "k2");
    assert_eq!(sale.one(T0, reuse), rejected(Reject::InvalidCommand));
}

#[test]
fn before_the_queue_opens_the_sale_has_not_started_and_a_paused_sku_queues_nothing() {
    let mut sale = queued_sale(5, 1, 10);
    let later = SkuConfig {
        queue: Some(QueueWindow {
            opens_at_ms: T0 + 1_000,
            max: 10,
        }),
        ..sale.sku("tee").config
    };
    let up = sale.reqs.upsert("tee", later);
    sale.one(T0, up);
    assert_eq!(
        sale.reserve(T0 + 999, "tee", "ann", 1, "k"),
        rejected(Reject::SaleNotStarted)
    );
    let pause = sale.reqs.pause("tee");
    sale.one(T0, pause);
    assert_eq!(
        sale.reserve(T0, "tee", "bob", 1, "k"),
        rejected(Reject::SalePaused)
    );
}

#[test]
fn a_paused_sku_keeps_its_queue_until_resumed() {
    let mut sale = queued_sale(5, 1, 10);
    let id = enqueue(&mut sale, "ann", "k");
    let pause = sale.reqs.pause("tee");
    sale.one(T0 + 1, pause);
    assert_eq!(
        sale.engine.next_release_ms(),
        None,
        "nothing due while paused"
    );
    let out = sale.batch(STARTS + 1_000, vec![]);
    assert!(out.released.is_empty());
    let resume = sale.reqs.resume("tee");
    sale.one(STARTS + 2_000, resume);
    assert_eq!(sale.engine.next_release_ms(), Some(STARTS));
    let out = sale.batch(STARTS + 2_001, vec![]);
    assert_eq!(
        out.released,
        vec![Released {
            request_id: id,
            result: Ok(STARTS + 2_001 + 60_000)
        }]
    );
}

#[test]
fn a_queue_window_must_open_before_a_start_and_hold_one_to_queue_max() {
    let mut sale = Sale::new();
    let window = |opens_at_ms: i64, max: u32, starts_at_ms: Option<i64>| SkuConfig {
        starts_at_ms,
        queue: Some(QueueWindow { opens_at_ms, max }),
        ..config(5, 1, 1_000)
    };
    for bad in [
        window(T0, 10, None),
        window(STARTS, 10, Some(STARTS)),
        window(T0, 0, Some(STARTS)),
        window(T0, QUEUE_MAX + 1, Some(STARTS)),
        window(-1, 10, Some(STARTS)),
    ] {
        let up = sale.reqs.upsert("tee", bad.clone());
        assert_eq!(
            sale.one(T0, up),
            rejected(Reject::InvalidCommand),
            "{bad:?}"
        );
    }
    let up = sale.reqs.upsert("tee", window(T0, QUEUE_MAX, Some(STARTS)));
    assert!(matches!(sale.one(T0, up), Outcome::Sku(_)));
}

#[test]
fn a_restored_engine_gets_its_queue_back_and_decides_it_alike() {
    let mut sale = queued_sale(1, 1, 10);
    for user in ["ann", "bob"] {
        sale.reserve(T0, "tee", user, 1, "k");
    }
    let snapshot = Snapshot {
        hash_seed: sale.engine.hash_seed(),
        batch_seq: sale.engine.batch_seq(),
        clock_ms: sale.engine.clock_ms(),
        skus: sale.engine.skus().collect(),
        decisions: Vec::new(),
        admin_keys: Vec::new(),
        queued: sale.engine.queued().cloned().collect(),
    };
    let mut restored = Engine::restore(snapshot.clone()).expect("restores");
    restored.check_invariants();
    assert_eq!(
        restored.queued().collect::<Vec<_>>(),
        sale.engine.queued().collect::<Vec<_>>()
    );
    assert_eq!(
        restored.apply_batch(STARTS, &[]),
        sale.engine.apply_batch(STARTS, &[])
    );
    let twice = Snapshot {
        queued: [snapshot.queued.clone(), snapshot.queued].concat(),
        ..Snapshot::default()
    };
    let result = Engine::restore(Snapshot {
        skus: snapshot.skus,
        ..twice
    });
    assert!(
        matches!(result, Err(RestoreError::DuplicateQueued { .. })),
        "{:?}",
        result.map(|_| ())
    );
}
