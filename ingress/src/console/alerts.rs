//! The alerts of docs/OPERATIONS.md ("Alerts worth setting"), evaluated by the ingress over its
//! own samples, for the ops console. The Prometheus rules in deploy/prometheus/alerts.yml are the
//! ones to page on; these show an operator, on the page, what they would say now. Where this
//! ingress cannot measure what an alert needs (the sequencers' own series without
//! SEQUENCER_STATUS_URLS), the alert is `unknown`, never `ok`.

use super::prom::quantile;
use super::sample::{History, PeerTick, Tick};
use super::summary::AlertOut;
use crate::http::rfc3339;

const MINUTE: i64 = 60_000;

/// What a check found: `Ok(Some(detail))` the condition holds, `Ok(None)` it does not,
/// `Err(why)` it cannot be evaluated here.
type Found = Result<Option<String>, String>;

pub struct Alert {
    /// Its name in docs/OPERATIONS.md.
    pub name: &'static str,
    pub severity: &'static str,
    /// How long the condition must hold before the alert fires (a rule's `for`).
    pub hold_ms: i64,
    pub condition: &'static str,
    pub runbook: &'static str,
    check: fn(&History) -> Found,
}

/// Every alert of docs/OPERATIONS.md, in its order.
pub const ALERTS: &[Alert] = &[
    Alert {
        name: "oversell",
        severity: "page",
        hold_ms: 0,
        condition: "a sequencer's sequencer_oversell_skus > 0",
        runbook: "Freeze; Audit",
        check: oversell,
    },
    Alert {
        name: "log lost",
        severity: "page",
        hold_ms: 0,
        condition: "a sequencer's sequencer_log_lost > 0 (role log_lost)",
        runbook: "Lost requests log",
        check: log_lost,
    },
    Alert {
        name: "no writer",
        severity: "page",
        hold_ms: 2_000,
        condition: "no sequencer reports role active for 2 s (without SEQUENCER_STATUS_URLS: \
                    the writer's lease in Postgres has lapsed for 2 s)",
        runbook: "Failover; No sequencer commits",
        check: no_writer,
    },
    Alert {
        name: "two writers claim",
        severity: "warning",
        hold_ms: 5_000,
        condition: "more than one sequencer reports role active for 5 s",
        runbook: "Failover",
        check: two_writers,
    },
    Alert {
        name: "lag",
        severity: "warning",
        hold_ms: 10_000,
        condition: "more than 25,000 requests wait in the log for 10 s",
        runbook: "Slow Postgres",
        check: lag,
    },
    Alert {
        name: "commit time",
        severity: "warning",
        hold_ms: MINUTE,
        condition: "a sequencer's p99 batch commit time over the last minute > 50 ms, for 1 min",
        runbook: "Slow Postgres",
        check: commit_time,
    },
    Alert {
        name: "commit retries",
        severity: "warning",
        hold_ms: 0,
        condition: "a sequencer retried a commit within the last minute",
        runbook: "Postgres down; Slow Postgres",
        check: commit_retries,
    },
    Alert {
        name: "stalled",
        severity: "page",
        hold_ms: 0,
        condition: "no batch committed for 30 s while the log's end moved within the last minute",
        runbook: "No sequencer commits; Stalled log reader",
        check: stalled,
    },
    Alert {
        name: "no sequencer",
        severity: "page",
        hold_ms: 0,
        condition: "this ingress refused a write with 503 no_sequencer within the last minute",
        runbook: "No sequencer commits",
        check: no_sequencer,
    },
    Alert {
        name: "connections",
        severity: "warning",
        hold_ms: 0,
        condition: "open connections above 80% of CONNECTIONS_MAX, or one refused within the \
                    last minute (this ingress)",
        runbook: "Connections refused; Slow clients cut off",
        check: connections,
    },
    Alert {
        name: "503 rate",
        severity: "warning",
        hold_ms: 0,
        condition: "more than 1% of this ingress's answers in the last minute were 503",
        runbook: "No sequencer commits",
        check: rate_503,
    },
    Alert {
        name: "checkpoints stalled",
        severity: "warning",
        hold_ms: MINUTE,
        condition: "a sequencer committed batches but wrote no checkpoint in the last 5 min, or \
                    failed to write one; for 1 min",
        runbook: "Cold start",
        check: checkpoints_stalled,
    },
    Alert {
        name: "slow start",
        severity: "warning",
        hold_ms: 0,
        condition: "a sequencer took more than 5 s to load its state, or refused a checkpoint \
                    since it started",
        runbook: "Cold start",
        check: slow_start,
    },
    Alert {
        name: "504 rate",
        severity: "warning",
        hold_ms: 0,
        condition: "this ingress answered 504 within the last minute",
        runbook: "Broker restart or crash; No sequencer commits",
        check: rate_504,
    },
];

