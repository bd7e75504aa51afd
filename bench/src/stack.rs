//! Starting what is measured: fresh databases, fresh topics, real release processes on loopback
//! ports of our choosing. Every child is stopped when its handle is dropped.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
pub use harness::process::Proc;
use harness::topics::Topology;

use crate::http;

#[derive(Clone, Debug, clap::Args)]
pub struct Infra {
    /// Superuser connection to create and drop the benchmark's databases.
    #[arg(
        long,
        env = "BENCH_PG_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub pg_admin_url: String,
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Where the release `sequencer` and `ingress` binaries are (default: next to this binary).
    #[arg(long, env = "BENCH_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Prefix of every database and topic this run creates (dedicated, never `flash`).
    #[arg(long, env = "BENCH_PREFIX", default_value = "flash_bench")]
    pub prefix: String,
    /// Where child process logs go.
    #[arg(long, env = "BENCH_LOG_DIR", default_value = "bench/results/logs")]
    pub log_dir: PathBuf,
    /// Keep the databases after the run (default: dropped).
    #[arg(long)]
    pub keep_databases: bool,
}

impl Infra {
    /// Where the `sequencer` and `ingress` binaries are.
    pub fn bin_dir(&self) -> PathBuf {
        self.bin_dir.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("target/release"))
        })
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir().join(name)
    }

    /// Drops and recreates database `db`; returns its URL.
    pub async fn fresh_database(&self, db: &str) -> anyhow::Result<String> {
        harness::db::fresh_database(&self.pg_admin_url, db).await
    }

    pub fn drop_database(&self, db: &str) {
        if !self.keep_databases {
            harness::db::drop_database(&self.pg_admin_url, db);
        }
    }

    /// A fresh database and fresh topics named after `suffix`, on this broker.
    pub async fn fresh_topology(&self, suffix: &str) -> anyhow::Result<FreshTopology> {
        self.fresh_partitioned_topology(suffix, 1).await
    }

    /// [`Infra::fresh_topology`] with a requests topic of `partitions` partitions, each with a
    /// fresh database of its own (`<db>`, `<db>_p1`, ...).
    pub async fn fresh_partitioned_topology(
        &self,
        suffix: &str,
        partitions: u32,
    ) -> anyhow::Result<FreshTopology> {
        let db = format!("{}_{suffix}", self.prefix);
        let database_url = self.fresh_database(&db).await?;
        for p in 1..partitions {
            self.fresh_database(&format!("{db}_p{p}")).await?;
        }
        let topology = Topology {
            database_url,
            brokers: self.brokers.clone(),
            requests_topic: format!("{}-req-{suffix}", self.prefix.replace('_', "-")),
            outcomes_topic: format!("{}-out-{suffix}", self.prefix.replace('_', "-")),
            partitions,
        };
        harness::topics::create_partitioned_topics(
            &self.bin_dir(),
            &self.brokers,
            &[&topology.requests_topic, &topology.outcomes_topic],
            partitions,
        )?;
        Ok(FreshTopology { db, topology })
    }

    /// Drops the database and deletes the topics of a run (best effort).
    pub fn remove(&self, fresh: &FreshTopology) {
        self.drop_database(&fresh.db);
        for p in 1..fresh.topology.partitions {
            self.drop_database(&format!("{}_p{p}", fresh.db));
        }
        let topology = &fresh.topology;
        let _ = harness::topics::delete_topics(
            &self.bin_dir(),
            &self.brokers,
            &[&topology.requests_topic, &topology.outcomes_topic],
        );
    }

    pub fn log_file(&self, name: &str) -> anyhow::Result<File> {
        std::fs::create_dir_all(&self.log_dir)?;
        Ok(File::create(self.log_dir.join(format!("{name}.log")))?)
    }
}

/// A run's own database and topics: made by [`Infra::fresh_topology`], dropped and deleted by
/// [`Infra::remove`].
#[derive(Clone, Debug)]
pub struct FreshTopology {
    /// The database's name (the topology has its URL).
    pub db: String,
    pub topology: Topology,
}

