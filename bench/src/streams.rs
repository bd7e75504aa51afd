//! `bench streams`: many live stock streams (`GET /v1/skus/{sku}/events`) on one SKU while a
//! load runs, and what they cost: how stale the counts are when they arrive, and the ingress's
//! CPU over the same window.
//!
//! Staleness of an event = its arrival here minus the `decided_at` of the batch its `id` names
//! (read from Postgres afterwards): commit, publish, the outcomes hop, the fan-out and the
//! coalescing (at most one event per 100 ms per stream) together. Same host, same clock.
//! Run it beside `bench load` against a system started with room for the streams
//! (STREAM_SUBSCRIBERS_MAX, CONNECTIONS_MAX): see docs/BENCHMARKS.md.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct StreamsArgs {
    /// Base URL of the ingress; loopback only.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Postgres of the target: the SKU (when not given) and the batches' times.
    #[arg(long)]
    pub database_url: String,
    /// The SKU to watch; default: the first SKU that appears in the database from now on.
    #[arg(long)]
    pub sku: Option<String>,
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// How long to keep the streams open (bounded).
    #[arg(long, default_value_t = 90)]
    pub seconds: u64,
    /// The ingress's process id, for its CPU time over the window.
    #[arg(long)]
    pub ingress_pid: Option<u32>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').context("/proc stat")? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// One stream: (batch id, arrival unix ms) of every event until `until`.
async fn subscribe(addr: String, path: String, until: Instant) -> anyhow::Result<Vec<(u32, u64)>> {
    let mut stream = TcpStream::connect(&addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut lines = BufReader::new(stream).lines();
    let status = lines.next_line().await?.unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("{status}");
    }
    let mut events = Vec::new();
    // Each event is one chunk of the chunked body, so its `id:` line is never split; the chunk
    // size lines in between are skipped with everything else that is not an id.
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(until.into(), lines.next_line()).await {
        if let Some(id) = line
            .strip_prefix("id: ")
            .or_else(|| line.strip_prefix("id:"))
        {
            if let Ok(id) = id.trim().parse::<u32>() {
                events.push((id, now_ms()));
            }
        }
    }
    Ok(events)
}

pub async fn run(args: &StreamsArgs) -> anyhow::Result<()> {
    let addr = args
        .target
        .strip_prefix("http://")
        .context("--target must be http://127.0.0.1:PORT")?
        .trim_end_matches('/')
        .to_owned();
    anyhow::ensure!(addr.starts_with("127.0.0.1:"), "loopback targets only");
    let pool = sqlx::PgPool::connect(&args.database_url).await?;
    let sku = match &args.sku {
        Some(s) => s.clone(),
        None => {
            let before: Vec<String> = sqlx::query_scalar("SELECT sku FROM skus")
                .fetch_all(&pool)
                .await?;
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let now: Vec<String> = sqlx::query_scalar("SELECT sku FROM skus")
                    .fetch_all(&pool)
                    .await?;
                if let Some(new) = now.into_iter().find(|s| !before.contains(s)) {
                    break new;
                }
                anyhow::ensure!(Instant::now() < deadline, "no new SKU within 120 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let path = format!("/v1/skus/{sku}/events");
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds.min(3_600));
    let cpu_before = args.ingress_pid.map(cpu_seconds).transpose()?;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.subscribers {
        tasks.spawn(subscribe(addr.clone(), path.clone(), until));
    }
    let (mut arrivals, mut refused, mut first_error) = (Vec::new(), 0usize, None);
    while let Some(done) = tasks.join_next().await {
        match done? {
            Ok(events) => arrivals.push(events),
            Err(e) => {
                refused += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    // The CPU window is the whole time asked for, streams or none (a baseline run).
    tokio::time::sleep_until(until.into()).await;
    let window = started.elapsed().as_secs_f64();
    let cpu = match (args.ingress_pid, cpu_before) {
        (Some(pid), Some(before)) => Some(cpu_seconds(pid)? - before),
        _ => None,
    };
    let mut ids: Vec<i64> = arrivals
        .iter()
        .flatten()
        .map(|&(id, _)| i64::from(id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let times: Vec<(i64, f64)> = sqlx::query_as(
        "SELECT batch_seq, (EXTRACT(EPOCH FROM decided_at) * 1000)::float8
           FROM batches WHERE batch_seq = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await?;
    let decided: rustc_hash::FxHashMap<i64, f64> = times.into_iter().collect();
    let mut staleness = Histogram::<u64>::new_with_bounds(1, 600_000, 3)?;
    let mut events = 0u64;
    // The first event of a stream is the state when it opened, maybe changed long before: only
    // the events sent because a batch committed count.
    for (id, at) in arrivals.iter().flat_map(|s| s.iter().skip(1)) {
        events += 1;
        if let Some(d) = decided.get(&i64::from(*id)) {
            let ms = (*at as f64 - d).max(1.0) as u64;
            staleness.saturating_record(ms);
        }
    }
    let connected = arrivals.len();
    println!(
        "sku {sku}: {connected} streams open, {refused} refused{}; {events} events in {window:.1} s \
         ({:.0}/s, {:.1} per stream); staleness p50 {} ms, p99 {} ms, max {} ms{}",
        first_error
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        events as f64 / window,
        events as f64 / connected.max(1) as f64,
        staleness.value_at_quantile(0.5),
        staleness.value_at_quantile(0.99),
        staleness.max(),
        cpu.map(|c| format!(
            "; ingress CPU {c:.1} s over the window ({:.0}% of a core)",
            100.0 * c / window
        ))
        .unwrap_or_default()
    );
    Ok(())
}
