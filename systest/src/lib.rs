//! System tests: the real binaries against a real Postgres and a real Kafka broker. The system a
//! test runs is started by the `harness` crate (re-exported here); [`load`] drives it under load
//! and checks every answer against Postgres.

pub mod load;
pub mod tickets;

pub use harness::{bin_dir, free_port, kafka, rand32, Options, Sequencer, Stack, ADMIN_TOKEN};

/// `sequencer create-topics` on `brokers` (see [`harness::topics::create_topics`]).
pub fn create_topics(brokers: &str, topics: &[&str]) -> anyhow::Result<()> {
    harness::topics::create_topics(&bin_dir(), brokers, topics)
}

/// `sequencer delete-topics` on `brokers` (see [`harness::topics::delete_topics`]).
pub fn delete_topics(brokers: &str, topics: &[&str]) -> anyhow::Result<()> {
    harness::topics::delete_topics(&bin_dir(), brokers, topics)
}

/// Asserts that an answer with `status` and `body` is the error `expected` (its status and
/// `error` code), showing the body when it is not.
#[track_caller]
pub fn assert_error(status: u16, body: &serde_json::Value, expected: (u16, &str)) {
    assert_eq!(
        (status, body["error"].as_str()),
        (expected.0, Some(expected.1)),
        "{body}"
    );
}

/// The one `int8` that `sql` selects from `stack`'s database; panics, naming the query, when
/// it fails (every caller is a test asserting on the figure).
pub async fn scalar(stack: &Stack, sql: &str) -> i64 {
    match stack.query_i64(sql).await {
        Ok(n) => n,
        Err(e) => panic!("{sql}: {e:#}"),
    }
}

/// A stack whose ingress has these `(name, value)` pairs added to its environment.
pub async fn stack_with_ingress_env(name: &str, pairs: &[(&str, &str)]) -> Stack {
    let options = Options::default().with_ingress_env(pairs);
    match Stack::start(name, options).await {
        Ok(stack) => stack,
        Err(e) => panic!("starting {name}: {e:#}"),
    }
}
