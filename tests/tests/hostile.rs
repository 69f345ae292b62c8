//! Hostile nodes against a real coordinator, through a gRPC client written
//! from the protocol alone (not the edge node): each attack gets its status
//! and message, the coordinator keeps serving, and the committed model is
//! what the honest updates make of it.
//!
//! Honest nodes `a` and `b` (100 samples each) and two attackers join:
//! `c` declares 2^64 − 1 samples at join and finally sends a zero update
//! (the "freeze" attack: capped at `strategy.max_weight_factor` × the
//! cohort's median, it slows the round down by a bounded share instead of
//! freezing it), and `d` declares 100 and lies about it in its update. On
//! the way: names that forge log lines or flood the status, a download
//! without a task, a finite but huge update, the negated model, a permuted
//! manifest, 70 update streams and 300 stalled downloads from one node.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use fedge_common::pb;
use fedge_common::pb::sec_agg_message::Kind;
use fedge_common::secagg;
use fedge_tests::raw::{Upload, fetch_values, header, honest, join, join_request, model_manifest, numel, send, task};
use fedge_tests::{Daemon, coordinator_args, free_port, plaintext_client, run_history};

fn start(dir: &Path, port: u16) -> anyhow::Result<Daemon> {
    let settings = [
        ("rounds", "1".to_string()),
        ("seed", "7".into()),
        ("sampling.min_nodes", "2".into()),
        ("sampling.min_available", "4".into()),
        ("sampling.failure_cooldown_rounds", "0".into()),
        ("limits.stream_idle_timeout", "\"10s\"".into()),
        ("data.synthetic_test_samples", "50".into()),
    ];
    Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &dir.join("run"), &settings),
        dir,
    )
}

