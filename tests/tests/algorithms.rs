//! Client algorithms and server strategies end to end, with real processes:
//! FedSGD's global step recomputed from the gradients the nodes sent,
//! SCAFFOLD's control variates on both sides, FedProx with a server
//! optimizer, and a coordinator killed mid-run that resumes with its server
//! optimizer's state and, keeping the global model on disk between rounds,
//! ends bit for bit where an uninterrupted run with it in memory ends.

use std::path::Path;
use std::time::{Duration, Instant};

use fedge_tests::{
    Daemon, accuracies, coordinator_args, free_port, load_params, meta_u64, run_fleet, run_history, run_to_end,
    start_nodes,
};

fn small_data() -> Vec<(&'static str, String)> {
    vec![
        ("data.synthetic_seed", "5".to_string()),
        ("data.synthetic_train_samples", "1800".to_string()),
    ]
}

fn coordinator_common(rounds: u32) -> Vec<(&'static str, String)> {
    vec![
        ("rounds", rounds.to_string()),
        ("sampling.min_nodes", "3".to_string()),
        ("sampling.min_available", "3".to_string()),
        ("data.synthetic_test_samples", "500".to_string()),
        ("eval.threads", "1".to_string()),
    ]
}

#[test]
fn fedsgd_moves_the_model_by_the_rounds_learning_rate_times_the_mean_gradient() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let mut coordinator = coordinator_common(2);
    coordinator.extend([
        ("train.algorithm", "\"fedsgd\"".to_string()),
        ("train.learning_rate", "0.2".to_string()),
        ("train.weight_decay", "0.001".to_string()),
        ("train.lr_schedule", "\"exponential\"".to_string()),
        ("train.lr_decay", "0.5".to_string()),
    ]);
    let record = |i: usize| {
        vec![(
            "record_dir",
            format!("\"{}\"", tmp.path().join(format!("sent-{i}")).display()),
        )]
    };
    let history = run_fleet(tmp.path(), &out, 3, &small_data(), &coordinator, record)?;
    assert_eq!(history["config"]["train"]["algorithm"], "fedsgd");
    for round in 1..=2u64 {
        let lr = 0.2 * 0.5f64.powi(round as i32 - 1);
        let prev = load_params(&out.join(format!("rounds/round-{:04}.safetensors", round - 1)))?;
        let next = load_params(&out.join(format!("rounds/round-{round:04}.safetensors")))?;
        let mut sum = vec![0f64; prev.values.len()];
        let mut weight = 0f64;
        for i in 0..3 {
            let g = load_params(&tmp.path().join(format!("sent-{i}/round-{round:04}.safetensors")))?;
            let n = meta_u64(&g, "num_samples") as f64;
            for (s, v) in sum.iter_mut().zip(&g.values) {
                *s += n * f64::from(*v);
            }
            weight += n;
        }
        let mut worst = 0f64;
        for ((p, x), s) in prev.values.iter().zip(&next.values).zip(&sum) {
            let expect = f64::from(*p) - lr * s / weight;
            worst = worst.max((f64::from(*x) - expect).abs() / expect.abs().max(1e-3));
        }
        assert!(worst < 1e-4, "round {round}: differs from w - lr·mean(g) by {worst}");
    }
    let rounds = history["rounds"].as_array().unwrap();
    let loss: Vec<f64> = rounds.iter().map(|r| r["test_loss"].as_f64().unwrap()).collect();
    assert!(
        loss[1] < loss[0],
        "one full-batch gradient step each round lowers the loss: {loss:?}"
    );
    Ok(())
}

