//! The round state machine: membership, sampling, validation of updates,
//! aggregation and round closing, as a pure function of its inputs.
//!
//! It does no I/O and reads no clock: the driver feeds it events (a node
//! joined, connected, disconnected, submitted; time passed; a closed round was
//! persisted) with the current time in Unix milliseconds, and carries out the
//! [`Output`]s it returns (send a task, persist and evaluate a closed round,
//! stop the fleet). Unit tests drive it without sockets or threads.
//!
//! A round goes `Training → Aggregating → Closing → (next round's)
//! Training`, or back to `Waiting` when too few nodes are connected. It
//! closes when every selected node that is still connected has submitted (at
//! least `min_nodes` of them), or at its deadline with at least `min_nodes`
//! updates; otherwise it is retried with a fresh sample. Aggregation is
//! handed to the driver as an [`AggregationJob`] (it may take seconds for
//! large models or robust aggregators), which runs it off the async runtime
//! and returns the result through [`RoundMachine::aggregated`].
//!
//! Sampling is seeded by `(seed, round, attempt)`; nodes that were asked to
//! train and did not deliver within the last `failure_cooldown_rounds`
//! rounds are picked only after every other available node, and those that
//! stayed connected without delivering (slow, refused or holding back) sit
//! those rounds out while enough others are available.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};

use fedge_common::task::{Algorithm, EvalMetrics, Hyperparameters, TrainMetrics};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::config::TrainConfig;
use crate::global::{GlobalModel, StoredModel};
use crate::privacy::{RoundPlan, RoundPrivacy};
use crate::secure::{
    SecAggInput, SecAggOutput, SecureRecord, SecureRound, SecureSettings, SecureTask, Step, UnmaskJob,
};
use crate::strategy::aggregate::lock;
use crate::strategy::{MeanSum, RoundAggregate, Strategy, UpdateSource, clip_scale, l2_norm};

/// Settings of the round logic.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSettings {
    pub total_rounds: u64,
    pub fraction: f64,
    pub min_nodes: usize,
    pub min_available: usize,
    pub deadline_ms: u64,
    pub seed: u64,
    /// Attempts a round gets before the run stops with an error (0: unlimited).
    pub max_attempts: u32,
    /// Rounds during which a node that failed to deliver is picked last (0: off).
    pub failure_cooldown_rounds: u64,
    /// Once half the selected nodes (and at least `min_nodes`) have
    /// delivered, the round waits for the rest at most this many times as
    /// long as that half took (at least one second more), then closes
    /// without them (0: wait for the deadline).
    pub straggler_factor: f64,
    /// Whether each new global model is checked before it is committed
    /// (the driver's `strategy.max_loss_ratio`): the machine then keeps the
    /// last step's direction (for a model held in memory) and measures how
    /// each update aligns with it, to know which update to leave out of a
    /// rejected round's retry.
    pub track_direction: bool,
    /// Federated evaluation every this many rounds (and in the last); 0: never.
    pub federated_every: u64,
    /// What nodes are asked to compute, and with which hyper-parameters.
    pub train: TrainConfig,
    /// Secure aggregation, when the run uses it.
    pub secure: Option<SecureSettings>,
}

/// A training task for one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub round: u64,
    /// Global model version to start from.
    pub version: u64,
    /// This round's hyper-parameters, with the node's own seed.
    pub hyper: Hyperparameters,
    pub deadline_ms: u64,
    /// Secure aggregation: the node's number, threshold, quantizer and weight.
    pub secure: Option<SecureTask>,
}

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
}

impl Contribution {
    /// The record of `node`'s accepted `update`; `update_norm` as received
    /// (NaN when it cannot be seen), `clipped` whether it was bounded.
    fn new(node: String, update: &Update, update_norm: f64, clipped: bool, weight: f64) -> Self {
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
        }
    }
}

/// A round that reached its end; the driver persists and evaluates it, then
/// calls [`RoundMachine::persisted`].
#[derive(Debug, Clone)]
pub struct ClosedRound {
    pub round: u64,
    /// The new global model version (equal to `round`).
    pub version: u64,
    pub global: Arc<Vec<f32>>,
    pub contributions: Vec<Contribution>,
    pub selected: usize,
    pub started_ms: u64,
    pub closed_ms: u64,
    /// SCAFFOLD's server control variate after the round, if the run uses it.
    pub control: Option<Arc<Vec<f32>>>,
    /// Strategy state to checkpoint: named vectors and the server optimizer's steps.
    pub strategy_state: Arc<(BTreeMap<String, Vec<f32>>, u64)>,
    /// Differential privacy: the round's noise, clipping and the run's ε after it.
    pub privacy: Option<RoundPrivacy>,
    /// Secure aggregation: who took part in each step.
    pub secure: Option<SecureRecord>,
}

/// A round's aggregation, to run off the async runtime.
#[derive(Debug)]
pub struct AggregationJob {
    round: u64,
    global: GlobalModel,
    aggregate: RoundAggregate,
    total_nodes: usize,
    strategy: Strategy,
    /// Differential privacy: the round's plan and how many updates needed no clipping.
    privacy: Option<(RoundPlan, usize)>,
    /// Secure aggregation: the masked sum to unmask instead of `aggregate`.
    unmask: Option<UnmaskJob>,
    /// Whether to keep the step (new global − old) for the next round's
    /// alignments ([`RoundSettings::track_direction`]).
    track_direction: bool,
}

/// Folding one accepted update into the round's running sum, to run off the
/// async runtime; its result goes back through [`RoundMachine::folded`].
#[derive(Debug)]
pub struct FoldJob {
    round: u64,
    attempt: u32,
    node: String,
    target: FoldTarget,
    source: Arc<dyn UpdateSource>,
    weight: f64,
    scale: f64,
    /// The last committed step, to measure the update's alignment with.
    direction: Option<Arc<Vec<f32>>>,
}

/// Where a [`FoldJob`] adds its update.
#[derive(Debug)]
enum FoldTarget {
    /// The mean's running sum.
    Mean(Arc<Mutex<MeanSum>>),
    /// Secure aggregation's masked sum in `Z_2^32`, as node `id`'s input.
    Masked {
        server: Arc<Mutex<fedge_common::secagg::Server>>,
        id: fedge_common::secagg::NodeId,
    },
}

/// What a [`FoldJob`] did.
#[derive(Debug)]
pub struct Folded {
    round: u64,
    attempt: u32,
    node: String,
    result: Result<(), String>,
    alignment: Option<f64>,
}

impl FoldJob {
    /// Decodes the update and adds it to the sum (blocking, CPU-bound).
    pub fn run(self) -> Folded {
        let result = match &self.target {
            FoldTarget::Mean(sum) => lock(sum).fold(self.source.as_ref(), self.weight, self.scale),
            FoldTarget::Masked { server, id } => {
                // Masked values travel as the bits of f32s (`Codec::Masked`).
                let mut words = vec![0u32; self.source.len()];
                self.source
                    .visit(&mut |offset, values| {
                        for (w, v) in words[offset..offset + values.len()].iter_mut().zip(values) {
                            *w = v.to_bits();
                        }
                    })
                    .and_then(|()| lock(server).add_masked(*id, &words).map_err(|e| e.to_string()))
            }
        };
        let alignment = match (&result, &self.direction) {
            (Ok(()), Some(direction)) => cosine(self.source.as_ref(), direction, self.scale),
            _ => None,
        };
        Folded {
            round: self.round,
            attempt: self.attempt,
            node: self.node,
            result,
            alignment,
        }
    }
}

/// What an [`AggregationJob`] produced.
#[derive(Debug)]
pub struct Aggregated {
    round: u64,
    result: Result<Arc<Vec<f32>>, String>,
    strategy: Strategy,
    seconds: f64,
    privacy: Option<RoundPrivacy>,
    /// The strategy before the server step (when the model is checked).
    before: Option<Box<Strategy>>,
    /// Set when the driver's check refused the new model.
    rejected: bool,
    /// The new model's L2 norm (computed here, off the async runtime).
    model_norm: f64,
    /// The step the new model takes (new global − old), when tracked and
    /// the old model is in memory.
    direction: Option<Arc<Vec<f32>>>,
    /// Secure aggregation: nodes caught misbehaving while unmasking (name,
    /// what they did).
    misbehaved: Vec<(String, String)>,
}

impl AggregationJob {
    /// The round being aggregated.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Combines the updates and applies the server optimizer (blocking, CPU-bound).
    pub fn run(mut self) -> Aggregated {
        let start = std::time::Instant::now();
        let mut count = self.aggregate.count();
        let mut privacy = None;
        let mut unclipped_secure = None;
        // The strategy as it was before the step: a failed or rejected step
        // leaves no trace in it.
        let before = Some(Box::new(self.strategy.clone()));
        let mut misbehaved = Vec::new();
        let combined = match self.unmask.take() {
            Some(job) => {
                let (unmasked, blamed) = job.run();
                misbehaved = blamed;
                unmasked.map(|u| {
                    count = u.survivors;
                    unclipped_secure = Some(u.unclipped);
                    (u.mean, None)
                })
            }
            None => self.aggregate.finish(),
        };
        let result = combined.and_then(|(mut delta, control_sum)| {
            // Nothing non-finite reaches the server optimizer's state or
            // the global model: the round is retried instead.
            if let Some(i) = delta.iter().position(|v| !v.is_finite()) {
                return Err(format!(
                    "the combined update has a non-finite value at index {i} (its updates' sum overflowed)"
                ));
            }
            if let (Some((plan, unclipped)), Some(p)) = (&self.privacy, &mut self.strategy.privacy) {
                let unclipped = unclipped_secure.unwrap_or(*unclipped);
                // The noise comes from the operating system-seeded CSPRNG.
                privacy = Some(p.close_round(plan, &mut delta, count, unclipped, &mut rand::rng()));
            }
            let next = self
                .strategy
                .server
                .step_model(&self.global, delta)
                .map_err(|e| e.to_string())?;
            if let Some(i) = next.iter().position(|v| !v.is_finite()) {
                return Err(format!("the new global model has a non-finite value at index {i}"));
            }
            if let Some(sum) = &control_sum {
                self.strategy.update_control(sum, count, self.total_nodes);
            }
            Ok(Arc::new(next))
        });
        let (model_norm, direction) = match &result {
            Ok(next) => (
                l2_norm(next),
                match (&self.global, self.track_direction) {
                    (GlobalModel::Memory(old), true) => {
                        Some(Arc::new(next.iter().zip(old.iter()).map(|(n, o)| n - o).collect()))
                    }
                    _ => None,
                },
            ),
            Err(_) => (f64::NAN, None),
        };
        let mut done = Aggregated {
            round: self.round,
            result,
            strategy: self.strategy,
            seconds: start.elapsed().as_secs_f64(),
            privacy,
            before,
            rejected: false,
            model_norm,
            direction,
            misbehaved,
        };
        // A step that failed part-way leaves the strategy as it was.
        if done.result.is_err()
            && let Some(before) = done.before.take()
        {
            done.strategy = *before;
            done.privacy = None;
        }
        done
    }
}

impl Aggregated {
    /// Seconds the aggregation took.
    pub fn seconds(&self) -> f64 {
        self.seconds
    }

    /// The new global model, when the aggregation produced one.
    pub fn candidate(&self) -> Option<&Arc<Vec<f32>>> {
        self.result.as_ref().ok()
    }

    /// Refuses the new model for `reason`: the strategy goes back to where
    /// it was before the server step (the round's privacy is not counted),
    /// and [`RoundMachine::aggregated`] retries the round without the
    /// update it suspects most ([`suspect`]).
    pub fn reject(&mut self, reason: String) {
        if let Some(before) = self.before.take() {
            self.strategy = *before;
        }
        self.privacy = None;
        self.result = Err(reason);
        self.rejected = true;
    }
}

/// What the driver must do.
#[derive(Debug)]
pub enum Output {
    /// Send `task` to the node named `node`.
    Assign { node: String, task: Task },
    /// Fold an accepted update off the runtime, then call [`RoundMachine::folded`].
    Fold(Box<FoldJob>),
    /// Run the aggregation off the runtime, then call [`RoundMachine::aggregated`].
    Aggregate(Box<AggregationJob>),
    /// Persist, evaluate and publish a closed round.
    Close(ClosedRound),
    /// The last round is persisted: stop the nodes and the service.
    Finished,
    /// The run cannot go on (a round kept failing): stop with this error.
    Abort(String),
    /// Send a secure-aggregation message to the node named `node`.
    SecAgg { node: String, message: SecAggOutput },
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
            Rejection::NameInUse { node } => write!(
                f,
                "node {node} is already connected in another session; a rejoining node presents its previous \
                 session, and a new process may join once the old connection is gone"
            ),
        }
    }
}

#[derive(Debug, Clone)]
struct NodeRecord {
    session: String,
    connected: bool,
    num_samples: u64,
    rounds_contributed: u64,
    /// The last round this node was asked to train in and did not deliver.
    last_failure: Option<u64>,
    /// The last round it did not deliver although it stayed connected (too
    /// slow for the cutoff or the deadline, refused, or holding back).
    last_cut: Option<u64>,
    /// Such rounds since it last delivered: from the third on, each doubles
    /// the rounds it sits out (up to 32 times the cool-down). The first two
    /// count alike, since an honest node back from a network partition is
    /// often late twice (its connection's retransmission backs off).
    cuts: u32,
    /// When the node last connected, disconnected or delivered (ms since the epoch).
    last_seen_ms: u64,
    /// Whether the node ever opened its instruction stream; a session
    /// that never does expires ([`RoundMachine::tick`]).
    connected_once: bool,
}

/// A node as status reports show it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub connected: bool,
    pub num_samples: u64,
    pub rounds_contributed: u64,
    /// `training` (selected in the round in progress, not yet delivered),
    /// `delivered`, `idle` (connected, not in the round) or `offline`.
    pub state: &'static str,
    pub last_seen_ms: u64,
}

