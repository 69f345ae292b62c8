//! Asynchronous buffered aggregation (FedBuff, Nguyen et al., AISTATS 2022).
//!
//! In an asynchronous run the machine keeps up to `concurrency` nodes
//! training at all times: a connected node without a task gets one at once,
//! naming the newest global version (a fetch waits while it is being
//! saved), or, while a server step is pending, as soon as the step has
//! made its model. Each task has a number unique in
//! the run (the update's `round`). Updates fold into the open buffer as
//! they arrive (streaming, O(model) for the mean), each weighted by its
//! samples and multiplied by its staleness weight, where staleness is how
//! many versions the global model moved since the update's base. An update
//! more than `max_staleness` versions behind is refused.
//!
//! Once the open buffer holds `buffer_size` updates it closes, a new one
//! opens, and the server step runs on the closed one: the same aggregation
//! job as a synchronous round (every aggregator and server optimizer), then
//! the version increments and the driver saves and (every `eval.every`
//! steps) evaluates it. Steps run one at a time, in order; a buffer that
//! fills while a step is aggregated or saved waits its turn, while updates
//! keep arriving. Fetches are served the newest saved version, and an
//! update must start from the version its node was served.
//!
//! A buffer takes at most one update per node: a node whose update is in
//! the open buffer gets its next task once that buffer closes, so a node
//! that answers at once (a hostile one needs no training) holds at most one
//! of a step's `buffer_size` updates, as robust aggregators assume.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use super::jobs::FoldTarget;
use super::{
    Aggregated, AggregationFailure, AggregationJob, ClosingState, Contribution, FoldJob, Folded, Output, Phase,
    Rejection, RoundMachine, Staleness, Task, mix, node_hash, suspect,
};
use crate::core::strategy::{RoundAggregate, clip_scale};

/// How much an update `s` versions behind weighs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StalenessWeight {
    /// Every update weighs the same, however stale.
    Constant,
    /// `(1 + s)^-exponent`; FedBuff's `1/sqrt(1 + s)` is exponent 0.5.
    Polynomial { exponent: f64 },
    /// 1 up to `b` versions behind, then `1 / (a·(s − b) + 1)` (the hinge
    /// of FedAsync, Xie et al. 2019).
    Hinge { a: f64, b: u64 },
}

impl StalenessWeight {
    /// The factor an update `s` versions behind is multiplied by, in (0, 1].
    pub fn factor(&self, s: u64) -> f64 {
        match *self {
            StalenessWeight::Constant => 1.0,
            StalenessWeight::Polynomial { exponent } => (1.0 + s as f64).powf(-exponent),
            StalenessWeight::Hinge { a, b } if s > b => 1.0 / (a * (s - b) as f64 + 1.0),
            StalenessWeight::Hinge { .. } => 1.0,
        }
    }
}

impl fmt::Display for StalenessWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StalenessWeight::Constant => write!(f, "constant"),
            StalenessWeight::Polynomial { exponent } if *exponent == 0.5 => write!(f, "1/sqrt(1+s)"),
            StalenessWeight::Polynomial { exponent } => write!(f, "(1+s)^-{exponent}"),
            StalenessWeight::Hinge { a, b } => write!(f, "hinge(a={a}, b={b})"),
        }
    }
}

/// Settings of asynchronous training.
#[derive(Debug, Clone, PartialEq)]
pub struct AsyncSettings {
    /// Nodes kept training at once (0: every connected node).
    pub concurrency: usize,
    /// Updates per server step (K).
    pub buffer_size: usize,
    /// Updates further behind the current version are refused.
    pub max_staleness: u64,
    pub weight: StalenessWeight,
    /// The first task's number: a resumed run starts above every number an
    /// earlier start of the coordinator handed out, so tasks stay unique.
    pub first_task: u64,
    /// A resumed run: the (node, task) pairs whose updates its recent
    /// saved steps applied, which an update kept over the restart may not
    /// repeat.
    pub applied: BTreeSet<(String, u64)>,
}

