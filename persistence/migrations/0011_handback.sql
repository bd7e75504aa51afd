-- A partition's preferred writer (LEAD_PARTITIONS) asks the current leader, one that does not
-- prefer the partition, to hand it back: the leader finishes its batch, releases the lease and
-- follows. The request lapses after a few seconds, so a preferred writer that died after asking
-- never keeps a partition without a writer (crate persistence, lease.rs).
ALTER TABLE sequencer_state
    ADD COLUMN handback_to text,
    ADD COLUMN handback_at timestamptz;
