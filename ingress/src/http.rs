//! The v1 HTTP contract (the README's API table). Writes become commands appended to the requests topic
//! and wait for their outcome; reads come straight from Postgres, the system of record.
//!
//! [`routes`] is the one list of routes: the router, the per-route metrics and the OpenAPI test
//! are all built from it.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;
use wire::limits::{
    HOLD_TTL_MS_MAX, IDEMPOTENCY_KEY_BYTES_MAX, QUANTITY_MAX, SKU_BYTES_MAX, STOCK_MAX,
    USER_ID_BYTES_MAX,
};
use wire::{Command, Outcome, Request as WireRequest, ReservationView, SkuConfig, SkuView};

use crate::admission::{retry_after_secs, LagMonitor, UserLimiter};
use crate::auth::{require_admin, JwtVerifier};
use crate::bus::{now_ms, Bus, SendError};
use crate::error::{ApiError, ErrorBody};
use crate::metrics::{sync_counter, Metrics, Refusal};

pub struct AppConfig {
    pub admin_token: String,
    pub body_bytes_max: usize,
    pub in_flight_max: usize,
    /// Most messages the sequencer may be behind the requests log before buyers' writes are
    /// refused with 503; 0 turns the bound off.
    pub lag_max: u64,
    /// `/readyz` fails when the producer has not reached the broker for this long.
    pub ready_broker_max_age_ms: i64,
    /// Buyers' writes get 503 `no_sequencer` (and `/readyz` fails) when no sequencer has
    /// committed anything for this long while requests wait in the log; 0 turns it off.
    pub stall_max_ms: i64,
    /// Longest a request body may take to arrive, in total (408 and the connection closed).
    pub body_read_timeout: Duration,
}

pub struct App {
    pub bus: Bus,
    pub pool: PgPool,
    pub config: AppConfig,
    pub metrics: Arc<Metrics>,
    pub lag: Arc<LagMonitor>,
    /// Per-user token buckets of `POST /v1/reservations`; `None` when rate limiting is off.
    pub limiter: Option<Arc<UserLimiter>>,
    /// Buyer identity from a JWT; `None` when JWT verification is off.
    pub jwt: Option<JwtVerifier>,
}

// ---- the route table ------------------------------------------------------------------------

/// One route: its method, its path template (axum and OpenAPI spell them alike) and handler.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    handler: MethodRouter<Arc<App>>,
}

impl Route {
    fn new<H, T>(method: &'static str, path: &'static str, handler: H) -> Route
    where
        H: Handler<T, Arc<App>>,
        T: 'static,
    {
        let filter = match method {
            "GET" => MethodFilter::GET,
            "POST" => MethodFilter::POST,
            "PUT" => MethodFilter::PUT,
            "DELETE" => MethodFilter::DELETE,
            other => panic!("route {path}: method {other} is not in the route table's list"),
        };
        Route {
            method,
            path,
            handler: on(filter, handler),
        }
    }
}

/// Every route the ingress serves. Adding one here without documenting it (`#[utoipa::path]`
/// and `crate::openapi::ApiDoc`) fails the OpenAPI test.
pub fn routes() -> Vec<Route> {
    vec![
        Route::new("POST", "/v1/reservations", create_reservation),
        Route::new("GET", "/v1/reservations/{id}", get_reservation),
        Route::new("POST", "/v1/reservations/{id}/confirm", confirm_reservation),
        Route::new("POST", "/v1/reservations/{id}/cancel", cancel_reservation),
        Route::new("GET", "/v1/skus/{sku}", get_sku),
        Route::new("PUT", "/v1/admin/skus/{sku}", upsert_sku),
        Route::new("POST", "/v1/admin/skus/{sku}/restock", restock_sku),
        Route::new("POST", "/v1/admin/skus/{sku}/pause", pause_sku),
        Route::new("POST", "/v1/admin/skus/{sku}/resume", resume_sku),
        Route::new("POST", "/v1/admin/freeze", freeze_all),
        Route::new("GET", "/healthz", healthz),
        Route::new("GET", "/readyz", readyz),
        Route::new("GET", "/metrics", metrics_text),
        Route::new("GET", "/openapi.json", openapi_json),
    ]
}

/// `(method, path)` of every route, in [`routes`]'s order (the metrics' route indexes).
pub fn route_table() -> Vec<(&'static str, &'static str)> {
    routes().iter().map(|r| (r.method, r.path)).collect()
}

