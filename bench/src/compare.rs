//! `bench compare`: everything in one invocation on one machine. The pipeline benchmark, then
//! for each design (this system, naive Postgres, Redis+Lua) the `flash` scenario at the same
//! offered load and a `ramp` to its knee, each on a fresh database, then one JSON report and a
//! Markdown summary (also spliced into docs/BENCHMARKS.md between its markers).
//!
//! This file runs the benchmarks; `compare/criterion.rs` reads the engine's criterion figures and
//! `compare/summary.rs` writes the Markdown summary.

mod criterion;
mod summary;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::baseline;
use crate::pipeline::{self, PipelineArgs, PipelineReport};
use crate::scenario::{self, LoadArgs, LoadReport, OfferedLoad, Scenario};
use crate::stack::{BaselineStack, Infra, SystemOptions, SystemStack, ADMIN_TOKEN};

#[derive(Clone, Debug, clap::Args)]
pub struct CompareArgs {
    /// Offered rate of the flash runs (every design gets the same).
    #[arg(long, default_value_t = 25_000.0)]
    pub rate: f64,
    /// Seconds of flash load for this system.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Seconds of flash load for the baselines (default: the same).
    #[arg(long)]
    pub baseline_duration: Option<f64>,
    #[arg(long, default_value_t = 2_000)]
    pub connections: usize,
    /// Hard cap on the requests of any one load run.
    #[arg(long, default_value_t = 2_000_000)]
    pub max_requests: u64,
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub ramp: RampPlan,
    #[arg(long)]
    pub skip_ramp: bool,
    #[arg(long)]
    pub skip_pipeline: bool,
    #[arg(long)]
    pub skip_baselines: bool,
    /// Pipeline benchmark size and batch sizes.
    #[arg(long, default_value_t = 200_000)]
    pub pipeline_requests: u64,
    #[arg(long, value_delimiter = ',', default_value = "250,2000")]
    pub batch_sizes: Vec<usize>,
    /// BATCH_SIZE_MAX of the sequencer in the HTTP runs.
    #[arg(long, default_value_t = 250)]
    pub http_batch_size: usize,
    /// Also run a standby sequencer during the HTTP runs (as in production; costs CPU here).
    #[arg(long)]
    pub standby: bool,
    /// Loopback ports (chosen not to clash with scripts/up's 8080 and 9101/9102).
    #[arg(long, default_value_t = 18_180)]
    pub ingress_port: u16,
    #[arg(long, default_value_t = 19_180)]
    pub status_port: u16,
    #[arg(long, default_value_t = 18_181)]
    pub naive_port: u16,
    #[arg(long, default_value_t = 18_182)]
    pub redis_port: u16,
    #[arg(long, default_value_t = 19_181)]
    pub pipeline_status_port: u16,
    /// Postgres connections of the naive baseline's pool.
    #[arg(long, default_value_t = 32)]
    pub naive_pool: u32,
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub redis: String,
    #[arg(long, default_value_t = 32)]
    pub redis_pool: u32,
    /// Results directory (a time-stamped folder is created inside).
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Markdown file whose generated section is replaced (between the bench markers).
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub markdown: PathBuf,
    /// Criterion's output folder, for the engine figures (run `cargo bench -p engine` first).
    #[arg(long, default_value = "target/criterion")]
    pub criterion_dir: PathBuf,
    /// The command line recorded in the summary.
    #[arg(long, default_value = "scripts/bench")]
    pub command_line: String,
    #[command(flatten)]
    pub infra: Infra,
}

