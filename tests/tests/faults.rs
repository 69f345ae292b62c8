//! Node faults with real processes and real signals: an edge node SIGKILLed
//! in the middle of its upload costs only its contribution to that round;
//! started again, it rejoins by itself and trains in the next rounds.

use std::time::{Duration, Instant};

use fedge_tests::{Daemon, coordinator_args, free_port, node_args, run_history, start_nodes};

fn small() -> Vec<(&'static str, String)> {
    vec![
        ("data.synthetic_train_samples", "900".into()),
        ("data.synthetic_test_samples", "200".into()),
    ]
}

/// Waits until `daemon`'s log contains `needle`.
fn wait_for_log(daemon: &Daemon, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if daemon.log_text().contains(needle) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("{} never logged `{needle}`:\n{}", daemon.name, daemon.log_text())
}

#[test]
fn a_node_killed_mid_upload_costs_only_its_contribution_and_rejoins() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let port = free_port();
    let mut settings = small();
    settings.extend([
        ("rounds", "3".to_string()),
        ("sampling.min_nodes", "2".into()),
        ("sampling.min_available", "3".into()),
        ("sampling.round_deadline", "\"5m\"".into()),
        // Round 1 waits for the slow node until it is killed mid-upload,
        // rather than closing without it as a straggler.
        ("sampling.straggler_factor", "0".into()),
        // The killed node's old stream may still look open when round 1
        // closes (its broken upload refused): it would then sit out a
        // cool-down as a node that held back, and this test is about its
        // rejoining.
        ("sampling.failure_cooldown_rounds", "0".into()),
    ]);
    let mut coord = Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &out, &settings),
        tmp.path(),
    )?;
    let mut nodes = start_nodes(tmp.path(), port, 2, 3, |_| small())?;
    // node-3 sits behind an emulated 40 kB/s uplink: its 640 kB update
    // takes about 16 s to send, so it can be killed mid-stream.
    let mut slow = small();
    slow.push(("upload_bytes_per_sec", "40000".into()));
    let mut victim = Daemon::start(
        "edge-node",
        "node-3",
        &node_args(port, "node-3", "2/3", &slow),
        tmp.path(),
    )?;
    wait_for_log(&victim, "local training done", Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(2));
    victim.child.kill()?; // SIGKILL
    victim.child.wait()?;
    let killed_log = victim.log_text();
    assert!(!killed_log.contains("update submitted"), "{killed_log}");
    drop(victim);

    // Round 1 closes with the other two; the restarted node joins round 2.
    let mut back = Daemon::start(
        "edge-node",
        "node-3-restarted",
        &node_args(port, "node-3", "2/3", &small()),
        tmp.path(),
    )?;
    let status = coord.wait(Duration::from_secs(300))?;
    anyhow::ensure!(status.success(), "coordinator failed:\n{}", coord.log_text());
    for n in nodes.iter_mut().chain(std::iter::once(&mut back)) {
        let s = n.wait(Duration::from_secs(60))?;
        anyhow::ensure!(s.success(), "{} failed:\n{}", n.name, n.log_text());
    }

    let history = run_history(&out)?;
    let rounds = history["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    let names = |r: &serde_json::Value| -> Vec<String> {
        let mut v: Vec<String> = r["participants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["node"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&rounds[0]), ["node-1", "node-2"]);
    let refused: u64 = rounds[0]["refusals"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(refused >= 1, "the broken upload is counted: {}", rounds[0]["refusals"]);
    for r in &rounds[1..] {
        assert_eq!(names(r), ["node-1", "node-2", "node-3"]);
    }
    assert!(back.log_text().contains("joined"));
    Ok(())
}