fn refused<T: std::fmt::Debug>(got: Result<T, tonic::Status>, code: tonic::Code, msg: &str) -> tonic::Status {
    let s = got.expect_err(msg);
    assert_eq!(s.code(), code, "{msg}: {}", s.message());
    assert!(s.message().contains(msg), "expected `{msg}`, got `{}`", s.message());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_nodes_get_clear_refusals_and_cannot_take_the_model_over() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let port = free_port();
    let mut coord = start(tmp.path(), port)?;

    // Names are checked before anything logs or echoes them.
    let mut stranger = plaintext_client(port).await;
    let forged = "x\n2026-01-01T00:00:00Z  INFO round complete round=99 test_accuracy=100%";
    for (name, why) in [
        (forged.to_string(), "not allowed at byte 1"),
        ("nul\0byte".into(), "not allowed at byte 3"),
        ("esc\u{1b}[31mred".into(), "not allowed at byte 3"),
        ("m".repeat(1 << 20), "is 1048576 bytes long"),
    ] {
        let s = refused(
            stranger.join(join_request(&name, 10)).await,
            tonic::Code::InvalidArgument,
            why,
        );
        assert!(s.message().len() < 300, "a {}-byte refusal", s.message().len());
    }
    let mut many = join_request("many-models", 10);
    many.models = (0..100_000).map(|i| format!("model-{i}")).collect();
    let s = refused(
        stranger.join(many).await,
        tonic::Code::InvalidArgument,
        "at most 64 model names",
    );
    assert!(s.message().len() < 300, "a {}-byte refusal", s.message().len());
    // A joined session that has no task downloads nothing.
    let idle = stranger.join(join_request("idle-e", 10)).await?.into_inner().node_id;
    refused(
        stranger
            .fetch_model(pb::FetchModelRequest {
                node_id: idle,
                version: 0,
                part: pb::ModelPart::Parameters as i32,
            })
            .await,
        tonic::Code::FailedPrecondition,
        "node idle-e has no task for model version 0; only nodes training in the round in progress fetch the model",
    );

    let mut a = join(port, "node-a", 100).await?;
    let mut b = join(port, "node-b", 100).await?;
    let mut c = join(port, "node-c", u64::MAX).await?;
    let mut d = join(port, "node-d", 100).await?;
    let (ta, tb, tc, td) = (
        task(&mut a).await?,
        task(&mut b).await?,
        task(&mut c).await?,
        task(&mut d).await?,
    );
    let manifest = model_manifest(&mut a).await?;
    let n = numel(&manifest);
    let start_model = fetch_values(&mut a, 0).await?;
    let (ha, hb) = (honest(n, 1), honest(n, 2));

    // d lies about its data in its update.
    refused(
        send(
            &mut d.client,
            Upload::new(&d.session, &td, &manifest, &honest(n, 4), u64::MAX).messages(1 << 20),
        )
        .await,
        tonic::Code::InvalidArgument,
        "update claims 18446744073709551615 training samples; the node declared 100 when it joined",
    );

    // Finite but huge, and ten times the negated model: both far beyond
    // five times the global model's norm (the bound until a round's
    // updates are larger than the model).
    let cl = &mut c.client;
    for values in [vec![1e30f32; n], start_model.iter().map(|w| -10.0 * w).collect()] {
        refused(
            send(
                cl,
                Upload::new(&c.session, &tc, &manifest, &values, 100).messages(1 << 20),
            )
            .await,
            tonic::Code::InvalidArgument,
            "the most this run accepts (5 times",
        );
    }
    // A permuted manifest is refused with what differs.
    let mut permuted = Upload::new(&c.session, &tc, &manifest, &ha, 100);
    permuted.header.manifest.as_mut().unwrap().tensors.swap(0, 1);
    refused(
        send(cl, permuted.messages(1 << 20)).await,
        tonic::Code::InvalidArgument,
        "update manifest does not match the model at tensor 0: the update has",
    );

    // One update stream per node: c opens one (header only, then silence)
    // and 69 more are refused at once instead of taking the upload slots.
    let stalled = Upload::new(&c.session, &tc, &manifest, &ha, 100);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(header(stalled.header.clone())).await?;
    let mut held = cl.clone();
    let first = tokio::spawn(async move {
        held.submit_update(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refused_at_once = 0;
    for _ in 0..200 {
        match send(cl, vec![header(stalled.header.clone())]).await {
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                assert!(
                    s.message()
                        .contains("node node-c already has an update stream open for round 1"),
                    "{}",
                    s.message()
                );
                refused_at_once += 1;
                if refused_at_once == 69 {
                    break;
                }
            }
            // The held stream was not admitted yet: this one went through
            // the checks and ended; try again.
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(refused_at_once, 69);
    // 300 downloads from one session that stop reading (a small HTTP/2
    // window, never read): one is served, the rest refused at once.
    let stalling = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await?;
    let mut stalling = pb::federation_client::FederationClient::new(stalling);
    let mut downloads = Vec::new();
    for i in 0..300 {
        let r = stalling
            .fetch_model(pb::FetchModelRequest {
                node_id: c.session.clone(),
                version: 0,
                part: pb::ModelPart::Parameters as i32,
            })
            .await;
        if i == 0 {
            downloads.push(r?.into_inner());
        } else {
            refused(
                r,
                tonic::Code::AlreadyExists,
                "node node-c is already fetching this model part",
            );
        }
    }

    // The stalled stream ends; then c's zero update, claiming every sample
    // it declared, is accepted at a capped weight; the honest nodes deliver.
    drop(tx);
    let s = first.await?.unwrap_err();
    assert!(
        matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::DeadlineExceeded),
        "{s:?}"
    );
    drop(downloads);
    send(
        cl,
        Upload::new(&c.session, &tc, &manifest, &vec![0.0; n], u64::MAX).messages(1 << 20),
    )
    .await?;
    send(
        &mut a.client,
        Upload::new(&a.session, &ta, &manifest, &ha, 100).messages(1 << 20),
    )
    .await?;
    send(
        &mut b.client,
        Upload::new(&b.session, &tb, &manifest, &hb, 100).messages(1 << 18),
    )
    .await?;
    let status = coord.wait(Duration::from_secs(120))?;
    anyhow::ensure!(status.success(), "coordinator failed:\n{}", coord.log_text());
    let log = coord.log_text();
    assert!(!log.contains("round=99"), "a node name forged a log line:\n{log}");
    assert!(
        !log.contains('\0') && !log.contains('\u{1b}'),
        "control bytes reached the log"
    );

    // c weighs 4 x the cohort's median (100), not 2^64 - 1: the model moved
    // by (100 a + 100 b + 400 x 0) / 600 of the honest updates.
    let model = fedge_tests::load_params(&tmp.path().join("run/model.safetensors"))?;
    let mut worst = 0f64;
    for i in 0..n {
        let expected = f64::from(start_model[i]) + (100.0 * f64::from(ha[i]) + 100.0 * f64::from(hb[i])) / 600.0;
        worst = worst.max((f64::from(model.values[i]) - expected).abs());
    }
    assert!(worst < 1e-6, "the committed model is off the capped FedAvg by {worst}");

    let history = run_history(&tmp.path().join("run"))?;
    let round = &history["rounds"][0];
    let mut names: Vec<&str> = round["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["node-a", "node-b", "node-c"]);
    let refusals = &round["refusals"];
    for (label, at_least) in [
        ("bad_name", 4),
        ("samples_above_declared", 1),
        ("norm_outlier", 2),
        ("malformed_payload", 2),
        ("duplicate", 69),
        ("no_task", 1),
    ] {
        let got = refusals[label].as_u64().unwrap_or(0);
        assert!(got >= at_least, "{label}: {got} < {at_least} in {refusals}");
    }
    Ok(())
}

/// A node whose update stays inside the norm bound but turns the model
/// back on itself: the new model's central loss more than doubles, it is
/// rejected before it is committed, and the round is retried without the
/// update most against the last step (it weighs less than an honest one,
/// so only its direction gives it away), with the two honest edge nodes alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_wrecks_the_loss_is_rejected_and_its_round_retried_without_it() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let port = free_port();
    let data = [
        ("data.synthetic_train_samples", "3000".to_string()),
        ("data.synthetic_test_samples", "200".into()),
    ];
    let mut settings = vec![
        ("rounds", "2".to_string()),
        ("train.epochs", "2".into()),
        ("sampling.min_nodes", "2".into()),
        ("sampling.min_available", "3".into()),
    ];
    settings.extend(data.iter().cloned());
    let mut coord = Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &tmp.path().join("run"), &settings),
        tmp.path(),
    )?;
    let mut nodes = fedge_tests::start_nodes(tmp.path(), port, 2, 3, |_| data.to_vec())?;
    // c holds a third of the data, like the others.
    let mut c = join(port, "node-c", 1000).await?;
    let t1 = task(&mut c).await?;
    let manifest = model_manifest(&mut c).await?;
    let w0 = fetch_values(&mut c, 0).await?;
    let n = numel(&manifest);
    send(
        &mut c.client,
        Upload::new(&c.session, &t1, &manifest, &vec![0.0; n], 200).messages(1 << 20),
    )
    .await?;
    // Round 2: six times the way back from round 1's model, about 3.6
    // times the median norm of round 1's updates (the bound is five).
    let t2 = task(&mut c).await?;
    assert_eq!(t2.round, 2);
    let w1 = fetch_values(&mut c, 1).await?;
    let back: Vec<f32> = w1.iter().zip(&w0).map(|(a, b)| -6.0 * (a - b)).collect();
    send(
        &mut c.client,
        Upload::new(&c.session, &t2, &manifest, &back, 200).messages(1 << 20),
    )
    .await?;

    let status = coord.wait(Duration::from_secs(240))?;
    anyhow::ensure!(status.success(), "coordinator failed:\n{}", coord.log_text());
    for node in &mut nodes {
        anyhow::ensure!(node.wait(Duration::from_secs(60))?.success(), "{}", node.log_text());
    }
    let log = coord.log_text();
    assert!(
        log.contains("new global model rejected")
            && log.contains("left_out=node-c because=\"most against the last step\""),
        "{log}"
    );
    let history = run_history(&tmp.path().join("run"))?;
    let rounds = history["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    let mut names: Vec<&str> = rounds[1]["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["node-1", "node-2"]);
    let accuracy = rounds[1]["test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.8, "round 2 trained on the honest updates: {accuracy}");
    Ok(())
}

/// Reads `node`'s instructions until `pick` takes one.
async fn until<T>(
    node: &mut fedge_tests::raw::Node,
    what: &str,
    pick: impl Fn(pb::instruction::Kind) -> Option<T>,
) -> anyhow::Result<T> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(120), node.instructions.message())
            .await
            .map_err(|_| anyhow::anyhow!("no {what} in 120 s"))??;
        match next.and_then(|i| i.kind) {
            Some(kind) => {
                if let Some(t) = pick(kind) {
                    return Ok(t);
                }
            }
            None => anyhow::bail!("the instruction stream ended before the {what}"),
        }
    }
}

