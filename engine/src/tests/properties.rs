//! Property tests: the engine agrees with the naive model, is deterministic, and a restored
//! engine continues exactly like the original.

use super::*;

proptest! {
    #![proptest_config(proptest_config(1024))]

    #[test]
    fn engine_agrees_with_model_after_every_batch(ops in ops(200)) {
        let batches = all_batches(&ops);
        let ids = ids_in(&batches);
        let mut engine = Engine::new();
        let mut model = Model::new();
        let mut ledger = IdempotencyLedger::default();
        for (now, requests) in &batches {
            let got = engine.apply_batch(*now, requests);
            let want = model.apply_batch(*now, requests);
            prop_assert_eq!(&got, &want, "batch at {} of {:?}", now, requests);
            engine.check_invariants();
            ledger.check(requests, &got);
            assert_same_state(&mut engine, &model, &ids);
        }
    }

}

proptest! {
    #![proptest_config(proptest_config(256))]

    /// Also with another hash seed: the seed changes where rows sit in the indexes, never a
    /// decision, so a leader and a standby agree whatever seed each was given.
    #[test]
    fn same_stream_gives_same_outputs(ops in ops(200), seed in any::<u64>()) {
        let batches = all_batches(&ops);
        let mut first = Engine::new();
        let mut second = Engine::with_hash_seed(seed);
        for (now, requests) in &batches {
            let a = first.apply_batch(*now, requests);
            let b = second.apply_batch(*now, requests);
            prop_assert_eq!(a, b);
        }
        for id in ids_in(&batches) {
            prop_assert_eq!(first.reservation(id), second.reservation(id));
        }
        prop_assert_eq!(first.skus().collect::<Vec<_>>(), second.skus().collect::<Vec<_>>());
    }

    #[test]
    fn restored_engine_continues_exactly_like_the_original(
        before in ops(120),
        after in ops(120),
    ) {
        let (mut script, first_part) = Script::start_with(&before);
        let second_part = script.batches(&after);

        let (mut original, history) = run_recording(&first_part);
        let snapshot = snapshot_of(&original, &history);
        let mut restored = Engine::restore(snapshot).expect("a real snapshot restores");
        restored.check_invariants();
        let mut all = first_part;
        all.extend(second_part.iter().cloned());
        assert_continue_alike(&mut original, &mut restored, &second_part, &ids_in(&all))?;
    }
}
