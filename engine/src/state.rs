//! The engine's state: SKUs, users and decision rows, the text arenas their strings live in, and
//! the lookups over them (see the crate docs for why it is laid out this way). Nothing here
//! decides anything; [`crate::machine`] does.

use rustc_hash::FxHashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use wire::{Outcome, Reject, RequestId, ReservationStatus, ReservationView, SkuConfig, SkuView};

use crate::index::{HashKey, Index};
use crate::{RowIdx, SkuIdx, UserIdx};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sku {
    pub(crate) name: String,
    pub(crate) config: SkuConfig,
    pub(crate) available: u64,
    pub(crate) held: u64,
    pub(crate) sold: u64,
    pub(crate) paused: bool,
    /// `batch_seq` of the last batch that changed this SKU; avoids a set for dirty tracking.
    pub(crate) dirty_in_batch: u64,
}

impl Sku {
    pub(crate) fn total(&self) -> u64 {
        self.config.total_stock
    }

    pub(crate) fn view(&self) -> SkuView {
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
}

/// A string kept in one of the engine's text arenas: its byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) start: u64,
    pub(crate) len: u32,
}

impl Span {
    /// Appends `s` to the arena `text`.
    pub(crate) fn push(text: &mut String, s: &str) -> Span {
        let span = Span {
            start: text.len() as u64,
            len: u32::try_from(s.len()).expect("strings shorter than 4 GiB"),
        };
        text.push_str(s);
        span
    }

    pub(crate) fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// Aligned so that reading a user is one cache line, not two.
#[derive(Debug, Clone, PartialEq, Eq)]
#[repr(align(32))]
pub(crate) struct User {
    /// The user id, in `Engine::names`.
    pub(crate) name: Span,
    /// The user's units held or sold of `sku`: what the per-user limit is checked against. A
    /// buyer almost always buys one SKU, so the first is kept here; others are in
    /// `Engine::more_holdings`. `NO_SKU` until the first grant.
    pub(crate) sku: SkuIdx,
    pub(crate) units: u64,
}

pub(crate) const NO_SKU: SkuIdx = SkuIdx::MAX;

/// `Reservation::user` of a refusal: this bit, and the user id's length in bytes below it. A
/// refusal creates no user (in a flash sale nearly every buyer is refused and never comes back
/// with a grant): its user id is kept in the key arena right before its idempotency key, and its
/// key span covers both. User ids are far shorter than 2^31 bytes (`USER_ID_BYTES_MAX`).
pub(crate) const REFUSAL_USER: u32 = 1 << 31;

/// The user id length of a refusal's `Reservation::user`, `None` for a grant's user index.
pub(crate) fn refusal_user_len(user: u32) -> Option<usize> {
    (user & REFUSAL_USER != 0).then_some((user & !REFUSAL_USER) as usize)
}

/// Appends a refusal's user id and key to the key arena: its `(Reservation::user, key span)`.
pub(crate) fn refusal_text(keys: &mut String, user_id: &str, key: &str) -> (u32, Span) {
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
    pub(crate) request_id: [u64; 2],
    /// For a grant; 0 for a refusal.
    pub(crate) expires_at_ms: i64,
    /// The idempotency key, in `Engine::keys` (a refusal's is preceded by its user id).
    pub(crate) key: Span,
    /// A grant's user, or for a refusal [`REFUSAL_USER`] and the user id's length.
    pub(crate) user: UserIdx,
    pub(crate) sku: SkuIdx,
    pub(crate) quantity: u32,
    /// Where the reservation stands now, or why the request was refused.
    pub(crate) status: Result<ReservationStatus, Reject>,
}

const _: () = assert!(std::mem::size_of::<Reservation>() <= 56);

impl Reservation {
    pub(crate) fn request_id(&self) -> RequestId {
        (u128::from(self.request_id[0]) << 64) | u128::from(self.request_id[1])
    }
}

pub(crate) fn split_id(id: RequestId) -> [u64; 2] {
    [(id >> 64) as u64, id as u64]
}

#[derive(Debug, Default, Clone)]
pub struct Engine {
    pub(crate) skus: Vec<Sku>,
    pub(crate) sku_index: FxHashMap<String, SkuIdx>,
    pub(crate) users: Vec<User>,
    /// Users by id (hash of the id).
    pub(crate) user_index: Index,
    /// User ids, appended and never removed; kept apart from the keys so that they stay dense.
    pub(crate) names: String,
    /// Idempotency keys, appended and never removed.
    pub(crate) keys: String,
    /// Every decision row, in decision order.
    pub(crate) decisions: Vec<Reservation>,
    /// Decisions by request id. Every id that has a decision row, refusals included: a foreign
    /// producer reusing one must be refused, not allowed to write a second row with the same
    /// primary key (which would fail the commit on every replay and stall the sale).
    pub(crate) by_request: Index,
    /// Decisions by `(user, idempotency key)`: what a repeated key gets back.
    pub(crate) by_key: Index,
    /// Units held or sold per `(user, SKU)` beyond each user's first SKU (see [`User`]).
    pub(crate) more_holdings: FxHashMap<(UserIdx, SkuIdx), u64>,
    /// Holds ordered by expiry; entries whose reservation left `held` are skipped when popped.
    pub(crate) expiries: BinaryHeap<Reverse<(i64, RequestId)>>,
    /// Every grant that left `held`, in the order it did (a grant moves at most once). With the
    /// rows as they were decided it makes the state append-only, which is what lets a checkpoint
    /// write only what changed since the last one (see `checkpoint.rs`).
    pub(crate) settled: Vec<(RowIdx, ReservationStatus)>,
    /// How many entries of `settled` came from a restore from rows, which knows only where each
    /// grant ended up, not when: they are in row order, not in the order the grants moved.
    pub(crate) settled_from_rows: u64,
    /// Time of the last batch: batch time never goes backwards, even if the wall clock does.
    pub(crate) clock_ms: i64,
    pub(crate) batch_seq: u64,
    /// The keyed hash of the indexes (seeded from the stored state).
    pub(crate) hash_key: HashKey,
    /// Keyed admin commands applied so far: key -> (encoded command, first outcome). Admin
    /// commands are rare; these are few. Not in checkpoints: loaded from `admin_commands`.
    pub(crate) admin_keys: FxHashMap<String, (Vec<u8>, Outcome)>,
    /// The pre-sale queues (see `queue.rs`). Not in checkpoints: loaded from `queued_requests`.
    pub(crate) queues: crate::queue::Queues,
}

/// Bytes of key text a decision is expected to keep (a refusal keeps its user id too), for
/// [`Engine::reserve_room`]: a guess that only sizes an allocation, never a limit.
const KEY_BYTES_PER_DECISION: usize = 48;

impl Engine {
    /// Makes room for `decisions` more decision rows, so that recording them never grows a
    /// table. Growing at a million rows re-places every slot of two indexes and may move the
    /// rows: tens of milliseconds on the decide thread, in the middle of a sale. The room is
    /// address space until used (fresh pages are only touched as rows arrive). Users are not
    /// reserved: a user is created by a grant, and grants are bounded by the stock.
    pub fn reserve_room(&mut self, decisions: usize) {
        self.decisions.reserve(decisions);
        self.by_request.reserve(decisions);
        self.by_key.reserve(decisions);
        self.keys.reserve(decisions * KEY_BYTES_PER_DECISION);
    }