/// A task in progress.
#[derive(Debug, Clone, Copy)]
struct Flight {
    task: u64,
    /// The version the node was told (its task) or served (its first fetch).
    version: u64,
    /// Whether a fetch has fixed `version`.
    fetched: bool,
    /// The node's instruction stream closed while it trained: the task no
    /// longer holds a slot, but its update is still taken until the deadline.
    detached: bool,
    deadline_ms: u64,
}

/// Updates gathered for one server step.
#[derive(Debug)]
struct Buffer {
    id: u64,
    aggregate: RoundAggregate,
    accepted: Vec<Contribution>,
    /// Accepted updates whose fold has not finished.
    folding: BTreeSet<String>,
    opened_ms: u64,
    norm_bound: Option<(f64, String)>,
}

#[derive(Debug)]
enum StepState {
    Idle,
    /// A closed buffer's aggregation is running.
    Aggregating(ClosingState),
    /// The new version is being saved.
    Saving,
}

/// The state of an asynchronous run (see the module docs).
#[derive(Debug)]
pub(super) struct AsyncState {
    next_task: u64,
    in_flight: BTreeMap<String, Flight>,
    open: Buffer,
    /// Closed buffers waiting for their step, oldest first.
    full: VecDeque<Buffer>,
    next_buffer: u64,
    step: StepState,
    /// The newest saved version: fetches serve it.
    durable: u64,
    /// Nodes that delivered an update trained before this start of the
    /// coordinator (one each).
    carried: BTreeSet<String>,
    /// Whether `min_available` nodes have been connected (tasks go out).
    started: bool,
    /// The version this start of the coordinator began at: an update kept
    /// over the restart started from it or an older one.
    start_version: u64,
    /// Server steps that failed in a row (`sampling.max_attempts` stops the run).
    failed_steps: u32,
}

impl AsyncState {
    /// Whether tasks go out (`min_available` nodes have been connected).
    pub(super) fn started(&self) -> bool {
        self.started
    }

    /// The open buffer's norm bound, while it holds nothing (a resumed
    /// run learns its last step's median norm after the machine is made).
    pub(super) fn rebound(&mut self, bound: Option<(f64, String)>) {
        if self.open.accepted.is_empty() {
            self.open.norm_bound = bound;
        }
    }

    /// Ends `name`'s task in progress, if any (its session was replaced).
    pub(super) fn forget(&mut self, name: &str) {
        self.in_flight.remove(name);
    }
}

/// An asynchronous run as status reports show it.
#[derive(Debug, Clone, PartialEq)]
pub struct AsyncView {
    pub in_flight: usize,
    /// Updates in the open buffer, and its size.
    pub buffered: usize,
    pub buffer_size: usize,
    /// Closed buffers waiting for their server step.
    pub waiting_steps: usize,
    /// The newest saved version.
    pub durable_version: u64,
}

impl RoundMachine {
    fn async_settings(&self) -> &AsyncSettings {
        self.settings
            .asynchronous
            .as_ref()
            .expect("only an asynchronous run has an asynchronous phase")
    }

    /// The state of an asynchronous run at its current version, before
    /// any node connected: tasks go out once `min_available` nodes are
    /// connected, while an update trained before a restart is taken at once.
    pub(super) fn async_state(&self) -> AsyncState {
        AsyncState {
            next_task: self.async_settings().first_task,
            in_flight: BTreeMap::new(),
            open: self.new_buffer(0, 0),
            full: VecDeque::new(),
            next_buffer: 1,
            step: StepState::Idle,
            durable: self.version,
            carried: BTreeSet::new(),
            started: false,
            start_version: self.version,
            failed_steps: 0,
        }
    }

    /// Whether tasks go out: once `min_available` nodes have been connected.
    fn async_started(&mut self, now_ms: u64) -> bool {
        let available = self.nodes.values().filter(|n| n.connected && n.num_samples > 0).count();
        let needed = self.settings.min_available.max(self.settings.min_nodes);
        let settings = self.async_settings().clone();
        let version = self.version;
        let Phase::Async(a) = &mut self.phase else {
            return false;
        };
        if !a.started && available >= needed {
            a.started = true;
            if a.open.accepted.is_empty() {
                a.open.opened_ms = now_ms;
            }
            tracing::info!(
                version,
                concurrency = settings.concurrency,
                buffer_size = settings.buffer_size,
                max_staleness = settings.max_staleness,
                staleness_weight = %settings.weight,
                "asynchronous training started"
            );
        }
        a.started
    }

