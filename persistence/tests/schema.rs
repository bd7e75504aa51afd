//! What the schema itself enforces, through the real batch writer on the real Postgres.

mod common;

use std::time::Duration;

use common::{fresh_database, take_lease};
use persistence::batch::{commit_batch, CommitError};
use persistence::{audit, lease, BatchRecord, DecisionRow, TransitionRow};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use wire::{Reject, ReservationStatus, ReserveRef, SkuConfig, SkuView};

const LEASE: Duration = Duration::from_secs(30);

fn sku(held: u64) -> SkuView {
    SkuView {
        sku: "sku-1".into(),
        total: 10,
        available: 10 - held,
        held,
        sold: 0,
        config: SkuConfig {
            total_stock: 10,
            per_user_limit: 5,
            hold_ttl_ms: 60_000,
            starts_at_ms: None,
            ends_at_ms: None,
            queue: None,
        },
        paused: false,
    }
}

/// Batch `seq` deciding the single command at offset `seq - 1`: request `seq` of buyer-1 for one
/// unit of sku-1 under `key`, with `result`.
fn batch(
    epoch: u64,
    seq: u64,
    key: &str,
    result: Result<i64, Reject>,
    skus: Vec<SkuView>,
) -> BatchRecord<'_> {
    let d = DecisionRow {
        request: ReserveRef {
            request_id: u128::from(seq),
            user_id: "buyer-1",
            idempotency_key: key,
            sku: "sku-1",
            quantity: 1,
        },
        result,
        request_offset: seq as i64 - 1,
    };
    BatchRecord {
        epoch,
        batch_seq: seq,
        first_offset: seq as i64 - 1,
        next_offset: seq as i64,
        batch_time_ms: 1_700_000_000_000 + seq as i64,
        lease: LEASE,
        decisions: vec![d],
        transitions: vec![],
        skus,
        admin_keys: vec![],
        queued: vec![],
        released: vec![],
        outbox: vec![],
    }
}

/// The audit reported a violation containing `needle`.
fn assert_violation(report: &audit::AuditReport, needle: &str) {
    assert!(
        report.violations.iter().any(|v| v.contains(needle)),
        "expected a violation with {needle:?}: {:?}",
        report.violations
    );
}

async fn writer(name: &str) -> (PgPool, u64) {
    let url = fresh_database(name).await;
    let pool = persistence::connect_writer(&url, 2, LEASE).await.unwrap();
    let epoch = take_lease(&pool, "test", LEASE).await;
    (pool, epoch)
}

/// A writer whose batch 1 held one unit of sku-1 for buyer-1 under key `k` (reservation 1).
async fn writer_after_one_grant(name: &str) -> (PgPool, PoolConnection<Postgres>, u64) {
    let (pool, epoch) = writer(name).await;
    let mut conn = pool.acquire().await.unwrap();
    let grant = batch(epoch, 1, "k", Ok(1_700_000_060_000), vec![sku(1)]);
    commit_batch(&mut conn, &grant).await.unwrap();
    (pool, conn, epoch)
}

#[tokio::test]
async fn postgres_refuses_a_second_reservation_under_one_idempotency_key() {
    let (pool, mut conn, epoch) = writer_after_one_grant("twice_held").await;

    // A buggy writer granting the same key again: the whole batch is refused.
    let second = batch(epoch, 2, "k", Ok(1_700_000_060_001), vec![sku(2)]);
    match commit_batch(&mut conn, &second).await {
        Err(CommitError::Database(sqlx::Error::Database(e))) => {
            assert_eq!(e.code().as_deref(), Some("23505"), "{e}");
            assert_eq!(e.constraint(), Some("one_reservation_per_idempotency_key"));
        }
        other => panic!("expected a unique violation, got {other:?}"),
    }
    let state = lease::read_state(&pool).await.unwrap();
    assert_eq!(
        (state.next_offset, state.batch_seq),
        (1, 1),
        "nothing of the refused batch was written"
    );
    let (rows, held): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM reservations), (SELECT held FROM skus)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((rows, held), (1, 1));
}