async fn secagg(
    node: &mut fedge_tests::raw::Node,
    round: u64,
    kind: pb::sec_agg_message::Kind,
) -> Result<pb::SecAggAck, tonic::Status> {
    let msg = pb::SecAggMessage {
        node_id: node.session.clone(),
        round,
        kind: Some(kind),
    };
    node.client.secure_aggregation(msg).await.map(|r| r.into_inner())
}

/// What a hostile node of a secure round holds after advertising its keys
/// and reading the roster.
struct Keys {
    client: secagg::Client,
    task: pb::TrainTask,
    sec: pb::SecureAggregationTask,
    roster: Vec<secagg::Advertise>,
    neighbours: Vec<secagg::NodeId>,
}

/// The node's next task, or none when the run stops.
async fn next_task(h: &mut fedge_tests::raw::Node) -> anyhow::Result<Option<pb::TrainTask>> {
    until(h, "task or stop", |k| match k {
        pb::instruction::Kind::Train(t) => Some(Some(t)),
        pb::instruction::Kind::Stop(_) => Some(None),
        _ => None,
    })
    .await
}

async fn advertise(h: &mut fedge_tests::raw::Node) -> anyhow::Result<Keys> {
    let task = next_task(h).await?.context("a task")?;
    advertise_for(h, task).await
}

