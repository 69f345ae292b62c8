//! `fedge-swarm`: many lightweight simulated edge nodes in one process, to
//! load a coordinator and measure it (memory, round time) at fleet sizes a
//! machine could not train with real nodes.
//!
//! Each simulated node joins, follows its instruction stream, downloads the
//! model version each task names (unless `--no-fetch`), and answers every
//! task with a prepared update instead of training: small seeded random
//! values, encoded once with the run's codec and shared by every node. The
//! coordinator sees ordinary nodes speaking the real protocol over TCP.
//!
//!   fedge-swarm --coordinator http://127.0.0.1:7070 --nodes 100

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use fedge_common::codec::Codec;
use fedge_common::params::Manifest;
use fedge_common::pb::{self, PROTOCOL_VERSION, federation_client::FederationClient};
use fedge_common::wire::{chunks, crc32, tensors_from_wire, update_manifest};
use fedge_learn::model::ModelKind;
use prost::bytes::Bytes;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(
    name = "fedge-swarm",
    about = "Simulated edge nodes that answer tasks with prepared updates"
)]
struct Args {
    /// The coordinator's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    coordinator: String,
    /// Number of simulated nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Training samples each node claims (its FedAvg weight).
    #[arg(long, default_value_t = 100)]
    samples: u64,
    /// Skip downloading the model for each task (only the first node fetches
    /// it once, to learn its layout).
    #[arg(long)]
    no_fetch: bool,
    /// Standard deviation of the prepared update's values.
    #[arg(long, default_value_t = 1e-3)]
    scale: f32,
    /// Seed of the prepared update.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Default)]
struct Totals {
    updates: AtomicU64,
    refused: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// The update every node sends, encoded once.
#[derive(Debug)]
struct Prepared {
    manifest: Manifest,
    codec: Codec,
    payload: Bytes,
    crc32: u32,
}

async fn connect(url: &str) -> Result<FederationClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match FederationClient::connect(url.to_owned()).await {
            Ok(c) => return Ok(c.max_decoding_message_size(8 << 20)),
            Err(e) if Instant::now() > deadline => return Err(e).context("connecting to the coordinator"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn join(client: &mut FederationClient<Channel>, name: &str, samples: u64) -> Result<pb::JoinResponse> {
    let response = client
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            node_name: name.into(),
            num_samples: samples,
            models: ModelKind::known_names().into_iter().map(String::from).collect(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("{name}: join"))?;
    Ok(response.into_inner())
}

/// Downloads a model version; returns its manifest and the bytes received.
async fn fetch(client: &mut FederationClient<Channel>, session: &str, version: u64) -> Result<(Manifest, u64)> {
    let mut stream = client
        .fetch_model(pb::FetchModelRequest {
            node_id: session.into(),
            version,
            part: pb::ModelPart::Parameters as i32,
        })
        .await?
        .into_inner();
    let mut manifest = None;
    let mut bytes = 0u64;
    while let Some(msg) = stream.message().await? {
        bytes += prost::Message::encoded_len(&msg) as u64;
        if let Some(pb::model_chunk::Part::Header(h)) = msg.part {
            manifest = Some(tensors_from_wire(
                h.manifest.as_ref().context("model header without manifest")?,
            )?);
        }
    }
    Ok((manifest.context("model stream without a header")?, bytes))
}

fn prepare(manifest: Manifest, codec: Codec, scale: f32, seed: u64) -> Prepared {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..manifest.numel())
        .map(|_| (rng.random::<f32>() - 0.5) * 2.0 * scale * 3f32.sqrt())
        .collect();
    let payload = Bytes::from(codec.encode(&values, seed));
    Prepared {
        crc32: crc32(&payload),
        manifest,
        codec,
        payload,
    }
}

async fn node(args: Arc<Args>, index: usize, prepared: Arc<Prepared>, totals: Arc<Totals>) -> Result<()> {
    let name = format!("swarm-{index:05}");
    let mut client = connect(&args.coordinator).await?;
    let joined = join(&mut client, &name, args.samples).await?;
    let session = joined.node_id;
    let mut instructions = client
        .instructions(pb::InstructionsRequest {
            node_id: session.clone(),
        })
        .await?
        .into_inner();
    while let Some(msg) = instructions.message().await? {
        let task = match msg.kind {
            Some(pb::instruction::Kind::Train(t)) => t,
            Some(pb::instruction::Kind::Stop(_)) | None => return Ok(()),
            Some(_) => bail!("fedge-swarm does not speak secure aggregation; run real edge nodes"),
        };
        let h = task.hyperparameters.unwrap_or_default();
        if h.algorithm == pb::Algorithm::Scaffold as i32 {
            bail!("fedge-swarm cannot answer scaffold tasks (they need control variates)");
        }
        if !args.no_fetch {
            let (_, bytes) = fetch(&mut client, &session, task.model_version).await?;
            totals.bytes_down.fetch_add(bytes, Ordering::Relaxed);
        }
        let kind = if h.algorithm == pb::Algorithm::Fedsgd as i32 {
            pb::UpdateKind::Gradient
        } else {
            pb::UpdateKind::Delta
        };
        let header = pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
                node_id: session.clone(),
                round: task.round,
                base_version: task.model_version,
                num_samples: args.samples,
                manifest: Some(update_manifest(
                    &prepared.manifest,
                    &prepared.codec,
                    prepared.payload.len() as u64,
                )),
                metrics: Some(pb::TrainMetrics {
                    examples: args.samples,
                    steps: 1,
                    ..Default::default()
                }),
                kind: kind as i32,
                has_control_delta: false,
            })),
        };
        let mut msgs = vec![header];
        msgs.extend(
            chunks(&prepared.payload, fedge_common::wire::DEFAULT_CHUNK_BYTES).map(|c| pb::UpdateChunk {
                part: Some(pb::update_chunk::Part::Data(c)),
            }),
        );
        msgs.push(pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Trailer(pb::Trailer { crc32: prepared.crc32 })),
        });
        let sent: u64 = msgs.iter().map(|m| prost::Message::encoded_len(m) as u64).sum();
        match client.submit_update(tokio_stream::iter(msgs)).await {
            Ok(_) => {
                totals.updates.fetch_add(1, Ordering::Relaxed);
                totals.bytes_up.fetch_add(sent, Ordering::Relaxed);
            }
            Err(s) => {
                totals.refused.fetch_add(1, Ordering::Relaxed);
                eprintln!("{name}: round {} update refused: {}", task.round, s.message());
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let start = Instant::now();
    // One probe session learns the run's codec and the model's layout.
    let mut probe = connect(&args.coordinator).await?;
    let joined = join(&mut probe, "swarm-probe", 0).await?;
    let settings = joined.settings.context("join response without run settings")?;
    let codec = match &settings.update_codec {
        Some(c) => Codec::try_from(c)?,
        None => Codec::F32,
    };
    // Only nodes with a task fetch the model: the layout comes from building
    // the run's model here.
    let kind: ModelKind = settings.model.parse().context("the run's model")?;
    let input: [i64; 3] = settings
        .input_shape
        .as_slice()
        .try_into()
        .context("the run's input shape is not [channels, height, width]")?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net = kind.build(&vs.root(), input, settings.classes.len() as i64);
    let manifest = fedge_learn::tensors::manifest_of(&vs);
    drop(vs);
    let prepared = Arc::new(prepare(manifest, codec, args.scale, args.seed));
    eprintln!(
        "fedge-swarm: {} nodes, model `{}` ({} parameters), codec {codec}, update payload {} bytes",
        args.nodes,
        settings.model,
        prepared.manifest.numel(),
        prepared.payload.len()
    );
    let totals = Arc::new(Totals::default());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.nodes {
        tasks.spawn(node(args.clone(), i, prepared.clone(), totals.clone()));
    }
    let mut failed = 0;
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res.map_err(anyhow::Error::from).and_then(|r| r) {
            failed += 1;
            eprintln!("fedge-swarm: a node stopped: {e:#}");
        }
    }
    eprintln!(
        "fedge-swarm: done in {:.1}s: {} updates accepted, {} refused, {} MiB up, {} MiB down, {failed} nodes failed",
        start.elapsed().as_secs_f64(),
        totals.updates.load(Ordering::Relaxed),
        totals.refused.load(Ordering::Relaxed),
        totals.bytes_up.load(Ordering::Relaxed) >> 20,
        totals.bytes_down.load(Ordering::Relaxed) >> 20,
    );
    if failed > 0 {
        bail!("{failed} simulated nodes failed");
    }
    Ok(())
}
