//! The ingress process: `ingress` serves the v1 HTTP API on LISTEN_ADDR.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ingress::admission::{Admission, AdmissionLimits, LagMonitor, UserLimiter};
use ingress::auth::{JwtConfig, JwtVerifier};
use ingress::bus::Bus;
use ingress::console::{self, Console};
use ingress::http::{route_table, router, App, AppConfig};
use ingress::metrics::Metrics;
use ingress::server::{self, ServerLimits};
use kafka_config::LogArgs;

#[derive(Parser)]
#[command(
    version,
    about = "Flash-sale ingress: the stateless HTTP front of the sequencer."
)]
struct Args {
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    listen_addr: SocketAddr,
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/flash"
    )]
    database_url: String,
    /// One database URL per partition of the requests topic, in partition order
    /// (comma-separated); without it partition p's is DATABASE_URL's with `_p{p}` after the
    /// name (partition 0's is DATABASE_URL).
    #[arg(long, env = "DATABASE_URLS", value_delimiter = ',')]
    database_urls: Vec<String>,
    #[command(flatten)]
    log: LogArgs,
    /// Bearer token for /v1/admin routes. Required: the ingress refuses to start without one.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// How long a write waits for its outcome before answering 504 (outcome unknown).
    #[arg(long, env = "OUTCOME_TIMEOUT_MS", default_value_t = 5_000)]
    outcome_timeout_ms: u64,
    /// The outcomes consumer's `fetch.wait.max.ms`. Apache Kafka answers a waiting fetch as soon
    /// as an outcome arrives, so this only bounds idle polling (see the sequencer's
    /// FETCH_WAIT_MAX_MS; tansu 0.6 holds every fetch this long: run it with 1).
    #[arg(long, env = "FETCH_WAIT_MAX_MS", default_value_t = 100)]
    fetch_wait_max_ms: u64,
    /// The requests producer's `linger.ms`: how long librdkafka waits to fill a produce batch, so
    /// concurrent requests share one produce request and one record batch. Every request waits
    /// up to this long on its first hop. Apache Kafka serves a fetch in time independent of the
    /// number of record batches, so a few ms is enough to keep produce requests few under load
    /// (tansu 0.6 needed 20: its fetches slow down with every batch in the partition).
    #[arg(long, env = "PRODUCE_LINGER_MS", default_value_t = 5)]
    produce_linger_ms: u64,
    /// Largest request body accepted (413 above).
    #[arg(long, env = "BODY_BYTES_MAX", default_value_t = 4_096)]
    body_bytes_max: usize,
    /// Most writes waiting for an outcome at once on this ingress (503 above).
    #[arg(long, env = "IN_FLIGHT_MAX", default_value_t = 50_000)]
    in_flight_max: usize,
    /// Postgres connections for the read routes.
    #[arg(long, env = "DB_POOL_MAX", default_value_t = 8)]
    db_pool_max: u32,
    /// Most requests the sequencer may be behind the requests log (log end minus the offset
    /// committed in Postgres) before buyers' writes get 503; 0 turns the bound off.
    #[arg(long, env = "LAG_MAX", default_value_t = 50_000)]
    lag_max: u64,
    /// How often the lag (and the broker's reachability) is measured, in the background.
    #[arg(long, env = "LAG_POLL_MS", default_value_t = 150)]
    lag_poll_ms: u64,
    /// `/readyz` fails when the producer has not reached the broker for this long.
    #[arg(long, env = "READY_BROKER_MAX_AGE_MS", default_value_t = 3_000)]
    ready_broker_max_age_ms: i64,
    /// Sustained reservation requests per second per user (token refill rate); 0 turns the
    /// per-user rate limit off.
    #[arg(long, env = "RATE_LIMIT_PER_USER_PER_S", default_value_t = 10.0)]
    rate_limit_per_user_per_s: f64,
    /// Requests a user may send at once before the refill rate applies (bucket size).
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 20)]
    rate_limit_burst: u32,
    /// Turns JWT verification on with an HS256 shared secret (at least 32 bytes).
    #[arg(long, env = "JWT_HS256_SECRET", hide_env_values = true)]
    jwt_hs256_secret: Option<String>,
    /// Turns JWT verification on with an RS256 public key (PEM).
    #[arg(long, env = "JWT_RS256_PUBLIC_KEY_PEM")]
    jwt_rs256_public_key_pem: Option<String>,
    /// When set, tokens must carry this `iss`.
    #[arg(long, env = "JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    #[arg(long, env = "JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[arg(long, env = "JWT_LEEWAY_S", default_value_t = 30)]
    jwt_leeway_s: u64,
    /// Buyers' writes get 503 `no_sequencer` (and `/readyz` fails) when no sequencer has
    /// committed anything for this long while requests wait in the log; 0 turns it off.
    #[arg(long, env = "STALL_MAX_MS", default_value_t = 3_000)]
    stall_max_ms: i64,
    /// A connection whose request header is not complete within this long is closed.
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    header_read_timeout_ms: u64,
    /// A request body that has not fully arrived within this long gets 408 and the connection
    /// is closed.
    #[arg(long, env = "BODY_READ_TIMEOUT_MS", default_value_t = 10_000)]
    body_read_timeout_ms: u64,
    /// Most open HTTP connections; one more gets a short 503 and is closed at once.
    #[arg(long, env = "CONNECTIONS_MAX", default_value_t = 10_000)]
    connections_max: usize,
    /// A connection whose answer cannot be written for this long (the client reads nothing:
    /// a stalled stream subscriber, a client that went away without closing) is closed.
    #[arg(long, env = "WRITE_TIMEOUT_MS", default_value_t = 30_000)]
    write_timeout_ms: u64,
    /// Most live stock streams (`GET /v1/skus/{sku}/events`) open at once (503 above). Each
    /// is also a connection: CONNECTIONS_MAX bounds them too.
    #[arg(long, env = "STREAM_SUBSCRIBERS_MAX", default_value_t = 5_000)]
    stream_subscribers_max: usize,
    /// The sequencers' status servers (their STATUS_ADDR as `http://host:port`, comma-separated),
    /// asked once a second for what the ops console shows: each one's role and epoch, commit
    /// time, and the series its alerts read. Empty: the console shows the writer from Postgres
    /// only, and those alerts as unknown.
    #[arg(long, env = "SEQUENCER_STATUS_URLS", default_value = "")]
    sequencer_status_urls: String,
    #[arg(long, env = "LOG_JSON")]
    log_json: bool,
}

