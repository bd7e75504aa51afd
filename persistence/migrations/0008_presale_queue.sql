-- The pre-sale queue (the waiting room). A SKU may have a queue window: reservations from
-- `queue_opens_at` until `starts_at` are queued in log order (at most `queue_max` of them) and
-- decided in that order in the first batch at `starts_at`.
ALTER TABLE skus
    ADD COLUMN queue_opens_at timestamptz,
    ADD COLUMN queue_max      integer,
    ADD CONSTRAINT queue_window CHECK (
        (queue_opens_at IS NULL) = (queue_max IS NULL)
        AND (queue_opens_at IS NULL
             OR (starts_at IS NOT NULL AND queue_opens_at < starts_at AND queue_max >= 1)));

-- Every request that joined a queue: written by the batch that queued it (`queued_batch`), in
-- that batch's transaction, and marked by the batch that decided it (`released_batch`), which
-- inserts its `reservations` row from this one in the same transaction. A queued request has
-- no decision row until then. A sequencer that loads its state at batch N gets back the queue
-- as it stood after N: the rows queued at or before N and not released by then.
CREATE TABLE queued_requests (
    request_id      uuid PRIMARY KEY,
    sku             text    NOT NULL REFERENCES skus (sku),
    user_id         text    NOT NULL,
    idempotency_key text    NOT NULL,
    quantity        integer NOT NULL CHECK (quantity >= 1),
    -- Requests queued before it on its SKU (the order it is decided in).
    position        integer NOT NULL CHECK (position >= 0),
    request_offset  bigint  NOT NULL,
    queued_batch    bigint  NOT NULL,
    released_batch  bigint,
    CONSTRAINT released_after_queued CHECK (released_batch IS NULL OR released_batch > queued_batch)
);
-- The waiting ones, in queue order: what a load and a ticket read.
CREATE INDEX queued_requests_waiting ON queued_requests (sku, position) WHERE released_batch IS NULL;
