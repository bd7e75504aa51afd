//! Tickets: the log is the queue. A reservation sent with `Prefer: respond-async` is answered
//! 202 as soon as it is appended, with a ticket naming its request id and its offset in the
//! requests log; `GET /v1/tickets/{id}` answers where it stands: queued (how many requests are
//! ahead of it in the log, and when it should be decided at the measured decide rate) or decided
//! (the answer the synchronous call gives). Any ingress answers any ticket: everything it needs
//! is in the ticket and in Postgres (the committed offset, and the outbox of the batch that
//! decided the offset). A synchronous reservation whose outcome is late gets a ticket with its
//! 504. A reservation that joins a SKU's pre-sale queue gets a ticket too (202): the batch that
//! decided its offset queued it, and its decision at the sale's start is its own row in
//! `reservations`; until then it is queued at its place in the SKU's queue.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use wire::{Outcome, RequestId};

use super::answers::ReadErrors;
use super::command::db_unavailable;
use super::state::App;
use super::validate::rfc3339;
use crate::error::{reject_status, ApiError, ErrorBody};

/// A request in the log: its id and its offset. Written `<uuid>.<offset>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub request_id: RequestId,
    pub offset: i64,
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", Uuid::from_u128(self.request_id), self.offset)
    }
}

impl FromStr for Ticket {
    type Err = ();

    fn from_str(s: &str) -> Result<Ticket, ()> {
        let (id, offset) = s.rsplit_once('.').ok_or(())?;
        let request_id = Uuid::try_parse(id).map_err(|_| ())?.as_u128();
        if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
        let offset = offset.parse().map_err(|_| ())?;
        Ok(Ticket { request_id, offset })
    }
}

/// The answer to `Prefer: respond-async`: where the request stands in the log.
#[derive(Serialize, ToSchema)]
pub struct TicketOut {
    /// Follow it with `GET /v1/tickets/{ticket_id}` (also in `Location`).
    #[schema(example = "0193a0c4-7e0a-7c3e-9a51-3f7c2b8d4e10.1234")]
    pub ticket_id: String,
    /// Requests ahead of this one in its log (appended before it, not yet decided).
    pub position: i64,
    /// When it should be decided at the decide rate measured over the last seconds; null while
    /// no rate is known (nothing decided lately).
    pub eta_ms: Option<u64>,
}

/// Where a ticket's request stands. `queued`: `position` and `eta_ms`. `decided`: `status` is
/// the HTTP status the synchronous call answers, with the same body (a reservation for 201, an
/// `error` code otherwise).
#[derive(Serialize, ToSchema)]
pub struct TicketStateOut {
    /// queued or decided
    #[schema(example = "decided")]
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<i64>,
    /// With `queued` only (null while no decide rate is known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<Option<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<u32>,
    /// The reservation's status now (held, confirmed, cancelled, expired), for a 201.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation_status: Option<Cow<'static, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    /// The refusal's stable code, for a status other than 201.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
}

impl TicketStateOut {
    fn queued(position: i64, eta_ms: Option<u64>) -> TicketStateOut {
        TicketStateOut {
            state: "queued",
            position: Some(position),
            eta_ms: Some(eta_ms),
            status: None,
            reservation_id: None,
            sku: None,
            user_id: None,
            quantity: None,
            reservation_status: None,
            expires_at: None,
            error: None,
        }
    }

    fn decided(status: StatusCode) -> TicketStateOut {
        TicketStateOut {
            state: "decided",
            position: None,
            eta_ms: None,
            status: Some(status.as_u16()),
            ..TicketStateOut::queued(0, None)
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TicketPath {
    /// The ticket id a 202 (or a 504) gave.
    #[param(
        example = "0193a0c4-7e0a-7c3e-9a51-3f7c2b8d4e10.1234",
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\\.[0-9]{1,18}$"
    )]
    pub id: String,
}

/// The ETA of a request in a pre-sale queue: the time until the sale starts, then `position`
/// requests ahead at `per_s` decisions a second (none known: the start alone).
pub fn queued_eta_ms(starts_at_ms: i64, position: i64, per_s: f64) -> u64 {
    let until_start = (starts_at_ms - wire::now_ms()).max(0) as u64;
    until_start + eta_ms(position, per_s).unwrap_or(0)
}

/// How long until `position` requests ahead are decided at `per_s` decisions a second.
pub fn eta_ms(position: i64, per_s: f64) -> Option<u64> {
    (per_s > 0.0).then(|| ((position as f64 + 1.0) / per_s * 1000.0).ceil() as u64)
}

#[utoipa::path(
    get, path = "/v1/tickets/{id}", tag = "reservations",
    summary = "Where a reservation sent with `Prefer: respond-async` stands: queued or decided",
    params(TicketPath),
    responses(
        (status = 200, description = "queued (position, eta_ms) or decided (status and the synchronous answer's body)", body = TicketStateOut),
        (status = 404, description = "unknown_ticket", body = ErrorBody),
        ReadErrors,
    )
)]
pub(crate) async fn get_ticket(
    State(app): State<Arc<App>>,
    Path(TicketPath { id }): Path<TicketPath>,
) -> Result<Response, ApiError> {
    let ticket: Ticket = id
        .parse()
        .map_err(|_| ApiError::NotFound("unknown_ticket"))?;
    let partition = wire::partition::of_id(ticket.request_id, app.bus.partitions)
        .ok_or(ApiError::NotFound("unknown_ticket"))?;
    let pool = &app.pools[partition as usize];
    let (outbox, committed) = persistence::reads::decided_at_offset(pool, ticket.offset)
        .await
        .map_err(db_unavailable)?;
    let state = match outbox {
        Some(bytes) => {
            let outbox: wire::Outbox = wire::decode(&bytes).map_err(|e| {
                tracing::error!(error = %e, "undecodable outbox");
                ApiError::Unavailable("a stored outbox does not decode".into())
            })?;
            // Not among the batch's commands: a ticket of an earlier log generation, or made up.
            let outcome = outbox
                .outcome_of(ticket.request_id)
                .ok_or(ApiError::NotFound("unknown_ticket"))?;
            decided(&app, outcome).await?
        }
        None if ticket.offset >= committed => {
            let position = ticket.offset - committed;
            let rate = app.admission.lag(partition).decide_rate();
            TicketStateOut::queued(position, eta_ms(position, rate))
        }
        None => return Err(ApiError::NotFound("unknown_ticket")),
    };
    Ok(Json(state).into_response())
}

