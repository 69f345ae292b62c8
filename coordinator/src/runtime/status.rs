//! The run's status as the driver publishes it after every change: phase,
//! rounds, nodes, accuracy curve, privacy and secure aggregation. The HTTP
//! side serves it as `/api/status` and the dashboard draws it; `coordinator
//! status` reads it back.

use serde::{Deserialize, Serialize};

use crate::core::round::PhaseKind;

/// What `/api/status` returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub run_id: String,
    /// `waiting`, `training`, `aggregating`, `closing`, `async` or `finished`.
    pub phase: String,
    /// The round in progress, if any.
    pub round: Option<u64>,
    pub total_rounds: u64,
    /// Rounds aggregated and saved (the global model's version).
    pub completed_rounds: u64,
    pub connected_nodes: usize,
    /// Central test accuracy after the last evaluated round (0..1).
    pub last_test_accuracy: Option<f64>,
    pub last_test_loss: Option<f64>,
    /// Every node that joined.
    pub nodes: Vec<NodeStatus>,
    /// Every completed round, oldest first.
    pub rounds: Vec<RoundPoint>,
    /// Differential privacy, when the run uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyStatus>,
    /// Secure aggregation, when the run uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecureStatus>,
    /// Asynchronous training, once it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asynchronous: Option<AsyncStatus>,
}

/// An asynchronous run in [`Status::asynchronous`]; its server steps are
/// the `rounds`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AsyncStatus {
    /// Nodes training now.
    pub in_flight: usize,
    /// Updates in the open buffer, of `buffer_size`.
    pub buffered: usize,
    pub buffer_size: usize,
    /// Full buffers whose server step runs or waits.
    pub waiting_steps: usize,
    /// The newest saved version, which tasks name and fetches serve.
    pub durable_version: u64,
}

/// The run's secure aggregation in [`Status::secure_aggregation`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecureStatus {
    /// Neighbours per node (0: every node of the round).
    pub neighbours: usize,
    pub max_dropout: f64,
    /// Shamir threshold of the round in progress (or the last one).
    pub threshold: Option<usize>,
    /// `advertising`, `sharing`, `masking` or `unmasking`, while a round runs.
    pub step: Option<String>,
}

/// The run's differential privacy in [`Status::privacy`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacyStatus {
    /// `central` or `distributed`.
    pub noise: String,
    pub noise_multiplier: f64,
    /// The clipping norm of the next round.
    pub clip_norm: f64,
    /// ε spent so far, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    pub epsilon_budget: Option<f64>,
}

/// A node in [`Status::nodes`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    /// `training`, `delivered`, `idle` or `offline`.
    pub state: String,
    pub connected: bool,
    /// Last connect, disconnect or delivered update (ms since the epoch; 0: never).
    pub last_seen_ms: u64,
    pub rounds_contributed: u64,
    pub num_samples: u64,
    /// Local training time of its last accepted update.
    pub last_train_seconds: Option<f64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub rejected_updates: u64,
}

/// A completed round in [`Status::rounds`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundPoint {
    pub round: u64,
    pub participants: usize,
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    pub federated_accuracy: Option<f64>,
    pub federated_loss: Option<f64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub round_seconds: f64,
    pub rejected_updates: u64,
    /// ε spent by the run after this round (differential privacy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Secure aggregation: nodes whose masked input is in the sum, and
    /// nodes that shared keys but sent none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_survivors: Option<usize>,
    /// Asynchronous training: the step's updates by staleness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staleness: Option<std::collections::BTreeMap<u64, u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_dropped: Option<usize>,
}

/// The label of a phase in [`Status::phase`].
pub fn phase_label(p: PhaseKind) -> &'static str {
    match p {
        PhaseKind::Waiting => "waiting",
        PhaseKind::Training => "training",
        PhaseKind::Aggregating => "aggregating",
        PhaseKind::Closing => "closing",
        PhaseKind::Async => "async",
        PhaseKind::Finished => "finished",
    }
}