/// The alerts' states from one tick to the next: since when each condition has held.
pub struct Alerting {
    since: Vec<Option<i64>>,
}

impl Default for Alerting {
    fn default() -> Self {
        Alerting {
            since: vec![None; ALERTS.len()],
        }
    }
}

impl Alerting {
    /// Evaluates every alert on the newest tick of `history`.
    pub fn evaluate(&mut self, history: &History) -> Vec<AlertOut> {
        let now = history.now().map_or(0, |t| t.at_ms);
        ALERTS
            .iter()
            .zip(self.since.iter_mut())
            .map(|(alert, since)| {
                let found = (alert.check)(history);
                let (state, detail) = match found {
                    Ok(Some(detail)) => {
                        let from = *since.get_or_insert(now);
                        let state = if now - from >= alert.hold_ms {
                            "firing"
                        } else {
                            "pending"
                        };
                        (state, Some(detail))
                    }
                    Ok(None) => {
                        *since = None;
                        ("ok", None)
                    }
                    Err(why) => {
                        *since = None;
                        ("unknown", Some(why))
                    }
                };
                AlertOut {
                    name: alert.name,
                    severity: alert.severity,
                    state,
                    condition: alert.condition,
                    detail,
                    runbook: alert.runbook,
                    since: since.map(rfc3339),
                }
            })
            .collect()
    }
}

fn newest(h: &History) -> Result<&Tick, String> {
    h.now().ok_or_else(|| "nothing sampled yet".to_owned())
}

/// The sequencers that answered this second, with their index; unknown when none is configured
/// or none answered.
fn answering(h: &History) -> Result<Vec<(usize, &PeerTick)>, String> {
    let now = newest(h)?;
    if now.peers.is_empty() {
        return Err("no SEQUENCER_STATUS_URLS configured on this ingress".into());
    }
    let answering: Vec<_> = now
        .peers
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((i, p.as_ref()?)))
        .collect();
    if answering.is_empty() {
        return Err("no sequencer answered".into());
    }
    Ok(answering)
}

/// Holds when any sequencer has something to say (`f`), with what each says.
fn any_sequencer(h: &History, f: impl Fn(usize, &PeerTick) -> Option<String>) -> Found {
    let found: Vec<String> = answering(h)?
        .into_iter()
        .filter_map(|(i, p)| f(i, p).map(|what| format!("{}: {what}", p.name(i))))
        .collect();
    Ok((!found.is_empty()).then(|| found.join("; ")))
}

fn oversell(h: &History) -> Found {
    any_sequencer(h, |_, p| {
        (p.oversell_skus > 0.0).then(|| format!("{} SKU(s) do not add up", p.oversell_skus))
    })
}

fn log_lost(h: &History) -> Found {
    any_sequencer(h, |_, p| {
        (p.log_lost > 0.0 || p.status.role.as_deref() == Some("log_lost"))
            .then(|| "the requests log is lost".to_owned())
    })
}

fn active_count(now: &Tick) -> usize {
    now.peers.iter().flatten().filter(|p| p.is_active()).count()
}

fn no_writer(h: &History) -> Found {
    let now = newest(h)?;
    if !now.peers.is_empty() {
        return Ok((active_count(now) == 0).then(|| {
            format!(
                "none of the {} sequencers reports role active",
                now.peers.len()
            )
        }));
    }
    let writer = now.writer.as_ref().ok_or("Postgres did not answer")?;
    Ok((writer.lease_remaining_ms < 0).then(|| {
        format!(
            "the writer's lease lapsed {} ms ago",
            -writer.lease_remaining_ms
        )
    }))
}

fn two_writers(h: &History) -> Found {
    let now = newest(h)?;
    answering(h)?;
    let active = active_count(now);
    Ok((active > 1).then(|| format!("{active} sequencers report role active")))
}

fn lag(h: &History) -> Found {
    let lag = newest(h)?
        .ingress
        .log
        .lag
        .ok_or("no fresh measurement of the lag")?;
    Ok((lag > 25_000).then(|| format!("{lag} requests wait in the log")))
}

fn commit_time(h: &History) -> Found {
    any_sequencer(h, |i, p| {
        let start = h.peer_start(i, MINUTE)?;
        let p99 = quantile(0.99, &start.commit_buckets, &p.commit_buckets)?;
        (p99 > 0.05).then(|| format!("p99 commit {:.0} ms", p99 * 1000.0))
    })
}

