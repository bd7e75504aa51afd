//! The naive Postgres baseline: every reservation is its own transaction on the hot row (see the
//! parent module's documentation).

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{PgConnection, PgPool, Postgres, Row};
use uuid::Uuid;
use wire::now_ms;

use super::{err, held, internal, sku_json, Ans, ReserveBody, UpsertBody};

/// A pool of `size` connections to `url`, with the baseline's tables created.
pub(super) async fn connect(url: &str, size: u32) -> anyhow::Result<PgPool> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    for stmt in SCHEMA.split(';').filter(|s| !s.trim().is_empty()) {
        sqlx::query(stmt).execute(&pool).await?;
    }
    Ok(pool)
}

const SCHEMA: &str = "
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

async fn replay(pool: &PgPool, b: &ReserveBody) -> Ans {
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

/// Runs a write whose `WHERE` is the check: when it writes no row, refuses with 409 `reason`.
async fn write_or_refuse(
    tx: &mut PgConnection,
    write: Query<'_, Postgres, PgArguments>,
    reason: &str,
) -> Result<(), Response> {
    let written = write.execute(tx).await.map_err(internal)?.rows_affected();
    if written == 0 {
        return Err(err(StatusCode::CONFLICT, reason));
    }
    Ok(())
}

pub(super) async fn reserve(pool: &PgPool, b: &ReserveBody) -> Ans {
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
        return replay(pool, b).await;
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
    .bind(i64::from(limit));
    write_or_refuse(&mut tx, within_limit, "limit_exceeded").await?;
    // The hot row: locked from here until COMMIT returns.
    let take = sqlx::query(
        "UPDATE skus SET available = available - $2, held = held + $2
          WHERE sku = $1 AND available >= $2",
    )
    .bind(&b.sku)
    .bind(b.quantity);
    write_or_refuse(&mut tx, take, "sold_out").await?;
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
        return replay(pool, b).await;
    }
    tx.commit().await.map_err(internal)?;
    Ok(held(id, &b.sku, &b.user_id, b.quantity, now + ttl))
}

pub(super) async fn settle(pool: &PgPool, id: Uuid, to: &str) -> Ans {
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

/// The SKU's answer from a row of `total, available, held, sold`.
fn sku_row_json(sku: &str, row: &PgRow) -> Response {
    sku_json(sku, row.get(0), row.get(1), row.get(2), row.get(3))
}

pub(super) async fn get_sku(pool: &PgPool, sku: &str) -> Ans {
    let row = sqlx::query("SELECT total, available, held, sold FROM skus WHERE sku = $1")
        .bind(sku)
        .fetch_optional(pool)
        .await
        .map_err(internal)?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, "unknown_sku"))?;
    Ok(sku_row_json(sku, &row))
}

pub(super) async fn upsert_sku(pool: &PgPool, sku: &str, b: &UpsertBody, ttl_ms: i64) -> Ans {
    let row = sqlx::query(
        "INSERT INTO skus (sku, total, available, held, sold, per_user_limit, hold_ttl_ms)
         VALUES ($1, $2, $2, 0, 0, $3, $4)
         ON CONFLICT (sku) DO UPDATE SET total = EXCLUDED.total,
             available = EXCLUDED.total - skus.held - skus.sold,
             per_user_limit = EXCLUDED.per_user_limit, hold_ttl_ms = EXCLUDED.hold_ttl_ms
         RETURNING total, available, held, sold",
    )
    .bind(sku)
    .bind(b.total_stock)
    .bind(b.per_user_limit as i32)
    .bind(ttl_ms)
    .fetch_one(pool)
    .await
    .map_err(|e| err(StatusCode::CONFLICT, &format!("stock_below_committed: {e}")))?;
    Ok(sku_row_json(sku, &row))
}
