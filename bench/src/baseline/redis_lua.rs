//! The Redis + Lua baseline: one script per request on Redis's single thread (see the parent
//! module's documentation).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use redis::aio::MultiplexedConnection;
use serde_json::json;
use uuid::Uuid;
use wire::now_ms;

use super::{err, held, internal, sku_json, Ans, ReserveBody, UpsertBody};

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

pub(super) async fn reserve(r: &RedisPool, ns: &str, b: &ReserveBody) -> Ans {
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

pub(super) async fn settle(r: &RedisPool, ns: &str, id: Uuid, to: &str) -> Ans {
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

pub(super) async fn get_sku(r: &RedisPool, ns: &str, sku: &str) -> Ans {
    let key = format!("{ns}:sku:{sku}");
    let f: Vec<Option<i64>> = r
        .query(
            redis::cmd("HMGET")
                .arg(key)
                .arg(&["total", "available", "held", "sold"]),
        )
        .await
        .map_err(internal)?;
    match f[..] {
        [Some(total), Some(available), Some(held), Some(sold)] => {
            Ok(sku_json(sku, total, available, held, sold))
        }
        _ => Err(err(StatusCode::NOT_FOUND, "unknown_sku")),
    }
}

pub(super) async fn upsert_sku(
    r: &RedisPool,
    ns: &str,
    sku: &str,
    b: &UpsertBody,
    ttl_ms: i64,
) -> Ans {
    let text = r
        .evalsha(
            &r.upsert_sha,
            &[
                ns.to_owned(),
                sku.to_owned(),
                b.total_stock.to_string(),
                b.per_user_limit.to_string(),
                ttl_ms.to_string(),
            ],
        )
        .await
        .map_err(internal)?;
    match text.as_str() {
        "OK" => Ok(sku_json(sku, b.total_stock, b.total_stock, 0, 0)),
        e => Err(err(StatusCode::CONFLICT, e.trim_start_matches("E:"))),
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
