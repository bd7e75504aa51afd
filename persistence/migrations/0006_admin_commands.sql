-- Operators' commands applied under an idempotency key (`Idempotency-Key` on the admin routes).
--
-- A restock is a delta: sent twice it would add its units twice. Under a key it is applied once:
-- the batch that applies it writes its row here, in the batch's own transaction, and a retry
-- under the same key (after a 504, a failover, a restart) gets the stored outcome and changes
-- nothing. A different command under a used key is refused (`idempotency_key_reused`). The
-- engine keeps these keys in memory; a sequencer that loads its state reads the rows of the
-- batches it loaded (`batch_seq` <= the state's) and learns later ones by replaying the log.
-- Checkpoints do not carry them: admin commands are few.
CREATE TABLE admin_commands (
    idempotency_key text PRIMARY KEY,
    -- The inner command, in the wire encoding: a retry must repeat it byte for byte.
    command         bytea NOT NULL,
    -- What the first application answered (wire-encoded outcome), returned to every retry.
    outcome         bytea NOT NULL,
    batch_seq       bigint NOT NULL,
    decided_at      timestamptz NOT NULL
);