#[tokio::test]
async fn a_refusal_decided_twice_is_reported_by_the_audit() {
    // Refusals are outside the partial unique index (they hold no stock); a second decision of
    // the same key is the engine's to prevent, and the audit's to find.
    let (pool, epoch) = writer("twice_refused").await;
    let mut conn = pool.acquire().await.unwrap();
    let first = batch(epoch, 1, "k", Err(Reject::SoldOut), vec![sku(0)]);
    commit_batch(&mut conn, &first).await.unwrap();
    let clean = audit::run(&pool).await.unwrap();
    assert!(clean.is_clean(), "{:?}", clean.violations);

    let second = batch(epoch, 2, "k", Err(Reject::SoldOut), vec![]);
    commit_batch(&mut conn, &second).await.unwrap();
    let report = audit::run(&pool).await.unwrap();
    assert_violation(&report, "user buyer-1 key k decided 2 times");
}

/// Refusals are one `refusals` row of arrays per batch, not a row each; a load streams them back
/// merged with the grants in decision order, and the audit reads both.
#[tokio::test]
async fn refusals_are_one_row_per_batch_and_load_back_in_decision_order() {
    let (pool, epoch) = writer("compact_refusals").await;
    let mut conn = pool.acquire().await.unwrap();
    // Batch 1 decides offsets 0..3: a refusal, a grant, a refusal.
    let mut record = batch(epoch, 1, "a", Err(Reject::SoldOut), vec![sku(1)]);
    record.next_offset = 3;
    for (id, key, result) in [
        (2, "b", Ok(1_700_000_060_000)),
        (3, "c", Err(Reject::LimitExceeded)),
    ] {
        let mut d = record.decisions[0].clone();
        (d.request.request_id, d.request.idempotency_key, d.result) = (id, key, result);
        d.request_offset = id as i64 - 1;
        record.decisions.push(d);
    }
    commit_batch(&mut conn, &record).await.unwrap();

    let (rows, refusal_rows, refused): (i64, i64, i32) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM reservations), (SELECT count(*) FROM refusals),
                (SELECT cardinality(request_ids) FROM refusals WHERE batch_seq = 1)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((rows, refusal_rows, refused), (1, 1, 2));

    let (_, loaded) = persistence::snapshot::stream_rows(
        &pool,
        |_, _| Ok(Vec::new()),
        |all: &mut Vec<(u128, String, Result<&'static str, &'static str>)>, d| {
            let status = d.status.map(|s| s.as_str()).map_err(|r| r.code());
            all.push((d.request_id, d.idempotency_key.clone(), status));
            Ok(())
        },
    )
    .await
    .unwrap();
    assert_eq!(
        loaded,
        vec![
            (1, "a".to_owned(), Err("sold_out")),
            (2, "b".to_owned(), Ok("held")),
            (3, "c".to_owned(), Err("limit_exceeded")),
        ]
    );
    let report = audit::run(&pool).await.unwrap();
    assert!(report.is_clean(), "{:?}", report.violations);
    assert_eq!(report.reservations, 3, "the audit counts every decision");

    // Refusals whose batch never committed are found.
    sqlx::query(
        "INSERT INTO refusals VALUES (7, '{00000000-0000-0000-0000-000000000009}', '{u}', '{k}',
                                      '{sku-1}', '{1}', '{sold_out}', '{9}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let report = audit::run(&pool).await.unwrap();
    assert_violation(&report, "refusals of batch 7 (1 of them) have no batch row");
}

