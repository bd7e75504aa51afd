//! `sequencer audit --json`: the invariants checked against a system's database.

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use serde_json::Value;

/// What one audit run said.
#[derive(Debug)]
pub struct AuditRun {
    /// The exit code (`None` when killed by a signal): 0 when clean.
    pub exit_code: Option<i32>,
    /// The JSON report; `Null` when the audit printed none.
    pub report: Value,
    pub stderr: String,
}

impl AuditRun {
    /// The reports: one, or one per partition.
    fn reports(&self) -> Vec<&Value> {
        match self.report.as_array() {
            Some(all) => all.iter().collect(),
            None => vec![&self.report],
        }
    }

    /// The violations the report lists, of every partition (none when there is no report).
    pub fn violations(&self) -> Vec<Value> {
        self.reports()
            .into_iter()
            .flat_map(|r| r["violations"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// A report that lists no violation, from an audit that exited 0.
    pub fn clean(&self) -> bool {
        self.exit_code == Some(0) && self.violations().is_empty()
    }

    /// Whether the exit code says what the report says (0 exactly when no violation is listed).
    pub fn consistent(&self) -> bool {
        let listed = self.reports();
        let clean = !self.report.is_null()
            && listed
                .iter()
                .all(|r| r["violations"].as_array().is_some_and(|v| v.is_empty()));
        (self.exit_code == Some(0)) == clean
    }
}

/// Runs `<sequencer> audit --json` against `database_url`, `sequencer` being the binary's path.
pub fn run(sequencer: &Path, database_url: &str) -> anyhow::Result<AuditRun> {
    run_partitions(sequencer, database_url, 1)
}

/// [`run`] over every partition's database of a store with `partitions` partitions (partition
/// p's named after `database_url`'s with `_p{p}`); with several, the report is an array of one
/// report per partition.
pub fn run_partitions(
    sequencer: &Path,
    database_url: &str,
    partitions: u32,
) -> anyhow::Result<AuditRun> {
    let out = Command::new(sequencer)
        .args(["audit", "--json", "--database-url", database_url])
        .env("REQUEST_PARTITIONS", partitions.to_string())
        .env_remove("DATABASE_URLS")
        .output()
        .with_context(|| format!("running {} audit", sequencer.display()))?;
    Ok(AuditRun {
        exit_code: out.status.code(),
        report: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
