//! A write's round trip: admission, then the command through the single writer, then its
//! outcome (refusals become errors).

use uuid::Uuid;
use wire::{Command, Outcome, Request as WireRequest};

use super::state::{current_request_id, set_current_request_id, App};
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
    submit_to(app, write, command, idempotency_key, None).await
}

/// [`submit`] to partition `partition` of the requests log when given, else to the one the
/// command names (`wire::partition::of_command`). The emergency freeze goes to each partition
/// with this.
pub(super) async fn submit_to(
    app: &App,
    write: Write<'_>,
    command: Command,
    idempotency_key: Option<String>,
    partition: Option<u32>,
) -> Result<(Outcome, Ticket), ApiError> {
    let request = admitted(app, write, command, partition)?;
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
    let request = admitted(app, write, command, None)?;
    let request_id = request.request_id;
    match app.bus.append_only(&request).await {
        Ok(offset) => Ok(Ticket { request_id, offset }),
        Err(e) => Err(send_error(app, request_id, e, idempotency_key)),
    }
}

/// `command` under the current request's id (tagged with its partition when the log has
/// several, see `wire::partition::tag`), once admission lets `write` through to that partition.
/// A confirm or cancel whose id names no partition is a reservation that does not exist (404).
fn admitted(
    app: &App,
    write: Write<'_>,
    command: Command,
    partition: Option<u32>,
) -> Result<WireRequest, ApiError> {
    let id = current_request_id();
    let partitions = app.bus.partitions;
    let request_id = match partition {
        // One copy of several (the freeze): the header keeps the request's own id.
        Some(p) => wire::partition::tag(id, p, partitions),
        None => {
            let p = wire::partition::of_command(&command, id, partitions)
                .ok_or(ApiError::NotFound("unknown_reservation"))?;
            let tagged = wire::partition::tag(id, p, partitions);
            set_current_request_id(tagged);
            tagged
        }
    };
    let partition = wire::partition::of_id(request_id, partitions).unwrap_or(0);
    app.admission.admit(write, app.bus.in_flight(), partition)?;
    Ok(WireRequest {
        request_id,
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
