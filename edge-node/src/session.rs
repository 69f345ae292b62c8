//! One session with the coordinator: join, open the instruction stream, and
//! for every task fetch the model (when not already held), train on the
//! training thread, and submit the update, all as chunked streams.

use std::collections::HashMap;
use std::sync::Arc;

use fedge_common::codec::Codec;
use fedge_common::params::{Manifest, save_safetensors};
use fedge_common::pb::{self, PROTOCOL_VERSION, federation_client::FederationClient};
use fedge_common::secagg;
use fedge_common::task::{Algorithm, Hyperparameters};
use fedge_common::wire::{PayloadReader, chunks, crc32, metrics_to_wire, update_manifest};
use fedge_learn::job::Job;
use fedge_learn::model::ModelKind;
use tonic::transport::Channel;

use crate::config::NodeConfig;
use crate::trainer::Trainer;
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
    /// An asynchronous run's update the coordinator did not take because
    /// it went away or forgot this node's session (it restarted): the next
    /// session of the same run sends it again, before its first task.
    pub carried: Option<Carried>,
}

/// An update kept for the next session ([`ModelCache::carried`]).
#[derive(Debug, Clone)]
pub struct Carried {
    header: pb::UpdateHeader,
    payload: prost::bytes::Bytes,
}

/// What became of an update.
enum Delivery {
    Delivered,
    /// The coordinator refused it.
    Refused,
    /// It did not arrive: the coordinator was unreachable through every
    /// attempt, or no longer knew the session (`Some`: that status).
    Lost(Option<tonic::Status>),
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
        .map_err(|e: fedge_learn::Error| Error::Refused(e.to_string()))?;
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
    if let Some(carried) = ctx.cache.carried.take()
        && settings.asynchronous
    {
        deliver_carried(&mut client, ctx.config, ctx.stats, &session, carried).await;
    }
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
    let mut pending: Option<pb::Instruction> = None;
    loop {
        let msg = match pending.take() {
            Some(m) => m,
            None => match instructions.message().await? {
                Some(m) => m,
                None => return Ok(SessionEnd::StreamClosed),
            },
        };
        match msg.kind {
            Some(pb::instruction::Kind::Train(task)) => {
                let run = RunInfo {
                    kind,
                    asynchronous: settings.asynchronous,
                    run_id: &settings.run_id,
                    codec,
                    class_names: &settings.classes,
                    input_shape: ctx.data_shape,
                    feed: ctx.feed,
                };
                let mut node = NodeCtx {
                    client: &mut client,
                    session: &session,
                    config: ctx.config,
                    trainer: ctx.trainer,
                    num_samples: ctx.num_samples,
                    cache: ctx.cache,
                    stats: ctx.stats,
                    instructions: &mut instructions,
                };
                match handle_task(&mut node, run, task).await? {
                    Next::Read => {}
                    Next::Handle(m) => pending = Some(m),
                    Next::Closed => return Ok(SessionEnd::StreamClosed),
                }
            }
            Some(pb::instruction::Kind::Stop(stop)) => {
                return Ok(SessionEnd::Stopped { reason: stop.reason });
            }
            Some(_) => tracing::debug!("secure aggregation message outside a secure round; ignored"),
            None => return Err(Error::Protocol("empty instruction".into())),
        }
    }
}

/// What a session does after a task.
enum Next {
    /// Read the next instruction.
    Read,
    /// Handle this instruction, read while the task ran.
    Handle(pb::Instruction),
    /// The instruction stream closed.
    Closed,
}

/// The session's connection and the node's state, for one task.
struct NodeCtx<'a, 'b> {
    client: &'a mut FederationClient<Channel>,
    session: &'a str,
    config: &'a NodeConfig,
    trainer: &'a Trainer,
    num_samples: u64,
    cache: &'b mut ModelCache,
    stats: &'b mut NodeStats,
    instructions: &'a mut tonic::Streaming<pb::Instruction>,
}