/// glibc's malloc was ~15% of the ingress's CPU under load (perf, 25k requests/s): every request
/// allocates its body, JSON, message, future and reply. mimalloc's thread-local free lists are
/// cheaper for that pattern.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    if args.admin_token.len() < 16 {
        eprintln!("error: ADMIN_TOKEN must be at least 16 characters");
        return ExitCode::from(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("ingress stopped: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let jwt = JwtVerifier::from_config(&JwtConfig {
        hs256_secret: args.jwt_hs256_secret.clone(),
        rs256_public_key_pem: args.jwt_rs256_public_key_pem.clone(),
        issuer: args.jwt_issuer.clone(),
        audience: args.jwt_audience.clone(),
        leeway_s: args.jwt_leeway_s,
    })?;
    let limiter =
        UserLimiter::new(args.rate_limit_per_user_per_s, args.rate_limit_burst)?.map(Arc::new);
    tracing::info!(
        jwt = jwt.is_some(),
        rate_limit_per_user_per_s = args.rate_limit_per_user_per_s,
        rate_limit_burst = args.rate_limit_burst,
        lag_max = args.lag_max,
        in_flight_max = args.in_flight_max,
        "ingress configuration"
    );
    let partitions = args.log.request_partitions;
    let urls =
        persistence::layout::database_urls(&args.database_url, &args.database_urls, partitions)?;
    let mut pools = Vec::with_capacity(urls.len());
    let mut monitor_pools = Vec::with_capacity(urls.len());
    for url in &urls {
        pools.push(persistence::connect(url, args.db_pool_max).await?);
        // Its own connection, so that a burst of reads never delays the lag signal.
        monitor_pools.push(persistence::connect(url, 1).await?);
    }
    let metrics = Arc::new(Metrics::new(&route_table()));
    let bus = Bus::start(
        &args.log,
        Duration::from_millis(args.outcome_timeout_ms),
        args.fetch_wait_max_ms,
        args.produce_linger_ms,
        metrics.hops.clone(),
    )?;
    // A topic with another partition count would send SKUs where no writer decides them.
    let probe = bus.broker_probe();
    match tokio::task::spawn_blocking(move || probe.requests_partitions()).await? {
        Ok(Some(n)) if n != partitions as usize => {
            return Err(kafka_config::partition_count_differs(
                &args.log.requests_topic,
                n,
                partitions,
            ));
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot check the requests topic's partitions yet: {e:#}"),
    }
    let mut lags = Vec::with_capacity(monitor_pools.len());
    for (partition, monitor_pool) in monitor_pools.into_iter().enumerate() {
        let lag = Arc::new(LagMonitor::default());
        tokio::spawn(lag.clone().run(
            bus.broker_probe(),
            monitor_pool,
            Duration::from_millis(args.lag_poll_ms.max(10)),
            partition as u32,
        ));
        lags.push(lag);
    }
    tokio::spawn(housekeeping(metrics.clone(), limiter.clone()));
    let limits = AdmissionLimits {
        in_flight_max: args.in_flight_max,
        lag_max: args.lag_max,
        stall_max_ms: args.stall_max_ms,
    };
    let app = Arc::new(App {
        bus,
        pools,
        config: AppConfig {
            admin_token: args.admin_token,
            body_bytes_max: args.body_bytes_max,
            ready_broker_max_age_ms: args.ready_broker_max_age_ms,
            body_read_timeout: Duration::from_millis(args.body_read_timeout_ms.max(1)),
            stream_subscribers_max: args.stream_subscribers_max,
            connections_max: args.connections_max.max(1),
        },
        admission: Admission::new(limits, lags, limiter, metrics.clone()),
        metrics,
        jwt,
        console: Console::new(&args.sequencer_status_urls),
    });
    tokio::spawn(console::run(app.clone()));
    let listener = tokio::net::TcpListener::bind(args.listen_addr).await?;
    tracing::info!(addr = %args.listen_addr, "ingress listening");
    let limits = ServerLimits {
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms.max(1)),
        connections_max: args.connections_max.max(1),
        write_timeout: Duration::from_millis(args.write_timeout_ms.max(1)),
        drain_timeout: Duration::from_millis(args.outcome_timeout_ms) + Duration::from_secs(1),
    };
    let (refused, open) = (app.metrics.clone(), app.metrics.clone());
    server::serve(
        listener,
        router(app),
        limits,
        async {
            shutdown::requested().await;
            tracing::info!("shutting down: finishing in-flight requests");
        },
        move || refused.connection_refused(),
        move |n| open.connections_open.set(n as f64),
    )
    .await?;
    Ok(())
}

/// Once a second: fold histogram samples into buckets and drop idle rate-limit buckets, so that
/// memory stays bounded however long between scrapes and however many users come and go.
async fn housekeeping(metrics: Arc<Metrics>, limiter: Option<Arc<UserLimiter>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        metrics.upkeep();
        if let Some(l) = &limiter {
            l.sweep(n.is_multiple_of(30));
            metrics.rate_limiter_keys.set(l.len() as f64);
        }
    }
}
