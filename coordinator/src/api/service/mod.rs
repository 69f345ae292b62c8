//! The gRPC adapter: turns `fedge.v1.Federation` calls into driver
//! [`Command`]s, streams model snapshots, reassembles update streams, and maps
//! every refusal to a gRPC status in one place ([`rejection_status`]).
//!
//! - this module: the service, `Join`, `Instructions`, and the status mapping;
//! - `download`: `FetchModel`, streamed from memory or from the checkpoint;
//! - `upload`: `SubmitUpdate` (read through the intake) and `SecureAggregation`;
//! - `instructions`: the instruction stream and its wire form;
//! - `limits`: slots, byte budgets and timeouts of the transfers in flight.

mod download;
mod instructions;
mod limits;
mod upload;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use fedge_common::codec::Codec;
use fedge_common::params::Manifest;
use fedge_common::pb::{self, PROTOCOL_VERSION};
use fedge_common::security::check_node_name;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use self::instructions::InstructionStream;
pub use self::limits::TransferLimits;
use crate::api::intake::SpoolBudget;
use crate::api::security::Authenticator;
use crate::core::round::Rejection;
use crate::runtime::driver::{Command, ModelSnapshot, Traffic};

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
        Rejection::WrongRound { .. }
        | Rejection::WrongBaseVersion { .. }
        | Rejection::NoTask { .. }
        | Rejection::TooStale { .. }
        | Rejection::NoSuchTask { .. } => Status::failed_precondition(msg),
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
        self.fetch(request).await
    }

    async fn secure_aggregation(&self, request: Request<pb::SecAggMessage>) -> Result<Response<pb::SecAggAck>, Status> {
        self.secure_message(request).await
    }

    async fn submit_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitAck>, Status> {
        self.submit(request).await
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
}
