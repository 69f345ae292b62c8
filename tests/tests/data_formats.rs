//! A fleet on MNIST-format data: `coordinator partition` splits IDX files
//! with Dirichlet label skew, three edge nodes train the FedAvg paper's MNIST
//! CNN on their own folders with a held-out split, and the coordinator
//! records central and federated evaluation.

use std::path::Path;
use std::time::Duration;

use fedge_tests::{Daemon, free_port, run_history, run_to_end};

/// Writes a learnable MNIST-shaped set in IDX format: each class is a blocky
/// 7x7 pattern scaled to 28x28, with pixel noise.
fn write_idx(dir: &Path, prefix: &str, n: usize, seed: u64) {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut proto_state = 0x1234_5678u64;
    let protos: Vec<Vec<u8>> = (0..10)
        .map(|_| {
            (0..49)
                .map(|_| {
                    proto_state = proto_state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    if (proto_state >> 33).is_multiple_of(2) { 0 } else { 220 }
                })
                .collect()
        })
        .collect();
    let mut images = Vec::new();
    for v in [0x0803u32, n as u32, 28, 28] {
        images.extend_from_slice(&v.to_be_bytes());
    }
    let mut labels = Vec::new();
    for v in [0x0801u32, n as u32] {
        labels.extend_from_slice(&v.to_be_bytes());
    }
    for _ in 0..n {
        let class = (next() % 10) as usize;
        labels.push(class as u8);
        for y in 0..28 {
            for x in 0..28 {
                let base = i32::from(protos[class][(y / 4) * 7 + x / 4]);
                let noise = (next() % 120) as i32 - 60;
                images.push((base + noise).clamp(0, 255) as u8);
            }
        }
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
}

#[test]
fn a_partitioned_mnist_fleet_trains_the_mnist_cnn() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("mnist");
    std::fs::create_dir_all(&src)?;
    write_idx(&src, "train", 1500, 1);
    write_idx(&src, "t10k", 300, 2);
    let parts = tmp.path().join("parts");
    let (status, err) = run_to_end(
        "coordinator",
        &[
            "partition",
            "--data-path",
            src.to_str().unwrap(),
            "--out",
            parts.to_str().unwrap(),
            "--nodes",
            "3",
            "--scheme",
            "dirichlet",
            "--alpha",
            "1.0",
            "--seed",
            "5",
        ],
    )?;
    assert!(status.success(), "{err}");
    let table = std::fs::read_to_string(parts.join("partition.md"))?;
    assert!(
        table.contains("dirichlet(alpha=1)") && table.contains("| node-3 |"),
        "{table}"
    );

    let out = tmp.path().join("run");
    let port = free_port();
    let coord_args: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--out-dir",
        out.to_str().unwrap(),
        "--data-path",
        parts.join("coordinator").to_str().unwrap(),
        "--model",
        "mnist-cnn",
        "--rounds",
        "3",
        "--set",
        "sampling.min_available=3",
        "--set",
        "train.learning_rate=0.02",
        "--set",
        "security.insecure=true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut coord = Daemon::start("coordinator", "coordinator", &coord_args, tmp.path())?;
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let name = format!("node-{i}");
        let args: Vec<String> = [
            "--coordinator",
            &format!("http://127.0.0.1:{port}"),
            "--name",
            &name,
            "--data-path",
            parts.join(&name).to_str().unwrap(),
            "--threads",
            "1",
            "--set",
            "holdout=0.1",
            "--set",
            "security.insecure=true",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        nodes.push(Daemon::start("edge-node", &name, &args, tmp.path())?);
    }
    assert!(coord.wait(Duration::from_secs(300))?.success(), "{}", coord.log_text());
    for n in &mut nodes {
        assert!(n.wait(Duration::from_secs(30))?.success(), "{}", n.log_text());
    }
    let history = run_history(&out)?;
    assert_eq!(history["model"], "mnist-cnn");
    assert_eq!(history["parameters"], 1_663_370);
    let rounds = history["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    let last = &rounds[2];
    let acc = last["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.6, "central accuracy {acc}");
    // Federated evaluation covers every node's held-out tenth.
    let fed = last["federated_accuracy"].as_f64().unwrap();
    assert!(fed > 0.6, "federated accuracy {fed}");
    let held: u64 = last["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["holdout_examples"].as_u64().unwrap())
        .sum();
    assert_eq!(last["federated_examples"].as_u64().unwrap(), held);
    assert!((140..=160).contains(&held), "held out {held} of 1500");
    Ok(())
}
