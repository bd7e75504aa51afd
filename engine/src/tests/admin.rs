//! The admin commands: upsert, restock, pause and resume, pause-all, sale windows.

use super::*;

#[test]
fn upsert_below_held_plus_sold_is_refused() {
    let (mut sale, a) = Sale::ann_holding(config(10, 5, 60_000), 3);
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
    let view = sale.sku_answer(
        T0,
        exact,
        "lowering to exactly the committed units is allowed",
    );
    assert_eq!(
        (view.total, view.available, view.held, view.sold),
        (5, 0, 2, 3)
    );
}

#[test]
fn upsert_of_existing_sku_keeps_counters_and_recomputes_available() {
    let (mut sale, _) = Sale::ann_holding(config(10, 5, 60_000), 3);
    let p = sale.reqs.pause("tv");
    sale.one(T0, p);
    let up = sale.reqs.upsert("tv", config(20, 2, 5_000));
    let view = sale.sku_answer(T0, up, "upsert refused");
    assert_eq!(
        (view.total, view.available, view.held, view.sold),
        (20, 17, 3, 0)
    );
    assert_eq!(view.config, config(20, 2, 5_000));
    assert!(view.paused, "an upsert does not resume a paused sku");
    // The new limit and TTL apply to new reservations (ann already holds 3 > 2).
    let r = sale.reqs.resume("tv");
    sale.one(T0, r);
    sale.refuses(T0, "tv", "ann", 1, "k2", Reject::LimitExceeded);
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
    let (mut sale, _) = Sale::ann_holding(config(2, 5, 60_000), 2);
    let r = sale.reqs.restock("tv", 3);
    let view = sale.sku_answer(T0, r, "restock refused");
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
    sale.refuses(T0, "tv", "ann", 1, "k1", Reject::SalePaused);
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
    let mut sale = Sale::with_skus(&[
        ("a", config(5, 5, 1_000)),
        ("b", config(5, 5, 1_000)),
        ("c", config(5, 5, 1_000)),
    ]);
    let p = sale.reqs.pause("b");
    sale.one(T0, p);
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
        sale.refuses(T0, sku, "ann", 1, sku, Reject::SalePaused);
    }
    let again = sale.reqs.pause_all();
    let out = sale.batch(T0, vec![again]);
    assert_eq!(out.outcomes, vec![Outcome::Frozen { skus_paused: 0 }]);
    assert!(out.skus.is_empty());
    // A sku created after the freeze is not paused by it.
    sale.add_sku("d", config(5, 5, 1_000));
    sale.hold(T0, "d", "ann", 1, "d");
}

#[test]
fn sale_window_is_enforced() {
    let window = starting_at(T0 + 1_000, ending_at(T0 + 2_000, config(10, 10, 60_000)));
    let mut sale = Sale::with_sku("tv", window);
    sale.refuses(T0 + 999, "tv", "ann", 1, "k1", Reject::SaleNotStarted);
    sale.hold(T0 + 1_000, "tv", "ann", 1, "k2");
    sale.hold(T0 + 1_999, "tv", "ann", 1, "k3");
    sale.refuses(T0 + 2_000, "tv", "ann", 1, "k4", Reject::SaleEnded);
    assert_eq!(sale.counters("tv"), (8, 2, 0));
}

#[test]
fn open_ended_sale_windows_apply_only_their_bound() {
    let mut sale = Sale::with_skus(&[
        ("starts", starting_at(T0 + 1_000, config(10, 10, 60_000))),
        ("ends", ending_at(T0 + 1_000, config(10, 10, 60_000))),
    ]);
    sale.refuses(T0, "starts", "ann", 1, "k1", Reject::SaleNotStarted);
    sale.hold(T0, "ends", "ann", 1, "k2");
    sale.hold(T0 + 1_000_000, "starts", "ann", 1, "k3");
    sale.refuses(T0 + 1_000_000, "ends", "ann", 1, "k4", Reject::SaleEnded);
}

#[test]
fn a_keyed_restock_retried_adds_its_units_once_and_answers_alike() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let first = sale.reqs.keyed_restock("restock-1", "tv", 5);
    let answer = sale.one(T0, first);
    assert_eq!(sale.sku("tv").total, 15);
    sale.hold(T0, "tv", "ann", 2, "k");
    // The retry, in a later batch and after the stock moved: the first answer, no units.
    let retry = sale.reqs.keyed_restock("restock-1", "tv", 5);
    assert_eq!(sale.one(T0 + 1, retry), answer);
    assert_eq!(sale.sku("tv").total, 15, "applied once per key");
    // Twice in one batch: once.
    let a = sale.reqs.keyed_restock("restock-2", "tv", 1);
    let b = sale.reqs.keyed_restock("restock-2", "tv", 1);
    let out = sale.batch(T0 + 2, vec![a, b]);
    assert_eq!(out.outcomes[0], out.outcomes[1]);
    assert_eq!(out.admin_keys.len(), 1, "one key stored");
    assert_eq!(sale.sku("tv").total, 16);
}

#[test]
fn another_command_under_a_used_admin_key_is_refused_and_changes_nothing() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let first = sale.reqs.keyed_restock("k", "tv", 5);
    sale.one(T0, first);
    let more = sale.reqs.keyed_restock("k", "tv", 6);
    assert_eq!(sale.one(T0, more), rejected(Reject::IdempotencyKeyReused));
    let pause = sale.reqs.pause("tv");
    let pause = sale.reqs.keyed("k", pause);
    assert_eq!(sale.one(T0, pause), rejected(Reject::IdempotencyKeyReused));
    let view = sale.sku("tv");
    assert_eq!((view.total, view.paused), (15, false));
}

#[test]
fn a_refused_keyed_command_leaves_its_key_free() {
    let mut sale = Sale::new();
    let early = sale.reqs.keyed_restock("k", "tv", 5);
    assert_eq!(sale.one(T0, early), rejected(Reject::UnknownSku));
    let create = sale.reqs.upsert("tv", config(10, 5, 60_000));
    sale.one(T0, create);
    let again = sale.reqs.keyed_restock("k", "tv", 5);
    let view = sale.sku_answer(T0, again, "the key was free");
    assert_eq!(view.total, 15);
}

#[test]
fn a_keyed_command_that_is_not_an_admin_command_is_invalid() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let reserve = sale.reqs.reserve("tv", "ann", 1, "k");
    let wrapped = sale.reqs.keyed("k", reserve);
    assert_eq!(sale.one(T0, wrapped), rejected(Reject::InvalidCommand));
    let freeze = sale.reqs.pause_all();
    let nested = sale.reqs.keyed("inner", freeze);
    let nested = sale.reqs.keyed("outer", nested);
    assert_eq!(sale.one(T0, nested), rejected(Reject::InvalidCommand));
    assert_eq!(sale.sku("tv").available, 10);
}

#[test]
fn a_restored_engine_knows_the_admin_keys_it_is_given() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 60_000));
    let first = sale.reqs.keyed_restock("restock-1", "tv", 5);
    let answer = sale.one(T0, first);
    let keys: Vec<_> = sale.engine.admin_keys().collect();
    assert_eq!(keys.len(), 1);
    let mut restored = Engine::new();
    let create = sale.reqs.upsert("tv", config(15, 5, 60_000));
    restored.apply_batch(T0, &[create]);
    restored.restore_admin_keys(keys);
    let retry = sale.reqs.keyed_restock("restock-1", "tv", 5);
    let out = restored.apply_batch(T0 + 1, &[retry]);
    assert_eq!(out.outcomes, vec![answer]);
    assert_eq!(restored.sku("tv").unwrap().total, 15);
}
