//! Bad input changes nothing: a real coordinator gets, from a third node,
//! every kind of malformed or hostile update stream (wrong shapes and
//! dtype, NaN and infinity, an oversized norm, overlong, oversized,
//! truncated and stalled streams, a bad checksum, chunks out of order, an
//! unknown codec, the wrong round or base version, a forged session) plus a
//! stolen node name and a resent update. Each gets its own status and
//! counter, and the global model after the round is bit for bit the one of
//! a clean run where only the two honest updates arrive.

use std::path::Path;
use std::time::Duration;

use fedge_common::pb;
use fedge_tests::raw::{
    Node, Upload, data, header, honest, join, join_request, model_manifest, numel, send, task, trailer,
};
use fedge_tests::{Daemon, coordinator_args, free_port, load_params, plaintext_client, run_history};

fn start(dir: &Path, port: u16) -> anyhow::Result<Daemon> {
    let settings = [
        ("rounds", "1".to_string()),
        ("seed", "7".into()),
        ("sampling.min_nodes", "2".into()),
        ("sampling.min_available", "3".into()),
        ("sampling.failure_cooldown_rounds", "0".into()),
        ("strategy.max_update_norm", "10.0".into()),
        ("limits.stream_idle_timeout", "\"1s\"".into()),
        ("data.synthetic_test_samples", "50".into()),
    ];
    Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &dir.join("run"), &settings),
        dir,
    )
}

/// Runs one round with honest nodes a (10 samples) and b (30), and node c
/// that either attacks (`attack`) or simply leaves. Returns the final
/// model's bytes and the run history.
async fn run(dir: &Path, attack: bool) -> anyhow::Result<(Vec<u32>, serde_json::Value)> {
    let port = free_port();
    let mut coord = start(dir, port)?;
    let mut a = join(port, "node-a", 10).await?;
    let mut b = join(port, "node-b", 30).await?;
    let mut c = join(port, "node-c", 20).await?;
    let (ta, tb, tc) = (task(&mut a).await?, task(&mut b).await?, task(&mut c).await?);
    let manifest = model_manifest(&mut a).await?;
    let n = numel(&manifest);
    let good_a = Upload::new(&a.session, &ta, &manifest, &honest(n, 1), 10);
    let good_b = Upload::new(&b.session, &tb, &manifest, &honest(n, 2), 30);

    if attack {
        attacks(port, &mut c, &tc, &manifest, n).await?;
    } else {
        drop(c);
    }
    let ack = send(&mut a.client, good_a.messages(1 << 20)).await?;
    assert_eq!(ack.round, 1);
    if attack {
        // A resend (as after a lost acknowledgement) counts once.
        let s = send(&mut a.client, good_a.messages(1 << 20)).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::AlreadyExists);
        assert_eq!(s.message(), "node node-a already contributed to round 1");
    }
    send(&mut b.client, good_b.messages(1 << 18)).await?;
    let status = coord.wait(Duration::from_secs(120))?;
    anyhow::ensure!(status.success(), "coordinator failed:\n{}", coord.log_text());
    let model = load_params(&dir.join("run/model.safetensors"))?;
    let bits = model.values.iter().map(|v| v.to_bits()).collect();
    Ok((bits, run_history(&dir.join("run"))?))
}

