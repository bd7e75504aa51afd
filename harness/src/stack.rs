//! A whole system for one system test: a fresh database, fresh topics on the real broker, real
//! `sequencer` and `ingress` processes on free loopback ports, and a client for its HTTP API.
//! Tests that kill the broker run their own ([`crate::kafka::KafkaBroker`]).

use std::collections::HashMap;
use std::fs::File;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::Value;
use sqlx::PgPool;

use crate::topics::Topology;
use crate::{bin_dir, db, free_port, log_dir, pg_admin_url, process, rand32, shared_brokers};

mod http;

pub const ADMIN_TOKEN: &str = "systest-admin-token-0123456789";

#[derive(Clone, Debug)]
pub struct Options {
    pub sequencers: usize,
    pub batch_size_max: usize,
    pub batch_size_backlog_max: usize,
    pub lease_ms: u64,
    pub renew_ms: u64,
    pub outcome_timeout_ms: u64,
    pub extra_ingress_env: Vec<(String, String)>,
    /// Extra environment of sequencer `i`: `(i, name, value)`.
    pub sequencer_env: Vec<(usize, String, String)>,
    /// The broker to use (`host:port`); the shared one when `None`.
    pub brokers: Option<String>,
    /// Wait for the ingress's `/readyz` at start (else only for `/healthz`).
    pub wait_ingress_ready: bool,
    /// Partitions of the requests topic (REQUEST_PARTITIONS), each with its own database.
    pub partitions: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sequencers: 1,
            batch_size_max: 250,
            batch_size_backlog_max: 2_000,
            lease_ms: 600,
            renew_ms: 150,
            outcome_timeout_ms: 5_000,
            extra_ingress_env: Vec::new(),
            sequencer_env: Vec::new(),
            brokers: None,
            wait_ingress_ready: true,
            partitions: 1,
        }
    }
}

impl Options {
    /// `n` sequencer processes (one active, the others standby), the rest as by default.
    pub fn sequencers(n: usize) -> Options {
        Options {
            sequencers: n,
            ..Options::default()
        }
    }

    /// How long the ingress waits for an outcome before it answers 504.
    pub fn with_outcome_timeout_ms(self, ms: u64) -> Options {
        Options {
            outcome_timeout_ms: ms,
            ..self
        }
    }

    /// The writer lease and how often it is renewed.
    pub fn with_lease_ms(self, lease_ms: u64, renew_ms: u64) -> Options {
        Options {
            lease_ms,
            renew_ms,
            ..self
        }
    }

    /// A requests topic of `partitions` partitions, each with its own database.
    pub fn with_partitions(self, partitions: u32) -> Options {
        Options { partitions, ..self }
    }

    /// The broker (`host:port`) instead of the shared one.
    pub fn with_brokers(self, brokers: String) -> Options {
        Options {
            brokers: Some(brokers),
            ..self
        }
    }

    /// Adds these `(name, value)` pairs to the ingress's environment.
    pub fn with_ingress_env(mut self, pairs: &[(&str, &str)]) -> Options {
        self.extra_ingress_env
            .extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Adds `name=value` to the environment of sequencer `i`.
    pub fn with_sequencer_env(mut self, i: usize, name: &str, value: &str) -> Options {
        self.sequencer_env.push((i, name.into(), value.into()));
        self
    }
}

pub struct Sequencer {
    pub node_id: String,
    pub status_port: u16,
    pub child: Option<Child>,
    restarts: u32,
}

pub struct Stack {
    pub name: String,
    pub db_name: String,
    pub database_url: String,
    pub requests_topic: String,
    pub outcomes_topic: String,
    /// The broker this stack's processes talk to.
    pub brokers: String,
    /// Partition 0's database.
    pub pool: PgPool,
    /// Every partition's database, in partition order (the first is `pool`).
    pub pools: Vec<PgPool>,
    pub http: reqwest::Client,
    pub base: String,
    pub options: Options,
    pub sequencers: Vec<Sequencer>,
    ingress: Option<Child>,
    ingress_port: u16,
}

impl Stack {
    /// Starts a fresh system named after the test.
    pub async fn start(test: &str, options: Options) -> anyhow::Result<Stack> {
        let suffix = format!("{}_{:08x}", test, rand32());
        let db_name = format!("flash_t_{suffix}");
        let database_url = db::fresh_database(&pg_admin_url(), &db_name).await?;
        for p in 1..options.partitions {
            db::fresh_database(&pg_admin_url(), &format!("{db_name}_p{p}")).await?;
        }
        let requests_topic = format!("req-{suffix}");
        let outcomes_topic = format!("out-{suffix}");
        let brokers = options.brokers.clone().unwrap_or_else(shared_brokers);
        crate::topics::create_partitioned_topics(
            &bin_dir(),
            &brokers,
            &[&requests_topic, &outcomes_topic],
            options.partitions,
        )?;
        let mut pools = Vec::new();
        for p in 0..options.partitions {
            let url = if p == 0 {
                database_url.clone()
            } else {
                db::database_url(&pg_admin_url(), &format!("{db_name}_p{p}"))
            };
            pools.push(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(&url)
                    .await
                    .context("connecting to the test database")?,
            );
        }
        let pool = pools[0].clone();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .timeout(Duration::from_secs(30))
            .build()?;
        let mut stack = Stack {
            name: suffix,
            db_name,
            database_url,
            requests_topic,
            outcomes_topic,
            brokers,
            pool,
            pools,
            http,
            base: String::new(),
            options: options.clone(),
            sequencers: Vec::new(),
            ingress: None,
            ingress_port: free_port(),
        };
        for i in 0..options.sequencers {
            let node_id = format!("seq-{}", (b'a' + i as u8) as char);
            stack.sequencers.push(Sequencer {
                node_id,
                status_port: free_port(),
                child: None,
                restarts: 0,
            });
            stack.spawn_sequencer(i)?;
        }
        stack.wait_for_active(Duration::from_secs(60)).await?;
        stack.base = format!("http://127.0.0.1:{}", stack.ingress_port);
        stack.spawn_ingress()?;
        let probe = if options.wait_ingress_ready {
            "/readyz"
        } else {
            "/healthz"
        };
        stack.wait_answers(probe, Duration::from_secs(60)).await?;
        Ok(stack)
    }