/// What the run asks this node to build.
#[derive(Debug, Clone, Copy)]
struct RunInfo<'a> {
    kind: ModelKind,
    asynchronous: bool,
    run_id: &'a str,
    codec: Codec,
    class_names: &'a [String],
    input_shape: [i64; 3],
    feed: Option<&'a crate::serve::ModelFeed>,
}

async fn handle_task(node: &mut NodeCtx<'_, '_>, run: RunInfo<'_>, task: pb::TrainTask) -> Result<Next> {
    let round = task.round;
    let h = task
        .hyperparameters
        .ok_or_else(|| Error::Protocol("task without hyper-parameters".into()))?;
    let hyper = Hyperparameters::try_from(&h)?;
    // Secure aggregation: fresh keys go out first, so the round's key
    // exchange runs while this node fetches the model and trains.
    let mut secure = match task.secure_aggregation {
        Some(sec) => match SecureSession::start(node, round, sec).await {
            Some(s) => Some(s),
            None => return Ok(Next::Read),
        },
        None => None,
    };
    let fetch_start = std::time::Instant::now();
    // The version the update starts from: the task's, or in an asynchronous
    // run the newer one the coordinator served.
    let mut base_version = task.model_version;
    if node.cache.version != Some(task.model_version) {
        let (manifest, params, served) = fetch(
            node.client,
            node.session,
            task.model_version,
            pb::ModelPart::Parameters,
            node.stats,
        )
        .await?;
        base_version = served;
        node.cache.version = Some(served);
        node.cache.manifest = Arc::new(manifest);
        node.cache.params = Arc::new(params);
        if let Some(feed) = run.feed {
            feed.send_replace(Some(Arc::new(crate::serve::ServedModel {
                run_id: run.run_id.to_owned(),
                version: served,
                kind: run.kind,
                input_shape: run.input_shape,
                classes: run.class_names.to_vec(),
                manifest: node.cache.manifest.clone(),
                params: node.cache.params.clone(),
            })));
        }
    }
    let server_control = if hyper.algorithm == Algorithm::Scaffold {
        match &node.cache.control {
            Some((v, c)) if *v == base_version => Some(c.clone()),
            _ => {
                let (_, c, _) = fetch(
                    node.client,
                    node.session,
                    base_version,
                    pb::ModelPart::ServerControl,
                    node.stats,
                )
                .await?;
                let c = Arc::new(c);
                node.cache.control = Some((base_version, c.clone()));
                Some(c)
            }
        }
    } else {
        None
    };
    let fetch_seconds = fetch_start.elapsed().as_secs_f64();
    tracing::info!(
        round,
        version = base_version,
        fetch_seconds = format!("{fetch_seconds:.3}"),
        algorithm = hyper.algorithm.name(),
        epochs = hyper.epochs,
        lr = hyper.learning_rate,
        "training"
    );
    let job = Job {
        run_id: run.run_id.to_owned(),
        round,
        kind: run.kind,
        classes: run.class_names.len() as i64,
        manifest: node.cache.manifest.clone(),
        global: node.cache.params.clone(),
        server_control,
        hyper,
        codec: run.codec,
    };
    // An instruction that arrives while the node trains: a stop (the run
    // ended) abandons the training; anything else waits for the update to
    // be sent. A stream that breaks (the coordinator went away) does not
    // stop the training: its update is still sent, or kept for the next
    // session of an asynchronous run.
    let mut held = None;
    let mut listening = true;
    let mut result = match &mut secure {
        None => {
            let training = node.trainer.train(job);
            tokio::pin!(training);
            loop {
                tokio::select! {
                    done = &mut training => break done?,
                    msg = node.instructions.message(), if listening && held.is_none() => match msg {
                        Ok(Some(m)) if matches!(m.kind, Some(pb::instruction::Kind::Stop(_))) => {
                            node.trainer.interrupt();
                            tracing::info!(round, "stopped while training; the training is abandoned");
                            return Ok(Next::Handle(m));
                        }
                        Ok(Some(m)) => held = Some(m),
                        Ok(None) | Err(_) => listening = false,
                    },
                }
            }
        }
        Some(sec) => {
            // Keys are shared while training runs; the masked input needs both.
            let training = node.trainer.train(job);
            tokio::pin!(training);
            let mut trained = None;
            loop {
                if trained.is_some() && sec.ready() {
                    break trained.take().expect("checked above");
                }
                tokio::select! {
                    done = &mut training, if trained.is_none() => trained = Some(done?),
                    msg = node.instructions.message() => match msg? {
                        None => return Ok(Next::Closed),
                        Some(m) => {
                            if let Some(next) = sec.handle(node, m).await {
                                return Ok(next);
                            }
                        }
                    },
                }
            }
        }
    };
    result.metrics.fetch_seconds = fetch_seconds;
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
    let config = node.config;
    if let Some(dir) = &config.record_dir {
        let meta = HashMap::from([
            ("node".to_string(), config.name.clone()),
            ("round".to_string(), round.to_string()),
            ("base_version".to_string(), base_version.to_string()),
            ("num_samples".to_string(), node.num_samples.to_string()),
        ]);
        let path = dir.join(format!("round-{round:04}.safetensors"));
        save_safetensors(&path, &node.cache.manifest, &result.delta, meta)?;
    }
    let has_control_delta = result.control_delta.is_some();
    let values = result.delta.len() + result.control_delta.as_ref().map_or(0, Vec::len);
    let (payload, codec) = match secure.take() {
        Some(sec) => {
            // The clipping indicator travels inside the masked sum, not in the clear.
            let unclipped = result.metrics.unclipped.take() == Some(true);
            let delta = std::mem::take(&mut result.delta);
            let start = std::time::Instant::now();
            let (sec, payload) = tokio::task::spawn_blocking(move || {
                let payload = sec.masked_payload(delta, unclipped);
                (sec, payload)
            })
            .await
            .map_err(|e| Error::Trainer(format!("masking task failed: {e}")))?;
            result.metrics.encode_seconds = start.elapsed().as_secs_f64();
            secure = Some(sec);
            (prost::bytes::Bytes::from(payload), Codec::Masked)
        }
        None => (
            prost::bytes::Bytes::from(std::mem::take(&mut result.payload)),
            run.codec,
        ),
    };
    drop(result.delta);
    let header = pb::UpdateHeader {
        node_id: node.session.to_owned(),
        round,
        base_version,
        num_samples: node.num_samples,
        manifest: Some(update_manifest(&node.cache.manifest, &codec, payload.len() as u64)),
        metrics: Some(metrics_to_wire(&result.metrics, result.holdout.as_ref())),
        kind: if result.is_gradient {
            pb::UpdateKind::Gradient
        } else {
            pb::UpdateKind::Delta
        } as i32,
        has_control_delta,
    };
    let carry = run.asynchronous.then(|| Carried {
        header: header.clone(),
        payload: payload.clone(),
    });
    let delivered = match upload(node, header, payload, values, codec).await? {
        Delivery::Delivered => true,
        Delivery::Refused => false,
        Delivery::Lost(status) => {
            if carry.is_some() {
                tracing::info!(round, "update kept for the next session");
                node.cache.carried = carry;
            }
            if let Some(status) = status {
                return Err(Error::Status(status));
            }
            false
        }
    };
    match (secure, held) {
        (Some(mut sec), _) if delivered => sec.await_unmask(node).await,
        (_, Some(m)) => Ok(Next::Handle(m)),
        _ if !listening => Ok(Next::Closed),
        _ => Ok(Next::Read),
    }
}