async fn attacks(port: u16, c: &mut Node, tc: &pb::TrainTask, manifest: &pb::Manifest, n: usize) -> anyhow::Result<()> {
    let session = c.session.clone();
    let fine = honest(n, 3);
    let base = Upload::new(&session, tc, manifest, &fine, 20);
    let expect = |code: tonic::Code, msg: &str, got: Result<pb::SubmitAck, tonic::Status>| {
        let s = got.expect_err(msg);
        assert_eq!(s.code(), code, "{msg}: {}", s.message());
        assert!(s.message().contains(msg), "expected `{msg}`, got `{}`", s.message());
    };
    let cl = &mut c.client;

    // Wrong shape: one tensor's dimensions swapped.
    let mut u = Upload::new(&session, tc, manifest, &fine, 20);
    let shape = &mut u.header.manifest.as_mut().unwrap().tensors[0].shape;
    shape.reverse();
    shape[0] += 1;
    expect(
        tonic::Code::InvalidArgument,
        "does not match the model",
        send(cl, u.messages(1 << 20)).await,
    );
    // Wrong dtype: f16 when the run announced f32.
    let mut u = Upload::new(&session, tc, manifest, &fine, 20);
    u.header.manifest.as_mut().unwrap().encoding = pb::Encoding::F16Le as i32;
    expect(
        tonic::Code::InvalidArgument,
        "update is encoded as ENCODING_F16_LE (block 0); this run's updates use f32",
        send(cl, u.messages(1 << 20)).await,
    );
    // Unknown codec.
    let mut u = Upload::new(&session, tc, manifest, &fine, 20);
    u.header.manifest.as_mut().unwrap().encoding = 99;
    expect(
        tonic::Code::InvalidArgument,
        "update is encoded as",
        send(cl, u.messages(1 << 20)).await,
    );
    // NaN and infinity.
    for (i, bad) in [(17usize, f32::NAN), (n - 1, f32::INFINITY)] {
        let mut v = fine.clone();
        v[i] = bad;
        let u = Upload::new(&session, tc, manifest, &v, 20);
        expect(
            tonic::Code::InvalidArgument,
            &format!("update value {i} is not finite"),
            send(cl, u.messages(1 << 20)).await,
        );
    }
    // Norm above strategy.max_update_norm.
    let u = Upload::new(&session, tc, manifest, &vec![1.0; n], 20);
    expect(
        tonic::Code::InvalidArgument,
        "exceeds the bound",
        send(cl, u.messages(1 << 20)).await,
    );
    // Zero samples; the wrong kind of update for FedAvg.
    let mut u = Upload::new(&session, tc, manifest, &fine, 0);
    expect(
        tonic::Code::InvalidArgument,
        "zero training samples",
        send(cl, u.messages(1 << 20)).await,
    );
    u.header.num_samples = 20;
    u.header.kind = pb::UpdateKind::Gradient as i32;
    expect(
        tonic::Code::InvalidArgument,
        "expects",
        send(cl, u.messages(1 << 20)).await,
    );
    // Overlong: more bytes than announced.
    let mut msgs = base.messages(1 << 20);
    msgs.insert(msgs.len() - 1, data(vec![0; 8]));
    expect(tonic::Code::InvalidArgument, "payload", send(cl, msgs).await);
    // Oversized: one message above limits.max_message_bytes.
    let msgs = vec![header(base.header.clone()), data(vec![0; 5 << 20]), trailer(0)];
    let s = send(cl, msgs).await.unwrap_err();
    assert!(
        matches!(
            s.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
        ),
        "{s:?}"
    );
    // Truncated: the trailer comes early; or the stream just ends.
    let mut msgs = base.messages(1 << 16);
    msgs.remove(3);
    expect(tonic::Code::InvalidArgument, "payload", send(cl, msgs).await);
    let mut msgs = base.messages(1 << 16);
    msgs.pop();
    expect(
        tonic::Code::InvalidArgument,
        "ended without a trailer",
        send(cl, msgs).await,
    );
    // Bad checksum.
    let mut msgs = base.messages(1 << 20);
    *msgs.last_mut().unwrap() = trailer(base.crc ^ 1);
    expect(tonic::Code::DataLoss, "checksum mismatch", send(cl, msgs).await);
    // Flipped payload bit with the original checksum.
    let mut flipped = Upload::new(&session, tc, manifest, &fine, 20);
    flipped.payload[1000] ^= 0x10;
    flipped.crc = base.crc;
    expect(
        tonic::Code::DataLoss,
        "checksum mismatch",
        send(cl, flipped.messages(1 << 20)).await,
    );
    // Chunks out of order: data before the header, a second header.
    let mut msgs = base.messages(1 << 20);
    msgs.swap(0, 1);
    expect(
        tonic::Code::InvalidArgument,
        "must start with its header",
        send(cl, msgs).await,
    );
    let mut msgs = base.messages(1 << 20);
    msgs.insert(2, header(base.header.clone()));
    expect(tonic::Code::InvalidArgument, "a second header", send(cl, msgs).await);
    // Another round, another base version: the status names both.
    let mut u = Upload::new(&session, tc, manifest, &fine, 20);
    u.header.round = 2;
    expect(
        tonic::Code::FailedPrecondition,
        "update for round 2; round 1 is in progress",
        send(cl, u.messages(1 << 20)).await,
    );
    u.header.round = 1;
    u.header.base_version = 5;
    expect(
        tonic::Code::FailedPrecondition,
        "update computed against model version 5; the current version is 0",
        send(cl, u.messages(1 << 20)).await,
    );
    // A forged session.
    let mut u = Upload::new(&session, tc, manifest, &fine, 20);
    u.header.node_id = "forged".into();
    expect(
        tonic::Code::Unauthenticated,
        "unknown node session",
        send(cl, u.messages(1 << 20)).await,
    );
    // A stalled stream: header and one chunk, then silence.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let stalled = base.messages(1 << 16);
    tx.send(stalled[0].clone()).await?;
    tx.send(stalled[1].clone()).await?;
    let s = cl
        .submit_update(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    drop(tx);
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{s:?}");
    assert!(s.message().contains("sent nothing for 1s"), "{}", s.message());
    // Another process claiming a connected node's name.
    let mut thief = plaintext_client(port).await;
    let s = thief.join(join_request("node-a", 1000)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::AlreadyExists);
    assert!(
        s.message()
            .starts_with("node node-a is already connected in another session")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_leave_the_global_model_bit_for_bit_unchanged() -> anyhow::Result<()> {
    let clean_dir = tempfile::tempdir()?;
    let attacked_dir = tempfile::tempdir()?;
    let (clean, _) = run(clean_dir.path(), false).await?;
    let (attacked, history) = run(attacked_dir.path(), true).await?;
    assert_eq!(clean.len(), attacked.len());
    let differing = clean.iter().zip(&attacked).filter(|(a, b)| a != b).count();
    assert_eq!(
        differing, 0,
        "the attacked run's model differs from the clean run's in {differing} values"
    );

    let round = &history["rounds"][0];
    let names: Vec<&str> = round["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"node-a") && names.contains(&"node-b"));
    let refusals = &round["refusals"];
    for (label, at_least) in [
        ("malformed_payload", 9),
        ("non_finite", 2),
        ("norm_too_large", 1),
        ("no_samples", 1),
        ("wrong_kind", 1),
        ("checksum", 2),
        ("wrong_round", 1),
        ("wrong_base_version", 1),
        ("unknown_session", 1),
        ("stream_idle", 1),
        ("duplicate", 1),
        ("name_in_use", 1),
    ] {
        let got = refusals[label].as_u64().unwrap_or(0);
        assert!(got >= at_least, "{label}: {got} < {at_least} in {refusals}");
    }
    Ok(())
}
