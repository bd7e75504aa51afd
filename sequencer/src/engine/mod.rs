//! The allocation engine: a deterministic state machine that decides a batch of commands against
//! in-memory stock. No IO, no clock reads, no randomness: time is an input (the batch time), so
//! the same starting state, batch boundaries and batch times always give the same outcomes. That
//! is what lets a standby replay the log and what makes the engine testable against a model.
//!
//! One call to [`Engine::apply_batch`] does, in order:
//! 1. expire every hold whose expiry is at or before the batch time (held -> available);
//! 2. decide each command in log order and produce exactly one outcome for it;
//! 3. assert the stock invariant on every SKU the batch touched.
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
//!   [`Reservation`], 56 bytes), in decision order; a granted row is the reservation itself;
//! - the strings kept (user ids, idempotency keys) are appended to two text arenas and referred
//!   to by offset and length; a user is a 32-byte row holding its name's place and its holding;
//! - three insert-only hash indexes ([`Index`]) hold row numbers only: users by id, decisions
//!   by request id, and decisions by `(user, idempotency key)`. Each command's keys are hashed
//!   once; the hashes serve the lookups and the inserts that follow them;
//! - a user's units held or sold of their first SKU live in the user row, which the lookup of
//!   the user has just read; further SKUs per user go to a small map.
//!
//! Only decisions about a known SKU are recorded (an unknown SKU is an answer about the input,
//! not a decision), so a row names its SKU by index. A user is created by its first grant: a
//! refusal keeps its user id beside its key instead, since the buyers a flash sale refuses are
//! most of its decisions and most never get anything (see [`REFUSAL_USER`]).
//!
//! # Memory latency
//!
//! With that, a new decision is bound by memory latency, not by instructions: the index slots,
//! the user row and the user's name sit at hashed, effectively random places in tables far
//! bigger than the caches, and each depends on the one before. [`Engine::apply_batch`] therefore
//! runs the commands of a batch through a short software pipeline that prefetches what each
//! command will read a few commands before deciding it. Prefetches are hints to the CPU: they
//! change nothing but timing, so the outcomes stay exactly those of deciding one by one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::Hasher;

use rustc_hash::{FxHashMap, FxHasher};
pub use wire::StoredDecision;
use wire::{
    Command, Outcome, Reject, Request, RequestId, ReservationStatus, ReservationView, SkuConfig,
    SkuView,
};

mod checkpoint;
#[cfg(test)]
mod model;
mod restore;
#[cfg(test)]
mod tests;

pub use checkpoint::{
    head_meta as checkpoint_head_meta, CheckpointCursor, CheckpointError, CheckpointLoader,
    CheckpointMeta,
};
pub use restore::{DecisionRef, Restorer};

pub use wire::limits::{HOLD_TTL_MS_MAX, QUANTITY_MAX, STOCK_MAX};

pub type SkuIdx = u32;
type UserIdx = u32;
/// Position of a decision in `Engine::decisions`.
type RowIdx = u32;

/// Commands between two stages of the prefetch pipeline (see [`Engine::apply_batch`]).
const STAGE: usize = 2;
/// The pipeline keeps the hashes of the commands in flight by command index modulo this.
const RING: usize = 8;
const _: () = assert!(RING > 3 * STAGE && RING.is_power_of_two());

#[derive(Debug, Clone, PartialEq, Eq)]
struct Sku {
    name: String,
    config: SkuConfig,
    available: u64,
    held: u64,
    sold: u64,
    paused: bool,
    /// `batch_seq` of the last batch that changed this SKU; avoids a set for dirty tracking.
    dirty_in_batch: u64,
}

impl Sku {
    fn total(&self) -> u64 {
        self.config.total_stock
    }

    fn view(&self) -> SkuView {
        SkuView {
            sku: self.name.clone(),
            total: self.total(),
            available: self.available,
            held: self.held,
            sold: self.sold,
            config: self.config.clone(),
            paused: self.paused,
        }
    }

    fn check_stock_invariant(&self) {
        let sum = self
            .available
            .checked_add(self.held)
            .and_then(|s| s.checked_add(self.sold));
        assert_eq!(
            sum,
            Some(self.total()),
            "stock invariant broken on sku {}: available {} + held {} + sold {} != total {}",
            self.name,
            self.available,
            self.held,
            self.sold,
            self.total()
        );
        assert!(
            self.total() <= STOCK_MAX,
            "sku {} total over STOCK_MAX",
            self.name
        );
    }
}

/// A string kept in one of the engine's text arenas: its byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u64,
    len: u32,
}

