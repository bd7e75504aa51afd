//! Admission control: refuse at once the work this ingress could not finish in time.
//!
//! [`Admission::admit`] is the whole decision, in the order a `POST /v1/reservations` meets it;
//! four bounds, each checked with a few atomic loads before anything is appended:
//! - writes waiting for an outcome on this ingress (IN_FLIGHT_MAX);
//! - sequencer lag, `end of the requests log - offset committed in Postgres`, measured by a
//!   background task every LAG_POLL_MS and never on the request path ([`LagMonitor`]);
//! - a per-user token bucket ([`UserLimiter`], governor's keyed limiter);
//! - no sequencer committing for STALL_MAX_MS while requests wait ([`LagMonitor::stalled_for`]).

use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sqlx::PgPool;

use crate::bus::{now_ms, BrokerProbe};
use crate::error::ApiError;
use crate::metrics::{Metrics, Refusal};

/// A lag measurement older than this is not trusted for admission (the in-flight bound still
/// holds); readiness reports the broker separately.
pub const LAG_SIGNAL_STALE_MS: i64 = 5_000;

/// The window of the decide rate (tickets' ETAs).
pub const RATE_WINDOW_MS: i64 = 5_000;

/// Offsets committed per second between the first and last of `samples` (unix ms, offset); 0
/// with fewer than two, or when the offset went back (a rebased log).
pub fn rate_per_s(samples: &std::collections::VecDeque<(i64, i64)>) -> f64 {
    match (samples.front(), samples.back()) {
        (Some(&(t0, c0)), Some(&(t1, c1))) if t1 > t0 && c1 >= c0 => {
            (c1 - c0) as f64 * 1000.0 / (t1 - t0) as f64
        }
        _ => 0.0,
    }
}

/// Longer than this between two lag measurements (beyond the poll interval) is a gap: the stall
/// clock restarts at the next measurement.
const MEASUREMENT_GAP_MS: i64 = 1_000;

/// The latest cheap signals about the log and the broker, written by [`LagMonitor::run`].
#[derive(Default)]
pub struct LagMonitor {
    /// Messages appended to the requests topic and not yet committed by the sequencer.
    pub lag: AtomicI64,
    /// The requests log's end as last measured.
    pub high_watermark: AtomicI64,
    pub committed_offset: AtomicI64,
    /// When `lag` was last measured (both reads succeeded), unix ms; 0 = never.
    pub measured_ms: AtomicI64,
    /// When the producer's client last completed a round trip to the broker, unix ms; 0 = never.
    pub broker_ok_ms: AtomicI64,
    /// Decisions per second over the last [`RATE_WINDOW_MS`] (f64 bits): from the committed
    /// offset's moves, for tickets' ETAs.
    pub decide_rate_bits: AtomicU64,
    /// When the sequencer last showed progress, unix ms: the committed offset moved, or nothing
    /// was waiting (lag 0). 0 = never measured. A quiet sale keeps this fresh, so it is never
    /// mistaken for a stall.
    pub progress_ms: AtomicI64,
}

impl LagMonitor {
    /// Log messages decided per second lately (0 when nothing was, or nothing is known).
    pub fn decide_rate(&self) -> f64 {
        f64::from_bits(self.decide_rate_bits.load(Ordering::Relaxed))
    }

    /// The lag to act on, or `None` when the signal is stale.
    pub fn current_lag(&self, now_ms: i64) -> Option<i64> {
        let measured = self.measured_ms.load(Ordering::Relaxed);
        (measured > 0 && now_ms - measured <= LAG_SIGNAL_STALE_MS)
            .then(|| self.lag.load(Ordering::Relaxed))
    }

