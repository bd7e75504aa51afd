//! `sequencer run` decides (or stands by); `sequencer audit` checks every invariant over Postgres;
//! `sequencer rebase-log` is the way back from a lost requests log.
//!
//! Exit codes of `sequencer run`: 0 stopped on request (SIGTERM, Ctrl-C); 1 could not start or
//! hit an error that a restart may fix; 2 invalid configuration; 3 deposed: another sequencer
//! took over (its fence or lease is newer), restart it as a standby; 4 the requests log lost what
//! Postgres has decided (topic deleted or recreated, truncated, expired): nothing more is decided
//! until `sequencer rebase-log` (docs/OPERATIONS.md); 5 fatal: Postgres and the engine disagree
//! about an invariant (a batch violated a constraint, the stored rows do not add up, an engine
//! assertion failed): do not restart blindly, audit first.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kafka_config::LogArgs;
use sequencer::admin;
use sequencer::runtime::{Config, Sequencer, Stop};

#[derive(Parser)]
#[command(version, about = "Flash-sale inventory sequencer: the single writer.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "LOG_JSON", global = true)]
    log_json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Follow the log as a standby and decide when this process holds the lease.
    ///
    /// Exit codes: 0 stopped on request; 1 error (a restart may fix it); 2 invalid
    /// configuration; 3 deposed by another sequencer (restart as standby); 4 the requests log
    /// lost what Postgres decided (run `sequencer rebase-log`).
    Run(RunArgs),
    /// Check every invariant over Postgres; exit 1 on any violation.
    ///
    /// With REQUEST_PARTITIONS above 1 every partition's database is audited.
    Audit {
        #[command(flatten)]
        store: StoreArgs,
        /// Print the report as JSON (an array of reports, one per partition, when there are
        /// several).
        #[arg(long)]
        json: bool,
    },
    /// Show the group: the fence row in Postgres and each sequencer's /status.
    Status {
        #[command(flatten)]
        store: StoreArgs,
        /// Comma-separated status URLs of the sequencers (http://127.0.0.1:9101,...).
        #[arg(long, env = "SEQUENCER_PEERS", value_delimiter = ',')]
        peers: Vec<String>,
    },
    /// After the requests log was lost (topic deleted or recreated, truncated, expired), record
    /// in Postgres that decisions continue at an offset of a new log generation, keeping every
    /// committed decision. Refuses while the current log still holds everything decided.
    RebaseLog {
        #[command(flatten)]
        store: StoreArgs,
        /// The partition of the requests topic whose log was lost (each has its own database
        /// and its own log generations).
        #[arg(long, default_value_t = 0)]
        partition: u32,
        #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
        brokers: String,
        /// The topic the new generation reads (the configured requests topic).
        #[arg(long, env = "REQUESTS_TOPIC", default_value = "reservation-requests")]
        requests_topic: String,
        /// Continue at this offset of the topic. By default: a recreated (or another) topic from
        /// its first offset, so every request appended since the loss is decided; the same
        /// topic, truncated or cut short, at the committed offset clamped into what it holds, so
        /// nothing already decided is decided again.
        #[arg(long, conflicts_with_all = ["at_start", "at_end"])]
        offset: Option<i64>,
        /// Continue at the topic's first offset.
        #[arg(long, conflicts_with = "at_end")]
        at_start: bool,
        /// Continue at the topic's current end: requests appended since the loss are never
        /// decided (their buyers got 504 and retry with their key).
        #[arg(long)]
        at_end: bool,
        /// Rebase even when the current log looks whole.
        #[arg(long)]
        force: bool,
        /// Check and print what would happen; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why, for the record in log_generations.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Create the requests topic (REQUEST_PARTITIONS partitions) and the outcomes topic (one)
    /// if they do not exist; fail when one exists with another partition count.
    CreateTopics {
        #[command(flatten)]
        log: LogArgs,
    },
    /// Delete topics, and every message in them (wiping a test stack; never in operation).
    DeleteTopics {
        #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(required = true)]
        topics: Vec<String>,
    },
}

/// Another sequencer took over: this one wrote nothing after its fence failed.
const EXIT_DEPOSED: u8 = 3;
/// The requests log lost what Postgres has decided: run `sequencer rebase-log`.
const EXIT_LOG_LOST: u8 = 4;
/// Postgres and the engine disagree about an invariant (a constraint violated by a batch, rows
/// that do not add up, a broken assertion): do not restart blindly; audit first.
const EXIT_FATAL: u8 = 5;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/flash";

