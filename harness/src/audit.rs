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
    /// The violations the report lists (none when there is no report).
    pub fn violations(&self) -> Vec<Value> {
        self.report["violations"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// A report that lists no violation, from an audit that exited 0.
    pub fn clean(&self) -> bool {
        self.exit_code == Some(0) && self.violations().is_empty()
    }

    /// Whether the exit code says what the report says (0 exactly when no violation is listed).
    pub fn consistent(&self) -> bool {
        (self.exit_code == Some(0))
            == self.report["violations"]
                .as_array()
                .is_some_and(|v| v.is_empty())
    }
}

/// Runs `<sequencer> audit --json` against `database_url`, `sequencer` being the binary's path.
pub fn run(sequencer: &Path, database_url: &str) -> anyhow::Result<AuditRun> {
    let out = Command::new(sequencer)
        .args(["audit", "--json", "--database-url", database_url])
        .output()
        .with_context(|| format!("running {} audit", sequencer.display()))?;
    Ok(AuditRun {
        exit_code: out.status.code(),
        report: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
