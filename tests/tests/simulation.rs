//! `coordinator simulate`: hundreds of virtual nodes in one process, run
//! by the coordinator's own driver and round machine with the edge node's
//! training code. The run leaves the same history, checkpoint and model as
//! a served one, resumes like one, keeps error-feedback state per virtual
//! node, and refuses what it cannot simulate with a clear message.

use std::collections::BTreeSet;
use std::path::Path;

use std::time::{Duration, Instant};

use fedge_tests::{Daemon, run_history, run_to_end, sets};

/// 200 virtual nodes share 12,000 synthetic images (60 each); 10 train per round.
fn simulate_args(out: &Path, rounds: u32, extra: &[(&str, String)]) -> Vec<String> {
    let mut args = vec![
        "simulate".to_string(),
        "--nodes".into(),
        "200".into(),
        "--rounds".into(),
        rounds.to_string(),
        "--out-dir".into(),
        out.display().to_string(),
    ];
    let mut settings = vec![
        ("sampling.fraction", "0.05".to_string()),
        ("sampling.min_nodes", "6".to_string()),
        ("data.synthetic_train_samples", "12000".to_string()),
        ("data.synthetic_test_samples", "500".to_string()),
        ("train.epochs", "3".to_string()),
        ("train.learning_rate", "0.2".to_string()),
        ("eval.threads", "1".to_string()),
        ("checkpoint.keep_round_models", "true".to_string()),
    ];
    settings.extend(extra.iter().cloned());
    args.extend(sets(&settings));
    args
}

fn simulate(out: &Path, rounds: u32, extra: &[(&str, String)]) -> anyhow::Result<(bool, String)> {
    let args = simulate_args(out, rounds, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, log) = run_to_end("coordinator", &refs)?;
    Ok((status.success(), log))
}

#[test]
fn virtual_nodes_train_through_the_coordinators_round_machine_and_a_killed_run_resumes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("sim");
    // Killed once two rounds are on disk, then started again on the same folder.
    let first = Daemon::start("coordinator", "simulate-1", &simulate_args(&out, 4, &[]), tmp.path())?;
    let started = Instant::now();
    loop {
        let done = run_history(&out).map_or(0, |h| h["rounds"].as_array().map_or(0, Vec::len));
        if done >= 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no two rounds within 5 minutes:\n{}",
            first.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(first);
    let (ok, log) = simulate(&out, 4, &[])?;
    assert!(ok, "resumed simulation failed:\n{log}");
    assert!(log.contains("resuming an unfinished run from its checkpoint"), "{log}");
    let history = run_history(&out)?;
    assert_eq!(history["finished"], true);
    assert_eq!(history["resumed"], 1);
    let rounds = history["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 4);
    let model_bytes = 160_202u64 * 4;
    let mut everyone = BTreeSet::new();
    for r in rounds {
        let ps = r["participants"].as_array().unwrap();
        // ceil(0.05 · 200) = 10 of the 200 connected virtual nodes.
        assert_eq!(r["selected"], 10, "{r}");
        assert_eq!(ps.len(), 10, "{r}");
        for p in ps {
            let name = p["node"].as_str().unwrap().to_owned();
            let n: u32 = name.strip_prefix("sim-").expect("virtual node name").parse()?;
            assert!((1..=200).contains(&n));
            assert_eq!(p["num_samples"].as_u64(), Some(60), "{p}");
            // f32 updates go through the same intake as a received stream.
            assert_eq!(p["payload_bytes"].as_u64(), Some(model_bytes), "{p}");
            assert_eq!(p["bytes_down"].as_u64(), Some(model_bytes), "{p}");
            assert!(p["update_norm"].as_f64().unwrap() > 0.0);
            assert_eq!(p["steps"].as_u64(), Some(6), "3 epochs of 2 batches: {p}");
            everyone.insert(name);
        }
        assert_eq!(r["bytes_up"].as_u64(), Some(10 * model_bytes));
        assert!(r["test_accuracy"].as_f64().is_some());
    }
    // Sampling draws a new set of nodes each round.
    assert!(everyone.len() > 10, "the same nodes every round: {everyone:?}");
    let acc: Vec<f64> = rounds.iter().map(|r| r["test_accuracy"].as_f64().unwrap()).collect();
    assert!(
        acc[3] > 0.3,
        "four rounds of 10 virtual nodes should be well above chance (10%): {acc:?}"
    );
    for file in [
        "model.safetensors",
        "model.json",
        "curves.svg",
        "rounds/round-0004.safetensors",
    ] {
        assert!(out.join(file).exists(), "{file} is missing");
    }
    assert!(history["peak_rss_bytes"].as_u64().unwrap() > 0);
    Ok(())
}

#[test]
fn top_k_error_feedback_is_kept_per_virtual_node_on_disk() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("sim");
    let (ok, log) = simulate(
        &out,
        2,
        &[
            ("codec.update", "\"topk\"".to_string()),
            ("codec.topk_fraction", "0.01".to_string()),
        ],
    )?;
    assert!(ok, "simulation failed:\n{log}");
    let history = run_history(&out)?;
    let mut trained = BTreeSet::new();
    for r in history["rounds"].as_array().unwrap() {
        for p in r["participants"].as_array().unwrap() {
            // 1% of 160,202 values, as (index, value) pairs: far below the f32 size.
            assert!(p["payload_bytes"].as_u64().unwrap() < 160_202 * 4 / 20, "{p}");
            trained.insert(p["node"].as_str().unwrap().to_owned());
        }
    }
    // Each node that trained keeps what its payloads did not carry, in its own folder.
    for name in &trained {
        let residual = out.join("nodes").join(name).join("codec-residual.safetensors");
        assert!(residual.exists(), "{} is missing", residual.display());
    }
    let folders = std::fs::read_dir(out.join("nodes"))?.count();
    assert_eq!(folders, trained.len(), "only nodes that trained keep state");
    Ok(())
}

