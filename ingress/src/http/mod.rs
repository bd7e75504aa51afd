//! The v1 HTTP contract (the README's API table). Writes become commands appended to the requests
//! topic and wait for their outcome; reads come straight from Postgres, the system of record.
//!
//! One file per resource, in the order a request meets them:
//! - [`router`]: the one list of routes (the router, the per-route metrics and the OpenAPI test
//!   are all built from it) and the layer that counts, times and names every request;
//! - [`state`]: what the handlers share ([`App`]);
//! - `validate`: reading the body and checking every field against `wire::limits`;
//! - `reservations`, `skus`, `admin`, `ops`: the handlers, each with its OpenAPI annotation;
//! - `console`: the ops console's page (`GET /ops`) and its summary (`GET /v1/ops/summary`);
//! - `command`: a write's round trip (admission, then the single writer, then the outcome);
//! - `dto`: bodies and answers; `limits`: the limits as the document declares them; `answers`:
//!   the error answers shared by several operations;
//! - [`openapi`]: the document served at `/openapi.json`.

mod admin;
mod answers;
mod command;
mod console;
mod dto;
mod limits;
pub mod openapi;
mod ops;
mod reservations;
pub mod router;
mod skus;
pub mod state;
mod tickets;
mod validate;

pub use router::{route_table, router, routes, Route};
pub use state::{App, AppConfig};
pub(crate) use validate::rfc3339;
