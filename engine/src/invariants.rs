//! The engine's invariants, checked from scratch: the stock invariant of one SKU (asserted on
//! every SKU a batch touched) and the whole-state check tests run after every batch.

use rustc_hash::FxHashMap;
use wire::ReservationStatus;

use crate::state::{refusal_user_len, Engine, Sku, NO_SKU};
use crate::{RowIdx, SkuIdx, UserIdx, STOCK_MAX};

impl Sku {
    pub(crate) fn check_stock_invariant(&self) {
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

impl Engine {
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
            let hashes = self.hash_key.hashes(id, user, key);
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
            let hashes = self.hash_key.hashes(0, name, "");
            assert_eq!(
                self.find_user(hashes.user, name),
                Some(u),
                "user {name} not indexed"
            );
        }
        self.check_queues();
    }
}