/// Waits until `GET path` on `addr` answers 200 (and, with `body_contains`, says so).
pub async fn wait_http(
    addr: SocketAddr,
    path: &str,
    body_contains: Option<&str>,
    within: Duration,
    proc_: &mut Proc,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        proc_.check_alive()?;
        if let Ok(r) = http::once(addr, "GET", path, "", b"", Duration::from_secs(2)).await {
            if r.status == 200
                && body_contains.is_none_or(|s| String::from_utf8_lossy(&r.body).contains(s))
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{} not ready on {addr}{path} within {within:?}", proc_.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";

/// This system: one (or two) sequencers and one ingress on a fresh database and fresh topics.
pub struct SystemStack {
    pub fresh: FreshTopology,
    pub ingress_addr: SocketAddr,
    /// `/metrics` of the ingress and of every sequencer (for the hop breakdown).
    pub metrics_urls: Vec<String>,
    pub procs: Vec<Proc>,
}

#[derive(Clone, Debug)]
pub struct SystemOptions {
    pub name: String,
    pub ingress_port: u16,
    pub status_port: u16,
    pub batch_size_max: usize,
    pub standby: bool,
    /// Partitions of the requests topic, each with its database; every sequencer serves all.
    pub partitions: u32,
}

impl SystemStack {
    pub async fn start(infra: &Infra, o: &SystemOptions) -> anyhow::Result<SystemStack> {
        let suffix = format!("{}_{:06x}", o.name, crate::rand32() & 0xFF_FFFF);
        let fresh = infra
            .fresh_partitioned_topology(&suffix, o.partitions.max(1))
            .await?;
        let status_addr: SocketAddr = format!("127.0.0.1:{}", o.status_port).parse()?;
        let ingress_addr: SocketAddr = format!("127.0.0.1:{}", o.ingress_port).parse()?;
        let mut stack = SystemStack {
            fresh,
            ingress_addr,
            metrics_urls: vec![format!("http://{ingress_addr}/metrics")],
            procs: Vec::new(),
        };
        let nodes = if o.standby { 2 } else { 1 };
        for n in 0..nodes {
            stack.metrics_urls.push(format!(
                "http://127.0.0.1:{}/metrics",
                o.status_port + n as u16
            ));
        }
        for n in 0..nodes {
            let node = format!("bench-seq-{}", (b'a' + n as u8) as char);
            let mut cmd = stack.fresh.topology.sequencer(
                &infra.bin_dir(),
                &node,
                &format!("127.0.0.1:{}", o.status_port + n as u16),
            );
            cmd.env("BATCH_SIZE_MAX", o.batch_size_max.to_string());
            let log = infra.log_file(&format!("{}-{node}", o.name))?;
            stack.procs.push(Proc::spawn(&node, cmd, log)?);
            if n == 0 {
                let p = stack.procs.last_mut().expect("just pushed");
                wait_http(
                    status_addr,
                    "/readyz",
                    Some("active"),
                    Duration::from_secs(60),
                    p,
                )
                .await?;
            }
        }
        let cmd =
            stack
                .fresh
                .topology
                .ingress(&infra.bin_dir(), &ingress_addr.to_string(), ADMIN_TOKEN);
        let log = infra.log_file(&format!("{}-ingress", o.name))?;
        stack.procs.push(Proc::spawn("ingress", cmd, log)?);
        let p = stack.procs.last_mut().expect("just pushed");
        wait_http(ingress_addr, "/readyz", None, Duration::from_secs(60), p).await?;
        Ok(stack)
    }

    pub async fn stop(mut self, infra: &Infra) {
        for p in self.procs.iter_mut().rev() {
            p.stop();
        }
        infra.remove(&self.fresh);
    }
}

/// A baseline server (`bench baseline-server`) on its own fresh database or Redis namespace.
pub struct BaselineStack {
    pub db: Option<String>,
    pub database_url: Option<String>,
    pub addr: SocketAddr,
    pub proc_: Proc,
}

impl BaselineStack {
    pub async fn start(
        infra: &Infra,
        kind: &str,
        port: u16,
        pg_pool: u32,
        redis_addr: &str,
    ) -> anyhow::Result<BaselineStack> {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "baseline-server",
            "--kind",
            kind,
            "--listen",
            &addr.to_string(),
            "--admin-token",
            ADMIN_TOKEN,
            "--pool",
            &pg_pool.to_string(),
            "--redis",
            redis_addr,
        ]);
        let (db, database_url) = if kind == "naive" {
            let db = format!("{}_naive_{:06x}", infra.prefix, crate::rand32() & 0xFF_FFFF);
            let url = infra.fresh_database(&db).await?;
            cmd.args(["--database-url", &url]);
            (Some(db), Some(url))
        } else {
            cmd.args([
                "--namespace",
                &format!("{}:{:08x}", infra.prefix, crate::rand32()),
            ]);
            (None, None)
        };
        let log = infra.log_file(&format!("baseline-{kind}"))?;
        let mut proc_ = Proc::spawn(&format!("baseline-{kind}"), cmd, log)?;
        wait_http(addr, "/readyz", None, Duration::from_secs(30), &mut proc_).await?;
        Ok(BaselineStack {
            db,
            database_url,
            addr,
            proc_,
        })
    }

    pub async fn stop(mut self, infra: &Infra) {
        // The redis server deletes its namespace's keys on SIGTERM: give it time to.
        self.proc_.stop_within(Duration::from_secs(120));
        if let Some(db) = &self.db {
            infra.drop_database(db);
        }
    }
}