    /// How long no sequencer has committed anything while requests wait in the log, when that
    /// is longer than `stall_max_ms` and the measurement is fresh; `None` otherwise (also when
    /// `stall_max_ms` is 0, the check turned off). Waiting requests of any ingress count: the
    /// log is shared, so every ingress sees the same stall.
    pub fn stalled_for(&self, now_ms: i64, stall_max_ms: i64) -> Option<i64> {
        if stall_max_ms <= 0 {
            return None;
        }
        let lag = self.current_lag(now_ms)?;
        let since = self.progress_ms.load(Ordering::Relaxed);
        // Measured, not extrapolated: the stall as of the last measurement. While nothing is
        // measured (the broker away) the stall does not grow: the last lag seen may be seconds
        // old, and the sequencer cannot show progress then either. Counting from `now_ms`
        // refused every write for up to LAG_SIGNAL_STALE_MS after a broker died under load.
        let stalled = self.measured_ms.load(Ordering::Relaxed) - since;
        (lag > 0 && since > 0 && stalled > stall_max_ms).then_some(stalled)
    }

    /// Polls the requests topic's end (through the producer's own client, so a success also
    /// proves the producer reaches the broker) and `sequencer_state.next_offset`, forever.
    ///
    /// The end is the broker's high watermark, exact on Apache Kafka. (tansu reports it per
    /// record batch, so there the lag reads low by up to one producer batch, a few hundred
    /// requests: nothing next to LAG_MAX.) Both figures are read afresh each time, so after a
    /// `sequencer rebase-log` onto a recreated topic the lag is right at the next poll.
    pub async fn run(
        self: Arc<Self>,
        probe: BrokerProbe,
        pool: PgPool,
        every: Duration,
        partition: u32,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned_db = false;
        let mut warned_broker = false;
        let mut last_committed: Option<i64> = None;
        let mut warned_stall = false;
        // (when, committed offset) of the last RATE_WINDOW_MS: the decide rate.
        let mut recent: std::collections::VecDeque<(i64, i64)> = Default::default();
        loop {
            tick.tick().await;
            let probe = probe.clone();
            let high =
                tokio::task::spawn_blocking(move || probe.requests_high_watermark(partition));
            let committed = sqlx::query_scalar::<_, i64>(
                "SELECT next_offset FROM sequencer_state WHERE id = 1",
            )
            .fetch_one(&pool);
            let (high, committed) = tokio::join!(high, committed);
            let high = match high {
                Ok(Ok(h)) => {
                    self.broker_ok_ms.store(now_ms(), Ordering::Relaxed);
                    warned_broker = false;
                    Some(h)
                }
                Ok(Err(e)) => {
                    if !warned_broker {
                        tracing::warn!(partition, error = %e, "cannot read the requests topic's end from the broker");
                        warned_broker = true;
                    }
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "watermark probe panicked");
                    None
                }
            };
            let committed = match committed {
                Ok(c) => {
                    self.committed_offset.store(c, Ordering::Relaxed);
                    warned_db = false;
                    Some(c)
                }
                Err(e) => {
                    if !warned_db {
                        tracing::warn!(partition, error = %e, "cannot read the committed offset from Postgres");
                        warned_db = true;
                    }
                    None
                }
            };
            if let (Some(h), Some(c)) = (high, committed) {
                self.high_watermark.store(h, Ordering::Relaxed);
                // Below zero only when the log is shorter than what was decided (the topic was
                // recreated or truncated); the sequencer stops then, and says why.
                let lag = (h - c).max(0);
                let now = now_ms();
                self.lag.store(lag, Ordering::Relaxed);
                // Measuring again after a gap (the broker or Postgres was away): whether the
                // sequencer progressed meanwhile is unknown, and it could not while the broker
                // was away. Its STALL_MAX_MS starts now, not at the last progress seen before
                // the gap (which refused every write at the broker's return).
                let gap = now - self.measured_ms.load(Ordering::Relaxed);
                if gap > every.as_millis() as i64 + MEASUREMENT_GAP_MS {
                    self.progress_ms.store(now, Ordering::Relaxed);
                }
                if lag == 0 || last_committed != Some(c) {
                    self.progress_ms.store(now, Ordering::Relaxed);
                    if warned_stall {
                        tracing::info!(
                            partition,
                            committed_offset = c,
                            "the sequencer commits again"
                        );
                        warned_stall = false;
                    }
                } else if !warned_stall && now - self.progress_ms.load(Ordering::Relaxed) > 1_000 {
                    tracing::warn!(
                        partition,
                        committed_offset = c,
                        lag,
                        "no sequencer has committed for over 1 s while requests wait in the log"
                    );
                    warned_stall = true;
                }
                last_committed = Some(c);
                self.measured_ms.store(now, Ordering::Relaxed);
                recent.push_back((now, c));
                while recent
                    .front()
                    .is_some_and(|&(t, _)| now - t > RATE_WINDOW_MS)
                {
                    recent.pop_front();
                }
                self.decide_rate_bits
                    .store(rate_per_s(&recent).to_bits(), Ordering::Relaxed);
            }
        }
    }
}

