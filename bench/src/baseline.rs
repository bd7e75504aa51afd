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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use redis::aio::MultiplexedConnection;
use serde::Deserialize;
use serde_json::json;
use sqlx::{PgPool, Row};
use uuid::Uuid;
use wire::{now_ms, rfc3339};

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
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(args.pool)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?;
                for stmt in NAIVE_SCHEMA.split(';').filter(|s| !s.trim().is_empty()) {
                    sqlx::query(stmt).execute(&pool).await?;
                }
                Backend::Naive(pool)
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
            .with_graceful_shutdown(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            })
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
        Backend::Naive(pool) => naive_reserve(pool, &b).await,
        Backend::Redis(r) => redis_reserve(r, &app.namespace, &b).await,
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
        Backend::Naive(pool) => naive_settle(pool, id, to).await,
        Backend::Redis(r) => redis_settle(r, &app.namespace, id, to).await,
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
    let r: Ans = async {
        match &app.backend {
            Backend::Naive(pool) => {
                let row =
                    sqlx::query("SELECT total, available, held, sold FROM skus WHERE sku = $1")
                        .bind(&sku)
                        .fetch_optional(pool)
                        .await
                        .map_err(internal)?
                        .ok_or_else(|| err(StatusCode::NOT_FOUND, "unknown_sku"))?;
                Ok(sku_json(
                    &sku,
                    row.get(0),
                    row.get(1),
                    row.get(2),
                    row.get(3),
                ))
            }
            Backend::Redis(r) => {
                let key = format!("{}:sku:{sku}", app.namespace);
                let f: Vec<Option<i64>> = r
                    .query(redis::cmd("HMGET").arg(key).arg(&[
                        "total",
                        "available",
                        "held",
                        "sold",
                    ]))
                    .await
                    .map_err(internal)?;
                match f[..] {
                    [Some(total), Some(available), Some(held), Some(sold)] => {
                        Ok(sku_json(&sku, total, available, held, sold))
                    }
                    _ => Err(err(StatusCode::NOT_FOUND, "unknown_sku")),
                }
            }
        }
    }
    .await;
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
            Backend::Naive(pool) => {
                let row = sqlx::query(
                    "INSERT INTO skus (sku, total, available, held, sold, per_user_limit, hold_ttl_ms)
                     VALUES ($1, $2, $2, 0, 0, $3, $4)
                     ON CONFLICT (sku) DO UPDATE SET total = EXCLUDED.total,
                         available = EXCLUDED.total - skus.held - skus.sold,
                         per_user_limit = EXCLUDED.per_user_limit, hold_ttl_ms = EXCLUDED.hold_ttl_ms
                     RETURNING total, available, held, sold",
                )
                .bind(&sku)
                .bind(b.total_stock)
                .bind(b.per_user_limit as i32)
                .bind(ttl_ms)
                .fetch_one(pool)
                .await
                .map_err(|e| err(StatusCode::CONFLICT, &format!("stock_below_committed: {e}")))?;
                Ok(sku_json(&sku, row.get(0), row.get(1), row.get(2), row.get(3)))
            }
            Backend::Redis(r) => {
                let text = r
                    .evalsha(
                        &r.upsert_sha,
                        &[
                            app.namespace.clone(),
                            sku.clone(),
                            b.total_stock.to_string(),
                            b.per_user_limit.to_string(),
                            ttl_ms.to_string(),
                        ],
                    )
                    .await
                    .map_err(internal)?;
                match text.as_str() {
                    "OK" => Ok(sku_json(&sku, b.total_stock, b.total_stock, 0, 0)),
                    e => Err(err(StatusCode::CONFLICT, e.trim_start_matches("E:"))),
                }
            }
        }
    }
    .await;
    r.unwrap_or_else(|e| e)
}

// ---- naive Postgres ------------------------------------------------------------------------

const NAIVE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS skus (
    sku text PRIMARY KEY,
    total bigint NOT NULL, available bigint NOT NULL, held bigint NOT NULL, sold bigint NOT NULL,
    per_user_limit integer NOT NULL, hold_ttl_ms bigint NOT NULL,
    CONSTRAINT counters_not_negative CHECK (available >= 0 AND held >= 0 AND sold >= 0),
    CONSTRAINT no_oversell CHECK (available + held + sold = total));
CREATE TABLE IF NOT EXISTS reservations (
    reservation_id uuid PRIMARY KEY, user_id text NOT NULL, idempotency_key text NOT NULL,
    sku text NOT NULL, quantity integer NOT NULL, status text NOT NULL,
    decided_at timestamptz NOT NULL, expires_at timestamptz NOT NULL,
    CONSTRAINT one_decision_per_idempotency_key UNIQUE (user_id, idempotency_key));
