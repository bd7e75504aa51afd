//! Every error the HTTP API can answer, each with its status and stable `error` code. Nothing
//! here ever becomes a 500 for bad input: a 5xx means the system, not the client, failed.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use wire::Reject;

#[derive(Debug)]
pub enum ApiError {
    /// 400: the body is not JSON at all.
    MalformedBody(String),
    /// 422: JSON, but a field is missing, of the wrong type or out of range.
    Invalid(String),
    /// 413.
    PayloadTooLarge {
        limit: usize,
    },
    /// 415.
    UnsupportedMediaType,
    /// 401: admin route without the right bearer token.
    Unauthorized,
    /// 403: the token's subject is not the body's user (JWT mode).
    Forbidden(String),
    NotFound(&'static str),
    MethodNotAllowed,
    /// A decision that refused the command.
    Rejected(Reject),
    /// 429.
    RateLimited {
        retry_after_s: u64,
    },
    /// 503: refused at once because the system is saturated; nothing was appended.
    Overloaded {
        retry_after_s: u64,
        detail: String,
    },
    /// 504: appended or maybe appended, outcome not known in time; retry with the same key.
    OutcomeUnknown {
        idempotency_key: Option<String>,
        detail: String,
    },
    /// 503: a dependency (Postgres for reads) failed.
    Unavailable(String),
}

/// The HTTP status of each refusal: conflicts with the sale's state are 409, unknown things 404,
/// a request that can never succeed as written 422.
pub fn reject_status(r: Reject) -> StatusCode {
    match r {
        Reject::SoldOut
        | Reject::LimitExceeded
        | Reject::SalePaused
        | Reject::SaleNotStarted
        | Reject::SaleEnded
        | Reject::ReservationExpired
        | Reject::ReservationCancelled
        | Reject::ReservationConfirmed
        | Reject::StockBelowCommitted
        | Reject::StockOverflow => StatusCode::CONFLICT,
        Reject::UnknownSku | Reject::UnknownReservation => StatusCode::NOT_FOUND,
        Reject::IdempotencyKeyReused | Reject::InvalidCommand => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body, retry_after) = match self {
            ApiError::MalformedBody(detail) => (
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_request", "detail": detail}),
                None,
            ),
            ApiError::Invalid(detail) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"error": "invalid_request", "detail": detail}),
                None,
            ),
            ApiError::PayloadTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "payload_too_large", "detail": format!("bodies are limited to {limit} bytes")}),
                None,
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"error": "unsupported_media_type", "detail": "send Content-Type: application/json"}),
                None,
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                json!({"error": "unauthorized", "detail": "missing or wrong bearer token"}),
                None,
            ),
            ApiError::Forbidden(detail) => (
                StatusCode::FORBIDDEN,
                json!({"error": "forbidden", "detail": detail}),
                None,
            ),
            ApiError::NotFound(code) => (StatusCode::NOT_FOUND, json!({"error": code}), None),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method_not_allowed"}),
                None,
            ),
            ApiError::Rejected(r) => (reject_status(r), json!({"error": r.code()}), None),
            ApiError::RateLimited { retry_after_s } => (
                StatusCode::TOO_MANY_REQUESTS,
                json!({"error": "rate_limited", "detail": "too many requests for this user; slow down"}),
                Some(retry_after_s),
            ),
            ApiError::Overloaded {
                retry_after_s,
                detail,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "overloaded", "detail": detail}),
                Some(retry_after_s),
            ),
            ApiError::OutcomeUnknown {
                idempotency_key,
                detail,
            } => (
                StatusCode::GATEWAY_TIMEOUT,
                json!({
                    "error": "outcome_unknown",
                    "detail": format!("{detail}; the outcome is unknown: retrying with the same idempotency key is safe and returns the original outcome"),
                    "idempotency_key": idempotency_key,
                }),
                None,
            ),
            ApiError::Unavailable(detail) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "unavailable", "detail": detail}),
                Some(1),
            ),
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(s) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}
