//! The v1 HTTP contract (see PRODUCT.md). Writes become commands appended to the requests topic
//! and wait for their outcome; reads come straight from Postgres, the system of record.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use uuid::Uuid;
use wire::limits::{
    HOLD_TTL_MS_MAX, IDEMPOTENCY_KEY_BYTES_MAX, QUANTITY_MAX, SKU_BYTES_MAX, STOCK_MAX,
    USER_ID_BYTES_MAX,
};
use wire::{Command, Outcome, Request, ReservationView, SkuConfig, SkuView};

use crate::bus::{Bus, SendError};
use crate::error::ApiError;

pub struct AppConfig {
    pub admin_token: String,
    pub body_bytes_max: usize,
    pub in_flight_max: usize,
}

pub struct App {
    pub bus: Bus,
    pub pool: PgPool,
    pub config: AppConfig,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/reservations", post(create_reservation))
        .route("/v1/reservations/{id}", get(get_reservation))
        .route("/v1/reservations/{id}/confirm", post(confirm_reservation))
        .route("/v1/reservations/{id}/cancel", post(cancel_reservation))
        .route("/v1/skus/{sku}", get(get_sku))
        .route("/v1/admin/skus/{sku}", put(upsert_sku))
        .route("/v1/admin/skus/{sku}/restock", post(restock_sku))
        .route("/v1/admin/skus/{sku}/pause", post(pause_sku))
        .route("/v1/admin/skus/{sku}/resume", post(resume_sku))
        .route("/v1/admin/freeze", post(freeze_all))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::NotFound("not_found") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(app)
}

// ---- reservations -------------------------------------------------------------------------

#[derive(Deserialize)]
struct ReserveBody {
    sku: String,
    user_id: String,
    quantity: i64,
    idempotency_key: Option<String>,
}

async fn create_reservation(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let b: ReserveBody = parse_json(&headers, body, app.config.body_bytes_max).await?;
    validate_name("sku", &b.sku, SKU_BYTES_MAX)?;
    validate_text("user_id", &b.user_id, USER_ID_BYTES_MAX)?;
    if !(1..=i64::from(QUANTITY_MAX)).contains(&b.quantity) {
        return Err(ApiError::Invalid(format!(
            "quantity must be an integer from 1 to {QUANTITY_MAX}"
        )));
    }
    let header_key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::Invalid("Idempotency-Key header must be visible ASCII".into())
                })?
                .to_owned(),
        ),
        None => None,
    };
    let key = match (b.idempotency_key, header_key) {
        (Some(a), Some(h)) if a != h => {
            return Err(ApiError::Invalid(
                "idempotency_key in the body and the Idempotency-Key header differ".into(),
            ))
        }
        (Some(k), _) | (None, Some(k)) => {
            validate_text("idempotency_key", &k, IDEMPOTENCY_KEY_BYTES_MAX)?;
            k
        }
        // Without a key a retry cannot be recognised; the generated one is returned on 504 so
        // the client can still retry safely.
        (None, None) => Uuid::now_v7().to_string(),
    };
    let request_id = Uuid::now_v7().as_u128();
    let (sku, user_id, quantity) = (b.sku, b.user_id, b.quantity as u32);
    let command = Command::Reserve {
        sku: sku.clone(),
        user_id: user_id.clone(),
        quantity,
        idempotency_key: key.clone(),
    };
    match call(&app, request_id, command, Some(key)).await? {
        Outcome::Held {
            reservation_id,
            expires_at_ms,
        } => Ok((
            StatusCode::CREATED,
            Json(json!({
                "reservation_id": Uuid::from_u128(reservation_id),
                "sku": sku,
                "user_id": user_id,
                "quantity": quantity,
                "status": "held",
                "expires_at": rfc3339(expires_at_ms),
            })),
        )
            .into_response()),
        other => Err(unexpected(other)),
    }
}

async fn get_reservation(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_reservation_id(&id)?;
    let record = persistence::reads::reservation(&app.pool, id)
        .await
        .map_err(db_unavailable)?
        .ok_or(ApiError::NotFound("unknown_reservation"))?;
    Ok(Json(json!({
        "reservation_id": record.reservation_id,
        "sku": record.sku,
        "user_id": record.user_id,
        "quantity": record.quantity,
        "status": record.status,
        "expires_at": rfc3339(record.expires_at_ms),
        "decided_at": rfc3339(record.decided_at_ms),
    }))
    .into_response())
}

async fn confirm_reservation(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let reservation_id = parse_reservation_id(&id)?.as_u128();
    settle(&app, Command::Confirm { reservation_id }).await
}