#[derive(Debug)]
struct RoundState {
    round: u64,
    attempt: u32,
    selected: BTreeSet<String>,
    accepted: Vec<Contribution>,
    /// Selected nodes whose update was refused: the round does not wait for them.
    refused: BTreeSet<String>,
    /// Selected nodes that disconnected, or joined again under a new
    /// session, during the round.
    left: BTreeSet<String>,
    aggregate: RoundAggregate,
    /// Accepted updates whose fold into the running sum has not finished.
    folding: BTreeSet<String>,
    started_ms: u64,
    deadline_ms: u64,
    /// The most one update may weigh in the mean (`None`: its samples).
    weight_cap: Option<f64>,
    /// When half the selected nodes (at least `min_nodes`) had delivered.
    half_ms: Option<u64>,
    /// Updates with a larger norm are refused, and why that bound.
    norm_bound: Option<(f64, String)>,
    /// Differential privacy: this round's clipping and noise.
    privacy: Option<RoundPlan>,
    /// Secure aggregation: the protocol's state.
    secure: Option<SecureRound>,
}

#[derive(Debug)]
enum Phase {
    Waiting,
    Training(Box<RoundState>),
    Aggregating { round: u64, state: ClosingState },
    Closing { round: u64 },
    Finished,
}

/// What a round keeps while its aggregation runs.
#[derive(Debug)]
struct ClosingState {
    selected: usize,
    accepted: Vec<Contribution>,
    started_ms: u64,
    closed_ms: u64,
    attempt: u32,
    secure: Option<SecureRecord>,
}

/// Where a run stands, for status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    Waiting,
    Training,
    Aggregating,
    Closing,
    Finished,
}

/// The coordinator's round logic. See the module docs.
#[derive(Debug)]
pub struct RoundMachine {
    settings: RoundSettings,
    version: u64,
    global: GlobalModel,
    nodes: BTreeMap<String, NodeRecord>,
    phase: Phase,
    /// Taken while an aggregation job runs.
    strategy: Option<Strategy>,
    /// Why the run finished before its last round, if it did.
    stop_reason: Option<String>,
    /// The median norm of the last completed round's updates (what
    /// `strategy.max_norm_factor` multiplies), once a round has completed.
    norm_reference: Option<f64>,
    /// The norm of the current global model: updates may be
    /// `strategy.max_norm_factor` times it (or the last round's median,
    /// whichever is larger).
    model_norm: f64,
    /// Joins whose session has not connected yet, oldest first, with when
    /// they expire: a session that never connects is forgotten.
    pending_joins: VecDeque<(u64, String, String)>,
    /// Nodes left out of a round's next attempts because a new model with
    /// their update was rejected: (round, names).
    suspects: (u64, BTreeSet<String>),
    /// The survivor left out of the next attempt of `suspects`' round in
    /// turn, after a secure sum failed its checks without naming anyone.
    in_turn: Option<String>,
    /// The last committed step (new global − old), when tracked.
    direction: Option<Arc<Vec<f32>>>,
}

/// How long a joined session may take to open its instruction stream
/// before it is forgotten.
pub const JOIN_EXPIRY_MS: u64 = 120_000;

impl RoundMachine {
    /// A machine at model version 0 holding `initial` as the global model.
    pub fn new(settings: RoundSettings, initial: Vec<f32>, strategy: Strategy) -> Self {
        Self::resume(settings, 0, Arc::new(initial), strategy)
    }

    /// A machine that continues after `version` completed rounds, from the
    /// checkpointed global model (shared with its first published
    /// snapshot) and strategy state.
    pub fn resume(settings: RoundSettings, version: u64, global: Arc<Vec<f32>>, strategy: Strategy) -> Self {
        Self {
            settings,
            version,
            model_norm: l2_norm(&global),
            global: GlobalModel::Memory(global),
            nodes: BTreeMap::new(),
            phase: Phase::Waiting,
            strategy: Some(strategy),
            stop_reason: None,
            norm_reference: None,
            pending_joins: VecDeque::new(),
            suspects: (0, BTreeSet::new()),
            in_turn: None,
            direction: None,
        }
    }

    /// Sets the median update norm of the last completed round (a resumed
    /// run reads it from its history), which bounds the next round's
    /// updates under `strategy.max_norm_factor`.
    pub fn set_norm_reference(&mut self, median: f64) {
        if median.is_finite() && median > 0.0 {
            self.norm_reference = Some(median);
        }
    }

    /// SCAFFOLD's current server control variate, if the run uses it.
    pub fn control(&self) -> Option<&[f32]> {
        self.strategy.as_ref().and_then(|s| s.control.as_deref())
    }

    /// The current global model version (rounds completed).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The current global model.
    pub fn global(&self) -> &GlobalModel {
        &self.global
    }

    /// The current version is durable in `stored`: read it from there from
    /// now on, and drop the copy in memory.
    pub fn store_global(&mut self, stored: Arc<StoredModel>) -> crate::Result<()> {
        if stored.len() != self.global.len() {
            return Err(crate::Error::Internal(format!(
                "the stored global model has {} values; the model has {}",
                stored.len(),
                self.global.len()
            )));
        }
        self.global = GlobalModel::Stored(stored);
        Ok(())
    }

    /// The round in progress (training or closing), if any.
    pub fn current_round(&self) -> Option<u64> {
        match &self.phase {
            Phase::Training(r) => Some(r.round),
            Phase::Aggregating { round, .. } | Phase::Closing { round } => Some(*round),
            _ => None,
        }
    }

    /// The phase, for status reports.
    pub fn phase(&self) -> PhaseKind {
        match self.phase {
            Phase::Waiting => PhaseKind::Waiting,
            Phase::Training(_) => PhaseKind::Training,
            Phase::Aggregating { .. } => PhaseKind::Aggregating,
            Phase::Closing { .. } => PhaseKind::Closing,
            Phase::Finished => PhaseKind::Finished,
        }
    }

    /// Number of nodes with an open instruction stream.
    pub fn connected_nodes(&self) -> usize {
        self.nodes.values().filter(|n| n.connected).count()
    }

    /// The node name behind a session token.
    pub fn node_of(&self, session: &str) -> Option<&str> {
        self.nodes
            .iter()
            .find(|(_, n)| n.session == session)
            .map(|(name, _)| name.as_str())
    }

    /// The current session token of the node named `name`.
    pub fn session_of(&self, name: &str) -> Option<&str> {
        self.nodes.get(name).map(|n| n.session.as_str())
    }

    /// A node (re)joined under `name` with a fresh session token. A rejoin
    /// replaces the node's previous session.
    ///
    /// A name whose session is still connected is taken unless the caller
    /// presents that session (`previous`): two processes cannot share one
    /// identity, while a node whose connection broke rejoins at once.
    pub fn join(
        &mut self,
        name: &str,
        session: &str,
        num_samples: u64,
        previous: Option<&str>,
        now_ms: u64,
    ) -> Result<(), Rejection> {
        if let Some(rec) = self.nodes.get(name)
            && rec.connected
            && previous != Some(rec.session.as_str())
        {
            return Err(Rejection::NameInUse { node: name.to_owned() });
        }
        let rec = self.nodes.entry(name.to_owned()).or_insert(NodeRecord {
            session: String::new(),
            connected: false,
            num_samples,
            rounds_contributed: 0,
            last_failure: None,
            last_cut: None,
            cuts: 0,
            last_seen_ms: now_ms,
            connected_once: false,
        });
        // A new session for a node in the round means its old one left (a
        // restarted node resumes under a new one before the old stream's
        // end is seen).
        if rec.session != session
            && let Phase::Training(r) = &mut self.phase
            && r.selected.contains(name)
        {
            r.left.insert(name.to_owned());
        }
        rec.session = session.to_owned();
        rec.connected = false;
        rec.num_samples = num_samples;
        self.pending_joins
            .push_back((now_ms + JOIN_EXPIRY_MS, name.to_owned(), session.to_owned()));
        Ok(())
    }

    /// The node behind `session` opened its instruction stream. Starts a
    /// round when enough nodes are connected; hands a reconnecting node the
    /// task of the round in progress if it was selected and has not submitted.
    pub fn connect(&mut self, session: &str, now_ms: u64) -> Result<Vec<Output>, Rejection> {
        let name = self.node_of(session).ok_or(Rejection::UnknownSession)?.to_owned();
        let rec = self.nodes.get_mut(&name).expect("known node");
        rec.connected = true;
        rec.connected_once = true;
        rec.last_seen_ms = now_ms;
        let out = match &self.phase {
            Phase::Waiting => self.try_start(self.version + 1, 0, now_ms),
            Phase::Training(r) if r.selected.contains(&name) && !r.accepted.iter().any(|c| c.node == name) => {
                vec![Output::Assign {
                    task: self.task_for(r, &name),
                    node: name,
                }]
            }
            _ => Vec::new(),
        };
        Ok(out)
    }

    /// The node behind `session` closed its instruction stream (or a newer
    /// session replaced it). The round may now be able to close.
    pub fn disconnect(&mut self, session: &str, now_ms: u64) -> Vec<Output> {
        let Some(name) = self.node_of(session).map(str::to_owned) else {
            return Vec::new();
        };
        let rec = self.nodes.get_mut(&name).expect("known node");
        rec.connected = false;
        rec.last_seen_ms = now_ms;
        if let Phase::Training(r) = &mut self.phase
            && r.selected.contains(&name)
        {
            r.left.insert(name);
        }
        self.maybe_close(now_ms)
    }

    /// Checks an update's header before its payload is read.
    pub fn admit(&self, session: &str, round: u64, base_version: u64) -> Result<String, Rejection> {
        let name = self.node_of(session).ok_or(Rejection::UnknownSession)?;
        let Phase::Training(r) = &self.phase else {
            return Err(Rejection::WrongRound {
                got: round,
                current: self.current_round(),
            });
        };
        if round != r.round {
            return Err(Rejection::WrongRound {
                got: round,
                current: Some(r.round),
            });
        }
        if base_version != self.version {
            return Err(Rejection::WrongBaseVersion {
                got: base_version,
                current: self.version,
            });
        }
        if !r.selected.contains(name) {
            return Err(Rejection::NotSelected {
                node: name.to_owned(),
                round,
            });
        }
        if r.accepted.iter().any(|c| c.node == name) {
            return Err(Rejection::Duplicate {
                node: name.to_owned(),
                round,
            });
        }
        Ok(name.to_owned())
    }

    /// Checks a model fetch: only a node training in the round in progress
    /// (selected, its update not yet accepted) fetches, and only the
    /// version its task names.
    pub fn admit_fetch(&self, session: &str, version: u64) -> Result<String, Rejection> {
        let name = self.node_of(session).ok_or(Rejection::UnknownSession)?;
        match &self.phase {
            Phase::Training(r)
                if version == self.version
                    && r.selected.contains(name)
                    && !r.accepted.iter().any(|c| c.node == name) =>
            {
                Ok(name.to_owned())
            }
            _ => Err(Rejection::NoTask {
                node: name.to_owned(),
                version,
            }),
        }
    }

    /// Validates a complete update and accepts it. Returns the number of
    /// updates accepted in the round so far, and what to do next (for the
    /// mean, an [`Output::Fold`] of this update).
    pub fn submit(&mut self, session: &str, update: Update, now_ms: u64) -> Result<(usize, Vec<Output>), Rejection> {
        let name = self.admit(session, update.round, update.base_version)?;
        if matches!(&self.phase, Phase::Training(r) if r.secure.is_some()) {
            return self.submit_masked(name, update, now_ms);
        }
        let body = &update.body;
        let numel = self.global.len();
        let sections = 1 + usize::from(body.control);
        if body.source.len() != numel * sections {
            return Err(Rejection::WrongSize {
                got: body.source.len() / sections,
                expected: numel,
            });
        }
        if let Some(index) = body.non_finite {
            return Err(Rejection::NonFinite { index });
        }
        self.check_samples(&name, update.num_samples)?;
        let algorithm = self.settings.train.algorithm;
        let expected_kind = match algorithm {
            Algorithm::FedSgd => UpdateKind::Gradient,
            _ => UpdateKind::Delta,
        };
        let expected = (expected_kind, algorithm == Algorithm::Scaffold);
        let got = (update.kind, body.control);
        if got != expected {
            return Err(Rejection::WrongKind {
                expected: describe(expected.0, expected.1),
                got: describe(got.0, got.1),
            });
        }
        // FedSGD: the node's step is −η·g with this round's learning rate.
        let step = match update.kind {
            UpdateKind::Gradient => -self
                .settings
                .train
                .learning_rate_at(update.round, self.settings.total_rounds),
            UpdateKind::Delta => 1.0,
        };
        let update_norm = body.norm * step.abs();
        if let Some(max) = self.strategy.as_ref().and_then(|s| s.max_norm)
            && update_norm > max
        {
            return Err(Rejection::NormTooLarge {
                norm: update_norm,
                bound: max,
            });
        }
        let Phase::Training(r) = &mut self.phase else {
            unreachable!("admit checked the phase");
        };
        if let Some((bound, reference)) = &r.norm_bound
            && update_norm > *bound
        {
            return Err(Rejection::NormOutlier {
                norm: update_norm,
                bound: *bound,
                reference: reference.clone(),
            });
        }
        let samples_weight = match r.weight_cap {
            Some(cap) => (update.num_samples as f64).min(cap),
            None => update.num_samples as f64,
        };
        let private = self.strategy.as_ref().and_then(|s| s.privacy.as_ref());
        let (bound, clipped, weight) = match (&r.privacy, private) {
            // Differential privacy: equal weights; the coordinator clips
            // (central) or the node did and says whether it had to (distributed).
            (Some(plan), Some(p)) => match p.coordinator_clip(plan) {
                Some(c) => (Some(c), update_norm > c, 1.0),
                None => (None, update.metrics.unclipped != Some(true), 1.0),
            },
            _ => {
                let bound = self.strategy.as_ref().and_then(|s| s.clip_norm);
                (bound, bound.is_some_and(|b| update_norm > b), samples_weight)
            }
        };
        let scale = step * clip_scale(update_norm, bound);
        let mut out = Vec::new();
        if let Some(target) = r.aggregate.accept(body.source.clone(), scale) {
            r.folding.insert(name.clone());
            out.push(Output::Fold(Box::new(FoldJob {
                round: r.round,
                attempt: r.attempt,
                node: name.clone(),
                target: FoldTarget::Mean(target),
                source: body.source.clone(),
                weight,
                scale,
                direction: self.direction.clone(),
            })));
        }
        let accepted = self.record(Contribution::new(name, &update, update_norm, clipped, weight), now_ms);
        out.extend(self.maybe_close(now_ms));
        Ok((accepted, out))
    }

