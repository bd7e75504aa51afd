//! The ops console's reads against the real Postgres: a page of SKUs by name, and the writer's
//! fence row.

use std::time::Duration;

use persistence::reads;
mod common;

use common::{fresh_database, take_lease};

#[tokio::test]
async fn skus_come_a_page_at_a_time_by_name_and_the_writer_from_the_fence_row() {
    let url = fresh_database("reads").await;
    let pool = persistence::connect(&url, 2).await.unwrap();

    // A fresh database: no leader yet, its lease lapsed long ago, no batch.
    let w = reads::writer(&pool).await.unwrap();
    assert_eq!((w.epoch, w.leader.as_deref(), w.batch_seq), (0, None, 0));
    assert!(w.lease_remaining_ms < -1_000_000, "{w:?}");
    assert_eq!(w.last_batch_age_ms, None);
    assert!(reads::skus(&pool, None, 10).await.unwrap().is_empty());

    for (sku, total) in [("c", 3), ("a", 1), ("b", 2)] {
        sqlx::query(
            "INSERT INTO skus (sku, total, available, held, sold, per_user_limit, hold_ttl_ms,
                               paused, updated_batch)
             VALUES ($1, $2, $2, 0, 0, 1, 1000, false, 0)",
        )
        .bind(sku)
        .bind(total)
        .execute(&pool)
        .await
        .unwrap();
    }
    let names = |page: Vec<wire::SkuView>| page.into_iter().map(|v| v.sku).collect::<Vec<_>>();
    assert_eq!(
        names(reads::skus(&pool, None, 2).await.unwrap()),
        ["a", "b"]
    );
    assert_eq!(
        names(reads::skus(&pool, Some("b"), 2).await.unwrap()),
        ["c"]
    );
    let b = &reads::skus(&pool, Some("a"), 1).await.unwrap()[0];
    assert_eq!((b.sku.as_str(), b.total, b.available), ("b", 2, 2));

    // A leader: its name, its epoch and a live lease.
    let epoch = take_lease(&pool, "seq-a", Duration::from_secs(5)).await;
    let w = reads::writer(&pool).await.unwrap();
    assert_eq!((w.epoch, w.leader.as_deref()), (epoch, Some("seq-a")));
    assert!((4_000..=5_000).contains(&w.lease_remaining_ms), "{w:?}");
}
