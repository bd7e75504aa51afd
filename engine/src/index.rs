//! The insert-only hash index the engine keeps its users and decisions in, the hashes of a
//! reserve command's keys, and the prefetch hint the batch pipeline uses to hide memory latency.

use std::hash::Hasher;

use foldhash::fast::FoldHasher;
use foldhash::SharedSeed;
use wire::{Command, Request, RequestId};

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
pub(crate) struct Index {
    /// Empty, or a power of two long and at most three quarters full (so probes end).
    pub(crate) slots: Vec<u64>,
    pub(crate) len: usize,
}

/// Slots for `rows` rows: a power of two that they fill at most three quarters of.
fn slots_for(rows: usize) -> usize {
    (rows * 4 / 3 + 1).next_power_of_two().max(16)
}

impl Index {
    /// An empty index that takes `rows` rows without growing.
    pub(crate) fn with_capacity(rows: usize) -> Index {
        Index {
            slots: vec![0; slots_for(rows)],
            len: 0,
        }
    }

    /// Makes room for `more` rows beyond those held now, so that inserting them never grows
    /// the slots (growing re-places every slot: milliseconds at a million rows).
    pub(crate) fn reserve(&mut self, more: usize) {
        let wanted = slots_for(self.len + more);
        if wanted > self.slots.len() {
            self.resize(wanted);
        }
    }

    /// The first row with this hash that `holds_key` accepts.
    pub(crate) fn find(&self, hash: u32, mut holds_key: impl FnMut(u32) -> bool) -> Option<u32> {
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
    pub(crate) fn insert_new(&mut self, hash: u32, row: u32) {
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
        self.resize((self.slots.len() * 2).max(16));
    }

    /// Re-places every slot into `capacity` slots (a power of two) by its stored hash.
    fn resize(&mut self, capacity: usize) {
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
    pub(crate) fn prefetch(&self, hash: u32) {
        let mask = self.slots.len().wrapping_sub(1);
        if let Some(slot) = self.slots.get(hash as usize & mask) {
            prefetch(slot);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// Asks the CPU to start loading the cache line of `at` (a no-op elsewhere than on x86-64).
#[inline]
pub(crate) fn prefetch<T>(at: &T) {
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
pub(crate) struct Hashes {
    /// Of the user id.
    pub(crate) user: u32,
    /// Of `(user id, idempotency key)`.
    pub(crate) key: u32,
    /// Of the request id.
    pub(crate) request: u32,
}

/// The engine's keyed hash: foldhash with a 64-bit seed. The seed is stored with the state
/// (`sequencer_state.hash_seed`, random per database), so every process that loads the state
/// (leader and standby) hashes alike, and a client that does not know it cannot craft ids or
/// keys that collide and slow the single writer down for everyone. Seed 0 (tests, benchmarks)
/// is as good a hash, only a known one.
#[derive(Debug, Clone)]
pub(crate) struct HashKey {
    seed: u64,
    shared: SharedSeed,
}

impl Default for HashKey {
    fn default() -> Self {
        HashKey::new(0)
    }
}

impl HashKey {
    pub(crate) fn new(seed: u64) -> HashKey {
        HashKey {
            seed,
            shared: SharedSeed::from_u64(seed),
        }
    }

    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    fn hasher(&self) -> FoldHasher<'_> {
        FoldHasher::with_seed(self.seed, &self.shared)
    }

    /// The hashes of a reserve command's keys, each narrowed to 32 bits by [`narrow`].
    pub(crate) fn hashes(&self, request_id: RequestId, user_id: &str, key: &str) -> Hashes {
        let user = self.user(user_id);
        Hashes {
            user: narrow(user),
            key: self.key(user, key),
            request: self.request(request_id),
        }
    }

    /// The full hash of a user id ([`Hashes::user`] is it narrowed).
    pub(crate) fn user(&self, user_id: &str) -> u64 {
        let mut h = self.hasher();
        h.write(user_id.as_bytes());
        h.finish()
    }

    /// [`Hashes::key`] from the user id's full hash: from the id's hash, not the user's index,
    /// because a new user has none yet.
    pub(crate) fn key(&self, user_hash: u64, key: &str) -> u32 {
        let mut h = self.hasher();
        h.write_u64(user_hash);
        h.write(key.as_bytes());
        narrow(h.finish())
    }

    pub(crate) fn request(&self, id: RequestId) -> u32 {
        let mut h = self.hasher();
        h.write_u128(id);
        narrow(h.finish())
    }

    pub(crate) fn of(&self, request: &Request) -> Option<Hashes> {
        match &request.command {
            Command::Reserve {
                user_id,
                idempotency_key,
                ..
            } => Some(self.hashes(request.request_id, user_id, idempotency_key)),
            _ => None,
        }
    }
}

/// 64 hash bits to 32 by a full multiply, which spreads every input bit over the result.
pub(crate) fn narrow(h: u64) -> u32 {
    let p = u128::from(h) * 0x9E37_79B9_7F4A_7C15_u128;
    ((p >> 64) as u64 ^ p as u64) as u32
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
    fn reserved_room_takes_its_rows_without_growing() {
        let hash = |row: u32| row.wrapping_mul(0x9E37_79B9) >> 3;
        let mut index = Index::default();
        for row in 0..1_000 {
            index.insert_new(hash(row), row);
        }
        index.reserve(99_000);
        let slots = index.slots.len();
        assert!(slots >= 100_000 * 4 / 3, "{slots} slots");
        for row in 1_000..100_000 {
            index.insert_new(hash(row), row);
        }
        assert_eq!(
            index.slots.len(),
            slots,
            "the index grew inside its reserved room"
        );
        for row in 0..100_000 {
            assert_eq!(index.find(hash(row), |r| r == row), Some(row));
        }
        // Reserving less than what is free changes nothing.
        index.reserve(1);
        assert_eq!(index.slots.len(), slots);
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