/// Per-user token buckets. Users are keyed by a keyed hash of their id (no allocation per
/// request, and no one can aim collisions without the process's random hash key); idle buckets
/// are dropped by [`UserLimiter::sweep`], so memory follows the users active in the last
/// `burst / rate` seconds, not every user ever seen.
pub struct UserLimiter {
    limiter: DefaultKeyedRateLimiter<u64>,
    hasher: std::collections::hash_map::RandomState,
}

impl UserLimiter {
    /// `None` when `per_second` is 0 (rate limiting off).
    pub fn new(per_second: f64, burst: u32) -> anyhow::Result<Option<UserLimiter>> {
        if per_second == 0.0 {
            return Ok(None);
        }
        anyhow::ensure!(
            per_second.is_finite() && per_second > 0.0 && per_second <= 1e6,
            "RATE_LIMIT_PER_USER_PER_S must be from 0 (off) to 1000000"
        );
        let burst = NonZeroU32::new(burst)
            .ok_or_else(|| anyhow::anyhow!("RATE_LIMIT_BURST must be at least 1"))?;
        let period = Duration::from_secs_f64(1.0 / per_second);
        let quota = Quota::with_period(period)
            .ok_or_else(|| anyhow::anyhow!("RATE_LIMIT_PER_USER_PER_S is too large"))?
            .allow_burst(burst);
        Ok(Some(UserLimiter {
            limiter: RateLimiter::keyed(quota),
            hasher: Default::default(),
        }))
    }

