//! A write's round trip: admission, then the command through the single writer, then its
//! outcome (refusals become errors).

use uuid::Uuid;
use wire::{Command, Outcome, Request as WireRequest};

use super::state::{current_request_id, App};
use crate::admission::Write;
use crate::bus::SendError;
use crate::error::ApiError;

/// Admits `write` (see [`crate::admission::Admission::admit`]), sends `command` under the current
/// request's id and returns its outcome. `idempotency_key` is returned in a 504 body.
pub(super) async fn submit(
    app: &App,
    write: Write<'_>,
    command: Command,
    idempotency_key: Option<String>,
) -> Result<Outcome, ApiError> {
    app.admission.admit(write, app.bus.in_flight())?;
    let request_id = current_request_id();
    let request = WireRequest {
        request_id,
        ingress_id: app.bus.ingress_id,
        command,
    };
    match app.bus.call(&request).await {
        Ok(Outcome::Rejected(reason)) => Err(ApiError::Rejected(reason)),
        Ok(outcome) => Ok(outcome),
        Err(SendError::Overloaded) => Err(app.admission.queue_full()),
        Err(SendError::Unknown(detail)) => {
            tracing::warn!(request_id = %Uuid::from_u128(request_id), %detail, "outcome unknown (504)");
            Err(ApiError::OutcomeUnknown {
                idempotency_key,
                detail,
            })
        }
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