/// Where a store's partitions keep their state (`persistence::layout`).
#[derive(Args)]
struct StoreArgs {
    /// Partition 0's database; partition p's is the same with `_p{p}` after the name, unless
    /// DATABASE_URLS names them all.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    database_url: String,
    /// One database URL per partition, in partition order (comma-separated).
    #[arg(long, env = "DATABASE_URLS", value_delimiter = ',')]
    database_urls: Vec<String>,
    #[arg(long, env = "REQUEST_PARTITIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=wire::partition::PARTITIONS_MAX as i64))]
    request_partitions: u32,
}

impl StoreArgs {
    fn urls(&self) -> anyhow::Result<Vec<String>> {
        persistence::layout::database_urls(
            &self.database_url,
            &self.database_urls,
            self.request_partitions,
        )
    }
}

#[derive(Args)]
struct RunArgs {
    /// Partition 0's database; partition p's is the same with `_p{p}` after the name, unless
    /// DATABASE_URLS names them all.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    database_url: String,
    /// One database URL per partition of the requests topic, in partition order (comma-separated).
    #[arg(long, env = "DATABASE_URLS", value_delimiter = ',')]
    database_urls: Vec<String>,
    #[command(flatten)]
    log: LogArgs,
    /// The partitions this process serves, as leader or standby (comma-separated; default all).
    #[arg(long, env = "SEQUENCER_PARTITIONS", value_delimiter = ',')]
    partitions: Vec<u32>,
    /// The partitions this process takes the lease of as soon as it is free (default: every one
    /// it serves). It takes the others only after LEAD_OTHERS_AFTER_MS from its start, so that
    /// processes started together each lead their own share; a failover is not delayed by it.
    #[arg(long, env = "LEAD_PARTITIONS", value_delimiter = ',')]
    lead_partitions: Option<Vec<u32>>,
    #[arg(long, env = "LEAD_OTHERS_AFTER_MS", default_value_t = 3_000)]
    lead_others_after_ms: u64,
    /// Name of this process in the lease row and the logs (default: host-pid).
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// Most requests decided and committed together.
    #[arg(long, env = "BATCH_SIZE_MAX", default_value_t = 250)]
    batch_size_max: usize,
    /// Most requests per batch while a backlog waits (more than BATCH_SIZE_MAX already read):
    /// bigger transactions when falling behind, normal ones otherwise.
    #[arg(long, env = "BATCH_SIZE_BACKLOG_MAX", default_value_t = 2_000)]
    batch_size_backlog_max: usize,
    /// Longest wait for more requests once a batch has one and fewer than the maximum.
    #[arg(long, env = "LINGER_MS", default_value_t = 1)]
    linger_ms: u64,
    /// The requests consumer's `fetch.wait.max.ms`: how long the broker may hold a fetch when
    /// there is nothing new. Apache Kafka answers a waiting fetch as soon as data arrives, so
    /// this costs no latency there and only bounds idle polling. tansu 0.6 (BROKER=tansu) holds
    /// every fetch for the whole wait: run it with 1 (docs/BENCHMARKS.md).
    #[arg(long, env = "FETCH_WAIT_MAX_MS", default_value_t = 100)]
    fetch_wait_max_ms: u64,
    /// How long the lease lasts without renewal: the longest a dead leader blocks a takeover.
    #[arg(long, env = "LEASE_MS", default_value_t = 600)]
    lease_ms: u64,
    /// How often the leader renews its lease (several renewals fit in one lease).
    #[arg(long, env = "RENEW_MS", default_value_t = 150)]
    renew_ms: u64,
    /// How often a standby replays new batches and tries to take a lapsed lease.
    #[arg(long, env = "STANDBY_POLL_MS", default_value_t = 50)]
    standby_poll_ms: u64,
    /// A new leader re-publishes the outcomes of batches committed this long before the last.
    #[arg(long, env = "REPUBLISH_WINDOW_MS", default_value_t = 10_000)]
    republish_window_ms: u64,
    /// Longest a replay (a standby following, or a new leader catching up) waits for one
    /// batch's requests from the log before giving up and reloading state from Postgres.
    #[arg(long, env = "TAKEOVER_TIMEOUT_MS", default_value_t = 10_000)]
    takeover_timeout_ms: u64,
    /// Where /healthz, /readyz and /status are served.
    #[arg(long, env = "STATUS_ADDR")]
    status_addr: Option<SocketAddr>,
    /// The leader writes a checkpoint of the engine state after this many batches...
    #[arg(long, env = "CHECKPOINT_BATCHES", default_value_t = 1_000)]
    checkpoint_batches: u64,
    /// ...or this long after the last one, whichever comes first. A start-up replays at most
    /// about this much of the log after the newest checkpoint.
    #[arg(long, env = "CHECKPOINT_INTERVAL_MS", default_value_t = 5_000)]
    checkpoint_interval_ms: u64,
    /// Decisions the engine makes room for at start-up and takeover, so that none of its tables
    /// grows (tens of ms on the decide thread at a million rows) before this many more are
    /// decided. Address space until used: ~150 bytes of it per decision.
    #[arg(long, env = "ENGINE_HEADROOM_DECISIONS", default_value_t = 2_000_000)]
    engine_headroom_decisions: usize,
    /// When the requests log is lost, exit with code 4 at once instead of staying up, not
    /// ready, until `sequencer rebase-log` (for supervisors that alert on exits).
    #[arg(long, env = "EXIT_ON_LOG_LOST")]
    exit_on_log_lost: bool,
    /// A log reader that has made no progress for this long (stuck in a call) makes the process
    /// exit with code 1, so that a standby takes over and a supervisor restarts it; 0 = never.
    /// It is not ready well before (after 5 s).
    #[arg(long, env = "READER_STALL_EXIT_MS", default_value_t = 15_000)]
    reader_stall_exit_ms: i64,
}