/// Sends an update kept from an earlier session under this one, once.
async fn deliver_carried(
    client: &mut FederationClient<Channel>,
    config: &NodeConfig,
    stats: &mut NodeStats,
    session: &str,
    carried: Carried,
) {
    let mut header = carried.header;
    header.node_id = session.to_owned();
    let round = header.round;
    let (msgs, sent) = update_messages(header, &carried.payload, config);
    match client
        .submit_update(upload_stream(msgs, config.upload_bytes_per_sec))
        .await
    {
        Ok(_) => {
            stats.rounds_trained += 1;
            stats.bytes_up += sent;
            tracing::info!(round, bytes = sent, "update from the last session delivered");
        }
        Err(s) => tracing::warn!(
            round,
            code = ?s.code(),
            reason = s.message(),
            "update from the last session refused"
        ),
    }
}

/// An update's messages (header, chunks, trailer) and their bytes.
fn update_messages(
    header: pb::UpdateHeader,
    payload: &prost::bytes::Bytes,
    config: &NodeConfig,
) -> (Vec<pb::UpdateChunk>, u64) {
    let header = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(header)),
    };
    let trailer = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Trailer(pb::Trailer { crc32: crc32(payload) })),
    };
    // An emulated slow link sends smaller chunks, about four a second.
    let chunk_bytes = match config.upload_bytes_per_sec {
        0 => fedge_common::wire::DEFAULT_CHUNK_BYTES,
        rate => (rate as usize / 4).clamp(4096, fedge_common::wire::DEFAULT_CHUNK_BYTES),
    };
    let mut msgs = vec![header];
    msgs.extend(chunks(payload, chunk_bytes).map(|c| pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Data(c)),
    }));
    msgs.push(trailer);
    let sent: u64 = msgs.iter().map(|m| prost::Message::encoded_len(m) as u64).sum();
    (msgs, sent)
}

