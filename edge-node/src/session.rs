//! One session with the coordinator: join, open the instruction stream, and
//! for every task fetch the model (when not already held), train on the
//! training thread, and submit the update, all as chunked streams.

use std::collections::HashMap;
use std::sync::Arc;

use fedge_common::codec::Codec;
use fedge_common::model::ModelKind;
use fedge_common::params::{Manifest, save_safetensors};
use fedge_common::pb::{self, PROTOCOL_VERSION, federation_client::FederationClient};
use fedge_common::train::{Algorithm, Hyperparameters};
use fedge_common::wire::{PayloadReader, chunks, crc32, metrics_to_wire, update_manifest};
use tonic::transport::Channel;

use crate::config::NodeConfig;
use crate::trainer::{Job, Trainer};
use crate::{Error, Result};

/// How a session ended without error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The coordinator said the run is over.
    Stopped { reason: String },
    /// The instruction stream closed (coordinator restarting, say): reconnect.
    StreamClosed,
}

/// The global model this node holds, kept across sessions.
#[derive(Debug, Default)]
pub struct ModelCache {
    pub run_id: String,
    pub version: Option<u64>,
    pub manifest: Arc<Manifest>,
    pub params: Arc<Vec<f32>>,
    /// SCAFFOLD's server control variate and the version it belongs to.
    pub control: Option<(u64, Arc<Vec<f32>>)>,
}

/// Counts kept across sessions, for logs.
#[derive(Debug, Default, Clone)]
pub struct NodeStats {
    pub rounds_trained: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Successful joins (a change means the reconnect backoff can reset).
    pub joins: u64,
    /// The session of the last join, presented when rejoining.
    pub session: Option<String>,
}

/// Everything a session needs from the node.
pub struct SessionCtx<'a> {
    pub config: &'a NodeConfig,
    pub trainer: &'a Trainer,
    pub num_samples: u64,
    /// `[channels, height, width]` of the local data.
    pub data_shape: [i64; 3],
    pub cache: &'a mut ModelCache,
    pub stats: &'a mut NodeStats,
    /// Where fetched global models go for local predictions (`serve.listen`).
    pub feed: Option<&'a crate::serve::ModelFeed>,
}

/// Runs one session until the coordinator stops the run or the stream ends.
pub async fn run_session(ctx: SessionCtx<'_>) -> Result<SessionEnd> {
    let channel = crate::connect::endpoint(ctx.config)?
        .connect()
        .await
        .map_err(|e| Error::Connect(fedge_common::security::error_chain(&e)))?;
    let mut client = FederationClient::new(channel).max_decoding_message_size(8 << 20);
    let mut join = tonic::Request::new(pb::JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        node_name: ctx.config.name.clone(),
        num_samples: ctx.num_samples,
        models: ModelKind::known_names().into_iter().map(String::from).collect(),
        previous_node_id: ctx.stats.session.clone().unwrap_or_default(),
    });
    if let Some(token) = ctx.config.security.token()? {
        let value = tonic::metadata::MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Error::Config("security.token holds characters a header cannot carry".into()))?;
        join.metadata_mut()
            .insert(fedge_common::security::TOKEN_METADATA, value);
    }
    let joined = client
        .join(join)
        .await
        .map_err(|s| match s.code() {
            // Refusals that a retry cannot fix.
            tonic::Code::FailedPrecondition
            | tonic::Code::InvalidArgument
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied => Error::Refused(s.message().to_owned()),
            _ => Error::Status(s),
        })?
        .into_inner();
    let settings = joined
        .settings
        .ok_or_else(|| Error::Protocol("join response has no run settings".into()))?;
    let kind: ModelKind = settings
        .model
        .parse()
        .map_err(|e: fedge_common::Error| Error::Refused(e.to_string()))?;
    if settings.input_shape != ctx.data_shape {
        return Err(Error::Refused(format!(
            "this node's data is {:?} (channels, height, width) but the run's model takes {:?}",
            ctx.data_shape, settings.input_shape
        )));
    }
    if ctx.cache.run_id != settings.run_id {
        *ctx.cache = ModelCache {
            run_id: settings.run_id.clone(),
            ..Default::default()
        };
    }
    let session = joined.node_id;
    ctx.stats.session = Some(session.clone());
    let codec = match &settings.update_codec {
        Some(c) => Codec::try_from(c)?,
        None => Codec::F32,
    };
    tracing::info!(run = %settings.run_id, model = %kind, rounds = settings.total_rounds, update_codec = %codec, "joined");
    ctx.stats.joins += 1;

    let mut instructions = client
        .instructions(pb::InstructionsRequest {
            node_id: session.clone(),
        })
        .await?
        .into_inner();
    while let Some(msg) = instructions.message().await? {
        match msg.kind {
            Some(pb::instruction::Kind::Train(task)) => {
                let run = RunInfo {
                    kind,
                    run_id: &settings.run_id,
                    codec,
                    class_names: &settings.classes,
                    input_shape: ctx.data_shape,
                    feed: ctx.feed,
                };
                handle_task(
                    &mut client,
                    &session,
                    run,
                    task,
                    ctx.config,
                    ctx.trainer,
                    ctx.num_samples,
                    ctx.cache,
                    ctx.stats,
                )
                .await?;
            }
            Some(pb::instruction::Kind::Stop(stop)) => {
                return Ok(SessionEnd::Stopped { reason: stop.reason });
            }
            None => return Err(Error::Protocol("empty instruction".into())),
        }
    }
    Ok(SessionEnd::StreamClosed)
}

