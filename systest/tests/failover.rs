//! Two sequencer processes, one writer: takeover after SIGKILL, fencing of a paused leader that
//! wakes up, and graceful handover on SIGTERM, all under load, against the real Postgres and the
//! real broker. Takeover gaps are printed (measured), never asserted.

use std::time::Duration;

use systest::load::{epoch, now_ms, takeover_gap_ms, under_load, verify, UnderLoad};
use systest::{Options, Stack};

fn two_sequencers() -> Options {
    Options {
        sequencers: 2,
        outcome_timeout_ms: 4_000,
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_the_active_lets_the_standby_decide_with_nothing_lost() {
    let mut stack = Stack::start("failover_kill", two_sequencers())
        .await
        .unwrap();
    let UnderLoad {
        load,
        active,
        old_epoch,
    } = under_load(&stack, "hot", 2_500, 4_000, 64, 500)
        .await
        .unwrap();

    let killed_at = now_ms();
    stack.signal_sequencer(active, "KILL").unwrap();
    let gap = takeover_gap_ms(&stack, old_epoch, killed_at, Duration::from_secs(20))
        .await
        .unwrap();
    let standby = stack
        .wait_for_active(Duration::from_secs(10))
        .await
        .unwrap();
    assert_ne!(standby, active, "the other process took over");
    assert!(
        epoch(&stack).await.unwrap() > old_epoch,
        "takeover bumped the epoch"
    );
    // The killed process, restarted (as the supervisor in scripts/up does), rejoins as standby.
    stack.spawn_sequencer(active).unwrap();
    stack
        .wait_role(active, "standby", Duration::from_secs(30))
        .await
        .unwrap();
    let answers = load.wait().await;
    let verdict = verify(&stack, "hot", &answers).await.unwrap();
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
    let mut stack = Stack::start("failover_stop", two_sequencers())
        .await
        .unwrap();
    let UnderLoad {
        load,
        active,
        old_epoch,
    } = under_load(&stack, "hot", 100_000, 3_000, 32, 300)
        .await
        .unwrap();

    stack.signal_sequencer(active, "STOP").unwrap();
    let stopped_at = now_ms();
    let gap = takeover_gap_ms(&stack, old_epoch, stopped_at, Duration::from_secs(20))
        .await
        .unwrap();
    let new_epoch = epoch(&stack).await.unwrap();
    assert!(new_epoch > old_epoch);
    let last_old: i64 =
        sqlx::query_scalar("SELECT coalesce(max(batch_seq), 0) FROM batches WHERE epoch = $1")
            .bind(old_epoch)
            .fetch_one(&stack.pool)
            .await
            .unwrap();

    // Wake the old leader while the new one is deciding: its next commit or renewal must fail
    // its fence, and it must stop (exit code 3) without writing anything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.signal_sequencer(active, "CONT").unwrap();
    let code = stack
        .wait_sequencer_exit(active, Duration::from_secs(20))
        .unwrap();
    assert_eq!(
        code,
        Some(3),
        "the deposed leader stops writing and says so"
    );
    let answers = load.wait().await;

    let late_old: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batches WHERE epoch = $1 AND batch_seq > $2")
            .bind(old_epoch)
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
    let mut stack = Stack::start("failover_term", two_sequencers())
        .await
        .unwrap();
    let UnderLoad {
        load,
        active,
        old_epoch,
    } = under_load(&stack, "hot", 100_000, 3_000, 32, 300)
        .await
        .unwrap();

    let term_at = now_ms();
    stack.signal_sequencer(active, "TERM").unwrap();
    let code = stack
        .wait_sequencer_exit(active, Duration::from_secs(20))
        .unwrap();
    assert_eq!(code, Some(0), "graceful exit");
    let gap = takeover_gap_ms(&stack, old_epoch, term_at, Duration::from_secs(20))
        .await
        .unwrap();
    let answers = load.wait().await;
    let verdict = verify(&stack, "hot", &answers).await.unwrap();
    println!("handover gap after SIGTERM: {gap} ms; {verdict:?}");
    assert_eq!(
        (verdict.timed_out, verdict.errors_5xx),
        (0, 0),
        "planned handover answers every request"
    );
    assert_eq!(verdict.held, answers.len(), "every buyer got a unit");
}