/// Sends an update (header, chunks, trailer), retrying transient failures.
async fn upload(
    node: &mut NodeCtx<'_, '_>,
    header: pb::UpdateHeader,
    payload: prost::bytes::Bytes,
    values: usize,
    codec: Codec,
) -> Result<Delivery> {
    let (config, round) = (node.config, header.round);
    let (msgs, sent) = update_messages(header, &payload, config);
    // Transient failures (a lost connection or acknowledgement, a full
    // coordinator) are retried with backoff; the coordinator counts an
    // update once, so a resend it already has comes back ALREADY_EXISTS.
    let mut backoff = crate::backoff::Backoff::new(config.reconnect.initial, config.reconnect.max);
    let mut attempt = 1;
    loop {
        let result = node
            .client
            .submit_update(upload_stream(msgs.clone(), config.upload_bytes_per_sec))
            .await;
        match result {
            Ok(ack) => {
                node.stats.rounds_trained += 1;
                node.stats.bytes_up += sent;
                tracing::info!(
                    round,
                    bytes = sent,
                    payload_bytes = payload.len(),
                    codec = %codec,
                    compression = format!("{:.1}x", (values * 4) as f64 / payload.len().max(1) as f64),
                    accepted_in_round = ack.get_ref().accepted_in_round,
                    attempt,
                    "update submitted"
                );
                return Ok(Delivery::Delivered);
            }
            Err(s) if s.code() == tonic::Code::AlreadyExists && attempt > 1 => {
                // The earlier attempt arrived; only its acknowledgement was lost.
                node.stats.rounds_trained += 1;
                tracing::info!(round, attempt, "update already counted (an earlier attempt arrived)");
                return Ok(Delivery::Delivered);
            }
            Err(s) if s.code() == tonic::Code::Unauthenticated => return Ok(Delivery::Lost(Some(s))),
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
            Err(s) if retryable(s.code()) => {
                tracing::warn!(round, attempt, code = ?s.code(), reason = s.message(), "update not delivered");
                return Ok(Delivery::Lost(None));
            }
            Err(s) => {
                // The round moved on or the update was refused: wait for the next task.
                tracing::warn!(round, code = ?s.code(), reason = s.message(), "update refused");
                return Ok(Delivery::Refused);
            }
        }
    }
}

