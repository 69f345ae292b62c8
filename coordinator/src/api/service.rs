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
use fedge_common::security::check_node_name;
use fedge_common::wire::secagg::reveal_from_wire;
use fedge_common::wire::{chunks, f32_payload, metrics_from_wire, tensors_from_wire};
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::api::intake::{Intake, Received, SpoolBudget};
use crate::api::security::Authenticator;
use crate::config::LimitsConfig;
use crate::core::round::{Body, Rejection, Update, UpdateKind};
use crate::core::secure::{SecAggInput, SecAggOutput};
use crate::runtime::driver::{Command, Instruction, ModelSnapshot, Traffic};
use crate::runtime::global::{GlobalModel, StoredModel};

/// Most model names a join may offer, and their longest length in bytes.
const MAX_MODELS: usize = 64;
const MAX_MODEL_NAME: usize = 64;
/// Longest session token a call may present (the coordinator's are 36 bytes).
const MAX_SESSION_BYTES: usize = 64;

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
/// sent at once, how long one waits for a slot, how long an update stream
/// may stay silent and how slow it may be, and one upload (and one fetch of
/// each model part) in flight per session.
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
    /// Bytes per second an upload must average (0: no floor).
    min_upload_rate: u64,
    /// Sessions with an update stream being read.
    uploading: InFlightSet,
    /// Sessions and model parts being fetched.
    fetching: InFlightSet,
}

type InFlightSet = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

/// One transfer of a session in flight; dropping it ends it.
#[derive(Debug)]
pub struct InFlight {
    set: InFlightSet,
    key: String,
}

impl InFlight {
    /// Marks `key` in flight in `set`, unless it already is.
    fn claim(set: &InFlightSet, key: String) -> Option<Self> {
        let mut held = set.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        held.insert(key.clone()).then(|| Self { set: set.clone(), key })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
    }
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
            min_upload_rate: c.min_upload_bytes_per_sec,
            uploading: InFlightSet::default(),
            fetching: InFlightSet::default(),
        }
    }

    /// Claims the one upload node `node` may have in flight (by name: a
    /// rejoin under a new session does not buy another).
    fn claim_upload(&self, node: &str, round: u64) -> Result<InFlight, Status> {
        InFlight::claim(&self.uploading, node.to_owned()).ok_or_else(|| {
            Status::already_exists(format!(
                "node {node} already has an update stream open for round {round}; a node sends one at a time"
            ))
        })
    }

    /// Claims the one fetch of model part `part` node `node` may have in flight.
    fn claim_fetch(&self, node: &str, part: i32) -> Result<InFlight, Status> {
        InFlight::claim(&self.fetching, format!("{part}/{node}")).ok_or_else(|| {
            Status::already_exists(format!(
                "node {node} is already fetching this model part; a node fetches one copy at a time"
            ))
        })
    }

    /// When an upload of `payload_bytes` that starts now must be complete.
    fn upload_deadline(&self, payload_bytes: u64) -> Option<tokio::time::Instant> {
        (self.min_upload_rate > 0).then(|| {
            let secs = payload_bytes as f64 / self.min_upload_rate as f64;
            tokio::time::Instant::now() + self.idle_timeout + Duration::from_secs_f64(secs.min(1e9))
        })
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
    /// back when the stream ends or after the slot timeout, whichever is
    /// first: HTTP/2 stops asking a stream for data while its client reads
    /// nothing, so a timer, not the stream, gives a stalled download's
    /// slot back (its node's one fetch stays claimed until the stream ends).
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
        self.next_before(stream, None).await
    }

    /// As [`TransferLimits::next`], and an error once `deadline` passes.
    async fn next_before<T>(
        &self,
        stream: &mut Streaming<T>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Option<T>, Status> {
        let idle = tokio::time::Instant::now() + self.idle_timeout;
        let until = deadline.map_or(idle, |d| d.min(idle));
        match tokio::time::timeout_at(until, stream.message()).await {
            Ok(msg) => msg.map_err(broken_stream),
            Err(_) if until < idle => Err(Status::deadline_exceeded(format!(
                "update stream too slow: uploads must average at least {} bytes/s \
                 (limits.min_upload_bytes_per_sec) after {:?}; upload abandoned",
                self.min_upload_rate, self.idle_timeout
            ))),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "update stream sent nothing for {:?}; upload abandoned",
                self.idle_timeout
            ))),
        }
    }
}

