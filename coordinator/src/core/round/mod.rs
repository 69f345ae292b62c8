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
use std::sync::Arc;

use fedge_common::task::{Algorithm, Hyperparameters};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::core::model::{GlobalModel, ModelFile};
use crate::core::privacy::RoundPlan;
use crate::core::secure::{SecAggOutput, SecureRecord, SecureRound, SecureSettings, SecureTask};
use crate::core::strategy::{RoundAggregate, Strategy, UpdateSource, clip_scale, l2_norm};
use crate::core::training::TrainConfig;

mod asynchronous;
mod jobs;
mod secure_steps;
#[cfg(test)]
mod tests;
mod update;

use asynchronous::AsyncState;
pub use asynchronous::{AsyncSettings, StalenessWeight};
use jobs::FoldTarget;
pub use jobs::{Aggregated, AggregationFailure, AggregationJob, ClosedRound, FoldJob, Folded};
pub use update::{Body, Contribution, Rejection, Staleness, Update, UpdateKind};

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
    /// Asynchronous buffered aggregation instead of rounds, when set.
    pub asynchronous: Option<AsyncSettings>,
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
    Aggregating {
        round: u64,
        state: ClosingState,
    },
    Closing {
        round: u64,
    },
    /// Asynchronous training ([`asynchronous`]), from its start to the last step.
    Async(Box<AsyncState>),
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
    /// Asynchronous training: nodes train and server steps run side by side.
    Async,
    Finished,
}

