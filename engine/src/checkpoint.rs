//! Checkpoints: the engine's state in a compact binary form, so that a start-up reads a few
//! large values instead of converting every decision row ever written.
//!
//! The state is append-only apart from small parts: decision rows, users and the two text arenas
//! only grow, and a grant's status moves at most once (held to confirmed, cancelled or expired),
//! which the engine logs in `settled`. So a checkpoint is a chain:
//!
//! - a **delta** holds what was appended since the previous checkpoint (users and their names,
//!   decision rows as they were decided and their idempotency keys, and the settled log's new
//!   entries). Deltas never change once written; a checkpoint writes only its own delta, so its
//!   cost follows the traffic since the last one, not the size of the state.
//! - a **head** holds what is small and overwritten: the batch it describes, the batch clock, the
//!   SKUs with their counters, and the cursor (how long each appended part is) that says which
//!   deltas make up the state.
//!
//! Loading applies deltas 1..=n in order to a [`CheckpointLoader`], then the head: that rebuilds
//! the hash indexes in bulk (two threads, pre-sized, no growth), derives holdings and expiries,
//! and refuses anything that does not add up: a delta that does not start where the previous one
//! ended, a truncated or trailing byte, a settled entry for a row that was not a held grant, a
//! request id or key twice, counters that disagree with the rows. Checksums of the bytes are the
//! storage layer's job (`persistence::checkpoint`); this file checks meaning.
//!
//! Byte layout (little-endian, versioned by the first byte): see [`Engine::encode_delta`] and
//! [`Engine::encode_head`].

use wire::{Reject, ReservationStatus, SkuView};

use crate::index::{narrow, Index};
use crate::output::RestoreError;
use crate::state::{refusal_user_len, Engine, Reservation, Span, User, NO_SKU};
use crate::RowIdx;

const DELTA_VERSION: u8 = 1;
/// 2: the SKUs' configs carry their pre-sale queue windows.
const HEAD_VERSION: u8 = 2;
/// Bytes of one encoded decision row: id 16, key length 4, user 4, sku 4, quantity 4, result 1,
/// and for a grant its expiry 8 (a refusal's row is 33 bytes).
const ROW_BYTES: usize = 41;

/// How long each append-only part of the state is: where the next delta starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointCursor {
    pub rows: u64,
    pub users: u64,
    pub name_bytes: u64,
    pub key_bytes: u64,
    pub settled: u64,
}

/// What a head says about itself without loading anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointMeta {
    pub batch_seq: u64,
    pub clock_ms: i64,
    pub cursor: CheckpointCursor,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {what} is malformed: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("delta starts at {found:?} but the state so far ends at {expected:?}: a delta is missing or out of order")]
    OutOfOrder {
        expected: CheckpointCursor,
        found: CheckpointCursor,
    },
    #[error("settled entry for row {row}, which is not a held grant")]
    BadSettle { row: u64 },
    #[error(transparent)]
    Restore(#[from] RestoreError),
}

fn malformed(what: &'static str, why: impl Into<String>) -> CheckpointError {
    CheckpointError::Malformed {
        what,
        why: why.into(),
    }
}

impl Engine {
    /// Where a delta written now would end.
    pub fn checkpoint_cursor(&self) -> CheckpointCursor {
        CheckpointCursor {
            rows: self.decisions.len() as u64,
            users: self.users.len() as u64,
            name_bytes: self.names.len() as u64,
            key_bytes: self.keys.len() as u64,
            settled: self.settled.len() as u64,
        }
    }

    /// Whether a delta from `end` (where a stored chain ends) would describe this engine. Rows,
    /// users and keys are in decision order however the engine was built, so any end at or
    /// before this state will do, except one that cuts into the settled entries of a restore
    /// from rows: those are in row order, not in the order the grants moved, so a chain that
    /// ends among them must be started anew (see `persistence::checkpoint::write`).
    pub fn can_continue_chain(&self, end: &CheckpointCursor) -> bool {
        let now = self.checkpoint_cursor();
        end.settled >= self.settled_from_rows
            && end.rows <= now.rows
            && end.users <= now.users
            && end.name_bytes <= now.name_bytes
            && end.key_bytes <= now.key_bytes
            && end.settled <= now.settled
    }

