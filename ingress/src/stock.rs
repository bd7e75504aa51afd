//! Live stock counts for `GET /v1/skus/{sku}/events`.
//!
//! The sequencer publishes, with the outcomes of every committed batch that changed SKUs, one
//! [`wire::StockUpdate`] under the key [`wire::STOCK_UPDATES`]; every ingress's outcomes reader
//! hands it to [`StockFeed::publish`]. The feed keeps, per SKU, only the newest committed
//! counters in a `tokio::sync::watch` channel: a subscriber, however slow, never makes the
//! ingress queue anything, it just sees the newest counts when it next looks (coalesced to at
//! most one event per [`EVENT_INTERVAL`]). Fan-out is one channel per SKU and one task-free
//! stream per subscriber; the number of subscribers is bounded (STREAM_SUBSCRIBERS_MAX).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::sync::watch;
use wire::{SkuView, StockUpdate};

/// At most one event per this long per subscriber (10 per second): what changed meanwhile is
/// sent as one event with the newest counts.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(100);

/// The newest committed counters of a SKU, and the batch that committed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockState {
    pub batch_seq: u64,
    pub view: SkuView,
}

type Slot = watch::Sender<Option<StockState>>;

#[derive(Default)]
pub struct StockFeed {
    skus: Mutex<FxHashMap<String, Slot>>,
    subscribers: Arc<AtomicUsize>,
    /// Stock updates received from the outcomes topic.
    pub updates: AtomicU64,
}

/// One open stream: counted while it lives.
pub struct Subscriber {
    subscribers: Arc<AtomicUsize>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StockFeed {
    /// Takes in a committed batch's counters. A SKU's counters from an older batch than the
    /// ones held (a re-published batch after a takeover) are ignored.
    pub fn publish(&self, update: StockUpdate) {
        self.updates.fetch_add(1, Ordering::Relaxed);
        let mut skus = self.skus.lock().unwrap_or_else(|e| e.into_inner());
        for view in update.skus {
            let slot = skus
                .entry(view.sku.clone())
                .or_insert_with(|| watch::channel(None).0);
            let batch_seq = update.batch_seq;
            slot.send_if_modified(|held| {
                if held.as_ref().is_some_and(|h| h.batch_seq >= batch_seq) {
                    return false;
                }
                *held = Some(StockState { batch_seq, view });
                true
            });
        }
    }

    /// The newest counters of `sku` from now on.
    pub fn watch(&self, sku: &str) -> watch::Receiver<Option<StockState>> {
        let mut skus = self.skus.lock().unwrap_or_else(|e| e.into_inner());
        skus.entry(sku.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Drops `sku`'s slot if nothing was ever published for it and nobody watches it: a watch
    /// of a name that turned out to be no SKU must not leave an entry behind (the map would
    /// grow with every made-up name asked for).
    pub fn forget_unknown(&self, sku: &str) {
        let mut skus = self.skus.lock().unwrap_or_else(|e| e.into_inner());
        if skus
            .get(sku)
            .is_some_and(|slot| slot.receiver_count() == 0 && slot.borrow().is_none())
        {
            skus.remove(sku);
        }
    }

    /// How many SKUs have a slot.
    pub fn slots(&self) -> usize {
        self.skus.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Counts a new subscriber, unless `max` are already open.
    pub fn admit(&self, max: usize) -> Option<Subscriber> {
        self.subscribers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Subscriber {
            subscribers: self.subscribers.clone(),
        })
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::SkuConfig;

    fn update(batch_seq: u64, sku: &str, available: u64) -> StockUpdate {
        StockUpdate {
            epoch: 1,
            batch_seq,
            batch_time_ms: 0,
            skus: vec![SkuView {
                sku: sku.into(),
                total: 10,
                available,
                held: 10 - available,
                sold: 0,
                config: SkuConfig {
                    total_stock: 10,
                    per_user_limit: 1,
                    hold_ttl_ms: 1_000,
                    starts_at_ms: None,
                    ends_at_ms: None,
                    queue: None,
                },
                paused: false,
            }],
        }
    }

    #[test]
    fn a_watcher_sees_the_newest_counts_and_never_older_ones() {
        let feed = StockFeed::default();
        let mut rx = feed.watch("tv");
        assert_eq!(*rx.borrow_and_update(), None);
        feed.publish(update(3, "tv", 7));
        feed.publish(update(4, "tv", 6));
        feed.publish(update(5, "other", 1));
        assert!(rx.has_changed().unwrap());
        // Coalesced: only the newest is there to see.
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().view.available, 6);
        // A re-published older batch changes nothing.
        feed.publish(update(3, "tv", 7));
        assert!(!rx.has_changed().unwrap());
        // A late subscriber starts from the newest.
        let late = feed.watch("tv");
        assert_eq!(late.borrow().as_ref().unwrap().batch_seq, 4);
        assert_eq!(feed.updates.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_watch_of_a_name_that_is_no_sku_leaves_nothing_behind() {
        let feed = StockFeed::default();
        let rx = feed.watch("made-up");
        feed.forget_unknown("made-up");
        assert_eq!(feed.slots(), 1, "still watched");
        drop(rx);
        feed.forget_unknown("made-up");
        assert_eq!(feed.slots(), 0);
        // A SKU with counts keeps its slot.
        feed.publish(update(1, "tv", 5));
        feed.forget_unknown("tv");
        assert_eq!(feed.slots(), 1);
    }

    #[test]
    fn subscribers_are_bounded_and_counted_while_they_live() {
        let feed = StockFeed::default();
        let a = feed.admit(2).unwrap();
        let b = feed.admit(2).unwrap();
        assert!(feed.admit(2).is_none(), "over the bound");
        assert_eq!(feed.subscribers(), 2);
        drop(a);
        let c = feed.admit(2);
        assert!(c.is_some());
        drop((b, c));
        assert_eq!(feed.subscribers(), 0);
    }
}