/// The synchronous call's answer to `outcome`, as a ticket's state.
async fn decided(app: &App, outcome: Outcome) -> Result<TicketStateOut, ApiError> {
    match outcome {
        Outcome::Held { reservation_id, .. } => {
            let id = Uuid::from_u128(reservation_id);
            let pool = app
                .pool_of_id(reservation_id)
                .ok_or(ApiError::NotFound("unknown_ticket"))?;
            let r = persistence::reads::reservation(pool, id)
                .await
                .map_err(db_unavailable)?
                .ok_or(ApiError::Unavailable(
                    "the granted reservation is not readable yet; try again".into(),
                ))?;
            Ok(granted(r))
        }
        Outcome::Rejected(reason) => Ok(refused(reason)),
        // Queued at the time: its decision, if its sale has started, is its own row.
        Outcome::Queued {
            reservation_id,
            position,
            starts_at_ms,
        } => {
            let id = Uuid::from_u128(reservation_id);
            let pool = app
                .pool_of_id(reservation_id)
                .ok_or(ApiError::NotFound("unknown_ticket"))?;
            match persistence::reads::decision(pool, id)
                .await
                .map_err(db_unavailable)?
            {
                None => {
                    let position = i64::from(position);
                    let partition =
                        wire::partition::of_id(reservation_id, app.bus.partitions).unwrap_or(0);
                    let rate = app.admission.lag(partition).decide_rate();
                    let eta = queued_eta_ms(starts_at_ms, position, rate);
                    Ok(TicketStateOut::queued(position, Some(eta)))
                }
                Some(Ok(r)) => Ok(granted(r)),
                Some(Err(code)) => {
                    Ok(wire::Reject::from_code(&code)
                        .map(refused)
                        .unwrap_or_else(|| {
                            tracing::error!(code, "unknown reject reason stored");
                            TicketStateOut::decided(StatusCode::CONFLICT)
                        }))
                }
            }
        }
        // Tickets are given to reservations only.
        _ => Err(ApiError::NotFound("unknown_ticket")),
    }
}

/// A ticket decided with a hold: the reservation as it is now.
fn granted(r: persistence::reads::ReservationRecord) -> TicketStateOut {
    TicketStateOut {
        reservation_id: Some(r.reservation_id),
        sku: Some(r.sku),
        user_id: Some(r.user_id),
        quantity: Some(r.quantity),
        reservation_status: Some(Cow::Owned(r.status)),
        expires_at: Some(rfc3339(r.expires_at_ms)),
        ..TicketStateOut::decided(StatusCode::CREATED)
    }
}

/// A ticket decided with a refusal.
fn refused(reason: wire::Reject) -> TicketStateOut {
    TicketStateOut {
        error: Some(reason.code()),
        ..TicketStateOut::decided(reject_status(reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_reads_back_as_written_and_nothing_else_is_one() {
        let t = Ticket {
            request_id: 0x0193_a0c4_7e0a_7c3e_9a51_3f7c_2b8d_4e10,
            offset: 1234,
        };
        assert_eq!(t.to_string(), "0193a0c4-7e0a-7c3e-9a51-3f7c2b8d4e10.1234");
        assert_eq!(t.to_string().parse::<Ticket>(), Ok(t));
        for bad in [
            "",
            "1234",
            "0193a0c4-7e0a-7c3e-9a51-3f7c2b8d4e10",
            "0193a0c4-7e0a-7c3e-9a51-3f7c2b8d4e10.",
            "0193a0c4-7e0a-7c3e-9a51-3f7c2b8d4e10.-1",
            "0193a0c4-7e0a-7c3e-9a51-3f7c2b8d4e10.+1",
            "0193a0c4-7e0a-7c3e-9a51-3f7c2b8d4e10.99999999999999999999",
            "not-a-uuid.12",
        ] {
            assert!(bad.parse::<Ticket>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_eta_follows_the_position_at_the_measured_rate() {
        assert_eq!(eta_ms(0, 1_000.0), Some(1));
        assert_eq!(eta_ms(999, 1_000.0), Some(1_000));
        assert_eq!(eta_ms(10, 0.0), None, "no rate known");
    }
}
