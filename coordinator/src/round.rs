//! The round state machine: membership, sampling, validation of updates,
//! aggregation and round closing, as a pure function of its inputs.
//!
//! It does no I/O and reads no clock: the driver feeds it events (a node
//! joined, connected, disconnected, submitted; time passed; a closed round was
//! persisted) with the current time in Unix milliseconds, and carries out the
//! [`Output`]s it returns (send a task, persist and evaluate a closed round,
//! stop the fleet). Unit tests drive it without sockets or threads.
//!
//! A round goes `Training → Closing → (next round's) Training`, or back to
//! `Waiting` when too few nodes are connected. It closes when every selected
//! node that is still connected has submitted (at least `min_nodes` of them),
//! or at its deadline with at least `min_nodes` updates; otherwise it is
//! retried with a fresh sample.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use fedge_common::train::{EvalMetrics, TrainMetrics};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::strategy::FedAvg;

/// Settings of the round logic.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSettings {
    pub total_rounds: u64,
    pub fraction: f64,
    pub min_nodes: usize,
    pub min_available: usize,
    pub deadline_ms: u64,
    pub seed: u64,
}

/// A training task for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub round: u64,
    /// Global model version to start from.
    pub version: u64,
    /// Seed for the node's shuffling this round.
    pub seed: u64,
    pub deadline_ms: u64,
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
}

/// What the driver must do.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send `task` to the node named `node`.
    Assign { node: String, task: Task },
    /// Persist, evaluate and publish a closed round.
    Close(ClosedRound),
    /// The last round is persisted: stop the nodes and the service.
    Finished,
}

/// An update the driver received in full and decoded.
#[derive(Debug, Clone)]
pub struct Update {
    pub round: u64,
    pub base_version: u64,
    pub num_samples: u64,
    pub delta: Vec<f32>,
    pub metrics: TrainMetrics,
    pub federated_eval: Option<EvalMetrics>,
    pub wire_bytes: u64,
}

/// Why a call was refused. Each maps to one gRPC status in the service.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::UnknownSession => write!(f, "unknown node session; join again"),
            Rejection::WrongRound { got, current: Some(c) } if got < c => {
                write!(f, "late update for round {got}; round {c} is in progress")
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
        }
    }
}

#[derive(Debug, Clone)]
struct NodeRecord {
    session: String,
    connected: bool,
    num_samples: u64,
    rounds_contributed: u64,
}

#[derive(Debug)]
struct RoundState {
    round: u64,
    attempt: u32,
    selected: BTreeSet<String>,
    accepted: Vec<Contribution>,
    aggregate: FedAvg,
    started_ms: u64,
    deadline_ms: u64,
}

#[derive(Debug)]
enum Phase {
    Waiting,
    Training(RoundState),
    Closing { round: u64 },
    Finished,
}

/// Where a run stands, for status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    Waiting,
    Training,
    Closing,
    Finished,
}

/// The coordinator's round logic. See the module docs.
#[derive(Debug)]
pub struct RoundMachine {
    settings: RoundSettings,
    version: u64,
    global: Arc<Vec<f32>>,
    nodes: BTreeMap<String, NodeRecord>,
    phase: Phase,
}

impl RoundMachine {
    /// A machine at model version 0 holding `initial` as the global model.
    pub fn new(settings: RoundSettings, initial: Vec<f32>) -> Self {
        Self {
            settings,
            version: 0,
            global: Arc::new(initial),
            nodes: BTreeMap::new(),
            phase: Phase::Waiting,
        }
    }

    /// The current global model version (rounds completed).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The current global model.
    pub fn global(&self) -> &Arc<Vec<f32>> {
        &self.global
    }

    /// The round in progress (training or closing), if any.
    pub fn current_round(&self) -> Option<u64> {
        match &self.phase {
            Phase::Training(r) => Some(r.round),
            Phase::Closing { round } => Some(*round),
            _ => None,
        }
    }

