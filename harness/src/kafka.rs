//! A dedicated Apache Kafka broker for one test: its own ports and its own log directory, so a
//! test can SIGKILL it and start it again without disturbing the tests that share the broker on
//! 127.0.0.1:9092. Runs the same jars and configuration as `scripts/up` (scripts/kafka/): the
//! jars from `FLASH_KAFKA_LIBS`, which `scripts/test` resolves and exports.

use std::fs::File;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{free_port, log_dir, rand32};

pub struct KafkaBroker {
    pub name: String,
    pub port: u16,
    controller_port: u16,
    libs: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

fn kafka_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka"))
}

/// A Kafka cluster id: 16 random bytes in URL-safe base64 without padding (what
/// `kafka-storage random-uuid` prints). Like Kafka's own, never one that starts with `-`: the
/// storage tool would read `--cluster-id -...` as a missing value (a 1-in-64 failure).
fn cluster_id() -> String {
    loop {
        let id = random_base64_id();
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn random_base64_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = uuid::Uuid::new_v4().as_u128().to_be_bytes();
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = String::new();
    for b in bytes {
        bits = (bits << 8) | u32::from(b);
        n += 8;
        while n >= 6 {
            n -= 6;
            out.push(ALPHABET[((bits >> n) & 63) as usize] as char);
        }
    }
    if n > 0 {
        out.push(ALPHABET[((bits << (6 - n)) & 63) as usize] as char);
    }
    out
}

impl KafkaBroker {
    /// Formats a fresh log directory and starts the broker on free ports; returns once it
    /// accepts connections.
    pub fn start(test: &str) -> anyhow::Result<KafkaBroker> {
        let libs = PathBuf::from(std::env::var_os("FLASH_KAFKA_LIBS").context(
            "FLASH_KAFKA_LIBS is not set: run the tests through scripts/test, which resolves \
             the Apache Kafka jars and exports their folder",
        )?);
        let name = format!("{test}_{:08x}", rand32());
        let dir = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/systest-kafka"
        ))
        .join(&name);
        std::fs::create_dir_all(&dir)?;
        let mut broker = KafkaBroker {
            name,
            port: free_port(),
            controller_port: free_port(),
            libs,
            dir,
            child: None,
            starts: 0,
        };
        let template = std::fs::read_to_string(kafka_dir().join("server.properties.in"))?;
        let properties = template
            .replace("@LOG_DIR@", &broker.dir.join("data").display().to_string())
            .replace("@PORT@", &broker.port.to_string())
            .replace("@CONTROLLER_PORT@", &broker.controller_port.to_string());
        std::fs::write(broker.properties(), properties)?;
        crate::run_ok(
            broker
                .java()
                .args(["kafka.tools.StorageTool", "format", "--standalone", "-t"])
                .arg(cluster_id())
                .arg("-c")
                .arg(broker.properties())
                .stdout(Stdio::null()),
            "formatting the Kafka log directory (java, Kafka's storage tool)",
        )?;
        broker.spawn()?;
        Ok(broker)
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn properties(&self) -> PathBuf {
        self.dir.join("server.properties")
    }

    fn java(&self) -> Command {
        let mut cmd = Command::new("java");
        cmd.arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                kafka_dir().join("log4j2.yaml").display()
            ));
        cmd
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = File::create(log_dir().join(format!("{}-kafka-{}.log", self.name, self.starts)))?;
        let child = self
            .java()
            .args(["-Xms256m", "-Xmx512m", "kafka.Kafka"])
            .arg(self.properties())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the Kafka broker (java)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = format!("127.0.0.1:{}", self.port).parse()?;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "the Kafka broker exited with {status} (log in target/systest-logs/{}-kafka-{}.log)",
                    self.name,
                    self.starts
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the Kafka broker did not open port {} within 60 s",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: no clean shutdown, whatever was in flight is cut off.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("the broker is not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts the broker again on the same ports and the same log directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the broker is still running");
        }
        self.spawn()
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Keep the log of a failed test for inspection.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cluster_id;

    #[test]
    fn a_cluster_id_is_22_url_safe_characters_and_never_starts_with_a_dash() {
        for _ in 0..2_000 {
            let id = cluster_id();
            assert_eq!(id.len(), 22, "{id}");
            assert!(!id.starts_with('-'), "{id}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }
}