impl Span {
    /// Appends `s` to the arena `text`.
    fn push(text: &mut String, s: &str) -> Span {
        let span = Span {
            start: text.len() as u64,
            len: u32::try_from(s.len()).expect("strings shorter than 4 GiB"),
        };
        text.push_str(s);
        span
    }

    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// Aligned so that reading a user is one cache line, not two.
#[derive(Debug, Clone, PartialEq, Eq)]
#[repr(align(32))]
struct User {
    /// The user id, in `Engine::names`.
    name: Span,
    /// The user's units held or sold of `sku`: what the per-user limit is checked against. A
    /// buyer almost always buys one SKU, so the first is kept here; others are in
    /// `Engine::more_holdings`. `NO_SKU` until the first grant.
    sku: SkuIdx,
    units: u64,
}

const NO_SKU: SkuIdx = SkuIdx::MAX;

/// `Reservation::user` of a refusal: this bit, and the user id's length in bytes below it. A
/// refusal creates no user (in a flash sale nearly every buyer is refused and never comes back
/// with a grant): its user id is kept in the key arena right before its idempotency key, and its
/// key span covers both. User ids are far shorter than 2^31 bytes (`USER_ID_BYTES_MAX`).
const REFUSAL_USER: u32 = 1 << 31;

/// The user id length of a refusal's `Reservation::user`, `None` for a grant's user index.
fn refusal_user_len(user: u32) -> Option<usize> {
    (user & REFUSAL_USER != 0).then_some((user & !REFUSAL_USER) as usize)
}

/// Appends a refusal's user id and key to the key arena: its `(Reservation::user, key span)`.
fn refusal_text(keys: &mut String, user_id: &str, key: &str) -> (u32, Span) {
    let len = u32::try_from(user_id.len())
        .ok()
        .filter(|&l| l < REFUSAL_USER)
        .expect("user ids shorter than 2^31 bytes");
    let start = keys.len() as u64;
    keys.push_str(user_id);
    keys.push_str(key);
    let span = Span {
        start,
        len: u32::try_from(keys.len() as u64 - start).expect("strings shorter than 4 GiB"),
    };
    (REFUSAL_USER | len, span)
}

/// One recorded decision of a reserve command: the idempotency record of its key (what a repeat
/// must match, and gets back) and, if granted, the reservation it created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The request id (which is the reservation id), high half first: a `u128` field would align
    /// the row to 16 bytes and make it 64 bytes long instead of 56.
    request_id: [u64; 2],
    /// For a grant; 0 for a refusal.
    expires_at_ms: i64,
    /// The idempotency key, in `Engine::keys` (a refusal's is preceded by its user id).
    key: Span,
    /// A grant's user, or for a refusal [`REFUSAL_USER`] and the user id's length.
    user: UserIdx,
    sku: SkuIdx,
    quantity: u32,
    /// Where the reservation stands now, or why the request was refused.
    status: Result<ReservationStatus, Reject>,
}

const _: () = assert!(std::mem::size_of::<Reservation>() <= 56);

impl Reservation {
    fn request_id(&self) -> RequestId {
        (u128::from(self.request_id[0]) << 64) | u128::from(self.request_id[1])
    }
}

fn split_id(id: RequestId) -> [u64; 2] {
    [(id >> 64) as u64, id as u64]
}

/// An insert-only hash index over rows kept elsewhere: it maps a key's 32-bit hash to row
/// numbers, and the caller's predicate says whether a row holds the key. The engine never
/// removes anything, so plain open addressing with linear probing is enough.
///
/// A slot is one `u64`: the hash in the high half and the row number plus one in the low half
/// (0 is an empty slot). A probe compares the stored hash before asking about the row, so it
/// reads the row (another cache line) only when the key is almost certainly there: a lookup of
/// an absent key, the common case for a new request, reads only slots, 8 to a cache line.
/// Growing re-places the slots by their stored hashes and never reads or re-hashes keys.
#[derive(Debug, Default, Clone)]
struct Index {
    /// Empty, or a power of two long and at most three quarters full (so probes end).
    slots: Vec<u64>,
    len: usize,
}

impl Index {
    /// An empty index that takes `rows` rows without growing.
    fn with_capacity(rows: usize) -> Index {
        let slots = (rows * 4 / 3 + 1).next_power_of_two().max(16);
        Index {
            slots: vec![0; slots],
            len: 0,
        }
    }

    /// The first row with this hash that `holds_key` accepts.
    fn find(&self, hash: u32, mut holds_key: impl FnMut(u32) -> bool) -> Option<u32> {
        let mask = self.slots.len().wrapping_sub(1);
        let mut i = hash as usize;
        loop {
            let slot = *self.slots.get(i & mask)?;
            if slot == 0 {
                return None;
            }
            let row = slot as u32 - 1;
            if (slot >> 32) as u32 == hash && holds_key(row) {
                return Some(row);
            }
            i += 1;
        }
    }

    /// Adds a row whose key the caller has just looked up and not found.
    fn insert_new(&mut self, hash: u32, row: u32) {
        let row = row.checked_add(1).expect("fewer than 2^32 - 1 rows");
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        self.place((u64::from(hash) << 32) | u64::from(row));
        self.len += 1;
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        let capacity = (self.slots.len() * 2).max(16);
        let slots = std::mem::replace(&mut self.slots, vec![0; capacity]);
        for slot in slots.into_iter().filter(|&s| s != 0) {
            self.place(slot);
        }
    }

    fn place(&mut self, slot: u64) {
        let mask = self.slots.len() - 1;
        let mut i = (slot >> 32) as usize & mask;
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = slot;
    }

