//! A slow database under load: a 2 s lock on the table every batch writes. The leader's batch
//! waits on it inside its transaction (its writer session's `lock_timeout` cancels the wait
//! after one lease and the batch is retried); renewals and the standby's attempts queue on the
//! state row meanwhile. Leadership must not move, nothing may be lost, and every buyer who
//! waited gets an answer.

use std::sync::atomic::Ordering;
use std::time::Duration;

use systest::load::{epoch, under_load, verify};
use systest::{Options, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_second_lock_under_load_keeps_the_leader_and_loses_nothing() {
    let options = Options::sequencers(2);
    let mut stack = Stack::start("slow_commit", options).await.unwrap();
    let under = under_load(&stack, "hot", 1_000, 2_000, 32, 200)
        .await
        .unwrap();
    let before = under.load.answered.load(Ordering::Relaxed);

    let mut locker = stack.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE batches IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    locker.commit().await.unwrap();

    let answers = under.load.wait().await;
    assert!(before < answers.len() as u64, "the load must span the lock");
    assert_eq!(
        epoch(&stack).await.unwrap(),
        under.old_epoch,
        "the leader kept its lease through the slow commit"
    );
    let exited = stack.exited_sequencers().unwrap();
    assert!(
        exited.is_empty(),
        "sequencers {exited:?} exited during the slow commit"
    );
    assert_eq!(
        stack.sequencer_status(under.active).await.unwrap()["role"],
        "active"
    );
    let verdict = verify(&stack, "hot", &answers).await.unwrap();
    println!("2 s lock under load: {verdict:?}");
    assert_eq!(stack.sku_row("hot").await.unwrap()["held"], 1_000);
}