CREATE INDEX IF NOT EXISTS reservations_sku_status ON reservations (sku, status);
CREATE TABLE IF NOT EXISTS user_holdings (
    sku text NOT NULL, user_id text NOT NULL, units bigint NOT NULL, PRIMARY KEY (sku, user_id))";

async fn naive_replay(pool: &PgPool, b: &ReserveBody) -> Ans {
    let row = sqlx::query(
        "SELECT reservation_id, sku, quantity, (extract(epoch FROM expires_at) * 1000)::bigint
           FROM reservations WHERE user_id = $1 AND idempotency_key = $2",
    )
    .bind(&b.user_id)
    .bind(&b.idempotency_key)
    .fetch_optional(pool)
    .await
    .map_err(internal)?;
    match row {
        Some(r) => {
            let (sku, q): (String, i32) = (r.get(1), r.get(2));
            if sku != b.sku || i64::from(q) != b.quantity {
                return Err(err(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                ));
            }
            Ok(held(r.get(0), &sku, &b.user_id, b.quantity, r.get(3)))
        }
        None => Err(err(StatusCode::SERVICE_UNAVAILABLE, "retry")),
    }
}

async fn naive_reserve(pool: &PgPool, b: &ReserveBody) -> Ans {
    let mut tx = pool.begin().await.map_err(internal)?;
    let prior =
        sqlx::query("SELECT 1 FROM reservations WHERE user_id = $1 AND idempotency_key = $2")
            .bind(&b.user_id)
            .bind(&b.idempotency_key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(internal)?;
    if prior.is_some() {
        drop(tx);
        return naive_replay(pool, b).await;
    }
    let cfg = sqlx::query("SELECT per_user_limit, hold_ttl_ms FROM skus WHERE sku = $1")
        .bind(&b.sku)
        .fetch_optional(&mut *tx)
        .await
        .map_err(internal)?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, "unknown_sku"))?;
    let (limit, ttl): (i32, i64) = (cfg.get(0), cfg.get(1));
    if b.quantity > i64::from(limit) {
        return Err(err(StatusCode::CONFLICT, "limit_exceeded"));
    }
    let within_limit = sqlx::query(
        "INSERT INTO user_holdings (sku, user_id, units) VALUES ($1, $2, $3)
         ON CONFLICT (sku, user_id) DO UPDATE SET units = user_holdings.units + EXCLUDED.units
          WHERE user_holdings.units + EXCLUDED.units <= $4",
    )
    .bind(&b.sku)
    .bind(&b.user_id)
    .bind(b.quantity)
    .bind(i64::from(limit))
    .execute(&mut *tx)
    .await
    .map_err(internal)?
    .rows_affected();
    if within_limit == 0 {
        return Err(err(StatusCode::CONFLICT, "limit_exceeded"));
    }
    // The hot row: locked from here until COMMIT returns.
    let taken = sqlx::query(
        "UPDATE skus SET available = available - $2, held = held + $2
          WHERE sku = $1 AND available >= $2",
    )
    .bind(&b.sku)
    .bind(b.quantity)
    .execute(&mut *tx)
    .await
    .map_err(internal)?
    .rows_affected();
    if taken == 0 {
        return Err(err(StatusCode::CONFLICT, "sold_out"));
    }
    let id = Uuid::now_v7();
    let now = now_ms();
    let inserted = sqlx::query(
        "INSERT INTO reservations (reservation_id, user_id, idempotency_key, sku, quantity, status,
                                   decided_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, 'held', to_timestamp($6 / 1000.0), to_timestamp($7 / 1000.0))
         ON CONFLICT (user_id, idempotency_key) DO NOTHING",
    )
    .bind(id)
    .bind(&b.user_id)
    .bind(&b.idempotency_key)
    .bind(&b.sku)
    .bind(b.quantity as i32)
    .bind(now as f64)
    .bind((now + ttl) as f64)
    .execute(&mut *tx)
    .await
    .map_err(internal)?
    .rows_affected();
    if inserted == 0 {
        // A concurrent attempt with the same key committed first: answer its outcome.
        drop(tx);
        return naive_replay(pool, b).await;
    }
    tx.commit().await.map_err(internal)?;
    Ok(held(id, &b.sku, &b.user_id, b.quantity, now + ttl))
}

