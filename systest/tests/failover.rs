//! Two sequencer processes, one writer: takeover after SIGKILL, fencing of a paused leader that
//! wakes up, and graceful handover on SIGTERM, all under load, against the real Postgres and the
//! real broker. Takeover gaps are printed (measured), never asserted.

use std::time::Duration;

use systest::load::{
    epoch, now_ms, takeover_gap_ms, under_load, verify, Answer, Load, UnderLoad, Verdict,
};
use systest::{Options, Stack};

/// Two sequencers, and a load on "hot" (`stock` units, `count` buyers at `concurrency`) that has
/// `decided` decisions committed: the moment for the fault.
async fn under_load_on_two(
    test: &str,
    stock: u64,
    count: usize,
    concurrency: usize,
    decided: i64,
) -> (Stack, UnderLoad) {
    let options = Options::sequencers(2).with_outcome_timeout_ms(4_000);
    let stack = Stack::start(test, options).await.unwrap();
    let under = under_load(&stack, "hot", stock, count, concurrency, decided)
        .await
        .unwrap();
    (stack, under)
}

/// Waits for the load to end, then checks every answer against Postgres ([`verify`]).
async fn answers_verified(stack: &Stack, load: Load) -> (Vec<Answer>, Verdict) {
    let answers = load.wait().await;
    let verdict = verify(stack, "hot", &answers).await.unwrap();
    (answers, verdict)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_the_active_lets_the_standby_decide_with_nothing_lost() {
    let (mut stack, under) = under_load_on_two("failover_kill", 2_500, 4_000, 64, 500).await;

    let killed_at = now_ms();
    let standby = stack
        .kill_and_wait_active(under.active, Duration::from_secs(10))
        .await
        .unwrap();
    assert_ne!(standby, under.active, "the other process took over");
    let gap = takeover_gap_ms(&stack, under.old_epoch, killed_at, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        epoch(&stack).await.unwrap() > under.old_epoch,
        "takeover bumped the epoch"
    );
    // The killed process, restarted (as the supervisor in scripts/up does), rejoins as standby.
    stack.spawn_sequencer(under.active).unwrap();
    stack
        .wait_role(under.active, "standby", Duration::from_secs(30))
        .await
        .unwrap();
    let (_, verdict) = answers_verified(&stack, under.load).await;
    println!("takeover gap after SIGKILL: {gap} ms; {verdict:?}");
    assert_eq!(
        verdict.errors_5xx, 0,
        "no 5xx other than 504 outcome_unknown"
    );
    let row = stack.sku_row("hot").await.unwrap();
    assert_eq!(
        row["held"], 2_500,
        "4000 distinct buyers for 2500 units: all held, none oversold"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_that_wakes_after_takeover_is_fenced_and_commits_nothing() {
    let (mut stack, under) = under_load_on_two("failover_stop", 100_000, 3_000, 32, 300).await;

    stack.signal_sequencer(under.active, "STOP").unwrap();
    let stopped_at = now_ms();
    let gap = takeover_gap_ms(&stack, under.old_epoch, stopped_at, Duration::from_secs(20))
        .await
        .unwrap();
    let new_epoch = epoch(&stack).await.unwrap();
    assert!(new_epoch > under.old_epoch);
    let last_old: i64 =
        sqlx::query_scalar("SELECT coalesce(max(batch_seq), 0) FROM batches WHERE epoch = $1")
            .bind(under.old_epoch)
            .fetch_one(&stack.pool)
            .await
            .unwrap();

    // Wake the old leader while the new one is deciding: its next commit or renewal must fail
    // its fence, and it must stop (exit code 3) without writing anything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let code = stack
        .signal_and_wait_exit(under.active, "CONT", Duration::from_secs(20))
        .unwrap();
    assert_eq!(
        code,
        Some(3),
        "the deposed leader stops writing and says so"
    );
    let answers = under.load.wait().await;

    let late_old: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batches WHERE epoch = $1 AND batch_seq > $2")
            .bind(under.old_epoch)
            .bind(last_old)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(
        late_old, 0,
        "nothing committed under the old epoch after the takeover"
    );
    let interleaved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM batches b WHERE epoch < (SELECT max(epoch) FROM batches b2 WHERE b2.batch_seq < b.batch_seq)")
        .fetch_one(&stack.pool).await.unwrap();
    assert_eq!(
        interleaved, 0,
        "epochs never go backwards along the batch sequence"
    );
    let verdict = verify(&stack, "hot", &answers).await.unwrap();
    println!("takeover gap after SIGSTOP: {gap} ms; {verdict:?}");
    assert_eq!(verdict.errors_5xx, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_hands_over_to_the_standby_without_a_single_error() {
    let (mut stack, under) = under_load_on_two("failover_term", 100_000, 3_000, 32, 300).await;

    let term_at = now_ms();
    let code = stack
        .signal_and_wait_exit(under.active, "TERM", Duration::from_secs(20))
        .unwrap();
    assert_eq!(code, Some(0), "graceful exit");
    let gap = takeover_gap_ms(&stack, under.old_epoch, term_at, Duration::from_secs(20))
        .await
        .unwrap();
    let (answers, verdict) = answers_verified(&stack, under.load).await;
    println!("handover gap after SIGTERM: {gap} ms; {verdict:?}");
    assert_eq!(
        (verdict.timed_out, verdict.errors_5xx),
        (0, 0),
        "planned handover answers every request"
    );
    assert_eq!(verdict.held, answers.len(), "every buyer got a unit");
}
