//! `Instructions`: the stream that carries the driver's instructions to a
//! node, and tells the driver when the node goes away.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use fedge_common::pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::core::secure::SecAggOutput;
use crate::runtime::driver::{Command, Instruction, Traffic};

/// An instruction stream: the driver's instructions on the wire, counted
/// (secure aggregation's messages are part of the round's traffic), and
/// telling the driver when the node goes away.
pub(super) struct InstructionStream {
    pub(super) inner: ReceiverStream<Instruction>,
    pub(super) session: String,
    pub(super) driver: mpsc::UnboundedSender<Command>,
    pub(super) traffic: Arc<Traffic>,
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
