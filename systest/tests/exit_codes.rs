//! Exit codes that mean one thing each. 3 is only "deposed: another sequencer took over, this
//! one wrote nothing after", which a supervisor may restart as a standby. When Postgres refuses
//! a batch for an invariant (a CHECK violated: the oversell alarm), or the stored rows do not
//! add up, restarting into the same state would be wrong: that is 5, fatal.

use std::time::Duration;

use systest::{scalar, Options, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_by_a_database_constraint_exits_fatal_not_deposed() {
    let mut stack = Stack::start("fatalcheck", Options::default())
        .await
        .unwrap();
    stack.put_sku("c", 10, 5, 300.0).await.unwrap();
    // A constraint the engine does not know: its next counters break it, as a real oversell
    // would break no_oversell.
    sqlx::query("ALTER TABLE skus ADD CONSTRAINT test_never_below_nine CHECK (available >= 9)")
        .execute(&stack.pool)
        .await
        .unwrap();
    let (status, _) = stack.reserve("c", "u1", 1, "k1").await.unwrap();
    assert_eq!(status, 201, "9 left: still allowed");
    let (status, body) = stack.reserve("c", "u2", 1, "k2").await.unwrap();
    assert_eq!(
        status, 504,
        "never answered: the batch did not commit ({body})"
    );
    let code = stack
        .wait_sequencer_exit(0, Duration::from_secs(20))
        .unwrap();
    assert_eq!(code, Some(5), "fatal, not deposed (3) or a plain error (1)");
    let held = scalar(&stack, "SELECT held FROM skus WHERE sku = 'c'").await;
    assert_eq!(held, 1, "nothing of the refused batch was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_do_not_add_up_at_start_up_exit_fatal_instead_of_retrying_forever() {
    let mut stack = Stack::start("fatalload", Options::default()).await.unwrap();
    stack.put_sku("d", 10, 5, 300.0).await.unwrap();
    let (status, _) = stack.reserve("d", "u1", 1, "k1").await.unwrap();
    assert_eq!(status, 201);
    stack.signal_sequencer(0, "KILL").unwrap();
    // Counters that still add up to the total but disagree with the reservation rows, and no
    // checkpoint to start from: the start-up reads the rows and must refuse them.
    sqlx::query("UPDATE skus SET held = held + 1, available = available - 1 WHERE sku = 'd'")
        .execute(&stack.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM checkpoints")
        .execute(&stack.pool)
        .await
        .unwrap();
    stack.spawn_sequencer(0).unwrap();
    let code = stack
        .wait_sequencer_exit(0, Duration::from_secs(30))
        .unwrap();
    assert_eq!(code, Some(5));
}
