//! Scaling on the requests topic's partitions: for each partition count, a requests topic
//! pre-filled with N reserve commands spread over one hot SKU per partition, ONE release
//! `sequencer run` serving every partition (a decide thread and a fenced writer each), timed
//! until every partition's committed offset reaches its end. Reported beside decisions/s: the
//! CPU of the sequencer, of Postgres (all its processes) and of the broker over the drain, the
//! commits, and the WAL bytes Postgres wrote, each per decision: the per-partition costs
//! docs/SCALING.md builds its capacity model on.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use wire::{Command as WireCommand, Request};

use crate::check;
use crate::pipeline::PipelineArgs;

#[derive(Clone, Debug, clap::Args)]
pub struct PartitionsArgs {
    /// Partition counts to measure, one run each (per batch size).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub partitions: Vec<u32>,
    /// The pipeline's own settings: requests over all partitions, batch sizes (a fixed cap per
    /// batch), stock of each partition's hot SKU, buyers, retries, status port, timeout.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Then, for each partition count, the `mixed` HTTP scenario (500 SKUs over the partitions)
    /// at this offered rate against a fresh system (one sequencer process serving every
    /// partition, one ingress); 0 skips it.
    #[arg(long, default_value_t = 0.0)]
    pub mixed_rate: f64,
    /// Seconds of the mixed scenario.
    #[arg(long, default_value_t = 20.0)]
    pub mixed_duration: f64,
    /// Port of the mixed runs' ingress (its sequencer's status port is --status-port + 1).
    #[arg(long, default_value_t = 18_190)]
    pub ingress_port: u16,
}

/// The mixed HTTP scenario on one partition count: what the clients saw and what each process
/// spent.
#[derive(Serialize, Clone, Debug, Default)]
pub struct MixedReport {
    pub partitions: u32,
    pub offered_rate: f64,
    pub decisions_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// HTTP requests answered over the whole run (SKU setup, the reservations, the follow-up
    /// reads, confirms and cancels).
    pub requests: u64,
    /// CPU microseconds per answered request, over the whole run, of the sequencer process, the
    /// ingress, Postgres, the broker and the load generator itself.
    pub sequencer_us_per_request: f64,
    pub ingress_us_per_request: f64,
    pub postgres_us_per_request: f64,
    pub broker_us_per_request: f64,
    pub load_generator_us_per_request: f64,
    pub check: String,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct PartitionsReport {
    pub partitions: u32,
    pub batch_size: usize,
    pub requests: u64,
    /// From the sequencer turning ready to every partition's committed offset at its end.
    pub drain_s: f64,
    pub decisions_per_s: f64,
    pub batches: i64,
    pub commits_per_s: f64,
    /// CPU seconds over the drain.
    pub sequencer_cpu_s: f64,
    pub postgres_cpu_s: f64,
    pub broker_cpu_s: f64,
    /// Per decision: microseconds of CPU, and bytes of WAL.
    pub sequencer_cpu_us_per_decision: f64,
    pub postgres_cpu_us_per_decision: f64,
    pub broker_cpu_us_per_decision: f64,
    pub wal_bytes_per_decision: f64,
    pub audit: String,
}

/// One hot SKU per partition: the first names `part-<run>-<k>` that hash to each.
fn skus(run: &str, partitions: u32) -> Vec<String> {
    let mut found: Vec<Option<String>> = vec![None; partitions as usize];
    let mut k = 0u64;
    while found.iter().any(Option::is_none) {
        let name = format!("part-{run}-{k}");
        let p = wire::partition::partition_of(&name, partitions) as usize;
        found[p].get_or_insert(name);
        k += 1;
    }
    found.into_iter().flatten().collect()
}

/// The pre-fill as (partition, payload): an upsert per SKU, then the reserves round-robin over
/// the SKUs, `retry_pct`% of them retries of an earlier key.
fn messages(
    args: &PipelineArgs,
    skus: &[String],
    partitions: u32,
    run: &str,
) -> Vec<(i32, Vec<u8>)> {
    let ingress_id = u64::from(crate::rand32());
    let base = uuid::Uuid::now_v7().as_u128();
    let mut out = Vec::with_capacity(args.requests as usize + skus.len());
    let mut push = |sku: &str, command: WireCommand| {
        let request_id = base + out.len() as u128;
        let partition = wire::partition::partition_of(sku, partitions) as i32;
        out.push((
            partition,
            wire::encode(&Request {
                request_id,
                ingress_id,
                command,
            }),
        ));
    };
    for sku in skus {
        let config = crate::pipeline::hot_sku(args);
        push(
            sku,
            WireCommand::UpsertSku {
                sku: sku.clone(),
                config,
            },
        );
    }
    for i in 0..args.requests {
        let orig = if i > 0 && crate::scenario::mix(i ^ 0xB1) % 100 < args.retry_pct {
            i - 1 - crate::scenario::mix(i ^ 0xB2) % i.min(500)
        } else {
            i
        };
        let sku = &skus[(orig % skus.len() as u64) as usize];
        let user = crate::scenario::mix(orig ^ 0xB3) % args.users;
        let command = WireCommand::Reserve {
            sku: sku.clone(),
            user_id: format!("u{user}"),
            quantity: 1,
            idempotency_key: format!("{run}-{orig}"),
        };
        push(sku, command);
    }
    out
}

/// utime + stime of process `pid`, in seconds (clock ticks of 1/100 s).
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// The CPU seconds of every process whose command line contains `needle` (dead ones drop out:
/// only short-lived backends, none of them doing the work measured here).
fn cpu_of_all(needle: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .map(cpu_s)
        .sum()
}

async fn wal_lsn(admin: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
            .fetch_one(admin)
            .await?,
    )
}