    /// Units of `sku` that `user` holds or bought.
    pub(crate) fn holding(&self, user: UserIdx, sku: SkuIdx) -> u64 {
        let u = &self.users[user as usize];
        if u.sku == sku {
            u.units
        } else {
            self.more_holdings.get(&(user, sku)).copied().unwrap_or(0)
        }
    }

    pub(crate) fn holding_mut(&mut self, user: UserIdx, sku: SkuIdx) -> &mut u64 {
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
    pub(crate) fn holdings(&self) -> impl Iterator<Item = ((UserIdx, SkuIdx), u64)> + '_ {
        let first = self
            .users
            .iter()
            .enumerate()
            .filter(|(_, u)| u.sku != NO_SKU);
        first
            .map(|(i, u)| ((i as UserIdx, u.sku), u.units))
            .chain(self.more_holdings.iter().map(|(&k, &v)| (k, v)))
    }

    pub(crate) fn user_name(&self, user: UserIdx) -> &str {
        let span = self.users[user as usize].name;
        &self.names[span.range()]
    }

    /// The user id of a decision: a grant's user, or the id kept with a refusal's key.
    pub(crate) fn row_user_id(&self, row: &Reservation) -> &str {
        match refusal_user_len(row.user) {
            Some(len) => &self.keys[row.key.start as usize..row.key.start as usize + len],
            None => self.user_name(row.user),
        }
    }

    /// The idempotency key of a decision.
    pub(crate) fn key(&self, row: &Reservation) -> &str {
        let text = &self.keys[row.key.range()];
        match refusal_user_len(row.user) {
            Some(len) => &text[len..],
            None => text,
        }
    }

    /// The decision row of request `hash`/`id`, granted or refused.
    pub(crate) fn find_request(&self, hash: u32, id: RequestId) -> Option<RowIdx> {
        self.by_request
            .find(hash, |row| self.decisions[row as usize].request_id() == id)
    }

    /// The row of reservation `id`: a granted decision (a refusal created no reservation).
    pub(crate) fn reservation_row(&self, id: RequestId) -> Option<RowIdx> {
        self.find_request(self.hash_key.request(id), id)
            .filter(|&row| self.decisions[row as usize].status.is_ok())
    }

    /// The decision recorded under `(user_id, key)`; `hash` is `Hashes::key`.
    pub(crate) fn find_key(&self, hash: u32, user_id: &str, key: &str) -> Option<RowIdx> {
        self.by_key.find(hash, |row| {
            let r = &self.decisions[row as usize];
            self.key(r) == key && self.row_user_id(r) == user_id
        })
    }

    /// `hash` is `Hashes::user`.
    pub(crate) fn find_user(&self, hash: u32, name: &str) -> Option<UserIdx> {
        self.user_index.find(hash, |u| self.user_name(u) == name)
    }

    /// Adds a user that [`Engine::find_user`] has just not found.
    pub(crate) fn add_user(&mut self, hash: u32, name: &str) -> UserIdx {
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

    pub(crate) fn view_of(&self, row: RowIdx) -> ReservationView {
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
}