/// What the run asks this node to build.
#[derive(Debug, Clone, Copy)]
struct RunInfo<'a> {
    kind: ModelKind,
    run_id: &'a str,
    codec: Codec,
    class_names: &'a [String],
    input_shape: [i64; 3],
    feed: Option<&'a crate::serve::ModelFeed>,
}

#[allow(clippy::too_many_arguments)]
async fn handle_task(
    client: &mut FederationClient<Channel>,
    session: &str,
    run: RunInfo<'_>,
    task: pb::TrainTask,
    config: &NodeConfig,
    trainer: &Trainer,
    num_samples: u64,
    cache: &mut ModelCache,
    stats: &mut NodeStats,
) -> Result<()> {
    let round = task.round;
    let h = task
        .hyperparameters
        .ok_or_else(|| Error::Protocol("task without hyper-parameters".into()))?;
    let hyper = Hyperparameters::try_from(&h)?;
    if cache.version != Some(task.model_version) {
        let (manifest, params) = fetch(client, session, task.model_version, pb::ModelPart::Parameters, stats).await?;
        cache.version = Some(task.model_version);
        cache.manifest = Arc::new(manifest);
        cache.params = Arc::new(params);
        if let Some(feed) = run.feed {
            feed.send_replace(Some(Arc::new(crate::serve::ServedModel {
                run_id: run.run_id.to_owned(),
                version: task.model_version,
                kind: run.kind,
                input_shape: run.input_shape,
                classes: run.class_names.to_vec(),
                manifest: cache.manifest.clone(),
                params: cache.params.clone(),
            })));
        }
    }
    let server_control = if hyper.algorithm == Algorithm::Scaffold {
        match &cache.control {
            Some((v, c)) if *v == task.model_version => Some(c.clone()),
            _ => {
                let (_, c) = fetch(client, session, task.model_version, pb::ModelPart::ServerControl, stats).await?;
                let c = Arc::new(c);
                cache.control = Some((task.model_version, c.clone()));
                Some(c)
            }
        }
    } else {
        None
    };
    tracing::info!(
        round,
        version = task.model_version,
        algorithm = hyper.algorithm.name(),
        epochs = hyper.epochs,
        lr = hyper.learning_rate,
        "training"
    );
    let result = trainer
        .train(Job {
            run_id: run.run_id.to_owned(),
            round,
            kind: run.kind,
            classes: run.class_names.len() as i64,
            manifest: cache.manifest.clone(),
            global: cache.params.clone(),
            server_control,
            hyper,
            codec: run.codec,
        })
        .await?;
    let m = &result.metrics;
    tracing::info!(
        round,
        loss = format!("{:.4}", m.loss),
        accuracy = format!("{:.3}", m.accuracy),
        steps = m.steps,
        seconds = format!("{:.2}", m.train_seconds),
        holdout_accuracy = result
            .holdout
            .map(|e| format!("{:.3}", e.accuracy))
            .unwrap_or_else(|| "-".into()),
        "local training done"
    );
    if let Some(dir) = &config.record_dir {
        let meta = HashMap::from([
            ("node".to_string(), config.name.clone()),
            ("round".to_string(), round.to_string()),
            ("base_version".to_string(), task.model_version.to_string()),
            ("num_samples".to_string(), num_samples.to_string()),
        ]);
        let path = dir.join(format!("round-{round:04}.safetensors"));
        save_safetensors(&path, &cache.manifest, &result.delta, meta)?;
    }
    let has_control_delta = result.control_delta.is_some();
    let values = result.delta.len() + result.control_delta.as_ref().map_or(0, Vec::len);
    drop(result.delta);
    let payload = prost::bytes::Bytes::from(result.payload);
    let header = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            node_id: session.to_owned(),
            round,
            base_version: task.model_version,
            num_samples,
            manifest: Some(update_manifest(&cache.manifest, &run.codec, payload.len() as u64)),
            metrics: Some(metrics_to_wire(m, result.holdout.as_ref())),
            kind: if result.is_gradient {
                pb::UpdateKind::Gradient
            } else {
                pb::UpdateKind::Delta
            } as i32,
            has_control_delta,
        })),
    };
    let trailer = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Trailer(pb::Trailer { crc32: crc32(&payload) })),
    };
    // An emulated slow link sends smaller chunks, about four a second.
    let chunk_bytes = match config.upload_bytes_per_sec {
        0 => fedge_common::wire::DEFAULT_CHUNK_BYTES,
        rate => (rate as usize / 4).clamp(4096, fedge_common::wire::DEFAULT_CHUNK_BYTES),
    };
    let mut msgs = vec![header];
    msgs.extend(chunks(&payload, chunk_bytes).map(|c| pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Data(c)),
    }));
    msgs.push(trailer);
    let sent: u64 = msgs.iter().map(|m| prost::Message::encoded_len(m) as u64).sum();
    // Transient failures (a lost connection or acknowledgement, a full
    // coordinator) are retried with backoff; the coordinator counts an
    // update once, so a resend it already has comes back ALREADY_EXISTS.
    let mut backoff = crate::backoff::Backoff::new(config.reconnect.initial, config.reconnect.max);
    let mut attempt = 1;
    loop {
        let result = client
            .submit_update(upload_stream(msgs.clone(), config.upload_bytes_per_sec))
            .await;
        match result {
            Ok(ack) => {
                stats.rounds_trained += 1;
                stats.bytes_up += sent;
                tracing::info!(
                    round,
                    bytes = sent,
                    payload_bytes = payload.len(),
                    codec = %run.codec,
                    compression = format!("{:.1}x", (values * 4) as f64 / payload.len().max(1) as f64),
                    accepted_in_round = ack.get_ref().accepted_in_round,
                    attempt,
                    "update submitted"
                );
                return Ok(());
            }
            Err(s) if s.code() == tonic::Code::AlreadyExists && attempt > 1 => {
                // The earlier attempt arrived; only its acknowledgement was lost.
                stats.rounds_trained += 1;
                tracing::info!(round, attempt, "update already counted (an earlier attempt arrived)");
                return Ok(());
            }
            Err(s) if s.code() == tonic::Code::Unauthenticated => return Err(Error::Status(s)),
            Err(s) if retryable(s.code()) && attempt < SUBMIT_ATTEMPTS => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    round,
                    attempt,
                    code = ?s.code(),
                    reason = s.message(),
                    retry_in_ms = delay.as_millis() as u64,
                    "update not delivered; retrying"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(s) => {
                // The round moved on or the update was refused: wait for the next task.
                tracing::warn!(round, code = ?s.code(), reason = s.message(), "update refused");
                return Ok(());
            }
        }
    }
}

