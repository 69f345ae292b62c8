//! `fedge-hostile`: hostile clients for load tests, written from the
//! protocol alone. Against a coordinator it keeps up, for `--seconds`:
//!
//! - `--stalled-uploads` update streams that never send their header;
//! - a join flood: `--join-tasks` loops joining under fresh names (with a
//!   wrong token where nodes authenticate);
//! - optionally one authenticated hostile node (`--name`, `--token-file`)
//!   that, for every task it is given, opens a download it never reads, an
//!   update stream that trickles a byte at a time, and `--extra` more
//!   uploads and downloads on top (each refused at once).
//!
//! It prints what the coordinator answered, by status code, at the end.
//!
//!   fedge-hostile --coordinator http://127.0.0.1:7070 --stalled-uploads 800 --seconds 120

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use fedge_common::pb::{self, PROTOCOL_VERSION, federation_client::FederationClient};
use fedge_common::security::TOKEN_METADATA;
use prost::bytes::Bytes;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(name = "fedge-hostile", about = "Hostile clients that load a coordinator")]
struct Args {
    /// The coordinator's gRPC endpoint (plaintext).
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    coordinator: String,
    /// Update streams kept open that never send their header.
    #[arg(long, default_value_t = 800)]
    stalled_uploads: usize,
    /// Concurrent loops joining under fresh names.
    #[arg(long, default_value_t = 16)]
    join_tasks: usize,
    /// An authenticated hostile node's name (with --token-file).
    #[arg(long)]
    name: Option<String>,
    /// The hostile node's token file.
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Extra uploads and downloads the hostile node tries per task.
    #[arg(long, default_value_t = 100)]
    extra: usize,
    /// How long to keep it up.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
}

/// Answers by what was tried and the status code.
#[derive(Debug, Default)]
struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    fn count(&self, what: &str, got: &Result<(), tonic::Status>) {
        let code = match got {
            Ok(()) => "ok".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(format!("{what}: {code}"))
            .or_default() += 1;
    }
}

