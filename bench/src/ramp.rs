//! The `ramp` scenario's search: offered rates up to saturation, the latency knee and the peak.

use std::time::Duration;

use serde::Serialize;

use crate::load::{Phase, PhaseReport, Pool, Workload};
use crate::scenario::{measured_phase, LoadArgs};

/// What a ramp found: its knee, its peak and the step that failed.
#[derive(Serialize, Clone, Debug)]
pub struct RampResult {
    /// The highest offered rate that kept p99 under the limit with < 1% errors.
    pub knee: Option<RampPoint>,
    /// The step with the most decisions/s, whatever its latency (the saturation throughput).
    pub peak: Option<RampPoint>,
    /// The lowest offered rate that failed, and why.
    pub first_failing: Option<RampFailure>,
}

/// One step of a ramp: what it offered and what it got (decisions/s).
#[derive(Serialize, Clone, Copy, Debug)]
pub struct RampPoint {
    pub offered_rate: f64,
    pub goodput: f64,
    pub p99_ms: f64,
}

/// The first step that failed: its offered rate, and why (p99 over the limit, or errors).
#[derive(Serialize, Clone, Debug)]
pub struct RampFailure {
    pub offered_rate: f64,
    pub reason: String,
}

impl RampResult {
    /// The two summary lines a run prints.
    pub fn print(&self) {
        println!(
            "ramp: peak {} decisions/s (offered {}, p99 {} ms)",
            shown(self.peak.map(|p| p.goodput), 0, "", "-"),
            shown(self.peak.map(|p| p.offered_rate), 0, "/s", "-"),
            shown(self.peak.map(|p| p.p99_ms), 1, "", "-"),
        );
        let failing = self.first_failing.as_ref();
        println!(
            "ramp: knee {} (p99 {} ms, {} decisions/s); first failing rate {} ({})",
            shown(self.knee.map(|k| k.offered_rate), 0, "/s", "none"),
            shown(self.knee.map(|k| k.p99_ms), 1, "", "-"),
            shown(self.knee.map(|k| k.goodput), 0, "", "-"),
            shown(failing.map(|f| f.offered_rate), 0, "/s", "none"),
            failing.map_or("-", |f| f.reason.as_str()),
        );
    }
}