#[test]
fn a_scaffold_fleet_trains_and_keeps_control_variates_on_both_sides() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let out_s = out.display().to_string();
    let mut args = vec![
        "fleet",
        "--nodes",
        "3",
        "--node-threads",
        "1",
        "--out-dir",
        &out_s,
        "--listen",
        "127.0.0.1:0",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    for (k, v) in coordinator_common(3)
        .into_iter()
        .chain(small_data())
        .chain([("train.algorithm", "\"scaffold\"".to_string())])
    {
        args.extend(["--set".to_string(), format!("{k}={v}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, log) = run_to_end("coordinator", &args)?;
    assert!(status.success(), "{log}");
    let history = run_history(&out)?;
    let acc = accuracies(&history);
    assert!(acc[2] > 0.5, "scaffold should learn: {acc:?}");

    // The coordinator's checkpoint holds the server control variate, moved off zero.
    let cp = load_params(&out.join("checkpoint/round-0003.safetensors"))?;
    let names: Vec<&str> = cp.manifest.tensors.iter().map(|t| t.name.as_str()).collect();
    let first = names
        .iter()
        .position(|n| n.starts_with("strategy/scaffold.c"))
        .expect("scaffold.c saved");
    let offset: usize = cp.manifest.tensors[..first].iter().map(|t| t.numel()).sum();
    let c = &cp.values[offset..offset + cp.manifest.tensors[first].numel()];
    assert!(c.iter().any(|v| *v != 0.0), "server control variate never moved");
    assert!(
        !out.join("checkpoint/round-0002.safetensors").exists(),
        "old checkpoints are pruned"
    );

    // Each node kept its own control variate in its state folder, for this run.
    for i in 1..=3 {
        let path = out.join(format!("nodes/node-{i}/scaffold-control.safetensors"));
        let ci = load_params(&path)?;
        assert_eq!(ci.metadata["run_id"], history["run_id"].as_str().unwrap());
        assert!(ci.values.iter().any(|v| *v != 0.0), "{} is all zeros", path.display());
    }
    Ok(())
}

#[test]
fn fedprox_with_local_adam_and_a_fedyogi_server_learns() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let mut coordinator = coordinator_common(3);
    coordinator.extend([
        ("train.algorithm", "\"fedprox\"".to_string()),
        ("train.proximal_mu", "0.1".to_string()),
        ("train.optimizer", "\"adam\"".to_string()),
        ("train.learning_rate", "0.001".to_string()),
        ("strategy.server_optimizer", "\"yogi\"".to_string()),
        ("strategy.server_lr", "0.01".to_string()),
    ]);
    let history = run_fleet(tmp.path(), &out, 3, &small_data(), &coordinator, |_| Vec::new())?;
    let acc = accuracies(&history);
    assert!(acc[2] > 0.5, "fedprox + yogi should learn: {acc:?}");
    Ok(())
}

/// Runs 4 rounds of FedAdam with 3 nodes; when `kill_after` is set, the
/// coordinator is SIGKILLed once that many rounds are on disk and started
/// again on the same folder, and it keeps the global model on disk while
/// rounds run (`limits.resident_model_bytes = 0`). Returns the final model
/// and the history.
fn adam_run(dir: &Path, kill_after: Option<usize>) -> anyhow::Result<(Vec<f32>, serde_json::Value)> {
    let out = dir.join("run");
    let port = free_port();
    let mut extra = coordinator_common(4);
    extra.extend(small_data());
    extra.extend([
        ("strategy.server_optimizer", "\"adam\"".to_string()),
        ("strategy.server_lr", "0.02".to_string()),
    ]);
    if kill_after.is_some() {
        extra.push(("limits.resident_model_bytes", "0".to_string()));
    }
    let args = coordinator_args(port, &out, &extra);
    let mut coord = Daemon::start("coordinator", "coordinator", &args, dir)?;
    let mut nodes = start_nodes(dir, port, 3, 3, |_| small_data())?;
    if let Some(k) = kill_after {
        let deadline = Instant::now() + Duration::from_secs(120);
        while run_history(&out).map_or(0, |h| h["rounds"].as_array().map_or(0, Vec::len)) < k {
            assert!(Instant::now() < deadline, "no progress:\n{}", coord.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        coord.child.kill()?;
        coord.child.wait()?;
        coord = Daemon::start("coordinator", "coordinator-restarted", &args, dir)?;
    }
    let status = coord.wait(Duration::from_secs(240))?;
    assert!(status.success(), "coordinator failed:\n{}", coord.log_text());
    for n in &mut nodes {
        assert!(n.wait(Duration::from_secs(30))?.success(), "{}", n.log_text());
    }
    if kill_after.is_some() {
        let log = coord.log_text();
        assert!(
            log.contains("resuming an unfinished run from its checkpoint")
                && log.contains("the global model is read from its checkpoint while rounds run"),
            "{log}"
        );
    }
    Ok((load_params(&out.join("model.safetensors"))?.values, run_history(&out)?))
}

#[test]
fn a_killed_coordinator_resumes_with_its_server_optimizer_state() -> anyhow::Result<()> {
    let straight = tempfile::tempdir()?;
    let (expected, h1) = adam_run(straight.path(), None)?;
    let killed = tempfile::tempdir()?;
    let (resumed, h2) = adam_run(killed.path(), Some(2))?;
    assert_eq!(h2["resumed"], 1);
    assert_eq!(h1["resumed"], 0);
    let rounds: Vec<u64> = h2["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["round"].as_u64().unwrap())
        .collect();
    assert_eq!(rounds, [1, 2, 3, 4], "no round lost or repeated");
    // Same seeds, same updates: only a restored Adam state (m, v) gives the
    // same model, and only if the model read back from disk (fetches, the
    // server step) is the one that was in memory.
    assert!(
        expected == resumed,
        "the resumed run ended elsewhere (max difference {})",
        expected
            .iter()
            .zip(&resumed)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    );
    Ok(())
}

/// The centralized floor (`coordinator baseline`) trains the same model in
/// one process and needs no certificate: it serves nothing.
#[test]
fn the_centralized_floor_trains_in_one_process_without_credentials() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("floor");
    let out_arg = out.display().to_string();
    let (status, log) = run_to_end(
        "coordinator",
        &[
            "baseline",
            "--out-dir",
            &out_arg,
            "--epochs",
            "1",
            "--threads",
            "1",
            "--set",
            "data.synthetic_train_samples=600",
            "--set",
            "data.synthetic_test_samples=200",
        ],
    )?;
    assert!(status.success(), "{log}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("baseline.json"))?)?;
    let accuracy = report["test_accuracy"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&accuracy), "{report}");
    assert!(report["peak_rss_bytes"].as_u64().unwrap_or(0) > 0, "{report}");
    Ok(())
}
