//! Fleets whose devices differ in speed, emulated on one machine: each
//! node's `train.slowdown`, set by `coordinator fleet --node-slowdowns`.

use std::time::Duration;

use fedge_tests::*;

#[test]
fn a_fleet_trace_slows_the_nodes_it_names_and_no_other() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let trace = tmp.path().join("speeds.csv");
    std::fs::write(&trace, "node,slowdown\nnode-2,6   # a slow device\n")?;
    let mut args: Vec<String> = [
        "fleet",
        "--nodes",
        "2",
        "--node-threads",
        "1",
        "--out-dir",
        &out.display().to_string(),
        "--listen",
        "127.0.0.1:0",
        "--node-slowdowns",
        &trace.display().to_string(),
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for (k, v) in [
        ("rounds", "2"),
        ("data.synthetic_seed", "5"),
        ("data.synthetic_train_samples", "1200"),
        ("data.synthetic_test_samples", "200"),
        ("eval.threads", "1"),
        ("train.max_steps", "20"),
    ] {
        args.extend(["--set".to_string(), format!("{k}={v}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, log) = run_to_end("coordinator", &args)?;
    assert!(status.success(), "{log}");
    assert!(
        log.contains("1.00 6.00"),
        "the fleet shows each node's slowdown:\n{log}"
    );
    let slow = std::fs::read_to_string(out.join("logs/node-2.log"))?;
    assert!(
        slow.contains("emulating a slower device") && slow.contains("slowdown=6"),
        "{slow}"
    );
    let fast = std::fs::read_to_string(out.join("logs/node-1.log"))?;
    assert!(!fast.contains("emulating a slower device"), "{fast}");

    // The slowed node's rounds take about six times as long as its real
    // training; the bound is loose, as the machine is shared.
    let history = run_history(&out)?;
    for round in history["rounds"].as_array().unwrap() {
        let seconds = |node: &str| {
            participant(round, node)
                .and_then(|p| p["train_seconds"].as_f64())
                .unwrap()
        };
        let (fast, slow) = (seconds("node-1"), seconds("node-2"));
        assert!(slow > 2.5 * fast, "node-2 {slow:.2} s against node-1 {fast:.2} s");
    }
    Ok(())
}

#[test]
fn a_bad_slowdown_spec_is_named_before_anything_starts() -> anyhow::Result<()> {
    let (status, err) = run_to_end("coordinator", &["fleet", "--node-slowdowns", "lognormal:0.5"])?;
    assert!(!status.success());
    assert!(
        err.contains("--node-slowdowns lognormal:MAX must be between 1 and 1000, got 0.5"),
        "{err}"
    );
    let (status, err) = run_to_end("coordinator", &["fleet", "--node-slowdowns", "/nonexistent/speeds.csv"])?;
    assert!(!status.success());
    assert!(
        err.contains("reading the slowdown trace /nonexistent/speeds.csv"),
        "{err}"
    );
    Ok(())
}

#[test]
fn the_slowdowns_command_prints_the_fleets_trace() -> anyhow::Result<()> {
    let print = || {
        daemon_command("coordinator")
            .args(["slowdowns", "lognormal:8", "--nodes", "16"])
            .output()
    };
    let output = print()?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let out = String::from_utf8(output.stdout)?;
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("node")).collect();
    assert_eq!(rows[0], "node,slowdown,online,offline,offset");
    let factors: Vec<f64> = rows[1..]
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (node, f) = r.split_once(',').unwrap();
            assert_eq!(node, format!("node-{}", i + 1));
            f.parse().unwrap()
        })
        .collect();
    assert_eq!(factors.len(), 16);
    assert!(factors.contains(&1.0) && factors.contains(&8.0), "{factors:?}");
    assert_eq!(out.as_bytes(), print()?.stdout, "the same seed gives the same fleet");
    Ok(())
}

#[test]
fn a_node_that_comes_and_goes_drops_out_of_rounds_and_rejoins() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let shared = [
        ("data.synthetic_seed", "5".to_string()),
        ("data.synthetic_train_samples", "1200".to_string()),
    ];
    let mut coordinator = vec![
        ("rounds", "24".to_string()),
        ("sampling.min_nodes", "1".to_string()),
        ("sampling.min_available", "1".to_string()),
        ("data.synthetic_test_samples", "200".to_string()),
        ("eval.threads", "1".to_string()),
        ("train.max_steps", "30".to_string()),
    ];
    coordinator.extend(shared.iter().cloned());
    let port = free_port();
    let mut coord = Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &out, &coordinator),
        tmp.path(),
    )?;
    // node-2 is reachable 3 s out of every 6.
    let mut nodes = start_nodes(tmp.path(), port, 2, 2, |i| {
        let mut s = shared.to_vec();
        if i == 1 {
            s.push(("availability.online", "\"3s\"".to_string()));
            s.push(("availability.offline", "\"3s\"".to_string()));
        }
        s
    })?;
    assert!(coord.wait(Duration::from_secs(300))?.success(), "{}", coord.log_text());
    assert!(
        nodes[0].wait(Duration::from_secs(30))?.success(),
        "{}",
        nodes[0].log_text()
    );
    // node-2 may be away when the run ends and miss its stop: a device's
    // daemon keeps trying to reach its coordinator. Dropping it ends it.
    drop(nodes);
    let history = run_history(&out)?;
    let rounds = history["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 24);
    let with: Vec<bool> = rounds.iter().map(|r| participant(r, "node-2").is_some()).collect();
    let log = std::fs::read_to_string(tmp.path().join("node-2.log"))?;
    assert!(log.contains("emulating a device that comes and goes"), "{log}");
    assert!(log.contains("going offline (availability)"), "{log}");
    assert!(log.contains("offline (availability); holding no session"), "{log}");
    // It trained in some rounds, the fleet went on without it in others,
    // and it came back after its first absence.
    let first_absence = with
        .iter()
        .position(|w| !w)
        .unwrap_or_else(|| panic!("node-2 was never away: {with:?}"));
    assert!(
        with[first_absence..].iter().any(|w| *w),
        "node-2 never came back: {with:?}"
    );
    assert!(log.matches("joined").count() >= 2, "node-2 joined once only:\n{log}");
    Ok(())
}