async fn cancel_reservation(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let reservation_id = parse_reservation_id(&id)?.as_u128();
    settle(&app, Command::Cancel { reservation_id }).await
}

async fn settle(app: &App, command: Command) -> Result<Response, ApiError> {
    match call(app, Uuid::now_v7().as_u128(), command, None).await? {
        Outcome::Reservation(view) => Ok(Json(reservation_json(&view)).into_response()),
        other => Err(unexpected(other)),
    }
}

fn reservation_json(v: &ReservationView) -> Value {
    json!({
        "reservation_id": Uuid::from_u128(v.reservation_id),
        "sku": v.sku,
        "user_id": v.user_id,
        "quantity": v.quantity,
        "status": v.status.as_str(),
        "expires_at": rfc3339(v.expires_at_ms),
    })
}

// ---- SKUs -----------------------------------------------------------------------------------

async fn get_sku(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
) -> Result<Response, ApiError> {
    validate_name("sku", &sku, SKU_BYTES_MAX).map_err(|_| ApiError::NotFound("unknown_sku"))?;
    let view = persistence::reads::sku(&app.pool, &sku)
        .await
        .map_err(db_unavailable)?
        .ok_or(ApiError::NotFound("unknown_sku"))?;
    Ok(Json(sku_json(&view)).into_response())
}

/// `status` summarises why a buyer can or cannot reserve now.
fn sku_json(v: &SkuView) -> Value {
    let now = crate::bus::now_ms();
    let status = if v.paused {
        "paused"
    } else if v.config.starts_at_ms.is_some_and(|t| now < t) {
        "not_started"
    } else if v.config.ends_at_ms.is_some_and(|t| now >= t) {
        "ended"
    } else if v.available == 0 {
        "sold_out"
    } else {
        "on_sale"
    };
    json!({
        "sku": v.sku,
        "total": v.total,
        "available": v.available,
        "held": v.held,
        "sold": v.sold,
        "status": status,
        "per_user_limit": v.config.per_user_limit,
        "hold_ttl_seconds": v.config.hold_ttl_ms as f64 / 1000.0,
        "starts_at": v.config.starts_at_ms.map(rfc3339),
        "ends_at": v.config.ends_at_ms.map(rfc3339),
    })
}

#[derive(Deserialize)]
struct UpsertBody {
    total_stock: i64,
    per_user_limit: i64,
    hold_ttl_seconds: f64,
    starts_at: Option<String>,
    ends_at: Option<String>,
}

async fn upsert_sku(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    validate_name("sku", &sku, SKU_BYTES_MAX)?;
    let b: UpsertBody = parse_json(&headers, body, app.config.body_bytes_max).await?;
    if !(0..=STOCK_MAX as i64).contains(&b.total_stock) {
        return Err(ApiError::Invalid(format!(
            "total_stock must be from 0 to {STOCK_MAX}"
        )));
    }
    if !(1..=i64::from(QUANTITY_MAX)).contains(&b.per_user_limit) {
        return Err(ApiError::Invalid(format!(
            "per_user_limit must be from 1 to {QUANTITY_MAX}"
        )));
    }
    let ttl_ms = b.hold_ttl_seconds * 1000.0;
    if !(ttl_ms.is_finite() && ttl_ms >= 1.0 && ttl_ms <= HOLD_TTL_MS_MAX as f64) {
        return Err(ApiError::Invalid(format!(
            "hold_ttl_seconds must be from 0.001 to {}",
            HOLD_TTL_MS_MAX / 1000
        )));
    }
    let starts_at_ms = b
        .starts_at
        .as_deref()
        .map(|s| parse_time("starts_at", s))
        .transpose()?;
    let ends_at_ms = b
        .ends_at
        .as_deref()
        .map(|s| parse_time("ends_at", s))
        .transpose()?;
    if let (Some(s), Some(e)) = (starts_at_ms, ends_at_ms) {
        if s >= e {
            return Err(ApiError::Invalid("starts_at must be before ends_at".into()));
        }
    }
    let config = SkuConfig {
        total_stock: b.total_stock as u64,
        per_user_limit: b.per_user_limit as u32,
        hold_ttl_ms: ttl_ms as u64,
        starts_at_ms,
        ends_at_ms,
    };
    admin_call(&app, Command::UpsertSku { sku, config }).await
}

#[derive(Deserialize)]
struct RestockBody {
    quantity: i64,
}