async fn naive_settle(pool: &PgPool, id: Uuid, to: &str) -> Ans {
    let mut tx = pool.begin().await.map_err(internal)?;
    let row = sqlx::query(
        "UPDATE reservations SET status = $2 WHERE reservation_id = $1 AND status = 'held'
         RETURNING sku, user_id, quantity",
    )
    .bind(id)
    .bind(to)
    .fetch_optional(&mut *tx)
    .await
    .map_err(internal)?;
    let Some(row) = row else {
        let st: Option<String> =
            sqlx::query_scalar("SELECT status FROM reservations WHERE reservation_id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(internal)?;
        return match st.as_deref() {
            None => Err(err(StatusCode::NOT_FOUND, "unknown_reservation")),
            Some(s) if s == to => {
                Ok(Json(json!({"reservation_id": id, "status": s})).into_response())
            }
            Some(s) => Err(err(StatusCode::CONFLICT, &format!("reservation_{s}"))),
        };
    };
    let (sku, user, q): (String, String, i32) = (row.get(0), row.get(1), row.get(2));
    let counters = if to == "confirmed" {
        "UPDATE skus SET held = held - $2, sold = sold + $2 WHERE sku = $1"
    } else {
        "UPDATE skus SET held = held - $2, available = available + $2 WHERE sku = $1"
    };
    sqlx::query(counters)
        .bind(&sku)
        .bind(i64::from(q))
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
    if to == "cancelled" {
        sqlx::query("UPDATE user_holdings SET units = units - $3 WHERE sku = $1 AND user_id = $2")
            .bind(&sku)
            .bind(&user)
            .bind(i64::from(q))
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
    }
    tx.commit().await.map_err(internal)?;
    Ok(Json(
        json!({"reservation_id": id, "sku": sku, "user_id": user, "quantity": q, "status": to}),
    )
    .into_response())
}

// ---- Redis + Lua ---------------------------------------------------------------------------

const RESERVE_LUA: &str = r#"
local ns, sku, user, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local q, rid, now = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local idem = ns .. ':idem:' .. user .. ':' .. key
local prev = redis.call('GET', idem)
if prev then return prev end
local skuk = ns .. ':sku:' .. sku
local s = redis.call('HMGET', skuk, 'available', 'limit', 'ttl')
if not s[1] then return 'E:unknown_sku' end
local hk = ns .. ':hold:' .. sku
local have = tonumber(redis.call('HGET', hk, user) or '0')
if have + q > tonumber(s[2]) then return 'E:limit_exceeded' end
if tonumber(s[1]) < q then return 'E:sold_out' end
redis.call('HINCRBY', skuk, 'available', -q)
redis.call('HINCRBY', skuk, 'held', q)
redis.call('HINCRBY', hk, user, q)
local exp = now + tonumber(s[3])
redis.call('HSET', ns .. ':res:' .. rid, 'sku', sku, 'user', user, 'q', q, 'status', 'held')
local v = 'H:' .. rid .. ':' .. q .. ':' .. exp .. ':' .. sku
redis.call('SET', idem, v)
return v
"#;

const SETTLE_LUA: &str = r#"
local ns, rid, to = ARGV[1], ARGV[2], ARGV[3]
local rk = ns .. ':res:' .. rid
local r = redis.call('HMGET', rk, 'sku', 'user', 'q', 'status')
if not r[1] then return 'E:unknown_reservation' end
if r[4] == to then return 'S:' .. to end
if r[4] ~= 'held' then return 'E:reservation_' .. r[4] end
local q = tonumber(r[3])
local skuk = ns .. ':sku:' .. r[1]
redis.call('HINCRBY', skuk, 'held', -q)
if to == 'confirmed' then
  redis.call('HINCRBY', skuk, 'sold', q)
else
  redis.call('HINCRBY', skuk, 'available', q)
  redis.call('HINCRBY', ns .. ':hold:' .. r[1], r[2], -q)
end
redis.call('HSET', rk, 'status', to)
return 'S:' .. to
"#;

const UPSERT_LUA: &str = r#"
local k = ARGV[1] .. ':sku:' .. ARGV[2]
local held = tonumber(redis.call('HGET', k, 'held') or '0')
local sold = tonumber(redis.call('HGET', k, 'sold') or '0')
local total = tonumber(ARGV[3])
if total < held + sold then return 'E:stock_below_committed' end
redis.call('HSET', k, 'total', total, 'available', total - held - sold, 'held', held,
           'sold', sold, 'limit', ARGV[4], 'ttl', ARGV[5])
return 'OK'
"#;

async fn redis_reserve(r: &RedisPool, ns: &str, b: &ReserveBody) -> Ans {
    let id = Uuid::now_v7();
    let rid = id.simple().to_string();
    let text = r
        .evalsha(
            &r.reserve_sha,
            &[
                ns.to_owned(),
                b.sku.clone(),
                b.user_id.clone(),
                b.idempotency_key.clone(),
                b.quantity.to_string(),
                rid,
                now_ms().to_string(),
            ],
        )
        .await
        .map_err(internal)?;
    if let Some(code) = text.strip_prefix("E:") {
        let status = if code == "unknown_sku" {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::CONFLICT
        };
        return Err(err(status, code));
    }
    // H:<rid>:<q>:<expires>:<sku> (the sku last: it may contain ':').
    let mut parts = text.trim_start_matches("H:").splitn(4, ':');
    let (rid, q, exp, sku) = (
        parts.next().unwrap_or(""),
        parts
            .next()
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(0),
        parts
            .next()
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(0),
        parts.next().unwrap_or(""),
    );
    if sku != b.sku || q != b.quantity {
        return Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
        ));
    }
    let id = Uuid::parse_str(rid).map_err(internal)?;
    Ok(held(id, sku, &b.user_id, q, exp))
}