/// What the strategy fixes about updates for the whole run, kept beside
/// it: an asynchronous run checks and folds updates while the strategy is
/// out in a server step.
#[derive(Debug, Clone, Copy)]
struct UpdateRules {
    aggregator: crate::core::strategy::Aggregator,
    precision: crate::core::strategy::Precision,
    weighting: crate::core::strategy::Weighting,
    clip_norm: Option<f64>,
    max_norm: Option<f64>,
    max_norm_factor: Option<f64>,
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
    rules: UpdateRules,
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
        let mut machine = Self {
            settings,
            version,
            model_norm: l2_norm(&global),
            global: GlobalModel::Memory(global),
            nodes: BTreeMap::new(),
            phase: Phase::Waiting,
            rules: UpdateRules {
                aggregator: strategy.aggregator,
                precision: strategy.precision,
                weighting: strategy.weighting,
                clip_norm: strategy.clip_norm,
                max_norm: strategy.max_norm,
                max_norm_factor: strategy.max_norm_factor,
            },
            strategy: Some(strategy),
            stop_reason: None,
            norm_reference: None,
            pending_joins: VecDeque::new(),
            suspects: (0, BTreeSet::new()),
            in_turn: None,
            direction: None,
        };
        if machine.settings.asynchronous.is_some() {
            machine.phase = Phase::Async(Box::new(machine.async_state()));
        }
        machine
    }

    /// Sets the median update norm of the last completed round (a resumed
    /// run reads it from its history), which bounds the next round's
    /// updates under `strategy.max_norm_factor`.
    pub fn set_norm_reference(&mut self, median: f64) {
        if median.is_finite() && median > 0.0 {
            self.norm_reference = Some(median);
            let bound = self.norm_bound();
            if let Phase::Async(a) = &mut self.phase {
                a.rebound(bound);
            }
        }
    }

    /// SCAFFOLD's current server control variate, if the run uses it.
    pub fn control(&self) -> Option<&[f32]> {
        self.strategy.as_ref().and_then(|s| s.control.as_deref())
    }

    /// Whether the run trains asynchronously ([`asynchronous`]).
    pub fn is_async(&self) -> bool {
        self.settings.asynchronous.is_some()
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
    pub fn store_global(&mut self, stored: Arc<dyn ModelFile>) -> crate::Result<()> {
        if stored.numel() != self.global.len() {
            return Err(crate::Error::Internal(format!(
                "the stored global model has {} values; the model has {}",
                stored.numel(),
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
            Phase::Async(_) => Some(self.version + 1),
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
            Phase::Async(ref a) if !a.started() => PhaseKind::Waiting,
            Phase::Async(_) => PhaseKind::Async,
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
        let replaced = rec.session != session;
        if replaced
            && let Phase::Training(r) = &mut self.phase
            && r.selected.contains(name)
        {
            r.left.insert(name.to_owned());
        }
        if replaced && let Phase::Async(a) = &mut self.phase {
            a.forget(name);
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
            Phase::Async(_) => match self.async_reassign(&name) {
                Some(task) => vec![task],
                None => self.fill(now_ms),
            },
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
        if let Phase::Async(_) = &self.phase {
            return self.async_detach(&name, now_ms);
        }
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
        if let Phase::Async(_) = &self.phase {
            self.async_admit(name, round, base_version)?;
            return Ok(name.to_owned());
        }
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
    /// version its task names. In an asynchronous run a node with a task
    /// is served the newest saved version (`version`), which its update
    /// then starts from.
    pub fn admit_fetch(&mut self, session: &str, version: u64) -> Result<String, Rejection> {
        let name = self.node_of(session).ok_or(Rejection::UnknownSession)?.to_owned();
        if let Phase::Async(_) = &self.phase {
            self.async_admit_fetch(&name, version)?;
            return Ok(name);
        }
        let name = name.as_str();
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
        if let Phase::Async(_) = &self.phase {
            return self.async_submit(name, update, now_ms);
        }
        if matches!(&self.phase, Phase::Training(r) if r.secure.is_some()) {
            return self.submit_masked(name, update, now_ms);
        }
        let (update_norm, step) = self.check_update(&name, &update)?;
        let body = &update.body;
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

    /// Checks a complete update against the model and the run's fixed
    /// bounds: its size, its values, the samples it claims, what it holds
    /// and its absolute norm. Returns its norm as applied and the factor of
    /// its main section (−η for a FedSGD gradient, 1 for a delta).
    fn check_update(&self, name: &str, update: &Update) -> Result<(f64, f64), Rejection> {
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
        self.check_samples(name, update.num_samples)?;
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
        if let Some(max) = self.rules.max_norm
            && update_norm > max
        {
            return Err(Rejection::NormTooLarge {
                norm: update_norm,
                bound: max,
            });
        }
        Ok((update_norm, step))
    }

    /// The most an update's norm may be under `strategy.max_norm_factor`,
    /// and the reference it multiplies, in words.
    fn norm_bound(&self) -> Option<(f64, String)> {
        let factor = self.rules.max_norm_factor?;
        // Honest updates can outgrow the last round's median early in a
        // run (the model leaves its flat start), but an update many times
        // the model itself is no training step: the larger of the two is
        // the reference.
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
    }

    /// An accepted update's fold finished. A fold that failed (its spooled
    /// payload could not be read back) leaves the sum in an unknown state:
    /// the round is retried.
    pub fn folded(&mut self, done: Folded, now_ms: u64) -> Vec<Output> {
        if let Phase::Async(_) = &self.phase {
            return self.async_folded(done, now_ms);
        }
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
        if let Phase::Async(_) = &self.phase {
            return self.async_refuse(&name, round, now_ms);
        }
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
        if let Phase::Async(_) = &self.phase {
            return self.async_tick(now_ms);
        }
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
        if let Phase::Async(_) = &self.phase {
            return self.async_aggregated(done, now_ms);
        }
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
            Err(failure) if state.secure.is_some() => {
                let reason = failure.to_string();
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
            Err(AggregationFailure::Rejected(reason)) => {
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
            Err(failure) => {
                tracing::warn!(round, reason = %failure, "aggregation failed; retrying the round");
                return self.start_attempt(round, state.attempt + 1, now_ms);
            }
        };
        self.suspects.1.clear();
        self.in_turn = None;
        self.phase = Phase::Closing { round };
        let closed = self.commit(round, global, done.direction, done.model_norm, state, privacy);
        vec![Output::Close(closed)]
    }

    /// Commits the model an aggregation made as version `round` (its step
    /// taken as the last direction, its updates' median norm as the next
    /// reference) and returns the closed round or step for the driver to save.
    fn commit(
        &mut self,
        round: u64,
        global: Arc<Vec<f32>>,
        direction: Option<Arc<Vec<f32>>>,
        model_norm: f64,
        state: ClosingState,
        privacy: Option<crate::core::privacy::RoundPrivacy>,
    ) -> ClosedRound {
        self.direction = direction;
        if let Some(median) = median_norm(&state.accepted) {
            self.norm_reference = Some(median);
        }
        self.model_norm = model_norm;
        self.global = GlobalModel::Memory(global.clone());
        self.version = round;
        let strategy = self.strategy.as_ref().expect("restored by the caller");
        ClosedRound {
            round,
            version: round,
            global,
            contributions: state.accepted,
            selected: state.selected,
            started_ms: state.started_ms,
            closed_ms: state.closed_ms,
            control: strategy.control.clone().map(Arc::new),
            strategy_state: Arc::new(strategy.state()),
            privacy,
            secure: state.secure,
        }
    }

    /// The closed round is durable and evaluated: start the next one, or finish.
    pub fn persisted(&mut self, now_ms: u64) -> Vec<Output> {
        if let Phase::Async(_) = &self.phase {
            return self.async_persisted(now_ms);
        }
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
    pub fn privacy(&self) -> Option<&crate::core::privacy::Privacy> {
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
                let in_async = self.async_state_of(name);
                let delivered =
                    round.is_some_and(|r| r.accepted.iter().any(|c| &c.node == name)) || in_async == Some(false);
                let selected = round.is_some_and(|r| r.selected.contains(name)) || in_async == Some(true);
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
        let norm_bound = self.norm_bound();
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
        let node_hash = node_hash(node);
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

/// FNV-1a of a node's name, for its per-task seeds.
fn node_hash(node: &str) -> u64 {
    node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// SplitMix64 over three words: a cheap, well-spread seed derivation.
fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a ^ b.rotate_left(21) ^ c.rotate_left(42);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
