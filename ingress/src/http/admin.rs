//! Operators' commands (`Authorization: Bearer <ADMIN_TOKEN>`): create or update a SKU, restock,
//! pause, resume, and the emergency freeze. They pass no admission bound (see
//! [`crate::admission::Write::Admin`]), so they go through even when buyers are refused.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use wire::limits::{
    HOLD_TTL_MS_MAX, IDEMPOTENCY_KEY_BYTES_MAX, QUANTITY_MAX, QUEUE_MAX, STOCK_MAX,
};
use wire::{Command, Outcome, QueueWindow, SkuConfig};

use serde::de::DeserializeOwned;

use super::answers::{AdminErrors, SkuBodyAnswers, SkuSwitchAnswers};
use super::command::{submit, submit_to, unexpected};
use super::dto::{
    AdminKeyHeader, FreezeOut, QueueBody, RestockBody, RestockKeyHeader, SkuOut, SkuPath,
    UpsertBody,
};
use super::state::App;
use super::validate::{self, parse_json};
use crate::admission::Write;
use crate::auth::require_admin;
use crate::error::{ApiError, ErrorBody};

#[utoipa::path(
    put, path = "/v1/admin/skus/{sku}", tag = "admin",
    summary = "Create or update a SKU",
    params(SkuPath, AdminKeyHeader),
    request_body(content = UpsertBody, content_type = "application/json"),
    security(("admin_token" = [])),
    responses(
        SkuBodyAnswers,
        (status = 409, description = "stock_below_committed", body = ErrorBody),
    )
)]
pub(crate) async fn upsert_sku(
    State(app): State<Arc<App>>,
    SkuCommand {
        sku,
        headers,
        body: b,
    }: SkuCommand<UpsertBody>,
) -> Result<Response, ApiError> {
    validate::integer("total_stock", b.total_stock, 0, STOCK_MAX as i64)?;
    validate::integer(
        "per_user_limit",
        b.per_user_limit,
        1,
        i64::from(QUANTITY_MAX),
    )?;
    let ttl_ms = b.hold_ttl_seconds * 1000.0;
    if !(ttl_ms.is_finite() && ttl_ms >= 1.0 && ttl_ms <= HOLD_TTL_MS_MAX as f64) {
        return Err(ApiError::Invalid(format!(
            "hold_ttl_seconds must be from 0.001 to {}",
            HOLD_TTL_MS_MAX / 1000
        )));
    }
    let starts_at_ms = validate::time("starts_at", b.starts_at.as_deref())?;
    let ends_at_ms = validate::time("ends_at", b.ends_at.as_deref())?;
    if let (Some(s), Some(e)) = (starts_at_ms, ends_at_ms) {
        if s >= e {
            return Err(ApiError::Invalid("starts_at must be before ends_at".into()));
        }
    }
    let queue = b.queue.map(|q| queue_window(q, starts_at_ms)).transpose()?;
    let config = SkuConfig {
        total_stock: b.total_stock as u64,
        per_user_limit: b.per_user_limit as u32,
        hold_ttl_ms: ttl_ms as u64,
        starts_at_ms,
        ends_at_ms,
        queue,
    };
    if !config.is_valid() {
        // What is left after the checks above: a time outside 1970 to 9999.
        return Err(ApiError::Invalid(
            "starts_at, ends_at and queue.opens_at must lie between 1970 and 9999".into(),
        ));
    }
    admin_call(&app, &headers, Command::UpsertSku { sku, config }).await
}

/// The pre-sale queue of an upsert body; it must open before the sale's start.
fn queue_window(q: QueueBody, starts_at_ms: Option<i64>) -> Result<QueueWindow, ApiError> {
    validate::integer("queue.max", q.max, 1, i64::from(QUEUE_MAX))?;
    let opens_at_ms = validate::time("queue.opens_at", Some(&q.opens_at))?.unwrap_or_default();
    if starts_at_ms.is_none_or(|s| opens_at_ms >= s) {
        return Err(ApiError::Invalid(QUEUE_BEFORE_START.into()));
    }
    Ok(QueueWindow {
        opens_at_ms,
        max: q.max as u32,
    })
}

/// The 422 detail of a queue that does not open before a sale start.
pub(super) const QUEUE_BEFORE_START: &str = "queue.opens_at must be before starts_at";

#[utoipa::path(
    post, path = "/v1/admin/skus/{sku}/restock", tag = "admin",
    summary = "Add units to a SKU",
    params(SkuPath, RestockKeyHeader),
    request_body(content = RestockBody, content_type = "application/json"),
    security(("admin_token" = [])),
    responses(
        SkuBodyAnswers,
        (status = 400, description = "invalid_request: the body is not JSON; or \
            idempotency_key_required: a restock must carry an Idempotency-Key header", body = ErrorBody),
        (status = 404, description = "unknown_sku", body = ErrorBody),
        (status = 409, description = "stock_overflow: the total would pass 10^12", body = ErrorBody),
    )
)]
pub(crate) async fn restock_sku(
    State(app): State<Arc<App>>,
    SkuCommand {
        sku,
        headers,
        body: b,
    }: SkuCommand<RestockBody>,
) -> Result<Response, ApiError> {
    validate::integer("quantity", b.quantity, 1, STOCK_MAX as i64)?;
    let quantity = b.quantity as u64;
    if admin_key(&headers)?.is_none() {
        return Err(ApiError::IdempotencyKeyRequired(
            "a restock adds units: send an Idempotency-Key header, so that a retry (after a \
             504, say) cannot add them twice",
        ));
    }
    admin_call(&app, &headers, Command::Restock { sku, quantity }).await
}

