//! The ingress: stateless HTTP nodes in front of the sequencer.
//!
//! [`http`] validates and routes; [`bus`] appends commands to the requests topic and awaits their
//! outcomes; [`error`] is every answer that is not a success, with its stable code;
//! [`admission`] refuses what cannot be finished (in-flight and lag bounds, per-user rate limit);
//! [`auth`] is the admin token and the optional buyer JWT; [`metrics`] is `/metrics`;
//! [`http::openapi`] is `/openapi.json`; [`server`] is the accept loop with the connection and header
//! limits; [`stock`] keeps the newest committed counters per SKU for the live stock streams;
//! [`console`] samples, once a second, what the ops console (`GET /ops`) shows.

pub mod admission;
pub mod auth;
pub mod bus;
pub mod console;
pub mod error;
pub mod http;
pub mod metrics;
pub mod pending;
pub mod producer;
pub mod server;
pub mod stock;
