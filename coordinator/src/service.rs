//! The gRPC adapter: turns `fedge.v1.Federation` calls into driver
//! [`Command`]s, streams model snapshots, reassembles update streams, and maps
//! every refusal to a gRPC status in one place ([`rejection_status`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use std::path::PathBuf;

use fedge_common::codec::Codec;
use fedge_common::params::Manifest;
use fedge_common::pb::{self, PROTOCOL_VERSION};
use fedge_common::secagg::{Advertise, NodeId, SealedShares};
use fedge_common::wire::secagg::reveal_from_wire;
use fedge_common::wire::{chunks, f32_payload, metrics_from_wire, tensors_from_wire};
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::config::LimitsConfig;
use crate::driver::{Command, ModelSnapshot, Traffic};
use crate::global::{GlobalModel, StoredModel};
use crate::intake::{Intake, Received, SpoolBudget};
use crate::round::{Body, Rejection, Update, UpdateKind};
use crate::secure::SecAggInput;
use crate::security::Authenticator;

/// Implements `fedge.v1.Federation`.
#[derive(Clone)]
pub struct FederationService {
    pub driver: mpsc::UnboundedSender<Command>,
    pub snapshot: watch::Receiver<Arc<ModelSnapshot>>,
    pub manifest: Arc<Manifest>,
    pub traffic: Arc<Traffic>,
    pub settings: pb::RunSettings,
    /// The codec the run's updates use (announced in `settings`).
    pub codec: Codec,
    /// Where large update payloads are spooled while their round runs.
    pub spool_dir: PathBuf,
    pub chunk_bytes: usize,
    /// Who may join.
    pub auth: Arc<Authenticator>,
    /// Bounds on the transfers in progress.
    pub limits: TransferLimits,
    /// Memory that received, not yet folded updates may hold.
    pub spool_budget: SpoolBudget,
}

/// Bounds on transfers: how many update streams are read at once, how many
/// announced payload bytes they hold together, how many model streams are
/// sent at once, how long one waits for a slot, and how long an update
/// stream may stay silent.
#[derive(Debug, Clone)]
pub struct TransferLimits {
    uploads: Arc<Semaphore>,
    /// One permit per KiB of announced payload.
    kib: Arc<Semaphore>,
    max_kib: u64,
    downloads: Arc<Semaphore>,
    queue_timeout: Duration,
    download_slot_timeout: Duration,
    pub idle_timeout: Duration,
}

/// What an upload holds while it is read.
#[derive(Debug)]
pub struct UploadPermit {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

impl TransferLimits {
    pub fn new(c: &LimitsConfig) -> Self {
        let max_kib = c.max_inflight_bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS as u64);
        Self {
            uploads: Arc::new(Semaphore::new(c.max_concurrent_uploads as usize)),
            kib: Arc::new(Semaphore::new(max_kib as usize)),
            max_kib,
            downloads: Arc::new(Semaphore::new(c.max_concurrent_downloads as usize)),
            queue_timeout: c.queue_timeout,
            download_slot_timeout: c.download_slot_timeout,
            idle_timeout: c.stream_idle_timeout,
        }
    }

    fn busy(&self, what: &str) -> Status {
        Status::resource_exhausted(format!(
            "the coordinator is serving as many {what} as its limits allow; none freed within {:?}, try again",
            self.queue_timeout
        ))
    }

    /// Waits (up to the queue timeout) until an upload of `payload_bytes`
    /// fits; refuses one that never could.
    pub async fn admit_upload(&self, payload_bytes: u64) -> Result<UploadPermit, Status> {
        let kib = payload_bytes.div_ceil(1024).max(1);
        if kib > self.max_kib || kib > u64::from(u32::MAX) {
            return Err(Status::resource_exhausted(format!(
                "an update of {payload_bytes} bytes exceeds limits.max_inflight_bytes ({} bytes)",
                self.max_kib * 1024
            )));
        }
        let wait = async {
            let slot = self.uploads.clone().acquire_owned().await;
            let bytes = self.kib.clone().acquire_many_owned(kib as u32).await;
            match (slot, bytes) {
                (Ok(s), Ok(b)) => Ok(UploadPermit { _slot: s, _bytes: b }),
                _ => Err(Status::unavailable("coordinator is shutting down")),
            }
        };
        tokio::time::timeout(self.queue_timeout, wait)
            .await
            .map_err(|_| self.busy("uploads"))?
    }