    /// An accepted update's fold finished. A fold that failed (its spooled
    /// payload could not be read back) leaves the sum in an unknown state:
    /// the round is retried.
    pub fn folded(&mut self, done: Folded, now_ms: u64) -> Vec<Output> {
        let Phase::Training(r) = &mut self.phase else {
            return Vec::new();
        };
        if r.round != done.round || r.attempt != done.attempt {
            return Vec::new();
        }
        r.folding.remove(&done.node);
        if let Some(c) = r.accepted.iter_mut().find(|c| c.node == done.node) {
            c.alignment = done.alignment;
        }
        if let Err(reason) = done.result {
            tracing::error!(round = done.round, node = %done.node, reason, "folding an update failed; retrying the round");
            let (round, attempt) = (r.round, r.attempt + 1);
            self.phase = Phase::Waiting;
            return self.start_attempt(round, attempt, now_ms);
        }
        self.maybe_close(now_ms)
    }

    /// The update of the node behind `session` for `round` was refused for
    /// its content (or its stream broke): when `round` is the round in
    /// progress, the round stops waiting for that node, and may now close.
    /// A refusal of an earlier round's stream changes nothing.
    pub fn refuse(&mut self, session: &str, round: u64, now_ms: u64) -> Vec<Output> {
        let Some(name) = self.node_of(session).map(str::to_owned) else {
            return Vec::new();
        };
        let Phase::Training(r) = &mut self.phase else {
            return Vec::new();
        };
        if r.round == round && r.selected.contains(&name) && !r.accepted.iter().any(|c| c.node == name) {
            r.refused.insert(name);
        }
        self.maybe_close(now_ms)
    }

    /// Time passed: forgets sessions that joined and never connected, and
    /// closes or retries a round whose deadline is over.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Output> {
        self.expire_joins(now_ms);
        let Phase::Training(r) = &self.phase else {
            return Vec::new();
        };
        if r.secure.is_some() {
            return self.advance_secure(now_ms);
        }
        let cutoff = r.half_ms.filter(|_| self.settings.straggler_factor > 0.0).map(|half| {
            let took = half.saturating_sub(r.started_ms);
            let wait = ((self.settings.straggler_factor - 1.0).max(0.0) * took as f64) as u64;
            half.saturating_add(wait.max(1000))
        });
        let stragglers_cut = cutoff.is_some_and(|c| now_ms >= c);
        if (now_ms < r.deadline_ms && !stragglers_cut) || !r.folding.is_empty() {
            return Vec::new();
        }
        if r.accepted.len() >= self.settings.min_nodes {
            if now_ms < r.deadline_ms {
                tracing::info!(
                    round = r.round,
                    accepted = r.accepted.len(),
                    selected = r.selected.len(),
                    straggler_factor = self.settings.straggler_factor,
                    "closing the round without its stragglers"
                );
            } else {
                tracing::info!(
                    round = r.round,
                    accepted = r.accepted.len(),
                    selected = r.selected.len(),
                    "round deadline reached; closing with the updates received"
                );
            }
            self.close(now_ms)
        } else {
            tracing::warn!(
                round = r.round,
                accepted = r.accepted.len(),
                min_nodes = self.settings.min_nodes,
                "round deadline reached with too few updates; retrying the round"
            );
            self.retry(now_ms)
        }
    }

    /// Forgets the nodes whose join is older than [`JOIN_EXPIRY_MS`] and
    /// whose session never opened its instruction stream (a node that
    /// connected once keeps its record). Amortized O(1) per join.
    fn expire_joins(&mut self, now_ms: u64) {
        while let Some((expires, _, _)) = self.pending_joins.front() {
            if *expires > now_ms {
                return;
            }
            let (_, name, session) = self.pending_joins.pop_front().expect("checked above");
            if self
                .nodes
                .get(&name)
                .is_some_and(|n| n.session == session && !n.connected_once)
            {
                self.nodes.remove(&name);
                tracing::debug!(node = %name, "joined session never connected; forgotten");
            }
        }
    }

    /// The round's aggregation finished: publish the new model for
    /// persisting, or retry the round when the aggregator could not be applied.
    pub fn aggregated(&mut self, done: Aggregated, now_ms: u64) -> Vec<Output> {
        let Phase::Aggregating { round, .. } = &self.phase else {
            return Vec::new();
        };
        if *round != done.round {
            return Vec::new();
        }
        let Phase::Aggregating { round, state } = std::mem::replace(&mut self.phase, Phase::Waiting) else {
            unreachable!("checked above");
        };
        self.strategy = Some(done.strategy);
        let privacy = done.privacy;
        for (node, reason) in &done.misbehaved {
            tracing::warn!(round, node = %node, reason, "secure aggregation: node misbehaved while unmasking");
        }
        let named: Vec<String> = done.misbehaved.into_iter().map(|(node, _)| node).collect();
        let global = match done.result {
            Ok(g) => g,
            // Under secure aggregation nobody's update can be looked at: the
            // nodes named while unmasking sit the retry out, and when a sum
            // fails its checks without naming anyone, one survivor in turn.
            Err(reason) if state.secure.is_some() => {
                let in_turn = named.is_empty().then(|| in_turn(&state)).flatten();
                let (left_out, because) = match &in_turn {
                    Some(node) => (node.clone(), "in turn (a secure sum names nobody)"),
                    None => (named.join(","), "named while unmasking"),
                };
                tracing::warn!(
                    round,
                    reason,
                    left_out = %left_out,
                    because,
                    "secure aggregation: the round's sum was refused; retrying the round"
                );
                if self.suspects.0 != round {
                    self.suspects = (round, BTreeSet::new());
                    self.in_turn = None;
                }
                self.suspects.1.extend(named);
                if in_turn.is_some() {
                    self.in_turn = in_turn;
                }
                return self.start_attempt(round, state.attempt + 1, now_ms);
            }
            Err(reason) if done.rejected => {
                let suspect = suspect(&state.accepted);
                tracing::warn!(
                    round,
                    reason,
                    left_out = %suspect.as_ref().map_or("-", |s| s.0.as_str()),
                    because = suspect.as_ref().map_or("-", |s| s.1),
                    "new global model rejected; retrying the round without one update"
                );
                if let Some((node, _)) = suspect {
                    if self.suspects.0 != round {
                        self.suspects = (round, BTreeSet::new());
                    }
                    self.suspects.1.insert(node);
                }
                return self.start_attempt(round, state.attempt + 1, now_ms);
            }
            Err(reason) => {
                tracing::warn!(round, reason, "aggregation failed; retrying the round");
                return self.start_attempt(round, state.attempt + 1, now_ms);
            }
        };
        self.suspects.1.clear();
        self.in_turn = None;
        self.direction = done.direction;
        if let Some(median) = median_norm(&state.accepted) {
            self.norm_reference = Some(median);
        }
        self.model_norm = done.model_norm;
        self.global = GlobalModel::Memory(global.clone());
        self.version = round;
        self.phase = Phase::Closing { round };
        let strategy = self.strategy.as_ref().expect("restored above");
        let strategy_state = Arc::new(strategy.state());
        vec![Output::Close(ClosedRound {
            round,
            version: self.version,
            global,
            contributions: state.accepted,
            selected: state.selected,
            started_ms: state.started_ms,
            closed_ms: state.closed_ms,
            control: strategy.control.clone().map(Arc::new),
            strategy_state,
            privacy,
            secure: state.secure,
        })]
    }

    /// The closed round is durable and evaluated: start the next one, or finish.
    pub fn persisted(&mut self, now_ms: u64) -> Vec<Output> {
        let Phase::Closing { round } = self.phase else {
            return Vec::new();
        };
        if round >= self.settings.total_rounds {
            self.phase = Phase::Finished;
            return vec![Output::Finished];
        }
        self.phase = Phase::Waiting;
        self.try_start(round + 1, 0, now_ms)
    }

    /// The run's differential privacy state (`None` when off, or while a
    /// round is being aggregated).
    pub fn privacy(&self) -> Option<&crate::privacy::Privacy> {
        self.strategy.as_ref().and_then(|s| s.privacy.as_ref())
    }

    /// Why the run finished before its last round (the privacy budget), if it did.
    pub fn stop_reason(&self) -> Option<&str> {
        self.stop_reason.as_deref()
    }

    /// Every node that ever joined, by name, for status reports.
    pub fn node_views(&self) -> Vec<NodeView> {
        let round = match &self.phase {
            Phase::Training(r) => Some(r),
            _ => None,
        };
        self.nodes
            .iter()
            .map(|(name, n)| {
                let delivered = round.is_some_and(|r| r.accepted.iter().any(|c| &c.node == name));
                let selected = round.is_some_and(|r| r.selected.contains(name));
                let state = match (n.connected, selected, delivered) {
                    (_, _, true) => "delivered",
                    (false, _, _) => "offline",
                    (true, true, false) => "training",
                    (true, false, false) => "idle",
                };
                NodeView {
                    name: name.clone(),
                    connected: n.connected,
                    num_samples: n.num_samples,
                    rounds_contributed: n.rounds_contributed,
                    state,
                    last_seen_ms: n.last_seen_ms,
                }
            })
            .collect()
    }

    /// Per-node counts of rounds contributed, by name.
    pub fn contributions_by_node(&self) -> BTreeMap<String, u64> {
        self.nodes
            .iter()
            .map(|(k, n)| (k.clone(), n.rounds_contributed))
            .collect()
    }

    fn try_start(&mut self, round: u64, attempt: u32, now_ms: u64) -> Vec<Output> {
        let cooldown = self.settings.failure_cooldown_rounds;
        let within = |at: Option<u64>, rounds: u64| cooldown > 0 && at.is_some_and(|f| f + rounds >= round);
        let (mut fresh, mut failed, mut cut): (Vec<String>, Vec<String>, Vec<String>) =
            (Vec::new(), Vec::new(), Vec::new());
        for (name, n) in self.nodes.iter().filter(|(_, n)| n.connected && n.num_samples > 0) {
            let backoff = 1u64 << n.cuts.saturating_sub(2).min(5);
            if within(n.last_cut, cooldown * backoff) {
                cut.push(name.clone());
            } else if within(n.last_failure, cooldown) {
                failed.push(name.clone());
            } else {
                fresh.push(name.clone());
            }
        }
        if fresh.len() + failed.len() + cut.len() < self.settings.min_available.max(self.settings.min_nodes) {
            self.phase = Phase::Waiting;
            return Vec::new();
        }
        // A node that stayed connected through a round without delivering
        // (slow, refused or holding its update back) sits its cool-down out,
        // as if it were away, while `min_nodes` others are available: picked
        // last, it would still be picked by every round that wants all the
        // nodes, and hold it up until the straggler cutoff. Nodes that
        // dropped out are picked last.
        let sitting_out = if fresh.len() + failed.len() >= self.settings.min_nodes {
            cut.len()
        } else {
            failed.append(&mut cut);
            0
        };
        let available = fresh.len() + failed.len();
        let wanted = ((self.settings.fraction * available as f64).ceil() as usize)
            .max(self.settings.min_nodes)
            .min(available);
        let privacy = match self.strategy.as_ref().and_then(|s| s.privacy.as_ref()) {
            Some(p) => {
                if let Some(why) = p.over_budget(wanted, available) {
                    tracing::warn!(round, reason = %why, "stopping the run");
                    self.stop_reason = Some(why);
                    self.phase = Phase::Finished;
                    return vec![Output::Finished];
                }
                match p.plan(wanted, available) {
                    Ok(plan) => Some(plan),
                    Err(why) => {
                        self.phase = Phase::Finished;
                        return vec![Output::Abort(format!("privacy: {why}"))];
                    }
                }
            }
            None => None,
        };
        // Nodes left out of a rejected model of this round ([`suspect`])
        // sit its next attempts out, as long as enough others are left.
        if self.suspects.0 == round {
            let out: BTreeSet<&String> = self.suspects.1.iter().chain(&self.in_turn).collect();
            let left = |v: &Vec<String>| v.iter().filter(|n| !out.contains(n)).count();
            if !out.is_empty() && (left(&fresh) + left(&failed)).min(wanted) >= self.settings.min_nodes {
                fresh.retain(|n| !out.contains(n));
                failed.retain(|n| !out.contains(n));
            }
        }
        let wanted = wanted.min(fresh.len() + failed.len());
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.settings.seed, round, u64::from(attempt)));
        fresh.shuffle(&mut rng);
        failed.shuffle(&mut rng);
        let deprioritised = failed.len();
        let selected: BTreeSet<String> = fresh.into_iter().chain(failed).take(wanted).collect();
        let Some(strategy) = &self.strategy else {
            return Vec::new();
        };
        let declared: BTreeMap<String, u64> = selected
            .iter()
            .map(|n| (n.clone(), self.nodes.get(n).map_or(0, |r| r.num_samples)))
            .collect();
        let weight_cap = strategy.weighting.cap(declared.values().copied());
        // Honest updates can outgrow the last round's median early in a
        // run (the model leaves its flat start), but an update many times
        // the model itself is no training step: the larger of the two is
        // the reference.
        let norm_bound = strategy.max_norm_factor.and_then(|factor| {
            let (reference, what) = match self.norm_reference {
                Some(median) if median > self.model_norm => (
                    median,
                    format!("{median:.4e}, the median norm of the last completed round's updates"),
                ),
                _ => (
                    self.model_norm,
                    format!("{:.4e}, the norm of the global model", self.model_norm),
                ),
            };
            (reference > 0.0).then(|| (factor * reference, format!("{factor} times {what}")))
        });
        let state = RoundState {
            round,
            attempt,
            selected: selected.clone(),
            accepted: Vec::new(),
            refused: BTreeSet::new(),
            left: BTreeSet::new(),
            // A secure round sums masked inputs instead (in its own state).
            aggregate: RoundAggregate::new(
                strategy.aggregator,
                if self.settings.secure.is_some() {
                    0
                } else {
                    self.global.len()
                },
                strategy.precision,
                strategy.control.is_some(),
            ),
            folding: BTreeSet::new(),
            started_ms: now_ms,
            deadline_ms: now_ms + self.settings.deadline_ms,
            secure: self.settings.secure.as_ref().map(|s| {
                // A masked input's weight is planned from the capped counts.
                let samples = declared
                    .iter()
                    .map(|(n, &d)| (n.clone(), weight_cap.map_or(d, |cap| d.min(cap.ceil() as u64))))
                    .collect();
                let equal = privacy.is_some() || strategy.weighting.equal;
                SecureRound::new(s, round, &samples, self.global.len(), equal, now_ms)
            }),
            weight_cap,
            half_ms: None,
            norm_bound,
            privacy,
        };
        tracing::info!(
            round,
            attempt,
            selected = state.selected.len(),
            connected = self.connected_nodes(),
            deprioritised,
            sitting_out,
            "round started"
        );
        let out = state
            .selected
            .iter()
            .map(|n| Output::Assign {
                node: n.clone(),
                task: self.task_for(&state, n),
            })
            .collect();
        self.phase = Phase::Training(Box::new(state));
        out
    }

    fn task_for(&self, r: &RoundState, node: &str) -> Task {
        let node_hash = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let total = self.settings.total_rounds;
        let every = self.settings.federated_every;
        let evaluate = every > 0 && (r.round.is_multiple_of(every) || r.round == total);
        let mut hyper =
            self.settings
                .train
                .hyperparameters(r.round, total, mix(self.settings.seed, r.round, node_hash), evaluate);
        if let (Some(plan), Some(p)) = (&r.privacy, self.strategy.as_ref().and_then(|s| s.privacy.as_ref())) {
            hyper.privacy = p.task(plan);
        }
        Task {
            round: r.round,
            version: self.version,
            hyper,
            deadline_ms: r.deadline_ms,
            secure: r.secure.as_ref().and_then(|s| s.task(node)),
        }
    }

    fn maybe_close(&mut self, now_ms: u64) -> Vec<Output> {
        let Phase::Training(r) = &self.phase else {
            return Vec::new();
        };
        if r.secure.is_some() {
            return self.advance_secure(now_ms);
        }
        if !r.folding.is_empty() {
            return Vec::new();
        }
        let pending = r
            .selected
            .iter()
            .filter(|n| !r.accepted.iter().any(|c| &c.node == *n) && !r.refused.contains(*n))
            .filter(|n| self.nodes.get(*n).is_some_and(|rec| rec.connected))
            .count();
        if pending > 0 {
            return Vec::new();
        }
        if r.accepted.len() >= self.settings.min_nodes {
            self.close(now_ms)
        } else {
            tracing::warn!(
                round = r.round,
                accepted = r.accepted.len(),
                min_nodes = self.settings.min_nodes,
                "every selected node submitted or left with too few updates; retrying the round"
            );
            self.retry(now_ms)
        }
    }

    fn retry(&mut self, now_ms: u64) -> Vec<Output> {
        let Phase::Training(r) = &self.phase else {
            return Vec::new();
        };
        let (round, attempt) = (r.round, r.attempt + 1);
        self.mark_failures();
        self.phase = Phase::Waiting;
        self.start_attempt(round, attempt, now_ms)
    }

    /// Starts attempt `attempt` of `round`, or gives the run up when the
    /// round has failed `max_attempts` times in a row.
    fn start_attempt(&mut self, round: u64, attempt: u32, now_ms: u64) -> Vec<Output> {
        let max = self.settings.max_attempts;
        if max > 0 && attempt >= max {
            self.phase = Phase::Finished;
            return vec![Output::Abort(format!(
                "round {round} failed {attempt} times in a row; stopping the run (the last completed round, {}, is saved)",
                self.version
            ))];
        }
        self.try_start(round, attempt, now_ms)
    }

    /// Records the selected nodes that have not delivered in the round in progress.
    fn mark_failures(&mut self) {
        let Phase::Training(r) = &self.phase else {
            return;
        };
        for name in &r.selected {
            if !r.accepted.iter().any(|c| &c.node == name)
                && let Some(n) = self.nodes.get_mut(name)
            {
                n.last_failure = Some(r.round);
                if n.connected && !r.left.contains(name) && n.last_cut != Some(r.round) {
                    n.last_cut = Some(r.round);
                    n.cuts = n.cuts.saturating_add(1);
                }
            }
        }
    }

    fn close(&mut self, now_ms: u64) -> Vec<Output> {
        self.mark_failures();
        let Phase::Training(r) = std::mem::replace(&mut self.phase, Phase::Waiting) else {
            return Vec::new();
        };
        let Some(strategy) = self.strategy.take() else {
            return Vec::new();
        };
        let unclipped = r.accepted.iter().filter(|c| !c.clipped).count();
        // The mean's norm is bounded as one update's would be, except under
        // differential privacy (the nodes' noise is in the mean; clipping
        // bounds each update there).
        let mean_bound = r.norm_bound.clone().filter(|_| r.privacy.is_none());
        let secure = r.secure.map(|s| {
            let record = s.record(r.selected.len(), now_ms);
            (record, s.into_job(self.update_step(r.round), mean_bound))
        });
        let (secure_record, unmask) = secure.map_or((None, None), |(rec, job)| (Some(rec), Some(job)));
        let job = AggregationJob {
            round: r.round,
            global: self.global.clone(),
            aggregate: r.aggregate,
            total_nodes: self.nodes.len(),
            strategy,
            privacy: r.privacy.map(|plan| (plan, unclipped)),
            unmask,
            track_direction: self.settings.track_direction,
        };
        self.phase = Phase::Aggregating {
            round: r.round,
            state: ClosingState {
                selected: r.selected.len(),
                accepted: r.accepted,
                started_ms: r.started_ms,
                closed_ms: now_ms,
                attempt: r.attempt,
                secure: secure_record,
            },
        };
        vec![Output::Aggregate(Box::new(job))]
    }
}