    /// Starts loading the slots a lookup of `hash` will read first.
    fn prefetch(&self, hash: u32) {
        let mask = self.slots.len().wrapping_sub(1);
        if let Some(slot) = self.slots.get(hash as usize & mask) {
            prefetch(slot);
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// Asks the CPU to start loading the cache line of `at` (a no-op elsewhere than on x86-64).
#[inline]
fn prefetch<T>(at: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` is only a hint to the cache: it does not change memory or registers
    // and cannot fault (here the address is even a valid reference). The intrinsic is `unsafe`
    // only because it needs SSE, which every x86-64 CPU has.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((at as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// The hashes of a reserve command's keys, as the indexes use them.
#[derive(Debug, Clone, Copy)]
struct Hashes {
    /// Of the user id.
    user: u32,
    /// Of `(user id, idempotency key)`.
    key: u32,
    /// Of the request id.
    request: u32,
}

impl Hashes {
    /// Fx hashing, each narrowed to 32 bits by [`narrow`]: fast and deterministic, and, like
    /// the Fx maps before it, not flood-resistant (a client crafting colliding idempotency keys
    /// would slow its own lookups down, never make them wrong).
    fn new(request_id: RequestId, user_id: &str, key: &str) -> Hashes {
        let user = Hashes::user_hash(user_id);
        Hashes {
            user: narrow(user),
            key: Hashes::key_hash(user, key),
            request: hash_request_id(request_id),
        }
    }

    /// The full hash of a user id ([`Hashes::user`] is it narrowed).
    fn user_hash(user_id: &str) -> u64 {
        let mut user = FxHasher::default();
        user.write(user_id.as_bytes());
        user.finish()
    }

    /// [`Hashes::key`] from the user id's full hash: from the id's hash, not the user's index,
    /// because a new user has none yet.
    fn key_hash(user_hash: u64, key: &str) -> u32 {
        let mut user_key = FxHasher::default();
        user_key.write_u64(user_hash);
        user_key.write(key.as_bytes());
        narrow(user_key.finish())
    }

    fn of(request: &Request) -> Option<Hashes> {
        match &request.command {
            Command::Reserve {
                user_id,
                idempotency_key,
                ..
            } => Some(Hashes::new(request.request_id, user_id, idempotency_key)),
            _ => None,
        }
    }
}

fn hash_request_id(id: RequestId) -> u32 {
    let mut h = FxHasher::default();
    h.write_u128(id);
    narrow(h.finish())
}

/// 64 hash bits to 32 by a full multiply, which spreads every input bit over the result (Fx
/// alone leaves bits that do not depend on parts of its input, e.g. for ids like `n << 32`).
fn narrow(h: u64) -> u32 {
    let p = u128::from(h) * 0x9E37_79B9_7F4A_7C15_u128;
    ((p >> 64) as u64 ^ p as u64) as u32
}

/// A new decision row: one per reserve command that was not a replay of an earlier key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index of the command within the batch (the caller owns the strings; no copies here).
    pub command_index: u32,
    pub request_id: RequestId,
    /// `Ok(expires_at_ms)` for a hold, `Err(reason)` for a refusal.
    pub result: Result<i64, Reject>,
}

/// A reservation changed status within the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub reservation_id: RequestId,
    pub status: ReservationStatus,
    pub at_ms: i64,
}

/// Everything one batch decided and changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutput {
    pub batch_seq: u64,
    pub batch_time_ms: i64,
    /// One per command, in command order.
    pub outcomes: Vec<Outcome>,
    pub decisions: Vec<Decision>,
    pub transitions: Vec<Transition>,
    /// Final state of every SKU the batch changed, in SKU creation order.
    pub skus: Vec<SkuView>,
}

/// The engine's whole state as persisted: what start-up and takeover load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub batch_seq: u64,
    pub clock_ms: i64,
    pub skus: Vec<SkuView>,
    pub decisions: Vec<StoredDecision>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("decision {request_id:032x} names sku {sku:?}, which is not in the snapshot")]
    UnknownSku { request_id: RequestId, sku: String },
    #[error("request id {request_id:032x} has two decision rows in the snapshot")]
    DuplicateRequestId { request_id: RequestId },
    #[error("idempotency key ({user_id:?}, {key:?}) appears twice in the snapshot")]
    DuplicateKey { user_id: String, key: String },
    #[error("sku {sku}: counters say held {held_counter}/sold {sold_counter} but the reservations add up to held {held_rows}/sold {sold_rows}")]
    CountersDisagree {
        sku: String,
        held_counter: u64,
        sold_counter: u64,
        held_rows: u64,
        sold_rows: u64,
    },
    #[error("sku {sku}: available + held + sold != total")]
    StockInvariant { sku: String },
    #[error("sku {sku} appears twice")]
    DuplicateSku { sku: String },
    #[error("user {user_id:?} appears twice")]
    DuplicateUser { user_id: String },
}

#[derive(Debug, Default, Clone)]
pub struct Engine {
    skus: Vec<Sku>,
    sku_index: FxHashMap<String, SkuIdx>,
    users: Vec<User>,
    /// Users by id (hash of the id).
    user_index: Index,
    /// User ids, appended and never removed; kept apart from the keys so that they stay dense.
    names: String,
    /// Idempotency keys, appended and never removed.
    keys: String,
    /// Every decision row, in decision order.
    decisions: Vec<Reservation>,
    /// Decisions by request id. Every id that has a decision row, refusals included: a foreign
    /// producer reusing one must be refused, not allowed to write a second row with the same
    /// primary key (which would fail the commit on every replay and stall the sale).
    by_request: Index,
    /// Decisions by `(user, idempotency key)`: what a repeated key gets back.
    by_key: Index,
    /// Units held or sold per `(user, SKU)` beyond each user's first SKU (see [`User`]).
    more_holdings: FxHashMap<(UserIdx, SkuIdx), u64>,
    /// Holds ordered by expiry; entries whose reservation left `held` are skipped when popped.
    expiries: BinaryHeap<Reverse<(i64, RequestId)>>,
    /// Every grant that left `held`, in the order it did (a grant moves at most once). With the
    /// rows as they were decided it makes the state append-only, which is what lets a checkpoint
    /// write only what changed since the last one (see `checkpoint.rs`).
    settled: Vec<(RowIdx, ReservationStatus)>,
    /// How many entries of `settled` came from a restore from rows, which knows only where each
    /// grant ended up, not when: they are in row order, not in the order the grants moved.
    settled_from_rows: u64,
    /// Time of the last batch: batch time never goes backwards, even if the wall clock does.
    clock_ms: i64,
    batch_seq: u64,
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn batch_seq(&self) -> u64 {
        self.batch_seq
    }

    pub fn clock_ms(&self) -> i64 {
        self.clock_ms
    }

    /// Earliest expiry among current holds, so the runtime can cut an empty batch in time.
    pub fn next_expiry_ms(&mut self) -> Option<i64> {
        while let Some(Reverse((at, id))) = self.expiries.peek().copied() {
            if self.live_hold(id, at).is_some() {
                return Some(at);
            }
            self.expiries.pop();
        }
        None
    }

    pub fn sku(&self, name: &str) -> Option<SkuView> {
        self.sku_index
            .get(name)
            .map(|&i| self.skus[i as usize].view())
    }

    pub fn skus(&self) -> impl Iterator<Item = SkuView> + '_ {
        self.skus.iter().map(Sku::view)
    }

    pub fn reservation(&self, id: RequestId) -> Option<ReservationView> {
        self.reservation_row(id).map(|row| self.view_of(row))
    }

    /// Decides one batch. `now_ms` is the batch time; it is clamped so it never goes backwards.
    pub fn apply_batch(&mut self, now_ms: i64, requests: &[Request]) -> BatchOutput {
        self.batch_seq += 1;
        self.clock_ms = self.clock_ms.max(now_ms);
        let mut out = BatchOutput {
            batch_seq: self.batch_seq,
            batch_time_ms: self.clock_ms,
            outcomes: Vec::with_capacity(requests.len()),
            decisions: Vec::with_capacity(requests.len()),
            ..BatchOutput::default()
        };
        self.expire_due_holds(&mut out);
        // The prefetch pipeline (see the module docs). At each step one command enters: it is
        // hashed and its index slots are prefetched. `STAGE` commands later, its user's slot
        // has arrived and names a user row to prefetch; `STAGE` later still, that row has
        // arrived and says where the user's name is; `STAGE` later it is decided. A command
        // decided before it leaves the pipeline (one creating the user, say) makes a later
        // prefetch useless, never wrong: deciding always does its own lookups.
        let mut ahead = [None; RING];
        for step in 0..requests.len() + 3 * STAGE {
            if let Some(request) = requests.get(step) {
                let hashes = Hashes::of(request);
                if let Some(h) = hashes {
                    self.user_index.prefetch(h.user);
                    self.by_key.prefetch(h.key);
                    self.by_request.prefetch(h.request);
                }
                ahead[step % RING] = hashes;
            }
            let stage = |n: usize| step.checked_sub(n * STAGE).filter(|&i| i < requests.len());
            if let Some(h) = stage(1).and_then(|i| ahead[i % RING]) {
                if let Some(user) = self.user_index.find(h.user, |_| true) {
                    prefetch(&self.users[user as usize]);
                }
            }
            if let Some(h) = stage(2).and_then(|i| ahead[i % RING]) {
                if let Some(user) = self.user_index.find(h.user, |_| true) {
                    let name = self.users[user as usize].name;
                    if let Some(byte) = self.names.as_bytes().get(name.start as usize) {
                        prefetch(byte);
                    }
                }
            }
            if let Some(i) = stage(3) {
                let outcome = self.decide(i as u32, &requests[i], ahead[i % RING], &mut out);
                out.outcomes.push(outcome);
            }
        }
        for sku in &self.skus {
            if sku.dirty_in_batch == self.batch_seq {
                sku.check_stock_invariant();
                out.skus.push(sku.view());
            }
        }
        debug_assert_eq!(out.outcomes.len(), requests.len());
        out
    }

    fn expire_due_holds(&mut self, out: &mut BatchOutput) {
        let now = self.clock_ms;
        while let Some(Reverse((at, id))) = self.expiries.peek().copied() {
            if at > now {
                break;
            }
            self.expiries.pop();
            let Some(row) = self.live_hold(id, at) else {
                continue;
            };
            self.release_hold(row, ReservationStatus::Expired);
            out.transitions.push(Transition {
                reservation_id: id,
                status: ReservationStatus::Expired,
                at_ms: now,
            });
        }
    }

    /// The row of reservation `id` if it is still held and expires at `at` (an expiry entry
    /// that is not stale).
    fn live_hold(&self, id: RequestId, at: i64) -> Option<RowIdx> {
        self.reservation_row(id).filter(|&row| {
            let r = &self.decisions[row as usize];
            r.status == Ok(ReservationStatus::Held) && r.expires_at_ms == at
        })
    }

    /// `hashes` are those of the command if it is a reserve.
    fn decide(
        &mut self,
        index: u32,
        request: &Request,
        hashes: Option<Hashes>,
        out: &mut BatchOutput,
    ) -> Outcome {
        let now = self.clock_ms;
        if !request.command.fields_ok() {
            // A poison message from a foreign producer: an answer about the input, recorded
            // in the batch's outbox, never a panic or a row Postgres cannot store.
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        match &request.command {
            Command::Reserve {
                sku,
                user_id,
                quantity,
                idempotency_key,
            } => self.reserve(
                index,
                request.request_id,
                sku,
                user_id,
                *quantity,
                idempotency_key,
                hashes.expect("a reserve is hashed"),
                out,
            ),
            Command::Confirm { reservation_id } => {
                self.settle(*reservation_id, ReservationStatus::Confirmed, now, out)
            }
            Command::Cancel { reservation_id } => {
                self.settle(*reservation_id, ReservationStatus::Cancelled, now, out)
            }
            Command::UpsertSku { sku, config } => self.upsert_sku(sku, config),
            Command::Restock { sku, quantity } => self.restock(sku, *quantity),
            Command::Pause { sku } => self.set_paused(sku, true),
            Command::Resume { sku } => self.set_paused(sku, false),
            Command::PauseAll => {
                let mut paused = 0;
                for sku in &mut self.skus {
                    if !sku.paused {
                        sku.paused = true;
                        sku.dirty_in_batch = self.batch_seq;
                        paused += 1;
                    }
                }
                Outcome::Frozen {
                    skus_paused: paused,
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn reserve(
        &mut self,
        index: u32,
        request_id: RequestId,
        sku_name: &str,
        user_id: &str,
        quantity: u32,
        key: &str,
        hashes: Hashes,
        out: &mut BatchOutput,
    ) -> Outcome {
        let sku = self.sku_index.get(sku_name).copied();
        if let Some(row) = self.find_key(hashes.key, user_id, key) {
            // A repeat: same request gets the first outcome and changes nothing; a different
            // request under the same key is refused and not recorded. (SKU names are unique,
            // so comparing indexes compares names; an unknown SKU differs from any record.)
            let record = &self.decisions[row as usize];
            if sku != Some(record.sku) || record.quantity != quantity {
                return Outcome::Rejected(Reject::IdempotencyKeyReused);
            }
            return match record.status {
                Ok(_) => Outcome::Held {
                    reservation_id: record.request_id(),
                    expires_at_ms: record.expires_at_ms,
                },
                Err(reason) => Outcome::Rejected(reason),
            };
        }
        // Answers about the input, not decisions about stock: nothing is recorded and the key
        // stays free, so a corrected retry (or one after the SKU exists) is decided anew.
        let Some(sku) = sku else {
            return Outcome::Rejected(Reject::UnknownSku);
        };
        if quantity == 0
            || quantity > QUANTITY_MAX
            || self.find_request(hashes.request, request_id).is_some()
        {
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        let user = self.find_user(hashes.user, user_id);
        let decision = self.grant_or_refuse(sku, user, quantity);
        let (user, key) = match decision {
            Ok(expires_at_ms) => {
                let user = match user {
                    Some(user) => user,
                    None => self.add_user(hashes.user, user_id),
                };
                self.take_stock(sku, user, quantity);
                self.expiries.push(Reverse((expires_at_ms, request_id)));
                (user, Span::push(&mut self.keys, key))
            }
            Err(_) => refusal_text(&mut self.keys, user_id, key),
        };
        let row = Reservation {
            request_id: split_id(request_id),
            expires_at_ms: decision.unwrap_or(0),
            key,
            user,
            sku,
            quantity,
            status: decision.map(|_| ReservationStatus::Held),
        };
        self.record(row, hashes);
        out.decisions.push(Decision {
            command_index: index,
            request_id,
            result: decision,
        });
        match decision {
            Ok(expires_at_ms) => Outcome::Held {
                reservation_id: request_id,
                expires_at_ms,
            },
            Err(reason) => Outcome::Rejected(reason),
        }
    }

    /// The rules of a new reservation, in the order a buyer would want them explained (after
    /// the checks of the input itself in [`Engine::reserve`]). Changes nothing; `Ok` is the
    /// expiry of the hold to create.
    fn grant_or_refuse(
        &self,
        sku_idx: SkuIdx,
        user: Option<UserIdx>,
        quantity: u32,
    ) -> Result<i64, Reject> {
        let now = self.clock_ms;
        let sku = &self.skus[sku_idx as usize];
        if sku.paused {
            return Err(Reject::SalePaused);
        }
        if sku.config.starts_at_ms.is_some_and(|t| now < t) {
            return Err(Reject::SaleNotStarted);
        }
        if sku.config.ends_at_ms.is_some_and(|t| now >= t) {
            return Err(Reject::SaleEnded);
        }
        let holding = user.map_or(0, |user| self.holding(user, sku_idx));
        if holding + u64::from(quantity) > u64::from(sku.config.per_user_limit) {
            return Err(Reject::LimitExceeded);
        }
        if sku.available < u64::from(quantity) {
            return Err(Reject::SoldOut);
        }
        Ok(now.saturating_add(sku.config.hold_ttl_ms as i64))
    }

    /// Moves granted units from available to held and counts them to the user's limit.
    fn take_stock(&mut self, sku_idx: SkuIdx, user: UserIdx, quantity: u32) {
        let sku = &mut self.skus[sku_idx as usize];
        sku.available -= u64::from(quantity);
        sku.held += u64::from(quantity);
        sku.dirty_in_batch = self.batch_seq;
        let limit = u64::from(sku.config.per_user_limit);
        let holding = self.holding_mut(user, sku_idx);
        *holding += u64::from(quantity);
        assert!(*holding <= limit, "per-user limit broken by a grant");
    }

    /// Appends a decision row and indexes it; its request id and key, which `hashes` are of,
    /// have just been looked up and not found.
    fn record(&mut self, row: Reservation, hashes: Hashes) {
        let idx = RowIdx::try_from(self.decisions.len()).expect("fewer than 2^32 decisions");
        self.decisions.push(row);
        self.by_request.insert_new(hashes.request, idx);
        self.by_key.insert_new(hashes.key, idx);
    }

    /// Confirm or cancel: only a held reservation moves; repeating a finished move is a no-op
    /// that answers the same; the opposite move after the fact is refused.
    fn settle(
        &mut self,
        id: RequestId,
        to: ReservationStatus,
        now: i64,
        out: &mut BatchOutput,
    ) -> Outcome {
        let Some(row) = self.reservation_row(id) else {
            return Outcome::Rejected(Reject::UnknownReservation);
        };
        let r = &self.decisions[row as usize];
        let status = r.status.expect("reservation_row returns reservations");
        let changed = match (status, to) {
            (ReservationStatus::Held, ReservationStatus::Confirmed) => {
                let (sku, quantity) = (r.sku as usize, u64::from(r.quantity));
                let sku = &mut self.skus[sku];
                sku.held -= quantity;
                sku.sold += quantity;
                sku.dirty_in_batch = self.batch_seq;
                self.decisions[row as usize].status = Ok(to);
                self.settled.push((row, to));
                true
            }
            (ReservationStatus::Held, _) => {
                self.release_hold(row, to);
                true
            }
            (current, wanted) if current == wanted => false,
            (ReservationStatus::Expired, _) => {
                return Outcome::Rejected(Reject::ReservationExpired)
            }
            (ReservationStatus::Cancelled, _) => {
                return Outcome::Rejected(Reject::ReservationCancelled)
            }
            (ReservationStatus::Confirmed, _) => {
                return Outcome::Rejected(Reject::ReservationConfirmed)
            }
        };
        if changed {
            out.transitions.push(Transition {
                reservation_id: id,
                status: to,
                at_ms: now,
            });
        }
        Outcome::Reservation(self.view_of(row))
    }

    /// Held -> cancelled or expired: the units go back on sale and stop counting to the limit.
    fn release_hold(&mut self, row: RowIdx, to: ReservationStatus) {
        let r = &mut self.decisions[row as usize];
        assert_eq!(
            r.status,
            Ok(ReservationStatus::Held),
            "release of a non-held reservation"
        );
        r.status = Ok(to);
        let (sku_idx, user, quantity) = (r.sku, r.user, u64::from(r.quantity));
        self.settled.push((row, to));
        let sku = &mut self.skus[sku_idx as usize];
        sku.held -= quantity;
        sku.available += quantity;
        sku.dirty_in_batch = self.batch_seq;
        let holding = self.holding_mut(user, sku_idx);
        *holding = holding.checked_sub(quantity).expect("hold without holding");
    }

    fn upsert_sku(&mut self, name: &str, config: &SkuConfig) -> Outcome {
        if !config.is_valid() {
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        let batch_seq = self.batch_seq;
        let sku = match self.sku_index.get(name) {
            Some(&i) => {
                let sku = &mut self.skus[i as usize];
                let committed = sku.held + sku.sold;
                if config.total_stock < committed {
                    return Outcome::Rejected(Reject::StockBelowCommitted);
                }
                sku.available = config.total_stock - committed;
                sku.config = config.clone();
                sku
            }
            None => {
                let idx = SkuIdx::try_from(self.skus.len()).expect("fewer than 2^32 skus");
                self.sku_index.insert(name.to_owned(), idx);
                self.skus.push(Sku {
                    name: name.to_owned(),
                    config: config.clone(),
                    available: config.total_stock,
                    held: 0,
                    sold: 0,
                    paused: false,
                    dirty_in_batch: 0,
                });
                self.skus.last_mut().expect("just pushed")
            }
        };
        sku.dirty_in_batch = batch_seq;
        Outcome::Sku(sku.view())
    }

    fn restock(&mut self, name: &str, quantity: u64) -> Outcome {
        let Some(&i) = self.sku_index.get(name) else {
            return Outcome::Rejected(Reject::UnknownSku);
        };
        if quantity == 0 {
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        let sku = &mut self.skus[i as usize];
        match sku.total().checked_add(quantity) {
            Some(total) if total <= STOCK_MAX => {
                sku.config.total_stock = total;
                sku.available += quantity;
                sku.dirty_in_batch = self.batch_seq;
                Outcome::Sku(sku.view())
            }
            _ => Outcome::Rejected(Reject::StockOverflow),
        }
    }

    fn set_paused(&mut self, name: &str, paused: bool) -> Outcome {
        let Some(&i) = self.sku_index.get(name) else {
            return Outcome::Rejected(Reject::UnknownSku);
        };
        let sku = &mut self.skus[i as usize];
        sku.paused = paused;
        sku.dirty_in_batch = self.batch_seq;
        Outcome::Sku(sku.view())
    }

    /// Units of `sku` that `user` holds or bought.
    fn holding(&self, user: UserIdx, sku: SkuIdx) -> u64 {
        let u = &self.users[user as usize];
        if u.sku == sku {
            u.units
        } else {
            self.more_holdings.get(&(user, sku)).copied().unwrap_or(0)
        }
    }

    fn holding_mut(&mut self, user: UserIdx, sku: SkuIdx) -> &mut u64 {
        let u = &mut self.users[user as usize];
        if u.sku == NO_SKU {
            u.sku = sku;
        }
        if u.sku == sku {
            &mut u.units
        } else {
            self.more_holdings.entry((user, sku)).or_insert(0)
        }
    }

    /// All the holdings, one per `(user, SKU)` that was ever granted units.
    fn holdings(&self) -> impl Iterator<Item = ((UserIdx, SkuIdx), u64)> + '_ {
        let first = self
            .users
            .iter()
            .enumerate()
            .filter(|(_, u)| u.sku != NO_SKU);
        first
            .map(|(i, u)| ((i as UserIdx, u.sku), u.units))
            .chain(self.more_holdings.iter().map(|(&k, &v)| (k, v)))
    }

    fn user_name(&self, user: UserIdx) -> &str {
        let span = self.users[user as usize].name;
        &self.names[span.range()]
    }

    /// The user id of a decision: a grant's user, or the id kept with a refusal's key.
    fn row_user_id(&self, row: &Reservation) -> &str {
        match refusal_user_len(row.user) {
            Some(len) => &self.keys[row.key.start as usize..row.key.start as usize + len],
            None => self.user_name(row.user),
        }
    }

    /// The idempotency key of a decision.
    fn key(&self, row: &Reservation) -> &str {
        let text = &self.keys[row.key.range()];
        match refusal_user_len(row.user) {
            Some(len) => &text[len..],
            None => text,
        }
    }

    /// The decision row of request `hash`/`id`, granted or refused.
    fn find_request(&self, hash: u32, id: RequestId) -> Option<RowIdx> {
        self.by_request
            .find(hash, |row| self.decisions[row as usize].request_id() == id)
    }

    /// The row of reservation `id`: a granted decision (a refusal created no reservation).
    fn reservation_row(&self, id: RequestId) -> Option<RowIdx> {
        self.find_request(hash_request_id(id), id)
            .filter(|&row| self.decisions[row as usize].status.is_ok())
    }

    /// The decision recorded under `(user_id, key)`; `hash` is [`Hashes::key`].
    fn find_key(&self, hash: u32, user_id: &str, key: &str) -> Option<RowIdx> {
        self.by_key.find(hash, |row| {
            let r = &self.decisions[row as usize];
            self.key(r) == key && self.row_user_id(r) == user_id
        })
    }

    /// `hash` is [`Hashes::user`].
    fn find_user(&self, hash: u32, name: &str) -> Option<UserIdx> {
        self.user_index.find(hash, |u| self.user_name(u) == name)
    }

    /// Adds a user that [`Engine::find_user`] has just not found.
    fn add_user(&mut self, hash: u32, name: &str) -> UserIdx {
        let i = UserIdx::try_from(self.users.len()).expect("fewer than 2^32 users");
        let name = Span::push(&mut self.names, name);
        self.users.push(User {
            name,
            sku: NO_SKU,
            units: 0,
        });
        self.user_index.insert_new(hash, i);
        i
    }

    fn view_of(&self, row: RowIdx) -> ReservationView {
        let r = &self.decisions[row as usize];
        ReservationView {
            reservation_id: r.request_id(),
            sku: self.skus[r.sku as usize].name.clone(),
            user_id: self.user_name(r.user).to_owned(),
            quantity: r.quantity,
            status: r.status.expect("a view of a reservation"),
            expires_at_ms: r.expires_at_ms,
        }
    }

    /// Rebuilds the engine from what Postgres holds, and refuses a snapshot whose counters do
    /// not match its reservation rows: the invariants are checked again after reading back.
    pub fn restore(snapshot: Snapshot) -> Result<Engine, RestoreError> {
        let mut restorer = Restorer::new(snapshot.batch_seq, snapshot.clock_ms, snapshot.skus)?;
        for d in &snapshot.decisions {
            restorer.add(DecisionRef::from(d))?;
        }
        restorer.finish()
    }

    /// Every invariant, checked from scratch (O(state)): used by tests after every batch and
    /// by the runtime after a restore. Panics with a description of the first violation.
    pub fn check_invariants(&self) {
        let mut held = vec![0u64; self.skus.len()];
        let mut sold = vec![0u64; self.skus.len()];
        let mut holdings: FxHashMap<(UserIdx, SkuIdx), u64> = FxHashMap::default();
        for r in &self.decisions {
            let q = u64::from(r.quantity);
            match r.status {
                Ok(ReservationStatus::Held) => held[r.sku as usize] += q,
                Ok(ReservationStatus::Confirmed) => sold[r.sku as usize] += q,
                _ => continue,
            }
            *holdings.entry((r.user, r.sku)).or_insert(0) += q;
        }
        for (i, sku) in self.skus.iter().enumerate() {
            sku.check_stock_invariant();
            assert_eq!(
                sku.held, held[i],
                "sku {}: held counter != held reservations",
                sku.name
            );
            assert_eq!(
                sku.sold, sold[i],
                "sku {}: sold counter != confirmed reservations",
                sku.name
            );
        }
        let recorded: FxHashMap<(UserIdx, SkuIdx), u64> = self.holdings().collect();
        for (&(u, sku), &units) in &recorded {
            let expected = holdings.get(&(u, sku)).copied().unwrap_or(0);
            assert_eq!(
                units,
                expected,
                "user {} holdings on sku {} drifted",
                self.user_name(u),
                sku
            );
        }
        for ((u, sku), units) in holdings {
            assert_eq!(
                recorded.get(&(u, sku)).copied(),
                Some(units),
                "holding missing for user {}",
                self.user_name(u)
            );
        }
        for &(u, sku) in self.more_holdings.keys() {
            assert!(
                self.users[u as usize].sku != sku && self.users[u as usize].sku != NO_SKU,
                "user {} has two holdings on sku {}",
                self.user_name(u),
                sku
            );
        }
        // The indexes: every user and every decision is found under its own keys, and nothing
        // else is indexed.
        assert_eq!(self.user_index.len(), self.users.len(), "user index size");
        assert_eq!(
            self.by_request.len(),
            self.decisions.len(),
            "request index size"
        );
        assert_eq!(self.by_key.len(), self.decisions.len(), "key index size");
        for (i, r) in self.decisions.iter().enumerate() {
            let (id, user, key) = (r.request_id(), self.row_user_id(r), self.key(r));
            assert_eq!(
                r.status.is_err(),
                refusal_user_len(r.user).is_some(),
                "decision {id:032x}: a refusal keeps its user id, a grant names a user"
            );
            let hashes = Hashes::new(id, user, key);
            assert_eq!(
                self.find_request(hashes.request, id),
                Some(i as RowIdx),
                "decision {id:032x} not indexed by request id"
            );
            assert_eq!(
                self.find_key(hashes.key, user, key),
                Some(i as RowIdx),
                "decision {id:032x} not indexed by key"
            );
            assert!(
                (r.sku as usize) < self.skus.len(),
                "decision {id:032x} on no sku"
            );
        }
        for u in 0..self.users.len() as UserIdx {
            let name = self.user_name(u);
            let hashes = Hashes::new(0, name, "");
            assert_eq!(
                self.find_user(hashes.user, name),
                Some(u),
                "user {name} not indexed"
            );
        }
    }
}

/// The index on its own, with the cases the engine's tests hardly reach: equal 32-bit hashes
/// for different keys, probes that wrap around the end of the table, and growth.
#[cfg(test)]
mod index_tests {
    use super::Index;

    #[test]
    fn rows_with_the_same_hash_are_told_apart_by_the_predicate() {
        let mut index = Index::default();
        for row in 0..100 {
            assert_eq!(index.find(7, |r| r == row), None);
            index.insert_new(7, row);
        }
        for row in 0..100 {
            assert_eq!(index.find(7, |r| r == row), Some(row));
        }
        assert_eq!(index.find(7, |r| r == 100), None);
        assert_eq!(index.find(8, |_| true), None);
        assert_eq!(index.len(), 100);
    }

    #[test]
    fn probes_wrap_around_the_end_of_the_table() {
        let mut index = Index::default();
        // 16 slots: hash 15 (and u32::MAX) starts at the last slot.
        for row in 0..10 {
            index.insert_new(if row % 2 == 0 { 15 } else { u32::MAX }, row);
        }
        assert_eq!(index.slots.len(), 16);
        for row in 0..10 {
            let hash = if row % 2 == 0 { 15 } else { u32::MAX };
            assert_eq!(index.find(hash, |r| r == row), Some(row));
        }
        assert_eq!(index.find(14, |_| true), None);
    }

    #[test]
    fn growth_keeps_every_row_findable() {
        let mut index = Index::default();
        let hash = |row: u32| row.wrapping_mul(0x9E37_79B9) >> 3;
        for row in 0..100_000 {
            index.insert_new(hash(row), row);
        }
        assert!(index.len() * 4 <= index.slots.len() * 3);
        for row in 0..100_000 {
            assert_eq!(index.find(hash(row), |r| r == row), Some(row));
        }
        assert_eq!(index.find(hash(100_000), |r| r == 100_000), None);
    }
}