pub fn router(app: Arc<App>) -> Router {
    let mut router = Router::new();
    for (index, route) in routes().into_iter().enumerate() {
        let tracked = Tracked {
            metrics: app.metrics.clone(),
            route: index,
        };
        router = router.route(
            route.path,
            route
                .handler
                .route_layer(from_fn_with_state(tracked, track)),
        );
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

#[derive(Clone)]
struct Tracked {
    metrics: Arc<Metrics>,
    route: usize,
}

tokio::task_local! {
    /// The id of the HTTP request being handled (see [`track`]).
    static REQUEST_ID: u128;
}

/// Counts, times and gauges every request of one route, and gives it an id (UUIDv7) returned in
/// `X-Request-Id`. A write carries that same id as its command's `request_id` through the
/// requests topic, the sequencer's batch and the outcomes topic; it is also the primary key of
/// its decision row in Postgres (and the reservation id when granted), so any answer can be
/// traced end to end.
async fn track(State(t): State<Tracked>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let _in_flight = t.metrics.request_started();
    let id = Uuid::now_v7();
    let mut response = REQUEST_ID.scope(id.as_u128(), next.run(request)).await;
    t.metrics
        .request_done(t.route, response.status().as_u16(), start.elapsed());
    if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// The current HTTP request's id; a fresh one outside a request (never the case for routes).
fn current_request_id() -> u128 {
    REQUEST_ID
        .try_with(|id| *id)
        .unwrap_or_else(|_| Uuid::now_v7().as_u128())
}

async fn not_found(State(app): State<Arc<App>>) -> ApiError {
    app.metrics.unmatched(404);
    ApiError::NotFound("not_found")
}

async fn method_not_allowed(State(app): State<Arc<App>>) -> ApiError {
    app.metrics.unmatched(405);
    ApiError::MethodNotAllowed
}

// ---- bodies and answers -------------------------------------------------------------------

/// A reservation request. With JWT verification on, `user_id` may be left out (the token's
/// subject is the buyer); when present it must equal the subject.
#[derive(Deserialize, ToSchema)]
pub struct ReserveBody {
    /// 1-64 characters of `A-Z a-z 0-9 . _ : -`.
    #[schema(example = "tee-1")]
    sku: String,
    /// 1-128 bytes of printable UTF-8. Required unless JWT verification is on.
    #[schema(example = "alice")]
    user_id: Option<String>,
    /// From 1 to the SKU's per-user limit (at most 1,000,000).
    #[schema(minimum = 1, maximum = 1_000_000, example = 1)]
    quantity: i64,
    /// Names this request: repeating it returns the first outcome. The `Idempotency-Key`
    /// header is accepted too. 1-128 bytes of printable UTF-8.
    #[schema(example = "alice-1")]
    idempotency_key: Option<String>,
}

/// A reservation as its owner sees it.
#[derive(Serialize, ToSchema)]
pub struct ReservationOut {
    reservation_id: Uuid,
    sku: String,
    user_id: String,
    quantity: u32,
    /// held, confirmed, cancelled or expired.
    #[schema(value_type = String, example = "held")]
    status: Cow<'static, str>,
    /// RFC 3339, milliseconds, UTC.
    expires_at: String,
    /// When the hold was granted (`GET` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    decided_at: Option<String>,
}

/// A SKU's counters and configuration; `available + held + sold == total` always.
#[derive(Serialize, ToSchema)]
pub struct SkuOut {
    sku: String,
    total: u64,
    available: u64,
    held: u64,
    sold: u64,
    /// on_sale, sold_out, paused, not_started or ended.
    #[schema(example = "on_sale")]
    status: &'static str,
    per_user_limit: u32,
    hold_ttl_seconds: f64,
    starts_at: Option<String>,
    ends_at: Option<String>,
}

/// The emergency freeze's answer.
#[derive(Serialize, ToSchema)]
pub struct FreezeOut {
    skus_paused: u32,
}

#[derive(Deserialize, ToSchema)]
pub struct UpsertBody {
    /// From 0 to 10^12; may not go below held + sold.
    #[schema(example = 100)]
    total_stock: i64,
    #[schema(example = 2)]
    per_user_limit: i64,
    /// From 0.001 to 604800 (7 days).
    #[schema(example = 300)]
    hold_ttl_seconds: f64,
    /// RFC 3339; reservations before it are refused with `sale_not_started`.
    starts_at: Option<String>,
    /// RFC 3339; reservations at or after it are refused with `sale_ended`.
    ends_at: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct RestockBody {
    /// Units to add, from 1 to 10^12.
    #[schema(example = 50)]
    quantity: i64,
}

#[derive(Serialize, ToSchema)]
pub struct StatusOut {
    #[schema(example = "ok")]
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct ReadyOut {
    /// ready or not_ready.
    status: &'static str,
    /// Each check: ok, or why not.
    checks: ReadyChecks,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ReadyChecks {
    /// The outcomes reader is polling the broker.
    outcomes_reader: &'static str,
    /// The producer reached the broker recently.
    broker: &'static str,
    /// Some sequencer committed within STALL_MAX_MS, or nothing waits: ok, or stalled.
    sequencer: &'static str,
}

// ---- reservations -------------------------------------------------------------------------

#[utoipa::path(
    post, path = "/v1/reservations", tag = "reservations",
    summary = "Reserve units of a SKU (a hold that expires unless confirmed)",
    request_body(content = ReserveBody, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "the idempotency key, if not in the body")),
    security((), ("buyer_jwt" = [])),
    responses(
        (status = 201, description = "held", body = ReservationOut),
        (status = 400, description = "invalid_request: the body is not JSON", body = ErrorBody),
        (status = 401, description = "unauthorized: JWT mode, token missing, forged or expired", body = ErrorBody),
        (status = 403, description = "forbidden: body user_id is not the token's subject", body = ErrorBody),
        (status = 404, description = "unknown_sku", body = ErrorBody),
        (status = 409, description = "sold_out, limit_exceeded, sale_paused, sale_not_started or sale_ended", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
        (status = 422, description = "invalid_request (with detail) or idempotency_key_reused", body = ErrorBody),
        (status = 429, description = "rate_limited, with Retry-After", body = ErrorBody),
        (status = 503, description = "overloaded, with Retry-After: nothing was appended", body = ErrorBody),
        (status = 504, description = "outcome_unknown: retry with the returned idempotency_key", body = ErrorBody),
    )
)]
pub(crate) async fn create_reservation(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Identity first: without a valid token nothing else is looked at.
    let subject = match &app.jwt {
        Some(jwt) => Some(jwt.subject(&headers)?),
        None => None,
    };
    let b: ReserveBody = parse_json(&headers, body, &app.config).await?;
    validate_name("sku", &b.sku, SKU_BYTES_MAX)?;
    let user_id = match (subject, b.user_id) {
        (Some(sub), Some(claimed)) if claimed != sub => {
            return Err(ApiError::Forbidden(
                "user_id is not the subject of the bearer token".into(),
            ))
        }
        (Some(sub), _) => sub,
        (None, Some(user_id)) => {
            validate_text("user_id", &user_id, USER_ID_BYTES_MAX)?;
            user_id
        }
        (None, None) => return Err(ApiError::Invalid("missing field `user_id`".into())),
    };
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
    // Admission before the token bucket, so that a 503 does not cost the buyer a token.
    admit(&app, Class::Buyer)?;
    if let Some(limiter) = &app.limiter {
        if let Err(wait) = limiter.check(&user_id) {
            app.metrics.refused(Refusal::RateLimited);
            return Err(ApiError::RateLimited {
                retry_after_s: retry_after_secs(wait),
            });
        }
    }
    let request_id = current_request_id();
    let sku = b.sku;
    let quantity = b.quantity as u32;
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
            Json(ReservationOut {
                reservation_id: Uuid::from_u128(reservation_id),
                sku,
                user_id,
                quantity,
                status: Cow::Borrowed("held"),
                expires_at: rfc3339(expires_at_ms),
                decided_at: None,
            }),
        )
            .into_response()),
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(
    get, path = "/v1/reservations/{id}", tag = "reservations",
    summary = "A reservation as committed in Postgres",
    params(("id" = String, Path, description = "reservation id (UUID)")),
    security((), ("buyer_jwt" = [])),
    responses(
        (status = 200, description = "the reservation", body = ReservationOut),
        (status = 401, description = "unauthorized (JWT mode)", body = ErrorBody),
        (status = 403, description = "forbidden: another user's reservation (JWT mode)", body = ErrorBody),
        (status = 404, description = "unknown_reservation", body = ErrorBody),
        (status = 503, description = "unavailable: Postgres did not answer", body = ErrorBody),
    )
)]
pub(crate) async fn get_reservation(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let subject = match &app.jwt {
        Some(jwt) => Some(jwt.subject(&headers)?),
        None => None,
    };
    let id = parse_reservation_id(&id)?;
    let record = persistence::reads::reservation(&app.pool, id)
        .await
        .map_err(db_unavailable)?
        .ok_or(ApiError::NotFound("unknown_reservation"))?;
    check_owner(subject.as_deref(), &record.user_id)?;
    Ok(Json(ReservationOut {
        reservation_id: record.reservation_id,
        sku: record.sku,
        user_id: record.user_id,
        quantity: record.quantity,
        status: Cow::Owned(record.status),
        expires_at: rfc3339(record.expires_at_ms),
        decided_at: Some(rfc3339(record.decided_at_ms)),
    })
    .into_response())
}

#[utoipa::path(
    post, path = "/v1/reservations/{id}/confirm", tag = "reservations",
    summary = "Confirm a hold (checkout done): its units move from held to sold; repeatable",
    params(("id" = String, Path, description = "reservation id (UUID)")),
    security((), ("buyer_jwt" = [])),
    responses(
        (status = 200, description = "confirmed", body = ReservationOut),
        (status = 401, description = "unauthorized (JWT mode)", body = ErrorBody),
        (status = 403, description = "forbidden: another user's reservation (JWT mode)", body = ErrorBody),
        (status = 404, description = "unknown_reservation", body = ErrorBody),
        (status = 409, description = "reservation_expired or reservation_cancelled", body = ErrorBody),
        (status = 503, description = "overloaded, with Retry-After", body = ErrorBody),
        (status = 504, description = "outcome_unknown: retrying is safe", body = ErrorBody),
    )
)]
pub(crate) async fn confirm_reservation(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_reservation_id(&id)?;
    authorize_owner(&app, &headers, id).await?;
    settle(
        &app,
        Command::Confirm {
            reservation_id: id.as_u128(),
        },
    )
    .await
}