/// Secure aggregation's steps (see [`crate::secure`]).
impl RoundMachine {
    /// The factor that turns what a node sends into the model change it
    /// asks for: 1 for a delta, −η for a FedSGD gradient.
    fn update_step(&self, round: u64) -> f64 {
        match self.settings.train.algorithm {
            Algorithm::FedSgd => -self.settings.train.learning_rate_at(round, self.settings.total_rounds),
            _ => 1.0,
        }
    }

    /// The secure round in progress: its step and Shamir threshold.
    pub fn secure_round(&self) -> Option<(Step, usize)> {
        match &self.phase {
            Phase::Training(r) => r.secure.as_ref().map(|s| (s.step, s.threshold)),
            _ => None,
        }
    }

    /// The run's secure aggregation settings, when it uses it.
    pub fn secure_settings(&self) -> Option<&SecureSettings> {
        self.settings.secure.as_ref()
    }

    /// A secure-aggregation message (`bytes` on the wire) from the node
    /// behind `session` for `round`.
    pub fn secure_message(
        &mut self,
        session: &str,
        round: u64,
        input: SecAggInput,
        bytes: u64,
        now_ms: u64,
    ) -> Result<Vec<Output>, Rejection> {
        let name = self.node_of(session).ok_or(Rejection::UnknownSession)?.to_owned();
        let current = self.current_round();
        let Phase::Training(r) = &mut self.phase else {
            return Err(Rejection::WrongRound { got: round, current });
        };
        if r.round != round {
            return Err(Rejection::WrongRound {
                got: round,
                current: Some(r.round),
            });
        }
        if !r.selected.contains(&name) {
            return Err(Rejection::NotSelected { node: name, round });
        }
        let Some(s) = &mut r.secure else {
            return Err(Rejection::SecAgg("this run does not use secure aggregation".into()));
        };
        s.receive(&name, input, bytes).map_err(|e| Rejection::SecAgg(e.0))?;
        if let Some(rec) = self.nodes.get_mut(&name) {
            rec.last_seen_ms = now_ms;
        }
        Ok(self.advance_secure(now_ms))
    }

    /// A masked input: checked for what can be checked (its size, its
    /// sender's part in the protocol), then added to the masked sum.
    fn submit_masked(&mut self, name: String, update: Update, now_ms: u64) -> Result<(usize, Vec<Output>), Rejection> {
        self.check_samples(&name, update.num_samples)?;
        let numel = self.global.len();
        let expected_kind = match self.settings.train.algorithm {
            Algorithm::FedSgd => UpdateKind::Gradient,
            _ => UpdateKind::Delta,
        };
        let Phase::Training(r) = &mut self.phase else {
            unreachable!("admit checked the phase");
        };
        let s = r.secure.as_ref().expect("checked by the caller");
        if s.step != Step::Masking || !s.shared.contains(&name) {
            return Err(Rejection::SecAgg(format!(
                "node {name} did not share its keys in round {}, so its masked input could never be unmasked",
                r.round
            )));
        }
        let body = &update.body;
        if body.source.len() != numel + 1 || body.control {
            return Err(Rejection::WrongSize {
                got: body.source.len().saturating_sub(1),
                expected: numel,
            });
        }
        if update.kind != expected_kind {
            return Err(Rejection::WrongKind {
                expected: describe(expected_kind, false),
                got: describe(update.kind, false),
            });
        }
        r.folding.insert(name.clone());
        let out = vec![Output::Fold(Box::new(FoldJob {
            round: r.round,
            attempt: r.attempt,
            node: name.clone(),
            target: FoldTarget::Masked {
                server: s.server.clone(),
                id: s.ids[&name],
            },
            source: body.source.clone(),
            weight: 1.0,
            scale: 1.0,
            direction: None,
        }))];
        // Masked: neither the norm nor clipping is visible.
        let accepted = self.record(Contribution::new(name, &update, f64::NAN, false, f64::NAN), now_ms);
        Ok((accepted, out))
    }

    /// An update's sample count: at least one, and at most what its node
    /// declared when it joined (what its weight was planned from).
    fn check_samples(&self, name: &str, claimed: u64) -> Result<(), Rejection> {
        if claimed == 0 {
            return Err(Rejection::NoSamples);
        }
        let declared = self.nodes.get(name).map_or(0, |n| n.num_samples);
        if claimed > declared {
            return Err(Rejection::TooManySamples { claimed, declared });
        }
        Ok(())
    }

    /// Records an accepted update in the round in progress, with its
    /// arrival after the round's start, and the node's activity; returns
    /// the number of updates the round has accepted.
    fn record(&mut self, mut c: Contribution, now_ms: u64) -> usize {
        let Phase::Training(r) = &mut self.phase else {
            unreachable!("only a round in progress accepts updates");
        };
        c.arrived_seconds = now_ms.saturating_sub(r.started_ms) as f64 / 1000.0;
        let rec = self.nodes.get_mut(&c.node).expect("known node");
        rec.rounds_contributed += 1;
        rec.cuts = 0;
        rec.last_seen_ms = now_ms;
        r.accepted.push(c);
        let half = r.selected.len().div_ceil(2).max(self.settings.min_nodes);
        if r.half_ms.is_none() && r.accepted.len() >= half {
            r.half_ms = Some(now_ms);
        }
        r.accepted.len()
    }

    /// Moves a secure round on as far as its nodes' answers (or the step
    /// deadlines) allow.
    fn advance_secure(&mut self, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        let settings = self.settings.secure.clone().expect("a secure round has settings");
        let timeout = settings.step_timeout_ms;
        loop {
            let Phase::Training(r) = &mut self.phase else {
                return out;
            };
            let Some(s) = &mut r.secure else {
                return out;
            };
            let nodes = &self.nodes;
            let live = |n: &String| !r.refused.contains(n) && nodes.get(n).is_some_and(|rec| rec.connected);
            let expired = now_ms >= s.step_deadline_ms;
            let needed = s.threshold.max(self.settings.min_nodes);
            let (round, attempt) = (r.round, r.attempt);
            let failed = match s.step {
                Step::Advertising => {
                    let pending = r
                        .selected
                        .iter()
                        .filter(|n| !s.advertised.contains(*n) && live(n))
                        .count();
                    if pending > 0 && !expired {
                        return out;
                    }
                    let seed = mix(self.settings.seed, round, u64::from(attempt) ^ 0x5ec);
                    match s.roster(round, seed, settings.neighbours, now_ms, timeout) {
                        Ok(msgs) => {
                            tracing::debug!(
                                round,
                                advertised = s.advertised.len(),
                                "secure aggregation: roster sent"
                            );
                            out.extend(msgs.into_iter().map(|(node, message)| Output::SecAgg { node, message }));
                            None
                        }
                        Err(e) => Some(e.0),
                    }
                }
                Step::Sharing => {
                    let pending = s
                        .advertised
                        .iter()
                        .filter(|n| !s.shared.contains(*n) && live(n))
                        .count();
                    if pending > 0 && !expired {
                        return out;
                    }
                    if s.shared.len() < needed {
                        Some(format!(
                            "{} nodes shared keys; the round needs {needed}",
                            s.shared.len()
                        ))
                    } else {
                        let msgs = s.forward_shares(round, r.deadline_ms, now_ms);
                        out.extend(msgs.into_iter().map(|(node, message)| Output::SecAgg { node, message }));
                        None
                    }
                }
                Step::Masking => {
                    if !r.folding.is_empty() {
                        return out;
                    }
                    let delivered: BTreeSet<String> = r.accepted.iter().map(|c| c.node.clone()).collect();
                    let pending = s.shared.iter().filter(|n| !delivered.contains(*n) && live(n)).count();
                    if pending > 0 && now_ms < r.deadline_ms {
                        return out;
                    }
                    if delivered.len() < needed {
                        Some(format!(
                            "{} masked inputs arrived; the round needs {needed}",
                            delivered.len()
                        ))
                    } else {
                        tracing::info!(
                            round,
                            survivors = delivered.len(),
                            dropped = s.shared.len() - delivered.len(),
                            "secure aggregation: asking the survivors to unmask"
                        );
                        let msgs = s.unmask(round, delivered, now_ms, timeout);
                        out.extend(msgs.into_iter().map(|(node, message)| Output::SecAgg { node, message }));
                        None
                    }
                }
                Step::Unmasking => {
                    let pending = s
                        .survivors
                        .iter()
                        .filter(|n| !s.reveals.contains_key(*n) && nodes.get(*n).is_some_and(|rec| rec.connected))
                        .count();
                    if pending > 0 && !expired {
                        return out;
                    }
                    out.extend(self.close(now_ms));
                    return out;
                }
            };
            if let Some(reason) = failed {
                tracing::warn!(
                    round,
                    attempt,
                    reason,
                    "secure aggregation: too few nodes; retrying the round"
                );
                out.extend(self.retry(now_ms));
                return out;
            }
        }
    }
}

