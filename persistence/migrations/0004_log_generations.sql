-- Log generations: which requests log the committed offsets refer to.
--
-- `sequencer_state.next_offset` and every batch's `[first_offset, next_offset)` are positions in
-- ONE Kafka topic. When that topic loses what Postgres has decided (deleted and recreated,
-- truncated, its broker's data lost), the offsets of the new log mean something else: the
-- sequencers stop, and an operator runs `sequencer rebase-log`, which starts a new generation
-- here. Decisions then continue at `base_offset` of the (new) topic, in the same transaction that
-- bumps the writer epoch, so no writer of the old log can commit again.
--
-- Why a table and nothing on the hot path: a generation is a contiguous range of batches
-- (`batch_seq >= first_batch_seq`, up to the next generation's `first_batch_seq`), so every batch
-- and decision row already says which generation it belongs to through its batch_seq. The batch
-- commit is unchanged (the epoch bump is the fence), and the table keeps the whole history for
-- the audit: offsets are contiguous within a generation, each offset is decided once per
-- generation, and the first batch of a generation starts at its base offset.
CREATE TABLE log_generations (
    generation            bigint PRIMARY KEY,
    -- The requests topic and its Kafka topic id (KIP-516, which tells a recreated topic from the
    -- original even when its offsets overlap). NULL until a sequencer has seen the topic: then
    -- the first one to read it records both, and every later start and the running log watcher
    -- compare against them.
    topic                 text,
    topic_id              text,
    -- First offset of this generation's log that is decided in it.
    base_offset           bigint NOT NULL CHECK (base_offset >= 0),
    -- First batch of this generation.
    first_batch_seq       bigint NOT NULL UNIQUE CHECK (first_batch_seq >= 1),
    -- The writer epoch the rebase took (0 for the first generation).
    epoch                 bigint NOT NULL,
    -- Where the previous generation stopped (its next_offset), for the record.
    previous_next_offset  bigint,
    started_at            timestamptz NOT NULL DEFAULT now(),
    reason                text NOT NULL
);

INSERT INTO log_generations (generation, base_offset, first_batch_seq, epoch, reason)
VALUES (1, 0, 1, 0, 'the first requests log');