    fn new_buffer(&self, id: u64, now_ms: u64) -> Buffer {
        let rules = &self.rules;
        let numel = self.global.len();
        Buffer {
            id,
            aggregate: RoundAggregate::new(rules.aggregator, numel, rules.precision, false),
            accepted: Vec::new(),
            folding: BTreeSet::new(),
            opened_ms: now_ms,
            norm_bound: self.norm_bound(),
        }
    }

    /// Gives idle connected nodes tasks until `concurrency` are training
    /// (none while a server step is pending):
    /// nodes whose update was refused, then those whose task expired,
    /// within the last `failure_cooldown_rounds` versions go last; the
    /// others by fewest contributions.
    pub(super) fn fill(&mut self, now_ms: u64) -> Vec<Output> {
        if !self.async_started(now_ms) {
            return Vec::new();
        }
        let Phase::Async(a) = &self.phase else {
            return Vec::new();
        };
        let settings = self.async_settings();
        let limit = match settings.concurrency {
            0 => usize::MAX,
            n => n,
        };
        // While a server step is pending, nodes that fall idle wait for
        // it: they start from the model it makes, not the one it replaces.
        // Once the last step has made its model, no task starts.
        let training = a.in_flight.values().filter(|f| !f.detached).count();
        if training >= limit
            || !a.full.is_empty()
            || matches!(a.step, StepState::Aggregating(_))
            || self.version >= self.settings.total_rounds
        {
            return Vec::new();
        }
        let cooldown = self.settings.failure_cooldown_rounds;
        let version = self.version;
        let seed = self.settings.seed;
        let recent = |at: Option<u64>| at.is_some_and(|v| cooldown > 0 && v + cooldown >= version);
        let free =
            |name: &String, n: &super::NodeRecord| n.connected && n.num_samples > 0 && !a.in_flight.contains_key(name);
        let buffered = |name: &String| a.open.accepted.iter().any(|c| &c.node == name);
        // A buffer takes one update per node, unless no other node could
        // fill it: when none is training and every free node's update is in
        // it already, those nodes train again (a fleet smaller than the
        // buffer, or its other nodes gone).
        let others = self.nodes.iter().any(|(name, n)| free(name, n) && !buffered(name));
        let again = training == 0 && !others;
        let mut idle: Vec<(bool, bool, u64, u64, String)> = self
            .nodes
            .iter()
            .filter(|(name, n)| free(name, n) && (again || !buffered(name)))
            .map(|(name, n)| {
                (
                    recent(n.last_cut),
                    recent(n.last_failure),
                    n.rounds_contributed,
                    mix(seed, version, node_hash(name)),
                    name.clone(),
                )
            })
            .collect();
        idle.sort_unstable();
        let take = limit - training;
        let deadline_ms = now_ms + self.settings.deadline_ms;
        let mut out = Vec::new();
        for (_, _, _, _, node) in idle.into_iter().take(take) {
            let Phase::Async(a) = &mut self.phase else {
                unreachable!("checked above");
            };
            // The newest version, even while its step is being saved: the
            // node's fetch waits for it rather than train from an older one.
            let flight = Flight {
                task: a.next_task,
                version,
                fetched: false,
                detached: false,
                deadline_ms,
            };
            a.next_task += 1;
            a.in_flight.insert(node.clone(), flight);
            let task = self.async_task(&node, flight);
            out.push(Output::Assign { node, task });
        }
        out
    }

    fn async_task(&self, node: &str, flight: Flight) -> Task {
        let total = self.settings.total_rounds;
        // The learning rate schedule and federated evaluation follow the
        // server step the task's update is meant for.
        let step = flight.version + 1;
        let every = self.settings.federated_every;
        let evaluate = every > 0 && (step.is_multiple_of(every) || step == total);
        let hyper = self.settings.train.hyperparameters(
            step.min(total),
            total,
            mix(self.settings.seed, flight.task, node_hash(node)),
            evaluate,
        );
        Task {
            round: flight.task,
            version: flight.version,
            hyper,
            deadline_ms: flight.deadline_ms,
            secure: None,
        }
    }