/// The survivor of a secure round to leave out of its next attempt: each
/// attempt the next one by name, so that within as many attempts as there
/// are survivors, one leaves out any single node whose input spoils the sum.
fn in_turn(state: &ClosingState) -> Option<String> {
    let mut names: Vec<&String> = state.accepted.iter().map(|c| &c.node).collect();
    names.sort_unstable();
    let n = names.len();
    (n > 0).then(|| names[state.attempt as usize % n].clone())
}

/// The update to leave out of a rejected round's retry. One that weighed
/// far more than the rest (weight × norm above twice the median) moved the
/// model most: it goes first (colluding attackers that dominate a step
/// also make themselves the ones aligned with it). Otherwise the one most
/// against the last committed step (lowest cosine), and where that was not
/// measured, the one that weighed most.
fn suspect(accepted: &[Contribution]) -> Option<(String, &'static str)> {
    let pull = |c: &Contribution| c.weight * c.update_norm;
    let heaviest = accepted
        .iter()
        .filter(|c| pull(c).is_finite())
        .max_by(|a, b| pull(a).total_cmp(&pull(b)));
    let median = positive_median(accepted.iter().map(pull));
    if let (Some(c), Some(median)) = (heaviest, median)
        && pull(c) > 2.0 * median
    {
        return Some((c.node.clone(), "weighed over twice the median"));
    }
    let against = accepted
        .iter()
        .filter_map(|c| c.alignment.filter(|a| a.is_finite()).map(|a| (a, c)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| (c.node.clone(), "most against the last step"));
    against.or_else(|| heaviest.map(|c| (c.node.clone(), "weighed most")))
}

/// Cosine of an update's main section (times `scale`, the sign of a FedSGD
/// step) with `direction`; `None` when either is zero or unreadable.
fn cosine(source: &dyn UpdateSource, direction: &[f32], scale: f64) -> Option<f64> {
    let (mut dot, mut uu) = (0f64, 0f64);
    source
        .visit(&mut |offset, values| {
            for (i, &v) in values.iter().enumerate() {
                if let Some(&d) = direction.get(offset + i) {
                    dot += f64::from(v) * f64::from(d);
                    uu += f64::from(v) * f64::from(v);
                }
            }
        })
        .ok()?;
    let dd: f64 = direction.iter().map(|&d| f64::from(d) * f64::from(d)).sum();
    (uu > 0.0 && dd > 0.0).then(|| scale.signum() * dot / (uu.sqrt() * dd.sqrt()))
}

/// The median L2 norm of accepted updates whose norm was seen (masked
/// inputs hide theirs), if any.
fn median_norm(accepted: &[Contribution]) -> Option<f64> {
    positive_median(accepted.iter().map(|c| c.update_norm))
}

/// The median of the finite, positive `values`, if there are any.
pub fn positive_median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut norms: Vec<f64> = values.filter(|n| n.is_finite() && *n > 0.0).collect();
    if norms.is_empty() {
        return None;
    }
    norms.sort_by(f64::total_cmp);
    let mid = norms.len() / 2;
    Some(if norms.len() % 2 == 1 {
        norms[mid]
    } else {
        (norms[mid - 1] + norms[mid]) / 2.0
    })
}

fn describe(kind: UpdateKind, control: bool) -> String {
    let main = match kind {
        UpdateKind::Delta => "a model delta",
        UpdateKind::Gradient => "a gradient",
    };
    if control {
        format!("{main} with a control-variate delta")
    } else {
        main.to_string()
    }
}

