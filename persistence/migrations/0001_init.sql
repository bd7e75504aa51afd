-- The durable state of the sequencer. Every batch writes all of its changes in ONE transaction,
-- fenced by the writer's epoch and the offset it expects (see persistence/src/batch.rs).

-- Stock per SKU. The CHECKs are the last line of defence for invariant 1 (zero oversell): a batch
-- whose counters break them cannot commit, whatever the engine believed.
CREATE TABLE skus (
    sku             text PRIMARY KEY,
    total           bigint  NOT NULL,
    available       bigint  NOT NULL,
    held            bigint  NOT NULL,
    sold            bigint  NOT NULL,
    per_user_limit  integer NOT NULL,
    hold_ttl_ms     bigint  NOT NULL,
    starts_at       timestamptz,
    ends_at         timestamptz,
    paused          boolean NOT NULL,
    updated_batch   bigint  NOT NULL,
    CONSTRAINT counters_not_negative CHECK (available >= 0 AND held >= 0 AND sold >= 0),
    CONSTRAINT no_oversell CHECK (available + held + sold = total),
    CONSTRAINT per_user_limit_positive CHECK (per_user_limit >= 1),
    CONSTRAINT hold_ttl_positive CHECK (hold_ttl_ms >= 1),
    CONSTRAINT sale_window_ordered CHECK (starts_at IS NULL OR ends_at IS NULL OR starts_at < ends_at)
);

-- One row per decision of a reservation request, granted or refused, keyed by the request id
-- (which is also the public reservation id). The unique (user_id, idempotency_key) is invariant 3
-- enforced by the database: a key can never be decided twice.
CREATE TABLE reservations (
    reservation_id   uuid PRIMARY KEY,
    user_id          text    NOT NULL,
    idempotency_key  text    NOT NULL,
    sku              text    NOT NULL,
    quantity         integer NOT NULL,
    status           text    NOT NULL,
    reject_reason    text,
    decided_at       timestamptz NOT NULL,
    expires_at       timestamptz,
    updated_at       timestamptz NOT NULL,
    request_offset   bigint  NOT NULL,
    batch_seq        bigint  NOT NULL,
    CONSTRAINT one_decision_per_idempotency_key UNIQUE (user_id, idempotency_key),
    CONSTRAINT status_known CHECK (status IN ('held', 'confirmed', 'cancelled', 'expired', 'rejected')),
    CONSTRAINT refusal_has_reason CHECK ((status = 'rejected') = (reject_reason IS NOT NULL)),
    CONSTRAINT grant_has_expiry CHECK ((status = 'rejected') OR (expires_at IS NOT NULL AND quantity >= 1))
);
-- Deliberately no index on (sku, status): every insert and status move would pay for it and no
-- query on the hot path needs it (the audit scans the table once).

-- Status history: every move out of `held` (confirmed, cancelled, expired). The initial `held`
-- (or refusal) is the reservations row itself, so the hot path writes one row per request.
CREATE TABLE reservation_events (
    reservation_id  uuid   NOT NULL REFERENCES reservations (reservation_id),
    status          text   NOT NULL CHECK (status IN ('confirmed', 'cancelled', 'expired')),
    at              timestamptz NOT NULL,
    batch_seq       bigint NOT NULL,
    PRIMARY KEY (reservation_id, status)
);

-- One row per committed batch: which log offsets it decided ([first_offset, next_offset)), under
-- which epoch, and the outcomes it must publish (the outbox: re-published after a crash or a
-- takeover, so waiting ingresses still get their answer).
CREATE TABLE batches (
    batch_seq     bigint PRIMARY KEY,
    epoch         bigint  NOT NULL,
    first_offset  bigint  NOT NULL,
    next_offset   bigint  NOT NULL,
    decided_at    timestamptz NOT NULL,
    commands      integer NOT NULL,
    decisions     integer NOT NULL,
    transitions   integer NOT NULL,
    outbox        bytea   NOT NULL,
    CONSTRAINT offsets_ordered CHECK (first_offset <= next_offset AND next_offset - first_offset = commands)
);
ALTER TABLE batches ALTER COLUMN outbox SET STORAGE EXTERNAL;

-- The single row every writer fences on. `epoch` is bumped by each new leader; a batch commits
-- only if the row still holds the epoch and offset its writer read (invariants 2 and 4).
CREATE TABLE sequencer_state (
    id                smallint PRIMARY KEY CHECK (id = 1),
    epoch             bigint NOT NULL,
    next_offset       bigint NOT NULL,
    batch_seq         bigint NOT NULL,
    clock_ms          bigint NOT NULL,
    leader            text,
    lease_expires_at  timestamptz NOT NULL
);
-- A lease that lapsed long ago (finite: Postgres cannot subtract infinite timestamps).
INSERT INTO sequencer_state VALUES (1, 0, 0, 0, 0, NULL, 'epoch');
