//! Starting what is measured: fresh databases, fresh topics, real release processes on loopback
//! ports of our choosing. Every child is stopped when its handle is dropped.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

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
    pub fn bin(&self, name: &str) -> PathBuf {
        let dir = self.bin_dir.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("target/release"))
        });
        dir.join(name)
    }

    pub fn database_url(&self, db: &str) -> String {
        let base = &self.pg_admin_url[..self
            .pg_admin_url
            .rfind('/')
            .unwrap_or(self.pg_admin_url.len())];
        format!("{base}/{db}")
    }

    /// Drops and recreates database `db`; returns its URL.
    pub async fn fresh_database(&self, db: &str) -> anyhow::Result<String> {
        let admin = sqlx::PgPool::connect(&self.pg_admin_url)
            .await
            .context("connecting to Postgres as superuser")?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .execute(&admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE \"{db}\""))
            .execute(&admin)
            .await?;
        admin.close().await;
        Ok(self.database_url(db))
    }

    pub async fn drop_database(&self, db: &str) {
        if self.keep_databases {
            return;
        }
        if let Ok(admin) = sqlx::PgPool::connect(&self.pg_admin_url).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                .execute(&admin)
                .await;
            admin.close().await;
        }
    }

    /// Creates the topics with the sequencer's own `create-topics` (one partition each).
    pub fn create_topics(&self, requests: &str, outcomes: &str) -> anyhow::Result<()> {
        let status = Command::new(self.bin("sequencer"))
            .args([
                "create-topics",
                "--brokers",
                &self.brokers,
                "--requests-topic",
                requests,
                "--outcomes-topic",
                outcomes,
            ])
            .stdout(Stdio::null())
            .status()
            .context("running sequencer create-topics")?;
        if !status.success() {
            bail!(
                "create-topics failed (is the broker up on {}?)",
                self.brokers
            );
        }
        Ok(())
    }

    /// Deletes topics (best effort: frees the memory broker).
    pub async fn delete_topics(&self, topics: &[&str]) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let Ok(admin) = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create::<AdminClient<DefaultClientContext>>()
        else {
            return;
        };
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let _ = admin.delete_topics(topics, &opts).await;
    }

    pub fn log_file(&self, name: &str) -> anyhow::Result<File> {
        std::fs::create_dir_all(&self.log_dir)?;
        Ok(File::create(self.log_dir.join(format!("{name}.log")))?)
    }
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: File) -> anyhow::Result<Proc> {
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
        })
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                bail!("{} exited early with {status}", self.name);
            }
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        self.stop_within(Duration::from_secs(5));
    }

    /// SIGTERM, then SIGKILL if still running after `grace`.
    pub fn stop_within(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
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
    pub db: String,
    pub database_url: String,
    pub requests_topic: String,
    pub outcomes_topic: String,
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
}

impl SystemStack {
    pub async fn start(infra: &Infra, o: &SystemOptions) -> anyhow::Result<SystemStack> {
        let suffix = format!("{}_{:06x}", o.name, crate::rand32() & 0xFF_FFFF);
        let db = format!("{}_{suffix}", infra.prefix);
        let database_url = infra.fresh_database(&db).await?;
        let requests_topic = format!("{}-req-{suffix}", infra.prefix.replace('_', "-"));
        let outcomes_topic = format!("{}-out-{suffix}", infra.prefix.replace('_', "-"));
        infra.create_topics(&requests_topic, &outcomes_topic)?;
        let status_addr: SocketAddr = format!("127.0.0.1:{}", o.status_port).parse()?;
        let ingress_addr: SocketAddr = format!("127.0.0.1:{}", o.ingress_port).parse()?;
        let mut stack = SystemStack {
            db,
            database_url,
            requests_topic,
            outcomes_topic,
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
            let mut cmd = Command::new(infra.bin("sequencer"));
            cmd.arg("run")
                .env("DATABASE_URL", &stack.database_url)
                .env("KAFKA_BROKERS", &infra.brokers)
                .env("REQUESTS_TOPIC", &stack.requests_topic)
                .env("OUTCOMES_TOPIC", &stack.outcomes_topic)
                .env("NODE_ID", &node)
                .env(
                    "STATUS_ADDR",
                    format!("127.0.0.1:{}", o.status_port + n as u16),
                )
                .env("BATCH_SIZE_MAX", o.batch_size_max.to_string())
                .env("RUST_LOG", "info");
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
        let mut cmd = Command::new(infra.bin("ingress"));
        cmd.env("LISTEN_ADDR", ingress_addr.to_string())
            .env("DATABASE_URL", &stack.database_url)
            .env("KAFKA_BROKERS", &infra.brokers)
            .env("REQUESTS_TOPIC", &stack.requests_topic)
            .env("OUTCOMES_TOPIC", &stack.outcomes_topic)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info");
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
        infra.drop_database(&self.db).await;
        infra
            .delete_topics(&[&self.requests_topic, &self.outcomes_topic])
            .await;
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
            infra.drop_database(db).await;
        }
    }
}
