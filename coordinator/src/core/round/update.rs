//! The vocabulary of updates: what a node submits ([`Update`], its
//! [`Body`] and [`UpdateKind`]), why one is refused ([`Rejection`], mapped
//! to gRPC statuses in one place by the service), and an accepted one as
//! the round keeps it ([`Contribution`]).

use std::fmt;
use std::sync::Arc;

use fedge_common::task::{EvalMetrics, TrainMetrics};

use crate::core::strategy::{UpdateSource, l2_norm};

/// One accepted update's record (its values are already folded in).
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub node: String,
    pub num_samples: u64,
    pub metrics: TrainMetrics,
    /// The round's starting model on the node's held-out data.
    pub federated_eval: Option<EvalMetrics>,
    pub wire_bytes: u64,
    /// The encoded payload's length in bytes.
    pub payload_bytes: u64,
    /// L2 norm of the update as received (before any bounding).
    pub update_norm: f64,
    /// Whether the update was scaled down to the norm bound.
    pub clipped: bool,
    /// Its weight in the round's mean (NaN for a masked input).
    pub weight: f64,
    /// Cosine of the update with the last committed step (`None`: not measured).
    pub alignment: Option<f64>,
    /// Receiving the update stream, seconds.
    pub upload_seconds: f64,
    /// When the update was accepted, seconds after the round started.
    pub arrived_seconds: f64,
    /// The global model version the update was computed from.
    pub base_version: u64,
    /// Asynchronous training: the task it answers, how many versions
    /// behind the current one its base was when it arrived, and the factor
    /// that staleness multiplied it by (`None` in synchronous rounds).
    pub staleness: Option<Staleness>,
}

/// How stale an asynchronous update was, and what that cost it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Staleness {
    pub task: u64,
    /// Current version − base version, when it arrived.
    pub versions: u64,
    /// The staleness weight its values were multiplied by.
    pub factor: f64,
}

impl Contribution {
    /// The record of `node`'s accepted `update`; `update_norm` as received
    /// (NaN when it cannot be seen), `clipped` whether it was bounded.
    pub(super) fn new(node: String, update: &Update, update_norm: f64, clipped: bool, weight: f64) -> Self {
        Self {
            node,
            num_samples: update.num_samples,
            metrics: update.metrics.clone(),
            federated_eval: update.federated_eval,
            wire_bytes: update.wire_bytes,
            payload_bytes: update.payload_bytes,
            update_norm,
            clipped,
            weight,
            alignment: None,
            upload_seconds: update.upload_seconds,
            // Set by `RoundMachine::record`.
            arrived_seconds: 0.0,
            base_version: update.base_version,
            staleness: None,
        }
    }
}

/// What an update's main section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateKind {
    /// `w_local − w_global`.
    Delta,
    /// The loss gradient at `w_global` (FedSGD).
    Gradient,
}

/// An update's values and what the service learned while receiving them.
#[derive(Debug, Clone)]
pub struct Body {
    /// The values: the model-sized main section, then SCAFFOLD's control
    /// variate delta `cᵢ⁺ − cᵢ` when `control` is set.
    pub source: Arc<dyn UpdateSource>,
    pub control: bool,
    /// L2 norm of the main section.
    pub norm: f64,
    /// Index of the first NaN or infinite value, if any.
    pub non_finite: Option<usize>,
}

impl Body {
    /// A body held in memory (tests, tools).
    pub fn dense(delta: Vec<f32>, control_delta: Option<Vec<f32>>) -> Self {
        let norm = l2_norm(&delta);
        let control = control_delta.is_some();
        let mut values = delta;
        values.extend(control_delta.unwrap_or_default());
        let non_finite = values.iter().position(|v| !v.is_finite());
        Self {
            source: Arc::new(values),
            control,
            norm,
            non_finite,
        }
    }
}

/// An update the service received in full and checked.
#[derive(Debug, Clone)]
pub struct Update {
    pub round: u64,
    pub base_version: u64,
    pub num_samples: u64,
    pub kind: UpdateKind,
    pub body: Body,
    pub metrics: TrainMetrics,
    pub federated_eval: Option<EvalMetrics>,
    pub wire_bytes: u64,
    /// The encoded payload's length in bytes.
    pub payload_bytes: u64,
    /// Receiving the update stream took this long (from its header to its checksum).
    pub upload_seconds: f64,
}

/// Why a call was refused. Each maps to one gRPC status in the service.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// The session token is not (or no longer) valid.
    UnknownSession,
    /// The update is for a round that is not the one in progress.
    WrongRound { got: u64, current: Option<u64> },
    /// The update was computed against another global version.
    WrongBaseVersion { got: u64, current: u64 },
    /// The node was not asked to train in this round.
    NotSelected { node: String, round: u64 },
    /// The node already contributed to this round.
    Duplicate { node: String, round: u64 },
    /// The update's length differs from the model's.
    WrongSize { got: usize, expected: usize },
    /// The update holds NaN or infinity.
    NonFinite { index: usize },
    /// The update claims no training samples.
    NoSamples,
    /// The update is not what the run's algorithm produces.
    WrongKind { expected: String, got: String },
    /// The update's L2 norm exceeds `strategy.max_update_norm`.
    NormTooLarge { norm: f64, bound: f64 },
    /// The update's L2 norm is far beyond what the run's updates look like
    /// (`strategy.max_norm_factor` times the reference `reference`).
    NormOutlier { norm: f64, bound: f64, reference: String },
    /// The update claims more samples than its node declared when it joined.
    TooManySamples { claimed: u64, declared: u64 },
    /// A fetch from a node that has no task for that model version.
    NoTask { node: String, version: u64 },
    /// Another session of this node name is connected.
    NameInUse { node: String },
    /// A secure-aggregation message or masked input that does not fit the round.
    SecAgg(String),
    /// Asynchronous training: the update's base version is more than
    /// `async.max_staleness` versions behind the current one.
    TooStale { base: u64, current: u64, max: u64 },
    /// Asynchronous training: the update answers no task the node has in progress.
    NoSuchTask { node: String, task: u64 },
}

