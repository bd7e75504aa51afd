//! Where a write's latency goes, hop by hop: the histograms the ingress and the sequencer export
//! on `/metrics` (docs/OPERATIONS.md), scraped before and after a load phase. The difference of
//! each histogram's sum and count is the mean of that hop over the phase; the difference of its
//! buckets bounds the p99 (the upper bound of the bucket holding it).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::http;

/// The hops, in the order a write meets them, and the series that times each.
pub const HOPS: &[(&str, &str)] = &[
    (
        "ingress append (produce -> broker ack)",
        "ingress_append_seconds",
    ),
    (
        "produce -> taken by the decide loop",
        "sequencer_request_wait_seconds",
    ),
    ("decide (per batch)", "sequencer_batch_decide_seconds"),
    ("commit (per batch)", "sequencer_batch_commit_seconds"),
    (
        "outcome published -> read by ingress",
        "ingress_outcome_delay_seconds",
    ),
    (
        "end to end (POST /v1/reservations)",
        "ingress_http_request_duration_seconds",
    ),
];

/// One histogram as scraped: cumulative bucket counts by upper bound, sum and count. Series with
/// labels (the HTTP duration has method and route) are kept only for the reservations route.
#[derive(Clone, Debug, Default)]
struct Scraped {
    buckets: BTreeMap<u64, f64>,
    sum: f64,
    count: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot(BTreeMap<&'static str, Scraped>);

#[derive(Serialize, Clone, Debug)]
pub struct Hop {
    pub hop: String,
    pub series: String,
    pub samples: u64,
    pub mean_ms: f64,
    /// Upper bound of the bucket holding the 99th percentile (None past the last bucket).
    pub p99_le_ms: Option<f64>,
}

/// Scrapes every `/metrics` URL (`http://127.0.0.1:port/metrics`); unreachable ones are skipped.
pub async fn scrape(urls: &[String]) -> Snapshot {
    let mut snap = Snapshot::default();
    for url in urls {
        let Ok(addr) = http::parse_target(url) else {
            continue;
        };
        let path = url
            .split_once("//")
            .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
            .unwrap_or("/metrics");
        if let Ok(resp) = http::once(addr, "GET", path, "", b"", Duration::from_secs(5)).await {
            parse_into(&mut snap, &String::from_utf8_lossy(&resp.body));
        }
    }
    snap
}

fn parse_into(snap: &mut Snapshot, text: &str) {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match name_labels.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (name_labels, ""),
        };
        if labels.contains("route=") && !labels.contains("route=\"/v1/reservations\"") {
            continue;
        }
        if labels.contains("method=") && !labels.contains("method=\"POST\"") {
            continue;
        }
        for &(_, series) in HOPS {
            let Some(suffix) = name.strip_prefix(series) else {
                continue;
            };
            let h = snap.0.entry(series).or_default();
            match suffix {
                "_sum" => h.sum += value,
                "_count" => h.count += value,
                "_bucket" => {
                    let le = labels
                        .split(',')
                        .find_map(|kv| kv.trim().strip_prefix("le=\""))
                        .map(|v| v.trim_end_matches('"'));
                    let bound = match le {
                        Some("+Inf") => u64::MAX,
                        Some(v) => v.parse::<f64>().map_or(u64::MAX, |s| (s * 1e6) as u64),
                        None => continue,
                    };
                    *h.buckets.entry(bound).or_default() += value;
                }
                _ => {}
            }
        }
    }
}

/// The hops between two snapshots (only hops with samples in between).
pub fn between(before: &Snapshot, after: &Snapshot) -> Vec<Hop> {
    let mut out = Vec::new();
    for &(hop, series) in HOPS {
        let Some(a) = after.0.get(series) else {
            continue;
        };
        let b = before.0.get(series).cloned().unwrap_or_default();
        let count = a.count - b.count;
        if count < 1.0 {
            continue;
        }
        let target = 0.99 * count;
        let p99_le_ms = a
            .buckets
            .iter()
            .find(|(le, &c)| c - b.buckets.get(le).copied().unwrap_or(0.0) >= target)
            .and_then(|(&le, _)| (le != u64::MAX).then_some(le as f64 / 1000.0));
        out.push(Hop {
            hop: hop.to_owned(),
            series: series.to_owned(),
            samples: count as u64,
            mean_ms: (a.sum - b.sum) / count * 1000.0,
            p99_le_ms,
        });
    }
    out
}

pub fn print(hops: &[Hop]) {
    if hops.is_empty() {
        return;
    }
    println!(
        "  {:<42} {:>9} {:>9} {:>10}",
        "hop", "samples", "mean ms", "p99 <= ms"
    );
    for h in hops {
        println!(
            "  {:<42} {:>9} {:>9.2} {:>10}",
            h.hop,
            h.samples,
            h.mean_ms,
            h.p99_le_ms.map_or("-".into(), |v| format!("{v}"))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# TYPE ingress_append_seconds histogram
ingress_append_seconds_bucket{le=\"0.005\"} 10
ingress_append_seconds_bucket{le=\"0.01\"} 10
ingress_append_seconds_bucket{le=\"+Inf\"} 10
ingress_append_seconds_sum 0.02
ingress_append_seconds_count 10
";
    const AFTER: &str = "ingress_append_seconds_bucket{le=\"0.005\"} 90
ingress_append_seconds_bucket{le=\"0.01\"} 109
ingress_append_seconds_bucket{le=\"+Inf\"} 110
ingress_append_seconds_sum 0.42
ingress_append_seconds_count 110
ingress_http_request_duration_seconds_sum{method=\"GET\",route=\"/v1/skus/{sku}\"} 99
ingress_http_request_duration_seconds_count{method=\"GET\",route=\"/v1/skus/{sku}\"} 1
";

    fn snap(text: &str) -> Snapshot {
        let mut s = Snapshot::default();
        parse_into(&mut s, text);
        s
    }

    #[test]
    fn the_difference_of_two_scrapes_gives_each_hops_mean_and_p99_bucket() {
        let hops = between(&snap(BEFORE), &snap(AFTER));
        assert_eq!(hops.len(), 1, "other routes are ignored: {hops:?}");
        let h = &hops[0];
        assert_eq!(h.samples, 100);
        assert!((h.mean_ms - 4.0).abs() < 1e-9, "{}", h.mean_ms);
        // 80 of the 100 new samples are <= 5 ms, 99 are <= 10 ms.
        assert_eq!(h.p99_le_ms, Some(10.0));
    }
}
