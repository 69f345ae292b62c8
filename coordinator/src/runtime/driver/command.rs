//! What the gRPC service (and the simulator's virtual nodes) tell the
//! driver ([`Command`]), and what the driver tells a node ([`Instruction`]).

use tokio::sync::{mpsc, oneshot};

use crate::Result;
use crate::core::round::{Rejection, Task, Update};
use crate::core::secure::{SecAggInput, SecAggOutput};

/// Sends the command `make` builds around a reply slot to the driver and
/// waits for the reply; `None` when the driver has stopped or stops before
/// replying. The gRPC service and the simulation's virtual nodes ask this way.
pub async fn ask<T>(
    driver: &mpsc::UnboundedSender<Command>,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Option<T> {
    let (reply, rx) = oneshot::channel();
    driver.send(make(reply)).ok()?;
    rx.await.ok()
}

/// What the driver tells one node, on its instruction stream; the gRPC
/// service turns it into the wire's `Instruction` (and the simulator's
/// virtual nodes read it as it is).
#[derive(Debug, Clone)]
pub enum Instruction {
    /// Train for a round.
    Train(Task),
    /// A step of secure aggregation.
    SecAgg(SecAggOutput),
    /// The run is over, for this reason.
    Stop(String),
}

/// Messages from the service to the driver.
#[derive(Debug)]
pub enum Command {
    Join {
        name: String,
        num_samples: u64,
        /// The session the node held before, when it says so.
        previous: Option<String>,
        reply: oneshot::Sender<Result<String, Rejection>>,
    },
    Connect {
        session: String,
        stream: mpsc::Sender<Instruction>,
        reply: oneshot::Sender<Result<(), Rejection>>,
    },
    Disconnect {
        session: String,
    },
    /// An admitted update stream for `round` broke or failed its checks
    /// before it was complete; `transient` when the node may send it
    /// again (the stream broke, timed out, or found the coordinator full).
    Refuse {
        session: String,
        round: u64,
        transient: bool,
    },
    Identify {
        session: String,
        reply: oneshot::Sender<Option<String>>,
    },
    /// A model fetch of `version`.
    AdmitFetch {
        session: String,
        version: u64,
        reply: oneshot::Sender<Result<String, Rejection>>,
    },
    Admit {
        session: String,
        round: u64,
        base_version: u64,
        reply: oneshot::Sender<Result<String, Rejection>>,
    },
    Submit {
        session: String,
        update: Update,
        reply: oneshot::Sender<Result<usize, Rejection>>,
    },
    /// A secure-aggregation message of `bytes` on the wire.
    SecAgg {
        session: String,
        round: u64,
        input: SecAggInput,
        bytes: u64,
        reply: oneshot::Sender<Result<(), Rejection>>,
    },
}
