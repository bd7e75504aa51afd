//! The invariant check catches a state that drifted.

use super::*;

#[test]
#[should_panic(expected = "drifted")]
fn check_invariants_catches_a_drifted_first_sku_holding() {
    let (mut sale, _) = Sale::ann_holding(config(10, 5, 1_000), 2);
    sale.engine.users[0].units += 1;
    sale.engine.check_invariants();
}

#[test]
#[should_panic(expected = "holding missing")]
fn check_invariants_catches_a_missing_holding_on_a_further_sku() {
    let mut sale = Sale::with_sku("tv", config(10, 5, 1_000));
    sale.add_sku("pc", config(10, 5, 1_000));
    sale.hold(T0, "tv", "ann", 2, "k");
    sale.hold(T0, "pc", "ann", 1, "k2");
    sale.engine.more_holdings.clear();
    sale.engine.check_invariants();
}

#[test]
#[should_panic(expected = "not indexed by key")]
fn check_invariants_catches_a_decision_missing_from_the_key_index() {
    let (mut sale, _) = Sale::ann_holding(config(10, 5, 1_000), 2);
    sale.engine.by_key.slots.iter_mut().for_each(|s| *s = 0);
    sale.engine.check_invariants();
}

#[test]
#[should_panic(expected = "held counter")]
fn check_invariants_catches_a_reservation_status_out_of_step_with_the_counters() {
    let (mut sale, id) = Sale::ann_holding(config(10, 5, 1_000), 2);
    let row = sale.engine.reservation_row(id).unwrap();
    sale.engine.decisions[row as usize].status = Ok(ReservationStatus::Cancelled);
    sale.engine.check_invariants();
}