#[utoipa::path(
    post, path = "/v1/reservations/{id}/cancel", tag = "reservations",
    summary = "Release a hold; repeatable",
    params(("id" = String, Path, description = "reservation id (UUID)")),
    security((), ("buyer_jwt" = [])),
    responses(
        (status = 200, description = "cancelled", body = ReservationOut),
        (status = 401, description = "unauthorized (JWT mode)", body = ErrorBody),
        (status = 403, description = "forbidden: another user's reservation (JWT mode)", body = ErrorBody),
        (status = 404, description = "unknown_reservation", body = ErrorBody),
        (status = 409, description = "reservation_confirmed or reservation_expired", body = ErrorBody),
        (status = 503, description = "overloaded, with Retry-After", body = ErrorBody),
        (status = 504, description = "outcome_unknown: retrying is safe", body = ErrorBody),
    )
)]
pub(crate) async fn cancel_reservation(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_reservation_id(&id)?;
    authorize_owner(&app, &headers, id).await?;
    settle(
        &app,
        Command::Cancel {
            reservation_id: id.as_u128(),
        },
    )
    .await
}

/// JWT mode: the caller must own the reservation (read from Postgres, where it is visible from
/// the moment its owner was answered). Without JWT verification, the id is the capability.
async fn authorize_owner(app: &App, headers: &HeaderMap, id: Uuid) -> Result<(), ApiError> {
    let Some(jwt) = &app.jwt else {
        return Ok(());
    };
    let subject = jwt.subject(headers)?;
    let record = persistence::reads::reservation(&app.pool, id)
        .await
        .map_err(db_unavailable)?
        .ok_or(ApiError::NotFound("unknown_reservation"))?;
    check_owner(Some(&subject), &record.user_id)
}

