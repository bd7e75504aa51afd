//! The lease and the fence against the real Postgres (FLASH_PG_ADMIN_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres): each test makes its own database.

use std::time::{Duration, Instant};

use persistence::lease;
mod common;

use common::fresh_database;

#[tokio::test]
async fn a_writer_paused_inside_its_transaction_cannot_block_a_takeover() {
    let url = fresh_database("paused").await;
    let lease_len = Duration::from_millis(300);
    let old = persistence::connect_writer(&url, 2, lease_len)
        .await
        .unwrap();
    let new = persistence::connect_writer(&url, 2, lease_len)
        .await
        .unwrap();
    let taken = lease::try_acquire(&old, "old", lease_len)
        .await
        .unwrap()
        .expect("free lease");

    // The old leader runs its fence update (taking the row lock) and then goes silent, as a
    // process stopped between the fence and COMMIT does.
    let mut tx = old.begin().await.unwrap();
    sqlx::query("UPDATE sequencer_state SET next_offset = next_offset WHERE epoch = $1")
        .bind(taken.epoch as i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    let won = loop {
        // Ok(None) (lease still live) and lock-timeout errors alike mean: not yet.
        if let Ok(Some(state)) = lease::try_acquire(&new, "new", lease_len).await {
            break state;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the paused writer blocked the takeover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(won.epoch, taken.epoch + 1);
    // The paused writer wakes up: its transaction was aborted and cannot commit.
    assert!(
        tx.commit().await.is_err(),
        "the silent transaction was ended by Postgres"
    );
    assert!(
        !lease::renew(&old, taken.epoch, lease_len).await.unwrap(),
        "the old epoch cannot renew"
    );
}

#[tokio::test]
async fn the_lease_is_taken_once_and_bumps_the_epoch_each_time() {
    let url = fresh_database("lease").await;
    let lease_len = Duration::from_millis(200);
    let a = persistence::connect_writer(&url, 1, lease_len)
        .await
        .unwrap();
    let b = persistence::connect_writer(&url, 1, lease_len)
        .await
        .unwrap();
    let first = lease::try_acquire(&a, "a", lease_len)
        .await
        .unwrap()
        .expect("free");
    assert_eq!(first.epoch, 1);
    assert!(
        lease::try_acquire(&b, "b", lease_len)
            .await
            .unwrap()
            .is_none(),
        "held by a"
    );
    assert!(lease::renew(&a, 1, lease_len).await.unwrap());
    assert!(lease::release(&a, 1).await.unwrap());
    let second = lease::try_acquire(&b, "b", lease_len)
        .await
        .unwrap()
        .expect("released");
    assert_eq!(second.epoch, 2);
    assert!(
        !lease::renew(&a, 1, lease_len).await.unwrap(),
        "a deposed epoch cannot renew"
    );
    let state = lease::read_state(&b).await.unwrap();
    assert_eq!((state.epoch, state.leader.as_deref()), (2, Some("b")));
}