fn commit_retries(h: &History) -> Found {
    any_sequencer(h, |i, _| {
        let n = h.peer_increase(i, MINUTE, |p| p.commit_retries)?;
        (n > 0.0).then(|| format!("{n} commit retries"))
    })
}

fn stalled(h: &History) -> Found {
    let writer = newest(h)?
        .writer
        .as_ref()
        .ok_or("Postgres did not answer")?;
    let Some(age) = writer.last_batch_age_ms else {
        return Ok(None);
    };
    let grown = h
        .increase(MINUTE, |t| t.ingress.log.end.map(|e| e as f64))
        .unwrap_or(0.0);
    Ok((age > 30_000 && grown > 0.0).then(|| {
        format!(
            "no batch for {} s while {grown} requests were appended",
            age / 1000
        )
    }))
}

/// Holds when this ingress's counter `f` grew within the last minute.
fn grew(h: &History, f: impl Fn(&Tick) -> f64, what: &str) -> Found {
    let n = h
        .increase(MINUTE, |t| Some(f(t)))
        .ok_or("nothing sampled yet")?;
    Ok((n > 0.0).then(|| format!("{n} {what} in the last minute")))
}

fn no_sequencer(h: &History) -> Found {
    grew(
        h,
        |t| t.ingress.answers.refused_no_sequencer,
        "writes refused no_sequencer",
    )
}

fn connections(h: &History) -> Found {
    let now = &newest(h)?.ingress;
    if now.connections.max > 0.0 && now.connections.open > 0.8 * now.connections.max {
        return Ok(Some(format!(
            "{} of {} connections open",
            now.connections.open, now.connections.max
        )));
    }
    grew(h, |t| t.ingress.connections.refused, "connections refused")
}

fn rate_503(h: &History) -> Found {
    let all = h
        .increase(MINUTE, |t| Some(t.ingress.answers.all))
        .ok_or("nothing sampled yet")?;
    let refused = h
        .increase(MINUTE, |t| Some(t.ingress.answers.status_503))
        .unwrap_or(0.0);
    Ok((all > 0.0 && refused / all > 0.01).then(|| format!("{refused} of {all} answers were 503")))
}

fn checkpoints_stalled(h: &History) -> Found {
    const WINDOW: i64 = 5 * MINUTE;
    any_sequencer(h, |i, _| {
        let failed = h.peer_increase(i, WINDOW, |p| p.checkpoint_failures)?;
        if failed > 0.0 {
            return Some(format!("{failed} checkpoints failed"));
        }
        let batches = h.peer_increase(i, WINDOW, |p| p.batches)?;
        let checkpoints = h.peer_increase(i, WINDOW, |p| p.checkpoints)?;
        (batches > 0.0 && checkpoints == 0.0)
            .then(|| format!("{batches} batches and no checkpoint"))
    })
}

fn slow_start(h: &History) -> Found {
    any_sequencer(h, |_, p| {
        if p.checkpoint_load_failures > 0.0 {
            Some("refused a checkpoint and read the rows".to_owned())
        } else {
            (p.state_load_seconds > 5.0)
                .then(|| format!("loaded its state in {:.1} s", p.state_load_seconds))
        }
    })
}

fn rate_504(h: &History) -> Found {
    grew(h, |t| t.ingress.answers.status_504, "answers 504")
}

#[cfg(test)]
mod tests {
    use persistence::reads::WriterView;

    use super::super::sample::{PeerStatus, Tick};
    use super::*;

    fn peer(role: &str) -> Option<PeerTick> {
        Some(PeerTick {
            status: PeerStatus {
                node_id: Some(format!("seq-{role}")),
                role: Some(role.to_owned()),
                ..PeerStatus::default()
            },
            ..PeerTick::default()
        })
    }