/// The steps of every design's `ramp` run, as asked for; the report records them all but the
/// highest rate.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct RampPlan {
    /// Ramp: first rate, factor per step, seconds per step, highest rate.
    #[arg(long, default_value_t = 250.0)]
    pub ramp_start: f64,
    #[arg(long, default_value_t = 1.6)]
    pub ramp_factor: f64,
    #[arg(long, default_value_t = 5.0)]
    pub ramp_step_secs: f64,
    #[arg(long, default_value_t = 80_000.0)]
    #[serde(skip)]
    pub ramp_max: f64,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct EngineFigure {
    pub id: String,
    pub batch: u64,
    pub ns_per_batch: f64,
    pub decisions_per_s: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct DesignRuns {
    pub design: String,
    pub flash: Option<LoadReport>,
    pub ramp: Option<LoadReport>,
    pub skipped: Option<String>,
}

impl DesignRuns {
    /// Files one scenario's report (saved under `dir`) or its error.
    fn keep(
        &mut self,
        dir: &Path,
        sc: Scenario,
        result: anyhow::Result<LoadReport>,
        errors: &mut Vec<String>,
        what: &str,
    ) {
        match result {
            Ok(r) => {
                save(dir, &r);
                match sc {
                    Scenario::Ramp => self.ramp = Some(r),
                    _ => self.flash = Some(r),
                }
            }
            Err(e) => errors.push(format!("{what}: {e:#}")),
        }
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct CompareReport {
    #[serde(flatten)]
    pub run: RunInfo,
    #[serde(flatten)]
    pub ramp: RampPlan,
    pub engine: Vec<EngineFigure>,
    pub pipeline: Vec<PipelineReport>,
    pub designs: Vec<DesignRuns>,
    pub errors: Vec<String>,
}

fn load_args(c: &CompareArgs, scenario: Scenario, target: String, label: &str) -> LoadArgs {
    LoadArgs {
        scenario,
        offered: OfferedLoad {
            rate: if scenario == Scenario::Ramp {
                c.ramp.ramp_start
            } else {
                c.rate
            },
            duration: if scenario == Scenario::Ramp {
                c.ramp.ramp_step_secs
            } else {
                c.duration
            },
            connections: c.connections,
        },
        target,
        max_requests: c.max_requests,
        timeout_ms: c.timeout_ms,
        admin_token: Some(ADMIN_TOKEN.into()),
        database_url: None,
        audit_bin: None,
        partitions: 1,
        stock: None,
        users: 200_000,
        skus: 500,
        retry_pct: 5,
        ramp_factor: c.ramp.ramp_factor,
        ramp_max: c.ramp.ramp_max,
        p99_limit_ms: 120.0,
        no_follow_up: false,
        quiet: false,
        label: Some(label.to_owned()),
        metrics: Vec::new(),
        out: c.out.clone(),
    }
}

/// When, on what machine and by what command the run was made (the summary's first lines).
#[derive(Serialize, Clone, Debug)]
pub struct RunInfo {
    pub date: String,
    pub machine: String,
    /// /proc/loadavg when the run started and ended: other work on the machine shows here.
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub command: String,
}

impl RunInfo {
    /// The run starting now, with the machine's load average now.
    fn start(command: &str) -> RunInfo {
        RunInfo {
            date: chrono::Utc::now().to_rfc3339(),
            machine: machine(),
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            command: command.to_owned(),
        }
    }

    /// Records the load average at the end of the run.
    fn end(&mut self) {
        self.loadavg_end = loadavg();
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    // scripts/bench says which broker it started or found (BENCH_BROKER).
    let broker = std::env::var("BENCH_BROKER").unwrap_or_else(|_| "Kafka-API broker".into());
    format!(
        "{cores} cores ({cpu}), {mem_gib:.0} GiB; everything co-located: load generator, ingress, sequencer, {broker}, Postgres 15, Redis"
    )
}

pub async fn run(c: CompareArgs) -> anyhow::Result<()> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let dir = c.out.join(format!("compare-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    let mut infra = c.infra.clone();
    infra.log_dir = dir.join("logs");
    let mut errors = Vec::new();
    let mut report = CompareReport {
        run: RunInfo::start(&c.command_line),
        ramp: c.ramp.clone(),
        engine: criterion::engine_figures(&c.criterion_dir),
        pipeline: Vec::new(),
        designs: Vec::new(),
        errors: Vec::new(),
    };
    if !c.skip_pipeline {
        let p = PipelineArgs {
            requests: c.pipeline_requests,
            batch_sizes: c.batch_sizes.clone(),
            stock: 10_000,
            users: 200_000,
            retry_pct: 5,
            status_port: c.pipeline_status_port,
            timeout_s: 600,
            infra: infra.clone(),
        };
        for &b in &c.batch_sizes {
            match pipeline::run_one(&p, b).await {
                Ok(r) => report.pipeline.push(r),
                Err(e) => errors.push(format!("pipeline BATCH_SIZE_MAX={b}: {e:#}")),
            }
        }
    }
    // This system.
    let mut system = DesignRuns {
        design: "this system".into(),
        flash: None,
        ramp: None,
        skipped: None,
    };
    let scenarios: Vec<Scenario> = if c.skip_ramp {
        vec![Scenario::Flash]
    } else {
        vec![Scenario::Flash, Scenario::Ramp]
    };
    for &sc in &scenarios {
        let name = format!("{sc:?}").to_lowercase();
        let opts = SystemOptions {
            name: format!("system_{name}"),
            ingress_port: c.ingress_port,
            status_port: c.status_port,
            batch_size_max: c.http_batch_size,
            standby: c.standby,
            partitions: 1,
        };
        let result = async {
            let stack = SystemStack::start(&infra, &opts).await?;
            let mut args = load_args(
                &c,
                sc,
                format!("http://{}", stack.ingress_addr),
                &format!("system-{name}"),
            );
            args.database_url = Some(stack.fresh.topology.database_url.clone());
            args.audit_bin = Some(infra.bin("sequencer"));
            args.metrics = stack.metrics_urls.clone();
            let r = scenario::run(&args).await;
            stack.stop(&infra).await;
            r
        }
        .await;
        system.keep(&dir, sc, result, &mut errors, &format!("system {name}"));
    }
    report.designs.push(system);
    // Baselines.
    if !c.skip_baselines {
        for kind in ["naive", "redis"] {
            let mut runs = DesignRuns {
                design: if kind == "naive" {
                    "naive Postgres (row update per request)".into()
                } else {
                    "Redis + Lua".into()
                },
                flash: None,
                ramp: None,
                skipped: None,
            };
            if kind == "redis" && !baseline::redis_available(&c.redis).await {
                let why = format!(
                    "no Redis answered PING on {}: Redis baseline SKIPPED",
                    c.redis
                );
                eprintln!("bench: {why}");
                runs.skipped = Some(why);
                report.designs.push(runs);
                continue;
            }
            let port = if kind == "naive" {
                c.naive_port
            } else {
                c.redis_port
            };
            let pool = if kind == "naive" {
                c.naive_pool
            } else {
                c.redis_pool
            };
            for &sc in &scenarios {
                let name = format!("{sc:?}").to_lowercase();
                let result = async {
                    let stack = BaselineStack::start(&infra, kind, port, pool, &c.redis).await?;
                    let mut args = load_args(
                        &c,
                        sc,
                        format!("http://{}", stack.addr),
                        &format!("{kind}-{name}"),
                    );
                    if sc == Scenario::Flash {
                        args.offered.duration = c.baseline_duration.unwrap_or(c.duration);
                    }
                    args.database_url = stack.database_url.clone();
                    let r = scenario::run(&args).await;
                    stack.stop(&infra).await;
                    r
                }
                .await;
                runs.keep(&dir, sc, result, &mut errors, &format!("{kind} {name}"));
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            report.designs.push(runs);
        }
    }
    for e in &errors {
        eprintln!("bench: ERROR {e}");
    }
    report.errors = errors;
    report.run.end();
    let json_path = dir.join("compare.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report)?)?;
    let md = summary::markdown(&report, &dir);
    std::fs::write(dir.join("summary.md"), &md)?;
    summary::splice_markdown(&c.markdown, &md)?;
    println!("{md}");
    println!(
        "bench: reports in {} (compare.json, summary.md); {} updated",
        dir.display(),
        c.markdown.display()
    );
    Ok(())
}

fn save(dir: &Path, r: &LoadReport) {
    if let Err(e) = scenario::write_report(dir, r) {
        eprintln!("bench: could not write report: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_keeps_its_top_level_keys() {
        let report = CompareReport {
            run: RunInfo::start("scripts/bench"),
            ramp: RampPlan {
                ramp_start: 250.0,
                ramp_factor: 1.6,
                ramp_step_secs: 5.0,
                ramp_max: 80_000.0,
            },
            engine: Vec::new(),
            pipeline: Vec::new(),
            designs: Vec::new(),
            errors: Vec::new(),
        };
        let v = serde_json::to_value(&report).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "command",
                "date",
                "designs",
                "engine",
                "errors",
                "loadavg_end",
                "loadavg_start",
                "machine",
                "pipeline",
                "ramp_factor",
                "ramp_start",
                "ramp_step_secs"
            ]
        );
        assert_eq!(v["ramp_factor"], 1.6);
        assert_eq!(v["command"], "scripts/bench");
    }
}
