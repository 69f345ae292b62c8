//! Differential privacy with real processes: a coordinator and edge nodes
//! run DP-FedAvg; `run.json` carries each round's clipping, noise and the
//! ε the run has spent (the same figures as Google's `dp_accounting`), the
//! budget stops the run before it is passed, nodes add their share of the
//! noise in distributed mode, and `coordinator status` shows ε.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use fedge_tests::{Daemon, coordinator_args, daemon_command, free_port, run_fleet, run_history, start_nodes};
use serde_json::Value;

fn small() -> Vec<(&'static str, String)> {
    vec![
        ("data.synthetic_train_samples", "800".to_string()),
        ("data.synthetic_test_samples", "200".into()),
    ]
}

fn rounds(history: &Value) -> &[Value] {
    history["rounds"].as_array().map(Vec::as_slice).unwrap_or_default()
}

#[test]
fn central_noise_is_accounted_and_the_budget_stops_the_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    // Two nodes, both in every round (q = 1), z = 2: dp_accounting gives
    // ε = 2.168, 3.190, 4.012 after 1, 2, 3 rounds at δ = 1e-5, so a
    // budget of 4 allows two rounds of the five.
    let history = run_fleet(
        tmp.path(),
        &out,
        2,
        &small(),
        &[
            ("rounds", "5".into()),
            ("privacy.noise", "\"central\"".into()),
            ("privacy.noise_multiplier", "2.0".into()),
            ("privacy.clip_norm", "0.001".into()),
            ("privacy.epsilon_budget", "4.0".into()),
        ],
        |_| Vec::new(),
    )?;
    let rs = rounds(&history);
    assert_eq!(rs.len(), 2, "the budget allows two rounds");
    for (r, expected) in rs.iter().zip([2.1680106367839715, 3.190351872825228]) {
        let p = &r["privacy"];
        assert_eq!(p["noise"], "central");
        assert_eq!(p["sampling_rate"], 1.0);
        assert_eq!(p["noise_multiplier"], 2.0);
        assert_eq!(p["clip_norm"], 0.001);
        assert_eq!(p["updates"], 2);
        let eps = p["epsilon"].as_f64().unwrap();
        assert!((eps - expected).abs() < 1e-9, "epsilon {eps}, dp_accounting {expected}");
        // Central: nodes send their updates as they are; the coordinator clips them.
        for part in r["participants"].as_array().unwrap() {
            assert!(part["update_norm"].as_f64().unwrap() > 0.001 && part["clipped"] == true);
        }
    }
    assert_eq!(history["finished"], true);
    let why = history["stop_reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("the privacy budget is spent") && why.contains("past privacy.epsilon_budget = 4"),
        "{why}"
    );
    Ok(())
}

#[test]
fn distributed_noise_comes_from_the_nodes_and_status_shows_epsilon() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let (port, http_port) = (free_port(), free_port());
    let mut settings = small();
    settings.extend([
        ("rounds", "3".to_string()),
        ("http.listen", format!("\"127.0.0.1:{http_port}\"")),
        ("privacy.noise", "\"distributed\"".into()),
        ("privacy.noise_multiplier", "1.0".into()),
        ("privacy.clip_norm", "0.002".into()),
        ("privacy.adaptive_clip", "true".into()),
        ("privacy.clip_count_stddev", "1.0".into()),
    ]);
    let mut coord = Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &out, &settings),
        tmp.path(),
    )?;
    let mut nodes = start_nodes(tmp.path(), port, 2, 2, |_| small())?;
    // While it runs, the status shows the privacy spent.
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
    let p = &status["privacy"];
    assert_eq!(p["noise"], "distributed");
    assert!(p["epsilon"].as_f64().unwrap() > 0.0, "{status}");
    assert_eq!(p["delta"], 1e-5);
    assert!(
        status["rounds"][0]["epsilon"].as_f64().is_some(),
        "per-round epsilon: {status}"
    );
    if !coord.wait(Duration::from_secs(180))?.success() {
        bail!("coordinator failed:\n{}", coord.log_text());
    }
    for n in &mut nodes {
        n.wait(Duration::from_secs(30))?;
    }
    let history = run_history(&out)?;
    let rs = rounds(&history);
    assert_eq!(rs.len(), 3);
    // Each node added noise of z_Δ·C/√2 to each of its 160,202 values after
    // clipping to C, where z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) leaves the count of
    // unclipped updates its share (σ_b = 1): the update's norm is about
    // √(C² + d·(z_Δ·C)²/2) whatever the node trained.
    let (d, z_updates) = (160_202f64, (1.0f64 - 0.25).powf(-0.5));
    for r in rs {
        let p = &r["privacy"];
        let c = p["clip_norm"].as_f64().unwrap();
        let expected = (c * c + d * (z_updates * c).powi(2) / 2.0).sqrt();
        for part in r["participants"].as_array().unwrap() {
            let norm = part["update_norm"].as_f64().unwrap();
            assert!(
                (norm / expected - 1.0).abs() < 0.05,
                "update norm {norm}, noise alone gives {expected}"
            );
        }
        assert_eq!(p["noise"], "distributed");
        assert!(p["unclipped"].as_u64().unwrap() <= 2);
        // Adaptive clipping moves the norm between rounds.
        assert_ne!(p["next_clip_norm"], p["clip_norm"]);
    }
    check_epsilon_grows(rs)
}

fn check_epsilon_grows(rs: &[Value]) -> Result<()> {
    let eps: Vec<f64> = rs.iter().map(|r| r["privacy"]["epsilon"].as_f64().unwrap()).collect();
    if eps.windows(2).all(|w| w[1] > w[0]) {
        Ok(())
    } else {
        bail!("epsilon must grow with every round: {eps:?}")
    }
}

#[test]
fn privacy_refuses_aggregators_that_see_individual_updates() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = daemon_command("coordinator")
        .args(coordinator_args(free_port(), &tmp.path().join("run"), &[]))
        .args([
            "--set",
            "privacy.noise=\"central\"",
            "--set",
            "strategy.aggregator=\"median\"",
        ])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("privacy: differential privacy bounds what one node adds to a sum of clipped updates")
            && err.contains("needs strategy.aggregator = \"mean\""),
        "{err}"
    );
    Ok(())
}