async fn restock_sku(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    validate_name("sku", &sku, SKU_BYTES_MAX)?;
    let b: RestockBody = parse_json(&headers, body, app.config.body_bytes_max).await?;
    if !(1..=STOCK_MAX as i64).contains(&b.quantity) {
        return Err(ApiError::Invalid(format!(
            "quantity must be from 1 to {STOCK_MAX}"
        )));
    }
    admin_call(
        &app,
        Command::Restock {
            sku,
            quantity: b.quantity as u64,
        },
    )
    .await
}

async fn pause_sku(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    validate_name("sku", &sku, SKU_BYTES_MAX)?;
    admin_call(&app, Command::Pause { sku }).await
}

async fn resume_sku(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    validate_name("sku", &sku, SKU_BYTES_MAX)?;
    admin_call(&app, Command::Resume { sku }).await
}

/// The emergency freeze: every SKU paused by one command, decided in log order like any other.
async fn freeze_all(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    admin_call(&app, Command::PauseAll).await
}

async fn admin_call(app: &App, command: Command) -> Result<Response, ApiError> {
    match call(app, Uuid::now_v7().as_u128(), command, None).await? {
        Outcome::Sku(view) => Ok(Json(sku_json(&view)).into_response()),
        Outcome::Frozen { skus_paused } => {
            Ok(Json(json!({"skus_paused": skus_paused})).into_response())
        }
        other => Err(unexpected(other)),
    }
}

// ---- health -------------------------------------------------------------------------------

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let listening = app
        .bus
        .health
        .listening
        .load(std::sync::atomic::Ordering::Relaxed);
    let polled_ago = crate::bus::now_ms()
        - app
            .bus
            .health
            .last_poll_ms
            .load(std::sync::atomic::Ordering::Relaxed);
    if listening && polled_ago < 2_000 {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "detail": "the outcomes reader is not polling the broker"})),
        )
            .into_response()
    }
}

// ---- shared helpers -----------------------------------------------------------------------

/// Sends one command through the single writer and returns its outcome; refusals become errors.
async fn call(
    app: &App,
    request_id: u128,
    command: Command,
    idempotency_key: Option<String>,
) -> Result<Outcome, ApiError> {
    if app.bus.in_flight() >= app.config.in_flight_max {
        return Err(ApiError::Overloaded {
            retry_after_s: 1,
            detail: format!(
                "this ingress already waits on {} requests",
                app.config.in_flight_max
            ),
        });
    }
    let request = Request {
        request_id,
        ingress_id: app.bus.ingress_id,
        command,
    };
    match app.bus.call(&request).await {
        Ok(Outcome::Rejected(reason)) => Err(ApiError::Rejected(reason)),
        Ok(outcome) => Ok(outcome),
        Err(SendError::Overloaded) => Err(ApiError::Overloaded {
            retry_after_s: 1,
            detail: "the request queue is full".into(),
        }),
        Err(SendError::Unknown(detail)) => Err(ApiError::OutcomeUnknown {
            idempotency_key,
            detail,
        }),
    }
}

fn unexpected(outcome: Outcome) -> ApiError {
    // The sequencer answered with an outcome of another command's kind: a bug, reported loudly.
    tracing::error!(?outcome, "outcome does not match the command");
    ApiError::Unavailable("internal error: mismatched outcome".into())
}

fn db_unavailable(e: sqlx::Error) -> ApiError {
    tracing::warn!(error = %e, "read from Postgres failed");
    ApiError::Unavailable("the database is unavailable; try again".into())
}

fn require_admin(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    // Constant time: the comparison must not reveal how much of a guess was right.
    if bool::from(
        presented
            .as_bytes()
            .ct_eq(app.config.admin_token.as_bytes()),
    ) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Reads at most `limit` bytes and parses them as `T`: 413 over the limit, 415 for a non-JSON
/// content type, 400 for broken JSON, 422 for well-formed JSON of the wrong shape.
async fn parse_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        if !(ct.starts_with("application/json") || ct.contains("+json")) {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit })?;
    serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Invalid(e.to_string()),
        _ => ApiError::MalformedBody(format!("body is not valid JSON: {e}")),
    })
}

/// SKU names appear in URLs and logs: letters, digits and `._:-` only.
fn validate_name(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "{field} must be 1 to {max} characters of A-Z a-z 0-9 . _ : -"
        )))
    }
}

/// User ids and keys: any printable UTF-8 (no control characters), bounded in bytes.
fn validate_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(ApiError::Invalid(format!(
            "{field} must be 1 to {max} bytes of printable text"
        )));
    }
    Ok(())
}

fn parse_reservation_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(s).map_err(|_| ApiError::NotFound("unknown_reservation"))
}

fn parse_time(field: &str, s: &str) -> Result<i64, ApiError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|_| ApiError::Invalid(format!("{field} must be an RFC 3339 timestamp")))
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}
