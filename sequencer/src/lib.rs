//! The sequencer: the one process allowed to change stock.
//!
//! Read in this order: [`engine`] decides (pure, no IO); [`runtime`] feeds it batches from the
//! requests topic, commits each batch through `persistence`, and publishes the outcomes;
//! [`lease`] decides which of several sequencer processes may write.

pub mod engine;
