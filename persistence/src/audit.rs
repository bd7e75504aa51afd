//! The audit: re-checks every invariant from the rows alone, trusting nothing the sequencer
//! believes. Anyone can run it (`sequencer audit`); it exits non-zero on any violation.

use serde::Serialize;
use sqlx::{PgPool, Row};

#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    pub skus: i64,
    pub reservations: i64,
    pub batches: i64,
    pub committed_offset: i64,
    /// The batch of the checkpoint compared with the rows (by `sequencer audit`, which can load
    /// one), if any.
    pub checkpoint_batch_seq: Option<u64>,
    /// The current generation of the requests log (1 until a `rebase-log`).
    pub log_generation: i64,
    /// The partition of the requests log this database holds, and the partition count.
    pub partition: i32,
    pub partitions: i32,
    pub violations: Vec<String>,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The condition under which a `skus` row breaks the stock invariant: the counters do not add up
/// to the total, or one is negative. (The table's CHECK constraints forbid both.)
macro_rules! stock_broken {
    () => {
        "available + held + sold <> total OR available < 0 OR held < 0 OR sold < 0"
    };
}

/// How many SKUs break the stock invariant (see the first audit check).
pub async fn count_stock_broken(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(concat!("SELECT count(*) FROM skus WHERE ", stock_broken!()))
        .fetch_one(pool)
        .await
}

