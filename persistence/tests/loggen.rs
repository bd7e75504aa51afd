//! Log generations: a rebase is one fenced transaction, and the audit understands generations.

mod common;

use std::time::Duration;

use common::{fresh_database, take_lease};
use persistence::batch::{commit_batch, CommitError};
use persistence::loggen::{self, RebaseError, RebaseRequest};
use persistence::{audit, lease, BatchRecord};
use sqlx::PgConnection;

const LEASE: Duration = Duration::from_secs(30);

/// An empty batch (expiry tick) covering `[first, next)`: offsets without decisions.
fn batch(epoch: u64, seq: u64, first: i64, next: i64) -> BatchRecord<'static> {
    BatchRecord {
        epoch,
        batch_seq: seq,
        first_offset: first,
        next_offset: next,
        batch_time_ms: 1_700_000_000_000 + seq as i64,
        lease: LEASE,
        decisions: vec![],
        transitions: vec![],
        skus: vec![],
        admin_keys: vec![],
        queued: vec![],
        released: vec![],
        outbox: vec![],
    }
}

/// Commits empty batches `(batch_seq, first, next)` under `epoch`, in order.
async fn commit_empty(conn: &mut PgConnection, epoch: u64, batches: &[(u64, i64, i64)]) {
    for &(seq, first, next) in batches {
        commit_batch(conn, &batch(epoch, seq, first, next))
            .await
            .unwrap();
    }
}

fn request(generation: i64, batch_seq: u64, next_offset: i64, base: i64) -> RebaseRequest {
    RebaseRequest {
        expected_generation: generation,
        expected_batch_seq: batch_seq,
        expected_next_offset: next_offset,
        topic: "requests".into(),
        topic_id: Some("new-id".into()),
        base_offset: base,
        reason: "test".into(),
    }
}

#[tokio::test]
async fn a_rebase_fences_the_old_writer_and_starts_a_generation_the_audit_accepts() {
    let url = fresh_database("rebase").await;
    let pool = persistence::connect_writer(&url, 2, LEASE).await.unwrap();
    let first = loggen::current(&pool).await.unwrap();
    assert_eq!(
        (first.generation, first.base_offset, first.first_batch_seq),
        (1, 0, 1)
    );
    let recorded = loggen::record_topic(&pool, 1, "requests", Some("old-id"))
        .await
        .unwrap();
    assert_eq!(recorded.topic_id.as_deref(), Some("old-id"));
    // Recorded once: a later observation does not overwrite it.
    let again = loggen::record_topic(&pool, 1, "requests", Some("other"))
        .await
        .unwrap();
    assert_eq!(again.topic_id.as_deref(), Some("old-id"));

    let epoch = take_lease(&pool, "old", LEASE).await;
    let mut conn = pool.acquire().await.unwrap();
    commit_empty(&mut conn, epoch, &[(1, 0, 10), (2, 10, 25)]).await;

    // The operator looked before batch 2: nothing changes.
    match loggen::rebase(&pool, &request(1, 1, 10, 0)).await {
        Err(RebaseError::Moved {
            batch_seq: 2,
            next_offset: 25,
            ..
        }) => {}
        other => panic!("expected Moved, got {other:?}"),
    }
    let rebased = loggen::rebase(&pool, &request(1, 2, 25, 3)).await.unwrap();
    assert_eq!(
        (
            rebased.generation,
            rebased.base_offset,
            rebased.first_batch_seq
        ),
        (2, 3, 3)
    );
    assert_eq!(rebased.previous_next_offset, Some(25));
    let state = lease::read_state(&pool).await.unwrap();
    assert_eq!(
        (state.epoch, state.next_offset, state.batch_seq),
        (epoch + 1, 3, 2)
    );
    assert!(
        state.lease_remaining_ms < 0,
        "the lease is free for the next leader"
    );
    // A generation without a batch yet is consistent.
    let report = audit::run(&pool).await.unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
    assert_eq!(report.log_generation, 2);

    // The writer of the old log is fenced, even at the offset it expected.
    match commit_batch(&mut conn, &batch(epoch, 3, 25, 30)).await {
        Err(CommitError::Fenced(_)) => {}
        other => panic!("expected the old writer fenced, got {other:?}"),
    }
    // A new leader continues at the base offset of the new log.
    let new_epoch = take_lease(&pool, "new", LEASE).await;
    commit_empty(&mut conn, new_epoch, &[(3, 3, 8), (4, 8, 9)]).await;
    let report = audit::run(&pool).await.unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
}

#[tokio::test]
async fn the_audit_finds_a_generation_that_does_not_start_at_its_base_offset() {
    let url = fresh_database("rebase_bad").await;
    let pool = persistence::connect_writer(&url, 2, LEASE).await.unwrap();
    let epoch = take_lease(&pool, "w", LEASE).await;
    let mut conn = pool.acquire().await.unwrap();
    commit_empty(&mut conn, epoch, &[(1, 0, 10)]).await;
    loggen::rebase(&pool, &request(1, 1, 10, 0)).await.unwrap();
    // A buggy writer skipping the new log's first offsets (the fence row is moved by hand to
    // let it through: the audit must still see it).
    sqlx::query("UPDATE sequencer_state SET next_offset = 4, epoch = epoch + 1")
        .execute(&pool)
        .await
        .unwrap();
    commit_empty(&mut conn, epoch + 2, &[(2, 4, 6)]).await;
    let report = audit::run(&pool).await.unwrap();
    assert!(
        report.violations.iter().any(|v| v.contains(
            "batch 2 (generation 2) starts at offset 4 but its generation starts at offset 0"
        )),
        "{:?}",
        report.violations
    );
}
