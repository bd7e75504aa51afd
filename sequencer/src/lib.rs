//! The sequencer: the one process allowed to change stock.
//!
//! Read in this order: the `engine` crate decides (pure, no IO); [`log`] reads the requests topic
//! from the offset Postgres holds; [`runtime`] cuts batches (`runtime/lead.rs`), commits each one
//! through `persistence` in one fenced transaction and hands the outcomes to [`publish`]
//! (`runtime/commit.rs`), replays the leader's batches on a standby (`runtime/follow.rs`) and
//! loads the state at start-up (`runtime/load.rs`); [`status`] reports. [`topic`]
//! tells a recreated topic from the original; [`rebase`] is the way back from a lost log.
//! [`partitions`] says which partitions of the requests topic a process serves (one
//! [`runtime::Sequencer`] each) and where each keeps its state.

pub mod admin;
pub mod audit;
pub mod checkpointer;
pub mod clock;
pub mod log;
pub mod partitions;
pub mod publish;
pub mod rebase;
pub mod runtime;
pub mod status;
pub mod topic;
