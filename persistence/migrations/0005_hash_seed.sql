-- The seed of the engine's keyed hash (its indexes of users, idempotency keys and request ids).
--
-- Random per database, set once here and never changed: every sequencer that loads the state
-- (leader and standby alike) hashes with it, and a client that does not know it cannot craft
-- ids or keys whose hashes collide to slow the single writer down for everyone. Decisions never
-- depend on it; only where rows sit in the in-memory indexes does. gen_random_uuid() is
-- Postgres's strong random source: 64 bits of one (60 of them random) make the seed.
ALTER TABLE sequencer_state
    ADD COLUMN hash_seed bigint NOT NULL
        DEFAULT (('x' || substr(replace(gen_random_uuid()::text, '-', ''), 1, 16))::bit(64)::bigint);