    /// The task of a node that connects again while it has one.
    pub(super) fn async_reassign(&mut self, name: &str) -> Option<Output> {
        let Phase::Async(a) = &mut self.phase else {
            return None;
        };
        let flight = a.in_flight.get_mut(name)?;
        flight.detached = false;
        let flight = *flight;
        Some(Output::Assign {
            node: name.to_owned(),
            task: self.async_task(name, flight),
        })
    }

    /// A node's instruction stream closed: its task's slot goes to another
    /// node, while an update for the task is still taken until its
    /// deadline (a node whose stream broke trains on and sends it).
    pub(super) fn async_detach(&mut self, name: &str, now_ms: u64) -> Vec<Output> {
        let Phase::Async(a) = &mut self.phase else {
            return Vec::new();
        };
        if let Some(flight) = a.in_flight.get_mut(name) {
            flight.detached = true;
            tracing::debug!(
                node = name,
                task = flight.task,
                "node left while training; its slot goes to another"
            );
        }
        self.fill(now_ms)
    }

    /// Checks an update's header: it answers the node's task in progress,
    /// from the version the node was served, not too stale. An update for
    /// a task of an earlier start of the coordinator (one trained while it
    /// restarted) is taken once per node, from a node that has no task yet
    /// and no update in the open buffer, and from a saved version.
    pub(super) fn async_admit(&self, name: &str, task: u64, base_version: u64) -> Result<(), Rejection> {
        let Phase::Async(a) = &self.phase else {
            unreachable!("only an asynchronous phase admits asynchronous updates");
        };
        let served = match a.in_flight.get(name).filter(|f| f.task == task) {
            Some(flight) => flight.version,
            None if self.carried_over(a, name, task, base_version) => base_version,
            None => {
                return Err(Rejection::NoSuchTask {
                    node: name.to_owned(),
                    task,
                });
            }
        };
        // The version the node was served; one it was not (its task's
        // version before it fetched it) it cannot have trained from.
        if base_version != served || base_version > a.durable {
            return Err(Rejection::WrongBaseVersion {
                got: base_version,
                current: served.min(a.durable),
            });
        }
        let max = self.async_settings().max_staleness;
        if self.version.saturating_sub(base_version) > max {
            return Err(Rejection::TooStale {
                base: base_version,
                current: self.version,
                max,
            });
        }
        Ok(())
    }

    /// Whether `task` of `name`, from `base`, is one of an earlier start
    /// of the coordinator that this start may still take (see
    /// [`Self::async_admit`]): the run was resumed, the update started from
    /// a version saved before this start, and no saved step applied it.
    fn carried_over(&self, a: &AsyncState, name: &str, task: u64, base: u64) -> bool {
        let settings = self.async_settings();
        settings.first_task > 1
            && task < settings.first_task
            && base <= a.start_version
            && !settings.applied.contains(&(name.to_owned(), task))
            && !a.carried.contains(name)
            && !a.in_flight.contains_key(name)
            && !a.open.accepted.iter().any(|c| c.node == name)
    }

    /// Admits a fetch of `version` by a node whose task named that version
    /// or an older one. A saved version is the one it is served, and its
    /// update must start from it; a version still being saved is only
    /// checked (the fetch waits for it, then asks again). The first fetch
    /// of a task fixes its version: a later one gets only that version.
    pub(super) fn async_admit_fetch(&mut self, name: &str, version: u64) -> Result<(), Rejection> {
        let current = self.version;
        let Phase::Async(a) = &mut self.phase else {
            unreachable!("only an asynchronous phase admits asynchronous fetches");
        };
        match a.in_flight.get_mut(name) {
            Some(f) if f.fetched && f.version == version => Ok(()),
            Some(f) if !f.fetched && f.version <= version && version <= current => {
                if version <= a.durable {
                    f.version = version;
                    f.fetched = true;
                }
                Ok(())
            }
            _ => Err(Rejection::NoTask {
                node: name.to_owned(),
                version,
            }),
        }
    }