    pub fn spawn_sequencer(&mut self, i: usize) -> anyhow::Result<()> {
        let topology = self.topology();
        let s = &mut self.sequencers[i];
        s.restarts += 1;
        let log = File::create(
            log_dir().join(format!("{}-{}-{}.log", self.name, s.node_id, s.restarts)),
        )?;
        let mut cmd = topology.sequencer(
            &bin_dir(),
            &s.node_id,
            &format!("127.0.0.1:{}", s.status_port),
        );
        for (_, k, v) in self.options.sequencer_env.iter().filter(|(j, ..)| *j == i) {
            cmd.env(k, v);
        }
        let child = cmd
            .env("BATCH_SIZE_MAX", self.options.batch_size_max.to_string())
            .env(
                "BATCH_SIZE_BACKLOG_MAX",
                self.options.batch_size_backlog_max.to_string(),
            )
            .env("LEASE_MS", self.options.lease_ms.to_string())
            .env("RENEW_MS", self.options.renew_ms.to_string())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning the sequencer")?;
        s.child = Some(child);
        Ok(())
    }

    /// The database and topics of this stack, on its broker.
    pub fn topology(&self) -> Topology {
        Topology {
            database_url: self.database_url.clone(),
            brokers: self.brokers.clone(),
            requests_topic: self.requests_topic.clone(),
            outcomes_topic: self.outcomes_topic.clone(),
            partitions: self.options.partitions,
        }
    }

    /// The database of the partition `sku` lives in.
    pub fn pool_for(&self, sku: &str) -> &PgPool {
        &self.pools[wire::partition::partition_of(sku, self.options.partitions) as usize]
    }

    fn spawn_ingress(&mut self) -> anyhow::Result<()> {
        let log = File::create(log_dir().join(format!("{}-ingress.log", self.name)))?;
        let mut cmd = self.topology().ingress(
            &bin_dir(),
            &format!("127.0.0.1:{}", self.ingress_port),
            ADMIN_TOKEN,
        );
        cmd.env(
            "OUTCOME_TIMEOUT_MS",
            self.options.outcome_timeout_ms.to_string(),
        );
        // The ops console's figures: each sequencer's status server, as `scripts/up` sets them.
        let status_urls: Vec<String> = self
            .sequencers
            .iter()
            .map(|s| format!("http://127.0.0.1:{}", s.status_port))
            .collect();
        cmd.env("SEQUENCER_STATUS_URLS", status_urls.join(","));
        for (k, v) in &self.options.extra_ingress_env {
            cmd.env(k, v);
        }
        self.ingress = Some(
            cmd.stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawning the ingress")?,
        );
        Ok(())
    }