    /// Waits (up to the queue timeout) for a download slot. The slot goes
    /// back when the stream ends or after the slot timeout, whichever is first.
    pub async fn admit_download(&self) -> Result<DownloadSlot, Status> {
        let permit = tokio::time::timeout(self.queue_timeout, self.downloads.clone().acquire_owned())
            .await
            .map_err(|_| self.busy("downloads"))?
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        let slot = Arc::new(std::sync::Mutex::new(Some(permit)));
        let expiring = Arc::downgrade(&slot);
        let after = self.download_slot_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(slot) = expiring.upgrade() {
                slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            }
        });
        Ok(DownloadSlot { _held: slot })
    }

    /// The next message of an update stream, or an error if it stays silent
    /// longer than the idle timeout.
    pub async fn next<T>(&self, stream: &mut Streaming<T>) -> Result<Option<T>, Status> {
        tokio::time::timeout(self.idle_timeout, stream.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "update stream sent nothing for {:?}; upload abandoned",
                    self.idle_timeout
                ))
            })?
    }
}

/// A download's slot, held by its model stream.
#[derive(Debug)]
pub struct DownloadSlot {
    _held: Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>,
}

/// A model stream that holds its download slot until it is dropped.
struct ModelStream<S> {
    inner: S,
    _slot: DownloadSlot,
}

impl<S: Stream + Unpin> Stream for ModelStream<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// What a fetch sends: bytes in memory, or a model read from its checkpoint.
enum Payload {
    Memory(Bytes),
    Stored(Arc<StoredModel>),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Memory(b) => b.len(),
            Payload::Stored(s) => s.payload_len(),
        }
    }
}

/// Encoded size of a `ModelChunk` carrying `n` data bytes.
fn data_chunk_len(n: usize) -> usize {
    prost::encoding::key_len(2) + prost::encoding::encoded_len_varint(n as u64) + n
}

/// Streams a stored model's payload in chunks of `chunk_bytes`, each read off
/// the runtime once the client has taken all but two of the earlier ones:
/// a fetch holds a few chunks in memory, never the model.
fn stored_chunks(stored: Arc<StoredModel>, chunk_bytes: usize) -> BoxStream<pb::ModelChunk> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let total = stored.payload_len();
        let mut start = 0;
        while start < total {
            let n = chunk_bytes.min(total - start);
            let source = stored.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n];
                source.read_payload(start, &mut buf).map(|()| buf)
            })
            .await;
            let msg = match read {
                Ok(Ok(buf)) => Ok(pb::ModelChunk {
                    part: Some(pb::model_chunk::Part::Data(buf.into())),
                }),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the global model for a fetch");
                    Err(Status::internal(format!("cannot read the global model: {e}")))
                }
                Err(e) => Err(Status::internal(format!("model read task failed: {e}"))),
            };
            let failed = msg.is_err();
            if tx.send(msg).await.is_err() || failed {
                return;
            }
            start += n;
        }
        // The fetch's chunks went through this process's allocator; a
        // large model's worth of them is worth handing back at once.
        crate::memory::release_free_memory_off_runtime().await;
    });
    Box::pin(ReceiverStream::new(rx))
}

/// A counter label for the status of a refused call.
fn status_label(s: &Status) -> &'static str {
    match s.code() {
        tonic::Code::DataLoss => "checksum",
        tonic::Code::ResourceExhausted => "resource_limit",
        tonic::Code::DeadlineExceeded => "stream_idle",
        tonic::Code::PermissionDenied => "not_allowed",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown => "stream_broken",
        _ => "malformed_payload",
    }
}