#[test]
fn what_cannot_be_simulated_is_refused_with_the_reason() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let cases: [(&[(&str, String)], &str); 3] = [
        (
            &[
                ("secure_aggregation.enabled", "true".to_string()),
                ("sampling.min_nodes", "6".to_string()),
            ],
            "simulation: secure aggregation runs its key exchange between node processes and is not simulated",
        ),
        (
            &[("simulation.partition", "\"zipf\"".to_string())],
            "simulation: partition scheme must be iid, dirichlet, shards or quantity, got `zipf`",
        ),
        (
            &[("simulation.trainer_threads", "0".to_string())],
            "simulation.trainer_threads must be at least 1",
        ),
    ];
    for (i, (extra, expected)) in cases.iter().enumerate() {
        let (ok, log) = simulate(&tmp.path().join(format!("bad-{i}")), 1, extra)?;
        assert!(!ok, "accepted {extra:?}");
        assert!(log.contains(expected), "expected `{expected}` in:\n{log}");
    }
    // More nodes than samples: the partition says so.
    let (ok, log) = simulate(
        &tmp.path().join("small"),
        1,
        &[("data.synthetic_train_samples", "100".to_string())],
    )?;
    assert!(!ok);
    assert!(log.contains("cannot split 100 samples among 200 nodes"), "{log}");
    Ok(())
}

#[test]
fn virtual_nodes_train_asynchronously_with_the_same_buffers_and_staleness_records() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("sim");
    let (ok, log) = simulate(
        &out,
        4,
        &[
            ("async.enabled", "true".to_string()),
            ("async.buffer_size", "8".to_string()),
            ("async.concurrency", "16".to_string()),
            ("sampling.min_available", "16".to_string()),
            ("train.epochs", "1".to_string()),
        ],
    )?;
    assert!(ok, "{log}");
    assert!(log.contains("asynchronous training started"), "{log}");
    let history = run_history(&out)?;
    assert_eq!(history["finished"], true);
    let rounds = history["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 4);
    for step in rounds {
        let participants = step["participants"].as_array().unwrap();
        assert_eq!(participants.len(), 8, "{step}");
        let names: BTreeSet<&str> = participants.iter().map(|p| p["node"].as_str().unwrap()).collect();
        assert_eq!(names.len(), 8, "one update per node per step: {step}");
        assert!(
            participants
                .iter()
                .all(|p| p["staleness"].is_u64() && p["task"].is_u64())
        );
        assert!(step["staleness"].is_object(), "{step}");
    }
    Ok(())
}
