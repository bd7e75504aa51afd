//! A child process with its log file, stopped (SIGTERM, then SIGKILL) when its handle is dropped.

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr going to `log`.
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
            let _ = signal(&c, "TERM");
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

/// Sends `signal` (KILL, STOP, CONT, TERM, ...) to `child` with kill(1).
pub fn signal(child: &Child, signal: &str) -> anyhow::Result<()> {
    let pid = child.id();
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()?
        .success();
    if !ok {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}
