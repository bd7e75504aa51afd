//! Scale-out on the requests topic's partitions, on the real path (HTTP, Kafka, Postgres): four
//! partitions, each with its own database and fenced writer, served by two sequencer processes
//! that each lead two. One process is SIGKILLed under load on 40 SKUs spread over every
//! partition; restarted, it gets its two partitions handed back. Takeover gaps are printed
//! (measured), never asserted.

use std::time::{Duration, Instant};

use systest::load::{now_ms, takeover_gap_ms_in, verify, Load};
use systest::{Options, Stack};

const PARTITIONS: u32 = 4;

/// For each partition, the index of the process that reports itself active for it, once every
/// partition has exactly one (waiting up to `within`).
async fn leaders(stack: &Stack, within: Duration) -> Vec<usize> {
    let deadline = Instant::now() + within;
    loop {
        let mut active: Vec<Vec<usize>> = vec![Vec::new(); PARTITIONS as usize];
        for i in 0..stack.sequencers.len() {
            let Some(doc) = stack.sequencer_status(i).await else {
                continue;
            };
            for p in doc["partitions"].as_array().into_iter().flatten() {
                if p["role"] == "active" {
                    active[p["partition"].as_u64().unwrap() as usize].push(i);
                }
            }
        }
        if active.iter().all(|a| a.len() == 1) {
            return active.into_iter().map(|a| a[0]).collect();
        }
        assert!(
            Instant::now() < deadline,
            "not one leader per partition within {within:?}: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn epoch_of(stack: &Stack, p: usize) -> i64 {
    sqlx::query_scalar("SELECT epoch FROM sequencer_state")
        .fetch_one(&stack.pools[p])
        .await
        .unwrap()
}

/// Batches partition `p` committed with a decision time in `[from_ms, to_ms)`, and the longest
/// pause between two of them (ms).
async fn timeline(stack: &Stack, p: usize, from_ms: i64, to_ms: i64) -> (usize, i64) {
    let at: Vec<f64> = sqlx::query_scalar(
        "SELECT (EXTRACT(EPOCH FROM decided_at) * 1000)::float8 FROM batches
          WHERE decided_at >= to_timestamp($1 / 1000.0) AND decided_at < to_timestamp($2 / 1000.0)
          ORDER BY batch_seq",
    )
    .bind(from_ms as f64)
    .bind(to_ms as f64)
    .fetch_all(&stack.pools[p])
    .await
    .unwrap();
    let longest = at
        .windows(2)
        .map(|w| (w[1] - w[0]) as i64)
        .max()
        .unwrap_or(0);
    (at.len(), longest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_one_process_moves_its_partitions_while_the_others_keep_deciding() {
    let options = Options::sequencers(2)
        .with_partitions(PARTITIONS)
        .with_outcome_timeout_ms(4_000)
        .with_sequencer_env(0, "LEAD_PARTITIONS", "0,1")
        .with_sequencer_env(1, "LEAD_PARTITIONS", "2,3");
    let mut stack = Stack::start("partitions_kill", options).await.unwrap();
    assert_eq!(
        leaders(&stack, Duration::from_secs(30)).await,
        [0, 0, 1, 1],
        "each process leads the partitions it prefers"
    );

    let skus: Vec<String> = (0..40).map(|i| format!("sku-{i}")).collect();
    let mut per_partition = [0; PARTITIONS as usize];
    for sku in &skus {
        per_partition[wire::partition::partition_of(sku, PARTITIONS) as usize] += 1;
        stack.put_sku(sku, 60, 1, 300.0).await.unwrap();
    }
    assert!(per_partition.iter().all(|&n| n > 0), "{per_partition:?}");
    // Each SKU's row is in its partition's database and nowhere else.
    for (p, pool) in stack.pools.iter().enumerate() {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM skus")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(n, per_partition[p], "SKUs stored in partition {p}");
    }

    let loads: Vec<(String, Load)> = skus
        .iter()
        .map(|sku| {
            let load = Load::start(&stack, sku, sku, 100, 3, Duration::from_secs(90));
            (sku.clone(), load)
        })
        .collect();
    // Every partition decides before the fault.
    for (p, pool) in stack.pools.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM batches")
                .fetch_one(pool)
                .await
                .unwrap();
            if n >= 5 {
                break;
            }
            assert!(Instant::now() < deadline, "partition {p}: {n} batches");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let before: Vec<i64> =
        futures_util::future::join_all((0..PARTITIONS as usize).map(|p| epoch_of(&stack, p))).await;

    let killed_at = now_ms();
    stack.signal_sequencer(0, "KILL").unwrap();
    let mut gaps = Vec::new();
    for p in [0usize, 1] {
        let gap = takeover_gap_ms_in(
            &stack.pools[p],
            before[p],
            killed_at,
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        gaps.push(gap);
    }
    let taken_over_at = killed_at + gaps.iter().copied().max().unwrap();
    assert_eq!(
        leaders(&stack, Duration::from_secs(10)).await,
        [1, 1, 1, 1],
        "the survivor leads every partition"
    );
    for p in [2usize, 3] {
        assert_eq!(
            epoch_of(&stack, p).await,
            before[p],
            "partition {p} kept its writer: no takeover, no fence"
        );
        // While partitions 0 and 1 had no writer, these went on committing.
        let (batches, _) = timeline(&stack, p, killed_at, taken_over_at).await;
        assert!(
            batches > 0,
            "partition {p} committed nothing between the kill and the takeover"
        );
    }
    let mut longest = Vec::new();
    for p in 2..PARTITIONS as usize {
        longest.push(
            timeline(&stack, p, killed_at - 1_000, taken_over_at + 1_000)
                .await
                .1,
        );
    }

    // The killed process, restarted, follows every partition and asks for its own two back:
    // the survivor hands them over (finishing its batch, releasing the lease).
    let before_handback: Vec<i64> =
        futures_util::future::join_all((0..PARTITIONS as usize).map(|p| epoch_of(&stack, p))).await;
    stack.spawn_sequencer(0).unwrap();
    assert_eq!(
        leaders(&stack, Duration::from_secs(30)).await,
        [1, 1, 1, 1],
        "no partition is without a writer while the restarted process loads"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while leaders(&stack, Duration::from_secs(10)).await != [0, 0, 1, 1] {
        assert!(
            Instant::now() < deadline,
            "the restarted process never got its partitions back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (p, &was) in before_handback.iter().enumerate() {
        let now = epoch_of(&stack, p).await;
        if p < 2 {
            assert!(now > was, "partition {p} changed hands under a new epoch");
        } else {
            assert_eq!(now, was, "partition {p} stayed where it was");
        }
    }
    let mut held = 0;
    for (sku, load) in loads {
        let answers = load.wait().await;
        let verdict = verify(&stack, &sku, &answers).await.unwrap();
        assert!(verdict.held <= 60, "{sku}: {verdict:?}");
        held += verdict.held;
    }
    assert!(held > 0);
    println!(
        "partitions 0 and 1 decided again {gaps:?} ms after the SIGKILL; the longest pause \
         between batches of partitions 2 and 3 around it: {longest:?} ms; {held} units held \
         over 40 SKUs"
    );
}
