//! The failover drill: a fresh stack with two sequencers, then N rounds of load with a fault on
//! the active sequencer (SIGKILL, SIGSTOP past the lease then SIGCONT, SIGTERM), printing each
//! round's takeover gap and invariant checks. Bounded in time and loopback only.
//!
//! With `--partitions P` (partitioned mode, e.g. 4): the requests topic has P partitions, each
//! with its own database; both sequencer processes serve all of them and each leads half. Every
//! round loads one SKU per partition, faults the process that leads partition 0, measures the
//! gap of every partition it led, checks that the others kept their writer, and verifies every
//! partition's SKU and audit.
//!
//! Usage: drill [--rounds N] [--requests-per-round N] [--concurrency N] [--partitions P]

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use systest::load::{
    now_ms, takeover_gap_ms, takeover_gap_ms_in, under_load, verify, wait_decided, Load, UnderLoad,
};
use systest::{Options, Stack};

const FAULTS: [&str; 3] = ["KILL", "STOP", "TERM"];

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| -> anyhow::Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => args
                .get(i + 1)
                .context("flag without value")?
                .parse()
                .context(name.to_owned()),
            None => Ok(default),
        }
    };
    let rounds = flag("--rounds", 3)?;
    let per_round = flag("--requests-per-round", 2_000)?;
    let concurrency = flag("--concurrency", 32)?;
    let partitions = flag("--partitions", 1)? as u32;
    ensure!((1..=100).contains(&rounds), "--rounds must be 1..=100");
    ensure!(
        (1..=16).contains(&partitions),
        "--partitions must be 1..=16"
    );
    let mut options = Options {
        sequencers: 2,
        outcome_timeout_ms: 4_000,
        partitions,
        ..Options::default()
    };
    if partitions > 1 {
        let (even, odd): (Vec<u32>, Vec<u32>) = (0..partitions).partition(|p| p % 2 == 0);
        let list = |v: Vec<u32>| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        options = options
            .with_sequencer_env(0, "LEAD_PARTITIONS", &list(even))
            .with_sequencer_env(1, "LEAD_PARTITIONS", &list(odd));
        let stack = Stack::start("drill_partitions", options).await?;
        return partitioned(stack, rounds, per_round, concurrency).await;
    }
    let lease = Duration::from_millis(options.lease_ms);
    let mut stack = Stack::start("drill", options).await?;
    println!("drill: {rounds} rounds, {per_round} requests each at {concurrency} in flight, lease {lease:?}");
    println!(
        "{:>5} {:>6} {:>9} {:>8} {:>6} {:>7} {:>5} {:>5} {:>6}  audit",
        "round", "fault", "gap_ms", "answers", "held", "refused", "504", "5xx", "exit"
    );
    let mut gaps = Vec::new();
    let started = Instant::now();
    for round in 1..=rounds {
        let fault = FAULTS[(round - 1) % FAULTS.len()];
        let sku = format!("drill-{round}");
        // Fewer units than buyers, so both grants and sold_out are exercised every round.
        let UnderLoad {
            load,
            active,
            old_epoch,
        } = under_load(
            &stack,
            &sku,
            (per_round * 3 / 4) as u64,
            per_round,
            concurrency,
            (per_round / 5) as i64,
        )
        .await?;

        let fault_at = now_ms();
        stack.signal_sequencer(active, fault)?;
        let gap = takeover_gap_ms(&stack, old_epoch, fault_at, Duration::from_secs(30)).await?;
        let exit = match fault {
            "KILL" => "killed".to_owned(),
            "STOP" => {
                tokio::time::sleep(lease).await;
                stack.signal_sequencer(active, "CONT")?;
                let code = stack.wait_sequencer_exit(active, Duration::from_secs(30))?;
                ensure!(
                    code == Some(3),
                    "a woken deposed leader must exit 3, got {code:?}"
                );
                "3".to_owned()
            }
            _ => {
                let code = stack.wait_sequencer_exit(active, Duration::from_secs(30))?;
                ensure!(code == Some(0), "SIGTERM must exit 0, got {code:?}");
                "0".to_owned()
            }
        };
        // The supervisor's part: the stopped process comes back and must rejoin as standby.
        stack.spawn_sequencer(active)?;
        stack
            .wait_role(active, "standby", Duration::from_secs(30))
            .await?;
        let answers = load.wait().await;
        let verdict = verify(&stack, &sku, &answers).await?;
        let held: i64 = sqlx::query_scalar("SELECT held FROM skus WHERE sku = $1")
            .bind(&sku)
            .fetch_one(&stack.pool)
            .await?;
        if held as usize > per_round * 3 / 4 {
            bail!(
                "round {round}: oversold: {held} held of {}",
                per_round * 3 / 4
            );
        }
        println!(
            "{:>5} {:>6} {:>9} {:>8} {:>6} {:>7} {:>5} {:>5} {:>6}  clean",
            round,
            fault,
            gap,
            answers.len(),
            verdict.held,
            verdict.refused,
            verdict.timed_out,
            verdict.errors_5xx,
            exit
        );
        gaps.push((fault, gap));
    }
    let mut sorted: Vec<i64> = gaps.iter().map(|g| g.1).collect();
    sorted.sort();
    println!("takeover gap ms: min {} median {} max {}; all rounds: audit clean, no oversell, every definitive answer recorded once, every 504 retried to its original outcome; {:.0} s",
             sorted[0], sorted[sorted.len() / 2], sorted[sorted.len() - 1], started.elapsed().as_secs_f64());
    Ok(())
}