/// This node's side of one secure round (see `fedge_common::secagg`).
struct SecureSession {
    round: u64,
    task: pb::SecureAggregationTask,
    client: secagg::Client,
    shared: bool,
    received: bool,
}

impl SecureSession {
    /// Makes fresh keys and advertises them; `None` when the coordinator
    /// refuses them (the round goes on without this node).
    async fn start(node: &mut NodeCtx<'_, '_>, round: u64, task: pb::SecureAggregationTask) -> Option<Self> {
        let (client, keys) = secagg::Client::new(task.id, round, &mut rand::rng());
        let s = Self {
            round,
            task,
            client,
            shared: false,
            received: false,
        };
        let msg = pb::sec_agg_message::Kind::Advertise(pb::SecAggKeys::from(&keys));
        s.send(node, msg, "keys").await.then_some(s)
    }

    /// Sends one protocol message; logs and returns false when refused.
    async fn send(&self, node: &mut NodeCtx<'_, '_>, kind: pb::sec_agg_message::Kind, what: &str) -> bool {
        let msg = pb::SecAggMessage {
            node_id: node.session.to_owned(),
            round: self.round,
            kind: Some(kind),
        };
        node.stats.bytes_up += prost::Message::encoded_len(&msg) as u64;
        match node.client.secure_aggregation(msg).await {
            Ok(_) => true,
            Err(s) => {
                tracing::warn!(round = self.round, what, code = ?s.code(), reason = s.message(), "secure aggregation message refused");
                false
            }
        }
    }

    /// Whether the node may send its masked input.
    fn ready(&self) -> bool {
        self.shared && self.received
    }

    /// Handles an instruction that arrived during the round. Returns what
    /// the session must do instead of going on with this round, if anything.
    async fn handle(&mut self, node: &mut NodeCtx<'_, '_>, msg: pb::Instruction) -> Option<Next> {
        use pb::instruction::Kind;
        node.stats.bytes_down += prost::Message::encoded_len(&msg) as u64;
        match msg.kind {
            Some(Kind::SecaggRoster(r)) if r.round == self.round => {
                let roster: std::result::Result<Vec<secagg::Advertise>, _> =
                    r.nodes.iter().map(secagg::Advertise::try_from).collect();
                let sealed = roster.map_err(|e| e.to_string()).and_then(|roster| {
                    self.client
                        .share_keys(&roster, &r.neighbours, self.task.threshold as usize)
                        .map_err(|e| e.to_string())
                });
                match sealed {
                    Ok(sealed) => {
                        let kind = pb::sec_agg_message::Kind::Shares(pb::SealedShares {
                            shares: sealed.iter().map(pb::SealedShare::from).collect(),
                        });
                        if !self.send(node, kind, "shares").await {
                            return Some(Next::Read);
                        }
                        self.shared = true;
                        tracing::debug!(
                            round = self.round,
                            holders = sealed.len(),
                            "secure aggregation: shares sent"
                        );
                        None
                    }
                    Err(reason) => {
                        tracing::warn!(
                            round = self.round,
                            reason,
                            "secure aggregation: cannot share keys; leaving the round"
                        );
                        Some(Next::Read)
                    }
                }
            }
            Some(Kind::SecaggShares(s)) if s.round == self.round => {
                let shares: Vec<secagg::SealedShares> = s.shares.iter().map(secagg::SealedShares::from).collect();
                match self.client.receive_shares(&shares) {
                    Ok(unopened) => {
                        // Another node's fault: it cannot be unmasked
                        // through this one, and the round goes on.
                        for e in unopened {
                            tracing::warn!(round = self.round, reason = %e, "secure aggregation: a neighbour's shares do not open");
                        }
                        self.received = true;
                        None
                    }
                    Err(e) => {
                        tracing::warn!(round = self.round, reason = %e, "secure aggregation: bad shares; leaving the round");
                        Some(Next::Read)
                    }
                }
            }
            Some(Kind::SecaggUnmask(u)) if u.round == self.round => {
                self.answer(node, &u).await;
                None
            }
            Some(Kind::SecaggRoster(_) | Kind::SecaggShares(_) | Kind::SecaggUnmask(_)) => {
                tracing::debug!(
                    round = self.round,
                    "secure aggregation message for another round; ignored"
                );
                None
            }
            _ => Some(Next::Handle(msg)),
        }
    }