/// glibc's malloc was ~15% of the ingress's CPU under load (perf, 25k requests/s): every request
/// allocates its body, JSON, message, future and reply. mimalloc's thread-local free lists are
/// cheaper for that pattern.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    match cli.command {
        Command::Run(args) => run(args),
        Command::Audit { store, json } => match store.urls() {
            Ok(urls) => ExitCode::from(admin::audit(&urls, json)),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Status { store, peers } => match store.urls() {
            Ok(urls) => ExitCode::from(admin::status(&urls, &peers)),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::RebaseLog {
            store,
            partition,
            brokers,
            requests_topic,
            offset,
            at_start,
            at_end,
            force,
            dry_run,
            reason,
        } => {
            use sequencer::rebase::Target;
            let target = match (offset, at_start, at_end) {
                (Some(x), _, _) => Target::Offset(x),
                (None, true, _) => Target::Start,
                (None, _, true) => Target::End,
                (None, false, false) => Target::Auto,
            };
            let database_url = match store.urls().and_then(|urls| {
                urls.get(partition as usize).cloned().ok_or_else(|| {
                    anyhow::anyhow!(
                        "--partition {partition}, but REQUEST_PARTITIONS is {}",
                        store.request_partitions
                    )
                })
            }) {
                Ok(url) => url,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let args = sequencer::rebase::Args {
                partition: partition as i32,
                database_url,
                brokers,
                requests_topic,
                target,
                force,
                dry_run,
                reason,
            };
            match sequencer::rebase::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rebase-log: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::DeleteTopics { brokers, topics } => {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(admin::delete_topics(&brokers, &topics)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::CreateTopics { log } => {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(admin::create_topics(
                &log.brokers,
                &[
                    (log.requests_topic, log.request_partitions),
                    (log.outcomes_topic, 1),
                ],
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(args: RunArgs) -> ExitCode {
    // The engine asserts its invariants and runs on this thread: a failed assertion there means
    // the state is not what it must be. Exit with the fatal code (not Rust's 101) so that a
    // supervisor does not restart into the same state.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let thread = std::thread::current();
        if thread
            .name()
            .is_some_and(|n| n == "main" || n.starts_with(DECIDE_THREAD))
        {
            tracing::error!(exit_code = EXIT_FATAL, "FATAL: {info}; not safe to restart blindly, run `sequencer audit` (docs/OPERATIONS.md, exit code 5)");
            std::process::exit(i32::from(EXIT_FATAL));
        }
    }));
    if args.batch_size_max == 0
        || args.batch_size_backlog_max < args.batch_size_max
        || args.renew_ms * 2 > args.lease_ms
    {
        eprintln!(
            "error: BATCH_SIZE_MAX must be >= 1, BATCH_SIZE_BACKLOG_MAX >= BATCH_SIZE_MAX, \
             and RENEW_MS at most half of LEASE_MS"
        );
        return ExitCode::from(2);
    }
    let node_id = args.node_id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let partitions = args.log.request_partitions;
    let layout = match sequencer::partitions::Layout::from_args(
        &args.database_url,
        &args.database_urls,
        partitions,
        &args.partitions,
        args.lead_partitions.as_deref(),
    ) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = sequencer::partitions::check_topic_partitions(&args.log) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let base = Config {
        database_url: String::new(),
        partition: 0,
        partitions,
        lead_after: Duration::ZERO,
        preferred: true,
        brokers: args.log.brokers,
        requests_topic: args.log.requests_topic,
        outcomes_topic: args.log.outcomes_topic,
        node_id: node_id.clone(),
        batch_size_max: args.batch_size_max,
        batch_size_backlog_max: args.batch_size_backlog_max,
        linger: Duration::from_millis(args.linger_ms),
        fetch_wait_max_ms: args.fetch_wait_max_ms,
        lease: Duration::from_millis(args.lease_ms),
        renew_every: Duration::from_millis(args.renew_ms),
        standby_poll: Duration::from_millis(args.standby_poll_ms),
        republish_window: Duration::from_millis(args.republish_window_ms),
        takeover_timeout: Duration::from_millis(args.takeover_timeout_ms),
        checkpoint: sequencer::checkpointer::Cadence {
            batches: args.checkpoint_batches.max(1),
            interval: Duration::from_millis(args.checkpoint_interval_ms),
        },
        engine_headroom: args.engine_headroom_decisions,
        status_addr: args.status_addr,
        exit_on_log_lost: args.exit_on_log_lost,
    };
    let shutdown = Arc::new(AtomicBool::new(false));
    let mut sequencers = Vec::new();
    for &p in &layout.served {
        let config = Config {
            database_url: layout.database_urls[p as usize].clone(),
            partition: p as i32,
            preferred: layout.lead.contains(&p),
            lead_after: if layout.lead.contains(&p) {
                Duration::ZERO
            } else {
                Duration::from_millis(args.lead_others_after_ms)
            },
            ..base.clone()
        };
        match Sequencer::new(config, shutdown.clone()) {
            Ok(s) => sequencers.push(s),
            Err(e) => {
                tracing::error!(partition = p, "cannot start: {e:#}");
                return ExitCode::from(1);
            }
        }
    }
    let first = &sequencers[0];
    let signal = shutdown.clone();
    first.runtime().spawn(async move {
        shutdown::requested().await;
        tracing::info!("shutdown requested: finishing the current batches");
        signal.store(true, Ordering::Relaxed);
    });
    let metrics = match sequencer::status::install_metrics() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("cannot install the metrics recorder: {e:#}");
            return ExitCode::from(1);
        }
    };
    for s in &sequencers {
        s.runtime().spawn(sequencer::status::log_periodically(
            s.status.clone(),
            Duration::from_secs(10),
        ));
        s.runtime().spawn(sequencer::status::watch_oversell(
            s.status.partition,
            s.pool().clone(),
            Duration::from_secs(5),
        ));
    }
    if args.reader_stall_exit_ms > 0 {
        first
            .runtime()
            .spawn(sequencer::log::exit_when_reader_stalls(
                args.reader_stall_exit_ms,
            ));
    }
    if let Some(addr) = base.status_addr {
        let statuses = sequencers.iter().map(|s| s.status.clone()).collect();
        first.runtime().spawn(async move {
            if let Err(e) = sequencer::status::serve(addr, node_id, statuses, metrics).await {
                tracing::error!("status endpoint on {addr} failed: {e:#}");
            }
        });
    }
    // One decide thread per partition. The first to stop with an error stops the others (each
    // finishes its batch and hands its lease over), and its exit code is the process's.
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    std::thread::scope(|scope| {
        for s in &sequencers {
            let done = done_tx.clone();
            std::thread::Builder::new()
                .name(format!("{DECIDE_THREAD}{}", s.status.partition))
                .spawn_scoped(scope, move || {
                    let partition = s.status.partition;
                    let _span = tracing::info_span!("partition", partition).entered();
                    let _ = done.send((partition, exit_code(s.run())));
                })
                .expect("spawning a decide thread");
        }
        drop(done_tx);
        let mut code = 0u8;
        for (partition, c) in done_rx {
            if c != 0 && code == 0 {
                code = c;
                if !shutdown.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        partition,
                        exit_code = c,
                        "a partition stopped: stopping the others so that a standby takes them over"
                    );
                }
            }
        }
        ExitCode::from(code)
    })
}

/// The names of the threads that decide (and assert the engine's invariants), one per partition.
const DECIDE_THREAD: &str = "decide-p";

/// The exit code for how a partition's writer stopped, logged with its reason.
fn exit_code(result: anyhow::Result<()>) -> u8 {
    let e = match result {
        Ok(()) => {
            tracing::info!("stopped");
            return 0;
        }
        Err(e) => e,
    };
    let code = match e.downcast_ref::<Stop>() {
        Some(Stop::Deposed(_)) => EXIT_DEPOSED,
        Some(Stop::Fatal(_)) => EXIT_FATAL,
        Some(Stop::LogLost(_)) => EXIT_LOG_LOST,
        _ if e.downcast_ref::<sequencer::log::LogLost>().is_some() => EXIT_LOG_LOST,
        _ => 1,
    };
    if code == EXIT_FATAL {
        tracing::error!(
            exit_code = code,
            "FATAL, not safe to restart blindly: {e:#}. Freeze the sale if it runs \
             elsewhere, run `sequencer audit`, and see docs/OPERATIONS.md (exit code 5)"
        );
    } else {
        tracing::error!(exit_code = code, "stopped writing: {e:#}");
    }
    code
}