/// The CPU seconds so far of (sequencer, ingress, Postgres, broker, this process).
fn cpu_now(sequencer: u32, ingress: u32) -> [f64; 5] {
    [
        cpu_s(sequencer),
        cpu_s(ingress),
        cpu_of_all("postgres"),
        cpu_of_all("kafka.Kafka"),
        cpu_s(std::process::id()),
    ]
}

/// The mixed scenario at `--mixed-rate` on a fresh system with `partitions` partitions.
pub async fn mixed(args: &PartitionsArgs, partitions: u32) -> anyhow::Result<MixedReport> {
    use clap::Parser;
    let infra = &args.pipeline.infra;
    let opts = crate::stack::SystemOptions {
        name: format!("mixed_p{partitions}"),
        ingress_port: args.ingress_port,
        status_port: args.pipeline.status_port + 1,
        batch_size_max: 250,
        standby: false,
        partitions,
    };
    let stack = crate::stack::SystemStack::start(infra, &opts).await?;
    let pid = |i: usize| {
        stack.procs[i]
            .child
            .as_ref()
            .map_or(0, std::process::Child::id)
    };
    let (sequencer, ingress) = (pid(0), pid(stack.procs.len() - 1));
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        load: crate::scenario::LoadArgs,
    }
    let (rate, duration) = (args.mixed_rate.to_string(), args.mixed_duration.to_string());
    let (target, parts) = (
        format!("http://{}", stack.ingress_addr),
        partitions.to_string(),
    );
    let audit_bin = infra.bin("sequencer");
    let mut load = Cli::parse_from([
        "bench",
        "--scenario",
        "mixed",
        "--rate",
        &rate,
        "--duration",
        &duration,
        "--target",
        &target,
        "--admin-token",
        crate::stack::ADMIN_TOKEN,
        "--partitions",
        &parts,
        "--label",
        &format!("mixed-p{partitions}"),
    ])
    .load;
    load.database_url = Some(stack.fresh.topology.database_url.clone());
    load.audit_bin = Some(audit_bin);
    let before = cpu_now(sequencer, ingress);
    let result = crate::scenario::run(&load).await;
    let after = cpu_now(sequencer, ingress);
    stack.stop(infra).await;
    let report = result?;
    let phase = report.main_phase().cloned().unwrap_or_default();
    let requests: u64 = report.phases.iter().map(|p| p.answered).sum();
    let us = |i: usize| (after[i] - before[i]) * 1e6 / requests.max(1) as f64;
    Ok(MixedReport {
        partitions,
        offered_rate: args.mixed_rate,
        decisions_per_s: phase.goodput,
        p50_ms: phase.latency.p50_ms,
        p99_ms: phase.latency.p99_ms,
        errors: phase.errors,
        requests,
        sequencer_us_per_request: us(0),
        ingress_us_per_request: us(1),
        postgres_us_per_request: us(2),
        broker_us_per_request: us(3),
        load_generator_us_per_request: us(4),
        check: if report.check.violations.is_empty() && !report.check.oversell {
            "clean".into()
        } else {
            format!("FAILED: {:?}", report.check.violations)
        },
    })
}

