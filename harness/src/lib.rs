//! Runs the real system for a test or a benchmark. Nothing is faked: a fresh database on the real
//! Postgres, fresh topics on the real broker, the real `sequencer` and `ingress` binaries as child
//! processes on loopback ports, and the sequencer's own audit at the end.
//!
//! - [`db`]: create and drop a database of one's own;
//! - [`topics`]: create, fill and delete topics; the environment every process of one system
//!   shares ([`topics::Topology`]);
//! - [`process`]: a child process with its log that is stopped when dropped;
//! - [`audit`]: `sequencer audit --json`;
//! - [`stack`]: a whole system for a system test ([`Stack`]);
//! - [`kafka`]: a private Apache Kafka broker a test may kill and restart;
//! - [`jwt`]: buyer tokens for the ingress's JWT mode.
//!
//! The environment: `FLASH_BIN_DIR` (where the built binaries are), `FLASH_PG_ADMIN_URL` (a
//! superuser connection to create databases), `KAFKA_BROKERS` (the shared broker) and, for
//! [`kafka::KafkaBroker`], `FLASH_KAFKA_LIBS`; `scripts/test` sets them all.

use std::net::TcpListener;
use std::path::PathBuf;

pub mod audit;
pub mod db;
pub mod jwt;
pub mod kafka;
pub mod process;
pub mod stack;
pub mod topics;

pub use stack::{Options, Sequencer, Stack, ADMIN_TOKEN};
pub use topics::{create_topics, delete_topics};

/// Where the built `sequencer` and `ingress` binaries are: `FLASH_BIN_DIR`, else target/debug.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("FLASH_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug")))
}

/// A superuser connection to create and drop databases: `FLASH_PG_ADMIN_URL`, else the local
/// Postgres.
pub fn pg_admin_url() -> String {
    std::env::var("FLASH_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The shared broker every test uses unless it brings its own (`Options::brokers`).
pub fn shared_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Where the processes of the system tests write their logs (target/systest-logs).
pub fn log_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/systest-logs"
    ));
    std::fs::create_dir_all(&dir).expect("log dir");
    dir
}

/// Runs `cmd` to its end; fails with its stderr unless it exits 0. `what` names it in errors.
pub(crate) fn run_ok(cmd: &mut std::process::Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("running {what}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// 32 random bits: keeps the names of databases, topics and runs apart.
pub fn rand32() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32
}