    /// Everything appended since `from` (the cursor of the previous checkpoint, or the default
    /// for the first). O(what was appended): a few `memcpy`s and one pass over the new rows.
    ///
    /// Layout: version u8; `from` and `to` cursors (5 x u64 each); the new users' name bytes,
    /// then each new user's name length (u32); the new key bytes, then each new row (see
    /// [`ROW_BYTES`]; a refusal's key text starts with its user id, see `REFUSAL_USER`); then
    /// each new settled entry (row u32, status u8).
    pub fn encode_delta(&self, from: &CheckpointCursor) -> Vec<u8> {
        let to = self.checkpoint_cursor();
        assert!(
            from.rows <= to.rows
                && from.users <= to.users
                && from.name_bytes <= to.name_bytes
                && from.key_bytes <= to.key_bytes
                && from.settled <= to.settled,
            "a delta from {from:?} is ahead of the state {to:?}"
        );
        let (users, rows) = (
            &self.users[from.users as usize..],
            &self.decisions[from.rows as usize..],
        );
        let names = &self.names.as_bytes()[from.name_bytes as usize..];
        let keys = &self.keys.as_bytes()[from.key_bytes as usize..];
        let settled = &self.settled[from.settled as usize..];
        let mut out = Vec::with_capacity(
            1 + 80
                + names.len()
                + 4 * users.len()
                + keys.len()
                + ROW_BYTES * rows.len()
                + 5 * settled.len(),
        );
        out.push(DELTA_VERSION);
        put_cursor(&mut out, from);
        put_cursor(&mut out, &to);
        out.extend_from_slice(names);
        for u in users {
            out.extend_from_slice(&u.name.len.to_le_bytes());
        }
        out.extend_from_slice(keys);
        for r in rows {
            out.extend_from_slice(&r.request_id[0].to_le_bytes());
            out.extend_from_slice(&r.request_id[1].to_le_bytes());
            out.extend_from_slice(&r.key.len.to_le_bytes());
            out.extend_from_slice(&r.user.to_le_bytes());
            out.extend_from_slice(&r.sku.to_le_bytes());
            out.extend_from_slice(&r.quantity.to_le_bytes());
            // As decided: a grant is written as held with its expiry (the settled log says where
            // it went since); a refusal as its reason alone.
            match r.status {
                Ok(_) => {
                    out.push(0);
                    out.extend_from_slice(&r.expires_at_ms.to_le_bytes());
                }
                Err(reason) => out.push(1 + reject_index(reason)),
            }
        }
        for &(row, status) in settled {
            out.extend_from_slice(&row.to_le_bytes());
            out.push(status_index(status));
        }
        out
    }

    /// The small, overwritten part: version u8, batch_seq u64, clock_ms i64, the cursor, and
    /// the SKUs (bincode).
    pub fn encode_head(&self) -> Vec<u8> {
        let mut out = vec![HEAD_VERSION];
        out.extend_from_slice(&self.batch_seq.to_le_bytes());
        out.extend_from_slice(&self.clock_ms.to_le_bytes());
        put_cursor(&mut out, &self.checkpoint_cursor());
        let skus: Vec<SkuView> = self.skus().collect();
        let skus = bincode::encode_to_vec(&skus, bincode::config::standard())
            .expect("encoding to a vector cannot fail");
        out.extend_from_slice(&skus);
        out
    }
}

/// Reads a head's batch, clock and cursor without decoding its SKUs.
pub fn head_meta(head: &[u8]) -> Result<CheckpointMeta, CheckpointError> {
    let mut r = Reader::new(head, "head");
    let version = r.u8()?;
    if version != HEAD_VERSION {
        return Err(malformed("head", format!("unknown version {version}")));
    }
    Ok(CheckpointMeta {
        batch_seq: r.u64()?,
        clock_ms: r.u64()? as i64,
        cursor: r.cursor()?,
    })
}

/// Rebuilds an engine from deltas 1..=n, in order, then the head.
pub struct CheckpointLoader {
    engine: Engine,
}

impl CheckpointLoader {
    /// `hash_seed` is the stored state's: the indexes are rebuilt with it (a checkpoint holds
    /// rows, not indexes, so it does not depend on the seed).
    pub fn new(hash_seed: u64) -> Self {
        CheckpointLoader {
            engine: Engine::with_hash_seed(hash_seed),
        }
    }

    /// Where the state loaded so far ends.
    pub fn cursor(&self) -> CheckpointCursor {
        self.engine.checkpoint_cursor()
    }

