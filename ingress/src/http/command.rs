//! A write's round trip: admission, then the command through the single writer, then its
//! outcome (refusals become errors).

use uuid::Uuid;
use wire::{Command, Outcome, Request as WireRequest};

use super::state::{current_request_id, App};
use super::tickets::Ticket;
use crate::admission::Write;
use crate::bus::SendError;
use crate::error::ApiError;

/// Admits `write` (see [`crate::admission::Admission::admit`]), sends `command` under the current
/// request's id and returns its outcome, with the ticket of the request (its id and log offset):
/// what a reservation that joined a pre-sale queue is answered with. `idempotency_key` is
/// returned in a 504 body.
pub(super) async fn submit(
    app: &App,
    write: Write<'_>,
    command: Command,
    idempotency_key: Option<String>,
) -> Result<(Outcome, Ticket), ApiError> {
    let request = admitted(app, write, command)?;
    let request_id = request.request_id;
    match app.bus.call(&request).await {
        Ok((Outcome::Rejected(reason), _)) => Err(ApiError::Rejected(reason)),
        Ok((outcome, offset)) => Ok((outcome, Ticket { request_id, offset })),
        Err(e) => Err(send_error(app, request_id, e, idempotency_key)),
    }
}

/// [`submit`] for `Prefer: respond-async`: admits and appends `command`, and returns the ticket
/// that follows it (its request id and log offset) without waiting for its outcome.
pub(super) async fn submit_async(
    app: &App,
    write: Write<'_>,
    command: Command,
    idempotency_key: Option<String>,
) -> Result<Ticket, ApiError> {
    let request = admitted(app, write, command)?;
    let request_id = request.request_id;
    match app.bus.append_only(&request).await {
        Ok(offset) => Ok(Ticket { request_id, offset }),
        Err(e) => Err(send_error(app, request_id, e, idempotency_key)),
    }
}

/// `command` under the current request's id, once admission lets `write` through.
fn admitted(app: &App, write: Write<'_>, command: Command) -> Result<WireRequest, ApiError> {
    app.admission.admit(write, app.bus.in_flight())?;
    Ok(WireRequest {
        request_id: current_request_id(),
        ingress_id: app.bus.ingress_id,
        command,
    })
}

fn send_error(
    app: &App,
    request_id: u128,
    e: SendError,
    idempotency_key: Option<String>,
) -> ApiError {
    let (detail, ticket_id) = match e {
        SendError::Overloaded => return app.admission.queue_full(),
        SendError::Unknown(detail) => (detail, None),
        SendError::Late { offset, detail } => {
            (detail, Some(Ticket { request_id, offset }.to_string()))
        }
    };
    tracing::warn!(request_id = %Uuid::from_u128(request_id), %detail, "outcome unknown (504)");
    ApiError::OutcomeUnknown {
        idempotency_key,
        detail,
        ticket_id,
    }
}

pub(super) fn unexpected(outcome: Outcome) -> ApiError {
    // The sequencer answered with an outcome of another command's kind: a bug, reported loudly.
    tracing::error!(?outcome, "outcome does not match the command");
    ApiError::Unavailable("internal error: mismatched outcome".into())
}

pub(super) fn db_unavailable(e: sqlx::Error) -> ApiError {
    tracing::warn!(error = %e, "read from Postgres failed");
    ApiError::Unavailable("the database is unavailable; try again".into())
}
