//! `bench compare`: everything in one invocation on one machine. The pipeline benchmark, then
//! for each design (this system, naive Postgres, Redis+Lua) the `flash` scenario at the same
//! offered load and a `ramp` to its knee, each on a fresh database, then one JSON report and a
//! Markdown summary (also spliced into docs/BENCHMARKS.md between its markers).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::baseline;
use crate::pipeline::{self, PipelineArgs, PipelineReport};
use crate::scenario::{self, LoadArgs, LoadReport, Scenario};
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
    /// Ramp: first rate, factor per step, seconds per step, highest rate.
    #[arg(long, default_value_t = 250.0)]
    pub ramp_start: f64,
    #[arg(long, default_value_t = 1.6)]
    pub ramp_factor: f64,
    #[arg(long, default_value_t = 5.0)]
    pub ramp_step_secs: f64,
    #[arg(long, default_value_t = 80_000.0)]
    pub ramp_max: f64,
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
    pub date: String,
    pub ramp_start: f64,
    pub ramp_factor: f64,
    pub ramp_step_secs: f64,
    pub machine: String,
    /// /proc/loadavg when the run started and ended: other work on the machine shows here.
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub command: String,
    pub engine: Vec<EngineFigure>,
    pub pipeline: Vec<PipelineReport>,
    pub designs: Vec<DesignRuns>,
    pub errors: Vec<String>,
}