/// Prints the mixed runs side by side.
pub fn print_mixed(reports: &[MixedReport]) {
    println!(
        "── mixed HTTP scenario by partition count: one sequencer process, one ingress; CPU us \
         per answered request ──"
    );
    println!(
        "  {:>10} {:>9} {:>12} {:>8} {:>8} {:>7} {:>6} {:>8} {:>6} {:>7} {:>6}  check",
        "partitions",
        "offered",
        "decisions/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "seq",
        "ingress",
        "pg",
        "broker",
        "load"
    );
    for r in reports {
        println!(
            "  {:>10} {:>9.0} {:>12.0} {:>8.1} {:>8.1} {:>7} {:>6.1} {:>8.1} {:>6.1} {:>7.1} {:>6.1}  {}",
            r.partitions, r.offered_rate, r.decisions_per_s, r.p50_ms, r.p99_ms, r.errors,
            r.sequencer_us_per_request, r.ingress_us_per_request, r.postgres_us_per_request,
            r.broker_us_per_request, r.load_generator_us_per_request, r.check
        );
    }
}

pub async fn run(args: &PartitionsArgs) -> anyhow::Result<Vec<PartitionsReport>> {
    let mut reports = Vec::new();
    for &batch_size in &args.pipeline.batch_sizes {
        for &p in &args.partitions {
            anyhow::ensure!((1..=64).contains(&p), "--partitions: 1 to 64 each");
            reports.push(run_one(&args.pipeline, p, batch_size).await?);
        }
    }
    println!("── scaling on partitions: one sequencer process, one hot SKU per partition ──");
    println!(
        "  {:>6} {:>10} {:>12} {:>10} {:>12} {:>14} {:>14} {:>14} {:>10}",
        "batch",
        "partitions",
        "decisions/s",
        "commits/s",
        "drain s",
        "seq us/dec",
        "pg us/dec",
        "broker us/dec",
        "WAL B/dec"
    );
    for r in &reports {
        println!(
            "  {:>6} {:>10} {:>12.0} {:>10.0} {:>12.2} {:>14.2} {:>14.2} {:>14.2} {:>10.0}",
            r.batch_size,
            r.partitions,
            r.decisions_per_s,
            r.commits_per_s,
            r.drain_s,
            r.sequencer_cpu_us_per_decision,
            r.postgres_cpu_us_per_decision,
            r.broker_cpu_us_per_decision,
            r.wal_bytes_per_decision
        );
    }
    Ok(reports)
}