    /// Validates a complete update and folds it into the open buffer.
    pub(super) fn async_submit(
        &mut self,
        name: String,
        update: super::Update,
        now_ms: u64,
    ) -> Result<(usize, Vec<Output>), Rejection> {
        let (update_norm, step) = self.check_update(&name, &update)?;
        let (buffer_size, weight_of) = {
            let settings = self.async_settings();
            (settings.buffer_size, settings.weight)
        };
        let versions = self.version.saturating_sub(update.base_version);
        let factor = weight_of.factor(versions);
        let clip = self.rules.clip_norm;
        let direction = self.direction.clone();
        // The cap on one update's weight, from what every node that joined
        // declared.
        let weight_cap = self
            .rules
            .weighting
            .cap(self.nodes.values().filter(|n| n.num_samples > 0).map(|n| n.num_samples));
        let Phase::Async(a) = &mut self.phase else {
            unreachable!("admit checked the phase");
        };
        if let Some((bound, reference)) = &a.open.norm_bound
            && update_norm > *bound
        {
            return Err(Rejection::NormOutlier {
                norm: update_norm,
                bound: *bound,
                reference: reference.clone(),
            });
        }
        if a.in_flight.get(&name).is_some_and(|f| f.task == update.round) {
            a.in_flight.remove(&name);
        } else {
            a.carried.insert(name.clone());
            tracing::info!(
                node = %name,
                task = update.round,
                base_version = update.base_version,
                staleness = versions,
                "update trained before the coordinator restarted accepted"
            );
        }
        let buffer = &mut a.open;
        let weight = match weight_cap {
            Some(cap) => (update.num_samples as f64).min(cap),
            None => update.num_samples as f64,
        };
        let clipped = clip.is_some_and(|b| update_norm > b);
        // The staleness weight scales the update, not the mean's
        // denominator: a buffer of stale updates takes a smaller step
        // (FedBuff's server update).
        let scale = step * clip_scale(update_norm, clip) * factor;
        let mut out = Vec::new();
        if let Some(target) = buffer.aggregate.accept(update.body.source.clone(), scale) {
            buffer.folding.insert(name.clone());
            out.push(Output::Fold(Box::new(FoldJob {
                round: buffer.id,
                attempt: 0,
                node: name.clone(),
                target: FoldTarget::Mean(target),
                source: update.body.source.clone(),
                weight,
                scale,
                direction,
            })));
        }
        let mut c = Contribution::new(name.clone(), &update, update_norm, clipped, weight);
        c.arrived_seconds = now_ms.saturating_sub(buffer.opened_ms) as f64 / 1000.0;
        c.staleness = Some(Staleness {
            task: update.round,
            versions,
            factor,
        });
        buffer.accepted.push(c);
        let accepted = buffer.accepted.len();
        if let Some(rec) = self.nodes.get_mut(&name) {
            rec.rounds_contributed += 1;
            rec.cuts = 0;
            rec.last_seen_ms = now_ms;
        }
        if accepted >= buffer_size {
            self.close_buffer(now_ms);
        }
        out.extend(self.fill(now_ms));
        out.extend(self.maybe_step(now_ms));
        Ok((accepted, out))
    }

    /// The open buffer is full: it waits for its step, and a new one opens.
    fn close_buffer(&mut self, now_ms: u64) {
        let Phase::Async(a) = &self.phase else {
            return;
        };
        let id = a.next_buffer;
        let fresh = self.new_buffer(id, now_ms);
        let Phase::Async(a) = &mut self.phase else {
            return;
        };
        a.next_buffer += 1;
        let full = std::mem::replace(&mut a.open, fresh);
        tracing::debug!(buffer = full.id, updates = full.accepted.len(), "buffer full");
        a.full.push_back(full);
    }