fn check_owner(subject: Option<&str>, owner: &str) -> Result<(), ApiError> {
    match subject {
        Some(s) if s != owner => Err(ApiError::Forbidden(
            "this reservation belongs to another user".into(),
        )),
        _ => Ok(()),
    }
}

async fn settle(app: &App, command: Command) -> Result<Response, ApiError> {
    admit(app, Class::Buyer)?;
    match call(app, current_request_id(), command, None).await? {
        Outcome::Reservation(view) => Ok(Json(reservation_out(view)).into_response()),
        other => Err(unexpected(other)),
    }
}

fn reservation_out(v: ReservationView) -> ReservationOut {
    ReservationOut {
        reservation_id: Uuid::from_u128(v.reservation_id),
        sku: v.sku,
        user_id: v.user_id,
        quantity: v.quantity,
        status: Cow::Borrowed(v.status.as_str()),
        expires_at: rfc3339(v.expires_at_ms),
        decided_at: None,
    }
}

// ---- SKUs -----------------------------------------------------------------------------------

#[utoipa::path(
    get, path = "/v1/skus/{sku}", tag = "skus",
    summary = "A SKU's counters as committed in Postgres",
    params(("sku" = String, Path, description = "SKU name")),
    responses(
        (status = 200, description = "the SKU", body = SkuOut),
        (status = 404, description = "unknown_sku", body = ErrorBody),
        (status = 503, description = "unavailable: Postgres did not answer", body = ErrorBody),
    )
)]
pub(crate) async fn get_sku(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
) -> Result<Response, ApiError> {
    validate_name("sku", &sku, SKU_BYTES_MAX).map_err(|_| ApiError::NotFound("unknown_sku"))?;
    let view = persistence::reads::sku(&app.pool, &sku)
        .await
        .map_err(db_unavailable)?
        .ok_or(ApiError::NotFound("unknown_sku"))?;
    Ok(Json(sku_out(view)).into_response())
}