    /// The phase, for status reports.
    pub fn phase(&self) -> PhaseKind {
        match self.phase {
            Phase::Waiting => PhaseKind::Waiting,
            Phase::Training(_) => PhaseKind::Training,
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
    pub fn join(&mut self, name: &str, session: &str, num_samples: u64) {
        let rec = self.nodes.entry(name.to_owned()).or_insert(NodeRecord {
            session: String::new(),
            connected: false,
            num_samples,
            rounds_contributed: 0,
        });
        rec.session = session.to_owned();
        rec.connected = false;
        rec.num_samples = num_samples;
    }

    /// The node behind `session` opened its instruction stream. Starts a
    /// round when enough nodes are connected; hands a reconnecting node the
    /// task of the round in progress if it was selected and has not submitted.
    pub fn connect(&mut self, session: &str, now_ms: u64) -> Result<Vec<Output>, Rejection> {
        let name = self.node_of(session).ok_or(Rejection::UnknownSession)?.to_owned();
        self.nodes.get_mut(&name).expect("known node").connected = true;
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
        self.nodes.get_mut(&name).expect("known node").connected = false;
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

    /// Validates and folds a complete update. Returns the number of updates
    /// accepted in the round so far, and what to do next.
    pub fn submit(&mut self, session: &str, update: Update, now_ms: u64) -> Result<(usize, Vec<Output>), Rejection> {
        let name = self.admit(session, update.round, update.base_version)?;
        if update.delta.len() != self.global.len() {
            return Err(Rejection::WrongSize {
                got: update.delta.len(),
                expected: self.global.len(),
            });
        }
        if let Some(index) = update.delta.iter().position(|v| !v.is_finite()) {
            return Err(Rejection::NonFinite { index });
        }
        if update.num_samples == 0 {
            return Err(Rejection::NoSamples);
        }
        let Phase::Training(r) = &mut self.phase else {
            unreachable!("admit checked the phase");
        };
        r.aggregate.add(&update.delta, update.num_samples as f64);
        r.accepted.push(Contribution {
            node: name.clone(),
            num_samples: update.num_samples,
            metrics: update.metrics,
            federated_eval: update.federated_eval,
            wire_bytes: update.wire_bytes,
        });
        let accepted = r.accepted.len();
        self.nodes.get_mut(&name).expect("known node").rounds_contributed += 1;
        Ok((accepted, self.maybe_close(now_ms)))
    }

    /// Time passed: closes or retries a round whose deadline is over.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Output> {
        let Phase::Training(r) = &self.phase else {
            return Vec::new();
        };
        if now_ms < r.deadline_ms {
            return Vec::new();
        }
        if r.accepted.len() >= self.settings.min_nodes {
            tracing::info!(
                round = r.round,
                accepted = r.accepted.len(),
                selected = r.selected.len(),
                "round deadline reached; closing with the updates received"
            );
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

    /// Per-node counts of rounds contributed, by name.
    pub fn contributions_by_node(&self) -> BTreeMap<String, u64> {
        self.nodes
            .iter()
            .map(|(k, n)| (k.clone(), n.rounds_contributed))
            .collect()
    }

    fn try_start(&mut self, round: u64, attempt: u32, now_ms: u64) -> Vec<Output> {
        let mut available: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.connected && n.num_samples > 0)
            .map(|(k, _)| k.clone())
            .collect();
        if available.len() < self.settings.min_available.max(self.settings.min_nodes) {
            self.phase = Phase::Waiting;
            return Vec::new();
        }
        let wanted = ((self.settings.fraction * available.len() as f64).ceil() as usize)
            .max(self.settings.min_nodes)
            .min(available.len());
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.settings.seed, round, u64::from(attempt)));
        available.shuffle(&mut rng);
        let selected: BTreeSet<String> = available.into_iter().take(wanted).collect();
        let state = RoundState {
            round,
            attempt,
            selected,
            accepted: Vec::new(),
            aggregate: FedAvg::new(self.global.len()),
            started_ms: now_ms,
            deadline_ms: now_ms + self.settings.deadline_ms,
        };
        tracing::info!(
            round,
            attempt,
            selected = state.selected.len(),
            connected = self.connected_nodes(),
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
        self.phase = Phase::Training(state);
        out
    }

    fn task_for(&self, r: &RoundState, node: &str) -> Task {
        let node_hash = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Task {
            round: r.round,
            version: self.version,
            seed: mix(self.settings.seed, r.round, node_hash),
            deadline_ms: r.deadline_ms,
        }
    }

    fn maybe_close(&mut self, now_ms: u64) -> Vec<Output> {
        let Phase::Training(r) = &self.phase else {
            return Vec::new();
        };
        let pending = r
            .selected
            .iter()
            .filter(|n| !r.accepted.iter().any(|c| &c.node == *n))
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
        self.phase = Phase::Waiting;
        self.try_start(round, attempt, now_ms)
    }

    fn close(&mut self, now_ms: u64) -> Vec<Output> {
        let Phase::Training(r) = std::mem::replace(&mut self.phase, Phase::Waiting) else {
            return Vec::new();
        };
        self.global = Arc::new(r.aggregate.apply(&self.global));
        self.version = r.round;
        self.phase = Phase::Closing { round: r.round };
        vec![Output::Close(ClosedRound {
            round: r.round,
            version: self.version,
            global: self.global.clone(),
            contributions: r.accepted,
            selected: r.selected.len(),
            started_ms: r.started_ms,
            closed_ms: now_ms,
        })]
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

    fn settings(min_nodes: usize, fraction: f64) -> RoundSettings {
        RoundSettings {
            total_rounds: 2,
            fraction,
            min_nodes,
            min_available: min_nodes,
            deadline_ms: 1000,
            seed: 1,
        }
    }

    fn update(round: u64, version: u64, delta: Vec<f32>, n: u64) -> Update {
        Update {
            round,
            base_version: version,
            num_samples: n,
            delta,
            metrics: TrainMetrics::default(),
            federated_eval: None,
            wire_bytes: 0,
        }
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
            m.join(n, &format!("s-{n}"), 10);
            last = m.connect(&format!("s-{n}"), 0).unwrap();
        }
        last
    }

    #[test]
    fn a_round_starts_when_enough_nodes_connect_and_closes_at_quorum() {
        let mut m = RoundMachine::new(settings(3, 1.0), vec![0.0, 0.0]);
        let out = fleet(&mut m);
        assert_eq!(assigned(&out), ["a", "b", "c"]);
        assert_eq!(m.current_round(), Some(1));

        let (n, out) = m.submit("s-a", update(1, 0, vec![1.0, 2.0], 10), 5).unwrap();
        assert_eq!((n, out.len()), (1, 0));
        m.submit("s-b", update(1, 0, vec![3.0, 2.0], 30), 6).unwrap();
        let (_, out) = m.submit("s-c", update(1, 0, vec![0.0, 2.0], 60), 7).unwrap();
        let [Output::Close(closed)] = out.as_slice() else {
            panic!("expected a close, got {out:?}")
        };
        // (1*10 + 3*30 + 0*60) / 100 = 1.0; 2.0 everywhere.
        assert_eq!(*closed.global, vec![1.0, 2.0]);
        assert_eq!((closed.round, closed.version, closed.contributions.len()), (1, 1, 3));
        assert_eq!(m.phase(), PhaseKind::Closing);

        let out = m.persisted(8);
        assert_eq!(assigned(&out), ["a", "b", "c"]);
        assert_eq!(m.current_round(), Some(2));
    }

    #[test]
    fn the_last_persisted_round_finishes_the_run() {
        let mut m = RoundMachine::new(
            RoundSettings {
                min_available: 3,
                ..settings(1, 1.0)
            },
            vec![0.0],
        );
        fleet(&mut m);
        for round in 1..=2 {
            for n in ["a", "b", "c"] {
                m.submit(&format!("s-{n}"), update(round, round - 1, vec![1.0], 1), 0)
                    .unwrap();
            }
            let out = m.persisted(0);
            if round == 2 {
                assert!(matches!(out.as_slice(), [Output::Finished]));
            }
        }
        assert_eq!(*m.global().as_ref(), vec![2.0]);
        assert_eq!(m.phase(), PhaseKind::Finished);
    }

    #[test]
    fn bad_updates_are_refused_and_change_nothing() {
        let mut m = RoundMachine::new(settings(3, 1.0), vec![0.0, 0.0]);
        fleet(&mut m);
        let refused = |m: &mut RoundMachine, s: &str, u: Update| m.submit(s, u, 0).unwrap_err();
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
        m.submit("s-a", update(1, 0, vec![1.0; 2], 1), 0).unwrap();
        let e = refused(&mut m, "s-a", update(1, 0, vec![1.0; 2], 1));
        assert_eq!(e.to_string(), "node a already contributed to round 1");
        m.submit("s-b", update(1, 0, vec![1.0; 2], 1), 0).unwrap();
        let (_, out) = m.submit("s-c", update(1, 0, vec![1.0; 2], 1), 0).unwrap();
        let [Output::Close(closed)] = out.as_slice() else {
            panic!()
        };
        assert_eq!(*closed.global, vec![1.0, 1.0]);
    }

    #[test]
    fn sampling_takes_a_fraction_with_a_minimum_and_is_reproducible() {
        let run = || {
            let mut m = RoundMachine::new(
                RoundSettings {
                    min_available: 6,
                    ..settings(2, 0.3)
                },
                vec![0.0],
            );
            let mut out = Vec::new();
            for i in 0..6 {
                let n = format!("n{i}");
                m.join(&n, &n, 5);
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
        let mut m = RoundMachine::new(
            RoundSettings {
                min_available: 3,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        fleet(&mut m);
        m.submit("s-a", update(1, 0, vec![1.0], 1), 10).unwrap();
        // One update, minimum two: the deadline retries the round.
        let out = m.tick(1000);
        assert_eq!(assigned(&out).len(), 3);
        assert_eq!(m.current_round(), Some(1));
        // The retry's deadline is measured from the retry.
        assert!(m.tick(1500).is_empty());
        m.submit("s-a", update(1, 0, vec![1.0], 1), 1600).unwrap();
        m.submit("s-b", update(1, 0, vec![3.0], 1), 1700).unwrap();
        let out = m.tick(2000);
        let [Output::Close(closed)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(*closed.global, vec![2.0]);
        assert_eq!(closed.contributions.len(), 2);
    }

    #[test]
    fn a_node_that_leaves_costs_only_its_contribution() {
        let mut m = RoundMachine::new(
            RoundSettings {
                min_available: 3,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        fleet(&mut m);
        m.submit("s-a", update(1, 0, vec![1.0], 1), 0).unwrap();
        m.submit("s-b", update(1, 0, vec![3.0], 1), 0).unwrap();
        let out = m.disconnect("s-c", 5);
        let [Output::Close(closed)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(*closed.global, vec![2.0]);
    }

    #[test]
    fn a_rejoining_node_is_handed_the_current_task() {
        let mut m = RoundMachine::new(settings(3, 1.0), vec![0.0]);
        fleet(&mut m);
        assert!(m.disconnect("s-b", 1).is_empty() || m.phase() == PhaseKind::Training);
        m.join("b", "s-b2", 10);
        assert_eq!(
            m.submit("s-b", update(1, 0, vec![1.0], 1), 2).unwrap_err(),
            Rejection::UnknownSession
        );
        let out = m.connect("s-b2", 2).unwrap();
        assert_eq!(assigned(&out), ["b"]);
    }
}