    /// Appends one delta. Rows are appended as decided; nothing is indexed until the head.
    pub fn apply_delta(&mut self, delta: &[u8]) -> Result<(), CheckpointError> {
        let e = &mut self.engine;
        let mut r = Reader::new(delta, "delta");
        let version = r.u8()?;
        if version != DELTA_VERSION {
            return Err(malformed("delta", format!("unknown version {version}")));
        }
        let (from, to) = (r.cursor()?, r.cursor()?);
        let expected = e.checkpoint_cursor();
        if from != expected {
            return Err(CheckpointError::OutOfOrder {
                expected,
                found: from,
            });
        }
        let span = |a: u64, b: u64| {
            b.checked_sub(a)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| malformed("delta", "a cursor goes backwards"))
        };
        let names = r.bytes(span(from.name_bytes, to.name_bytes)?)?;
        e.names.push_str(
            std::str::from_utf8(names).map_err(|_| malformed("delta", "user ids not UTF-8"))?,
        );
        let mut name_at = from.name_bytes;
        for _ in 0..span(from.users, to.users)? {
            let len = r.u32()?;
            let at = (name_at - from.name_bytes) as usize;
            if !text_at(names, at, len as usize) {
                return Err(malformed("delta", "a user id is not whole characters"));
            }
            e.users.push(User {
                name: Span {
                    start: name_at,
                    len,
                },
                sku: NO_SKU,
                units: 0,
            });
            name_at += u64::from(len);
        }
        if name_at != to.name_bytes {
            return Err(malformed("delta", "user name lengths do not add up"));
        }
        let keys = r.bytes(span(from.key_bytes, to.key_bytes)?)?;
        e.keys
            .push_str(std::str::from_utf8(keys).map_err(|_| malformed("delta", "keys not UTF-8"))?);
        let rows = span(from.rows, to.rows)?;
        e.decisions.reserve(rows);
        let mut key_at = from.key_bytes;
        for _ in 0..rows {
            let request_id = [r.u64()?, r.u64()?];
            let key_len = r.u32()?;
            let (user, sku, quantity) = (r.u32()?, r.u32()?, r.u32()?);
            let result = r.u8()?;
            let expires_at_ms = if result == 0 { r.u64()? as i64 } else { 0 };
            let status = match result {
                0 => Ok(ReservationStatus::Held),
                n => Err(*Reject::ALL
                    .get(usize::from(n) - 1)
                    .ok_or_else(|| malformed("delta", format!("unknown result {n}")))?),
            };
            // A grant names a user; a refusal keeps its user id at the start of its key text,
            // which must end on a character boundary.
            let key_start = (key_at - from.key_bytes) as usize;
            let user_ok = match refusal_user_len(user) {
                Some(len) => {
                    status.is_err() && len <= key_len as usize && text_at(keys, key_start, len)
                }
                None => status.is_ok() && u64::from(user) < to.users,
            };
            if !user_ok {
                return Err(malformed("delta", format!("row names user {user:#x}")));
            }
            if !text_at(keys, key_start, key_len as usize) {
                return Err(malformed("delta", "a key is not whole characters"));
            }
            e.decisions.push(Reservation {
                request_id,
                expires_at_ms,
                key: Span {
                    start: key_at,
                    len: key_len,
                },
                user,
                sku,
                quantity,
                status,
            });
            key_at += u64::from(key_len);
        }
        if key_at != to.key_bytes {
            return Err(malformed("delta", "key lengths do not add up"));
        }
        for _ in 0..span(from.settled, to.settled)? {
            let row = r.u32()?;
            let status = *STATUSES
                .get(usize::from(r.u8()?))
                .filter(|s| **s != ReservationStatus::Held)
                .ok_or_else(|| malformed("delta", "unknown settled status"))?;
            let held = e
                .decisions
                .get_mut(row as usize)
                .filter(|d| d.status == Ok(ReservationStatus::Held))
                .ok_or(CheckpointError::BadSettle {
                    row: u64::from(row),
                })?;
            held.status = Ok(status);
            e.settled.push((row, status));
        }
        r.end()?;
        Ok(())
    }

    /// Applies the head and finishes: the engine as it was after the head's batch.
    pub fn finish(self, head: &[u8]) -> Result<Engine, CheckpointError> {
        let mut engine = self.engine;
        let meta = head_meta(head)?;
        if meta.cursor != engine.checkpoint_cursor() {
            return Err(CheckpointError::OutOfOrder {
                expected: meta.cursor,
                found: engine.checkpoint_cursor(),
            });
        }
        let skus_at = 1 + 8 + 8 + 40;
        let (skus, read): (Vec<SkuView>, usize) =
            bincode::decode_from_slice(&head[skus_at..], bincode::config::standard())
                .map_err(|e| malformed("head", format!("skus: {e}")))?;
        if skus_at + read != head.len() {
            return Err(malformed("head", "trailing bytes"));
        }
        engine.batch_seq = meta.batch_seq;
        engine.clock_ms = meta.clock_ms;
        engine.set_skus(skus)?;
        let sku_count = engine.skus.len() as u64;
        if let Some(r) = engine
            .decisions
            .iter()
            .find(|r| u64::from(r.sku) >= sku_count)
        {
            return Err(RestoreError::UnknownSku {
                request_id: r.request_id(),
                sku: format!("#{}", r.sku),
            }
            .into());
        }
        engine.build_indexes()?;
        engine.derive_from_rows()?;
        Ok(engine)
    }
}

