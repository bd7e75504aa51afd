//! The open-loop engine: requests are sent on a fixed schedule, whatever the server does.
//!
//! Request `n` of a phase is due at `start + n / rate`. A pool of keep-alive connections serves
//! the schedule: a free connection claims the next index, sleeps until it is due and sends it.
//! When every connection is busy (the server is slow) the due time passes and the request goes
//! out late, on the next connection that frees up; its latency is still measured from the time it
//! was *due*, so a slow server cannot hide its queueing by slowing the sender (no coordinated
//! omission). How late requests went out is recorded separately (`send_lag`): a large lag says
//! the connection count, not the server, limited the offered load.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::http::{self, Conn};

/// What a request is, for classifying its answer.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// A reservation; `orig` is the index of the first attempt (retries share it and the key),
    /// `slot` the SKU's position in the scenario's SKU list.
    Reserve {
        orig: u64,
        slot: u32,
    },
    Confirm,
    Cancel,
    Read,
}

pub struct Req {
    pub method: &'static str,
    pub path: String,
    pub body: Vec<u8>,
    pub kind: Kind,
}

pub type Workload = Arc<dyn Fn(u64) -> Req + Send + Sync>;

/// Outcome categories, in report order.
pub const CATEGORIES: [&str; 13] = [
    "held",
    "sold_out",
    "limit_exceeded",
    "ok_200",
    "other_4xx",
    "429",
    "503",
    "504",
    "other_5xx",
    "client_timeout",
    "client_error",
    "not_sent",
    "unanswered",
];

/// The counted categories, in the order of [`CATEGORIES`] (a category's value is its index
/// there and in [`Stats::cats`]); "unanswered" is what is left of the requests sent.
#[derive(Clone, Copy, Debug)]
enum Cat {
    Held,
    SoldOut,
    Limit,
    Ok200,
    Other4xx,
    S429,
    S503,
    S504,
    S5xx,
    Timeout,
    ClientErr,
    /// Still unsent when the phase's cut-off came (the server was so slow that every connection
    /// stayed busy): recorded in the latency histogram at how late they were by then.
    NotSent,
}

/// Latencies are recorded in microseconds, up to a minute.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