async fn advertise_for(h: &mut fedge_tests::raw::Node, task: pb::TrainTask) -> anyhow::Result<Keys> {
    let sec = task.secure_aggregation.context("a secure task")?;
    let (client, keys) = secagg::Client::new(sec.id, task.round, &mut rand::rng());
    secagg(h, task.round, Kind::Advertise(pb::SecAggKeys::from(&keys))).await?;
    let roster = until(h, "roster", |k| match k {
        pb::instruction::Kind::SecaggRoster(r) => Some(r),
        _ => None,
    })
    .await?;
    Ok(Keys {
        client,
        sec,
        roster: roster
            .nodes
            .iter()
            .map(secagg::Advertise::try_from)
            .collect::<Result<_, _>>()?,
        neighbours: roster.neighbours,
        task,
    })
}

async fn forwarded_shares(h: &mut fedge_tests::raw::Node) -> anyhow::Result<Vec<secagg::SealedShares>> {
    let shares = until(h, "shares", |k| match k {
        pb::instruction::Kind::SecaggShares(s) => Some(s),
        _ => None,
    })
    .await?;
    Ok(shares.shares.iter().map(secagg::SealedShares::from).collect())
}

async fn unmask_request(h: &mut fedge_tests::raw::Node) -> anyhow::Result<secagg::UnmaskRequest> {
    let u = until(h, "unmasking request", |k| match k {
        pb::instruction::Kind::SecaggUnmask(u) => Some(u),
        _ => None,
    })
    .await?;
    Ok(secagg::UnmaskRequest::from(&u))
}

fn sealed(v: &[secagg::SealedShares]) -> Kind {
    Kind::Shares(pb::SealedShares {
        shares: v.iter().map(pb::SealedShare::from).collect(),
    })
}