impl Engine {
    /// Builds the three hash indexes over rows and users already in place, refusing a request
    /// id, an idempotency key or a user id twice. Each index is sized once for its final length
    /// (no growth); the request index is built on a second thread while this one builds the
    /// others, since on a large state this is most of a start-up.
    fn build_indexes(&mut self) -> Result<(), RestoreError> {
        let rows = &self.decisions;
        let this = &*self;
        let hash_key = &self.hash_key;
        let (by_request, keyed) = std::thread::scope(|scope| {
            let by_request = scope.spawn(move || {
                let mut index = Index::with_capacity(rows.len());
                for (i, r) in rows.iter().enumerate() {
                    let id = r.request_id();
                    let hash = hash_key.request(id);
                    if index
                        .find(hash, |row| rows[row as usize].request_id() == id)
                        .is_some()
                    {
                        return Err(RestoreError::DuplicateRequestId { request_id: id });
                    }
                    index.insert_new(hash, i as RowIdx);
                }
                Ok(index)
            });
            let keyed = this.build_user_and_key_indexes();
            (by_request.join().expect("index thread"), keyed)
        });
        self.by_request = by_request?;
        let (user_index, by_key) = keyed?;
        self.user_index = user_index;
        self.by_key = by_key;
        Ok(())
    }

    fn build_user_and_key_indexes(&self) -> Result<(Index, Index), RestoreError> {
        let mut users = Index::with_capacity(self.users.len());
        let mut user_hashes = Vec::with_capacity(self.users.len());
        for u in 0..self.users.len() as u32 {
            let name = self.user_name(u);
            let hash = self.hash_key.user(name);
            let narrow = narrow(hash);
            if users
                .find(narrow, |other| self.user_name(other) == name)
                .is_some()
            {
                return Err(RestoreError::DuplicateUser {
                    user_id: name.to_owned(),
                });
            }
            users.insert_new(narrow, u);
            user_hashes.push(hash);
        }
        let mut by_key = Index::with_capacity(self.decisions.len());
        for (i, r) in self.decisions.iter().enumerate() {
            let (user_id, key) = (self.row_user_id(r), self.key(r));
            let user_hash = match refusal_user_len(r.user) {
                Some(_) => self.hash_key.user(user_id),
                None => user_hashes[r.user as usize],
            };
            let hash = self.hash_key.key(user_hash, key);
            let found = by_key.find(hash, |row| {
                let other = &self.decisions[row as usize];
                self.key(other) == key && self.row_user_id(other) == user_id
            });
            if found.is_some() {
                return Err(RestoreError::DuplicateKey {
                    user_id: user_id.to_owned(),
                    key: key.to_owned(),
                });
            }
            by_key.insert_new(hash, i as RowIdx);
        }
        Ok((users, by_key))
    }
}

const STATUSES: [ReservationStatus; 4] = [
    ReservationStatus::Held,
    ReservationStatus::Confirmed,
    ReservationStatus::Cancelled,
    ReservationStatus::Expired,
];

fn status_index(s: ReservationStatus) -> u8 {
    STATUSES
        .iter()
        .position(|x| *x == s)
        .expect("every status is listed") as u8
}

fn reject_index(r: Reject) -> u8 {
    Reject::ALL
        .iter()
        .position(|x| *x == r)
        .expect("every reason is listed") as u8
}

/// Whether `len` bytes at `at` exist and are whole UTF-8 characters, so that slicing the arena
/// there can never panic.
fn text_at(bytes: &[u8], at: usize, len: usize) -> bool {
    bytes
        .get(at..at.saturating_add(len))
        .is_some_and(|t| std::str::from_utf8(t).is_ok())
}

fn put_cursor(out: &mut Vec<u8>, c: &CheckpointCursor) {
    for v in [c.rows, c.users, c.name_bytes, c.key_bytes, c.settled] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Bounds-checked little-endian reading.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, what }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], CheckpointError> {
        if self.bytes.len() < n {
            return Err(malformed(self.what, "truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CheckpointError> {
        Ok(self.bytes(N)?.try_into().expect("exactly N bytes"))
    }

    fn u8(&mut self) -> Result<u8, CheckpointError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, CheckpointError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, CheckpointError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn cursor(&mut self) -> Result<CheckpointCursor, CheckpointError> {
        Ok(CheckpointCursor {
            rows: self.u64()?,
            users: self.u64()?,
            name_bytes: self.u64()?,
            key_bytes: self.u64()?,
            settled: self.u64()?,
        })
    }

    fn end(&self) -> Result<(), CheckpointError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(malformed(self.what, "trailing bytes"))
        }
    }
}