/// A transport error while reading a stream (the client went away, the
/// connection broke) as `CANCELLED`, so it is counted as a broken stream;
/// a message that does not decode stays what it is.
fn broken_stream(s: Status) -> Status {
    if s.code() == tonic::Code::Internal && !s.message().contains("decode") {
        Status::cancelled(format!("the update stream broke: {}", s.message()))
    } else {
        s
    }
}

/// A download's slot, held by its model stream until the slot timeout.
#[derive(Debug)]
pub struct DownloadSlot {
    _held: Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>,
}

/// A model stream: holds its download slot (until the slot timeout) and its
/// node's fetch (until it ends), and counts the bytes it hands on as sent to
/// its node.
struct ModelStream<S> {
    inner: S,
    traffic: Arc<Traffic>,
    node: String,
    _slot: DownloadSlot,
    _fetch: InFlight,
}

impl<S: Stream<Item = Result<pb::ModelChunk, Status>> + Unpin> Stream for ModelStream<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            let bytes = chunk.encoded_len() as u64;
            let node = std::mem::take(&mut self.node);
            self.traffic.count_down(&node, bytes);
            self.node = node;
        }
        next
    }
}

/// What a fetch sends: bytes in memory, or a model read from its checkpoint.
enum Payload {
    Memory(Bytes),
    Stored(Arc<StoredModel>),
}

/// The largest data message of a model stream. HTTP/2 sends a message only
/// once the client's window has room for part of it, and asks the stream for
/// the next one only after that: with messages no larger than a window, a
/// client that stops reading stops the stream, so its download slot stays
/// taken (and is freed at the slot timeout) while at most a window's worth
/// of the model waits in the coordinator for it.
const PIECE_BYTES: usize = 64 << 10;

/// A payload's data messages, [`PIECE_BYTES`] at most each (zero-copy).
fn pieces(payload: &Bytes) -> impl Iterator<Item = Result<pb::ModelChunk, Status>> + '_ {
    chunks(payload, PIECE_BYTES).map(|c| {
        Ok(pb::ModelChunk {
            part: Some(pb::model_chunk::Part::Data(c)),
        })
    })
}

/// Streams a stored model's payload, read off the runtime in chunks of
/// `chunk_bytes`, each once the client has taken all but two pieces of the
/// earlier ones: a fetch holds a chunk and a few pieces in memory, never the model.
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
            let failed = match read {
                Ok(Ok(buf)) => {
                    let buf = Bytes::from(buf);
                    for piece in pieces(&buf) {
                        if tx.send(piece).await.is_err() {
                            return;
                        }
                    }
                    None
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the global model for a fetch");
                    Some(Status::internal(format!("cannot read the global model: {e}")))
                }
                Err(e) => Some(Status::internal(format!("model read task failed: {e}"))),
            };
            if let Some(status) = failed {
                let _ = tx.send(Err(status)).await;
                return;
            }
            start += n;
        }
        // The fetch's chunks went through this process's allocator; a
        // large model's worth of them is worth handing back at once.
        crate::runtime::memory::release_free_memory_off_runtime().await;
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
        tonic::Code::AlreadyExists => "duplicate",
        tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown => "stream_broken",
        _ => "malformed_payload",
    }
}

