//! Checkpoints: a chain of deltas and a head loads an engine that continues like the original;
//! a broken chain is refused.

use super::*;

//
// A checkpoint is a chain of deltas and a head (see `checkpoint.rs`). Whatever the points at
// which deltas were cut, loading the chain must give an engine that behaves exactly like the
// original from then on; a chain that is broken, reordered or truncated must be refused.

use crate::{CheckpointCursor, CheckpointError, CheckpointLoader};

/// Cuts a delta from `chain`'s end and returns the new end.
fn cut(engine: &Engine, chain: &mut Vec<Vec<u8>>, from: CheckpointCursor) -> CheckpointCursor {
    chain.push(engine.encode_delta(&from));
    engine.checkpoint_cursor()
}

fn load(chain: &[Vec<u8>], head: &[u8]) -> Result<Engine, CheckpointError> {
    let mut loader = CheckpointLoader::new(0x9e37_79b9_7f4a_7c15);
    for delta in chain {
        loader.apply_delta(delta)?;
    }
    loader.finish(head)
}

proptest! {
    #![proptest_config(proptest_config(256))]

    #[test]
    fn a_checkpoint_chain_loads_an_engine_that_continues_exactly_like_the_original(
        before in ops(160),
        after in ops(80),
        cuts in proptest::collection::vec(any::<Index>(), 0..5),
    ) {
        let (mut script, first_part) = Script::start_with(&before);
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
        // Checkpoints do not carry admin keys or queues: the sequencer reads them from Postgres.
        loaded.restore_admin_keys(original.admin_keys());
        loaded.restore_queue(original.queued().cloned()).expect("the queues restore");
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
        let (mut script, first_part) = Script::start_with(&before);
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
        loaded.restore_admin_keys(restored.admin_keys());
        loaded.restore_queue(restored.queued().cloned()).expect("the queues restore");
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
