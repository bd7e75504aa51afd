//! Every error the HTTP API can answer, each with its status and stable `error` code. Nothing
//! here ever becomes a 500 for bad input: a 5xx means the system, not the client, failed.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::borrow::Cow;
use utoipa::ToSchema;
use wire::Reject;

#[derive(Debug)]
pub enum ApiError {
    /// 400: the body is not JSON at all.
    MalformedBody(String),
    /// 422: JSON, but a field is missing, of the wrong type or out of range.
    Invalid(String),
    /// 400: a command that must carry an `Idempotency-Key` header (a restock) came without.
    IdempotencyKeyRequired(&'static str),
    /// 413.
    PayloadTooLarge {
        limit: usize,
    },
    /// 415.
    UnsupportedMediaType,
    /// 401: admin route without the right bearer token, or (JWT mode) a buyer route without a
    /// valid token.
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
    /// 503: refused at once because no sequencer has committed anything for STALL_MAX_MS
    /// while requests wait in the log (both paused, deposed, stuck); nothing was appended.
    NoSequencer {
        retry_after_s: u64,
        detail: String,
    },
    /// 408: the body did not arrive within BODY_READ_TIMEOUT_MS; the connection is closed.
    RequestTimeout {
        timeout_ms: u64,
    },
    /// 504: appended or maybe appended, outcome not known in time; retry with the same key.
    OutcomeUnknown {
        idempotency_key: Option<String>,
        detail: String,
        /// When the append was acknowledged: the ticket that follows the request.
        ticket_id: Option<String>,
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
        | Reject::StockOverflow
        | Reject::QueueFull => StatusCode::CONFLICT,
        Reject::UnknownSku | Reject::UnknownReservation => StatusCode::NOT_FOUND,
        Reject::IdempotencyKeyReused | Reject::InvalidCommand => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

/// The body of every error answer. `error` is the stable code; `detail` is for humans.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody<'a> {
    /// Stable code, e.g. sold_out, invalid_request, overloaded, no_sequencer, rate_limited,
    /// unauthorized.
    #[schema(example = "sold_out")]
    pub error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Cow<'a, str>>,
    /// Only with 504 `outcome_unknown`: the key to retry with (null when none was sent, which
    /// cannot happen for reservations: the ingress generates one).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub idempotency_key: Option<Option<String>>,
    /// Only with 504 `outcome_unknown` of a reservation whose append was acknowledged: the
    /// ticket to follow it with (`GET /v1/tickets/{id}`) instead of retrying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket_id: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = |error: &'static str, detail: Option<Cow<'static, str>>| ErrorBody {
            error,
            detail,
            idempotency_key: None,
            ticket_id: None,
        };
        let (status, body, retry_after) = match self {
            ApiError::MalformedBody(detail) => (
                StatusCode::BAD_REQUEST,
                body("invalid_request", Some(detail.into())),
                None,
            ),
            ApiError::Invalid(detail) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                body("invalid_request", Some(detail.into())),
                None,
            ),
            ApiError::IdempotencyKeyRequired(detail) => (
                StatusCode::BAD_REQUEST,
                body("idempotency_key_required", Some(detail.into())),
                None,
            ),
            ApiError::PayloadTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                body(
                    "payload_too_large",
                    Some(format!("bodies are limited to {limit} bytes").into()),
                ),
                None,
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                body(
                    "unsupported_media_type",
                    Some("send Content-Type: application/json".into()),
                ),
                None,
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                body("unauthorized", Some("missing or wrong bearer token".into())),
                None,
            ),
            ApiError::Forbidden(detail) => (
                StatusCode::FORBIDDEN,
                body("forbidden", Some(detail.into())),
                None,
            ),
            ApiError::NotFound(code) => (StatusCode::NOT_FOUND, body(code, None), None),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                body("method_not_allowed", None),
                None,
            ),
            ApiError::Rejected(r) => (reject_status(r), body(r.code(), None), None),
            ApiError::RateLimited { retry_after_s } => (
                StatusCode::TOO_MANY_REQUESTS,
                body(
                    "rate_limited",
                    Some("too many requests for this user; slow down".into()),
                ),
                Some(retry_after_s),
            ),
            ApiError::Overloaded {
                retry_after_s,
                detail,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                body("overloaded", Some(detail.into())),
                Some(retry_after_s),
            ),
            ApiError::NoSequencer {
                retry_after_s,
                detail,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                body("no_sequencer", Some(detail.into())),
                Some(retry_after_s),
            ),
            ApiError::RequestTimeout { timeout_ms } => {
                let detail = format!("the body did not arrive within {timeout_ms} ms");
                let mut r = (
                    StatusCode::REQUEST_TIMEOUT,
                    Json(body("request_timeout", Some(detail.into()))),
                )
                    .into_response();
                // The rest of the body may still come: never read it as the next request.
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
            ApiError::OutcomeUnknown {
                idempotency_key,
                detail,
                ticket_id,
            } => (
                StatusCode::GATEWAY_TIMEOUT,
                ErrorBody {
                    error: "outcome_unknown",
                    detail: Some(format!("{detail}; the outcome is unknown: retrying with the same idempotency key is safe and returns the original outcome").into()),
                    idempotency_key: Some(idempotency_key),
                    ticket_id,
                },
                None,
            ),
            ApiError::Unavailable(detail) => (
                StatusCode::SERVICE_UNAVAILABLE,
                body("unavailable", Some(detail.into())),
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

#[cfg(test)]
mod tests {
    use super::*;

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
                ticket_id: None,
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
                ticket_id: Some("t".into()),
            })
            .await;
            assert_eq!(b["idempotency_key"], "k1");
            assert_eq!(b["ticket_id"], "t");
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
