-- The unique (user_id, idempotency_key) index covered every decision row, and in a flash sale
-- ~95% of the rows are refusals. Its random inserts were half of the batch commit cost: measured
-- with pgbench on this machine, 2,000 refusal rows per transaction took 35 ms with it and 17 ms
-- without it (docs/BENCHMARKS.md, "Commit cost").
--
-- Postgres now enforces the part of invariant 3 that protects stock: a key can hold at most one
-- reservation (partial unique index over granted rows; a granted row never becomes 'rejected',
-- so the predicate of a row never changes). That a key is *decided* only once, refusals
-- included, is enforced by the single writer's engine, checked again on every start-up and
-- takeover (`Engine::restore` refuses a snapshot with a key twice, so a duplicate stops the
-- sequencer instead of being served) and by `sequencer audit`.
ALTER TABLE reservations DROP CONSTRAINT one_decision_per_idempotency_key;
CREATE UNIQUE INDEX one_reservation_per_idempotency_key
    ON reservations (user_id, idempotency_key)
    WHERE status <> 'rejected';