/// SplitMix64 over three words: a cheap, well-spread seed derivation.
fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a ^ b.rotate_left(21) ^ c.rotate_left(42);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::strategy::{Aggregator, ServerOpt, ServerOptimizer};

    fn settings(min_nodes: usize, fraction: f64) -> RoundSettings {
        RoundSettings {
            total_rounds: 2,
            fraction,
            min_nodes,
            min_available: min_nodes,
            deadline_ms: 1000,
            seed: 1,
            max_attempts: 0,
            failure_cooldown_rounds: 3,
            straggler_factor: 0.0,
            track_direction: false,
            federated_every: 1,
            train: TrainConfig::default(),
            secure: None,
        }
    }

    fn mean(numel: usize) -> Strategy {
        Strategy::new(
            Aggregator::Mean,
            ServerOptimizer::new(ServerOpt::Sgd, 1.0, numel),
            None,
            false,
            numel,
        )
    }

    fn machine(settings: RoundSettings, initial: Vec<f32>) -> RoundMachine {
        let n = initial.len();
        RoundMachine::new(settings, initial, mean(n))
    }

    fn update(round: u64, version: u64, delta: Vec<f32>, n: u64) -> Update {
        Update {
            round,
            base_version: version,
            num_samples: n,
            kind: UpdateKind::Delta,
            body: Body::dense(delta, None),
            metrics: TrainMetrics::default(),
            federated_eval: None,
            wire_bytes: 0,
            payload_bytes: 0,
            upload_seconds: 0.0,
        }
    }

    /// Submits `u` and runs the fold it causes as the driver would.
    fn submit(m: &mut RoundMachine, session: &str, u: Update, now: u64) -> Result<(usize, Vec<Output>), Rejection> {
        let (n, out) = m.submit(session, u, now)?;
        let mut rest = Vec::new();
        for o in out {
            match o {
                Output::Fold(job) => rest.extend(m.folded(job.run(), now)),
                other => rest.push(other),
            }
        }
        Ok((n, rest))
    }

    /// Runs the aggregation job in `out` and returns the round it closes.
    fn closed_round(m: &mut RoundMachine, out: Vec<Output>, now: u64) -> ClosedRound {
        match settle(m, out, now).as_slice() {
            [Output::Close(closed)] => closed.clone(),
            other => panic!("expected a close, got {other:?}"),
        }
    }

    /// Runs any aggregation job in `out` as the driver would.
    fn settle(m: &mut RoundMachine, out: Vec<Output>, now: u64) -> Vec<Output> {
        let mut result = Vec::new();
        for o in out {
            match o {
                Output::Aggregate(job) => result.extend(m.aggregated(job.run(), now)),
                other => result.push(other),
            }
        }
        result
    }

    fn assigned(out: &[Output]) -> Vec<String> {
        let mut v: Vec<String> = out
            .iter()
            .filter_map(|o| match o {
                Output::Assign { node, .. } => Some(node.clone()),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    /// Joins and connects nodes `a`, `b`, `c`; returns the outputs of the last connect.
    fn fleet(m: &mut RoundMachine) -> Vec<Output> {
        let mut last = Vec::new();
        for n in ["a", "b", "c"] {
            m.join(n, &format!("s-{n}"), 1000, None, 0).unwrap();
            last = m.connect(&format!("s-{n}"), 0).unwrap();
        }
        last
    }

    #[test]
    fn a_round_starts_when_enough_nodes_connect_and_closes_at_quorum() {
        let mut m = machine(settings(3, 1.0), vec![0.0, 0.0]);
        let out = fleet(&mut m);
        assert_eq!(assigned(&out), ["a", "b", "c"]);
        assert_eq!(m.current_round(), Some(1));

        let (n, out) = submit(&mut m, "s-a", update(1, 0, vec![1.0, 2.0], 10), 5).unwrap();
        assert_eq!((n, out.len()), (1, 0));
        submit(&mut m, "s-b", update(1, 0, vec![3.0, 2.0], 30), 6).unwrap();
        let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.0, 2.0], 60), 7).unwrap();
        assert!(matches!(out.as_slice(), [Output::Aggregate(_)]));
        assert_eq!(m.phase(), PhaseKind::Aggregating);
        let closed = closed_round(&mut m, out, 7);
        // (1*10 + 3*30 + 0*60) / 100 = 1.0; 2.0 everywhere.
        assert_eq!(*closed.global, vec![1.0, 2.0]);
        assert_eq!((closed.round, closed.version, closed.contributions.len()), (1, 1, 3));
        assert_eq!(m.phase(), PhaseKind::Closing);

        let out = m.persisted(8);
        assert_eq!(assigned(&out), ["a", "b", "c"]);
        assert_eq!(m.current_round(), Some(2));
    }

    #[test]
    fn node_views_follow_each_node_through_a_round() {
        let mut m = machine(settings(3, 1.0), vec![0.0]);
        fleet(&mut m);
        let states = |m: &RoundMachine| -> Vec<(String, &'static str)> {
            m.node_views().into_iter().map(|v| (v.name, v.state)).collect()
        };
        assert_eq!(
            states(&m),
            [
                ("a".into(), "training"),
                ("b".into(), "training"),
                ("c".into(), "training")
            ]
        );
        submit(&mut m, "s-a", update(1, 0, vec![1.0], 10), 42).unwrap();
        m.disconnect("s-c", 43);
        assert_eq!(
            states(&m),
            [
                ("a".into(), "delivered"),
                ("b".into(), "training"),
                ("c".into(), "offline")
            ]
        );
        let a = &m.node_views()[0];
        assert_eq!(
            (a.rounds_contributed, a.num_samples, a.last_seen_ms, a.connected),
            (1, 1000, 42, true)
        );
        assert_eq!(m.node_views()[2].last_seen_ms, 43);
    }

    #[test]
    fn the_last_persisted_round_finishes_the_run() {
        let mut m = machine(
            RoundSettings {
                min_available: 3,
                ..settings(1, 1.0)
            },
            vec![0.0],
        );
        fleet(&mut m);
        for round in 1..=2 {
            for n in ["a", "b", "c"] {
                let (_, out) = submit(&mut m, &format!("s-{n}"), update(round, round - 1, vec![1.0], 1), 0).unwrap();
                settle(&mut m, out, 0);
            }
            let out = m.persisted(0);
            if round == 2 {
                assert!(matches!(out.as_slice(), [Output::Finished]));
            }
        }
        assert_eq!(**m.global().in_memory().unwrap(), vec![2.0]);
        assert_eq!(m.phase(), PhaseKind::Finished);
    }

    #[test]
    fn bad_updates_are_refused_and_change_nothing() {
        let mut m = machine(settings(3, 1.0), vec![0.0, 0.0]);
        fleet(&mut m);
        let refused = |m: &mut RoundMachine, s: &str, u: Update| submit(m, s, u, 0).unwrap_err();
        assert_eq!(
            refused(&mut m, "nobody", update(1, 0, vec![0.0; 2], 1)),
            Rejection::UnknownSession
        );
        let e = refused(&mut m, "s-a", update(0, 0, vec![0.0; 2], 1));
        assert_eq!(e.to_string(), "late update for round 0; round 1 is in progress");
        let e = refused(&mut m, "s-a", update(1, 3, vec![0.0; 2], 1));
        assert_eq!(
            e.to_string(),
            "update computed against model version 3; the current version is 0"
        );
        let e = refused(&mut m, "s-a", update(1, 0, vec![0.0; 3], 1));
        assert_eq!(e.to_string(), "update has 3 values; the model has 2");
        let e = refused(&mut m, "s-a", update(1, 0, vec![0.0, f32::NAN], 1));
        assert_eq!(e.to_string(), "update value 1 is not finite");
        let e = refused(&mut m, "s-a", update(1, 0, vec![0.0; 2], 0));
        assert_eq!(e.to_string(), "update claims zero training samples");
        submit(&mut m, "s-a", update(1, 0, vec![1.0; 2], 1), 0).unwrap();
        let e = refused(&mut m, "s-a", update(1, 0, vec![1.0; 2], 1));
        assert_eq!(e.to_string(), "node a already contributed to round 1");
        submit(&mut m, "s-b", update(1, 0, vec![1.0; 2], 1), 0).unwrap();
        let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![1.0; 2], 1), 0).unwrap();
        let closed = closed_round(&mut m, out, 0);
        assert_eq!(*closed.global, vec![1.0, 1.0]);
    }

    #[test]
    fn sampling_takes_a_fraction_with_a_minimum_and_is_reproducible() {
        let run = || {
            let mut m = machine(
                RoundSettings {
                    min_available: 6,
                    ..settings(2, 0.3)
                },
                vec![0.0],
            );
            let mut out = Vec::new();
            for i in 0..6 {
                let n = format!("n{i}");
                m.join(&n, &n, 5, None, 0).unwrap();
                out = m.connect(&n, 0).unwrap();
            }
            assigned(&out)
        };
        let first = run();
        assert_eq!(first.len(), 2); // ceil(0.3 * 6) = 2
        assert_eq!(first, run());
    }

    #[test]
    fn deadline_closes_with_the_minimum_or_retries() {
        let mut m = machine(
            RoundSettings {
                min_available: 3,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        fleet(&mut m);
        submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 10).unwrap();
        // One update, minimum two: the deadline retries the round.
        let out = m.tick(1000);
        assert_eq!(assigned(&out).len(), 3);
        assert_eq!(m.current_round(), Some(1));
        // The retry's deadline is measured from the retry.
        assert!(m.tick(1500).is_empty());
        submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 1600).unwrap();
        submit(&mut m, "s-b", update(1, 0, vec![3.0], 1), 1700).unwrap();
        let out = m.tick(2000);
        let closed = closed_round(&mut m, out, 2000);
        assert_eq!(*closed.global, vec![2.0]);
        assert_eq!(closed.contributions.len(), 2);
    }

    #[test]
    fn a_node_that_leaves_costs_only_its_contribution() {
        let mut m = machine(
            RoundSettings {
                min_available: 3,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        fleet(&mut m);
        submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 0).unwrap();
        submit(&mut m, "s-b", update(1, 0, vec![3.0], 1), 0).unwrap();
        let out = m.disconnect("s-c", 5);
        let closed = closed_round(&mut m, out, 5);
        assert_eq!(*closed.global, vec![2.0]);
    }

    #[test]
    fn a_rejoining_node_is_handed_the_current_task() {
        let mut m = machine(settings(3, 1.0), vec![0.0]);
        fleet(&mut m);
        assert!(m.disconnect("s-b", 1).is_empty() || m.phase() == PhaseKind::Training);
        m.join("b", "s-b2", 10, None, 0).unwrap();
        assert_eq!(
            submit(&mut m, "s-b", update(1, 0, vec![1.0], 1), 2).unwrap_err(),
            Rejection::UnknownSession
        );
        let out = m.connect("s-b2", 2).unwrap();
        assert_eq!(assigned(&out), ["b"]);
    }

    #[test]
    fn a_connected_name_cannot_be_taken_by_another_session() {
        let mut m = machine(settings(3, 1.0), vec![0.0]);
        fleet(&mut m);
        let e = m.join("a", "s-intruder", 10, None, 0).unwrap_err();
        assert_eq!(e, Rejection::NameInUse { node: "a".into() });
        assert!(
            e.to_string()
                .starts_with("node a is already connected in another session")
        );
        assert_eq!(m.join("a", "s-x", 10, Some("s-wrong"), 0).unwrap_err(), e);
        // The node itself, presenting its session, rejoins at once.
        m.join("a", "s-a2", 10, Some("s-a"), 0).unwrap();
        assert_eq!(m.session_of("a"), Some("s-a2"));
        // Once the old connection is gone, any process may take the name.
        m.disconnect("s-b", 1);
        m.join("b", "s-b2", 10, None, 0).unwrap();
    }

    fn four(m: &mut RoundMachine) -> Vec<Output> {
        let mut last = Vec::new();
        for n in ["w", "x", "y", "z"] {
            m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
            last = m.connect(&format!("s-{n}"), 0).unwrap();
        }
        last
    }

    #[test]
    fn a_node_that_failed_recently_is_picked_last() {
        for seed in 0..20 {
            let mut m = machine(
                RoundSettings {
                    seed,
                    min_available: 4,
                    total_rounds: 5,
                    ..settings(1, 0.5)
                },
                vec![0.0],
            );
            let picked = assigned(&four(&mut m));
            assert_eq!(picked.len(), 2);
            // The first delivers, the second stays silent past the deadline.
            let (good, bad) = (&picked[0], &picked[1]);
            submit(&mut m, &format!("s-{good}"), update(1, 0, vec![1.0], 1), 10).unwrap();
            let out = m.tick(1000);
            settle(&mut m, out, 1000);
            let next = assigned(&m.persisted(1001));
            assert_eq!(next.len(), 2);
            assert!(
                !next.contains(bad),
                "seed {seed}: {bad} failed in round 1 yet was picked: {next:?}"
            );
        }
    }

    #[test]
    fn fedsgd_gradients_become_steps_of_the_rounds_learning_rate() {
        let mut s = settings(3, 1.0);
        s.train.algorithm = Algorithm::FedSgd;
        s.train.learning_rate = 0.1;
        let mut m = machine(s, vec![1.0, 1.0]);
        let out = fleet(&mut m);
        let Output::Assign { task, .. } = &out[0] else { panic!() };
        assert_eq!(task.hyper.algorithm, Algorithm::FedSgd);
        let e = submit(&mut m, "s-a", update(1, 0, vec![1.0, 1.0], 1), 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this run's algorithm expects a gradient; the update carries a model delta"
        );
        let grad = |g: Vec<f32>| Update {
            kind: UpdateKind::Gradient,
            ..update(1, 0, g, 1)
        };
        submit(&mut m, "s-a", grad(vec![1.0, -2.0]), 0).unwrap();
        submit(&mut m, "s-b", grad(vec![1.0, -2.0]), 0).unwrap();
        let (_, out) = submit(&mut m, "s-c", grad(vec![1.0, -2.0]), 0).unwrap();
        let closed = closed_round(&mut m, out, 0);
        assert!((closed.global[0] - 0.9).abs() < 1e-6 && (closed.global[1] - 1.2).abs() < 1e-6);
    }

    #[test]
    fn scaffold_updates_carry_control_deltas_that_move_the_server_control() {
        let mut s = settings(2, 1.0);
        s.train.algorithm = Algorithm::Scaffold;
        s.min_available = 3;
        let strategy = Strategy::new(
            Aggregator::Mean,
            ServerOptimizer::new(ServerOpt::Sgd, 1.0, 2),
            None,
            true,
            2,
        );
        let mut m = RoundMachine::new(s, vec![0.0, 0.0], strategy);
        fleet(&mut m);
        let e = submit(&mut m, "s-a", update(1, 0, vec![1.0, 1.0], 1), 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this run's algorithm expects a model delta with a control-variate delta; the update carries a model delta"
        );
        let with = |c: Vec<f32>| Update {
            body: Body::dense(vec![1.0, 1.0], Some(c)),
            ..update(1, 0, vec![1.0, 1.0], 1)
        };
        let e = submit(&mut m, "s-a", with(vec![1.0]), 0).unwrap_err();
        assert_eq!(e.to_string(), "update has 1 values; the model has 2");
        submit(&mut m, "s-a", with(vec![3.0, 0.0]), 0).unwrap();
        submit(&mut m, "s-b", with(vec![3.0, 6.0]), 0).unwrap();
        // Node c leaves: two of three nodes took part, c += (2/3)·mean = sum/3.
        let out = m.disconnect("s-c", 1);
        let closed = closed_round(&mut m, out, 1);
        assert_eq!(closed.control.as_deref().map(Vec::as_slice), Some(&[2.0f32, 2.0][..]));
        assert_eq!(m.control(), Some(&[2.0f32, 2.0][..]));
        assert!(closed.strategy_state.0.contains_key("scaffold.c"));
    }

    #[test]
    fn updates_above_the_norm_bound_are_scaled_down() {
        let strategy = Strategy::new(
            Aggregator::Mean,
            ServerOptimizer::new(ServerOpt::Sgd, 1.0, 2),
            Some(1.0),
            false,
            2,
        );
        let mut m = RoundMachine::new(settings(3, 1.0), vec![0.0, 0.0], strategy);
        fleet(&mut m);
        submit(&mut m, "s-a", update(1, 0, vec![30.0, 40.0], 1), 0).unwrap();
        submit(&mut m, "s-b", update(1, 0, vec![0.3, 0.4], 1), 0).unwrap();
        let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.3, 0.4], 1), 0).unwrap();
        let closed = closed_round(&mut m, out, 0);
        // mean of [0.6, 0.8], [0.3, 0.4], [0.3, 0.4]
        assert!((closed.global[0] - 0.4).abs() < 1e-6 && (closed.global[1] - 1.6 / 3.0).abs() < 1e-6);
        let a = &closed.contributions[0];
        assert!(a.clipped && (a.update_norm - 50.0).abs() < 1e-9);
        assert!(!closed.contributions[1].clipped);
    }

    fn private(noise: crate::config::NoiseMode, budget: f64) -> Strategy {
        let mut s = mean(2);
        s.privacy = crate::privacy::Privacy::from_config(&crate::config::PrivacyConfig {
            noise,
            noise_multiplier: 1e-3,
            clip_norm: 1.0,
            epsilon_budget: budget,
            ..Default::default()
        });
        s
    }

    #[test]
    fn central_privacy_clips_weighs_equally_and_accounts_each_round() {
        let mut m = RoundMachine::new(
            settings(3, 1.0),
            vec![0.0, 0.0],
            private(crate::config::NoiseMode::Central, 0.0),
        );
        let out = fleet(&mut m);
        // Central noise: nodes send their updates as they are.
        for o in &out {
            if let Output::Assign { task, .. } = o {
                assert_eq!(task.hyper.privacy, None);
            }
        }
        // Sample counts do not weigh; the coordinator clips to 1.
        submit(&mut m, "s-a", update(1, 0, vec![30.0, 40.0], 1000), 0).unwrap();
        submit(&mut m, "s-b", update(1, 0, vec![0.3, 0.4], 1), 0).unwrap();
        let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.3, 0.4], 1), 0).unwrap();
        let closed = closed_round(&mut m, out, 0);
        // mean of [0.6, 0.8], [0.3, 0.4], [0.3, 0.4], plus noise of 1e-3/3
        assert!((closed.global[0] - 0.4).abs() < 3e-3 && (closed.global[1] - 1.6 / 3.0).abs() < 3e-3);
        let p = closed.privacy.expect("the round's privacy record");
        assert_eq!((p.updates, p.unclipped, p.sampling_rate, p.clip_norm), (3, 2, 1.0, 1.0));
        assert!(p.epsilon > 0.0 && p.epsilon.is_finite());
        assert!(closed.contributions[0].clipped);
    }

    #[test]
    fn distributed_privacy_tells_nodes_their_share_and_the_budget_ends_the_run() {
        let mut m = RoundMachine::new(
            settings(3, 1.0),
            vec![0.0, 0.0],
            private(crate::config::NoiseMode::Distributed, 1e9),
        );
        let out = fleet(&mut m);
        let tasks: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Assign { task, .. } => task.hyper.privacy,
                _ => None,
            })
            .collect();
        assert_eq!(tasks.len(), 3);
        assert!((tasks[0].noise_stddev - 1e-3 / 3f64.sqrt()).abs() < 1e-15 && tasks[0].clip_norm == 1.0);
        // The coordinator leaves distributed updates alone (nodes clipped them) and counts
        // the ones their nodes say needed no clipping.
        let mut fits = update(1, 0, vec![3.0, 4.0], 1);
        fits.metrics.unclipped = Some(true);
        submit(&mut m, "s-a", fits, 0).unwrap();
        submit(&mut m, "s-b", update(1, 0, vec![0.0, 0.0], 1), 0).unwrap();
        let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.0, 0.0], 1), 0).unwrap();
        let closed = closed_round(&mut m, out, 0);
        assert!((closed.global[0] - 1.0).abs() < 1e-6 && (closed.global[1] - 4.0 / 3.0).abs() < 1e-6);
        assert_eq!(closed.privacy.as_ref().map(|p| p.unclipped), Some(1));
        // A budget the next round would pass finishes the run after round 1.
        let mut m = RoundMachine::new(
            settings(3, 1.0),
            vec![0.0, 0.0],
            private(crate::config::NoiseMode::Central, 1e9),
        );
        fleet(&mut m);
        for s in ["s-a", "s-b"] {
            submit(&mut m, s, update(1, 0, vec![0.0, 0.0], 1), 0).unwrap();
        }
        let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.0, 0.0], 1), 0).unwrap();
        let closed = closed_round(&mut m, out, 0);
        let spent = closed.privacy.unwrap().epsilon;
        if let Some(s) = m.strategy.as_mut().and_then(|s| s.privacy.as_mut()) {
            s.budget = Some(spent * 1.5);
        }
        assert!(matches!(m.persisted(0).as_slice(), [Output::Finished]));
        assert_eq!(m.phase(), PhaseKind::Finished);
        assert!(m.stop_reason().unwrap().contains("the privacy budget is spent"));
    }

    #[test]
    fn an_aggregator_that_cannot_apply_retries_the_round() {
        let strategy = Strategy::new(
            Aggregator::Krum { f: 1 },
            ServerOptimizer::new(ServerOpt::Sgd, 1.0, 1),
            None,
            false,
            1,
        );
        let mut m = RoundMachine::new(settings(3, 1.0), vec![0.0], strategy);
        fleet(&mut m);
        for n in ["a", "b"] {
            submit(&mut m, &format!("s-{n}"), update(1, 0, vec![1.0], 1), 0).unwrap();
        }
        let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![1.0], 1), 0).unwrap();
        let out = settle(&mut m, out, 0);
        // Krum with f = 1 needs 5 updates: the round starts again.
        assert_eq!(assigned(&out), ["a", "b", "c"]);
        assert_eq!((m.current_round(), m.version()), (Some(1), 0));
    }

    /// Joins and connects `nodes` (name, declared samples).
    fn cohort(m: &mut RoundMachine, nodes: &[(&str, u64)]) -> Vec<Output> {
        let mut last = Vec::new();
        for (n, samples) in nodes {
            m.join(n, &format!("s-{n}"), *samples, None, 0).unwrap();
            last = m.connect(&format!("s-{n}"), 0).unwrap();
        }
        last
    }

    fn capped(numel: usize, factor: f64) -> Strategy {
        let mut s = mean(numel);
        s.weighting.max_factor = Some(factor);
        s
    }

    #[test]
    fn a_node_weighs_at_most_what_it_declared_and_the_cohorts_cap() {
        let mut m = RoundMachine::new(settings(3, 1.0), vec![0.0], capped(1, 4.0));
        cohort(&mut m, &[("a", 100), ("b", 100), ("c", u64::MAX)]);
        // An update may not claim more than its node declared.
        let e = submit(&mut m, "s-a", update(1, 0, vec![1.0], 101), 0).unwrap_err();
        assert_eq!(
            e,
            Rejection::TooManySamples {
                claimed: 101,
                declared: 100
            }
        );
        assert_eq!(
            e.to_string(),
            "update claims 101 training samples; the node declared 100 when it joined"
        );
        assert!(e.is_content());
        submit(&mut m, "s-a", update(1, 0, vec![3.0], 100), 0).unwrap();
        submit(&mut m, "s-b", update(1, 0, vec![3.0], 100), 0).unwrap();
        // c claims 2^64 - 1 samples with a zero update: it weighs 4 x 100.
        let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.0], u64::MAX), 0).unwrap();
        let closed = closed_round(&mut m, out, 0);
        assert_eq!(*closed.global, vec![1.0], "(3 x 100 + 3 x 100 + 0 x 400) / 600");
    }

    fn norm_bounded(initial: Vec<f32>) -> RoundMachine {
        let mut s = mean(2);
        s.max_norm_factor = Some(10.0);
        RoundMachine::new(settings(3, 1.0), initial, s)
    }

    /// Runs round 1 with updates `[0, d]` for d in `deltas`.
    fn bounded_round_one(m: &mut RoundMachine, deltas: [f32; 3]) {
        fleet(m);
        for (n, d) in ["a", "b", "c"].iter().zip(deltas) {
            let (_, out) = submit(m, &format!("s-{n}"), update(1, 0, vec![0.0, d], 1), 0).unwrap();
            if *n == "c" {
                closed_round(m, out, 0);
            }
        }
        m.persisted(0);
    }

    #[test]
    fn updates_far_beyond_the_runs_norm_are_refused() {
        let mut m = norm_bounded(vec![3.0, 4.0]);
        fleet(&mut m);
        // Before any round completes: at most 10 x the model's norm (5).
        let e = submit(&mut m, "s-a", update(1, 0, vec![-60.0, -80.0], 1), 0).unwrap_err();
        assert!(
            matches!(&e, Rejection::NormOutlier { norm, bound, .. } if *norm == 100.0 && *bound == 50.0),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("10 times 5.0000e0, the norm of the global model"),
            "{e}"
        );
        assert!(e.is_content());
        submit(&mut m, "s-b", update(1, 0, vec![-30.0, -39.0], 1), 0).unwrap();

        // Round 1's updates are small (median 0.2) next to the model (norm
        // about 5.1): an honest update that grows 20x in round 2 still fits
        // under 10 x the model's norm, and a 1e30 one does not.
        let mut m = norm_bounded(vec![3.0, 4.0]);
        bounded_round_one(&mut m, [0.1, 0.2, 0.3]);
        submit(&mut m, "s-a", update(2, 1, vec![0.0, 4.0], 1), 0).unwrap();
        let e = submit(&mut m, "s-b", update(2, 1, vec![1e30, 1e30], 1), 0).unwrap_err();
        assert!(e.to_string().contains("the norm of the global model"), "{e}");

        // Updates larger than the model (median 0.2 against a model of norm
        // about 0.16): the bound follows the median.
        let mut m = norm_bounded(vec![0.03, 0.04]);
        bounded_round_one(&mut m, [-0.1, -0.2, -0.3]);
        let e = submit(&mut m, "s-a", update(2, 1, vec![0.0, 2.5], 1), 0).unwrap_err();
        match &e {
            Rejection::NormOutlier { norm, bound, .. } => {
                assert_eq!(*norm, 2.5);
                assert!((bound - 2.0).abs() < 1e-6, "{bound}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string()
                .contains("the median norm of the last completed round's updates"),
            "{e}"
        );
        submit(&mut m, "s-b", update(2, 1, vec![0.0, 1.9], 1), 0).unwrap();
    }

    #[test]
    fn a_non_finite_new_model_retries_the_round() {
        let mut m = machine(settings(3, 1.0), vec![3e38]);
        fleet(&mut m);
        submit(&mut m, "s-a", update(1, 0, vec![3e38], 1), 0).unwrap();
        submit(&mut m, "s-b", update(1, 0, vec![3e38], 1), 0).unwrap();
        let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![3e38], 1), 0).unwrap();
        // 3e38 + 3e38 is infinite in f32: nothing is committed; the round starts again.
        let out = settle(&mut m, out, 0);
        assert_eq!(assigned(&out), ["a", "b", "c"]);
        assert_eq!((m.current_round(), m.version()), (Some(1), 0));
        assert_eq!(m.global().in_memory().map(|g| g[0]), Some(3e38));
    }

    #[test]
    fn a_refusal_counts_only_for_the_round_its_stream_was_for() {
        let mut m = machine(
            RoundSettings {
                min_available: 3,
                // c is asked again in round 2 (refused and still connected,
                // it would sit a cool-down out).
                failure_cooldown_rounds: 0,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        fleet(&mut m);
        for n in ["a", "b"] {
            submit(&mut m, &format!("s-{n}"), update(1, 0, vec![1.0], 1), 0).unwrap();
        }
        // c's round-1 stream broke: round 1 closes without it.
        let out = m.refuse("s-c", 1, 0);
        closed_round(&mut m, out, 0);
        m.persisted(0);
        assert_eq!(m.current_round(), Some(2));
        // A round-1 stream of c's that times out during round 2 changes nothing:
        // round 2 still waits for c's round-2 update.
        for n in ["a", "b"] {
            submit(&mut m, &format!("s-{n}"), update(2, 1, vec![1.0], 1), 0).unwrap();
        }
        assert!(m.refuse("s-c", 1, 0).is_empty());
        assert_eq!(m.phase(), PhaseKind::Training);
        let (_, out) = submit(&mut m, "s-c", update(2, 1, vec![1.0], 1), 0).unwrap();
        assert_eq!(closed_round(&mut m, out, 0).contributions.len(), 3);
    }

    #[test]
    fn only_nodes_training_in_the_round_fetch_the_model() {
        let mut m = machine(
            RoundSettings {
                min_available: 3,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        m.join("early", "s-early", 1, None, 0).unwrap();
        // Joined, no round yet: no task, no fetch.
        let e = m.admit_fetch("s-early", 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "node early has no task for model version 0; only nodes training in the round in progress fetch the model"
        );
        assert_eq!(m.admit_fetch("s-nobody", 0).unwrap_err(), Rejection::UnknownSession);
        fleet(&mut m);
        assert_eq!(m.admit_fetch("s-a", 0).unwrap(), "a");
        assert!(matches!(m.admit_fetch("s-a", 1), Err(Rejection::NoTask { .. })));
        submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 0).unwrap();
        // Delivered: nothing left to fetch for.
        assert!(matches!(m.admit_fetch("s-a", 0), Err(Rejection::NoTask { .. })));
    }

    #[test]
    fn a_round_closes_without_stragglers_after_the_set_factor() {
        let mut m = machine(
            RoundSettings {
                straggler_factor: 3.0,
                min_available: 4,
                deadline_ms: 600_000,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        for n in ["a", "b", "c", "d"] {
            m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
            m.connect(&format!("s-{n}"), 0).unwrap();
        }
        // Half of four delivered after 10 s: the rest get 20 s more.
        submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 5_000).unwrap();
        submit(&mut m, "s-b", update(1, 0, vec![3.0], 1), 10_000).unwrap();
        assert!(m.tick(29_999).is_empty());
        submit(&mut m, "s-c", update(1, 0, vec![5.0], 1), 20_000).unwrap();
        let out = m.tick(30_000);
        let closed = closed_round(&mut m, out, 30_000);
        assert_eq!(closed.contributions.len(), 3, "d is left out");
        assert_eq!(*closed.global, vec![3.0]);
    }

    #[test]
    fn a_node_cut_while_connected_sits_out_its_cool_down_and_one_that_left_is_picked_last() {
        for d_returns in [true, false] {
            let mut m = machine(
                RoundSettings {
                    straggler_factor: 3.0,
                    min_available: 4,
                    deadline_ms: 600_000,
                    total_rounds: 3,
                    ..settings(2, 1.0)
                },
                vec![0.0],
            );
            for n in ["e", "d", "a", "b", "c"] {
                m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
                m.connect(&format!("s-{n}"), 0).unwrap();
            }
            // Round 1 asks the first four; d leaves, e stays and sends nothing.
            m.disconnect("s-d", 1_000);
            for n in ["a", "b"] {
                submit(&mut m, &format!("s-{n}"), update(1, 0, vec![1.0], 1), 10_000).unwrap();
            }
            if d_returns {
                m.join("d", "s-d2", 10, None, 12_000).unwrap();
                m.connect("s-d2", 12_000).unwrap();
            }
            let out = m.tick(30_000);
            closed_round(&mut m, out, 30_000);
            let next = assigned(&m.persisted(30_001));
            if d_returns {
                assert_eq!(next, ["a", "b", "c", "d"], "e sits round 2 out; d is picked (last)");
            } else {
                assert_eq!(next, ["a", "b", "c"], "e sits round 2 out although four are wanted");
            }
        }
        // With fewer than min_nodes others, a node that held back is picked last.
        for c_connected in [true, false] {
            let mut m = machine(
                RoundSettings {
                    deadline_ms: 600_000,
                    ..settings(3, 1.0)
                },
                vec![0.0],
            );
            for n in ["e", "a", "b", "c"] {
                m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
                if n != "c" || c_connected {
                    m.connect(&format!("s-{n}"), 0).unwrap();
                }
            }
            for n in ["a", "b"] {
                submit(&mut m, &format!("s-{n}"), update(1, 0, vec![1.0], 1), 10_000).unwrap();
            }
            // Two of three at the deadline: the round is retried.
            let retry = assigned(&m.tick(600_000));
            let expected: &[&str] = if c_connected {
                &["a", "b", "c"]
            } else {
                &["a", "b", "e"]
            };
            assert_eq!(retry, expected, "c connected: {c_connected}");
        }
    }

    #[test]
    fn a_node_that_restarts_mid_round_is_picked_last_not_left_out() {
        let mut m = machine(
            RoundSettings {
                straggler_factor: 3.0,
                min_available: 3,
                deadline_ms: 600_000,
                total_rounds: 2,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        for n in ["e", "a", "b"] {
            m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
            m.connect(&format!("s-{n}"), 0).unwrap();
        }
        // e's process restarts and resumes under a new session before its
        // old stream's end is seen; it does not deliver round 1.
        m.join("e", "s-e2", 10, Some("s-e"), 2_000).unwrap();
        m.connect("s-e2", 2_000).unwrap();
        for n in ["a", "b"] {
            submit(&mut m, &format!("s-{n}"), update(1, 0, vec![1.0], 1), 10_000).unwrap();
        }
        let out = m.tick(30_000);
        closed_round(&mut m, out, 30_000);
        assert_eq!(assigned(&m.persisted(30_001)), ["a", "b", "e"]);
    }

    #[test]
    fn a_node_cut_a_third_time_sits_out_twice_as_long() {
        let mut m = machine(
            RoundSettings {
                straggler_factor: 3.0,
                min_available: 3,
                deadline_ms: 600_000,
                total_rounds: 9,
                failure_cooldown_rounds: 1,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        let mut out = Vec::new();
        for n in ["e", "a", "b"] {
            m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
            out = m.connect(&format!("s-{n}"), 0).unwrap();
        }
        let (mut with_e, mut start) = (Vec::new(), 0);
        for round in 1..=9u64 {
            let e_asked = assigned(&out).contains(&"e".to_string());
            submit(&mut m, "s-a", update(round, round - 1, vec![1.0], 1), start + 5_000).unwrap();
            let (_, last) = submit(&mut m, "s-b", update(round, round - 1, vec![1.0], 1), start + 10_000).unwrap();
            // e holds its update back: the round closes at the cutoff.
            let closing = if e_asked {
                with_e.push(round);
                m.tick(start + 30_000)
            } else {
                last
            };
            closed_round(&mut m, closing, start + 30_000);
            start += 30_001;
            out = m.persisted(start);
        }
        // Cut in rounds 1 and 3: out for 1 round each; again in 5: out for
        // 2; again in 8.
        assert_eq!(with_e, [1, 3, 5, 8]);
    }

    #[test]
    fn a_rejected_model_retries_the_round_without_the_update_that_weighed_most() {
        let mut m = machine(
            RoundSettings {
                min_available: 3,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        fleet(&mut m);
        submit(&mut m, "s-a", update(1, 0, vec![0.1], 10), 0).unwrap();
        submit(&mut m, "s-b", update(1, 0, vec![0.2], 10), 0).unwrap();
        let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![-5.0], 10), 0).unwrap();
        let Some(Output::Aggregate(job)) = out.into_iter().next() else {
            panic!("expected an aggregation")
        };
        let mut done = job.run();
        assert!(done.candidate().is_some());
        done.reject("the loss doubled".into());
        let out = m.aggregated(done, 0);
        // c's update weighed most (10 x 5): the retry asks a and b only.
        assert_eq!(assigned(&out), ["a", "b"]);
        assert_eq!((m.current_round(), m.version()), (Some(1), 0));
        submit(&mut m, "s-a", update(1, 0, vec![0.1], 10), 0).unwrap();
        let (_, out) = submit(&mut m, "s-b", update(1, 0, vec![0.2], 10), 0).unwrap();
        let closed = closed_round(&mut m, out, 0);
        assert!((closed.global[0] - 0.15).abs() < 1e-6, "{:?}", closed.global);
        // The next round asks everyone again.
        let out = m.persisted(0);
        assert_eq!(m.current_round(), Some(2));
        assert_eq!(assigned(&out), ["a", "b", "c"]);
    }

    #[test]
    fn sessions_that_never_connect_are_forgotten() {
        let mut m = machine(settings(2, 1.0), vec![0.0]);
        for i in 0..400 {
            m.join(&format!("flood-{i}"), &format!("s-{i}"), 1, None, 0).unwrap();
        }
        m.join("real", "s-real", 1, None, 0).unwrap();
        m.connect("s-real", 0).unwrap();
        m.disconnect("s-real", 10);
        assert_eq!(m.node_views().len(), 401);
        m.tick(JOIN_EXPIRY_MS - 1);
        assert_eq!(m.node_views().len(), 401);
        m.tick(JOIN_EXPIRY_MS);
        // The node that connected once keeps its record (and its history).
        let views = m.node_views();
        assert_eq!(views.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["real"]);
        assert!(m.node_of("s-7").is_none());
    }

    #[test]
    fn tasks_carry_the_rounds_learning_rate_and_evaluation_cadence() {
        let mut s = settings(3, 1.0);
        s.total_rounds = 4;
        s.federated_every = 3;
        s.train.lr_schedule = crate::config::LrSchedule::Step;
        s.train.lr_step_rounds = 2;
        s.train.lr_decay = 0.5;
        s.train.learning_rate = 0.2;
        let mut m = machine(s, vec![0.0]);
        let mut out = fleet(&mut m);
        let mut seen = Vec::new();
        for round in 1..=4 {
            let Output::Assign { task, .. } = &out[0] else {
                panic!("{out:?}")
            };
            seen.push((task.hyper.learning_rate, task.hyper.evaluate));
            for n in ["a", "b"] {
                submit(&mut m, &format!("s-{n}"), update(round, round - 1, vec![0.0], 1), 0).unwrap();
            }
            let (_, o) = submit(&mut m, "s-c", update(round, round - 1, vec![0.0], 1), 0).unwrap();
            settle(&mut m, o, 0);
            out = m.persisted(0);
        }
        assert_eq!(seen, [(0.2, false), (0.2, false), (0.1, true), (0.1, true)]);
    }

    #[test]
    fn a_refused_update_does_not_hold_the_round_open() {
        let mut m = machine(
            RoundSettings {
                min_available: 3,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        fleet(&mut m);
        submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 0).unwrap();
        submit(&mut m, "s-b", update(1, 0, vec![3.0], 1), 0).unwrap();
        let e = submit(&mut m, "s-c", update(1, 0, vec![f32::INFINITY], 1), 0).unwrap_err();
        assert!(e.is_content());
        let out = m.refuse("s-c", 1, 0);
        let closed = closed_round(&mut m, out, 0);
        assert_eq!(*closed.global, vec![2.0]);
    }

    #[test]
    fn a_round_waits_for_its_folds_before_it_closes() {
        let mut m = machine(settings(2, 1.0), vec![0.0, 0.0]);
        fleet(&mut m);
        submit(&mut m, "s-a", update(1, 0, vec![1.0, 1.0], 1), 0).unwrap();
        let (_, mut out) = m.submit("s-b", update(1, 0, vec![3.0, 3.0], 1), 0).unwrap();
        let Some(Output::Fold(job)) = out.pop() else {
            panic!("expected a fold, got {out:?}");
        };
        let out = m.disconnect("s-c", 1);
        assert!(out.is_empty(), "closed before the fold finished: {out:?}");
        assert!(m.tick(10_000_000).is_empty(), "the deadline does not cut a fold short");
        let out = m.folded(job.run(), 2);
        let closed = closed_round(&mut m, out, 2);
        assert_eq!(*closed.global, vec![2.0, 2.0]);
    }

    #[test]
    fn a_round_that_keeps_failing_stops_the_run() {
        let mut s = settings(2, 1.0);
        s.max_attempts = 2;
        s.min_available = 3;
        let mut m = machine(s, vec![0.0]);
        fleet(&mut m);
        submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 0).unwrap();
        assert_eq!(assigned(&m.tick(1000)).len(), 3);
        let out = m.tick(2000);
        let [Output::Abort(reason)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            reason,
            "round 1 failed 2 times in a row; stopping the run (the last completed round, 0, is saved)"
        );
        assert_eq!(m.phase(), PhaseKind::Finished);
    }

    #[test]
    fn updates_above_the_refusal_bound_are_refused() {
        let mut strategy = mean(2);
        strategy.max_norm = Some(10.0);
        let mut m = RoundMachine::new(settings(3, 1.0), vec![0.0, 0.0], strategy);
        fleet(&mut m);
        let e = submit(&mut m, "s-a", update(1, 0, vec![30.0, 40.0], 1), 0).unwrap_err();
        assert_eq!(e.to_string(), "update norm 5.0000e1 exceeds the bound 1.0000e1");
        assert!(e.is_content());
        submit(&mut m, "s-a", update(1, 0, vec![3.0, 4.0], 1), 0).unwrap();
    }

    /// A secure round of five nodes, driven without sockets by real
    /// `secagg::Client`s: one node drops after sharing keys (no masked
    /// input), one after sending its masked input (no unmasking answer).
    /// The round closes with the survivors' weighted mean, within the
    /// quantization bound, and a record of who did what.
    #[test]
    fn a_secure_round_survives_dropouts_and_yields_the_weighted_mean() {
        use fedge_common::secagg::{Client, Quantizer};
        let numel = 6;
        let mut s = settings(3, 1.0);
        s.min_available = 5;
        s.secure = Some(SecureSettings {
            neighbours: 0,
            max_dropout: 0.4,
            range: 1.0,
            step_timeout_ms: 1000,
        });
        let mut m = machine(s, vec![0.0; numel]);
        let names = ["a", "b", "c", "d", "e"];
        let mut tasks = BTreeMap::new();
        for (i, n) in names.iter().enumerate() {
            m.join(n, &format!("s-{n}"), 10 * (i as u64 + 1), None, 0).unwrap();
            for o in m.connect(&format!("s-{n}"), 0).unwrap() {
                if let Output::Assign { node, task } = o {
                    tasks.insert(node, task.secure.expect("a secure task"));
                }
            }
        }
        assert_eq!(tasks.len(), 5);
        assert_eq!(tasks["a"].threshold, 3, "⌈0.6 · 5⌉");
        let mut rng = rand::rng();
        let mut clients = BTreeMap::new();
        let mut out = Vec::new();
        for n in names {
            let (c, keys) = Client::new(tasks[n].id, 1, &mut rng);
            clients.insert(n, c);
            out = m
                .secure_message(&format!("s-{n}"), 1, SecAggInput::Advertise(keys), 68, 1)
                .unwrap();
        }
        // The last advertisement closes the step: a roster for everyone.
        let mut shares_out = Vec::new();
        for o in out {
            let Output::SecAgg {
                node,
                message: SecAggOutput::Roster { nodes, neighbours, .. },
            } = o
            else {
                panic!("expected rosters, got {o:?}");
            };
            let c = clients.get_mut(node.as_str()).unwrap();
            let sealed = c.share_keys(&nodes, &neighbours, tasks[&node].threshold).unwrap();
            shares_out.push((node, sealed));
        }
        let mut forwarded = Vec::new();
        for (node, sealed) in shares_out {
            forwarded = m
                .secure_message(&format!("s-{node}"), 1, SecAggInput::Shares(sealed), 500, 2)
                .unwrap();
        }
        assert_eq!(forwarded.len(), 5);
        for o in forwarded {
            let Output::SecAgg {
                node,
                message: SecAggOutput::Shares { shares, .. },
            } = o
            else {
                panic!("expected shares, got {o:?}");
            };
            clients.get_mut(node.as_str()).unwrap().receive_shares(&shares).unwrap();
        }
        // "d" leaves before sending its input; the others send theirs.
        m.disconnect("s-d", 3);
        let updates: BTreeMap<&str, Vec<f32>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    *n,
                    (0..numel)
                        .map(|j| ((i * numel + j) as f32 * 0.37).sin() * 0.1)
                        .collect(),
                )
            })
            .collect();
        let mut unmask = Vec::new();
        for n in ["a", "b", "c", "e"] {
            let t = &tasks[n];
            let mut values: Vec<f32> = updates[n].iter().map(|v| v * t.weight as f32).collect();
            values.push(1.0);
            let q: Quantizer = t.quantizer;
            let masked = clients[n].mask(&q.quantize(&values, &mut rng));
            let bits: Vec<f32> = masked.iter().map(|w| f32::from_bits(*w)).collect();
            let mut u = update(1, 0, vec![0.0; numel], 10);
            u.body.source = Arc::new(bits);
            u.body.non_finite = None;
            unmask = submit(&mut m, &format!("s-{n}"), u, 4).unwrap().1;
        }
        // The masked inputs are not the updates: a masked value is anywhere in the ring.
        let requests: Vec<(String, fedge_common::secagg::UnmaskRequest)> = unmask
            .into_iter()
            .map(|o| match o {
                Output::SecAgg {
                    node,
                    message: SecAggOutput::Unmask { request, .. },
                } => (node, request),
                other => panic!("expected unmasking requests, got {other:?}"),
            })
            .collect();
        assert_eq!(requests.len(), 4);
        assert_eq!(requests[0].1.dropped, vec![tasks["d"].id]);
        // "e" leaves without answering; the other three are the threshold.
        m.disconnect("s-e", 5);
        let mut closing = Vec::new();
        for (node, req) in requests.iter().filter(|(n, _)| n != "e") {
            let reveal = clients.get_mut(node.as_str()).unwrap().unmask(req).unwrap();
            closing = m
                .secure_message(&format!("s-{node}"), 1, SecAggInput::Reveal(reveal), 100, 6)
                .unwrap();
        }
        let closed = closed_round(&mut m, closing, 6);
        let survivors = ["a", "b", "c", "e"];
        let wsum: f64 = survivors.iter().map(|n| tasks[*n].weight).sum();
        let step = tasks["a"].quantizer.step();
        for (j, got) in closed.global.iter().enumerate() {
            let expected: f64 = survivors
                .iter()
                .map(|n| tasks[*n].weight * f64::from(updates[*n][j]))
                .sum::<f64>()
                / wsum;
            let got = f64::from(*got);
            assert!(
                (got - expected).abs() <= 4.0 * step / wsum + 1e-6,
                "value {j}: {got} against {expected}"
            );
        }
        let rec = closed.secure.expect("a secure record");
        assert_eq!(
            (
                rec.selected,
                rec.advertised,
                rec.shared,
                rec.survivors,
                rec.dropped,
                rec.revealed
            ),
            (5, 5, 5, 4, 1, 3)
        );
        assert_eq!(closed.contributions.len(), 4);
        assert!(closed.contributions.iter().all(|c| c.update_norm.is_nan()));
    }

    #[test]
    fn secure_messages_out_of_step_or_from_strangers_are_refused() {
        use fedge_common::secagg::Client;
        let mut s = settings(3, 1.0);
        s.secure = Some(SecureSettings {
            neighbours: 0,
            max_dropout: 0.3,
            range: 1.0,
            step_timeout_ms: 1000,
        });
        let mut m = machine(s, vec![0.0; 4]);
        fleet(&mut m);
        m.join("z", "s-z", 10, None, 0).unwrap();
        let (_, keys) = Client::new(0, 1, &mut rand::rng());
        let err = |r: Result<Vec<Output>, Rejection>| r.unwrap_err().to_string();
        // "a" is number 0 (names in order): its keys are taken, once.
        assert!(
            m.secure_message("s-a", 1, SecAggInput::Advertise(keys.clone()), 0, 1)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            err(m.secure_message("s-a", 1, SecAggInput::Advertise(keys.clone()), 0, 1)),
            "secure aggregation: node 0 advertised twice"
        );
        let (_, wrong) = Client::new(2, 1, &mut rand::rng());
        assert_eq!(
            err(m.secure_message("s-b", 1, SecAggInput::Advertise(wrong), 0, 1)),
            "secure aggregation: node b is number 1 in this round, not 2"
        );
        assert_eq!(
            err(m.secure_message("s-b", 1, SecAggInput::Shares(Vec::new()), 0, 1)),
            "secure aggregation: shares came while the round is advertising"
        );
        assert_eq!(
            err(m.secure_message("s-b", 2, SecAggInput::Shares(Vec::new()), 0, 1)),
            "update for round 2; round 1 is in progress"
        );
        assert!(err(m.secure_message("s-z", 1, SecAggInput::Advertise(keys), 0, 1)).contains("not selected"));
        // A masked input from a node that shared no keys cannot be unmasked.
        let err = submit(&mut m, "s-c", update(1, 0, vec![0.0; 5], 10), 2)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "secure aggregation: node c did not share its keys in round 1, so its masked input could never be unmasked"
        );
    }

    #[test]
    fn a_secure_round_with_too_few_keys_is_retried_at_the_step_deadline() {
        let mut s = settings(3, 1.0);
        s.secure = Some(SecureSettings {
            neighbours: 0,
            max_dropout: 0.3,
            range: 1.0,
            step_timeout_ms: 1000,
        });
        let mut m = machine(s, vec![0.0; 4]);
        fleet(&mut m);
        let (_, keys) = fedge_common::secagg::Client::new(0, 1, &mut rand::rng());
        assert!(
            m.secure_message("s-a", 1, SecAggInput::Advertise(keys), 0, 1)
                .unwrap()
                .is_empty()
        );
        assert!(m.tick(999).is_empty());
        let out = m.tick(1000);
        assert_eq!(assigned(&out), ["a", "b", "c"], "a fresh attempt with fresh keys");
        assert_eq!(m.secure_round().map(|(step, _)| step), Some(Step::Advertising));
    }
}
