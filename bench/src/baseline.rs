//! The designs this system is compared with, behind the same HTTP contract (the subset the load
//! scenarios use: reserve, confirm, cancel, read a SKU, create a SKU).
//!
//! - `naive`: every reservation is its own Postgres transaction from a connection pool: the
//!   idempotency lookup, the per-user limit (upsert on a holdings row with a limit condition),
//!   `UPDATE skus SET available = available - q WHERE sku = $1 AND available >= q` on the hot row,
//!   the reservation INSERT, COMMIT. The hot row's lock is held from the UPDATE through the
//!   commit's WAL flush, so reservations on one SKU serialise on it. Same CHECK constraints as
//!   this system's `skus` table. Refusals write nothing (this system writes a row for each).
//! - `redis`: one Lua script per request (atomic on Redis's single thread) checks the key, the
//!   per-user limit and the counter and decrements it. Durability is whatever the Redis server is
//!   configured with (on this machine: no AOF, no snapshots, i.e. none): it is a speed reference,
//!   not an equivalent.
//!
//! Hold expiry is not implemented by either (the benchmarks run for less than the hold TTL).
//!
//! This file is the HTTP side both share (routes, bodies, answers); `baseline/naive.rs` and
//! `baseline/redis_lua.rs` are the two designs.

mod naive;
mod redis_lua;

pub use redis_lua::redis_available;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;
use wire::rfc3339;

use redis_lua::RedisPool;

#[derive(Clone, Debug, clap::Args)]
pub struct ServerArgs {
    #[arg(long, value_parser = ["naive", "redis"])]
    pub kind: String,
    #[arg(long, default_value = "127.0.0.1:18090")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "bench-admin-token-0123456789abcdef")]
    pub admin_token: String,
    /// naive: the database (its tables are created on start).
    #[arg(long)]
    pub database_url: Option<String>,
    /// naive: Postgres connections in the pool; redis: connections to Redis.
    #[arg(long, default_value_t = 32)]
    pub pool: u32,
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub redis: String,
    /// redis: key prefix of this run (deleted on shutdown).
    #[arg(long, default_value = "flash_bench")]
    pub namespace: String,
}

enum Backend {
    Naive(PgPool),
    Redis(RedisPool),
}

struct App {
    backend: Backend,
    token: String,
    namespace: String,
}

type Ans = Result<Response, Response>;

fn err(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({ "error": code }))).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    err(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("unavailable: {e}"),
    )
}

pub fn serve(args: ServerArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let backend = match args.kind.as_str() {
            "naive" => {
                let url = args
                    .database_url
                    .as_deref()
                    .context("--database-url is required for the naive baseline")?;
                Backend::Naive(naive::connect(url, args.pool).await?)
            }
            _ => Backend::Redis(RedisPool::connect(&args.redis, args.pool as usize).await?),
        };
        let app = Arc::new(App {
            backend,
            token: args.admin_token.clone(),
            namespace: args.namespace.clone(),
        });
        let router = Router::new()
            .route("/v1/reservations", post(reserve))
            .route("/v1/reservations/{id}/confirm", post(confirm))
            .route("/v1/reservations/{id}/cancel", post(cancel))
            .route("/v1/skus/{sku}", get(get_sku))
            .route("/v1/admin/skus/{sku}", put(upsert_sku))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(|| async { "ready" }))
            .with_state(app.clone());
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        eprintln!("baseline {} listening on {}", args.kind, args.listen);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown::requested())
            .await?;
        if let Backend::Redis(r) = &app.backend {
            let deleted = r.delete_namespace(&app.namespace).await.unwrap_or(0);
            eprintln!(
                "baseline redis: deleted {deleted} keys of {}",
                app.namespace
            );
        }
        anyhow::Ok(())
    })
}

#[derive(Deserialize)]
struct ReserveBody {
    sku: String,
    user_id: String,
    quantity: i64,
    idempotency_key: String,
}

#[derive(Deserialize)]
struct UpsertBody {
    total_stock: i64,
    per_user_limit: i64,
    hold_ttl_seconds: f64,
}

fn held(id: Uuid, sku: &str, user: &str, q: i64, expires_ms: i64) -> Response {
    (
        StatusCode::CREATED,
        Json(
            json!({"reservation_id": id, "sku": sku, "user_id": user, "quantity": q,
                    "status": "held", "expires_at": rfc3339(expires_ms)}),
        ),
    )
        .into_response()
}

async fn reserve(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let b: ReserveBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(_) => return err(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
    };
    if b.quantity < 1 || b.quantity > 1_000_000 {
        return err(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    }
    let r = match &app.backend {
        Backend::Naive(pool) => naive::reserve(pool, &b).await,
        Backend::Redis(r) => redis_lua::reserve(r, &app.namespace, &b).await,
    };
    r.unwrap_or_else(|e| e)
}

async fn confirm(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    settle(&app, &id, "confirmed").await.unwrap_or_else(|e| e)
}

async fn cancel(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    settle(&app, &id, "cancelled").await.unwrap_or_else(|e| e)
}

async fn settle(app: &App, id: &str, to: &str) -> Ans {
    let id = Uuid::parse_str(id).map_err(|_| err(StatusCode::NOT_FOUND, "unknown_reservation"))?;
    match &app.backend {
        Backend::Naive(pool) => naive::settle(pool, id, to).await,
        Backend::Redis(r) => redis_lua::settle(r, &app.namespace, id, to).await,
    }
}

fn sku_json(sku: &str, total: i64, available: i64, held: i64, sold: i64) -> Response {
    let status = if available == 0 {
        "sold_out"
    } else {
        "on_sale"
    };
    Json(
        json!({"sku": sku, "total": total, "available": available, "held": held, "sold": sold,
                "status": status}),
    )
    .into_response()
}

async fn get_sku(State(app): State<Arc<App>>, Path(sku): Path<String>) -> Response {
    let r = match &app.backend {
        Backend::Naive(pool) => naive::get_sku(pool, &sku).await,
        Backend::Redis(r) => redis_lua::get_sku(r, &app.namespace, &sku).await,
    };
    r.unwrap_or_else(|e| e)
}

async fn upsert_sku(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let r: Ans = async {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if auth != format!("Bearer {}", app.token) {
            return Err(err(StatusCode::UNAUTHORIZED, "unauthorized"));
        }
        let b: UpsertBody = serde_json::from_slice(&body)
            .map_err(|_| err(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"))?;
        let ttl_ms = (b.hold_ttl_seconds * 1000.0) as i64;
        match &app.backend {
            Backend::Naive(pool) => naive::upsert_sku(pool, &sku, &b, ttl_ms).await,
            Backend::Redis(r) => redis_lua::upsert_sku(r, &app.namespace, &sku, &b, ttl_ms).await,
        }
    }
    .await;
    r.unwrap_or_else(|e| e)
}