    /// Answers an unmasking request, or refuses it (logged) when answering
    /// would reveal an update.
    async fn answer(&mut self, node: &mut NodeCtx<'_, '_>, u: &pb::SecAggUnmask) -> bool {
        match self.client.unmask(&secagg::UnmaskRequest::from(u)) {
            Ok(reveal) => {
                let kind = pb::sec_agg_message::Kind::Reveal(fedge_common::wire::secagg::reveal_to_wire(&reveal));
                let sent = self.send(node, kind, "unmasking answer").await;
                if sent {
                    tracing::info!(
                        round = self.round,
                        survivors = u.survivors.len(),
                        dropped = u.dropped.len(),
                        "secure aggregation: unmasking answered"
                    );
                }
                sent
            }
            Err(e) => {
                tracing::warn!(round = self.round, reason = %e, "secure aggregation: unmasking request refused");
                false
            }
        }
    }

    /// The masked input: `weight · update` clamped and quantized, the
    /// clipping indicator after it, masked (blocking, CPU-bound).
    fn masked_payload(&self, mut values: Vec<f32>, unclipped: bool) -> Vec<u8> {
        let q = secagg::Quantizer {
            range: self.task.range,
            bits: self.task.bits,
        };
        let w = self.task.weight as f32;
        let mut clamped = 0usize;
        for v in &mut values {
            *v *= w;
            if v.abs() > q.range {
                clamped += 1;
            }
        }
        if clamped > 0 {
            tracing::warn!(
                round = self.round,
                clamped,
                range = q.range,
                "update values beyond secure_aggregation.range were clamped"
            );
        }
        values.push(if unclipped { 1.0 } else { 0.0 });
        let quantized = q.quantize(&values, &mut rand::rng());
        drop(values);
        let masked = self.client.mask(&quantized);
        masked.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// After the masked input went out: waits for the unmasking request
    /// and answers it once.
    async fn await_unmask(&mut self, node: &mut NodeCtx<'_, '_>) -> Result<Next> {
        loop {
            let Some(msg) = node.instructions.message().await? else {
                return Ok(Next::Closed);
            };
            node.stats.bytes_down += prost::Message::encoded_len(&msg) as u64;
            match msg.kind {
                Some(pb::instruction::Kind::SecaggUnmask(u)) if u.round == self.round => {
                    self.answer(node, &u).await;
                    return Ok(Next::Read);
                }
                Some(
                    pb::instruction::Kind::SecaggRoster(_)
                    | pb::instruction::Kind::SecaggShares(_)
                    | pb::instruction::Kind::SecaggUnmask(_),
                ) => {}
                _ => return Ok(Next::Handle(msg)),
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
/// global model version `version`, or of the newer version an asynchronous
/// run serves instead; returns the version fetched too.
async fn fetch(
    client: &mut FederationClient<Channel>,
    session: &str,
    version: u64,
    part: pb::ModelPart,
    stats: &mut NodeStats,
) -> Result<(Manifest, Vec<f32>, u64)> {
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
    if header.version < version {
        return Err(Error::Protocol(format!(
            "asked for model version {version}, got the older {}",
            header.version
        )));
    }
    let version = header.version;
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
    Ok((manifest, params, version))
}