pub struct Stats {
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    pub cats: [AtomicU64; CATEGORIES.len()],
    pub detail: Mutex<BTreeMap<String, u64>>,
    pub latency: Mutex<Histogram<u64>>,
    pub send_lag: Mutex<Histogram<u64>>,
    /// First attempt index -> (reservation id, SKU slot) of every 201 seen.
    pub winners: Mutex<FxHashMap<u64, (u128, u32)>>,
    /// A retry with the same key answered with a different reservation id than the original.
    pub idempotency_mismatches: AtomicU64,
    pub in_flight: AtomicU64,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            sent: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            cats: Default::default(),
            detail: Mutex::default(),
            latency: Mutex::new(histogram()),
            send_lag: Mutex::new(histogram()),
            winners: Mutex::default(),
            idempotency_mismatches: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }

    fn count(&self, cat: Cat, detail: Option<String>) {
        self.cats[cat as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(d) = detail {
            *self.detail.lock().unwrap().entry(d).or_insert(0) += 1;
        }
    }

    fn classify(&self, req: &Req, resp: &http::Response) {
        let status = resp.status;
        match status {
            201 => {
                self.count(Cat::Held, None);
                if let Kind::Reserve { orig, slot } = req.kind {
                    if let Some(id) = reservation_id(&resp.body) {
                        let mut w = self.winners.lock().unwrap();
                        match w.get(&orig) {
                            Some((prev, _)) if *prev != id => {
                                self.idempotency_mismatches.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(_) => {}
                            None => {
                                w.insert(orig, (id, slot));
                            }
                        }
                    }
                }
            }
            200 => self.count(Cat::Ok200, None),
            409 => match http::error_code(&resp.body).as_deref() {
                Some("sold_out") => self.count(Cat::SoldOut, None),
                Some("limit_exceeded") => self.count(Cat::Limit, None),
                code => self.count(Cat::Other4xx, Some(format!("409 {}", code.unwrap_or("-")))),
            },
            429 => self.count(Cat::S429, None),
            503 => self.count(Cat::S503, None),
            504 => self.count(Cat::S504, None),
            400..=499 => self.count(
                Cat::Other4xx,
                Some(format!(
                    "{status} {}",
                    http::error_code(&resp.body).as_deref().unwrap_or("-")
                )),
            ),
            _ => self.count(
                Cat::S5xx,
                Some(format!(
                    "{status} {}",
                    http::error_code(&resp.body).as_deref().unwrap_or("-")
                )),
            ),
        }
    }

    pub fn cat(&self, i: usize) -> u64 {
        self.cats[i].load(Ordering::Relaxed)
    }

    /// The requests counted in categories `first` to `last`, both included.
    fn total(&self, first: Cat, last: Cat) -> u64 {
        (first as usize..=last as usize).map(|i| self.cat(i)).sum()
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

fn reservation_id(body: &[u8]) -> Option<u128> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let s = v.get("reservation_id")?.as_str()?;
    uuid::Uuid::parse_str(s).ok().map(|u| u.as_u128())
}

#[derive(Clone, Debug)]
pub struct Phase {
    pub label: String,
    pub rate: f64,
    pub duration: Duration,
    /// Hard cap on requests, whatever rate * duration says.
    pub max_requests: u64,
    /// Index of this phase's first request in the workload (so phases never reuse keys).
    pub index_base: u64,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub samples: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |v: u64| v as f64 / 1000.0;
        Latency {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
            samples: h.len(),
        }
    }
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct PhaseReport {
    pub label: String,
    pub offered_rate: f64,
    pub planned_requests: u64,
    pub sent: u64,
    pub answered: u64,
    /// Seconds from the first due time to the last answer.
    pub elapsed_s: f64,
    /// Requests sent per second over the schedule's length (what was actually offered).
    pub send_rate: f64,
    /// Answers of any kind per second, over `elapsed_s`.
    pub answer_rate: f64,
    /// Decisions (held, sold_out, limit_exceeded, 2xx, other 4xx) per second over `elapsed_s`.
    pub goodput: f64,
    pub latency: Latency,
    pub send_lag: Latency,
    pub outcomes: BTreeMap<String, u64>,
    pub other_detail: BTreeMap<String, u64>,
    pub idempotency_mismatches: u64,
    /// Requests without a decision: 429, 503, 504, other 5xx, client timeouts and errors, and
    /// requests never sent before the cut-off.
    pub errors: u64,
    /// Where the latency went, from the system's own histograms (empty without --metrics).
    pub hops: Vec<crate::hops::Hop>,
}

impl PhaseReport {
    pub fn error_fraction(&self) -> f64 {
        if self.planned_requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.planned_requests as f64
        }
    }
}

/// Connections, kept across phases (a ramp does not reconnect at every step).
pub struct Pool {
    pub addr: SocketAddr,
    pub conns: Vec<Option<Conn>>,
}

impl Pool {
    /// Opens `n` connections up front (in waves, so the listen backlog does not overflow).
    pub async fn open(addr: SocketAddr, n: usize) -> anyhow::Result<Pool> {
        let mut conns = Vec::with_capacity(n);
        let mut failures = 0;
        for chunk in (0..n).collect::<Vec<_>>().chunks(128) {
            let mut set = tokio::task::JoinSet::new();
            for _ in chunk {
                set.spawn(Conn::connect(addr));
            }
            while let Some(r) = set.join_next().await {
                match r? {
                    Ok(c) => conns.push(Some(c)),
                    Err(_) => {
                        failures += 1;
                        conns.push(None);
                    }
                }
            }
        }
        if failures == n {
            anyhow::bail!("cannot connect to {addr}");
        }
        Ok(Pool { addr, conns })
    }
}

struct Shared {
    addr: SocketAddr,
    next: AtomicU64,
    total: u64,
    start: Instant,
    /// No request is sent after this: the schedule's end plus one request timeout.
    cutoff: Instant,
    rate: f64,
    index_base: u64,
    timeout: Duration,
    workload: Workload,
    stats: Arc<Stats>,
}

async fn send(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    req: &Req,
) -> anyhow::Result<http::Response> {
    if conn.is_none() {
        *conn = Some(Conn::connect(addr).await?);
    }
    let c = conn.as_mut().expect("connected");
    c.request(req.method, &req.path, "", &req.body).await
}

async fn worker(mut conn: Option<Conn>, s: Arc<Shared>) -> Option<Conn> {
    loop {
        let n = s.next.fetch_add(1, Ordering::Relaxed);
        if n >= s.total {
            return conn;
        }
        let due = s.start + Duration::from_secs_f64(n as f64 / s.rate);
        let now = Instant::now();
        if now > s.cutoff {
            s.stats.count(Cat::NotSent, None);
            s.stats
                .latency
                .lock()
                .unwrap()
                .saturating_record(now.saturating_duration_since(due).as_micros() as u64);
            continue;
        }
        tokio::time::sleep_until(due.into()).await;
        let req = (s.workload)(s.index_base + n);
        let sent_at = Instant::now();
        s.stats
            .send_lag
            .lock()
            .unwrap()
            .saturating_record(sent_at.saturating_duration_since(due).as_micros() as u64);
        s.stats.sent.fetch_add(1, Ordering::Relaxed);
        s.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(s.timeout, send(&mut conn, s.addr, &req)).await;
        let latency = Instant::now().saturating_duration_since(due).as_micros() as u64;
        s.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(Ok(resp)) => {
                s.stats.answered.fetch_add(1, Ordering::Relaxed);
                s.stats.classify(&req, &resp);
                if conn.as_ref().is_some_and(|c| c.closed) {
                    conn = None;
                }
            }
            Ok(Err(e)) => {
                s.stats
                    .count(Cat::ClientErr, Some(format!("client: {}", short(&e))));
                conn = None;
            }
            Err(_) => {
                s.stats.count(Cat::Timeout, None);
                conn = None;
            }
        }
        s.stats.latency.lock().unwrap().saturating_record(latency);
    }
}

