//! End-to-end federated training: a real coordinator and real edge-node
//! processes talking gRPC over TCP on loopback.

use std::collections::BTreeSet;
use std::time::Duration;

use fedge_tests::{Daemon, coordinator_args, free_port, load_params, meta_u64, node_args, run_history, start_nodes};

const PARAMS_CNN: usize = 160_202;

#[test]
fn three_nodes_train_and_the_global_model_is_the_fedavg_of_their_updates() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let port = free_port();
    let data = [
        ("data.synthetic_seed", "5".to_string()),
        ("data.synthetic_train_samples", "1800".to_string()),
    ];
    // Nodes start first: they must wait for the coordinator and connect with backoff.
    let mut nodes = Vec::new();
    for i in 0..3 {
        let name = format!("node-{}", i + 1);
        let mut args = node_args(port, &name, &format!("{i}/3"), &data);
        args.extend(["--record-dir".into(), tmp.path().join(&name).display().to_string()]);
        nodes.push(Daemon::start("edge-node", &name, &args, tmp.path())?);
    }
    std::thread::sleep(Duration::from_millis(800));
    let mut extra = vec![
        ("rounds", "3".to_string()),
        ("sampling.min_nodes", "3".to_string()),
        ("sampling.min_available", "3".to_string()),
        ("data.synthetic_test_samples", "500".to_string()),
        ("eval.threads", "1".to_string()),
    ];
    extra.extend(data.iter().cloned());
    let mut coord = Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &out, &extra),
        tmp.path(),
    )?;
    let status = coord.wait(Duration::from_secs(240))?;
    assert!(status.success(), "coordinator failed:\n{}", coord.log_text());
    for n in &mut nodes {
        let s = n.wait(Duration::from_secs(20))?;
        assert!(s.success(), "{} failed:\n{}", n.name, n.log_text());
        assert!(
            n.log_text().contains("reconnecting"),
            "{} should have retried before the coordinator was up",
            n.name
        );
    }

    let history = run_history(&out)?;
    assert_eq!(history["finished"], true);
    let rounds = history["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);

    // Accuracy rises well above chance (10 classes).
    let acc: Vec<f64> = rounds.iter().map(|r| r["test_accuracy"].as_f64().unwrap()).collect();
    assert!(acc[2] > 0.5, "final accuracy {acc:?}");
    assert!(acc[2] >= acc[0], "accuracy fell: {acc:?}");

    // Every node contributed to every round.
    let everyone: BTreeSet<String> = (1..=3).map(|i| format!("node-{i}")).collect();
    for r in rounds {
        let who: BTreeSet<String> = r["participants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["node"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(who, everyone);
    }

    // Each round's global model is the sample-weighted mean of exactly the
    // updates the nodes sent (their audit copies), applied to the previous one.
    for round in 1..=3u64 {
        let prev = load_params(&out.join(format!("rounds/round-{:04}.safetensors", round - 1)))?;
        let next = load_params(&out.join(format!("rounds/round-{round:04}.safetensors")))?;
        assert_eq!(prev.values.len(), PARAMS_CNN);
        let mut sum = vec![0f64; PARAMS_CNN];
        let mut weight = 0f64;
        for name in &everyone {
            let upd = load_params(&tmp.path().join(name).join(format!("round-{round:04}.safetensors")))?;
            assert_eq!(upd.manifest, prev.manifest);
            assert_eq!(meta_u64(&upd, "base_version"), round - 1);
            let n = meta_u64(&upd, "num_samples") as f64;
            assert_eq!(n, 600.0);
            for (s, d) in sum.iter_mut().zip(&upd.values) {
                *s += n * f64::from(*d);
            }
            weight += n;
        }
        let mut worst = 0f64;
        for ((p, n), s) in prev.values.iter().zip(&next.values).zip(&sum) {
            let expect = f64::from(*p) + s / weight;
            let err = (f64::from(*n) - expect).abs() / expect.abs().max(1e-3);
            worst = worst.max(err);
        }
        assert!(
            worst < 1e-5,
            "round {round}: global model differs from FedAvg by {worst}"
        );
    }
    let final_model = load_params(&out.join("model.safetensors"))?;
    let last = load_params(&out.join("rounds/round-0003.safetensors"))?;
    assert_eq!(final_model.values, last.values);
    assert_eq!(meta_u64(&final_model, "round"), 3);

    // Only parameters cross the wire: uplink per round is three updates plus
    // framing, far below the 1800 x 3072 bytes of training images.
    let update_bytes = (PARAMS_CNN * 4) as u64;
    for r in rounds {
        let up = r["bytes_up"].as_u64().unwrap();
        assert!(up >= 3 * update_bytes, "uplink {up} smaller than three updates");
        assert!(
            up <= 3 * (update_bytes + 16 * 1024),
            "uplink {up} exceeds what three updates need"
        );
        let down = r["bytes_down"].as_u64().unwrap();
        assert!(down <= 3 * (update_bytes + 16 * 1024), "downlink {down}");
    }
    Ok(())
}

#[test]
fn a_model_larger_than_16_mib_moves_in_chunks() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let port = free_port();
    let data = [
        ("data.synthetic_train_samples", "128".to_string()),
        ("data.synthetic_test_samples", "64".to_string()),
    ];
    let mut extra = vec![
        ("model", "\"cnn-wide\"".to_string()),
        ("rounds", "1".to_string()),
        ("train.max_steps", "1".to_string()),
        ("wire.chunk_bytes", "1048576".to_string()),
        ("checkpoint.keep_round_models", "false".to_string()),
    ];
    extra.extend(data.iter().cloned());
    let mut coord = Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &out, &extra),
        tmp.path(),
    )?;
    let mut nodes = start_nodes(tmp.path(), port, 2, 2, |_| data.to_vec())?;
    let status = coord.wait(Duration::from_secs(300))?;
    assert!(status.success(), "coordinator failed:\n{}", coord.log_text());
    for n in &mut nodes {
        assert!(n.wait(Duration::from_secs(30))?.success(), "{}", n.log_text());
    }
    let model = load_params(&out.join("model.safetensors"))?;
    assert_eq!(model.values.len(), 25_286_730);
    let bytes = 25_286_730u64 * 4;
    assert!(bytes > 16 << 20);
    let history = run_history(&out)?;
    let round = &history["rounds"][0];
    assert_eq!(round["participants"].as_array().unwrap().len(), 2);
    assert!(round["bytes_up"].as_u64().unwrap() >= 2 * bytes);
    assert!(round["bytes_down"].as_u64().unwrap() >= 2 * bytes);
    Ok(())
}