/// Attempts at delivering one update.
const SUBMIT_ATTEMPTS: u32 = 5;

/// Statuses after which the same update may be sent again.
fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Internal
    )
}

type ChunkStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = pb::UpdateChunk> + Send>>;

/// The update's messages as a stream, paced to `bytes_per_sec` when set.
fn upload_stream(msgs: Vec<pb::UpdateChunk>, bytes_per_sec: u64) -> ChunkStream {
    if bytes_per_sec == 0 {
        return Box::pin(tokio_stream::iter(msgs));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for m in msgs {
            let secs = prost::Message::encoded_len(&m) as f64 / bytes_per_sec as f64;
            tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
            if tx.send(m).await.is_err() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Fetches one part (parameters, or SCAFFOLD's server control variate) of
/// global model version `version`.
async fn fetch(
    client: &mut FederationClient<Channel>,
    session: &str,
    version: u64,
    part: pb::ModelPart,
    stats: &mut NodeStats,
) -> Result<(Manifest, Vec<f32>)> {
    let mut stream = client
        .fetch_model(pb::FetchModelRequest {
            node_id: session.to_owned(),
            version,
            part: part as i32,
        })
        .await?
        .into_inner();
    let first = stream
        .message()
        .await?
        .ok_or_else(|| Error::Protocol("empty model stream".into()))?;
    let mut bytes = prost::Message::encoded_len(&first) as u64;
    let Some(pb::model_chunk::Part::Header(header)) = first.part else {
        return Err(Error::Protocol("model stream did not start with a header".into()));
    };
    if header.version != version {
        return Err(Error::Protocol(format!(
            "asked for model version {version}, got {}",
            header.version
        )));
    }
    let manifest = Manifest::try_from(
        header
            .manifest
            .as_ref()
            .ok_or_else(|| Error::Protocol("model header without a manifest".into()))?,
    )?;
    let mut reader = PayloadReader::new(manifest.payload_bytes())?;
    let params = loop {
        let msg = stream
            .message()
            .await?
            .ok_or_else(|| Error::Protocol("model stream ended without a trailer".into()))?;
        bytes += prost::Message::encoded_len(&msg) as u64;
        match msg.part {
            Some(pb::model_chunk::Part::Data(d)) => reader.push(&d)?,
            Some(pb::model_chunk::Part::Trailer(t)) => break reader.finish(t.crc32)?,
            _ => return Err(Error::Protocol("unexpected part in a model stream".into())),
        }
    };
    stats.bytes_down += bytes;
    tracing::info!(
        version,
        part = part.as_str_name(),
        parameters = params.len(),
        bytes,
        "model fetched"
    );
    Ok((manifest, params))
}