/// The one mapping from round-logic refusals to gRPC statuses.
pub fn rejection_status(r: &Rejection) -> Status {
    let msg = r.to_string();
    match r {
        Rejection::UnknownSession => Status::unauthenticated(msg),
        Rejection::WrongRound { .. } | Rejection::WrongBaseVersion { .. } => Status::failed_precondition(msg),
        Rejection::NotSelected { .. } => Status::permission_denied(msg),
        Rejection::SecAgg(_) => Status::failed_precondition(msg),
        Rejection::Duplicate { .. } | Rejection::NameInUse { .. } => Status::already_exists(msg),
        Rejection::WrongSize { .. }
        | Rejection::NonFinite { .. }
        | Rejection::NoSamples
        | Rejection::WrongKind { .. }
        | Rejection::NormTooLarge { .. } => Status::invalid_argument(msg),
    }
}

fn payload_status(e: fedge_common::Error) -> Status {
    match e {
        fedge_common::Error::Checksum(m) => Status::data_loss(m),
        fedge_common::Error::Payload(m) => Status::invalid_argument(m),
        e @ fedge_common::Error::Io { .. } => Status::internal(e.to_string()),
        other => Status::invalid_argument(other.to_string()),
    }
}

impl FederationService {
    /// Counts and logs an update stream the service refused (the round
    /// logic counts its own refusals); `node` when it is known by then.
    fn refused(&self, status: &Status, node: Option<&str>) {
        self.traffic.count_refused_update(status_label(status), node);
        tracing::warn!(node = node.unwrap_or("-"), reason = %status.message(), "update refused");
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        crate::driver::ask(&self.driver, make)
            .await
            .ok_or_else(|| Status::unavailable("coordinator is shutting down"))
    }
}

/// An instruction stream that tells the driver when the node goes away.
struct InstructionStream {
    inner: ReceiverStream<Result<pb::Instruction, Status>>,
    session: String,
    driver: mpsc::UnboundedSender<Command>,
}

