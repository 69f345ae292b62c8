//! What users see when something is wrong: refused joins, unknown sessions,
//! malformed configuration. Each check reads the message a person would read.

use std::path::Path;

use fedge_common::pb;
use fedge_tests::{Daemon, free_port, plaintext_client, run_to_end};

fn start_coordinator(dir: &Path, port: u16) -> anyhow::Result<Daemon> {
    let args: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--out-dir",
        &dir.join("run").display().to_string(),
        "--set",
        "data.synthetic_test_samples=50",
        "--set",
        "security.insecure=true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Daemon::start("coordinator", "coordinator", &args, dir)
}

fn join(version: u32, name: &str, models: &[&str]) -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: version,
        node_name: name.into(),
        num_samples: 10,
        models: models.iter().map(|m| m.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_coordinator_refuses_bad_peers_with_clear_statuses() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let port = free_port();
    let _coord = start_coordinator(tmp.path(), port)?;
    let mut c = plaintext_client(port).await;

    let s = c.join(join(99, "n1", &["cnn"])).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        s.message(),
        format!(
            "protocol version mismatch: node speaks v99, coordinator speaks v{}",
            pb::PROTOCOL_VERSION
        )
    );

    let s = c.join(join(pb::PROTOCOL_VERSION, "n1", &["mlp"])).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        s.message(),
        "this run trains model `cnn`, which node n1 cannot build (it offers: mlp)"
    );

    let s = c.join(join(pb::PROTOCOL_VERSION, "  ", &["cnn"])).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);

    let s = c
        .instructions(pb::InstructionsRequest {
            node_id: "forged".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    assert_eq!(s.message(), "unknown node session; join again");

    let s = c
        .fetch_model(pb::FetchModelRequest {
            node_id: "forged".into(),
            version: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);

    let header = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            node_id: "forged".into(),
            round: 1,
            base_version: 0,
            num_samples: 10,
            manifest: None,
            metrics: None,
            ..Default::default()
        })),
    };
    let s = c.submit_update(tokio_stream::iter(vec![header])).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);

    // A joined node that is not in a round gets told so.
    let joined = c.join(join(pb::PROTOCOL_VERSION, "n1", &["cnn"])).await?.into_inner();
    let header = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            node_id: joined.node_id.clone(),
            round: 1,
            base_version: 0,
            num_samples: 10,
            manifest: None,
            metrics: None,
            ..Default::default()
        })),
    };
    let s = c.submit_update(tokio_stream::iter(vec![header])).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert_eq!(s.message(), "update for round 1; no round is accepting updates");

    let s = c
        .fetch_model(pb::FetchModelRequest {
            node_id: joined.node_id,
            version: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::NotFound);
    assert_eq!(
        s.message(),
        "model version 7 is not available; the current version is 0"
    );
    Ok(())
}

#[test]
fn malformed_configuration_is_reported_before_anything_starts() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "rounds = 3\n[sampling]\nfracton = 0.5\n")?;
    let (status, err) = run_to_end("coordinator", &["serve", "--config", bad.to_str().unwrap()])?;
    assert!(!status.success());
    assert!(err.contains("unknown field `fracton`"), "{err}");

    let (status, err) = run_to_end("coordinator", &["serve", "--set", "sampling.min_nodes=0"])?;
    assert!(!status.success());
    assert!(err.contains("sampling.min_nodes must be at least 1"), "{err}");

    let (status, err) = run_to_end("edge-node", &["--partition", "4/3", "--set", "security.insecure=true"])?;
    assert!(!status.success());
    assert!(
        err.contains("partition index must be below the partition count, got 4/3"),
        "{err}"
    );

    let (status, err) = run_to_end(
        "edge-node",
        &["--set", "security.insecure=true", "--set", "train.slowdown=0.5"],
    )?;
    assert!(!status.success());
    assert!(
        err.contains("train.slowdown must be between 1 (the machine's own speed) and 1000, got 0.5"),
        "{err}"
    );

    let (status, err) = run_to_end(
        "edge-node",
        &[
            "--data-path",
            tmp.path().to_str().unwrap(),
            "--set",
            "security.insecure=true",
        ],
    )?;
    assert!(!status.success());
    assert!(err.contains("no data set found here"), "{err}");

    // The flag takes the architectures this build has, and says which.
    let (status, err) = run_to_end("coordinator", &["fleet", "--model", "cnn-huge"])?;
    assert!(!status.success());
    assert!(err.contains("invalid value 'cnn-huge' for '--model <MODEL>'"), "{err}");
    for name in fedge_learn::model::ModelKind::known_names() {
        assert!(err.contains(name), "{name} missing from: {err}");
    }
    Ok(())
}