/// `status` summarises why a buyer can or cannot reserve now.
fn sku_out(v: SkuView) -> SkuOut {
    let now = now_ms();
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
    SkuOut {
        sku: v.sku,
        total: v.total,
        available: v.available,
        held: v.held,
        sold: v.sold,
        status,
        per_user_limit: v.config.per_user_limit,
        hold_ttl_seconds: v.config.hold_ttl_ms as f64 / 1000.0,
        starts_at: v.config.starts_at_ms.map(rfc3339),
        ends_at: v.config.ends_at_ms.map(rfc3339),
    }
}

#[utoipa::path(
    put, path = "/v1/admin/skus/{sku}", tag = "admin",
    summary = "Create or update a SKU",
    params(("sku" = String, Path, description = "SKU name: 1-64 characters of A-Z a-z 0-9 . _ : -")),
    request_body(content = UpsertBody, content_type = "application/json"),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the SKU", body = SkuOut),
        (status = 400, description = "invalid_request: the body is not JSON", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 409, description = "stock_below_committed", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
        (status = 422, description = "invalid_request", body = ErrorBody),
        (status = 503, description = "overloaded", body = ErrorBody),
        (status = 504, description = "outcome_unknown", body = ErrorBody),
    )
)]
pub(crate) async fn upsert_sku(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_admin(&app.config.admin_token, &headers)?;
    validate_name("sku", &sku, SKU_BYTES_MAX)?;
    let b: UpsertBody = parse_json(&headers, body, &app.config).await?;
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
    if !config.is_valid() {
        // What is left after the checks above: a sale window before 1970.
        return Err(ApiError::Invalid(
            "starts_at and ends_at must lie between 1970 and 9999".into(),
        ));
    }
    admin_call(&app, Command::UpsertSku { sku, config }).await
}

#[utoipa::path(
    post, path = "/v1/admin/skus/{sku}/restock", tag = "admin",
    summary = "Add units to a SKU",
    params(("sku" = String, Path, description = "SKU name")),
    request_body(content = RestockBody, content_type = "application/json"),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the SKU", body = SkuOut),
        (status = 400, description = "invalid_request: the body is not JSON", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "unknown_sku", body = ErrorBody),
        (status = 409, description = "stock_overflow", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
        (status = 422, description = "invalid_request", body = ErrorBody),
        (status = 503, description = "overloaded", body = ErrorBody),
        (status = 504, description = "outcome_unknown", body = ErrorBody),
    )
)]
pub(crate) async fn restock_sku(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_admin(&app.config.admin_token, &headers)?;
    validate_name("sku", &sku, SKU_BYTES_MAX)?;
    let b: RestockBody = parse_json(&headers, body, &app.config).await?;
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

#[utoipa::path(
    post, path = "/v1/admin/skus/{sku}/pause", tag = "admin",
    summary = "Stop new reservations of a SKU (confirm and cancel still work)",
    params(("sku" = String, Path, description = "SKU name")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the SKU", body = SkuOut),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "unknown_sku", body = ErrorBody),
        (status = 422, description = "invalid_request: bad SKU name", body = ErrorBody),
        (status = 503, description = "overloaded", body = ErrorBody),
        (status = 504, description = "outcome_unknown", body = ErrorBody),
    )
)]
pub(crate) async fn pause_sku(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app.config.admin_token, &headers)?;
    validate_name("sku", &sku, SKU_BYTES_MAX)?;
    admin_call(&app, Command::Pause { sku }).await
}

