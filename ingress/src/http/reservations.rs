//! Buyers' reservations: hold (`POST /v1/reservations`), read, confirm, cancel.

use std::borrow::Cow;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use uuid::Uuid;
use wire::limits::{IDEMPOTENCY_KEY_BYTES_MAX, QUANTITY_MAX, USER_ID_BYTES_MAX};
use wire::{Command, Outcome};

use super::answers::{BodyErrors, BuyerWriteErrors, OwnerErrors, SettleAnswers};
use super::command::{db_unavailable, submit, submit_async, unexpected};
use super::dto::{ReservationOut, ReservationPath, ReserveBody};
use super::state::App;
use super::tickets::{eta_ms, queued_eta_ms, Ticket, TicketOut};
use super::validate::{self, parse_json, rfc3339};
use crate::admission::Write;
use crate::error::{ApiError, ErrorBody};

/// Whether the `Prefer` headers ask for `respond-async` (RFC 7240: comma-separated
/// preferences, case-insensitive names, parameters after `;`).
fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            p.split(';')
                .next()
                .is_some_and(|name| name.trim().eq_ignore_ascii_case("respond-async"))
        })
}

/// The buyer named by the bearer token in JWT mode; `None` when JWT verification is off.
fn token_subject(app: &App, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    app.jwt.as_ref().map(|jwt| jwt.subject(headers)).transpose()
}

#[utoipa::path(
    post, path = "/v1/reservations", tag = "reservations",
    summary = "Reserve units of a SKU (a hold that expires unless confirmed)",
    description = "With `Prefer: respond-async` the answer is 202 with a ticket as soon as the \
        request is in the log (its place in the queue and an ETA); `GET /v1/tickets/{id}` then \
        tells where it stands and, once decided, the answer this call would have given. A 504 \
        whose request reached the log carries a `ticket_id` too. (The `Prefer` header is \
        described here rather than declared as a parameter: a generated client has no use for \
        a header whose only value changes the answer's shape.) A SKU with a pre-sale queue \
        answers 202 with a ticket between the queue's opening and the sale's start: the request \
        is queued in log order and decided at the start, before anything that arrives later.",
    request_body(content = ReserveBody, content_type = "application/json"),
    security((), ("buyer_jwt" = [])),
    responses(
        (status = 201, description = "held", body = ReservationOut, links(
            ("GetReservation" = (operation_id = "get_reservation",
                parameters(("id" = "$response.body#/reservation_id")))),
            ("ConfirmReservation" = (operation_id = "confirm_reservation",
                parameters(("id" = "$response.body#/reservation_id")))),
            ("CancelReservation" = (operation_id = "cancel_reservation",
                parameters(("id" = "$response.body#/reservation_id")))),
        )),
        (status = 202, description = "`Prefer: respond-async`: in the log, not decided yet; or, \
            with or without it, in the SKU's pre-sale queue (decided at the sale's start). Follow \
            `Location` (`GET /v1/tickets/{ticket_id}`)", body = TicketOut,
            headers(("Location" = String, description = "/v1/tickets/{ticket_id}"),
                    ("Preference-Applied" = String, description = "respond-async, when asked for"))),
        BodyErrors,
        BuyerWriteErrors,
        (status = 401, description = "unauthorized: JWT mode, token missing, forged or expired", body = ErrorBody),
        (status = 403, description = "forbidden: body user_id is not the token's subject", body = ErrorBody),
        (status = 404, description = "unknown_sku", body = ErrorBody),
        (status = 409, description = "sold_out, limit_exceeded, sale_paused, sale_not_started, sale_ended or queue_full (the pre-sale queue holds its maximum)", body = ErrorBody),
        (status = 422, description = "invalid_request (with detail) or idempotency_key_reused", body = ErrorBody),
        (status = 429, description = "rate_limited, with Retry-After", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds until the user's next token"))),
    )
)]
pub(crate) async fn create_reservation(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Identity first: without a valid token nothing else is looked at.
    let subject = token_subject(&app, &headers)?;
    let b: ReserveBody = parse_json(&headers, body, &app.config).await?;
    validate::sku_name(&b.sku)?;
    let user_id = match (subject, b.user_id) {
        (Some(sub), Some(claimed)) if claimed != sub => {
            return Err(ApiError::Forbidden(
                "user_id is not the subject of the bearer token".into(),
            ))
        }
        (Some(sub), _) => sub,
        (None, Some(user_id)) => {
            validate::text("user_id", &user_id, USER_ID_BYTES_MAX)?;
            user_id
        }
        (None, None) => return Err(ApiError::Invalid("missing field `user_id`".into())),
    };
    validate::integer("quantity", b.quantity, 1, i64::from(QUANTITY_MAX))?;
    // Without a key a retry cannot be recognised; the generated one is returned on 504 so the
    // client can still retry safely.
    let key = validate::idempotency_key(b.idempotency_key, &headers, IDEMPOTENCY_KEY_BYTES_MAX)?
        .unwrap_or_else(|| Uuid::now_v7().to_string());
    let (sku, quantity) = (b.sku, b.quantity as u32);
    let command = Command::Reserve {
        sku: sku.clone(),
        user_id: user_id.clone(),
        quantity,
        idempotency_key: key.clone(),
    };
    let write = Write::Reserve { user_id: &user_id };
    if prefers_async(&headers) {
        let ticket = submit_async(&app, write, command, Some(key)).await?;
        let lag = app.admission.lag(app.partition_of_sku(&sku));
        let committed = lag
            .committed_offset
            .load(std::sync::atomic::Ordering::Relaxed);
        let position = (ticket.offset - committed).max(0);
        let eta = eta_ms(position, lag.decide_rate());
        return Ok(accepted(ticket, position, eta, true));
    }
    match submit(&app, write, command, Some(key)).await? {
        (
            Outcome::Held {
                reservation_id,
                expires_at_ms,
            },
            _,
        ) => Ok((
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
        // In the SKU's pre-sale queue: decided at the sale's start; the ticket follows it.
        (
            Outcome::Queued {
                position,
                starts_at_ms,
                ..
            },
            ticket,
        ) => {
            let position = i64::from(position);
            let rate = app.admission.lag(app.partition_of_sku(&sku)).decide_rate();
            let eta = queued_eta_ms(starts_at_ms, position, rate);
            Ok(accepted(ticket, position, Some(eta), false))
        }
        (other, _) => Err(unexpected(other)),
    }
}

/// 202 with `ticket`: where the request stands and how to follow it. `preferred`: the client
/// asked for it (`Prefer: respond-async`), rather than the request joining a pre-sale queue.
fn accepted(ticket: Ticket, position: i64, eta_ms: Option<u64>, preferred: bool) -> Response {
    let body = TicketOut {
        ticket_id: ticket.to_string(),
        position,
        eta_ms,
    };
    let mut response = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/tickets/{ticket}"))],
        Json(body),
    )
        .into_response();
    if preferred {
        response.headers_mut().insert(
            header::HeaderName::from_static("preference-applied"),
            header::HeaderValue::from_static("respond-async"),
        );
    }
    response
}

#[utoipa::path(
    get, path = "/v1/reservations/{id}", tag = "reservations",
    summary = "A reservation as committed in Postgres",
    params(ReservationPath),
    security((), ("buyer_jwt" = [])),
    responses(
        (status = 200, description = "the reservation", body = ReservationOut),
        OwnerErrors,
    )
)]
pub(crate) async fn get_reservation(
    State(app): State<Arc<App>>,
    Path(ReservationPath { id }): Path<ReservationPath>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let subject = token_subject(&app, &headers)?;
    let id = validate::reservation_id(&id)?;
    let record = read_owned(&app, subject.as_deref(), id).await?;
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

/// A settle handler: `POST $path` applies `Command::$command` to the reservation of the path
/// (see [`settle`]); `$conflicts` are its own 409 answers.
#[rustfmt::skip] // rustfmt re-indents the attribute below on every run
macro_rules! settle_handler {
    ($name:ident, $command:ident, path = $path:tt, summary = $summary:tt, conflicts = $conflicts:tt) => {
        #[utoipa::path(
            post, path = $path, tag = "reservations",
            summary = $summary,
            params(ReservationPath),
            security((), ("buyer_jwt" = [])),
            responses(
                SettleAnswers,
                (status = 409, description = $conflicts, body = ErrorBody),
            )
        )]
        pub(crate) async fn $name(
            State(app): State<Arc<App>>,
            Path(ReservationPath { id }): Path<ReservationPath>,
            headers: HeaderMap,
        ) -> Result<Response, ApiError> {
            settle(&app, &headers, &id, |reservation_id| Command::$command {
                reservation_id,
            })
            .await
        }
    };
}

