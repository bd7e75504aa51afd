//! Requests waiting for their append and their outcome.
//!
//! Two threads report on a waiting request: the producer's delivery callback (appended at an
//! offset, or not appended) and the outcomes reader (the decided outcome). The waiter is completed
//! by whichever of the two it needs comes last, so the handler's task is woken once per request,
//! not once per report. The outcome normally comes second (the sequencer reads only what the
//! broker has acknowledged), but the delivery callback runs on another thread and may be late:
//! an outcome that arrives first is kept until the offset does.

use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tokio::sync::oneshot;
use wire::{Outcome, RequestId};

const SHARDS: usize = 64;

/// How a waiter ends (unless it times out, or its handler goes away, first).
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// Decided: the outcome, and the request's offset in the requests log.
    Decided { outcome: Outcome, offset: i64 },
    /// Appended at `offset`: for a waiter that does not wait for an outcome (a ticket's write).
    Appended { offset: i64 },
    /// The producer gave up on the append (it may still have reached the log).
    NotAppended { error: String },
}

struct Waiter {
    tx: oneshot::Sender<Reply>,
    wants_outcome: bool,
    since: Instant,
    offset: Option<i64>,
    outcome: Option<Outcome>,
}

/// The waiters, sharded to keep lock hold times tiny under load.
pub struct Pending {
    shards: Vec<Mutex<FxHashMap<RequestId, Waiter>>>,
    count: AtomicUsize,
}

impl Default for Pending {
    fn default() -> Pending {
        Pending {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            count: AtomicUsize::new(0),
        }
    }
}

impl Pending {
    fn shard(&self, id: RequestId) -> std::sync::MutexGuard<'_, FxHashMap<RequestId, Waiter>> {
        // UUIDv7's low bits are random: a fine shard selector.
        self.shards[(id as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Starts waiting for `id`: for its outcome, or only for its append.
    pub fn insert(&self, id: RequestId, wants_outcome: bool) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            tx,
            wants_outcome,
            since: Instant::now(),
            offset: None,
            outcome: None,
        };
        if self.shard(id).insert(id, waiter).is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        rx
    }

    /// Stops waiting for `id`. `Some(offset)` if it was still waiting, with its offset if the
    /// append was acknowledged.
    pub fn remove(&self, id: RequestId) -> Option<Option<i64>> {
        let waiter = self.shard(id).remove(&id)?;
        self.count.fetch_sub(1, Ordering::Relaxed);
        Some(waiter.offset)
    }

    /// The append of `id` was acknowledged at `offset`: completes a waiter that has its outcome
    /// or wants none. How long the append took, if anyone still waits.
    pub fn appended(&self, id: RequestId, offset: i64) -> Option<Duration> {
        let mut shard = self.shard(id);
        let Entry::Occupied(mut entry) = shard.entry(id) else {
            return None;
        };
        let waiter = entry.get_mut();
        let took = waiter.since.elapsed();
        let reply = match (waiter.wants_outcome, waiter.outcome.take()) {
            (false, _) => Reply::Appended { offset },
            (true, Some(outcome)) => Reply::Decided { outcome, offset },
            (true, None) => {
                waiter.offset = Some(offset);
                return Some(took);
            }
        };
        self.complete(entry.remove(), reply);
        Some(took)
    }

    /// The producer gave up on the append of `id`. Whether anyone still waited.
    pub fn not_appended(&self, id: RequestId, error: String) -> bool {
        let Some(waiter) = self.shard(id).remove(&id) else {
            return false;
        };
        self.complete(waiter, Reply::NotAppended { error });
        true
    }

    /// `outcome` was decided for `id`: completes a waiter whose append was acknowledged, or
    /// keeps it until then. Whether anyone waited (no one: a request that timed out, a
    /// re-published batch).
    pub fn decided(&self, id: RequestId, outcome: Outcome) -> bool {
        let mut shard = self.shard(id);
        let Entry::Occupied(mut entry) = shard.entry(id) else {
            return false;
        };
        match entry.get().offset {
            Some(offset) => self.complete(entry.remove(), Reply::Decided { outcome, offset }),
            None => entry.get_mut().outcome = Some(outcome),
        }
        true
    }

    /// Ends the wait of `waiter`, already taken out of its shard, with `reply`.
    fn complete(&self, waiter: Waiter, reply: Reply) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        // A handler that went away between its timeout and its removal: nothing to tell.
        let _ = waiter.tx.send(reply);
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::Reject;

    fn outcome() -> Outcome {
        Outcome::Rejected(Reject::SoldOut)
    }

    fn ready(rx: &mut oneshot::Receiver<Reply>) -> Option<Reply> {
        rx.try_recv().ok()
    }

    #[test]
    fn the_outcome_after_the_append_completes_the_waiter_once() {
        let pending = Pending::default();
        let mut rx = pending.insert(7, true);
        assert!(pending.appended(7, 41).is_some());
        assert_eq!(ready(&mut rx), None, "woken by the append alone");
        assert_eq!(pending.len(), 1);
        assert!(pending.decided(7, outcome()));
        assert_eq!(
            ready(&mut rx),
            Some(Reply::Decided {
                outcome: outcome(),
                offset: 41
            })
        );
        assert!(pending.is_empty());
        // A re-published batch finds no one.
        assert!(!pending.decided(7, outcome()));
    }

    #[test]
    fn an_outcome_before_the_delivery_report_waits_for_the_offset() {
        let pending = Pending::default();
        let mut rx = pending.insert(8, true);
        assert!(pending.decided(8, outcome()));
        assert_eq!(ready(&mut rx), None, "completed without its offset");
        assert!(pending.appended(8, 99).is_some());
        assert_eq!(
            ready(&mut rx),
            Some(Reply::Decided {
                outcome: outcome(),
                offset: 99
            })
        );
        assert!(pending.is_empty());
    }

    #[test]
    fn a_ticket_write_ends_at_its_append() {
        let pending = Pending::default();
        let mut rx = pending.insert(9, false);
        assert!(pending.appended(9, 5).is_some());
        assert_eq!(ready(&mut rx), Some(Reply::Appended { offset: 5 }));
        assert!(pending.is_empty());
    }

    #[test]
    fn a_failed_append_ends_the_wait_with_its_error() {
        let pending = Pending::default();
        let mut rx = pending.insert(10, true);
        assert!(pending.not_appended(10, "timed out".into()));
        assert_eq!(
            ready(&mut rx),
            Some(Reply::NotAppended {
                error: "timed out".into()
            })
        );
        assert!(!pending.not_appended(10, "again".into()));
        assert!(pending.is_empty());
    }

    #[test]
    fn removal_says_whether_the_append_was_acknowledged() {
        let pending = Pending::default();
        let _rx = pending.insert(11, true);
        let _rx2 = pending.insert(12, true);
        pending.appended(12, 3);
        assert_eq!(pending.remove(11), Some(None));
        assert_eq!(pending.remove(12), Some(Some(3)));
        assert_eq!(pending.remove(12), None);
        assert!(pending.appended(11, 4).is_none(), "no one waits any more");
        assert!(pending.is_empty());
    }
}
