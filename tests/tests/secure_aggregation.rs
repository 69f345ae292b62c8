//! Secure aggregation with real processes: edge nodes run SecAgg+ against
//! a coordinator over gRPC; nodes drop out after sharing keys and after
//! sending their masked input, the round still completes, and the global
//! model moves by exactly the survivors' mean (within the quantization
//! bound) although the coordinator never saw an update.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use fedge_tests::{
    Daemon, coordinator_args, daemon_command, free_port, off_the_mean, quantization_step, run_history, start_nodes,
};
use serde_json::Value;

fn small() -> Vec<(&'static str, String)> {
    vec![
        ("data.synthetic_train_samples", "800".to_string()),
        ("data.synthetic_test_samples", "200".into()),
    ]
}

#[test]
fn rounds_complete_when_nodes_drop_out_and_the_model_moves_by_the_survivors_mean() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let port = free_port();
    let mut settings = small();
    settings.extend([
        ("rounds", "1".to_string()),
        ("sampling.min_nodes", "3".into()),
        ("sampling.min_available", "5".into()),
        ("secure_aggregation.enabled", "true".into()),
        ("secure_aggregation.max_dropout", "0.4".into()),
        ("secure_aggregation.range", "1.0".into()),
        ("secure_aggregation.step_timeout", "\"20s\"".into()),
    ]);
    let mut coord = Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &out, &settings),
        tmp.path(),
    )?;
    // Nodes 1-4 upload slowly (a masked input is 641 KB: about 4 s), node 5
    // at full speed: node 5's input arrives first, while the others' are
    // still on their way.
    let record = |i: usize| format!("\"{}\"", tmp.path().join(format!("sent-{i}")).display());
    let mut nodes = start_nodes(tmp.path(), port, 5, 5, |i| {
        let mut s = small();
        s.push(("record_dir", record(i)));
        if i < 4 {
            s.push(("upload_bytes_per_sec", "160000".into()));
        }
        s
    })?;
    // Node 5 sent its masked input: it leaves before it can help unmask,
    // and node 4 leaves before its input arrives (after sharing its keys).
    let deadline = Instant::now() + Duration::from_secs(180);
    while !nodes[4].log_text().contains("update submitted") {
        if Instant::now() > deadline || coord.child.try_wait()?.is_some() {
            bail!("node 5 never submitted:\n{}\n{}", nodes[4].log_text(), coord.log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    nodes[4].child.kill()?;
    nodes[3].child.kill()?;
    if !coord.wait(Duration::from_secs(240))?.success() {
        bail!("coordinator failed:\n{}", coord.log_text());
    }
    for n in &mut nodes[..3] {
        n.wait(Duration::from_secs(30))?;
        assert!(
            n.log_text().contains("secure aggregation: unmasking answered"),
            "{}",
            n.log_text()
        );
    }
    let history = run_history(&out)?;
    let rounds = history["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1);
    let sa = &rounds[0]["secure_aggregation"];
    assert_eq!(
        (sa["selected"].as_u64(), sa["shared"].as_u64(), sa["survivors"].as_u64()),
        (Some(5), Some(5), Some(4)),
        "{sa}"
    );
    assert_eq!(
        (sa["dropped"].as_u64(), sa["revealed"].as_u64()),
        (Some(1), Some(3)),
        "{sa}"
    );
    assert_eq!(sa["threshold"], 3);
    let mut names: Vec<&str> = rounds[0]["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["node-1", "node-2", "node-3", "node-5"]);
    assert!(
        rounds[0]["participants"][0]["update_norm"].is_null(),
        "the coordinator sees no update"
    );
    assert!(rounds[0]["test_accuracy"].as_f64().is_some());

    // The model moved by the survivors' mean of what they recorded sending
    // (equal partitions: equal weights), to within the quantization step.
    let step = quantization_step(sa)?;
    let sent: Vec<_> = [0, 1, 2, 4]
        .iter()
        .map(|i| tmp.path().join(format!("sent-{i}")))
        .collect();
    let worst = off_the_mean(&out, 1, &sent)?;
    // Four stochastic roundings of at most a step each, over four, plus f32 rounding.
    assert!(
        worst <= step + 1e-6,
        "the model moved {worst} away from the survivors' mean (step {step})"
    );
    Ok(())
}

#[test]
fn secure_aggregation_refuses_aggregators_that_look_at_individual_updates() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let refused = |extra: &[&str]| -> Result<String> {
        let out = daemon_command("coordinator")
            .args(coordinator_args(free_port(), &tmp.path().join("run"), &[]))
            .args(["--set", "secure_aggregation.enabled=true"])
            .args(["--set", "sampling.min_nodes=3", "--set", "sampling.min_available=3"])
            .args(extra)
            .output()?;
        assert!(!out.status.success());
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let err = refused(&["--set", "strategy.aggregator=\"median\""])?;
    assert!(
        err.contains(
            "secure_aggregation: the coordinator sees only the sum of the updates, so it cannot run \
             strategy.aggregator = \"median\", which looks at individual updates; use \"mean\""
        ),
        "{err}"
    );
    let err = refused(&["--set", "privacy.noise=\"central\""])?;
    assert!(
        err.contains("use \"distributed\" (the nodes clip and add the noise)"),
        "{err}"
    );
    let err = refused(&["--set", "codec.update=\"int8\""])?;
    assert!(err.contains("masked updates are 32-bit ring elements"), "{err}");
    Ok(())
}

/// Distributed differential privacy under secure aggregation: the nodes
/// clip and noise, the clipping indicator is summed inside the masks, and
/// the accountant reports ε; the status shows the protocol.
#[test]
fn differential_privacy_runs_under_secure_aggregation() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let (port, http_port) = (free_port(), free_port());
    let mut settings = small();
    settings.extend([
        ("rounds", "3".to_string()),
        ("sampling.min_nodes", "4".into()),
        ("sampling.min_available", "4".into()),
        ("http.listen", format!("\"127.0.0.1:{http_port}\"")),
        ("secure_aggregation.enabled", "true".into()),
        ("secure_aggregation.neighbours", "2".into()),
        ("privacy.noise", "\"distributed\"".into()),
        ("privacy.noise_multiplier", "0.5".into()),
        ("privacy.clip_norm", "0.01".into()),
        ("privacy.adaptive_clip", "true".into()),
        ("privacy.clip_count_stddev", "0.5".into()),
    ]);
    let mut coord = Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &out, &settings),
        tmp.path(),
    )?;
    let mut nodes = start_nodes(tmp.path(), port, 4, 4, |_| small())?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let out = daemon_command("coordinator")
            .args(["status", "--json", "--url", &format!("http://127.0.0.1:{http_port}")])
            .output()?;
        if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout)
            && v["completed_rounds"].as_u64() >= Some(1)
        {
            break v;
        }
        if Instant::now() > deadline {
            bail!("no round completed:\n{}", coord.log_text());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let s = &status["secure_aggregation"];
    assert_eq!(
        (s["neighbours"].as_u64(), s["threshold"].as_u64()),
        (Some(2), Some(3)),
        "{status}"
    );
    assert!(status["rounds"][0]["secure_survivors"].as_u64() == Some(4), "{status}");
    if !coord.wait(Duration::from_secs(180))?.success() {
        bail!("coordinator failed:\n{}", coord.log_text());
    }
    for n in &mut nodes {
        n.wait(Duration::from_secs(30))?;
    }
    let history = run_history(&out)?;
    let rounds = history["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    for r in rounds {
        let p = &r["privacy"];
        assert_eq!(p["noise"], "distributed");
        // The indicator's sum: how many of the 4 updates needed no clipping.
        assert!(p["unclipped"].as_u64().unwrap() <= 4, "{p}");
        assert!(p["epsilon"].as_f64().unwrap() > 0.0);
        assert_eq!(
            r["secure_aggregation"]["holders"], 3,
            "ring of 2 neighbours and the node itself"
        );
        for part in r["participants"].as_array().unwrap() {
            assert!(part["update_norm"].is_null());
        }
    }
    // Adaptive clipping moved the norm from what the nodes reported inside the sum.
    assert_ne!(
        rounds[0]["privacy"]["next_clip_norm"],
        rounds[0]["privacy"]["clip_norm"]
    );
    Ok(())
}