impl Stream for InstructionStream {
    type Item = Result<pb::Instruction, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for InstructionStream {
    fn drop(&mut self) {
        let _ = self.driver.send(Command::Disconnect {
            session: std::mem::take(&mut self.session),
        });
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::federation_server::Federation for FederationService {
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let claimed = request.get_ref().node_name.trim().to_owned();
        if let Err(status) = self.auth.check_join(&request, &claimed) {
            self.traffic.count_refusal(status_label(&status));
            tracing::warn!(node = %claimed, reason = %status.message(), "join refused");
            return Err(status);
        }
        let req = request.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(node = %req.node_name, theirs = req.protocol_version, ours = PROTOCOL_VERSION, "join refused: protocol version mismatch");
            self.traffic.count_refusal("protocol_version");
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: node speaks v{}, coordinator speaks v{PROTOCOL_VERSION}",
                req.protocol_version
            )));
        }
        let name = req.node_name.trim().to_owned();
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "node name must be 1 to 128 printable characters",
            ));
        }
        if !req.models.contains(&self.settings.model) {
            tracing::warn!(node = %name, model = %self.settings.model, "join refused: node cannot build the run's model");
            return Err(Status::failed_precondition(format!(
                "this run trains model `{}`, which node {name} cannot build (it offers: {})",
                self.settings.model,
                req.models.join(", ")
            )));
        }
        let num_samples = req.num_samples;
        let previous = Some(req.previous_node_id).filter(|p| !p.is_empty());
        let session = self
            .ask(|reply| Command::Join {
                name,
                num_samples,
                previous,
                reply,
            })
            .await?
            .map_err(|r| rejection_status(&r))?;
        Ok(Response::new(pb::JoinResponse {
            node_id: session,
            settings: Some(self.settings.clone()),
        }))
    }

    type InstructionsStream = BoxStream<pb::Instruction>;

    async fn instructions(
        &self,
        request: Request<pb::InstructionsRequest>,
    ) -> Result<Response<Self::InstructionsStream>, Status> {
        let peer = self.auth.peer_identity(&request)?;
        let session = request.into_inner().node_id;
        self.check_certificate_session(peer.as_deref(), &session).await?;
        let (tx, rx) = mpsc::channel(16);
        let s = session.clone();
        self.ask(|reply| Command::Connect {
            session: s,
            stream: tx,
            reply,
        })
        .await?
        .map_err(|r| rejection_status(&r))?;
        Ok(Response::new(Box::pin(InstructionStream {
            inner: ReceiverStream::new(rx),
            session,
            driver: self.driver.clone(),
        })))
    }

    type FetchModelStream = BoxStream<pb::ModelChunk>;

    async fn fetch_model(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let peer = self.auth.peer_identity(&request)?;
        let req = request.into_inner();
        let snapshot = self.snapshot.borrow().clone();
        if !snapshot.durable.load(Ordering::Acquire) {
            return Err(Status::unavailable(format!(
                "model version {} is being saved; ask again shortly",
                snapshot.version
            )));
        }
        if req.version != snapshot.version {
            return Err(Status::not_found(format!(
                "model version {} is not available; the current version is {}",
                req.version, snapshot.version
            )));
        }
        // Only joined nodes may fetch.
        let node = self
            .ask(|reply| Command::Identify {
                session: req.node_id.clone(),
                reply,
            })
            .await?;
        let Some(node) = node else {
            return Err(rejection_status(&Rejection::UnknownSession));
        };
        self.auth.check_session(peer.as_deref(), &node)?;
        let (payload, crc32) = match pb::ModelPart::try_from(req.part) {
            Ok(pb::ModelPart::Parameters) => {
                let payload = match &snapshot.params {
                    GlobalModel::Memory(values) => Payload::Memory(f32_payload(values.clone())),
                    GlobalModel::Stored(stored) => Payload::Stored(stored.clone()),
                };
                (payload, snapshot.crc32)
            }
            Ok(pb::ModelPart::ServerControl) => match &snapshot.control {
                Some((payload, crc)) => (Payload::Memory(payload.clone()), *crc),
                None => {
                    return Err(Status::failed_precondition(
                        "this run has no server control variate (its algorithm is not scaffold)",
                    ));
                }
            },
            Err(_) => return Err(Status::invalid_argument(format!("unknown model part {}", req.part))),
        };
        let header = pb::ModelChunk {
            part: Some(pb::model_chunk::Part::Header(pb::ModelHeader {
                version: snapshot.version,
                manifest: Some(pb::Manifest::from(snapshot.manifest.as_ref())),
            })),
        };
        let trailer = pb::ModelChunk {
            part: Some(pb::model_chunk::Part::Trailer(pb::Trailer { crc32 })),
        };
        drop(snapshot);
        let slot = self.limits.admit_download().await?;
        let step = self.chunk_bytes.max(1);
        let len = payload.len();
        let data_bytes: usize = (0..len)
            .step_by(step)
            .map(|start| data_chunk_len(step.min(len - start)))
            .sum();
        let bytes = header.encoded_len() + data_bytes + trailer.encoded_len();
        self.traffic.count_down(&node, bytes as u64);
        let data: BoxStream<pb::ModelChunk> = match payload {
            Payload::Memory(payload) => {
                let msgs: Vec<_> = chunks(&payload, step)
                    .map(|c| {
                        Ok(pb::ModelChunk {
                            part: Some(pb::model_chunk::Part::Data(c)),
                        })
                    })
                    .collect();
                Box::pin(tokio_stream::iter(msgs))
            }
            Payload::Stored(stored) => stored_chunks(stored, step),
        };
        let inner = tokio_stream::iter([Ok(header)])
            .chain(data)
            .chain(tokio_stream::iter([Ok(trailer)]));
        Ok(Response::new(Box::pin(ModelStream { inner, _slot: slot })))
    }

    async fn secure_aggregation(&self, request: Request<pb::SecAggMessage>) -> Result<Response<pb::SecAggAck>, Status> {
        self.secure_message(request).await
    }

    async fn submit_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitAck>, Status> {
        let peer = self.auth.peer_identity(&request)?;
        let mut stream = request.into_inner();
        let first = match self.limits.next(&mut stream).await {
            Ok(Some(first)) => first,
            Ok(None) => Err(Status::invalid_argument("empty update stream")).inspect_err(|s| self.refused(s, None))?,
            Err(s) => Err(s).inspect_err(|s| self.refused(s, None))?,
        };
        let receiving = std::time::Instant::now();
        let mut wire_bytes = first.encoded_len() as u64;
        let Some(pb::update_chunk::Part::Header(header)) = first.part else {
            let s = Status::invalid_argument("an update stream must start with its header");
            self.refused(&s, None);
            return Err(s);
        };
        let session = header.node_id.clone();
        let (round, base_version) = (header.round, header.base_version);
        let node = self
            .ask(|reply| Command::Admit {
                session: session.clone(),
                round,
                base_version,
                reply,
            })
            .await?
            .map_err(|r| {
                tracing::warn!(round, base_version, reason = %r, "update refused");
                rejection_status(&r)
            })?;
        if let Err(s) = self.auth.check_session(peer.as_deref(), &node) {
            self.refused(&s, Some(&node));
            return Err(s);
        }
        // An unknown kind is refused before any of the payload is read.
        let result = match pb::UpdateKind::try_from(header.kind) {
            Ok(k) => {
                let kind = match k {
                    pb::UpdateKind::Delta => UpdateKind::Delta,
                    pb::UpdateKind::Gradient => UpdateKind::Gradient,
                };
                let received = self.read_payload(&mut stream, &header, &mut wire_bytes).await;
                received.map(|r| (r, kind))
            }
            Err(_) => Err(Status::invalid_argument(format!("unknown update kind {}", header.kind))),
        };
        self.traffic.bytes_up.fetch_add(wire_bytes, Ordering::Relaxed);
        let (received, kind) = match result {
            Ok(ok) => ok,
            Err(status) => {
                self.refused(&status, Some(&node));
                let _ = self.driver.send(Command::Refuse { session });
                return Err(status);
            }
        };
        let upload_seconds = receiving.elapsed().as_secs_f64();
        let (metrics, federated_eval) = metrics_from_wire(&header.metrics.unwrap_or_default());
        let payload_bytes = header.manifest.as_ref().map_or(0, |m| m.payload_bytes);
        tracing::debug!(
            node = %node,
            round,
            payload_bytes,
            wire_bytes,
            spooled_to_disk = received.update.on_disk(),
            "update received"
        );
        let update = Update {
            round,
            base_version,
            num_samples: header.num_samples,
            kind,
            body: Body {
                source: Arc::new(received.update),
                control: header.has_control_delta,
                norm: received.norm,
                non_finite: received.non_finite,
            },
            metrics,
            federated_eval,
            wire_bytes,
            payload_bytes,
            upload_seconds,
        };
        let accepted = self
            .ask(|reply| Command::Submit { session, update, reply })
            .await?
            .map_err(|r| {
                tracing::warn!(node = %node, round, reason = %r, "update refused");
                rejection_status(&r)
            })?;
        Ok(Response::new(pb::SubmitAck {
            round,
            accepted_in_round: accepted as u32,
        }))
    }
}