    fn state<'a>(out: &'a [AlertOut], name: &str) -> (&'a str, Option<&'a str>) {
        let a = out.iter().find(|a| a.name == name).unwrap();
        (a.state, a.detail.as_deref())
    }

    #[test]
    fn every_alert_of_the_operations_doc_is_evaluated_and_no_other() {
        let doc = include_str!("../../../docs/OPERATIONS.md");
        let section = doc
            .split("## Alerts worth setting")
            .nth(1)
            .unwrap()
            .split("\n## ")
            .next()
            .unwrap();
        let documented: Vec<&str> = section
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| alert") && !l.contains("---"))
            .map(|l| l.split('|').nth(1).unwrap().trim())
            .collect();
        let here: Vec<&str> = ALERTS.iter().map(|a| a.name).collect();
        assert_eq!(here, documented);
        // Every runbook named is a bold title of the doc's runbooks.
        let runbooks = doc.split("## Runbooks").nth(1).unwrap();
        for alert in ALERTS {
            for title in alert.runbook.split("; ") {
                assert!(
                    runbooks.contains(&format!("\n**{title}")),
                    "{}: no runbook {title:?}",
                    alert.name
                );
            }
        }
    }

    #[test]
    fn conditions_hold_for_their_time_before_firing_and_unknown_is_not_ok() {
        let mut history = History::default();
        let mut alerting = Alerting::default();
        let tick = |at_ms: i64, peers: Vec<Option<PeerTick>>| Tick {
            at_ms,
            peers,
            ..Tick::default()
        };
        history.push(tick(1_000, vec![peer("active"), peer("active")]));
        let out = alerting.evaluate(&history);
        assert_eq!(out.len(), ALERTS.len());
        assert_eq!(
            state(&out, "two writers claim"),
            ("pending", Some("2 sequencers report role active"))
        );
        assert_eq!(state(&out, "no writer").0, "ok");
        assert_eq!(state(&out, "lag").0, "unknown");
        history.push(tick(6_000, vec![peer("active"), peer("active")]));
        assert_eq!(
            state(&alerting.evaluate(&history), "two writers claim").0,
            "firing"
        );
        // Cleared, then a sequencer that does not answer counts as not active.
        history.push(tick(7_000, vec![peer("standby"), None]));
        let out = alerting.evaluate(&history);
        assert_eq!(state(&out, "two writers claim").0, "ok");
        assert_eq!(state(&out, "no writer").0, "pending");
        history.push(tick(9_000, vec![peer("standby"), None]));
        assert_eq!(
            state(&alerting.evaluate(&history), "no writer"),
            (
                "firing",
                Some("none of the 2 sequencers reports role active")
            )
        );
    }

    #[test]
    fn without_sequencers_configured_the_lease_tells_and_their_series_are_unknown() {
        let mut history = History::default();
        let mut alerting = Alerting::default();
        let writer = |lease_remaining_ms| WriterView {
            epoch: 3,
            leader: None,
            lease_remaining_ms,
            next_offset: 10,
            batch_seq: 2,
            last_batch_age_ms: Some(100),
        };
        history.push(Tick {
            at_ms: 0,
            writer: Some(writer(-5_000)),
            ..Tick::default()
        });
        assert_eq!(
            state(&alerting.evaluate(&history), "no writer").0,
            "pending"
        );
        history.push(Tick {
            at_ms: 2_000,
            writer: Some(writer(-7_000)),
            ..Tick::default()
        });
        let out = alerting.evaluate(&history);
        assert_eq!(
            state(&out, "no writer"),
            ("firing", Some("the writer's lease lapsed 7000 ms ago"))
        );
        for name in ["oversell", "commit time", "two writers claim"] {
            assert_eq!(
                state(&out, name),
                (
                    "unknown",
                    Some("no SEQUENCER_STATUS_URLS configured on this ingress")
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn rates_and_counters_over_the_last_minute() {
        let mut history = History::default();
        let mut alerting = Alerting::default();
        let mut t = Tick {
            at_ms: 0,
            peers: vec![peer("active")],
            ..Tick::default()
        };
        t.ingress.answers.all = 1_000.0;
        t.ingress.connections.max = 100.0;
        history.push(t.clone());
        t.at_ms = 30_000;
        t.ingress.answers.all = 2_000.0;
        t.ingress.answers.status_503 = 20.0;
        t.ingress.answers.status_504 = 1.0;
        t.ingress.connections.open = 81.0;
        // A counter that appears (its first increment) counts from 0.
        t.peers[0].as_mut().unwrap().commit_retries = 2.0;
        history.push(t.clone());
        let out = alerting.evaluate(&history);
        assert_eq!(
            state(&out, "503 rate"),
            ("firing", Some("20 of 1000 answers were 503"))
        );
        assert_eq!(state(&out, "504 rate").0, "firing");
        assert_eq!(
            state(&out, "connections"),
            ("firing", Some("81 of 100 connections open"))
        );
        assert_eq!(
            state(&out, "commit retries"),
            ("firing", Some("seq-active: 2 commit retries"))
        );
        // A minute later, nothing new: the first tick is out of the window.
        t.at_ms = 91_000;
        t.ingress.connections.open = 10.0;
        history.push(t.clone());
        let out = alerting.evaluate(&history);
        for name in ["503 rate", "504 rate", "connections", "commit retries"] {
            assert_eq!(state(&out, name).0, "ok", "{name}");
        }
    }
}