/// A SKU switch handler: `POST $path` applies `Command::$command` to the SKU of the path.
#[rustfmt::skip] // rustfmt re-indents the attribute below on every run
macro_rules! sku_switch_handler {
    ($name:ident, $command:ident, path = $path:tt, summary = $summary:tt) => {
        #[utoipa::path(
            post, path = $path, tag = "admin",
            summary = $summary,
            params(SkuPath, AdminKeyHeader),
            security(("admin_token" = [])),
            responses(SkuSwitchAnswers)
        )]
        pub(crate) async fn $name(
            State(app): State<Arc<App>>,
            Path(SkuPath { sku }): Path<SkuPath>,
            headers: HeaderMap,
        ) -> Result<Response, ApiError> {
            admit_sku(&app, &headers, &sku)?;
            admin_call(&app, &headers, Command::$command { sku }).await
        }
    };
}

sku_switch_handler!(
    pause_sku,
    Pause,
    path = "/v1/admin/skus/{sku}/pause",
    summary = "Stop new reservations of a SKU (confirm and cancel still work)"
);

sku_switch_handler!(
    resume_sku,
    Resume,
    path = "/v1/admin/skus/{sku}/resume",
    summary = "Resume reservations of a paused SKU"
);

/// The emergency freeze: every SKU paused by one command, decided in log order like any other.
#[utoipa::path(
    post, path = "/v1/admin/freeze", tag = "admin",
    summary = "Emergency freeze: pause every SKU with one command",
    params(AdminKeyHeader),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "how many SKUs were paused", body = FreezeOut),
        AdminErrors,
    )
)]
pub(crate) async fn freeze_all(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app.config.admin_token, &headers)?;
    admin_call(&app, &headers, Command::PauseAll).await
}

/// The admin token first (401), then the SKU name of the path (422).
fn admit_sku(app: &App, headers: &HeaderMap, sku: &str) -> Result<(), ApiError> {
    require_admin(&app.config.admin_token, headers)?;
    validate::sku_name(sku)
}

/// An admin command on the SKU of the path with a JSON body: extracting it runs
/// [`admit_sku`] (401, 422), then reads the body ([`parse_json`]: 413, 415, 400, 422), so an
/// unauthorised caller's body is never read.
pub(crate) struct SkuCommand<T> {
    sku: String,
    headers: HeaderMap,
    body: T,
}

impl<T: DeserializeOwned> FromRequest<Arc<App>> for SkuCommand<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, app: &Arc<App>) -> Result<Self, ApiError> {
        let (mut parts, body) = request.into_parts();
        let Path(SkuPath { sku }) = Path::<SkuPath>::from_request_parts(&mut parts, app)
            .await
            .map_err(|e| ApiError::Invalid(format!("path: {}", e.body_text())))?;
        admit_sku(app, &parts.headers, &sku)?;
        let body = parse_json(&parts.headers, body, &app.config).await?;
        Ok(Self {
            sku,
            headers: parts.headers,
            body,
        })
    }
}

/// The `Idempotency-Key` header of an admin command, if one was sent (422 if it is not 1-128
/// bytes of printable text).
fn admin_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    validate::idempotency_key(None, headers, IDEMPOTENCY_KEY_BYTES_MAX)
}

/// Submits `command`, under its `Idempotency-Key` when the request carries one: then it is
/// applied once per key, and a 504 names the key to retry with.
async fn admin_call(
    app: &App,
    headers: &HeaderMap,
    command: Command,
) -> Result<Response, ApiError> {
    let key = admin_key(headers)?;
    let command = match &key {
        Some(k) => Command::Admin {
            idempotency_key: k.clone(),
            command: Box::new(command),
        },
        None => command,
    };
    if matches!(command.unkeyed(), Command::PauseAll) {
        return freeze_every_partition(app, command, key).await;
    }
    match submit(app, Write::Admin, command, key).await?.0 {
        Outcome::Sku(view) => Ok(Json(SkuOut::from(view)).into_response()),
        other => Err(unexpected(other)),
    }
}

/// The emergency freeze reaches every partition of the requests log: one copy of the command
/// each, sent together; the answer sums what each paused. Any copy that fails fails the
/// answer (the freeze is idempotent: send it again, with the same key if it had one).
async fn freeze_every_partition(
    app: &App,
    command: Command,
    key: Option<String>,
) -> Result<Response, ApiError> {
    let copies = (0..app.bus.partitions)
        .map(|p| submit_to(app, Write::Admin, command.clone(), key.clone(), Some(p)));
    let mut skus_paused = 0;
    for answer in futures_util::future::join_all(copies).await {
        match answer?.0 {
            Outcome::Frozen { skus_paused: n } => skus_paused += n,
            other => return Err(unexpected(other)),
        }
    }
    Ok(Json(FreezeOut { skus_paused }).into_response())
}