impl FederationService {
    /// With client certificates (`peer` is the certificate's name), checks
    /// that `session` belongs to the node the certificate names.
    async fn check_certificate_session(&self, peer: Option<&str>, session: &str) -> Result<(), Status> {
        let Some(cn) = peer else {
            return Ok(());
        };
        let node = self
            .ask(|reply| Command::Identify {
                session: session.to_owned(),
                reply,
            })
            .await?
            .ok_or_else(|| rejection_status(&Rejection::UnknownSession))?;
        self.auth.check_session(Some(cn), &node)
    }

    /// Secure aggregation: a node's keys, sealed shares or unmasking answer.
    async fn secure_message(&self, request: Request<pb::SecAggMessage>) -> Result<Response<pb::SecAggAck>, Status> {
        let peer = self.auth.peer_identity(&request)?;
        let msg = request.into_inner();
        let bytes = msg.encoded_len() as u64;
        let session = msg.node_id.clone();
        self.check_certificate_session(peer.as_deref(), &session).await?;
        let input = match &msg.kind {
            Some(pb::sec_agg_message::Kind::Advertise(k)) => {
                SecAggInput::Advertise(Advertise::try_from(k).map_err(|e| Status::invalid_argument(e.to_string()))?)
            }
            Some(pb::sec_agg_message::Kind::Shares(s)) => {
                SecAggInput::Shares(s.shares.iter().map(SealedShares::from).collect())
            }
            Some(pb::sec_agg_message::Kind::Reveal(r)) => SecAggInput::Reveal(reveal_from_wire(NodeId::MAX, r)),
            None => return Err(Status::invalid_argument("a secure aggregation message with no content")),
        };
        let round = msg.round;
        self.traffic.bytes_up.fetch_add(bytes, Ordering::Relaxed);
        self.ask(|reply| Command::SecAgg {
            session,
            round,
            input,
            bytes,
            reply,
        })
        .await?
        .map_err(|r| {
            tracing::warn!(round, reason = %r, "secure aggregation message refused");
            rejection_status(&r)
        })?;
        Ok(Response::new(pb::SecAggAck { round }))
    }

