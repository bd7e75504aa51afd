//! The lease and the fence against the real Postgres (FLASH_PG_ADMIN_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres): each test makes its own database.

use std::time::{Duration, Instant};

use persistence::lease;
use sqlx::PgPool;
mod common;

use common::{fresh_database, take_lease};

/// Two writer pools of `size` connections on one database: two would-be leaders.
async fn two_writers(url: &str, size: u32, lease: Duration) -> (PgPool, PgPool) {
    let one = persistence::connect_writer(url, size, lease).await.unwrap();
    let other = persistence::connect_writer(url, size, lease).await.unwrap();
    (one, other)
}

#[tokio::test]
async fn a_writer_paused_inside_its_transaction_cannot_block_a_takeover() {
    let url = fresh_database("paused").await;
    let lease_len = Duration::from_millis(300);
    let (old, new) = two_writers(&url, 2, lease_len).await;
    let taken = take_lease(&old, "old", lease_len).await;

    // The old leader runs its fence update (taking the row lock) and then goes silent, as a
    // process stopped between the fence and COMMIT does.
    let mut tx = old.begin().await.unwrap();
    sqlx::query("UPDATE sequencer_state SET next_offset = next_offset WHERE epoch = $1")
        .bind(taken as i64)
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
    assert_eq!(won.epoch, taken + 1);
    // The paused writer wakes up: its transaction was aborted and cannot commit.
    assert!(
        tx.commit().await.is_err(),
        "the silent transaction was ended by Postgres"
    );
    assert!(
        !lease::renew(&old, taken, lease_len).await.unwrap(),
        "the old epoch cannot renew"
    );
}

#[tokio::test]
async fn the_lease_is_taken_once_and_bumps_the_epoch_each_time() {
    let url = fresh_database("lease").await;
    let lease_len = Duration::from_millis(200);
    let (a, b) = two_writers(&url, 1, lease_len).await;
    assert_eq!(take_lease(&a, "a", lease_len).await, 1);
    assert!(
        lease::try_acquire(&b, "b", lease_len)
            .await
            .unwrap()
            .is_none(),
        "held by a"
    );
    assert!(lease::renew(&a, 1, lease_len).await.unwrap());
    assert!(lease::release(&a, 1).await.unwrap());
    assert_eq!(take_lease(&b, "b", lease_len).await, 2, "released");
    assert!(
        !lease::renew(&a, 1, lease_len).await.unwrap(),
        "a deposed epoch cannot renew"
    );
    let state = lease::read_state(&b).await.unwrap();
    assert_eq!((state.epoch, state.leader.as_deref()), (2, Some("b")));
}

#[tokio::test]
async fn a_released_partition_waits_for_the_writer_that_asked_for_it_back() {
    let url = fresh_database("handback").await;
    let lease_len = Duration::from_millis(200);
    let (a, b) = two_writers(&url, 1, lease_len).await;
    assert!(
        lease::handback_asked(&a).await.unwrap().is_none(),
        "no request yet"
    );
    assert!(
        !lease::request_handback(&b, "b").await.unwrap(),
        "nothing to ask while no one leads"
    );
    let epoch = take_lease(&a, "a", lease_len).await;
    assert!(
        !lease::request_handback(&a, "a").await.unwrap(),
        "the leader does not ask itself"
    );
    assert!(lease::request_handback(&b, "b").await.unwrap());
    assert_eq!(
        lease::handback_asked(&a).await.unwrap().as_deref(),
        Some("b")
    );
    // The leader hands over; a third process cannot take the lease meanwhile, the asker can.
    assert!(lease::release(&a, epoch).await.unwrap());
    assert!(
        lease::try_acquire(&a, "c", lease_len)
            .await
            .unwrap()
            .is_none(),
        "left to the writer that asked"
    );
    assert_eq!(take_lease(&b, "b", lease_len).await, epoch + 1);
    assert!(
        lease::handback_asked(&b).await.unwrap().is_none(),
        "taking the lease ends the request"
    );
}

#[tokio::test]
async fn a_database_is_never_served_as_another_partition_once_it_holds_skus() {
    let url = fresh_database("claim").await;
    let pool = persistence::connect(&url, 1).await.unwrap();
    persistence::migrate(&pool).await.unwrap();
    // Empty: it may be claimed, and claimed again otherwise.
    persistence::layout::claim(&pool, 0, 1).await.unwrap();
    persistence::layout::claim(&pool, 2, 4).await.unwrap();
    sqlx::query(
        "INSERT INTO skus (sku, total, available, held, sold, per_user_limit, hold_ttl_ms,
                           paused, updated_batch)
         VALUES ('a', 1, 1, 0, 0, 1, 1000, false, 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    persistence::layout::claim(&pool, 2, 4).await.unwrap();
    for (partition, of) in [(1, 4), (2, 8), (0, 1)] {
        let refused = persistence::layout::claim(&pool, partition, of)
            .await
            .unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("holds partition 2 of a requests log with 4"),
            "{refused:#}"
        );
    }
}