async fn run_one(
    args: &PipelineArgs,
    partitions: u32,
    batch_size: usize,
) -> anyhow::Result<PartitionsReport> {
    let infra = &args.infra;
    let suffix = format!(
        "parts{partitions}b{batch_size}_{:06x}",
        crate::rand32() & 0xFF_FFFF
    );
    let fresh = infra
        .fresh_partitioned_topology(&suffix, partitions)
        .await?;
    let topology = fresh.topology.clone();
    let skus = skus(&suffix, partitions);
    let messages = messages(args, &skus, partitions, &suffix);
    let total = messages.len() as i64;
    eprintln!(
        "partitions {partitions}: producing {total} requests to {}",
        topology.requests_topic
    );
    let (parts, payloads): (Vec<i32>, Vec<Vec<u8>>) = messages.into_iter().unzip();
    let (brokers, topic) = (infra.brokers.clone(), topology.requests_topic.clone());
    tokio::task::spawn_blocking(move || {
        harness::topics::produce_to(&brokers, &topic, &payloads, |i| Some(parts[i]))
    })
    .await??;

    let admin = sqlx::PgPool::connect(&infra.pg_admin_url).await?;
    let status_addr: SocketAddr = format!("127.0.0.1:{}", args.status_port).parse()?;
    let log = format!("partitions-{partitions}-{batch_size}-sequencer");
    let mut proc_ =
        crate::pipeline::drain_sequencer(infra, &topology, status_addr, batch_size, &log).await?;
    let pid = proc_.child.as_ref().map_or(0, std::process::Child::id);
    let (seq0, pg0, broker0, wal0) = (
        cpu_s(pid),
        cpu_of_all("postgres"),
        cpu_of_all("kafka.Kafka"),
        wal_lsn(&admin).await?,
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_s);
    let mut last_print = Instant::now();
    let drain = loop {
        proc_.check_alive()?;
        let doc = crate::pipeline::status(status_addr).await;
        let committed: i64 = doc
            .as_ref()
            .and_then(|d| d["partitions"].as_array())
            .map_or(0, |ps| {
                ps.iter()
                    .map(|p| p["committed_offset"].as_i64().unwrap_or(0))
                    .sum()
            });
        if committed >= total {
            break started.elapsed();
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            eprintln!("partitions {partitions}: committed {committed}/{total}");
            last_print = Instant::now();
        }
        if Instant::now() > deadline {
            bail!(
                "the sequencer did not commit {total} requests within {}s",
                args.timeout_s
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (seq1, pg1, broker1, wal1) = (
        cpu_s(pid),
        cpu_of_all("postgres"),
        cpu_of_all("kafka.Kafka"),
        wal_lsn(&admin).await?,
    );
    proc_.stop();
    let mut batches = 0i64;
    for p in 0..partitions {
        let url = persistence::layout::derived_url(&topology.database_url, p)?;
        let pool = sqlx::PgPool::connect(&url).await?;
        batches += sqlx::query_scalar::<_, i64>("SELECT count(*) FROM batches")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
    }
    admin.close().await;
    let audit =
        check::run_partitions_audit(&infra.bin("sequencer"), &topology.database_url, partitions);
    infra.remove(&fresh);
    let drain_s = drain.as_secs_f64();
    let per = |x: f64| x * 1e6 / total as f64;
    let report = PartitionsReport {
        partitions,
        batch_size,
        requests: total as u64,
        drain_s,
        decisions_per_s: total as f64 / drain_s,
        batches,
        commits_per_s: batches as f64 / drain_s,
        sequencer_cpu_s: seq1 - seq0,
        postgres_cpu_s: pg1 - pg0,
        broker_cpu_s: broker1 - broker0,
        sequencer_cpu_us_per_decision: per(seq1 - seq0),
        postgres_cpu_us_per_decision: per(pg1 - pg0),
        broker_cpu_us_per_decision: per(broker1 - broker0),
        wal_bytes_per_decision: (wal1 - wal0) as f64 / total as f64,
        audit: audit.summary,
    };
    eprintln!(
        "partitions {partitions}: {:.0} decisions/s, {:.0} commits/s; audit {}",
        report.decisions_per_s, report.commits_per_s, report.audit
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn every_partition_gets_its_own_hot_sku() {
        let s = skus("t", 4);
        let mut parts: Vec<u32> = s
            .iter()
            .map(|k| wire::partition::partition_of(k, 4))
            .collect();
        parts.sort_unstable();
        assert_eq!(parts, [0, 1, 2, 3]);
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            pipeline: PipelineArgs,
        }
        let args = Cli::parse_from(["bench", "--requests", "100"]).pipeline;
        let m = messages(&args, &s, 4, "t");
        assert_eq!(m.len(), 104);
        for (p, payload) in &m {
            let r: Request = wire::decode(payload).unwrap();
            let sku = match &r.command {
                WireCommand::Reserve { sku, .. } | WireCommand::UpsertSku { sku, .. } => sku,
                other => panic!("{other:?}"),
            };
            assert_eq!(*p as u32, wire::partition::partition_of(sku, 4));
        }
    }
}
