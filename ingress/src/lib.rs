//! The ingress: stateless HTTP nodes in front of the sequencer.
//!
//! [`http`] validates and routes; [`bus`] appends commands to the requests topic and awaits their
//! outcomes; [`error`] is every answer that is not a success, with its stable code.

pub mod bus;
pub mod error;
pub mod http;
