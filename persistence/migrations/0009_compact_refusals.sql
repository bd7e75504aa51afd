-- Refusals are stored compactly: one `refusals` row per batch that refused anything, holding the
-- batch's refusals as parallel arrays in decision order, instead of one `reservations` row (heap
-- tuple and primary-key entry) per refusal. In a flash sale ~95% of the decisions are refusals;
-- as rows they were most of the commit's cost (docs/BENCHMARKS.md, "Cheaper refusals").
--
-- A refusal is never read by its id (GET /v1/reservations/{id} serves grants only, and a
-- ticket's answer comes from its batch's outbox), so it needs no index: it must only be durable
-- and come back on a load (its key answers a retry with the same refusal) and in the audit.
-- Refusals of requests released from a pre-sale queue stay rows in `reservations` (they are
-- few, and a queued ticket reads its decision by id). Refusals written before this migration
-- stay where they are: the view `decisions` below reads both.
CREATE TABLE refusals (
    batch_seq        bigint   PRIMARY KEY,
    request_ids      uuid[]   NOT NULL,
    user_ids         text[]   NOT NULL,
    idempotency_keys text[]   NOT NULL,
    skus             text[]   NOT NULL,
    quantities       int4[]   NOT NULL,
    -- `Reject::code()` of each refusal.
    reasons          text[]   NOT NULL,
    request_offsets  int8[]   NOT NULL,
    CONSTRAINT arrays_parallel CHECK (
        cardinality(request_ids) >= 1
        AND cardinality(user_ids) = cardinality(request_ids)
        AND cardinality(idempotency_keys) = cardinality(request_ids)
        AND cardinality(skus) = cardinality(request_ids)
        AND cardinality(quantities) = cardinality(request_ids)
        AND cardinality(reasons) = cardinality(request_ids)
        AND cardinality(request_offsets) = cardinality(request_ids))
);
-- Random ids and keys do not compress: do not spend CPU trying (the arrays go to TOAST).
ALTER TABLE refusals
    ALTER COLUMN request_ids SET STORAGE EXTERNAL,
    ALTER COLUMN user_ids SET STORAGE EXTERNAL,
    ALTER COLUMN idempotency_keys SET STORAGE EXTERNAL,
    ALTER COLUMN skus SET STORAGE EXTERNAL,
    ALTER COLUMN quantities SET STORAGE EXTERNAL,
    ALTER COLUMN reasons SET STORAGE EXTERNAL,
    ALTER COLUMN request_offsets SET STORAGE EXTERNAL;

-- Every decision, granted or refused, with the columns of `reservations`: what a load, the
-- audit and anyone counting decisions read. A refusal is decided (and last updated) when its
-- batch was.
CREATE VIEW decisions AS
    SELECT reservation_id, user_id, idempotency_key, sku, quantity, status, reject_reason,
           decided_at, expires_at, updated_at, request_offset, batch_seq
      FROM reservations
    UNION ALL
    SELECT t.reservation_id, t.user_id, t.idempotency_key, t.sku, t.quantity, 'rejected',
           t.reject_reason, b.decided_at, NULL::timestamptz, b.decided_at, t.request_offset,
           f.batch_seq
      FROM refusals f
      JOIN batches b ON b.batch_seq = f.batch_seq
     CROSS JOIN LATERAL UNNEST(f.request_ids, f.user_ids, f.idempotency_keys, f.skus,
                               f.quantities, f.reasons, f.request_offsets)
           AS t(reservation_id, user_id, idempotency_key, sku, quantity, reject_reason,
                request_offset);