/// The one mapping from round-logic refusals to gRPC statuses.
pub fn rejection_status(r: &Rejection) -> Status {
    let msg = r.to_string();
    match r {
        Rejection::UnknownSession => Status::unauthenticated(msg),
        Rejection::WrongRound { .. } | Rejection::WrongBaseVersion { .. } | Rejection::NoTask { .. } => {
            Status::failed_precondition(msg)
        }
        Rejection::NotSelected { .. } => Status::permission_denied(msg),
        Rejection::SecAgg(_) => Status::failed_precondition(msg),
        Rejection::Duplicate { .. } | Rejection::NameInUse { .. } => Status::already_exists(msg),
        Rejection::WrongSize { .. }
        | Rejection::NonFinite { .. }
        | Rejection::NoSamples
        | Rejection::WrongKind { .. }
        | Rejection::NormTooLarge { .. }
        | Rejection::NormOutlier { .. }
        | Rejection::TooManySamples { .. } => Status::invalid_argument(msg),
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

/// What differs between an update's manifest and the model's: the first
/// tensor whose name or shape differs, or the tensor count. Names come from
/// the node, so they are quoted with escapes and cut short.
fn manifest_difference(got: &Manifest, model: &Manifest) -> String {
    let show = |t: &fedge_common::params::TensorMeta| {
        let mut name: String = format!("{:?}", t.name).chars().take(80).collect();
        if name.len() < format!("{:?}", t.name).len() {
            name.push('…');
        }
        format!("{name} {:?}", t.shape)
    };
    for (i, (a, b)) in got.tensors.iter().zip(&model.tensors).enumerate() {
        if a != b {
            return format!(
                "update manifest does not match the model at tensor {i}: the update has {}, the model {}",
                show(a),
                show(b)
            );
        }
    }
    format!(
        "update manifest does not match the model: it has {} tensors, the model {}",
        got.tensors.len(),
        model.tensors.len()
    )
}

impl FederationService {
    /// Counts and logs an update stream the service refused (the round
    /// logic counts its own refusals); `node` when it is known by then.
    fn refused(&self, status: &Status, node: Option<&str>) {
        self.traffic.count_refused_update(status_label(status), node);
        if self.traffic.log_refusal("update refused") {
            tracing::warn!(node = %node.unwrap_or("-"), reason = %status.message(), "update refused");
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        crate::runtime::driver::ask(&self.driver, make)
            .await
            .ok_or_else(|| Status::unavailable("coordinator is shutting down"))
    }
}

/// An instruction stream: the driver's instructions on the wire, counted
/// (secure aggregation's messages are part of the round's traffic), and
/// telling the driver when the node goes away.
struct InstructionStream {
    inner: ReceiverStream<Instruction>,
    session: String,
    driver: mpsc::UnboundedSender<Command>,
    traffic: Arc<Traffic>,
}

impl Stream for InstructionStream {
    type Item = Result<pb::Instruction, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx).map(|next| {
            next.map(|instruction| {
                let msg = to_wire(&instruction);
                if matches!(instruction, Instruction::SecAgg(_)) {
                    self.traffic
                        .bytes_down
                        .fetch_add(prost::Message::encoded_len(&msg) as u64, Ordering::Relaxed);
                }
                Ok(msg)
            })
        })
    }
}

/// The wire form of an instruction.
fn to_wire(instruction: &Instruction) -> pb::Instruction {
    use pb::instruction::Kind;
    let kind = match instruction {
        Instruction::Train(task) => Kind::Train(pb::TrainTask {
            round: task.round,
            model_version: task.version,
            hyperparameters: Some(pb::Hyperparameters::from(&task.hyper)),
            deadline_unix_ms: task.deadline_ms,
            secure_aggregation: task.secure.as_ref().map(|s| pb::SecureAggregationTask {
                id: s.id,
                threshold: s.threshold as u32,
                range: s.quantizer.range,
                bits: s.quantizer.bits,
                weight: s.weight,
            }),
        }),
        Instruction::SecAgg(SecAggOutput::Roster {
            round,
            nodes,
            neighbours,
        }) => Kind::SecaggRoster(pb::SecAggRoster {
            round: *round,
            nodes: nodes.iter().map(pb::SecAggKeys::from).collect(),
            neighbours: neighbours.clone(),
        }),
        Instruction::SecAgg(SecAggOutput::Shares { round, shares }) => Kind::SecaggShares(pb::SecAggShares {
            round: *round,
            shares: shares.iter().map(pb::SealedShare::from).collect(),
        }),
        Instruction::SecAgg(SecAggOutput::Unmask { round, request }) => Kind::SecaggUnmask(pb::SecAggUnmask {
            round: *round,
            ..pb::SecAggUnmask::from(request)
        }),
        Instruction::Stop(reason) => Kind::Stop(pb::Stop { reason: reason.clone() }),
    };
    pb::Instruction { kind: Some(kind) }
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
        // Everything a join carries is checked before any of it is logged
        // or echoed: the name first, in every authentication mode.
        let name = request.get_ref().node_name.clone();
        if let Err(why) = check_node_name(&name) {
            let status = Status::invalid_argument(why);
            self.traffic.count_refusal("bad_name");
            if self.traffic.log_refusal("join refused") {
                tracing::warn!(reason = %status.message(), "join refused");
            }
            return Err(status);
        }
        if let Err(status) = self.auth.check_join(&request, &name) {
            self.traffic.count_refusal(status_label(&status));
            if self.traffic.log_refusal("join refused") {
                tracing::warn!(node = %name, reason = %status.message(), "join refused");
            }
            return Err(status);
        }
        let req = request.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            if self.traffic.log_refusal("join refused") {
                tracing::warn!(node = %name, theirs = req.protocol_version, ours = PROTOCOL_VERSION, "join refused: protocol version mismatch");
            }
            self.traffic.count_refusal("protocol_version");
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: node speaks v{}, coordinator speaks v{PROTOCOL_VERSION}",
                req.protocol_version
            )));
        }
        if req.previous_node_id.len() > MAX_SESSION_BYTES {
            self.traffic.count_refusal("malformed_payload");
            return Err(Status::invalid_argument(format!(
                "previous_node_id is {} bytes long; a session is at most {MAX_SESSION_BYTES}",
                req.previous_node_id.len()
            )));
        }
        let models = &req.models;
        if models.len() > MAX_MODELS || models.iter().any(|m| m.len() > MAX_MODEL_NAME) {
            self.traffic.count_refusal("malformed_payload");
            return Err(Status::invalid_argument(format!(
                "a join offers at most {MAX_MODELS} model names of at most {MAX_MODEL_NAME} bytes; \
                 node {name} offered {}",
                models.len()
            )));
        }
        if !req.models.contains(&self.settings.model) {
            if self.traffic.log_refusal("join refused") {
                tracing::warn!(node = %name, model = %self.settings.model, "join refused: node cannot build the run's model");
            }
            let offered: Vec<String> = req.models.iter().map(|m| m.escape_debug().to_string()).collect();
            return Err(Status::failed_precondition(format!(
                "this run trains model `{}`, which node {name} cannot build (it offers: {})",
                self.settings.model,
                offered.join(", ")
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
            traffic: self.traffic.clone(),
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
        // A session used over another node's certificate is refused first,
        // whatever its task; then only nodes with a task for this version fetch it.
        self.check_certificate_session(peer.as_deref(), &req.node_id).await?;
        let node = self
            .ask(|reply| Command::AdmitFetch {
                session: req.node_id.clone(),
                version: req.version,
                reply,
            })
            .await?
            .map_err(|r| rejection_status(&r))?;
        let fetch = self.limits.claim_fetch(&node, req.part)?;
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
        let data: BoxStream<pb::ModelChunk> = match payload {
            Payload::Memory(payload) => Box::pin(tokio_stream::iter(pieces(&payload).collect::<Vec<_>>())),
            Payload::Stored(stored) => stored_chunks(stored, step),
        };
        let inner = tokio_stream::iter([Ok(header)])
            .chain(data)
            .chain(tokio_stream::iter([Ok(trailer)]));
        Ok(Response::new(Box::pin(ModelStream {
            inner,
            traffic: self.traffic.clone(),
            node,
            _slot: slot,
            _fetch: fetch,
        })))
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
                if self.traffic.log_refusal("update refused") {
                    tracing::warn!(round, base_version, reason = %r, "update refused");
                }
                rejection_status(&r)
            })?;
        if let Err(s) = self.auth.check_session(peer.as_deref(), &node) {
            self.refused(&s, Some(&node));
            return Err(s);
        }
        // One stream per node: further streams are refused at once, so one
        // node cannot hold the upload slots (they are not charged to its round).
        let _uploading = self
            .limits
            .claim_upload(&node, round)
            .inspect_err(|s| self.refused(s, Some(&node)))?;
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
                let _ = self.driver.send(Command::Refuse { session, round });
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
                if self.traffic.log_refusal("update refused") {
                    tracing::warn!(node = %node, round, reason = %r, "update refused");
                }
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
            if self.traffic.log_refusal("secure aggregation message refused") {
                tracing::warn!(round, reason = %r, "secure aggregation message refused");
            }
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
            return Err(Status::invalid_argument(manifest_difference(&manifest, &self.manifest)));
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
        let deadline = self.limits.upload_deadline(expected);
        loop {
            let Some(msg) = self.limits.next_before(stream, deadline).await? else {
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
                        crate::runtime::memory::release_free_memory_off_runtime().await;
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