fn short(e: &anyhow::Error) -> String {
    let s = e.to_string();
    s.chars().take(60).collect()
}

/// Runs one phase over the pool's connections; prints a progress line each second unless quiet.
pub async fn run_phase(
    pool: &mut Pool,
    phase: &Phase,
    workload: Workload,
    timeout: Duration,
    quiet: bool,
) -> (PhaseReport, Arc<Stats>) {
    let planned =
        ((phase.rate * phase.duration.as_secs_f64()).round() as u64).min(phase.max_requests);
    let stats = Arc::new(Stats::new());
    let start = Instant::now() + Duration::from_millis(20);
    let cutoff = start + Duration::from_secs_f64(planned as f64 / phase.rate) + timeout;
    let shared = Arc::new(Shared {
        addr: pool.addr,
        next: AtomicU64::new(0),
        total: planned,
        start,
        cutoff,
        rate: phase.rate,
        index_base: phase.index_base,
        timeout,
        workload,
        stats: stats.clone(),
    });
    let done = Arc::new(AtomicBool::new(false));
    let progress = {
        let (stats, done, label) = (stats.clone(), done.clone(), phase.label.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                (start + Duration::from_secs(1)).into(),
                Duration::from_secs(1),
            );
            let mut last_answered = 0;
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let answered = stats.answered.load(Ordering::Relaxed);
                let p99 = stats.latency.lock().unwrap().value_at_quantile(0.99) as f64 / 1000.0;
                let errors: u64 = stats.total(Cat::S429, Cat::ClientErr);
                if !quiet {
                    eprintln!(
                        "[{label} {:>4.0}s] sent {:>9} answered {:>9} rate {:>6}/s in-flight {:>5} p99 {:>8.1} ms | held {} sold_out {} limit {} errors {}",
                        start.elapsed().as_secs_f64(),
                        stats.sent.load(Ordering::Relaxed),
                        answered,
                        answered - last_answered,
                        stats.in_flight.load(Ordering::Relaxed),
                        p99,
                        stats.cat(Cat::Held as usize),
                        stats.cat(Cat::SoldOut as usize),
                        stats.cat(Cat::Limit as usize),
                        errors,
                    );
                }
                last_answered = answered;
            }
        })
    };
    let mut set = tokio::task::JoinSet::new();
    for conn in pool.conns.drain(..) {
        set.spawn(worker(conn, shared.clone()));
    }
    let mut conns = Vec::new();
    while let Some(r) = set.join_next().await {
        conns.push(r.unwrap_or(None));
    }
    pool.conns = conns;
    let elapsed = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    progress.abort();
    let report = summarize(phase, planned, elapsed, &stats);
    (report, stats)
}