/// Secure aggregation with a hostile fourth node beside three honest edge
/// nodes (secure aggregation needs at least three in a round). Round 1: its misnumbered keys, short commitment, shares for the
/// wrong holders or of the wrong size, and unmasking answers that would
/// unmask a survivor are refused with their reasons; its out-of-range
/// masked input shows in the unmasked sum and its lying share is named,
/// so the round is retried without it. Round 2: it seals garbage for its
/// neighbours (the coordinator cannot tell): they go on without its
/// shares, its seed cannot be rebuilt, and the round is retried without
/// it. Round 3: its input stays within what the sum's range check allows
/// but moves the mean past the norm bound; nobody can be named, so the
/// round is retried leaving out one survivor in turn until it is node-h.
/// Every committed model is the honest nodes' mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_node_in_secure_aggregation_is_refused_named_and_left_out() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let port = free_port();
    let data = [
        ("data.synthetic_train_samples", "1200".to_string()),
        ("data.synthetic_test_samples", "100".into()),
    ];
    let mut settings = vec![
        ("rounds", "3".to_string()),
        ("sampling.min_nodes", "3".into()),
        ("sampling.min_available", "4".into()),
        ("sampling.failure_cooldown_rounds", "0".into()),
        ("secure_aggregation.enabled", "true".into()),
        ("secure_aggregation.max_dropout", "0.4".into()),
        ("secure_aggregation.range", "1.0".into()),
        ("secure_aggregation.step_timeout", "\"30s\"".into()),
    ];
    settings.extend(data.iter().cloned());
    let mut coord = Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &out, &settings),
        tmp.path(),
    )?;
    let record = |i: usize| format!("\"{}\"", tmp.path().join(format!("sent-{i}")).display());
    let mut nodes = fedge_tests::start_nodes(tmp.path(), port, 3, 4, |i| {
        let mut s = data.to_vec();
        s.push(("record_dir", record(i)));
        s
    })?;
    let mut h = join(port, "node-h", 300).await?;

    // Round 1.
    let mut k = advertise(&mut h).await?;
    let (round, id) = (k.task.round, k.sec.id);
    // (Advertised already: a second, misnumbered or malformed, is refused.)
    let (_, fresh) = secagg::Client::new(id, round, &mut rand::rng());
    let mut wrong = pb::SecAggKeys::from(&fresh);
    wrong.seed_commitment.truncate(5);
    refused(
        secagg(&mut h, round, Kind::Advertise(wrong)).await,
        tonic::Code::InvalidArgument,
        "a self-mask seed commitment has 5 bytes; it is a SHA-256 digest of 32",
    );
    refused(
        secagg(&mut h, round, Kind::Advertise(pb::SecAggKeys::from(&fresh))).await,
        tonic::Code::FailedPrecondition,
        "keys came while the round is sharing",
    );
    let shares = k
        .client
        .share_keys(&k.roster, &k.neighbours, k.sec.threshold as usize)?;
    refused(
        secagg(&mut h, round, sealed(&shares[1..])).await,
        tonic::Code::FailedPrecondition,
        &format!("secure aggregation: node {id} sealed shares for"),
    );
    let mut short = shares.clone();
    short[0].ciphertext.pop();
    refused(
        secagg(&mut h, round, sealed(&short)).await,
        tonic::Code::FailedPrecondition,
        &format!(
            "node {id} sealed 81 bytes for node {}; a sealed pair of shares is 82",
            short[0].to
        ),
    );
    secagg(&mut h, round, sealed(&shares)).await?;
    let unopened = k.client.receive_shares(&forwarded_shares(&mut h).await?)?;
    assert!(unopened.is_empty(), "{unopened:?}");
    let manifest = model_manifest(&mut h).await?;
    let n = numel(&manifest);
    // Far above what an input within the range quantizes to.
    let masked = k.client.mask(&vec![(1 << 31) + (1 << 29); n + 1]);
    send(
        &mut h.client,
        Upload::masked(&h.session, &k.task, &manifest, &masked, 300).messages(1 << 20),
    )
    .await?;
    let req = unmask_request(&mut h).await?;
    let victim = *req.survivors.iter().find(|&&v| v != id).context("another survivor")?;
    let reveal = |seed_shares, key_shares| {
        Kind::Reveal(fedge_common::wire::secagg::reveal_to_wire(&secagg::Reveal {
            from: id,
            seed_shares,
            key_shares,
        }))
    };
    refused(
        secagg(&mut h, round, reveal(vec![], vec![(victim, vec![1; 33])])).await,
        tonic::Code::FailedPrecondition,
        "which is no dropped node of this round: that could unmask one node's update",
    );
    refused(
        secagg(&mut h, round, reveal(vec![(victim, vec![1; 5])], vec![])).await,
        tonic::Code::FailedPrecondition,
        "revealed a 5-byte share of the self-mask seed of node-",
    );
    let mut answer = k.client.unmask(&req)?;
    answer
        .seed_shares
        .iter_mut()
        .find(|(v, _)| *v == victim)
        .context("a share")?
        .1[5] ^= 0x55;
    secagg(&mut h, round, reveal(answer.seed_shares, answer.key_shares)).await?;

    // Round 2 (round 1's retry goes on without node-h).
    let mut k = advertise(&mut h).await?;
    let (round, id) = (k.task.round, k.sec.id);
    assert_eq!(round, 2);
    let mut garbage = k
        .client
        .share_keys(&k.roster, &k.neighbours, k.sec.threshold as usize)?;
    for s in &mut garbage {
        s.ciphertext[0] ^= 1;
    }
    secagg(&mut h, round, sealed(&garbage)).await?;
    let unopened = k.client.receive_shares(&forwarded_shares(&mut h).await?)?;
    assert_eq!(unopened.len(), 1, "only its own garbage: {unopened:?}");
    let q = secagg::Quantizer {
        range: k.sec.range,
        bits: k.sec.bits,
    };
    let masked = k.client.mask(&q.quantize(&vec![0.0; n + 1], &mut rand::rng()));
    send(
        &mut h.client,
        Upload::masked(&h.session, &k.task, &manifest, &masked, 300).messages(1 << 20),
    )
    .await?;
    let req = unmask_request(&mut h).await?;
    let answer = k.client.unmask(&req)?;
    secagg(&mut h, round, reveal(answer.seed_shares, answer.key_shares)).await?;

    // Round 3, attempt after attempt until node-h's turn to sit out.
    let mut spoiled = 0;
    while let Some(task) = next_task(&mut h).await? {
        let mut k = advertise_for(&mut h, task).await?;
        let round = k.task.round;
        assert_eq!(round, 3);
        let shares = k
            .client
            .share_keys(&k.roster, &k.neighbours, k.sec.threshold as usize)?;
        secagg(&mut h, round, sealed(&shares)).await?;
        k.client.receive_shares(&forwarded_shares(&mut h).await?)?;
        // Twice the largest value an honest input quantizes to.
        let top = (1u32 << k.sec.bits) - 1;
        let masked = k.client.mask(&vec![2 * top; n + 1]);
        send(
            &mut h.client,
            Upload::masked(&h.session, &k.task, &manifest, &masked, 300).messages(1 << 20),
        )
        .await?;
        let answer = k.client.unmask(&unmask_request(&mut h).await?)?;
        secagg(&mut h, round, reveal(answer.seed_shares, answer.key_shares)).await?;
        spoiled += 1;
    }
    assert!((1..=4).contains(&spoiled), "{spoiled} attempts");

    let status = coord.wait(Duration::from_secs(240))?;
    anyhow::ensure!(status.success(), "coordinator failed:\n{}", coord.log_text());
    let log = coord.log_text();
    assert!(log.contains("a masked input was out of range"), "{log}");
    assert!(log.contains("the unmasked mean's norm"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("left_out=node-h") && l.contains("in turn (a secure sum names nobody)")),
        "{log}"
    );
    for line in [
        format!("revealed a share of node {victim}'s self-mask seed that does not fit the others"),
        format!("0 usable shares of node {id}'s self-mask seed arrived, the threshold is 3"),
    ] {
        assert!(
            log.lines().any(|l| l.contains(&line) && l.contains("node=node-h")),
            "`{line}` not logged against node-h:\n{log}"
        );
    }
    for node in &mut nodes {
        node.wait(Duration::from_secs(30))?;
        assert!(
            node.log_text()
                .contains("secure aggregation: a neighbour's shares do not open"),
            "{}",
            node.log_text()
        );
    }

    // Each committed model moved by the honest nodes' mean (equal data:
    // equal weights), within the quantization step.
    let history = run_history(&out)?;
    let rounds = history["rounds"].as_array().context("rounds")?;
    assert_eq!(rounds.len(), 3);
    let refusals = rounds[0]["refusals"]["secure_aggregation"].as_u64().unwrap_or(0);
    assert!(refusals >= 5, "{}", rounds[0]["refusals"]);
    for (r, rec) in rounds.iter().enumerate() {
        let mut names: Vec<&str> = rec["participants"]
            .as_array()
            .context("participants")?
            .iter()
            .filter_map(|p| p["node"].as_str())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["node-1", "node-2", "node-3"], "round {}", r + 1);
        let step = fedge_tests::quantization_step(&rec["secure_aggregation"])?;
        let sent: Vec<_> = (0..3).map(|i| tmp.path().join(format!("sent-{i}"))).collect();
        let worst = fedge_tests::off_the_mean(&out, r as u64 + 1, &sent)?;
        assert!(worst <= step + 1e-6, "round {}: {worst} off the honest mean", r + 1);
    }
    Ok(())
}