#[utoipa::path(
    post, path = "/v1/admin/skus/{sku}/resume", tag = "admin",
    summary = "Resume reservations of a paused SKU",
    params(("sku" = String, Path, description = "SKU name")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the SKU", body = SkuOut),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "unknown_sku", body = ErrorBody),
        (status = 422, description = "invalid_request: bad SKU name", body = ErrorBody),
        (status = 503, description = "overloaded", body = ErrorBody),
        (status = 504, description = "outcome_unknown", body = ErrorBody),
    )
)]
pub(crate) async fn resume_sku(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app.config.admin_token, &headers)?;
    validate_name("sku", &sku, SKU_BYTES_MAX)?;
    admin_call(&app, Command::Resume { sku }).await
}

/// The emergency freeze: every SKU paused by one command, decided in log order like any other.
#[utoipa::path(
    post, path = "/v1/admin/freeze", tag = "admin",
    summary = "Emergency freeze: pause every SKU with one command",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "how many SKUs were paused", body = FreezeOut),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 503, description = "overloaded", body = ErrorBody),
        (status = 504, description = "outcome_unknown: retrying is safe", body = ErrorBody),
    )
)]
pub(crate) async fn freeze_all(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app.config.admin_token, &headers)?;
    admin_call(&app, Command::PauseAll).await
}

async fn admin_call(app: &App, command: Command) -> Result<Response, ApiError> {
    admit(app, Class::Admin)?;
    match call(app, current_request_id(), command, None).await? {
        Outcome::Sku(view) => Ok(Json(sku_out(view)).into_response()),
        Outcome::Frozen { skus_paused } => Ok(Json(FreezeOut { skus_paused }).into_response()),
        other => Err(unexpected(other)),
    }
}

// ---- operations -----------------------------------------------------------------------------

#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    summary = "Liveness: the process answers",
    responses((status = 200, description = "alive", body = StatusOut))
)]
pub(crate) async fn healthz() -> Json<StatusOut> {
    Json(StatusOut { status: "ok" })
}

#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    summary = "Readiness: the outcomes reader polls and the producer reaches the broker",
    responses(
        (status = 200, description = "ready", body = ReadyOut),
        (status = 503, description = "not ready, with the failing checks", body = ReadyOut),
    )
)]
pub(crate) async fn readyz(State(app): State<Arc<App>>) -> Response {
    let health = &app.bus.health;
    let (ready, body) = readiness(
        now_ms(),
        health.listening.load(Ordering::Relaxed),
        health.last_poll_ms.load(Ordering::Relaxed),
        app.lag.broker_ok_ms.load(Ordering::Relaxed),
        app.config.ready_broker_max_age_ms,
        app.lag.stalled_for(now_ms(), app.config.stall_max_ms),
    );
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Ready when the outcomes reader polled within 2 s and the producer reached the broker within
/// `broker_max_age_ms` (times in unix ms; 0 = never).
fn readiness(
    now: i64,
    listening: bool,
    last_poll_ms: i64,
    broker_ok_ms: i64,
    broker_max_age_ms: i64,
    stalled_for_ms: Option<i64>,
) -> (bool, ReadyOut) {
    let reader_ok = listening && now - last_poll_ms < 2_000;
    let broker_ok = broker_ok_ms > 0 && now - broker_ok_ms <= broker_max_age_ms;
    let sequencer_ok = stalled_for_ms.is_none();
    let checks = ReadyChecks {
        outcomes_reader: if reader_ok { "ok" } else { "not_polling" },
        broker: if broker_ok { "ok" } else { "unreachable" },
        sequencer: if sequencer_ok { "ok" } else { "stalled" },
    };
    if reader_ok && broker_ok && sequencer_ok {
        let body = ReadyOut {
            status: "ready",
            checks,
            detail: None,
        };
        return (true, body);
    }
    let mut problems = Vec::new();
    if !reader_ok {
        problems.push("the outcomes reader is not polling the broker".to_owned());
    }
    if !broker_ok {
        problems.push(if broker_ok_ms == 0 {
            "the producer has not reached the broker yet".to_owned()
        } else {
            format!(
                "the producer has not reached the broker for {} ms",
                now - broker_ok_ms
            )
        });
    }
    if let Some(ms) = stalled_for_ms {
        problems.push(format!(
            "no sequencer has committed anything for {ms} ms while requests wait in the log"
        ));
    }
    let body = ReadyOut {
        status: "not_ready",
        checks,
        detail: Some(problems.join("; ")),
    };
    (false, body)
}

#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    summary = "Prometheus text exposition of the ingress's metrics",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"))
)]
pub(crate) async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    refresh_gauges(&app);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// Copies the values kept in atomics elsewhere into their series, once per scrape.
fn refresh_gauges(app: &App) {
    let m = &app.metrics;
    let now = now_ms();
    let health = &app.bus.health;
    m.writes_in_flight.set(app.bus.in_flight() as f64);
    m.producer_queue_depth
        .set(f64::from(app.bus.producer_queue_depth()));
    sync_counter(&m.outcome_messages, &health.outcome_messages);
    m.outcomes_received.absolute(
        health.replies_delivered.load(Ordering::Relaxed)
            + health.replies_unclaimed.load(Ordering::Relaxed),
    );
    sync_counter(&m.outcomes_unclaimed, &health.replies_unclaimed);
    m.sequencer_lag
        .set(app.lag.lag.load(Ordering::Relaxed) as f64);
    let age = |ms: i64| {
        if ms == 0 {
            f64::INFINITY
        } else {
            (now - ms).max(0) as f64 / 1000.0
        }
    };
    m.lag_signal_age
        .set(age(app.lag.measured_ms.load(Ordering::Relaxed)));
    m.broker_ok_age
        .set(age(app.lag.broker_ok_ms.load(Ordering::Relaxed)));
    if let Some(limiter) = &app.limiter {
        m.rate_limiter_keys.set(limiter.len() as f64);
    }
}