fn summarize(phase: &Phase, planned: u64, elapsed: f64, stats: &Stats) -> PhaseReport {
    let mut outcomes = BTreeMap::new();
    for (i, name) in CATEGORIES.iter().enumerate() {
        outcomes.insert((*name).to_owned(), stats.cat(i));
    }
    let sent = stats.sent.load(Ordering::Relaxed);
    let answered = stats.answered.load(Ordering::Relaxed);
    let settled: u64 = stats.total(Cat::Held, Cat::ClientErr);
    outcomes.insert("unanswered".into(), sent.saturating_sub(settled));
    let decisions: u64 = stats.total(Cat::Held, Cat::Other4xx);
    let errors: u64 = stats.total(Cat::S429, Cat::NotSent);
    let schedule_s = planned as f64 / phase.rate;
    PhaseReport {
        label: phase.label.clone(),
        offered_rate: phase.rate,
        planned_requests: planned,
        sent,
        answered,
        elapsed_s: elapsed,
        send_rate: sent as f64 / schedule_s.max(1e-9),
        answer_rate: answered as f64 / elapsed.max(1e-9),
        goodput: decisions as f64 / elapsed.max(1e-9),
        latency: Latency::of(&stats.latency.lock().unwrap()),
        send_lag: Latency::of(&stats.send_lag.lock().unwrap()),
        outcomes,
        other_detail: stats.detail.lock().unwrap().clone(),
        idempotency_mismatches: stats.idempotency_mismatches.load(Ordering::Relaxed),
        errors,
        hops: Vec::new(),
    }
}

/// The human table of one phase.
pub fn print_phase(r: &PhaseReport) {
    println!("── {} ──", r.label);
    println!(
        "  offered {:.0}/s for {} requests; sent {:.0}/s; answered {} in {:.1} s ({:.0}/s); decisions {:.0}/s",
        r.offered_rate, r.planned_requests, r.send_rate, r.answered, r.elapsed_s, r.answer_rate, r.goodput
    );
    let l = &r.latency;
    println!(
        "  latency ms (from scheduled send): p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
    );
    println!(
        "  send lag ms (generator behind schedule): p99 {:.2} max {:.2}",
        r.send_lag.p99_ms, r.send_lag.max_ms
    );
    let line: Vec<String> = r
        .outcomes
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("  outcomes: {}", line.join(", "));
    if !r.other_detail.is_empty() {
        let line: Vec<String> = r
            .other_detail
            .iter()
            .map(|(k, v)| format!("[{k}] {v}"))
            .collect();
        println!("  other: {}", line.join(", "));
    }
    if r.idempotency_mismatches > 0 {
        println!(
            "  IDEMPOTENCY MISMATCHES: {} retries got another reservation id",
            r.idempotency_mismatches
        );
    }
}