async fn channel(url: &str, small_window: bool) -> Result<Channel> {
    let mut e = Endpoint::from_shared(url.to_owned())?;
    if small_window {
        // A client that stops reading: the coordinator may send it one window.
        e = e
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match e.connect().await {
            Ok(c) => return Ok(c),
            Err(err) if Instant::now() > deadline => return Err(err).context("connecting to the coordinator"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn join_request(name: &str, token: Option<&str>) -> tonic::Request<pb::JoinRequest> {
    let mut r = tonic::Request::new(pb::JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        node_name: name.into(),
        num_samples: 1000,
        models: fedge_learn::model::ModelKind::known_names()
            .into_iter()
            .map(String::from)
            .collect(),
        ..Default::default()
    });
    if let Some(t) = token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        r.metadata_mut().insert(TOKEN_METADATA, v);
    }
    r
}

/// An update stream that never sends its header, reopened whenever the
/// coordinator ends it.
async fn stalled_upload(url: String, until: Instant, tally: Arc<Tally>) -> Result<()> {
    let mut client = FederationClient::new(channel(&url, false).await?);
    while Instant::now() < until {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::UpdateChunk>(1);
        let call = client.submit_update(tokio_stream::wrappers::ReceiverStream::new(rx));
        let got = tokio::time::timeout_at(until.into(), call).await;
        drop(tx);
        match got {
            // The coordinator is gone: the attack is over.
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => return Ok(()),
            Ok(r) => tally.count("stalled upload", &r.map(|_| ())),
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Joins under fresh names as fast as the coordinator answers.
async fn join_flood(url: String, loop_id: usize, until: Instant, tally: Arc<Tally>) -> Result<()> {
    let mut client = FederationClient::new(channel(&url, false).await?);
    let mut i = 0u64;
    while Instant::now() < until {
        let name = format!("flood-{loop_id}-{i}");
        let got = client.join(join_request(&name, Some("not-a-token"))).await.map(|_| ());
        if got.as_ref().is_err_and(|s| s.code() == tonic::Code::Unavailable) {
            return Ok(());
        }
        tally.count("join flood", &got);
        i += 1;
    }
    Ok(())
}

/// The authenticated hostile node: for every task, a download it never
/// reads, an update stream that trickles, and `extra` more of each.
async fn hostile_node(args: Arc<Args>, until: Instant, tally: Arc<Tally>) -> Result<()> {
    let (Some(name), Some(token_file)) = (&args.name, &args.token_file) else {
        return Ok(());
    };
    let token = std::fs::read_to_string(token_file)?.trim().to_owned();
    let mut client = FederationClient::new(channel(&args.coordinator, false).await?);
    let stalling = FederationClient::new(channel(&args.coordinator, true).await?);
    let joined = client.join(join_request(name, Some(&token))).await?.into_inner();
    let session = joined.node_id;
    // The model's layout, built here, so the trickle's header passes.
    let settings = joined.settings.context("join response without run settings")?;
    let kind: fedge_learn::model::ModelKind = settings.model.parse().context("the run's model")?;
    let input: [i64; 3] = settings
        .input_shape
        .as_slice()
        .try_into()
        .context("the run's input shape is not [channels, height, width]")?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net = kind.build(&vs.root(), input, settings.classes.len() as i64);
    let layout = fedge_learn::tensors::manifest_of(&vs);
    drop(vs);
    let manifest =
        fedge_common::wire::update_manifest(&layout, &fedge_common::codec::Codec::F32, 4 * layout.numel() as u64);
    let mut instructions = client
        .instructions(pb::InstructionsRequest {
            node_id: session.clone(),
        })
        .await?
        .into_inner();
    let mut held = Vec::new();
    loop {
        let msg = match tokio::time::timeout_at(until.into(), instructions.message()).await {
            Ok(Ok(Some(m))) => m,
            _ => return Ok(()),
        };
        let Some(pb::instruction::Kind::Train(task)) = msg.kind else {
            continue;
        };
        let fetch = pb::FetchModelRequest {
            node_id: session.clone(),
            version: task.model_version,
            part: pb::ModelPart::Parameters as i32,
        };
        // A download that is never read, held until the coordinator ends it.
        let first = stalling.clone().fetch_model(fetch.clone()).await;
        tally.count("stalled download", &first.as_ref().map(|_| ()).map_err(Clone::clone));
        if let Ok(stream) = first {
            held.push(stream.into_inner());
        }
        // An update that trickles: its header, then a byte every two seconds.
        let header = pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
                node_id: session.clone(),
                round: task.round,
                base_version: task.model_version,
                num_samples: 1000,
                manifest: Some(manifest.clone()),
                ..Default::default()
            })),
        };
        let mut trickle_client = client.clone();
        let trickle_tally = tally.clone();
        let trickle_header = header.clone();
        tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let _ = tx.send(trickle_header).await;
            let sender = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let byte = pb::UpdateChunk {
                        part: Some(pb::update_chunk::Part::Data(Bytes::from_static(&[0]))),
                    };
                    if tx.send(byte).await.is_err() {
                        return;
                    }
                }
            });
            let got = trickle_client
                .submit_update(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            sender.abort();
            trickle_tally.count("trickle upload", &got.map(|_| ()));
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..args.extra {
            let got = client.fetch_model(fetch.clone()).await.map(|_| ());
            tally.count("extra download", &got);
            let got = client
                .submit_update(tokio_stream::iter([header.clone()]))
                .await
                .map(|_| ());
            tally.count("extra upload", &got);
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let tally = Arc::new(Tally::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.stalled_uploads {
        tasks.spawn(stalled_upload(args.coordinator.clone(), until, tally.clone()));
    }
    for i in 0..args.join_tasks {
        tasks.spawn(join_flood(args.coordinator.clone(), i, until, tally.clone()));
    }
    tasks.spawn(hostile_node(args.clone(), until, tally.clone()));
    eprintln!(
        "fedge-hostile: {} stalled uploads, {} join loops{} for {} s",
        args.stalled_uploads,
        args.join_tasks,
        args.name
            .as_deref()
            .map(|n| format!(", hostile node {n}"))
            .unwrap_or_default(),
        args.seconds
    );
    let all = async {
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res.map_err(anyhow::Error::from).and_then(|r| r) {
                eprintln!("fedge-hostile: a client stopped: {e:#}");
            }
        }
    };
    tokio::select! {
        () = all => {}
        _ = tokio::signal::ctrl_c() => eprintln!("fedge-hostile: interrupted"),
    }
    let tally = tally.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for (what, n) in tally.iter() {
        eprintln!("fedge-hostile: {what}: {n}");
    }
    Ok(())
}