/// A batch held up inside its transaction (here by a lock on `reservations`, as a slow migration
/// or a long `VACUUM FULL` would) keeps its lease: the standby that tries to take the lapsed
/// lease meanwhile waits on the state row the batch has locked, and then finds the lease
/// extended by the commit. A renewal that queued behind the batch does not shorten it.
#[tokio::test]
async fn a_batch_held_up_by_a_lock_keeps_the_lease_and_the_standby_waits() {
    let (pool, epoch) = writer("lease_through_lock").await;
    let short = Duration::from_millis(800);
    // The lease as the last renewal left it: 800 ms from now.
    sqlx::query(
        "UPDATE sequencer_state SET lease_expires_at = clock_timestamp() + interval '800 ms'",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The locker and the standby on connections of their own (the writer's pool has two).
    let other = PgPool::connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let mut locker = other.begin().await.unwrap();
    sqlx::query("LOCK TABLE reservations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let writing = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let mut record = batch(epoch, 1, "k", Ok(1_700_000_060_000), vec![sku(1)]);
            record.lease = short;
            commit_batch(&mut conn, &record).await
        }
    });
    // Past the lease as it stood, a standby tries to take it; it queues on the state row.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let standby = tokio::spawn({
        let other = other.clone();
        async move { lease::try_acquire(&other, "standby", short).await }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!writing.is_finished(), "the batch waits for the lock");
    locker.commit().await.unwrap();
    writing.await.unwrap().expect("the held-up batch commits");
    assert!(
        standby.await.unwrap().unwrap().is_none(),
        "the standby must find the lease extended by the commit, not lapsed"
    );
    assert!(lease::renew(&pool, epoch, Duration::from_millis(1))
        .await
        .unwrap());
    let state = lease::read_state(&pool).await.unwrap();
    assert_eq!((state.epoch, state.batch_seq), (epoch, 1));
    assert!(
        state.lease_remaining_ms > 300,
        "a short renewal queued behind the batch must not shorten its lease: {} ms left",
        state.lease_remaining_ms
    );
}

/// A move out of `held` is applied with its event in one statement; a move of a reservation that
/// is no longer `held` means the engine and Postgres disagree, and refuses the whole batch.
#[tokio::test]
async fn a_transition_moves_a_held_reservation_with_its_event_and_refuses_any_other() {
    let (pool, mut conn, epoch) = writer_after_one_grant("transitions").await;

    let mut sold = sku(0);
    (sold.available, sold.sold) = (9, 1);
    let mut confirm = batch(epoch, 2, "unused", Err(Reject::SoldOut), vec![sold]);
    confirm.decisions.clear();
    confirm.transitions = vec![TransitionRow {
        reservation_id: 1,
        status: ReservationStatus::Confirmed,
        at_ms: 1_700_000_000_500,
    }];
    commit_batch(&mut conn, &confirm).await.unwrap();
    let events = || {
        sqlx::query_as::<_, (String, String, i64)>(
            "SELECT reservation_id::text, status, batch_seq FROM reservation_events",
        )
        .fetch_all(&pool)
    };
    let one_event = vec![(uuid::Uuid::from_u128(1).to_string(), "confirmed".into(), 2)];
    assert_eq!(events().await.unwrap(), one_event);

    // The engine believing it is still held: the batch is refused, nothing of it is written.
    let mut cancel = batch(epoch, 3, "unused", Err(Reject::SoldOut), vec![]);
    cancel.decisions.clear();
    cancel.transitions = vec![TransitionRow {
        reservation_id: 1,
        status: ReservationStatus::Cancelled,
        at_ms: 1_700_000_000_900,
    }];
    match commit_batch(&mut conn, &cancel).await {
        Err(CommitError::Inconsistent { batch_seq: 3, what }) => {
            assert!(what.contains("expected 1, Postgres reports 0"), "{what}");
        }
        other => panic!("expected the batch refused as inconsistent, got {other:?}"),
    }
    let state = lease::read_state(&pool).await.unwrap();
    assert_eq!((state.next_offset, state.batch_seq), (2, 2));
    assert_eq!(events().await.unwrap(), one_event);
    let status: String = sqlx::query_scalar("SELECT status FROM reservations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "confirmed");
}
