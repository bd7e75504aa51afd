//! The allocation engine: a deterministic state machine that decides a batch of commands against
//! in-memory stock. No IO, no clock reads, no randomness: time is an input (the batch time), so
//! the same starting state, batch boundaries and batch times always give the same outcomes. That
//! is what lets a standby replay the log and what makes the engine testable against a model.
//!
//! One call to [`Engine::apply_batch`] does, in order:
//! 1. expire every hold whose expiry is at or before the batch time (held -> available);
//! 2. decide the pre-sale queue of every SKU whose sale has started (see [`queue`]);
//! 3. decide each command in log order and produce exactly one outcome for it;
//! 4. assert the stock invariant on every SKU the batch touched.
//!
//! Alongside the outcomes it returns what changed ([`BatchOutput`]) so the persistence layer can
//! write the batch as one transaction without re-deriving anything.
//!
//! # Layout of the state
//!
//! A flash sale is millions of reserve commands against a handful of SKUs, most of them refused,
//! and every decision is kept for good: its idempotency key and its request id must never be
//! decided twice. So what a decision costs is what matters, and the state is laid out so that
//! recording one is a few appends and a few hash probes, with no allocation of its own:
//!
//! - every decision, granted or refused, is one fixed-size row of `Engine::decisions` (a
//!   `Reservation`, 56 bytes), in decision order; a granted row is the reservation itself;
//! - the strings kept (user ids, idempotency keys) are appended to two text arenas and referred
//!   to by offset and length; a user is a 32-byte row holding its name's place and its holding;
//! - three insert-only hash indexes (`Index`) hold row numbers only: users by id, decisions
//!   by request id, and decisions by `(user, idempotency key)`. Each command's keys are hashed
//!   once; the hashes serve the lookups and the inserts that follow them;
//! - a user's units held or sold of their first SKU live in the user row, which the lookup of
//!   the user has just read; further SKUs per user go to a small map.
//!
//! Only decisions about a known SKU are recorded (an unknown SKU is an answer about the input,
//! not a decision), so a row names its SKU by index. A user is created by its first grant: a
//! refusal keeps its user id beside its key instead, since the buyers a flash sale refuses are
//! most of its decisions and most never get anything (see `REFUSAL_USER`).
//!
//! # Memory latency
//!
//! With that, a new decision is bound by memory latency, not by instructions: the index slots,
//! the user row and the user's name sit at hashed, effectively random places in tables far
//! bigger than the caches, and each depends on the one before. [`Engine::apply_batch`] therefore
//! runs the commands of a batch through a short software pipeline that prefetches what each
//! command will read a few commands before deciding it. Prefetches are hints to the CPU: they
//! change nothing but timing, so the outcomes stay exactly those of deciding one by one.
//!
//! # Files
//!
//! [`state`] holds the rows and arenas and the lookups over them; [`index`] the hash index, the
//! hashes and the prefetch hint; [`machine`] decides batches; [`output`] is what a batch hands
//! back; [`restore`] rebuilds an engine from Postgres's rows and [`checkpoint`] from its compact
//! binary form; [`queue`] keeps the pre-sale queues; [`invariants`] checks the state from
//! scratch.

mod admin;
mod checkpoint;
mod index;
mod invariants;
mod machine;
#[cfg(test)]
mod model;
mod output;
mod queue;
mod restore;
mod state;
#[cfg(test)]
mod tests;

pub use checkpoint::{
    head_meta as checkpoint_head_meta, CheckpointCursor, CheckpointError, CheckpointLoader,
    CheckpointMeta,
};
pub use output::{
    AdminKeyApplied, AdminKeyRecord, BatchOutput, Decision, QueuedAt, QueuedRequest, Released,
    RestoreError, Snapshot, Transition,
};
pub use restore::{DecisionRef, Restorer};
pub use state::{Engine, Reservation};
pub use wire::StoredDecision;

pub use wire::limits::{HOLD_TTL_MS_MAX, QUANTITY_MAX, STOCK_MAX};

pub type SkuIdx = u32;
type UserIdx = u32;
/// Position of a decision in `Engine::decisions`.
type RowIdx = u32;
