//! The arena layout: edge-case strings, holdings on several SKUs, refusals that keep no user,
//! and commands in flight in the prefetch pipeline.

use super::*;

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
    let far = starting_at(i64::MAX, config(10, 5, 60_000));
    let before = starting_at(-1, config(10, 5, 60_000));
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
    sale.refuses(
        T0 + 5_000,
        "tv",
        "cat",
        2,
        "c",
        Reject::IdempotencyKeyReused,
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

/// Room reserved up front (as the sequencer does at load) changes where rows live in memory,
/// never what is decided: the same batches give the same outputs and the same state.
#[test]
fn reserved_room_decides_exactly_as_a_growing_engine() {
    let mut reqs = Reqs::new();
    let mut batches = vec![(T0, vec![reqs.upsert("tv", config(500, 2, 60_000))])];
    for b in 0..20 {
        let batch = (0..250)
            .map(|i| {
                reqs.reserve(
                    "tv",
                    &format!("u{}", (b * 250 + i) % 700),
                    1,
                    &format!("k{b}-{i}"),
                )
            })
            .collect();
        batches.push((T0 + 1 + b as i64, batch));
    }
    let mut growing = Engine::new();
    let mut reserved = Engine::new();
    reserved.reserve_room(10_000);
    for (at, batch) in &batches {
        assert_eq!(
            growing.apply_batch(*at, batch),
            reserved.apply_batch(*at, batch)
        );
    }
    let start = crate::CheckpointCursor::default();
    assert_eq!(growing.encode_delta(&start), reserved.encode_delta(&start));
    assert_eq!(growing.encode_head(), reserved.encode_head());
    reserved.check_invariants();
}