/// Steps the offered rate up by `--ramp-factor` from `--rate` until the system saturates,
/// then probes between the last step that kept the latency limit and the first that did not.
/// Returns every step, by offered rate, and what they show.
pub async fn run(
    pool: &mut Pool,
    args: &LoadArgs,
    workload: Workload,
    timeout: Duration,
) -> (Vec<PhaseReport>, RampResult) {
    let step = Duration::from_secs_f64(args.offered.duration);
    let mut base = 0u64;
    let mut steps = Vec::new();
    // (rate, decisions/s, p99) of the highest rate that kept the latency limit.
    let mut ok: Option<(f64, f64, f64)> = None;
    // Lowest rate that broke it, and why.
    let mut bad: Option<(f64, String)> = None;
    let mut rate = args.offered.rate;
    // Rise until the system saturates (decisions fall under 90% of the offered rate, or more
    // than 1% errors): past the latency knee too, so the peak throughput is measured. Then two
    // bisection probes between the last rate that kept the limit and the first that did not.
    let mut rising = true;
    let mut probes = 0;
    loop {
        let remaining = args.max_requests.saturating_sub(base);
        if remaining == 0 {
            break;
        }
        let phase = Phase {
            label: format!("ramp {rate:.0}/s"),
            rate,
            duration: step,
            max_requests: remaining,
            index_base: base,
        };
        let (r, _) = measured_phase(pool, &phase, workload.clone(), timeout, args).await;
        base += r.planned_requests;
        let saturated = if r.error_fraction() > 0.01 {
            Some(format!("{:.1}% errors", r.error_fraction() * 100.0))
        } else if r.goodput < 0.9 * rate {
            Some(format!("only {:.0} decisions/s", r.goodput))
        } else {
            None
        };
        let verdict = if r.latency.p99_ms > args.p99_limit_ms {
            Some(format!(
                "p99 {:.1} ms > {} ms",
                r.latency.p99_ms, args.p99_limit_ms
            ))
        } else {
            saturated.clone()
        };
        eprintln!(
            "ramp step {rate:.0}/s: p99 {:.1} ms, {:.0} decisions/s, errors {} -> {}",
            r.latency.p99_ms,
            r.goodput,
            r.errors,
            verdict.as_deref().unwrap_or("sustained")
        );
        match &verdict {
            None => {
                if ok.is_none_or(|(o, _, _)| rate > o) {
                    ok = Some((rate, r.goodput, r.latency.p99_ms));
                }
            }
            Some(why) => {
                if bad.as_ref().is_none_or(|(b, _)| rate < *b) {
                    bad = Some((rate, why.clone()));
                }
            }
        }
        steps.push(r);
        // Let queues drain before the next step; after an overloaded step the system may still
        // be working off a backlog (requests appended but answered 504), so wait longer.
        let pause = if verdict.is_some() { 10 } else { 2 };
        tokio::time::sleep(Duration::from_secs(pause)).await;
        if rising {
            rate *= args.ramp_factor;
            if saturated.is_none() && rate <= args.ramp_max {
                continue;
            }
            rising = false;
        }
        match (&ok, &bad) {
            (Some((o, _, _)), Some((b, _))) if probes < 2 && b / o > 1.15 => {
                probes += 1;
                rate = (o + b) / 2.0;
            }
            (None, Some((b, _))) if probes < 2 && *b > 100.0 => {
                probes += 1;
                rate = b / 3.0;
            }
            _ => break,
        }
    }
    steps.sort_by(|a, b| a.offered_rate.total_cmp(&b.offered_rate));
    let peak = steps
        .iter()
        .max_by(|a, b| a.goodput.total_cmp(&b.goodput))
        .map(|p| RampPoint {
            offered_rate: p.offered_rate,
            goodput: p.goodput,
            p99_ms: p.latency.p99_ms,
        });
    let result = RampResult {
        knee: ok.map(|(offered_rate, goodput, p99_ms)| RampPoint {
            offered_rate,
            goodput,
            p99_ms,
        }),
        peak,
        first_failing: bad.map(|(offered_rate, reason)| RampFailure {
            offered_rate,
            reason,
        }),
    };
    (steps, result)
}

/// `v` with `decimals` decimals and then `unit`, or `none` when there is no value.
fn shown(v: Option<f64>, decimals: usize, unit: &str, none: &str) -> String {
    v.map_or(none.into(), |v| format!("{v:.decimals$}{unit}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ramp_result_reports_its_knee_peak_and_failure_as_objects() {
        let point = |offered_rate, goodput, p99_ms| RampPoint {
            offered_rate,
            goodput,
            p99_ms,
        };
        let result = RampResult {
            knee: Some(point(30_000.0, 29_500.0, 48.0)),
            peak: Some(point(40_000.0, 36_000.0, 900.0)),
            first_failing: Some(RampFailure {
                offered_rate: 34_000.0,
                reason: "p99 310 ms".into(),
            }),
        };
        let v = serde_json::json!({
            "knee": {"offered_rate": 30_000.0, "goodput": 29_500.0, "p99_ms": 48.0},
            "peak": {"offered_rate": 40_000.0, "goodput": 36_000.0, "p99_ms": 900.0},
            "first_failing": {"offered_rate": 34_000.0, "reason": "p99 310 ms"},
        });
        assert_eq!(serde_json::to_value(result).unwrap(), v);
        let none = RampResult {
            knee: None,
            peak: None,
            first_failing: None,
        };
        let v = serde_json::json!({"knee": null, "peak": null, "first_failing": null});
        assert_eq!(serde_json::to_value(none).unwrap(), v);
    }
}
