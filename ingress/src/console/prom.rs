//! Just enough of the Prometheus text format to read a few series back: the sequencers' `/metrics`
//! and this ingress's own, once a second, for the ops console.

use rustc_hash::FxHashMap;

/// One scrape: every sample line, by series name, with its labels as written.
#[derive(Debug, Default, Clone)]
pub struct Scrape {
    series: FxHashMap<String, Vec<(String, f64)>>,
}

impl Scrape {
    /// Parses the text exposition format; comments and lines it cannot read are skipped.
    pub fn parse(text: &str) -> Scrape {
        let mut series: FxHashMap<String, Vec<(String, f64)>> = FxHashMap::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels, rest) = match line.find('{') {
                Some(open) => match line[open..].find('}') {
                    Some(close) => (
                        &line[..open],
                        &line[open + 1..open + close],
                        &line[open + close + 1..],
                    ),
                    None => continue,
                },
                None => match line.split_once(' ') {
                    Some((name, rest)) => (name, "", rest),
                    None => continue,
                },
            };
            // The value, then an optional timestamp.
            let Some(value) = rest.split_whitespace().next() else {
                continue;
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => match v.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
            };
            series
                .entry(name.to_owned())
                .or_default()
                .push((labels.to_owned(), value));
        }
        Scrape { series }
    }

    /// The sum of every sample of `name` whose labels include each `key="value"` of `matching`
    /// (all of them when `matching` is empty); `None` when no sample matches.
    pub fn sum(&self, name: &str, matching: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for (labels, value) in self.series.get(name)? {
            if matching.iter().all(|&(k, v)| label(labels, k) == Some(v)) {
                *found.get_or_insert(0.0) += value;
            }
        }
        found
    }

    /// The unlabelled sample of `name` (or the sum of its samples).
    pub fn value(&self, name: &str) -> Option<f64> {
        self.sum(name, &[])
    }

    /// The cumulative buckets of histogram `name` (`name_bucket`), summed over its other labels,
    /// ordered by upper bound.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let mut by_le: Vec<(f64, f64)> = Vec::new();
        for (labels, count) in self
            .series
            .get(&format!("{name}_bucket"))
            .into_iter()
            .flatten()
        {
            let Some(le) = label(labels, "le").and_then(|le| match le {
                "+Inf" => Some(f64::INFINITY),
                le => le.parse().ok(),
            }) else {
                continue;
            };
            match by_le.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += count,
                None => by_le.push((le, *count)),
            }
        }
        by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
        by_le
    }
}

/// The value of label `key` in `k1="v1",k2="v2"` (values without escaped quotes, as ours are).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    while !rest.is_empty() {
        let (k, after) = rest.split_once("=\"")?;
        let (v, after) = after.split_once('"')?;
        if k.trim() == key {
            return Some(v);
        }
        rest = after.trim_start_matches(',');
    }
    None
}

/// The increase of a counter from `old` to `new`; a counter that went down was reset (its
/// process restarted) and counts from 0, as Prometheus's `increase()` does.
pub fn increase(old: f64, new: f64) -> f64 {
    if new >= old {
        new - old
    } else {
        new
    }
}

/// The `q` quantile of the observations between two readings of cumulative buckets (as
/// Prometheus's `histogram_quantile` over an increase: linear within the bucket it falls in,
/// the highest finite bound when it falls in `+Inf`); `None` when nothing was observed.
pub fn quantile(q: f64, old: &[(f64, f64)], new: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = new
        .iter()
        .map(|&(le, count)| {
            let before = old.iter().find(|(b, _)| *b == le).map_or(0.0, |&(_, c)| c);
            (le, increase(before, count))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in &delta {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let fraction = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP sequencer_lag log end minus committed
# TYPE sequencer_lag gauge
sequencer_lag 12
sequencer_decisions_total{outcome="held"} 30
sequencer_decisions_total{outcome="sold_out"} 5
ingress_http_requests_total{method="GET",route="/v1/skus/{sku}",status="200"} 7
ingress_http_requests_total{method="POST",route="/v1/reservations",status="503"} 2
sequencer_batch_commit_seconds_bucket{le="0.01"} 80
sequencer_batch_commit_seconds_bucket{le="0.05"} 99
sequencer_batch_commit_seconds_bucket{le="+Inf"} 100
sequencer_batch_commit_seconds_sum 1.5
sequencer_batch_commit_seconds_count 100
broken line
"#;

    #[test]
    fn reads_values_sums_by_label_and_buckets() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.value("sequencer_lag"), Some(12.0));
        assert_eq!(s.value("sequencer_decisions_total"), Some(35.0));
        assert_eq!(
            s.sum("sequencer_decisions_total", &[("outcome", "held")]),
            Some(30.0)
        );
        assert_eq!(
            s.sum("ingress_http_requests_total", &[("status", "503")]),
            Some(2.0)
        );
        assert_eq!(
            s.sum("ingress_http_requests_total", &[("status", "504")]),
            None
        );
        assert_eq!(s.value("nothing"), None);
        assert_eq!(
            s.buckets("sequencer_batch_commit_seconds"),
            vec![(0.01, 80.0), (0.05, 99.0), (f64::INFINITY, 100.0)]
        );
    }

    #[test]
    fn quantiles_of_the_observations_between_two_readings() {
        let old = [(0.01, 10.0), (0.05, 10.0), (f64::INFINITY, 10.0)];
        let new = [(0.01, 60.0), (0.05, 110.0), (f64::INFINITY, 110.0)];
        // 100 new observations: 50 up to 10 ms, 50 in (10, 50] ms.
        assert_eq!(quantile(0.5, &old, &new), Some(0.01));
        let p99 = quantile(0.99, &old, &new).unwrap();
        assert!((p99 - 0.0492).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.5, &new, &new), None, "nothing observed");
        // Beyond the last finite bound: that bound.
        let over = [(0.01, 0.0), (0.05, 0.0), (f64::INFINITY, 4.0)];
        assert_eq!(quantile(0.99, &[], &over), Some(0.05));
        // A restarted process counts from zero.
        assert_eq!(increase(100.0, 3.0), 3.0);
        assert_eq!(increase(3.0, 5.0), 2.0);
    }
}
