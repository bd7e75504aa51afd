//! The error answers the operations share, declared once each for the OpenAPI document (every
//! one is JSON [`ErrorBody`]; 429 and 503 carry `Retry-After`). A handler's `responses(...)`
//! lists its successes and its own errors, then the sets that apply to it.

use std::collections::BTreeMap;

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::IntoResponses;

#[allow(unused_imports)] // named in the documentation above
use crate::error::ErrorBody;

type Answers = BTreeMap<String, RefOr<Response>>;

/// A 200 answer with the JSON body of the component schema `schema`.
fn ok(description: &str, schema: &str) -> Answers {
    let answer = ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name(schema)))
            .build(),
    );
    Answers::from([("200".to_owned(), answer.build().into())])
}

/// `(status, description)` pairs as error answers with the [`ErrorBody`] schema.
fn errors(list: &[(u16, &str)]) -> Answers {
    list.iter()
        .map(|&(status, description)| {
            let mut answer = ResponseBuilder::new().description(description).content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            );
            if status == 429 || status == 503 {
                answer = answer.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .minimum(Some(1)),
                        )
                        .description(Some("seconds to wait before trying again"))
                        .build(),
                );
            }
            (status.to_string(), answer.build().into())
        })
        .collect()
}

/// Declares an answer set: a unit struct whose `IntoResponses` are the answers of its parts,
/// merged in order (a later part's answer for a status replaces an earlier one's).
macro_rules! answer_set {
    ($(#[$doc:meta])* $name:ident => [$($part:expr),+ $(,)?]) => {
        $(#[$doc])*
        pub struct $name;

        impl IntoResponses for $name {
            fn responses() -> Answers {
                [$($part),+].into_iter().flatten().collect()
            }
        }
    };
}

answer_set! {
    /// A JSON body was read: it can be too slow, too large, not JSON, or out of the limits.
    BodyErrors => [errors(&[
        (400, "invalid_request: the body is not JSON"),
        (
            408,
            "request_timeout: the body did not arrive in time; the connection is closed",
        ),
        (413, "payload_too_large"),
        (
            415,
            "unsupported_media_type: send Content-Type: application/json",
        ),
        (422, "invalid_request, with detail"),
    ])]
}

answer_set! {
    /// A buyer's write: admission may refuse it, and its outcome may not arrive in time.
    BuyerWriteErrors => [errors(&[
        (
            503,
            "overloaded or no_sequencer, with Retry-After: refused by admission, nothing was \
             appended",
        ),
        (
            504,
            "outcome_unknown: retrying (with the same idempotency key) is safe",
        ),
    ])]
}

answer_set! {
    /// An admin command: the admin token, no admission bound but a full producer queue.
    AdminErrors => [errors(&[
        (401, "unauthorized: missing or wrong admin token"),
        (
            422,
            "invalid_request (with detail: a bad SKU name, body field or Idempotency-Key), \
             or idempotency_key_reused: the Idempotency-Key was used for another command",
        ),
        (
            503,
            "overloaded, with Retry-After: the request queue is full, nothing was appended",
        ),
        (504, "outcome_unknown: retrying is safe"),
    ])]
}

answer_set! {
    /// A reservation named by its id, in JWT mode only its owner's.
    OwnerErrors => [errors(&[
        (
            401,
            "unauthorized (JWT mode): token missing, forged or expired",
        ),
        (403, "forbidden (JWT mode): another user's reservation"),
        (404, "unknown_reservation"),
        (
            503,
            "unavailable: Postgres did not answer, with Retry-After",
        ),
    ])]
}

answer_set! {
    /// A read from Postgres.
    ReadErrors => [errors(&[(
        503,
        "unavailable: Postgres did not answer, with Retry-After",
    )])]
}

answer_set! {
    /// Confirm or cancel: the reservation afterwards, or why not (409s are the operation's own).
    SettleAnswers => [
        ok("the reservation afterwards", "ReservationOut"),
        OwnerErrors::responses(),
        BuyerWriteErrors::responses(),
    ]
}

answer_set! {
    /// Pause or resume a SKU: the SKU afterwards, or why not.
    SkuSwitchAnswers => [
        ok("the SKU", "SkuOut"),
        AdminErrors::responses(),
        errors(&[(404, "unknown_sku")]),
    ]
}

answer_set! {
    /// Create, update or restock a SKU from a JSON body: the SKU afterwards, or why not.
    SkuBodyAnswers => [
        ok("the SKU", "SkuOut"),
        BodyErrors::responses(),
        AdminErrors::responses(),
    ]
}
