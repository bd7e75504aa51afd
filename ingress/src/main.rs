//! The ingress process: `ingress` serves the v1 HTTP API on LISTEN_ADDR.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ingress::bus::Bus;
use ingress::http::{router, App, AppConfig};

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
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long, env = "REQUESTS_TOPIC", default_value = "reservation-requests")]
    requests_topic: String,
    #[arg(long, env = "OUTCOMES_TOPIC", default_value = "reservation-outcomes")]
    outcomes_topic: String,
    /// Bearer token for /v1/admin routes. Required: the ingress refuses to start without one.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// How long a write waits for its outcome before answering 504 (outcome unknown).
    #[arg(long, env = "OUTCOME_TIMEOUT_MS", default_value_t = 5_000)]
    outcome_timeout_ms: u64,
    /// Largest request body accepted (413 above).
    #[arg(long, env = "BODY_BYTES_MAX", default_value_t = 4_096)]
    body_bytes_max: usize,
    /// Most writes waiting for an outcome at once on this ingress (503 above).
    #[arg(long, env = "IN_FLIGHT_MAX", default_value_t = 50_000)]
    in_flight_max: usize,
    /// Postgres connections for the read routes.
    #[arg(long, env = "DB_POOL_MAX", default_value_t = 8)]
    db_pool_max: u32,
    #[arg(long, env = "LOG_JSON")]
    log_json: bool,
}

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
    let pool = persistence::connect(&args.database_url, args.db_pool_max).await?;
    let bus = Bus::start(
        &args.brokers,
        &args.requests_topic,
        &args.outcomes_topic,
        Duration::from_millis(args.outcome_timeout_ms),
    )?;
    let app = Arc::new(App {
        bus,
        pool,
        config: AppConfig {
            admin_token: args.admin_token,
            body_bytes_max: args.body_bytes_max,
            in_flight_max: args.in_flight_max,
        },
    });
    let listener = tokio::net::TcpListener::bind(args.listen_addr).await?;
    tracing::info!(addr = %args.listen_addr, "ingress listening");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down: finishing in-flight requests");
        })
        .await?;
    Ok(())
}
