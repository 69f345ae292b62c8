//! `FetchModel`: a node with a task downloads the current global model,
//! streamed from memory or from its checkpoint, within the download limits.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use fedge_common::pb;
use fedge_common::wire::{chunks, f32_payload};
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::limits::{DownloadSlot, InFlight};
use super::{BoxStream, FederationService, rejection_status};
use crate::core::model::{GlobalModel, ModelFile};
use crate::runtime::driver::{Command, Traffic};

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
    Stored(Arc<dyn ModelFile>),
}

/// How long a fetch waits for the version its task names to be saved
/// (asynchronous runs).
const SAVE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

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
fn stored_chunks(stored: Arc<dyn ModelFile>, chunk_bytes: usize) -> BoxStream<pb::ModelChunk> {
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

impl FederationService {
    /// An asynchronous run names the newest version in its tasks as soon
    /// as its server step has made it, while it is still being saved: a
    /// node whose task names it waits here (at most [`SAVE_WAIT`]) until it
    /// is saved. Only a node with a task for that version waits, holding
    /// its one fetch.
    async fn await_version(
        &self,
        peer: Option<&str>,
        req: &pb::FetchModelRequest,
    ) -> Result<(Arc<crate::runtime::driver::ModelSnapshot>, InFlight), Status> {
        self.check_certificate_session(peer, &req.node_id).await?;
        let node = self
            .ask(|reply| Command::AdmitFetch {
                session: req.node_id.clone(),
                version: req.version,
                reply,
            })
            .await?
            .map_err(|r| rejection_status(&r))?;
        let fetch = self.limits.claim_fetch(&node, req.part)?;
        let mut saved = self.snapshot.clone();
        match tokio::time::timeout(SAVE_WAIT, saved.wait_for(|s| s.version >= req.version)).await {
            Ok(Ok(snapshot)) => Ok((snapshot.clone(), fetch)),
            _ => Err(Status::unavailable(format!(
                "model version {} is being saved; ask again shortly",
                req.version
            ))),
        }
    }

    /// `FetchModel`: streams the current version to a node with a task for
    /// it (in an asynchronous run, for it or an older one).
    pub(super) async fn fetch(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<BoxStream<pb::ModelChunk>>, Status> {
        let peer = self.auth.peer_identity(&request)?;
        let req = request.into_inner();
        let mut snapshot = self.snapshot.borrow().clone();
        let mut waited = None;
        if self.settings.asynchronous && req.version > snapshot.version {
            let (saved, fetch) = self.await_version(peer.as_deref(), &req).await?;
            snapshot = saved;
            waited = Some(fetch);
        }
        if !snapshot.durable.load(Ordering::Acquire) {
            return Err(Status::unavailable(format!(
                "model version {} is being saved; ask again shortly",
                snapshot.version
            )));
        }
        // An asynchronous run serves the newest saved version to a node
        // whose task named an older one; its update starts from what it got.
        let older_served = self.settings.asynchronous && req.version < snapshot.version;
        if req.version != snapshot.version && !older_served {
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
                version: snapshot.version,
                reply,
            })
            .await?
            .map_err(|r| rejection_status(&r))?;
        let fetch = match waited {
            Some(fetch) => fetch,
            None => self.limits.claim_fetch(&node, req.part)?,
        };
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
}