    /// Takes one token from `user`'s bucket, or says how long until one is available.
    pub fn check(&self, user: &str) -> Result<(), Duration> {
        let key = self.hasher.hash_one(user);
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// Drops the buckets that are full again (indistinguishable from a new user's).
    pub fn sweep(&self, shrink: bool) {
        self.limiter.retain_recent();
        if shrink {
            self.limiter.shrink_to_fit();
        }
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// The bounds of [`Admission`], from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct AdmissionLimits {
    /// Writes that may wait for their outcome on this ingress at once.
    pub in_flight_max: usize,
    /// Most messages the sequencer may be behind the requests log before buyers' writes are
    /// refused with 503; 0 turns the bound off.
    pub lag_max: u64,
    /// Buyers' writes get 503 `no_sequencer` (and `/readyz` fails) when no sequencer has
    /// committed anything for this long while requests wait in the log; 0 turns it off.
    pub stall_max_ms: i64,
}

/// What asks to be admitted. Buyers' writes obey every bound; admin commands (rare,
/// authenticated) obey none, so that pausing or the emergency freeze works even when this
/// ingress is saturated or the sequencer is behind.
#[derive(Clone, Copy, Debug)]
pub enum Write<'a> {
    /// `POST /v1/reservations` by this user: every bound, then the user's token bucket.
    Reserve { user_id: &'a str },
    /// Confirm or cancel: every bound except the token bucket.
    Settle,
    /// An admin command: no bound.
    Admin,
}

/// Admission control: refuses at once (503 or 429 with Retry-After, nothing appended) what this
/// ingress cannot finish, and counts every refusal by reason.
pub struct Admission {
    pub limits: AdmissionLimits,
    /// One per partition of the requests log: a partition that falls behind or stalls sheds
    /// its own SKUs' writes and no other's.
    lags: Vec<Arc<LagMonitor>>,
    /// Per-user token buckets of `POST /v1/reservations`; `None` when rate limiting is off.
    pub limiter: Option<Arc<UserLimiter>>,
    metrics: Arc<Metrics>,
}

impl Admission {
    pub fn new(
        limits: AdmissionLimits,
        lags: Vec<Arc<LagMonitor>>,
        limiter: Option<Arc<UserLimiter>>,
        metrics: Arc<Metrics>,
    ) -> Admission {
        assert!(!lags.is_empty(), "a log has at least one partition");
        Admission {
            limits,
            lags,
            limiter,
            metrics,
        }
    }

    /// Admits `write` while `in_flight` writes already wait on this ingress, or says why not:
    /// more writes in flight than IN_FLIGHT_MAX, a sequencer more than LAG_MAX messages behind,
    /// no sequencer committing for STALL_MAX_MS while requests wait (503), the user's token
    /// bucket empty (429). The bounds come before the token bucket, so that a 503 does not cost
    /// the buyer a token.
    /// Every signal but in-flight is `partition`'s, the partition the write goes to.
    pub fn admit(
        &self,
        write: Write<'_>,
        in_flight: usize,
        partition: u32,
    ) -> Result<(), ApiError> {
        if let Write::Admin = write {
            return Ok(());
        }
        let now = now_ms();
        let limits = &self.limits;
        if in_flight >= limits.in_flight_max {
            return Err(self.overloaded(
                Refusal::InFlight,
                format!(
                    "this ingress already waits on {} requests",
                    limits.in_flight_max
                ),
            ));
        }
        if limits.lag_max > 0 {
            if let Some(lag) = self.lag(partition).current_lag(now) {
                if lag > limits.lag_max as i64 {
                    return Err(self.overloaded(
                        Refusal::Lag,
                        format!(
                            "the sequencer is {lag} requests behind (more than {})",
                            limits.lag_max
                        ),
                    ));
                }
            }
        }
        if let Some(stalled) = self.stalled_in(partition, now) {
            self.metrics.refused(Refusal::NoSequencer);
            return Err(ApiError::NoSequencer {
                retry_after_s: 1,
                detail: format!(
                    "no sequencer has committed anything for {stalled} ms while {} requests \
                     wait in the log; nothing was appended",
                    self.lag(partition).lag.load(Ordering::Relaxed)
                ),
            });
        }
        if let (Write::Reserve { user_id }, Some(limiter)) = (write, &self.limiter) {
            if let Err(wait) = limiter.check(user_id) {
                self.metrics.refused(Refusal::RateLimited);
                return Err(ApiError::RateLimited {
                    retry_after_s: retry_after_secs(wait),
                });
            }
        }
        Ok(())
    }

    /// The producer's local queue was full: the write was not appended.
    pub fn queue_full(&self) -> ApiError {
        self.overloaded(Refusal::QueueFull, "the request queue is full".into())
    }

    /// The lag signals of `partition` (partition 0's for one out of range).
    pub fn lag(&self, partition: u32) -> &LagMonitor {
        self.lags.get(partition as usize).unwrap_or(&self.lags[0])
    }

    /// When the broker last answered a probe of any partition, unix ms; 0 = never.
    pub fn broker_ok_ms(&self) -> i64 {
        self.lags
            .iter()
            .map(|l| l.broker_ok_ms.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// The lag signals of every partition, in partition order.
    pub fn lags(&self) -> &[Arc<LagMonitor>] {
        &self.lags
    }

    /// How long no sequencer has committed `partition` while its requests wait, past
    /// STALL_MAX_MS (see [`LagMonitor::stalled_for`]).
    pub fn stalled_in(&self, partition: u32, now_ms: i64) -> Option<i64> {
        self.lag(partition)
            .stalled_for(now_ms, self.limits.stall_max_ms)
    }

    /// The shortest stall when EVERY partition is stalled (this ingress can then decide
    /// nothing: not ready); `None` while any partition commits.
    pub fn stalled_for(&self, now_ms: i64) -> Option<i64> {
        let limit = self.limits.stall_max_ms;
        self.lags
            .iter()
            .map(|l| l.stalled_for(now_ms, limit))
            .collect::<Option<Vec<i64>>>()
            .and_then(|v| v.into_iter().min())
    }

    fn overloaded(&self, why: Refusal, detail: String) -> ApiError {
        self.metrics.refused(why);
        ApiError::Overloaded {
            retry_after_s: 1,
            detail,
        }
    }
}

/// Seconds for a `Retry-After` header: the wait rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_the_burst_then_is_refused_with_a_wait_and_others_are_unaffected() {
        let l = UserLimiter::new(1.0, 3).unwrap().unwrap();
        for _ in 0..3 {
            assert!(l.check("alice").is_ok());
        }
        let wait = l.check("alice").unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(retry_after_secs(wait), 1);
        assert!(l.check("bob").is_ok());
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn idle_users_are_evicted() {
        let l = UserLimiter::new(1000.0, 2).unwrap().unwrap();
        for i in 0..1000 {
            l.check(&format!("user-{i}")).unwrap();
        }
        assert_eq!(l.len(), 1000);
        // Buckets refill in 2 ms at 1000/s.
        std::thread::sleep(Duration::from_millis(20));
        l.sweep(true);
        assert!(l.is_empty(), "{} keys left", l.len());
    }

    #[test]
    fn zero_disables_and_bad_values_are_refused() {
        assert!(UserLimiter::new(0.0, 10).unwrap().is_none());
        assert!(UserLimiter::new(-1.0, 10).is_err());
        assert!(UserLimiter::new(f64::NAN, 10).is_err());
        assert!(UserLimiter::new(10.0, 0).is_err());
        assert!(UserLimiter::new(0.5, 1).unwrap().is_some());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    fn admission(in_flight_max: usize, lag: i64, limiter: Option<UserLimiter>) -> Admission {
        let monitor = LagMonitor::default();
        let now = now_ms();
        monitor.lag.store(lag, Ordering::Relaxed);
        monitor.measured_ms.store(now, Ordering::Relaxed);
        monitor.progress_ms.store(now, Ordering::Relaxed);
        let limits = AdmissionLimits {
            in_flight_max,
            lag_max: 10,
            stall_max_ms: 3_000,
        };
        let metrics = Arc::new(Metrics::new(&[]));
        Admission::new(
            limits,
            vec![Arc::new(monitor)],
            limiter.map(Arc::new),
            metrics,
        )
    }

    fn refusal(result: Result<(), ApiError>) -> String {
        match result {
            Ok(()) => "admitted".into(),
            Err(ApiError::Overloaded { detail, .. }) => format!("overloaded: {detail}"),
            Err(ApiError::NoSequencer { .. }) => "no_sequencer".into(),
            Err(ApiError::RateLimited { .. }) => "rate_limited".into(),
            Err(other) => format!("{other:?}"),
        }
    }

    #[test]
    fn buyers_meet_every_bound_and_admin_commands_none() {
        let a = admission(5, 0, None);
        assert_eq!(refusal(a.admit(Write::Settle, 4, 0)), "admitted");
        assert!(refusal(a.admit(Write::Settle, 5, 0)).contains("waits on 5"));
        let user = Write::Reserve { user_id: "alice" };
        assert!(refusal(a.admit(user, 5, 0)).contains("waits on 5"));
        assert_eq!(refusal(a.admit(Write::Admin, 5, 0)), "admitted");
        let behind = admission(5, 11, None);
        assert!(refusal(behind.admit(user, 0, 0)).contains("11 requests behind"));
        assert_eq!(refusal(behind.admit(Write::Admin, 0, 0)), "admitted");
        let stalled = admission(5, 3, None);
        stalled
            .lag(0)
            .progress_ms
            .store(now_ms() - 4_000, Ordering::Relaxed);
        assert_eq!(refusal(stalled.admit(Write::Settle, 0, 0)), "no_sequencer");
        assert_eq!(refusal(stalled.admit(Write::Admin, 0, 0)), "admitted");
    }

    #[test]
    fn a_partition_that_stalls_or_lags_sheds_its_own_writes_and_no_others() {
        let monitor = |lag: i64, progress_ago: i64| {
            let m = LagMonitor::default();
            let now = now_ms();
            m.lag.store(lag, Ordering::Relaxed);
            m.measured_ms.store(now, Ordering::Relaxed);
            m.progress_ms.store(now - progress_ago, Ordering::Relaxed);
            Arc::new(m)
        };
        let limits = AdmissionLimits {
            in_flight_max: 100,
            lag_max: 10,
            stall_max_ms: 3_000,
        };
        let lags = vec![monitor(0, 0), monitor(3, 4_000), monitor(11, 0)];
        let a = Admission::new(limits, lags, None, Arc::new(Metrics::new(&[])));
        let user = Write::Reserve { user_id: "u" };
        assert_eq!(refusal(a.admit(user, 0, 0)), "admitted");
        assert_eq!(refusal(a.admit(user, 0, 1)), "no_sequencer");
        assert!(refusal(a.admit(user, 0, 2)).contains("11 requests behind"));
        assert!(
            a.stalled_for(now_ms()).is_none(),
            "ready while one partition commits"
        );
        assert!(a.stalled_in(1, now_ms()).is_some());
    }

    #[test]
    fn only_reservations_take_a_token_and_only_after_the_bounds() {
        let a = admission(5, 0, UserLimiter::new(0.001, 1).unwrap());
        let user = Write::Reserve { user_id: "alice" };
        // Refused by a bound: the token is not spent.
        assert!(refusal(a.admit(user, 5, 0)).starts_with("overloaded"));
        assert_eq!(refusal(a.admit(Write::Settle, 0, 0)), "admitted");
        assert_eq!(refusal(a.admit(user, 0, 0)), "admitted");
        assert_eq!(refusal(a.admit(user, 0, 0)), "rate_limited");
        assert_eq!(refusal(a.admit(Write::Settle, 0, 0)), "admitted");
        assert_eq!(
            refusal(a.admit(Write::Reserve { user_id: "bob" }, 0, 0)),
            "admitted"
        );
    }

    #[test]
    fn stale_lag_is_not_acted_on() {
        let m = LagMonitor::default();
        assert_eq!(m.current_lag(now_ms()), None, "never measured");
        m.lag.store(7, Ordering::Relaxed);
        m.measured_ms.store(now_ms(), Ordering::Relaxed);
        assert_eq!(m.current_lag(now_ms()), Some(7));
        assert_eq!(m.current_lag(now_ms() + LAG_SIGNAL_STALE_MS + 1), None);
    }

    #[test]
    fn a_stall_is_waiting_requests_without_progress() {
        let m = LagMonitor::default();
        let now = now_ms();
        assert_eq!(m.stalled_for(now, 1_000), None, "never measured");
        m.measured_ms.store(now, Ordering::Relaxed);
        m.progress_ms.store(now - 3_000, Ordering::Relaxed);
        assert_eq!(
            m.stalled_for(now, 1_000),
            None,
            "a quiet log (lag 0) is no stall"
        );
        m.lag.store(5, Ordering::Relaxed);
        assert_eq!(m.stalled_for(now, 1_000), Some(3_000));
        assert_eq!(
            m.stalled_for(now, 5_000),
            None,
            "not for longer than the bound"
        );
        assert_eq!(m.stalled_for(now, 0), None, "0 turns it off");
        // Measurements stopped (the broker went away) 2 s after the last progress: the stall
        // seen is 2 s, however late it is asked about.
        m.measured_ms.store(now - 1_000, Ordering::Relaxed);
        assert_eq!(m.stalled_for(now, 2_500), None, "only 2 s were measured");
        assert_eq!(m.stalled_for(now + 3_000, 1_000), Some(2_000));
        m.measured_ms
            .store(now - LAG_SIGNAL_STALE_MS - 1, Ordering::Relaxed);
        assert_eq!(
            m.stalled_for(now, 1_000),
            None,
            "a stale measurement is not acted on"
        );
    }
}
