//! The end-of-run oversell check: what the API says, what the client saw, what Postgres holds,
//! and (for this system) `sequencer audit`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use sqlx::Row;

use crate::http;

/// A SKU's stock counters, as `GET /v1/skus/{sku}` answers them or the `skus` row holds them.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkuCounters {
    pub total: i64,
    pub available: i64,
    pub held: i64,
    pub sold: i64,
}

impl SkuCounters {
    /// The counters of an API answer; one that is missing reads -1 (and fails the check).
    fn from_json(v: &serde_json::Value) -> SkuCounters {
        let f = |k: &str| v.get(k).and_then(|x| x.as_i64()).unwrap_or(-1);
        SkuCounters {
            total: f("total"),
            available: f("available"),
            held: f("held"),
            sold: f("sold"),
        }
    }

    /// What is wrong with them: a negative counter, or available + held + sold not the total.
    /// Either is an oversell.
    fn violations(&self, sku: &str) -> Vec<String> {
        let SkuCounters {
            total,
            available,
            held,
            sold,
        } = *self;
        let mut found = Vec::new();
        if total < 0 || available < 0 || held < 0 || sold < 0 {
            found.push(format!(
                "{sku}: negative counter (available {available}, held {held}, sold {sold})"
            ));
        }
        if available + held + sold != total {
            found.push(format!(
                "{sku}: available {available} + held {held} + sold {sold} != total {total}"
            ));
        }
        found
    }
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct SkuCheck {
    pub sku: String,
    #[serde(flatten)]
    pub counters: SkuCounters,
    /// Distinct reservation ids the client received a 201 for.
    pub client_winners: u64,
    /// From Postgres, when reachable: units of rows in `held` / `confirmed`, rows ever granted.
    pub db_held_units: Option<i64>,
    pub db_confirmed_units: Option<i64>,
    pub db_granted_rows: Option<i64>,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct AuditResult {
    pub exit_code: Option<i32>,
    pub clean: bool,
    pub violations: Vec<String>,
    pub summary: String,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct CheckReport {
    pub skus_checked: usize,
    pub total_client_winners: u64,
    pub violations: Vec<String>,
    pub oversell: bool,
    pub audit: Option<AuditResult>,
    /// Per-SKU detail (only the first 20 SKUs are kept in the report).
    pub skus: Vec<SkuCheck>,
}

pub async fn run(
    addr: SocketAddr,
    skus: &[String],
    client_winners: &[u64],
    database_url: Option<&str>,
    audit_bin: Option<&Path>,
    partitions: u32,
) -> CheckReport {
    let mut report = CheckReport {
        skus_checked: skus.len(),
        total_client_winners: client_winners.iter().sum(),
        ..CheckReport::default()
    };
    let mut rows: Vec<SkuCheck> = Vec::with_capacity(skus.len());
    // 1. The public contract: GET /v1/skus/{sku}.
    for (i, sku) in skus.iter().enumerate() {
        let mut c = SkuCheck {
            sku: sku.clone(),
            client_winners: client_winners.get(i).copied().unwrap_or(0),
            ..SkuCheck::default()
        };
        match http::once(
            addr,
            "GET",
            &format!("/v1/skus/{sku}"),
            "",
            b"",
            Duration::from_secs(10),
        )
        .await
        {
            Ok(r) if r.status == 200 => {
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
                c.counters = SkuCounters::from_json(&v);
            }
            Ok(r) => report
                .violations
                .push(format!("GET /v1/skus/{sku} answered {}", r.status)),
            Err(e) => report
                .violations
                .push(format!("GET /v1/skus/{sku} failed: {e:#}")),
        }
        rows.push(c);
    }
    // 2. Postgres rows.
    // Every partition's database holds its own SKUs' rows.
    if let Some(url) = database_url {
        let urls = persistence::layout::database_urls(url, &[], partitions.max(1));
        for url in urls.into_iter().flatten() {
            if let Err(e) = db_rows(&url, &mut rows).await {
                report.violations.push(format!(
                    "could not read skus/reservations from Postgres: {e:#}"
                ));
            }
        }
    }
    for c in &rows {
        let counters = c.counters.violations(&c.sku);
        report.oversell |= !counters.is_empty();
        report.violations.extend(counters);
        if c.client_winners as i64 > c.counters.total {
            report.oversell = true;
            report.violations.push(format!(
                "{}: clients were granted {} reservations of {} units",
                c.sku, c.client_winners, c.counters.total
            ));
        }
        if let (Some(h), Some(s)) = (c.db_held_units, c.db_confirmed_units) {
            if h != c.counters.held || s != c.counters.sold {
                report.violations.push(format!(
                    "{}: counters held {}/sold {} but reservation rows add up to {h}/{s}",
                    c.sku, c.counters.held, c.counters.sold
                ));
            }
        }
        if let Some(g) = c.db_granted_rows {
            if (g as u64) < c.client_winners {
                report.violations.push(format!(
                    "{}: {} grants answered to clients but only {g} granted rows in Postgres",
                    c.sku, c.client_winners
                ));
            }
        }
    }
    // 3. The system's own audit.
    if let (Some(bin), Some(url)) = (audit_bin, database_url) {
        let audit = run_partitions_audit(bin, url, partitions.max(1));
        if !audit.clean {
            report
                .violations
                .push(format!("sequencer audit: {}", audit.summary));
        }
        report.audit = Some(audit);
    }
    rows.truncate(20);
    report.skus = rows;
    report
}

async fn db_rows(url: &str, rows: &mut [SkuCheck]) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    let names: Vec<String> = rows.iter().map(|r| r.sku.clone()).collect();
    let result = sqlx::query(
        "SELECT s.sku, s.total, s.available, s.held, s.sold,
                COALESCE((SELECT sum(quantity) FROM reservations r WHERE r.sku = s.sku AND r.status = 'held'), 0)::bigint,
                COALESCE((SELECT sum(quantity) FROM reservations r WHERE r.sku = s.sku AND r.status = 'confirmed'), 0)::bigint,
                (SELECT count(*) FROM reservations r WHERE r.sku = s.sku AND r.status <> 'rejected')::bigint
           FROM skus s WHERE s.sku = ANY($1)",
    )
    .bind(&names)
    .fetch_all(&pool)
    .await?;
    for row in result {
        let sku: String = row.get(0);
        if let Some(c) = rows.iter_mut().find(|c| c.sku == sku) {
            // Postgres is the system of record: its counters are the ones checked.
            c.counters = SkuCounters {
                total: row.get(1),
                available: row.get(2),
                held: row.get(3),
                sold: row.get(4),
            };
            c.db_held_units = Some(row.get(5));
            c.db_confirmed_units = Some(row.get(6));
            c.db_granted_rows = Some(row.get(7));
        }
    }
    pool.close().await;
    Ok(())
}

pub fn run_audit(bin: &Path, database_url: &str) -> AuditResult {
    run_partitions_audit(bin, database_url, 1)
}

/// [`run_audit`] over every partition's database of a store with `partitions` partitions.
pub fn run_partitions_audit(bin: &Path, database_url: &str, partitions: u32) -> AuditResult {
    let run = match harness::audit::run_partitions(bin, database_url, partitions) {
        Ok(run) => run,
        Err(e) => {
            return AuditResult {
                exit_code: None,
                clean: false,
                violations: vec![],
                summary: format!("{e:#}"),
            }
        }
    };
    let violations: Vec<String> = run
        .violations()
        .iter()
        .take(20)
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
        .collect();
    let clean = run.clean();
    let doc = &run.report;
    let reports: Vec<&serde_json::Value> = match doc.as_array() {
        Some(all) => all.iter().collect(),
        None => vec![doc],
    };
    let sum = |key: &str| {
        reports
            .iter()
            .map(|r| r[key].as_i64().unwrap_or(0))
            .sum::<i64>()
    };
    let summary = if doc.is_null() {
        format!("audit printed no report: {}", run.stderr.trim())
    } else {
        format!(
            "{} ({} partition(s): {} skus, {} reservations, {} batches, committed offsets {})",
            if clean { "clean" } else { "FAILED" },
            reports.len(),
            sum("skus"),
            sum("reservations"),
            sum("batches"),
            sum("committed_offset")
        )
    };
    AuditResult {
        exit_code: run.exit_code,
        clean,
        violations,
        summary,
    }
}

pub fn print(c: &CheckReport) {
    println!(
        "── oversell check: {} ──",
        if c.oversell {
            "OVERSOLD"
        } else if c.violations.is_empty() {
            "clean"
        } else {
            "problems found"
        }
    );
    for s in c.skus.iter().take(3) {
        println!(
            "  {}: total {} available {} held {} sold {}; client saw {} grants{}",
            s.sku,
            s.counters.total,
            s.counters.available,
            s.counters.held,
            s.counters.sold,
            s.client_winners,
            match (s.db_held_units, s.db_confirmed_units, s.db_granted_rows) {
                (Some(h), Some(c), Some(g)) =>
                    format!("; rows: held {h} confirmed {c} granted {g}"),
                _ => String::new(),
            }
        );
    }
    if c.skus_checked > 3 {
        println!(
            "  ... {} skus in all, {} grants seen by clients",
            c.skus_checked, c.total_client_winners
        );
    }
    if let Some(a) = &c.audit {
        println!("  sequencer audit: {}", a.summary);
    }
    for v in &c.violations {
        println!("  VIOLATION {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sku_check_keeps_its_counters_at_the_top_level_of_the_json() {
        let c = SkuCheck {
            sku: "a".into(),
            counters: SkuCounters::from_json(
                &serde_json::json!({"total": 10, "available": 7, "held": 2, "sold": 1}),
            ),
            client_winners: 3,
            ..SkuCheck::default()
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"sku": "a", "total": 10, "available": 7, "held": 2, "sold": 1,
                "client_winners": 3, "db_held_units": null, "db_confirmed_units": null,
                "db_granted_rows": null})
        );
        assert!(c.counters.violations("a").is_empty());
    }

    #[test]
    fn missing_or_inconsistent_counters_are_violations() {
        let missing = SkuCounters::from_json(&serde_json::json!({"total": 10}));
        assert_eq!(
            missing.violations("a"),
            [
                "a: negative counter (available -1, held -1, sold -1)",
                "a: available -1 + held -1 + sold -1 != total 10"
            ]
        );
        let over = SkuCounters {
            total: 10,
            available: 0,
            held: 6,
            sold: 5,
        };
        assert_eq!(
            over.violations("a"),
            ["a: available 0 + held 6 + sold 5 != total 10"]
        );
    }
}