fn load_args(c: &CompareArgs, scenario: Scenario, target: String, label: &str) -> LoadArgs {
    LoadArgs {
        scenario,
        rate: if scenario == Scenario::Ramp {
            c.ramp_start
        } else {
            c.rate
        },
        duration: if scenario == Scenario::Ramp {
            c.ramp_step_secs
        } else {
            c.duration
        },
        connections: c.connections,
        target,
        max_requests: c.max_requests,
        timeout_ms: c.timeout_ms,
        admin_token: Some(ADMIN_TOKEN.into()),
        database_url: None,
        audit_bin: None,
        stock: None,
        users: 200_000,
        skus: 500,
        retry_pct: 5,
        ramp_factor: c.ramp_factor,
        ramp_max: c.ramp_max,
        p99_limit_ms: 120.0,
        no_follow_up: false,
        quiet: false,
        label: Some(label.to_owned()),
        metrics: Vec::new(),
        out: c.out.clone(),
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
        date: chrono::Utc::now().to_rfc3339(),
        ramp_start: c.ramp_start,
        ramp_factor: c.ramp_factor,
        ramp_step_secs: c.ramp_step_secs,
        machine: machine(),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        command: c.command_line.clone(),
        engine: engine_figures(&c.criterion_dir),
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
        };
        let result = async {
            let stack = SystemStack::start(&infra, &opts).await?;
            let mut args = load_args(
                &c,
                sc,
                format!("http://{}", stack.ingress_addr),
                &format!("system-{name}"),
            );
            args.database_url = Some(stack.topology.database_url.clone());
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
                        args.duration = c.baseline_duration.unwrap_or(c.duration);
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
    report.loadavg_end = loadavg();
    let json_path = dir.join("compare.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report)?)?;
    let md = markdown(&report, &dir);
    std::fs::write(dir.join("summary.md"), &md)?;
    splice_markdown(&c.markdown, &md)?;
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

/// Reads criterion's estimates for the engine benchmark (group `apply_batch`).
pub fn engine_figures(dir: &Path) -> Vec<EngineFigure> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("apply_batch")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "report" && n != "base") {
                if p.file_name().is_some_and(|n| n == "new") {
                    let est: serde_json::Value = std::fs::read(p.join("estimates.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    let bench: serde_json::Value = std::fs::read(p.join("benchmark.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    let ns = est["mean"]["point_estimate"].as_f64().unwrap_or(0.0);
                    let batch = bench["throughput"]["Elements"].as_u64().unwrap_or(0);
                    if ns > 0.0 && batch > 0 {
                        out.push(EngineFigure {
                            id: bench["full_id"].as_str().unwrap_or("?").to_owned(),
                            batch,
                            ns_per_batch: ns,
                            decisions_per_s: batch as f64 / (ns * 1e-9),
                        });
                    }
                } else {
                    stack.push(p);
                }
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

const BEGIN: &str =
    "<!-- bench:begin (generated by scripts/bench; edits inside are overwritten) -->";
const END: &str = "<!-- bench:end -->";

fn splice_markdown(path: &Path, generated: &str) -> anyhow::Result<()> {
    let block = format!("{BEGIN}\n{generated}\n{END}");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{block}{}", &text[..b], &text[e + END.len()..])
        }
        _ if text.is_empty() => format!("# Benchmarks\n\n{block}\n"),
        _ => format!("{text}\n{block}\n"),
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, new)?;
    Ok(())
}

fn f0(v: f64) -> String {
    let s = format!("{:.0}", v);
    // Thousands separators for readability.
    let bytes: Vec<char> = s.chars().collect();
    let mut out = String::new();
    for (i, ch) in bytes.iter().enumerate() {
        if i > 0 && (bytes.len() - i).is_multiple_of(3) && *ch != '-' && bytes[i - 1] != '-' {
            out.push(',');
        }
        out.push(*ch);
    }
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

/// This system's latency by hop, for the flash run and every ramp step (mean, and the bucket
/// bound of the p99, from the system's own histograms: docs/OPERATIONS.md).
fn hop_table(m: &mut String, r: &CompareReport) {
    use std::fmt::Write;
    let Some(sys) = r.designs.first() else {
        return;
    };
    let mut phases: Vec<&crate::load::PhaseReport> = Vec::new();
    phases.extend(sys.flash.iter().filter_map(|f| f.main_phase()));
    if let Some(ramp) = &sys.ramp {
        let mut steps: Vec<_> = ramp.phases.iter().collect();
        steps.sort_by(|a, b| a.offered_rate.total_cmp(&b.offered_rate));
        phases.extend(steps);
    }
    phases.retain(|p| !p.hops.is_empty());
    if phases.is_empty() {
        return;
    }
    let _ = writeln!(
        m,
        "\n### Where this system's latency goes, hop by hop\n\nMean ms (p99 bucket bound ms) of each hop of a write, from the ingress's and the sequencer's own histograms over each phase. The wait hop runs from the ingress's produce call to the decide loop taking the request, so it includes the append. Decide and commit are per batch.\n"
    );
    let _ = write!(m, "| phase | decisions/s | client p99 ms |");
    for (hop, _) in crate::hops::HOPS {
        let _ = write!(m, " {hop} |");
    }
    let _ = writeln!(m);
    let _ = writeln!(m, "|{}", " --- |".repeat(3 + crate::hops::HOPS.len()));
    for p in phases {
        let _ = write!(
            m,
            "| {} | {} | {:.1} |",
            p.label,
            f0(p.goodput),
            p.latency.p99_ms
        );
        for (_, series) in crate::hops::HOPS {
            let cell = p
                .hops
                .iter()
                .find(|h| h.series == *series)
                .map_or("-".to_owned(), |h| {
                    format!(
                        "{:.1} ({})",
                        h.mean_ms,
                        h.p99_le_ms
                            .map_or("over the top bucket".into(), |v| format!("{v}"))
                    )
                });
            let _ = write!(m, " {cell} |");
        }
        let _ = writeln!(m);
    }
}

fn markdown(r: &CompareReport, dir: &Path) -> String {
    use std::fmt::Write;
    let mut m = String::new();
    let _ = writeln!(m, "## Latest run\n");
    let _ = writeln!(m, "- date: {}", r.date);
    let _ = writeln!(m, "- machine: {}", r.machine);
    let _ = writeln!(m, "- command: `{}`", r.command);
    let _ = writeln!(
        m,
        "- load average (1/5/15 min) at start: {}; at end: {} (other work on the machine competes for the 2 cores)",
        r.loadavg_start, r.loadavg_end
    );
    let _ = writeln!(m, "- raw reports: `{}` (git-ignored)\n", dir.display());
    // Targets.
    let engine_best = r
        .engine
        .iter()
        .map(|e| e.decisions_per_s)
        .fold(0.0, f64::max);
    let pipe_best = r
        .pipeline
        .iter()
        .map(|p| p.decisions_per_s_batches)
        .fold(0.0, f64::max);
    let sys = r.designs.iter().find(|d| d.design == "this system");
    let sys_flash = sys.and_then(|d| d.flash.as_ref());
    let naive = r.designs.iter().find(|d| d.design.starts_with("naive"));
    let peak = |d: Option<&DesignRuns>| {
        d.and_then(|d| d.ramp.as_ref())
            .and_then(|r| r.ramp.as_ref())
            .and_then(|k| k.peak_goodput)
    };
    let knee = |d: Option<&DesignRuns>| {
        d.and_then(|d| d.ramp.as_ref())
            .and_then(|r| r.ramp.as_ref())
            .and_then(|k| k.knee_goodput)
    };
    let _ = writeln!(m, "### Targets\n");
    let _ = writeln!(m, "| target | measured | verdict |\n| --- | --- | --- |");
    if !r.engine.is_empty() {
        let _ = writeln!(
            m,
            "| engine >= 10M decisions/s, one thread | {} decisions/s (best batch size) | {} |",
            f0(engine_best),
            verdict(engine_best >= 10e6)
        );
    } else {
        let _ = writeln!(
            m,
            "| engine >= 10M decisions/s | not run (criterion output missing) | - |"
        );
    }
    if !r.pipeline.is_empty() {
        let _ = writeln!(
            m,
            "| pipeline >= 150k decisions/s | {} decisions/s (best batch size) | {} |",
            f0(pipe_best),
            verdict(pipe_best >= 150e3)
        );
    }
    if let Some(f) = sys_flash.and_then(|f| f.main_phase().map(|p| (f, p))) {
        let (rep, p) = f;
        let ok = p.latency.p99_ms < 120.0
            && p.errors == 0
            && !rep.check.oversell
            && rep.check.violations.is_empty()
            && p.send_rate >= 0.97 * p.offered_rate;
        let _ = writeln!(
            m,
            "| flash: {} req/s for {} s, p99 < 120 ms, no errors, no oversell | sent {}/s, answered {}/s, p99 {:.1} ms, {} errors, {} | {} |",
            f0(p.offered_rate),
            rep.duration_s,
            f0(p.send_rate),
            f0(p.answer_rate),
            p.latency.p99_ms,
            p.errors,
            if rep.check.oversell { "OVERSOLD" } else if rep.check.violations.is_empty() { "no oversell, audit clean" } else { "check problems" },
            verdict(ok)
        );
    }
    if let (Some(s), Some(n)) = (peak(sys), peak(naive)) {
        let _ = writeln!(
            m,
            "| >= 10x naive Postgres throughput (peak decisions/s, one hot SKU, every request a grant: `ramp`) | {} vs {} = {:.1}x | {} |",
            f0(s),
            f0(n),
            s / n,
            verdict(s >= 10.0 * n)
        );
    }
    if let (Some(s), Some(n)) = (knee(sys), knee(naive)) {
        let _ = writeln!(
            m,
            "| (the same at p99 <= 120 ms: ramp knee) | {} vs {} = {:.1}x | {} |",
            f0(s),
            f0(n),
            s / n,
            verdict(s >= 10.0 * n)
        );
    }
    // Engine.
    if !r.engine.is_empty() {
        let _ = writeln!(
            m,
            "\n### Engine (criterion, `Engine::apply_batch`, one thread)\n"
        );
        let _ = writeln!(
            m,
            "| benchmark | batch | time per batch | decisions/s |\n| --- | --- | --- | --- |"
        );
        for e in &r.engine {
            let _ = writeln!(
                m,
                "| {} | {} | {:.1} µs | {} |",
                e.id,
                e.batch,
                e.ns_per_batch / 1000.0,
                f0(e.decisions_per_s)
            );
        }
    }
    // Pipeline.
    if !r.pipeline.is_empty() {
        let _ = writeln!(
            m,
            "\n### Pipeline (one release sequencer, pre-filled topic, fresh database)\n"
        );
        let _ = writeln!(m, "| BATCH_SIZE_MAX | requests | decisions/s (batches table) | decisions/s (wall, incl. start) | bare consumer read rate (broker ceiling) | one watermark query | batches | batch size p50 / p99 / max | commit ms p50 / p99 / max (sampled) | batch interval ms p50 / p99 / max | audit |");
        let _ = writeln!(
            m,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for p in &r.pipeline {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} msg/s | {:.1} ms | {} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {:.0} / {:.0} / {:.0} | {} |",
                p.batch_size_max,
                f0(p.requests as f64),
                f0(p.decisions_per_s_batches),
                f0(p.decisions_per_s_wall),
                f0(p.broker_read_rate),
                p.watermark_query_ms,
                p.batches,
                p.batch_size.p50_ms,
                p.batch_size.p99_ms,
                p.batch_size.max_ms,
                p.commit_ms_sampled.p50_ms,
                p.commit_ms_sampled.p99_ms,
                p.commit_ms_sampled.max_ms,
                p.batch_interval_ms.p50_ms,
                p.batch_interval_ms.p99_ms,
                p.batch_interval_ms.max_ms,
                p.audit.as_ref().map_or("-".into(), |a| a.summary.clone()),
            );
        }
    }
    // Flash.
    let _ = writeln!(
        m,
        "\n### HTTP `flash` at the same offered load (one hot SKU, 10,000 units)\n"
    );
    let _ = writeln!(m, "| design | offered | sent/s | decisions/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | held | sold_out | limit_exceeded | 429 | 503 | 504 | other/timeouts/not sent | oversell check | this system ÷ design (decisions/s) |");
    let _ = writeln!(m, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let sys_goodput = sys_flash.and_then(|f| f.main_phase()).map(|p| p.goodput);
    for d in &r.designs {
        if let Some(skip) = &d.skipped {
            let _ = writeln!(m, "| {} | skipped: {skip} |||||||||||||||||", d.design);
            continue;
        }
        let Some(f) = &d.flash else {
            let _ = writeln!(m, "| {} | failed (see errors) |||||||||||||||||", d.design);
            continue;
        };
        let Some(p) = f.main_phase() else { continue };
        let o = |k: &str| p.outcomes.get(k).copied().unwrap_or(0);
        let other = o("other_4xx")
            + o("other_5xx")
            + o("client_timeout")
            + o("client_error")
            + o("not_sent")
            + o("unanswered");
        let _ = writeln!(
            m,
            "| {} | {}/s × {} s | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            d.design,
            f0(p.offered_rate),
            f.duration_s,
            f0(p.send_rate),
            f0(p.goodput),
            p.latency.p50_ms,
            p.latency.p90_ms,
            p.latency.p99_ms,
            p.latency.p999_ms,
            p.latency.max_ms,
            o("held"),
            o("sold_out"),
            o("limit_exceeded"),
            o("429"),
            o("503"),
            o("504"),
            other,
            if f.check.oversell {
                "OVERSOLD".to_owned()
            } else if f.check.violations.is_empty() {
                "clean".to_owned()
            } else {
                format!("{} problem(s)", f.check.violations.len())
            },
            sys_goodput.map_or("-".into(), |s| if p.goodput > 0.0 { format!("{:.2}x", s / p.goodput) } else { "∞".into() }),
        );
    }
    for d in &r.designs {
        if let Some(f) = &d.flash {
            for p in f.phases.iter().skip(1) {
                let o = |k: &str| p.outcomes.get(k).copied().unwrap_or(0);
                let _ = writeln!(
                    m,
                    "\n{} follow-up, {}: {} requests, 200 OK {}, p99 {:.1} ms, errors {}.",
                    d.design,
                    p.label,
                    p.sent,
                    o("ok_200"),
                    p.latency.p99_ms,
                    p.errors
                );
            }
            if let Some(a) = &f.check.audit {
                let _ = writeln!(
                    m,
                    "\n{} `sequencer audit` after flash: {}.",
                    d.design, a.summary
                );
            }
            for v in f.check.violations.iter().take(5) {
                let _ = writeln!(m, "\n{}: check problem: {v}", d.design);
            }
        }
    }
    // Ramp.
    let _ = writeln!(
        m,
        "\n### HTTP `ramp`: one hot SKU that never sells out (every request a grant)\n"
    );
    let _ = writeln!(
        m,
        "Steps of {} s, the rate ×{} per step from {}/s until decisions fall under 90% of the offered rate (or > 1% errors), then two bisection probes. Peak = most decisions/s of any step (throughput). Knee = highest offered rate whose step kept p99 <= 120 ms, < 1% errors and >= 90% of the offered rate as decisions.\n",
        r.ramp_step_secs, r.ramp_factor, r.ramp_start
    );
    let _ = writeln!(m, "| design | peak decisions/s (at offered/s, p99 ms) | knee (offered/s) | decisions/s at knee | p99 at knee ms | first rate over the limits | why | this system ÷ design: peak | this system ÷ design: knee |");
    let _ = writeln!(m, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let (sys_knee, sys_peak) = (knee(sys), peak(sys));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.1}x", a / b),
        _ => "-".into(),
    };
    let mut step_lines = Vec::new();
    for d in &r.designs {
        let Some(rr) = &d.ramp else {
            continue;
        };
        let Some(k) = rr.ramp.clone() else {
            continue;
        };
        let mut s: Vec<_> = rr.phases.iter().collect();
        s.sort_by(|a, b| a.offered_rate.total_cmp(&b.offered_rate));
        let steps: Vec<String> = s
            .iter()
            .map(|p| {
                format!(
                    "{}/s → {} decisions/s, p99 {:.0} ms",
                    f0(p.offered_rate),
                    f0(p.goodput),
                    p.latency.p99_ms
                )
            })
            .collect();
        step_lines.push(format!("- {}: {}", d.design, steps.join("; ")));
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            d.design,
            k.peak_goodput.map_or("-".into(), |g| format!(
                "{} ({}, {:.0})",
                f0(g),
                k.peak_offered_rate.map_or("-".into(), f0),
                k.peak_p99_ms.unwrap_or(0.0)
            )),
            k.knee_rate.map_or("none".into(), f0),
            k.knee_goodput.map_or("-".into(), f0),
            k.knee_p99_ms.map_or("-".into(), |v| format!("{v:.1}")),
            k.first_failing_rate
                .map_or("none below the ramp's top".into(), f0),
            k.failing_reason.clone().unwrap_or_default(),
            ratio(sys_peak, k.peak_goodput),
            ratio(sys_knee, k.knee_goodput),
        );
    }
    if !step_lines.is_empty() {
        let _ = writeln!(m, "\nSteps:\n\n{}", step_lines.join("\n"));
    }
    hop_table(&mut m, r);
    if !r.errors.is_empty() {
        let _ = writeln!(m, "\n### Errors during the run\n");
        for e in &r.errors {
            let _ = writeln!(m, "- {e}");
        }
    }
    m
}
