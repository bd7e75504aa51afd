//! `bench`: the project's own benchmark harness.
//!
//! - `bench load`: open-loop HTTP load (scenarios flash, mixed, ramp) against a running API.
//! - `bench pipeline`: the sequencer alone, fed from a pre-filled requests topic.
//! - `bench coldstart`: a sequencer's cold start with millions of stored decisions, and a
//!   following standby's takeover.
//! - `bench baseline-server`: the naive Postgres and Redis+Lua designs behind the same contract.
//! - `bench compare`: all of it in one invocation, with a JSON report and a Markdown summary.
//! - `bench streams`: many live stock streams on one SKU during a load, and what they cost.
//!
//! The engine micro-benchmark is criterion's, in `engine/benches/engine.rs`.
//! Every load is bounded in time and count and goes to loopback addresses only.

mod baseline;
mod check;
mod coldstart;
mod compare;
mod hops;
mod http;
mod load;
mod partitions;
mod pipeline;
mod ramp;
mod scenario;
mod stack;
mod streams;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Benchmarks of the flash-sale sequencer and its baselines (loopback only).")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open-loop HTTP load against a running API; prints a table and writes a JSON report.
    Load(scenario::LoadArgs),
    /// The sequencer alone: pre-filled topic, one `sequencer run`, decisions/s.
    Pipeline(pipeline::PipelineArgs),
    /// Scaling on partitions: a pre-filled topic of 1, 2, 4 partitions, one sequencer process
    /// serving them all; decisions/s and the CPU, commits and WAL bytes per decision.
    Partitions(partitions::PartitionsArgs),
    /// Cold start of a sequencer at 1M, 5M and 10M stored decisions, and a standby's takeover.
    Coldstart(coldstart::ColdStartArgs),
    /// Serves a baseline design (naive Postgres or Redis+Lua) behind the same HTTP contract.
    BaselineServer(baseline::ServerArgs),
    /// Many live stock streams on one SKU during a load: staleness of the counts, ingress CPU.
    Streams(streams::StreamsArgs),
    /// Pipeline, then flash and ramp against this system and each baseline; one report.
    Compare(compare::CompareArgs),
    /// Starts a fresh system (sequencer + ingress, fresh database and topics) for manual runs
    /// and profiling; prints its URLs and tears it down after --seconds or Ctrl-C.
    SystemUp {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        #[arg(long, default_value_t = 18_180)]
        ingress_port: u16,
        #[arg(long, default_value_t = 19_180)]
        status_port: u16,
        #[arg(long, default_value_t = 250)]
        batch_size_max: usize,
        #[command(flatten)]
        infra: stack::Infra,
    },
}

pub use harness::rand32;

/// Writes `value` as `bench/results/<kind>-<UTC time>.json`; returns the path.
fn write_result(kind: &str, value: &impl serde::Serialize) -> anyhow::Result<String> {
    std::fs::create_dir_all("bench/results")?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let path = format!("bench/results/{kind}-{stamp}.json");
    std::fs::write(&path, serde_json::to_vec_pretty(value)?)?;
    Ok(path)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Load(args) => runtime().block_on(async {
            let report = scenario::run(&args).await?;
            let path = scenario::write_report(&args.out, &report)?;
            println!("report: {}", path.display());
            let bad = report.check.oversell || !report.check.violations.is_empty();
            anyhow::Ok(!bad)
        }),
        Cmd::Pipeline(args) => runtime().block_on(async {
            let mut all = Vec::new();
            for &b in &args.batch_sizes {
                all.push(pipeline::run_one(&args, b).await?);
            }
            println!("report: {}", write_result("pipeline", &all)?);
            anyhow::Ok(all.iter().all(|r| r.audit.as_ref().is_none_or(|a| a.clean)))
        }),
        Cmd::Partitions(args) => runtime().block_on(async {
            let reports = partitions::run(&args).await?;
            let mut mixed = Vec::new();
            if args.mixed_rate > 0.0 {
                for &p in &args.partitions {
                    mixed.push(partitions::mixed(&args, p).await?);
                }
                partitions::print_mixed(&mixed);
            }
            let all = serde_json::json!({"pipeline": reports, "mixed": mixed});
            println!("report: {}", write_result("partitions", &all)?);
            anyhow::Ok(
                reports.iter().all(|r| r.audit.starts_with("clean"))
                    && mixed.iter().all(|m| m.check == "clean"),
            )
        }),
        Cmd::Coldstart(args) => runtime().block_on(async {
            let report = coldstart::run(&args).await?;
            println!("report: {}", write_result("coldstart", &report)?);
            anyhow::Ok(true)
        }),
        Cmd::BaselineServer(args) => baseline::serve(args).map(|()| true),
        Cmd::Compare(args) => runtime().block_on(compare::run(args)).map(|()| true),
        Cmd::Streams(args) => runtime().block_on(async move {
            streams::run(&args).await?;
            anyhow::Ok(true)
        }),
        Cmd::SystemUp {
            seconds,
            ingress_port,
            status_port,
            batch_size_max,
            infra,
        } => runtime().block_on(async move {
            let opts = stack::SystemOptions {
                name: "manual".into(),
                ingress_port,
                status_port,
                batch_size_max,
                standby: false,
                partitions: 1,
            };
            let s = stack::SystemStack::start(&infra, &opts).await?;
            println!(
                "target http://{} (admin token {}), status http://127.0.0.1:{status_port}/status, database {}",
                s.ingress_addr,
                stack::ADMIN_TOKEN,
                s.fresh.topology.database_url
            );
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(seconds)) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            s.stop(&infra).await;
            anyhow::Ok(true)
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