impl Rejection {
    /// A short name of the reason, for counters (`run.json`'s `refusals`).
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::UnknownSession => "unknown_session",
            Rejection::WrongRound { .. } => "wrong_round",
            Rejection::WrongBaseVersion { .. } => "wrong_base_version",
            Rejection::NotSelected { .. } => "not_selected",
            Rejection::Duplicate { .. } => "duplicate",
            Rejection::WrongSize { .. } => "wrong_size",
            Rejection::NonFinite { .. } => "non_finite",
            Rejection::NoSamples => "no_samples",
            Rejection::WrongKind { .. } => "wrong_kind",
            Rejection::NormTooLarge { .. } => "norm_too_large",
            Rejection::NormOutlier { .. } => "norm_outlier",
            Rejection::TooManySamples { .. } => "samples_above_declared",
            Rejection::NoTask { .. } => "no_task",
            Rejection::NameInUse { .. } => "name_in_use",
            Rejection::SecAgg(_) => "secure_aggregation",
            Rejection::TooStale { .. } => "too_stale",
            Rejection::NoSuchTask { .. } => "no_task",
        }
    }

    /// Whether the update itself was bad (as opposed to its timing or sender).
    pub fn is_content(&self) -> bool {
        matches!(
            self,
            Rejection::WrongSize { .. }
                | Rejection::NonFinite { .. }
                | Rejection::NoSamples
                | Rejection::WrongKind { .. }
                | Rejection::NormTooLarge { .. }
                | Rejection::NormOutlier { .. }
                | Rejection::TooManySamples { .. }
        )
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::UnknownSession => write!(f, "unknown node session; join again"),
            Rejection::WrongRound { got, current: Some(c) } if got < c => {
                write!(f, "late update for round {got}; round {c} is in progress")
            }
            Rejection::WrongRound { got, current: Some(c) } if got == c => {
                write!(
                    f,
                    "late update for round {got}; the round has closed and no longer accepts updates"
                )
            }
            Rejection::WrongRound { got, current: Some(c) } => {
                write!(f, "update for round {got}; round {c} is in progress")
            }
            Rejection::WrongRound { got, current: None } => {
                write!(f, "update for round {got}; no round is accepting updates")
            }
            Rejection::WrongBaseVersion { got, current } => write!(
                f,
                "update computed against model version {got}; the current version is {current}"
            ),
            Rejection::NotSelected { node, round } => {
                write!(f, "node {node} was not selected for round {round}")
            }
            Rejection::Duplicate { node, round } => {
                write!(f, "node {node} already contributed to round {round}")
            }
            Rejection::WrongSize { got, expected } => {
                write!(f, "update has {got} values; the model has {expected}")
            }
            Rejection::NonFinite { index } => write!(f, "update value {index} is not finite"),
            Rejection::NoSamples => write!(f, "update claims zero training samples"),
            Rejection::WrongKind { expected, got } => {
                write!(f, "this run's algorithm expects {expected}; the update carries {got}")
            }
            Rejection::NormTooLarge { norm, bound } => {
                write!(f, "update norm {norm:.4e} exceeds the bound {bound:.4e}")
            }
            Rejection::NormOutlier { norm, bound, reference } => write!(
                f,
                "update norm {norm:.4e} exceeds {bound:.4e}, the most this run accepts ({reference}; \
                 strategy.max_norm_factor)"
            ),
            Rejection::TooManySamples { claimed, declared } => write!(
                f,
                "update claims {claimed} training samples; the node declared {declared} when it joined"
            ),
            Rejection::NoTask { node, version } => write!(
                f,
                "node {node} has no task for model version {version}; only nodes training in the round in \
                 progress fetch the model"
            ),
            Rejection::SecAgg(m) if m.starts_with("secure aggregation") => f.write_str(m),
            Rejection::SecAgg(m) => write!(f, "secure aggregation: {m}"),
            Rejection::TooStale { base, current, max } => write!(
                f,
                "update computed against model version {base} is {} versions behind the current version \
                 {current}; this run accepts updates at most {max} versions behind (async.max_staleness)",
                current.saturating_sub(*base)
            ),
            Rejection::NoSuchTask { node, task } => write!(
                f,
                "node {node} has no task {task} in progress (its deadline passed, it joined again, or the run \
                 finished); it gets a new task"
            ),
            Rejection::NameInUse { node } => write!(
                f,
                "node {node} is already connected in another session; a rejoining node presents its previous \
                 session, and a new process may join once the old connection is gone"
            ),
        }
    }
}
