//! The hash indexes: real 32-bit collisions of the engine's own hashes are told apart.

use super::*;

//
// The engine keeps users, idempotency keys and request ids in insert-only indexes keyed by 32-bit
// hashes. These tests search for real 32-bit collisions of the engine's own hashes (a birthday
// search, so they keep working if the hash function changes) and pin down that equal hashes are
// never mistaken for equal keys, plus the edges of the holdings kept in the user row.

use crate::index::{HashKey, Hashes};

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

/// Users `a` and `b`, whose ids collide in the hash `which` picks from their hashes with `key`
/// (of the default seed), each hold on SKU "tv" (under `cfg`) with that key: a `quantities.0`
/// units, then b `quantities.1`. Two holds, two reservations.
fn colliding_holds(
    which: fn(Hashes) -> u32,
    cfg: SkuConfig,
    key: &str,
    quantities: (u32, u32),
) -> (Sale, (String, RequestId), (String, RequestId)) {
    let hash = |u: &String| which(HashKey::default().hashes(0, u, key));
    let (a, b) = colliding(|i| format!("user-{i}"), hash);
    let mut sale = Sale::with_sku("tv", cfg);
    let ra = sale.hold(T0, "tv", &a, quantities.0, key);
    let rb = sale.hold(T0, "tv", &b, quantities.1, key);
    assert_ne!(ra, rb);
    (sale, (a, ra), (b, rb))
}

#[test]
fn users_whose_ids_share_a_32_bit_hash_are_told_apart() {
    // b's hold is not a repeat of a's key, and not counted against a's limit.
    let (mut sale, (a, ra), (b, rb)) =
        colliding_holds(|h| h.user, config(10, 2, 1_000), "k", (2, 2));
    sale.refuses(T0, "tv", &a, 1, "k2", Reject::LimitExceeded);
    assert_eq!(sale.reserve(T0, "tv", &b, 2, "k"), held(rb, T0 + 1_000));
    assert_eq!(sale.reserve(T0, "tv", &a, 2, "k"), held(ra, T0 + 1_000));
    assert_eq!(sale.engine.reservation(ra).unwrap().user_id, a);
    assert_eq!(sale.engine.reservation(rb).unwrap().user_id, b);
    // Releasing b's hold frees b's limit only.
    assert!(matches!(sale.cancel(T0, rb), Outcome::Reservation(_)));
    sale.refuses(T0, "tv", &a, 1, "k3", Reject::LimitExceeded);
    sale.hold(T0, "tv", &b, 1, "k3");
}

#[test]
fn ids_crafted_to_collide_under_one_seed_do_not_collide_under_another() {
    // What a client who knew the hash could do: search ids whose hashes collide. Without the
    // seed (stored per database) the pairs found are worthless: under another seed they are
    // spread like any other ids.
    let known = HashKey::new(0);
    let pairs: Vec<(String, String)> = (0..3)
        .map(|round| {
            colliding(
                |i| format!("attacker-{round}-{i}"),
                |u| known.hashes(0, u, "").user,
            )
        })
        .collect();
    for seed in [1, 0x5eed, u64::MAX] {
        let secret = HashKey::new(seed);
        let still = pairs
            .iter()
            .filter(|(a, b)| secret.hashes(0, a, "").user == secret.hashes(0, b, "").user)
            .count();
        assert_eq!(still, 0, "seed {seed}: crafted collisions survive");
    }
    assert_ne!(known.user("same-id"), HashKey::new(7).user("same-id"));
    assert_eq!(
        HashKey::new(7).user("same-id"),
        HashKey::new(7).user("same-id")
    );
}

#[test]
fn same_key_of_users_whose_key_hashes_collide_is_not_a_repeat() {
    // Different users, the same key string, the same 32-bit (user, key) hash; b asks for
    // another quantity: a repeat of a's key would be IdempotencyKeyReused.
    let (mut sale, (a, ra), (b, rb)) =
        colliding_holds(|h| h.key, config(10, 5, 1_000), "kk", (1, 2));
    assert_eq!(sale.counters("tv"), (7, 3, 0));
    assert_eq!(sale.reserve(T0, "tv", &a, 1, "kk"), held(ra, T0 + 1_000));
    assert_eq!(sale.reserve(T0, "tv", &b, 2, "kk"), held(rb, T0 + 1_000));
}

#[test]
fn keys_of_one_user_sharing_a_32_bit_hash_are_told_apart() {
    let (k1, k2) = colliding(
        |i| format!("key-{i}"),
        |k| HashKey::default().hashes(0, "ann", k).key,
    );
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
    sale.refuses(T0 + 20, "tv", "ann", 2, &k1, Reject::IdempotencyKeyReused);
}

#[test]
fn request_ids_sharing_a_32_bit_hash_are_told_apart() {
    let (id1, id2) = colliding(
        |i| RequestId::from(i) << 40 | 1,
        |&id| HashKey::default().hashes(id, "", "").request,
    );
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    let a = sale.reqs.reserve_as(id1, "tv", "ann", 1, "k");
    let b = sale.reqs.reserve_as(id2, "tv", "bob", 1, "k");
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
        |&id| HashKey::default().hashes(id, "", "").request,
    );
    let c = sale.reqs.reserve_as(id3, "tv", "cat", 9, "k");
    assert_eq!(
        sale.batch(T0, vec![c]).outcomes,
        vec![rejected(Reject::LimitExceeded)]
    );
    let d = sale.reqs.reserve_as(id3, "tv", "dan", 1, "k");
    let e = sale.reqs.reserve_as(id4, "tv", "eve", 1, "k");
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