#[utoipa::path(
    get, path = "/openapi.json", tag = "operations",
    summary = "This description",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json"))
)]
pub(crate) async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::json(),
    )
        .into_response()
}

// ---- shared helpers -----------------------------------------------------------------------

/// Who is asking: buyers' writes obey every bound; admin commands (rare, authenticated) skip
/// them, so that pausing or the emergency freeze works even when this ingress is saturated or
/// the sequencer is behind.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Buyer,
    Admin,
}

/// Refuses at once (503 with Retry-After, nothing appended) what this ingress cannot finish:
/// more writes in flight than IN_FLIGHT_MAX, a sequencer more than LAG_MAX messages behind, or
/// no sequencer committing for STALL_MAX_MS while requests wait.
/// A few atomic loads; the lag is measured in the background.
fn admit(app: &App, class: Class) -> Result<(), ApiError> {
    if class == Class::Buyer && app.bus.in_flight() >= app.config.in_flight_max {
        app.metrics.refused(Refusal::InFlight);
        return Err(ApiError::Overloaded {
            retry_after_s: 1,
            detail: format!(
                "this ingress already waits on {} requests",
                app.config.in_flight_max
            ),
        });
    }
    if class == Class::Buyer && app.config.lag_max > 0 {
        if let Some(lag) = app.lag.current_lag(now_ms()) {
            if lag > app.config.lag_max as i64 {
                app.metrics.refused(Refusal::Lag);
                return Err(ApiError::Overloaded {
                    retry_after_s: 1,
                    detail: format!(
                        "the sequencer is {lag} requests behind (more than {})",
                        app.config.lag_max
                    ),
                });
            }
        }
    }
    if class == Class::Buyer {
        if let Some(stalled) = app.lag.stalled_for(now_ms(), app.config.stall_max_ms) {
            app.metrics.refused(Refusal::NoSequencer);
            return Err(ApiError::NoSequencer {
                retry_after_s: 1,
                detail: format!(
                    "no sequencer has committed anything for {stalled} ms while {} requests \
                     wait in the log; nothing was appended",
                    app.lag.lag.load(Ordering::Relaxed)
                ),
            });
        }
    }
    Ok(())
}

/// Sends one command through the single writer and returns its outcome; refusals become errors.
async fn call(
    app: &App,
    request_id: u128,
    command: Command,
    idempotency_key: Option<String>,
) -> Result<Outcome, ApiError> {
    let request = WireRequest {
        request_id,
        ingress_id: app.bus.ingress_id,
        command,
    };
    match app.bus.call(&request).await {
        Ok(Outcome::Rejected(reason)) => Err(ApiError::Rejected(reason)),
        Ok(outcome) => Ok(outcome),
        Err(SendError::Overloaded) => {
            app.metrics.refused(Refusal::QueueFull);
            Err(ApiError::Overloaded {
                retry_after_s: 1,
                detail: "the request queue is full".into(),
            })
        }
        Err(SendError::Unknown(detail)) => {
            tracing::warn!(request_id = %Uuid::from_u128(request_id), %detail, "outcome unknown (504)");
            Err(ApiError::OutcomeUnknown {
                idempotency_key,
                detail,
            })
        }
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

/// Reads at most `limit` bytes and parses them as `T`: 413 over the limit, 415 for a non-JSON
/// content type, 400 for broken JSON, 422 for well-formed JSON of the wrong shape.
async fn parse_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    config: &AppConfig,
) -> Result<T, ApiError> {
    let limit = config.body_bytes_max;
    // One body, one type: a second Content-Type is a smuggling attempt or a broken client.
    if headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(ApiError::UnsupportedMediaType);
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        if !(ct.starts_with("application/json") || ct.contains("+json")) {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    // One deadline for the whole body (not per chunk): a client trickling a byte at a time
    // cannot hold the connection and this handler longer than BODY_READ_TIMEOUT_MS.
    let bytes = tokio::time::timeout(config.body_read_timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout {
            timeout_ms: config.body_read_timeout.as_millis() as u64,
        })?
        .map_err(|_| ApiError::PayloadTooLarge { limit })?;
    serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Invalid(e.to_string()),
        _ => ApiError::MalformedBody(format!("body is not valid JSON: {e}")),
    })
}

