-- Which partition of the requests log this database's writer decides, and of how many
-- partitions: the count decides where every SKU lives (crate persistence, layout.rs).
ALTER TABLE sequencer_state
    ADD COLUMN log_partition  integer NOT NULL DEFAULT 0,
    ADD COLUMN log_partitions integer NOT NULL DEFAULT 1,
    ADD CONSTRAINT log_partition_in_range CHECK (log_partition >= 0 AND log_partition < log_partitions);