/// For each partition, the process that reports itself active for it (`None`: none yet).
async fn leaders(stack: &Stack, partitions: u32) -> Vec<Option<usize>> {
    let mut leader = vec![None; partitions as usize];
    for i in 0..stack.sequencers.len() {
        let Some(doc) = stack.sequencer_status(i).await else {
            continue;
        };
        for p in doc["partitions"].as_array().into_iter().flatten() {
            if p["role"] == "active" {
                leader[p["partition"].as_u64().unwrap_or(0) as usize] = Some(i);
            }
        }
    }
    leader
}

async fn epoch_of(stack: &Stack, p: usize) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT epoch FROM sequencer_state")
        .fetch_one(&stack.pools[p])
        .await?)
}

/// The partitioned rounds (see the module's doc).
async fn partitioned(
    mut stack: Stack,
    rounds: usize,
    per_round: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let partitions = stack.options.partitions;
    let n = partitions as usize;
    println!(
        "drill, partitioned: {partitions} partitions on 2 processes, {rounds} rounds, {per_round} \
         requests each ({} per partition) at {concurrency} in flight",
        per_round / n
    );
    println!(
        "{:>5} {:>6} {:>7} {:>22} {:>8} {:>6} {:>7} {:>5} {:>5}  others / audit",
        "round",
        "fault",
        "process",
        "gap_ms (its partitions)",
        "answers",
        "held",
        "refused",
        "504",
        "5xx"
    );
    let started = Instant::now();
    let mut gaps = Vec::new();
    for round in 1..=rounds {
        let fault = FAULTS[(round - 1) % FAULTS.len()];
        // One SKU per partition, fewer units than buyers.
        let mut skus: Vec<Option<String>> = vec![None; n];
        for k in 0.. {
            let name = format!("drill-{round}-{k}");
            let p = wire::partition::partition_of(&name, partitions) as usize;
            skus[p].get_or_insert(name);
            if skus.iter().all(Option::is_some) {
                break;
            }
        }
        let skus: Vec<String> = skus.into_iter().map(Option::unwrap).collect();
        let buyers = per_round / n;
        for sku in &skus {
            stack
                .put_sku(sku, (buyers * 3 / 4) as u64, 1, 300.0)
                .await?;
        }
        let loads: Vec<Load> = skus
            .iter()
            .map(|sku| {
                let c = (concurrency / n).max(1);
                Load::start(&stack, sku, sku, buyers, c, Duration::from_secs(120))
            })
            .collect();
        wait_decided(&stack, &skus[0], (buyers / 5) as i64).await?;
        let leader = leaders(&stack, partitions).await;
        let victim = leader[0].context("no leader for partition 0")?;
        let led: Vec<usize> = (0..n).filter(|&p| leader[p] == Some(victim)).collect();
        let mut epochs = Vec::new();
        for p in 0..n {
            epochs.push(epoch_of(&stack, p).await?);
        }
        let fault_at = now_ms();
        stack.signal_sequencer(victim, fault)?;
        let mut round_gaps = Vec::new();
        for &p in &led {
            let gap = takeover_gap_ms_in(
                &stack.pools[p],
                epochs[p],
                fault_at,
                Duration::from_secs(30),
            )
            .await?;
            round_gaps.push(gap);
            gaps.push(gap);
        }
        for p in (0..n).filter(|p| !led.contains(p)) {
            ensure!(
                epoch_of(&stack, p).await? == epochs[p],
                "round {round}: partition {p} changed writer although its leader was not faulted"
            );
        }
        match fault {
            "KILL" => {}
            "STOP" => {
                tokio::time::sleep(Duration::from_millis(stack.options.lease_ms)).await;
                stack.signal_sequencer(victim, "CONT")?;
                let code = stack.wait_sequencer_exit(victim, Duration::from_secs(30))?;
                ensure!(
                    code == Some(3),
                    "a woken deposed leader must exit 3, got {code:?}"
                );
            }
            _ => {
                let code = stack.wait_sequencer_exit(victim, Duration::from_secs(30))?;
                ensure!(code == Some(0), "SIGTERM must exit 0, got {code:?}");
            }
        }
        // Restarted, it follows every partition and gets its preferred half handed back.
        stack.spawn_sequencer(victim)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let leader = leaders(&stack, partitions).await;
            if (0..n).all(|p| leader[p] == Some(p % 2)) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "round {round}: leaderships not back to even and odd: {leader:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (mut answers, mut held, mut refused, mut late, mut errors) = (0, 0, 0, 0, 0);
        for (sku, load) in skus.iter().zip(loads) {
            let got = load.wait().await;
            let verdict = verify(&stack, sku, &got).await?;
            ensure!(
                verdict.held <= buyers * 3 / 4,
                "round {round}: {sku} oversold"
            );
            answers += got.len();
            held += verdict.held;
            refused += verdict.refused;
            late += verdict.timed_out;
            errors += verdict.errors_5xx;
        }
        let shown = format!("{round_gaps:?} ({led:?})");
        println!(
            "{round:>5} {fault:>6} {:>7} {shown:>22} {answers:>8} {held:>6} {refused:>7} {late:>5} {errors:>5}  kept their writer / clean",
            stack.sequencers[victim].node_id
        );
    }
    gaps.sort();
    println!(
        "takeover gap ms over every faulted partition: min {} median {} max {}; every round: the \
         other partitions kept their writer, audit clean on every partition, no oversell, every \
         definitive answer recorded once, every 504 retried to its original outcome; {:.0} s",
        gaps[0],
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1],
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
