-- Checkpoints of the engine state (sequencer/src/engine/checkpoint.rs), so that a start-up reads
-- a few large values instead of converting every decision row ever written.
--
-- A checkpoint is a chain. `checkpoint_deltas` holds what was appended to the state between two
-- checkpoints (decisions as decided, users, keys, grants that left `held`); a delta never changes
-- once written. `checkpoints` holds heads: the batch a checkpoint describes, the log offset to
-- resume from, how many deltas make it up, and the small overwritten part (SKU counters, clock).
-- A start-up loads the newest head, deltas 1..=deltas, then replays only the batches after it.

CREATE TABLE checkpoint_deltas (
    delta_seq  integer PRIMARY KEY CHECK (delta_seq >= 1),
    batch_seq  bigint  NOT NULL,
    raw_bytes  bigint  NOT NULL,
    -- CRC-32 of the uncompressed bytes: checked on every load.
    checksum   bigint  NOT NULL,
    -- zstd-compressed; already compressed, so Postgres should not try again.
    body       bytea   NOT NULL
);
ALTER TABLE checkpoint_deltas ALTER COLUMN body SET STORAGE EXTERNAL;

CREATE TABLE checkpoints (
    batch_seq    bigint  PRIMARY KEY,
    epoch        bigint  NOT NULL,
    next_offset  bigint  NOT NULL,
    deltas       integer NOT NULL CHECK (deltas >= 0),
    decisions    bigint  NOT NULL,
    checksum     bigint  NOT NULL,
    head         bytea   NOT NULL,
    written_at   timestamptz NOT NULL DEFAULT now()
);