/// Each check is a query returning one human-readable line per violation.
const CHECKS: &[(&str, &str)] = &[
    (
        "stock counters",
        concat!(
            "SELECT format('sku %s: available %s + held %s + sold %s != total %s, or a counter is negative',
                           sku, available, held, sold, total)
               FROM skus WHERE ",
            stock_broken!()
        ),
    ),
    (
        "counters equal the decision rows",
        "SELECT format('sku %s: counters held %s / sold %s, rows held %s / sold %s',
                       s.sku, s.held, s.sold, coalesce(r.held, 0), coalesce(r.sold, 0))
           FROM skus s
           LEFT JOIN (SELECT sku,
                             sum(quantity) FILTER (WHERE status = 'held') AS held,
                             sum(quantity) FILTER (WHERE status = 'confirmed') AS sold
                        FROM reservations GROUP BY sku) r ON r.sku = s.sku
          WHERE s.held <> coalesce(r.held, 0) OR s.sold <> coalesce(r.sold, 0)",
    ),
    (
        "granted reservations name a known sku",
        "SELECT format('reservation %s holds %s units of unknown sku %s', reservation_id, quantity, sku)
           FROM reservations r
          WHERE status <> 'rejected' AND NOT EXISTS (SELECT 1 FROM skus s WHERE s.sku = r.sku)",
    ),
    (
        "queued requests are decided once, by the batch that released them",
        "SELECT format('queued request %s (released by batch %s) has %s', q.request_id,
                       coalesce(q.released_batch::text, 'none'),
                       CASE WHEN r.reservation_id IS NULL THEN 'no decision row'
                            ELSE format('a decision row of batch %s', r.batch_seq) END)
           FROM queued_requests q
           LEFT JOIN reservations r ON r.reservation_id = q.request_id
          WHERE (q.released_batch IS NULL) <> (r.reservation_id IS NULL)
             OR r.batch_seq <> q.released_batch",
    ),
    (
        "one decision per idempotency key",
        "SELECT format('user %s key %s decided %s times', user_id, idempotency_key, count(*))
           FROM decisions GROUP BY user_id, idempotency_key HAVING count(*) > 1",
    ),
    (
        "one decision per request id",
        "SELECT format('request %s decided %s times', reservation_id, count(*))
           FROM decisions GROUP BY reservation_id HAVING count(*) > 1",
    ),
    (
        "refusals belong to a committed batch",
        "SELECT format('refusals of batch %s (%s of them) have no batch row', f.batch_seq,
                       cardinality(f.request_ids))
           FROM refusals f
          WHERE NOT EXISTS (SELECT 1 FROM batches b WHERE b.batch_seq = f.batch_seq)",
    ),
    (
        "each offset decided once per log generation",
        "WITH g AS (SELECT generation, first_batch_seq,
                           lead(first_batch_seq) OVER (ORDER BY generation) AS next_first
                      FROM log_generations)
         SELECT format('generation %s offset %s decided %s times', g.generation, r.request_offset, count(*))
           FROM (SELECT r.request_offset, coalesce(q.queued_batch, r.batch_seq) AS read_in
                   FROM decisions r
                   LEFT JOIN queued_requests q ON q.request_id = r.reservation_id) r
           JOIN g ON r.read_in >= g.first_batch_seq AND (g.next_first IS NULL OR r.read_in < g.next_first)
          GROUP BY g.generation, r.request_offset HAVING count(*) > 1",
    ),
    (
        "log generations are ordered",
        "SELECT format('generation %s starts at batch %s, not after generation %s (batch %s)',
                       generation, first_batch_seq, prev_gen, prev_first)
           FROM (SELECT generation, first_batch_seq,
                        lag(generation) OVER w AS prev_gen, lag(first_batch_seq) OVER w AS prev_first
                   FROM log_generations WINDOW w AS (ORDER BY generation)) g
          WHERE (prev_gen IS NULL AND (generation <> 1 OR first_batch_seq <> 1))
             OR (prev_gen IS NOT NULL AND (generation <> prev_gen + 1 OR first_batch_seq <= prev_first))
         UNION ALL
         SELECT format('generation %s starts at batch %s, after the committed batch %s + 1',
                       g.generation, g.first_batch_seq, s.batch_seq)
           FROM log_generations g, sequencer_state s
          WHERE g.first_batch_seq > s.batch_seq + 1",
    ),
    (
        "batches are contiguous within a log generation",
        "WITH g AS (SELECT generation, first_batch_seq, base_offset,
                           lead(first_batch_seq) OVER (ORDER BY generation) AS next_first
                      FROM log_generations)
         SELECT format('batch %s (generation %s) starts at offset %s but %s',
                       batch_seq, generation, first_offset,
                       CASE WHEN batch_seq = first_batch_seq
                            THEN format('its generation starts at offset %s', base_offset)
                            ELSE format('batch %s ended at %s (seq gap or offset gap/overlap)', prev_seq, prev_next) END)
           FROM (SELECT b.batch_seq, b.first_offset, g.generation, g.first_batch_seq, g.base_offset,
                        lag(b.batch_seq) OVER w AS prev_seq, lag(b.next_offset) OVER w AS prev_next
                   FROM batches b
                   JOIN g ON b.batch_seq >= g.first_batch_seq AND (g.next_first IS NULL OR b.batch_seq < g.next_first)
                 WINDOW w AS (ORDER BY b.batch_seq)) b
          WHERE (prev_seq IS NOT NULL AND batch_seq <> prev_seq + 1)
             OR (batch_seq = first_batch_seq AND first_offset <> base_offset)
             OR (batch_seq <> first_batch_seq AND prev_seq IS NOT NULL AND first_offset <> prev_next)",
    ),
    (
        "the fence row matches the last batch",
        "SELECT format('sequencer_state says batch %s / offset %s, last batch is %s / %s (generation %s from batch %s at offset %s)',
                       s.batch_seq, s.next_offset, b.batch_seq, b.next_offset,
                       g.generation, g.first_batch_seq, g.base_offset)
           FROM sequencer_state s
           LEFT JOIN (SELECT batch_seq, next_offset FROM batches ORDER BY batch_seq DESC LIMIT 1) b ON true
           JOIN (SELECT * FROM log_generations ORDER BY generation DESC LIMIT 1) g ON true
          WHERE s.batch_seq <> coalesce(b.batch_seq, 0)
             OR (b.batch_seq >= g.first_batch_seq AND s.next_offset <> b.next_offset)
             -- a generation without a batch yet: the fence row sits at its base offset
             OR (coalesce(b.batch_seq, 0) < g.first_batch_seq AND s.next_offset <> g.base_offset)",
    ),
    (
        "decisions lie inside their batch (a queued request's: inside the batch that queued it)",
        "SELECT format('reservation %s at offset %s is outside batch %s [%s, %s)',
                       r.reservation_id, r.request_offset, r.read_in, b.first_offset, b.next_offset)
           FROM (SELECT r.reservation_id, r.request_offset,
                        coalesce(q.queued_batch, r.batch_seq) AS read_in
                   FROM decisions r
                   LEFT JOIN queued_requests q ON q.request_id = r.reservation_id) r
           LEFT JOIN batches b ON b.batch_seq = r.read_in
          WHERE b.batch_seq IS NULL OR r.request_offset < b.first_offset OR r.request_offset >= b.next_offset",
    ),
    (
        "finished reservations have their history event",
        "SELECT format('reservation %s is %s without a matching event', reservation_id, status)
           FROM reservations r
          WHERE status IN ('confirmed', 'cancelled', 'expired')
            AND NOT EXISTS (SELECT 1 FROM reservation_events e
                             WHERE e.reservation_id = r.reservation_id AND e.status = r.status)",
    ),
];