    /// The `/status` document of sequencer `i`, if it answers.
    pub async fn sequencer_status(&self, i: usize) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}/status", self.sequencers[i].status_port);
        let r = self
            .http
            .get(url)
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// Index of the sequencer reporting `active`, waiting up to `within`.
    pub async fn wait_for_active(&self, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            for i in 0..self.sequencers.len() {
                if let Some(doc) = self.sequencer_status(i).await {
                    if doc["role"] == "active" {
                        return Ok(i);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no sequencer became active within {within:?} (logs in target/systest-logs/{}*)", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until sequencer `i` reports `role` (active, standby) on its status endpoint.
    pub async fn wait_role(&self, i: usize, role: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if self
                .sequencer_status(i)
                .await
                .is_some_and(|doc| doc["role"] == role)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("sequencer {i} did not report role {role} within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for one sequencer to report `active` and every other one `standby`; returns the
    /// active one's index.
    pub async fn wait_active_and_standby(&self, within: Duration) -> anyhow::Result<usize> {
        let active = self.wait_for_active(within).await?;
        for i in (0..self.sequencers.len()).filter(|&i| i != active) {
            self.wait_role(i, "standby", within).await?;
        }
        Ok(active)
    }

    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        self.wait_answers("/readyz", within).await
    }

    /// Waits until `GET path` on the ingress answers 2xx.
    async fn wait_answers(&self, path: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = self.http.get(format!("{}{path}", self.base)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("ingress: {path} not 2xx within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal (KILL, STOP, CONT, TERM) to sequencer `i`.
    pub fn signal_sequencer(&mut self, i: usize, signal: &str) -> anyhow::Result<()> {
        process::signal(
            self.sequencers[i]
                .child
                .as_ref()
                .context("sequencer not running")?,
            signal,
        )?;
        if signal == "KILL" {
            if let Some(mut c) = self.sequencers[i].child.take() {
                c.wait()?;
            }
        }
        Ok(())
    }

    /// Kills sequencer `i` (SIGKILL) and waits up to `within` for one to report `active`; returns
    /// its index (another one's: a killed process answers nothing).
    pub async fn kill_and_wait_active(
        &mut self,
        i: usize,
        within: Duration,
    ) -> anyhow::Result<usize> {
        self.signal_sequencer(i, "KILL")?;
        self.wait_for_active(within).await
    }

    /// Freezes every sequencer (SIGSTOP), the active first; returns the active's index, so that
    /// nothing is decided until they are sent CONT (a lost answer, a queue that waits).
    pub async fn freeze_sequencers(&mut self) -> anyhow::Result<usize> {
        let active = self.wait_for_active(Duration::from_secs(10)).await?;
        self.signal_sequencer(active, "STOP")?;
        for i in (0..self.sequencers.len()).filter(|&i| i != active) {
            self.signal_sequencer(i, "STOP")?;
        }
        Ok(active)
    }

    /// Sends `signal` (TERM, or CONT to a stopped one) to sequencer `i` and waits for it to exit;
    /// returns its exit code.
    pub fn signal_and_wait_exit(
        &mut self,
        i: usize,
        signal: &str,
        within: Duration,
    ) -> anyhow::Result<Option<i32>> {
        self.signal_sequencer(i, signal)?;
        self.wait_sequencer_exit(i, within)
    }

    /// The sequencers whose process has exited (or was never started again after a kill).
    pub fn exited_sequencers(&mut self) -> anyhow::Result<Vec<usize>> {
        let mut exited = Vec::new();
        for (i, s) in self.sequencers.iter_mut().enumerate() {
            let running = match s.child.as_mut() {
                Some(child) => child.try_wait()?.is_none(),
                None => false,
            };
            if !running {
                exited.push(i);
            }
        }
        Ok(exited)
    }

    /// Waits for sequencer `i` to exit; returns its exit code.
    pub fn wait_sequencer_exit(
        &mut self,
        i: usize,
        within: Duration,
    ) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + within;
        let child = self.sequencers[i]
            .child
            .as_mut()
            .context("sequencer not running")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.sequencers[i].child = None;
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!("sequencer {i} still running after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Appends raw messages to this stack's requests topic, as any producer could, and waits
    /// until the broker has them all.
    pub fn produce_requests(&self, payloads: &[Vec<u8>]) -> anyhow::Result<()> {
        crate::topics::produce(&self.brokers, &self.requests_topic, payloads)
    }

    /// Runs `sequencer audit --json` against this stack's database.
    pub fn audit(&self) -> anyhow::Result<Value> {
        let run = crate::audit::run_partitions(
            &bin_dir().join("sequencer"),
            &self.database_url,
            self.options.partitions,
        )?;
        ensure!(
            !run.report.is_null(),
            "audit printed no report: {}",
            run.stderr
        );
        ensure!(
            run.consistent(),
            "audit exit code disagrees with its report: {}",
            run.report
        );
        Ok(run.report)
    }

    /// The one `bigint` that `sql` selects from this stack's database (a count, a maximum).
    pub async fn query_i64(&self, sql: &str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    /// The one `text` column that `sql` selects from this stack's database, every row's.
    pub async fn query_texts(&self, sql: &str) -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar(sql).fetch_all(&self.pool).await?)
    }

    /// Counters of one SKU as Postgres holds them.
    pub async fn sku_row(&self, sku: &str) -> anyhow::Result<HashMap<&'static str, i64>> {
        let row: (i64, i64, i64, i64) =
            sqlx::query_as("SELECT total, available, held, sold FROM skus WHERE sku = $1")
                .bind(sku)
                .fetch_one(&self.pool)
                .await?;
        Ok(HashMap::from([
            ("total", row.0),
            ("available", row.1),
            ("held", row.2),
            ("sold", row.3),
        ]))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(mut c) = self.ingress.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for s in &mut self.sequencers {
            if let Some(mut c) = s.child.take() {
                let _ = process::signal(&c, "CONT");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Keep the database of a failed test for inspection; drop it otherwise.
        if !std::thread::panicking() {
            db::drop_database(&pg_admin_url(), &self.db_name);
            for p in 1..self.options.partitions {
                db::drop_database(&pg_admin_url(), &format!("{}_p{p}", self.db_name));
            }
        }
    }
}
