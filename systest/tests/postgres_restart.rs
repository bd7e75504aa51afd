//! Postgres restarted under load. This binary restarts the machine's Postgres cluster, so it is
//! alone in its file: cargo runs test binaries one after another, never beside this one.

use std::process::Command;
use std::time::Duration;

use systest::load::{under_load, verify, UnderLoad};
use systest::{Options, Stack};

/// Restarts the local Debian cluster (the one scripts/lib.sh starts or finds).
fn restart_postgres() {
    let versions = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian Postgres cluster under /etc/postgresql");
    let version = versions
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().into_string().unwrap())
        .max()
        .unwrap();
    let ok = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            "fast",
        ])
        .status()
        .expect("pg_ctlcluster runs")
        .success();
    assert!(ok, "pg_ctlcluster restart failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_postgres_under_load_pauses_writers_and_loses_nothing() {
    let options = Options::sequencers(2).with_outcome_timeout_ms(4_000);
    let mut stack = Stack::start("pg_restart", options).await.unwrap();
    let UnderLoad { load, .. } = under_load(&stack, "hot", 2_000, 3_000, 32, 300)
        .await
        .unwrap();
    restart_postgres();
    let answers = load.wait().await;

    // Whichever sequencer lost its lease during the outage has stopped (exit 3); like the
    // supervisor in scripts/up, start it again so the group is whole, then check everything.
    for i in stack.exited_sequencers().unwrap() {
        stack.spawn_sequencer(i).unwrap();
    }
    stack
        .wait_active_and_standby(Duration::from_secs(30))
        .await
        .unwrap();
    let verdict = verify(&stack, "hot", &answers).await.unwrap();
    println!("postgres restart under load: {verdict:?}");
    let row = stack.sku_row("hot").await.unwrap();
    assert_eq!(row["held"], 2_000, "all units held, none oversold");
}