settle_handler!(
    confirm_reservation,
    Confirm,
    path = "/v1/reservations/{id}/confirm",
    summary = "Confirm a hold (checkout done): its units move from held to sold; repeatable",
    conflicts = "reservation_expired or reservation_cancelled"
);

settle_handler!(
    cancel_reservation,
    Cancel,
    path = "/v1/reservations/{id}/cancel",
    summary = "Release a hold; repeatable",
    conflicts = "reservation_confirmed or reservation_expired"
);

/// The reservation `id` from Postgres, if `subject` (JWT mode) owns it.
async fn read_owned(
    app: &App,
    subject: Option<&str>,
    id: Uuid,
) -> Result<persistence::reads::ReservationRecord, ApiError> {
    let pool = app
        .pool_of_id(id.as_u128())
        .ok_or(ApiError::NotFound("unknown_reservation"))?;
    let record = persistence::reads::reservation(pool, id)
        .await
        .map_err(db_unavailable)?
        .ok_or(ApiError::NotFound("unknown_reservation"))?;
    match subject {
        Some(s) if s != record.user_id => Err(ApiError::Forbidden(
            "this reservation belongs to another user".into(),
        )),
        _ => Ok(record),
    }
}

/// Confirm or cancel. JWT mode: the caller must own the reservation (read from Postgres, where
/// it is visible from the moment its owner was answered). Without JWT verification, the id is
/// the capability.
async fn settle(
    app: &App,
    headers: &HeaderMap,
    id: &str,
    command: impl FnOnce(u128) -> Command,
) -> Result<Response, ApiError> {
    let id = validate::reservation_id(id)?;
    if let Some(subject) = token_subject(app, headers)? {
        read_owned(app, Some(&subject), id).await?;
    }
    match submit(app, Write::Settle, command(id.as_u128()), None)
        .await?
        .0
    {
        Outcome::Reservation(view) => Ok(Json(ReservationOut::from(view)).into_response()),
        other => Err(unexpected(other)),
    }
}