    async fn read_payload(
        &self,
        stream: &mut Streaming<pb::UpdateChunk>,
        header: &pb::UpdateHeader,
        wire_bytes: &mut u64,
    ) -> Result<Received, Status> {
        let wire_manifest = header
            .manifest
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("update header has no manifest"))?;
        self.codec.check_wire(wire_manifest).map_err(payload_status)?;
        let manifest = tensors_from_wire(wire_manifest).map_err(payload_status)?;
        if manifest != *self.manifest {
            return Err(Status::invalid_argument(format!(
                "update manifest ({} tensors, {} parameters) does not match the model ({} tensors, {} parameters)",
                manifest.tensors.len(),
                manifest.numel(),
                self.manifest.tensors.len(),
                self.manifest.numel()
            )));
        }
        let sections = if header.has_control_delta { 2 } else { 1 };
        let expected = wire_manifest.payload_bytes;
        // A masked input carries one value beyond the model's (the clipping indicator).
        let values = match self.codec {
            Codec::Masked => manifest.numel() + 1,
            _ => manifest.numel(),
        };
        let mut intake = Intake::new(
            self.codec,
            values,
            sections,
            expected,
            &self.spool_dir,
            &self.spool_budget,
        )
        .map_err(payload_status)?;
        // Held until the payload is read whole (or refused).
        let _permit = self.limits.admit_upload(expected).await?;
        loop {
            let Some(msg) = self.limits.next(stream).await? else {
                return Err(Status::invalid_argument(format!(
                    "update stream ended without a trailer after {} of {} payload bytes",
                    intake.received_bytes(),
                    expected
                )));
            };
            *wire_bytes += msg.encoded_len() as u64;
            match msg.part {
                Some(pb::update_chunk::Part::Data(bytes)) => {
                    // Decoding is CPU work: off the async runtime.
                    intake = tokio::task::spawn_blocking(move || intake.push(&bytes).map(|()| intake))
                        .await
                        .map_err(|e| Status::internal(format!("decoding task failed: {e}")))?
                        .map_err(payload_status)?;
                }
                Some(pb::update_chunk::Part::Trailer(t)) => {
                    let received = intake.finish(t.crc32).map_err(payload_status)?;
                    if received.update.on_disk() {
                        // A large update's chunks passed through the
                        // allocator; hand that memory back before the next.
                        crate::memory::release_free_memory_off_runtime().await;
                    }
                    return Ok(received);
                }
                Some(pb::update_chunk::Part::Header(_)) => {
                    return Err(Status::invalid_argument("a second header inside one update stream"));
                }
                None => return Err(Status::invalid_argument("an update chunk with no part")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_chunk_sizes_are_the_encoded_sizes() {
        for n in [0, 1, 127, 128, 16_383, 16_384, 1 << 20] {
            let chunk = pb::ModelChunk {
                part: Some(pb::model_chunk::Part::Data(vec![7u8; n].into())),
            };
            assert_eq!(data_chunk_len(n), chunk.encoded_len(), "{n} bytes");
        }
    }
}
