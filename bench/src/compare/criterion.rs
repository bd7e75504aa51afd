//! The engine's figures, read from criterion's output of `cargo bench -p engine`.

use std::path::Path;

use super::EngineFigure;

/// Reads criterion's estimates for the engine benchmark (group `apply_batch`).
pub(super) fn engine_figures(dir: &Path) -> Vec<EngineFigure> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("apply_batch")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "report" && n != "base") {
                if p.file_name().is_some_and(|n| n == "new") {
                    let est: serde_json::Value = std::fs::read(p.join("estimates.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    let bench: serde_json::Value = std::fs::read(p.join("benchmark.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    let ns = est["mean"]["point_estimate"].as_f64().unwrap_or(0.0);
                    let batch = bench["throughput"]["Elements"].as_u64().unwrap_or(0);
                    if ns > 0.0 && batch > 0 {
                        out.push(EngineFigure {
                            id: bench["full_id"].as_str().unwrap_or("?").to_owned(),
                            batch,
                            ns_per_batch: ns,
                            decisions_per_s: batch as f64 / (ns * 1e-9),
                        });
                    }
                } else {
                    stack.push(p);
                }
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}