/// Lines reported per check at most, so a badly broken database still gives a readable report.
const VIOLATIONS_PER_CHECK_MAX: i64 = 20;

pub async fn run(pool: &PgPool) -> Result<AuditReport, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let counts = sqlx::query(
        "SELECT (SELECT count(*) FROM skus) AS skus,
                (SELECT count(*) FROM decisions) AS reservations,
                (SELECT count(*) FROM batches) AS batches,
                (SELECT next_offset FROM sequencer_state WHERE id = 1) AS committed_offset,
                (SELECT max(generation) FROM log_generations) AS log_generation,
                (SELECT log_partition FROM sequencer_state WHERE id = 1) AS partition,
                (SELECT log_partitions FROM sequencer_state WHERE id = 1) AS partitions",
    )
    .fetch_one(&mut *tx)
    .await?;
    let mut report = AuditReport {
        skus: counts.try_get("skus")?,
        reservations: counts.try_get("reservations")?,
        batches: counts.try_get("batches")?,
        committed_offset: counts.try_get("committed_offset")?,
        checkpoint_batch_seq: None,
        log_generation: counts.try_get("log_generation")?,
        partition: counts.try_get("partition")?,
        partitions: counts.try_get("partitions")?,
        violations: Vec::new(),
    };
    for (name, sql) in CHECKS {
        let lines: Vec<String> =
            sqlx::query_scalar(&format!("{sql} LIMIT {VIOLATIONS_PER_CHECK_MAX}"))
                .fetch_all(&mut *tx)
                .await?;
        report
            .violations
            .extend(lines.into_iter().map(|l| format!("{name}: {l}")));
    }
    // Every SKU is in the partition its name hashes to (wire::partition): one decided elsewhere
    // would have two writers.
    let names: Vec<String> = sqlx::query_scalar("SELECT sku FROM skus ORDER BY sku")
        .fetch_all(&mut *tx)
        .await?;
    let misplaced = names.iter().filter(|sku| {
        report.partitions < 1
            || wire::partition::partition_of(sku, report.partitions as u32) as i32
                != report.partition
    });
    report.violations.extend(
        misplaced
            .take(VIOLATIONS_PER_CHECK_MAX as usize)
            .map(|sku| {
                format!(
                    "sku in its partition: {sku} is stored in partition {} of {}, but its name \
                     hashes elsewhere",
                    report.partition, report.partitions
                )
            }),
    );
    tx.commit().await?;
    Ok(report)
}
