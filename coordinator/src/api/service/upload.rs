//! `SubmitUpdate` and `SecureAggregation`: a node's update stream, checked
//! against the run's manifest and codec and read within the upload limits,
//! and secure aggregation's messages.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fedge_common::codec::Codec;
use fedge_common::params::Manifest;
use fedge_common::pb;
use fedge_common::secagg::{Advertise, NodeId, SealedShares};
use fedge_common::wire::secagg::reveal_from_wire;
use fedge_common::wire::{metrics_from_wire, tensors_from_wire};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::{FederationService, payload_status, rejection_status};
use crate::api::intake::{Intake, Received};
use crate::core::round::{Body, Update, UpdateKind};
use crate::core::secure::SecAggInput;
use crate::runtime::driver::Command;

impl FederationService {
    /// `SubmitUpdate`: reads an update stream whole, then hands the update
    /// to the driver.
    pub(super) async fn submit(
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
                let transient = matches!(
                    status.code(),
                    tonic::Code::ResourceExhausted
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unavailable
                        | tonic::Code::Unknown
                );
                let _ = self.driver.send(Command::Refuse {
                    session,
                    round,
                    transient,
                });
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

    /// Secure aggregation: a node's keys, sealed shares or unmasking answer.
    pub(super) async fn secure_message(
        &self,
        request: Request<pb::SecAggMessage>,
    ) -> Result<Response<pb::SecAggAck>, Status> {
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