    /// Starts the next server step when none is running and the oldest
    /// closed buffer's folds are done.
    fn maybe_step(&mut self, now_ms: u64) -> Vec<Output> {
        let Phase::Async(a) = &mut self.phase else {
            return Vec::new();
        };
        if !matches!(a.step, StepState::Idle) || a.full.front().is_none_or(|b| !b.folding.is_empty()) {
            return Vec::new();
        }
        let Some(strategy) = self.strategy.take() else {
            return Vec::new();
        };
        let buffer = a.full.pop_front().expect("checked above");
        let round = self.version + 1;
        tracing::debug!(step = round, updates = buffer.accepted.len(), "server step started");
        let job = AggregationJob {
            round,
            global: self.global.clone(),
            aggregate: buffer.aggregate,
            total_nodes: self.nodes.len(),
            strategy,
            privacy: None,
            unmask: None,
            track_direction: self.settings.track_direction,
        };
        a.step = StepState::Aggregating(ClosingState {
            selected: buffer.accepted.len(),
            accepted: buffer.accepted,
            started_ms: buffer.opened_ms,
            closed_ms: now_ms,
            attempt: 0,
            secure: None,
        });
        vec![Output::Aggregate(Box::new(job))]
    }

    /// An accepted update's fold finished. A fold that failed leaves its
    /// buffer's sum unknown: that buffer's updates are dropped.
    pub(super) fn async_folded(&mut self, done: Folded, now_ms: u64) -> Vec<Output> {
        let Phase::Async(a) = &mut self.phase else {
            return Vec::new();
        };
        let open = a.open.id == done.round;
        let buffer = if open {
            Some(&mut a.open)
        } else {
            a.full.iter_mut().find(|b| b.id == done.round)
        };
        let Some(buffer) = buffer else {
            return Vec::new();
        };
        buffer.folding.remove(&done.node);
        if let Some(c) = buffer.accepted.iter_mut().find(|c| c.node == done.node) {
            c.alignment = done.alignment;
        }
        if let Err(reason) = done.result {
            tracing::error!(
                buffer = done.round,
                node = %done.node,
                reason,
                dropped = buffer.accepted.len(),
                "folding an update failed; the buffer's updates are dropped"
            );
            if open {
                // A new id: folds still running for the dropped buffer
                // must not report into its successor.
                let id = a.next_buffer;
                let fresh = self.new_buffer(id, now_ms);
                let Phase::Async(a) = &mut self.phase else {
                    unreachable!("checked above");
                };
                a.next_buffer += 1;
                a.open = fresh;
            } else {
                a.full.retain(|b| b.id != done.round);
            }
            let mut out = self.fill(now_ms);
            out.extend(self.maybe_step(now_ms));
            return out;
        }
        self.maybe_step(now_ms)
    }

    /// A server step's aggregation finished: the new version goes to be
    /// saved, or, when the step failed or its model was rejected, its
    /// buffer's updates are dropped and the next step may start.
    pub(super) fn async_aggregated(&mut self, done: Aggregated, now_ms: u64) -> Vec<Output> {
        let Phase::Async(a) = &mut self.phase else {
            return Vec::new();
        };
        if done.round != self.version + 1 || !matches!(a.step, StepState::Aggregating(_)) {
            return Vec::new();
        }
        let StepState::Aggregating(state) = std::mem::replace(&mut a.step, StepState::Idle) else {
            unreachable!("checked above");
        };
        self.strategy = Some(done.strategy);
        let round = done.round;
        let global = match done.result {
            Ok(g) => g,
            Err(failure) => {
                let left_out = matches!(failure, AggregationFailure::Rejected(_))
                    .then(|| suspect(&state.accepted))
                    .flatten();
                if let Some((node, _)) = &left_out
                    && let Some(rec) = self.nodes.get_mut(node)
                {
                    // Assigned after the others while its cool-down lasts.
                    rec.last_cut = Some(self.version);
                }
                tracing::warn!(
                    step = round,
                    reason = %failure,
                    dropped = state.accepted.len(),
                    suspect = %left_out.as_ref().map_or("-", |s| s.0.as_str()),
                    "server step failed; its buffer's updates are dropped"
                );
                let max = self.settings.max_attempts;
                let Phase::Async(a) = &mut self.phase else {
                    unreachable!("checked above");
                };
                a.failed_steps += 1;
                if max > 0 && a.failed_steps >= max {
                    let failed = a.failed_steps;
                    self.phase = Phase::Finished;
                    return vec![Output::Abort(format!(
                        "server step {round} failed {failed} times in a row ({failure}); stopping the run (the last \
                         completed step, {}, is saved)",
                        self.version
                    ))];
                }
                let mut out = self.fill(now_ms);
                out.extend(self.maybe_step(now_ms));
                return out;
            }
        };
        a.step = StepState::Saving;
        a.failed_steps = 0;
        let closed = self.commit(round, global, done.direction, done.model_norm, state, done.privacy);
        let mut out = vec![Output::Close(closed)];
        // Nodes that waited for the step start from its model (their fetch
        // waits until it is saved).
        out.extend(self.fill(now_ms));
        out
    }