async fn redis_settle(r: &RedisPool, ns: &str, id: Uuid, to: &str) -> Ans {
    let rid = id.simple().to_string();
    let text = r
        .evalsha(&r.settle_sha, &[ns.to_owned(), rid, to.to_owned()])
        .await
        .map_err(internal)?;
    match text.strip_prefix("E:") {
        Some("unknown_reservation") => Err(err(StatusCode::NOT_FOUND, "unknown_reservation")),
        Some(code) => Err(err(StatusCode::CONFLICT, code)),
        None => Ok(Json(json!({"reservation_id": id, "status": to})).into_response()),
    }
}

/// Connections to one Redis (multiplexed: each carries the commands of many requests at once),
/// used in turn, and the SHA1 of each script loaded on it.
pub struct RedisPool {
    conns: Vec<MultiplexedConnection>,
    next: AtomicUsize,
    reserve_sha: String,
    settle_sha: String,
    upsert_sha: String,
}

/// The client of a loopback Redis on `addr` (`IP:PORT`); refuses any other host.
fn loopback_client(addr: &str) -> anyhow::Result<redis::Client> {
    let addr: SocketAddr = addr.parse()?;
    if !addr.ip().is_loopback() {
        bail!("the redis baseline only talks to a loopback Redis");
    }
    Ok(redis::Client::open(format!("redis://{addr}/"))?)
}

impl RedisPool {
    pub async fn connect(addr: &str, n: usize) -> anyhow::Result<RedisPool> {
        let client = loopback_client(addr)?;
        let mut conns = Vec::new();
        for _ in 0..n.max(1) {
            conns.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .with_context(|| format!("connecting to Redis on {addr}"))?,
            );
        }
        let mut pool = RedisPool {
            conns,
            next: AtomicUsize::new(0),
            reserve_sha: String::new(),
            settle_sha: String::new(),
            upsert_sha: String::new(),
        };
        let load = |script: &str| {
            let mut cmd = redis::cmd("SCRIPT");
            cmd.arg("LOAD").arg(script);
            cmd
        };
        pool.reserve_sha = pool.query(&load(RESERVE_LUA)).await?;
        pool.settle_sha = pool.query(&load(SETTLE_LUA)).await?;
        pool.upsert_sha = pool.query(&load(UPSERT_LUA)).await?;
        Ok(pool)
    }

    /// Runs one command on the next connection in turn.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> anyhow::Result<T> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut conn = self.conns[i].clone();
        Ok(cmd.query_async(&mut conn).await?)
    }

    /// Runs a loaded script with no keys and `argv`; its reply is text.
    async fn evalsha(&self, sha: &str, argv: &[String]) -> anyhow::Result<String> {
        self.query(redis::cmd("EVALSHA").arg(sha).arg(0).arg(argv))
            .await
    }

    /// Deletes every key of the namespace (SCAN + UNLINK); returns how many.
    pub async fn delete_namespace(&self, ns: &str) -> anyhow::Result<u64> {
        let pattern = format!("{ns}:*");
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(10_000),
                )
                .await?;
            if !keys.is_empty() {
                let _: i64 = self.query(redis::cmd("UNLINK").arg(&keys)).await?;
                deleted += keys.len() as u64;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

/// Whether a Redis server answers PING on `addr`.
pub async fn redis_available(addr: &str) -> bool {
    let attempt = async {
        let mut conn = loopback_client(addr)?
            .get_multiplexed_async_connection()
            .await?;
        let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
        anyhow::Ok(pong == "PONG")
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(false)
}