/// SKU names appear in URLs and logs: letters, digits and `._:-` only.
fn validate_name(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    debug_assert_eq!(max, wire::limits::SKU_BYTES_MAX);
    if wire::limits::sku_name_ok(value) {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "{field} must be 1 to {max} characters of A-Z a-z 0-9 . _ : -"
        )))
    }
}

/// User ids and keys: any printable UTF-8 (no control characters), bounded in bytes.
fn validate_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if !wire::limits::text_ok(value, max) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_a_polling_reader_and_a_recent_broker_round_trip() {
        let now = 1_000_000;
        let (ok, body) = readiness(now, true, now - 100, now - 500, 3_000, None);
        assert!(ok);
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"status": "ready", "checks": {"outcomes_reader": "ok", "broker": "ok", "sequencer": "ok"}})
        );
        let (ok, body) = readiness(now, true, now - 100, now - 3_001, 3_000, None);
        assert!(!ok);
        assert_eq!(body.checks.broker, "unreachable");
        assert_eq!(body.checks.outcomes_reader, "ok");
        assert!(body.detail.unwrap().contains("3001 ms"));
        let (ok, body) = readiness(now, true, now - 100, 0, 3_000, None);
        assert!(!ok);
        assert!(body.detail.unwrap().contains("not reached the broker yet"));
        let (ok, body) = readiness(now, true, now - 2_500, now, 3_000, None);
        assert!(!ok);
        assert_eq!(body.checks.outcomes_reader, "not_polling");
        let (ok, _) = readiness(now, false, now, now, 3_000, None);
        assert!(!ok);
        let (ok, body) = readiness(now, true, now, now, 3_000, Some(4_200));
        assert!(!ok);
        assert_eq!(body.checks.sequencer, "stalled");
        assert!(body.detail.unwrap().contains("4200 ms"));
    }

    #[test]
    fn error_bodies_keep_their_stable_shapes() {
        use axum::body::to_bytes;
        let render = |e: ApiError| async move {
            let r = e.into_response();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap().to_owned());
            let body: serde_json::Value =
                serde_json::from_slice(&to_bytes(r.into_body(), 1 << 16).await.unwrap()).unwrap();
            (status, retry, body)
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(
                render(ApiError::Rejected(wire::Reject::SoldOut)).await,
                (409, None, serde_json::json!({"error": "sold_out"}))
            );
            assert_eq!(
                render(ApiError::NotFound("not_found")).await,
                (404, None, serde_json::json!({"error": "not_found"}))
            );
            let (s, r, b) = render(ApiError::RateLimited { retry_after_s: 2 }).await;
            assert_eq!(
                (s, r.as_deref(), &b["error"]),
                (429, Some("2"), &serde_json::json!("rate_limited"))
            );
            let (s, _, b) = render(ApiError::OutcomeUnknown {
                idempotency_key: None,
                detail: "late".into(),
            })
            .await;
            assert_eq!(s, 504);
            assert_eq!(b["error"], "outcome_unknown");
            assert!(
                b.as_object().unwrap().contains_key("idempotency_key"),
                "{b}"
            );
            assert!(b["idempotency_key"].is_null());
            let (_, _, b) = render(ApiError::OutcomeUnknown {
                idempotency_key: Some("k1".into()),
                detail: "late".into(),
            })
            .await;
            assert_eq!(b["idempotency_key"], "k1");
            let (s, r, b) = render(ApiError::Overloaded {
                retry_after_s: 1,
                detail: "busy".into(),
            })
            .await;
            assert_eq!(
                (s, r.as_deref(), b),
                (
                    503,
                    Some("1"),
                    serde_json::json!({"error": "overloaded", "detail": "busy"})
                )
            );
        });
    }
}