    /// The new version is saved: tasks name it from now on; the next step
    /// may start, or the run is finished.
    pub(super) fn async_persisted(&mut self, now_ms: u64) -> Vec<Output> {
        let Phase::Async(a) = &mut self.phase else {
            return Vec::new();
        };
        if !matches!(a.step, StepState::Saving) {
            return Vec::new();
        }
        a.step = StepState::Idle;
        a.durable = self.version;
        if self.version >= self.settings.total_rounds {
            self.phase = Phase::Finished;
            return vec![Output::Finished];
        }
        let mut out = self.fill(now_ms);
        out.extend(self.maybe_step(now_ms));
        out
    }

    /// The update for `task` of the node `name` was refused for its content
    /// or its staleness: its task ends, and the node is given tasks after
    /// the others while its cool-down lasts.
    pub(super) fn async_refuse(&mut self, name: &str, task: u64, now_ms: u64) -> Vec<Output> {
        let Phase::Async(a) = &mut self.phase else {
            return Vec::new();
        };
        if a.in_flight.get(name).is_some_and(|f| f.task == task) {
            a.in_flight.remove(name);
            if let Some(rec) = self.nodes.get_mut(name) {
                rec.last_cut = Some(self.version);
            }
        }
        self.fill(now_ms)
    }

    /// Time passed: tasks past their deadline end, and their slots go to
    /// other nodes.
    pub(super) fn async_tick(&mut self, now_ms: u64) -> Vec<Output> {
        let Phase::Async(a) = &mut self.phase else {
            return Vec::new();
        };
        let expired: Vec<String> = a
            .in_flight
            .iter()
            .filter(|(_, f)| now_ms >= f.deadline_ms)
            .map(|(n, _)| n.clone())
            .collect();
        if expired.is_empty() {
            return Vec::new();
        }
        for name in &expired {
            a.in_flight.remove(name);
            tracing::warn!(node = %name, "task deadline passed without an update; the task goes to another node");
            if let Some(rec) = self.nodes.get_mut(name) {
                rec.last_failure = Some(self.version);
            }
        }
        self.fill(now_ms)
    }

    /// Whether `name` is training (`Some(true)`), has its update in the
    /// open buffer (`Some(false)`), or neither (`None`).
    pub(super) fn async_state_of(&self, name: &str) -> Option<bool> {
        let Phase::Async(a) = &self.phase else {
            return None;
        };
        if a.in_flight.contains_key(name) {
            Some(true)
        } else if a.open.accepted.iter().any(|c| c.node == name) {
            Some(false)
        } else {
            None
        }
    }

    /// The asynchronous run's state, for status reports (`None` in
    /// synchronous runs and before asynchronous training starts).
    pub fn async_view(&self) -> Option<AsyncView> {
        let Phase::Async(a) = &self.phase else {
            return None;
        };
        if !a.started {
            return None;
        }
        Some(AsyncView {
            in_flight: a.in_flight.len(),
            buffered: a.open.accepted.len(),
            buffer_size: self.async_settings().buffer_size,
            waiting_steps: a.full.len() + usize::from(matches!(a.step, StepState::Aggregating(_))),
            durable_version: a.durable,
        })
    }
}
