//! The driver: one task that owns the [`RoundMachine`], feeds it the events
//! the gRPC service reports, and carries out its outputs: routing tasks to
//! nodes' instruction streams, evaluating and persisting closed rounds, and
//! publishing each new global model for fetching.
//!
//! The service talks to it over a channel of [`Command`]s, so the machine
//! needs no lock and sees events in one order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedge_common::params::Manifest;
use fedge_common::wire::{crc32, f32_payload};
use prost::bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::core::round::{
    Aggregated, ClosedRound, FoldJob, Folded, Output, PhaseKind, Rejection, RoundMachine, Task, Update,
};
use crate::core::secure::{SecAggInput, SecAggOutput};
use crate::runtime::evaluator::Evaluator;
use crate::runtime::global::{GlobalModel, StoredModel};
use crate::runtime::metrics::Metrics;
use crate::runtime::store::{RoundRecord, RunStore, federated_eval, participant};
use crate::{Error, Result};
use fedge_common::task::EvalMetrics;

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

/// Messages from the service to the driver.
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
    /// before it was complete.
    Refuse {
        session: String,
        round: u64,
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

/// A global model version, shared by every fetch: in memory (fetches send a
/// little-endian view of the round machine's own vector, not a copy), or in
/// the checkpoint file that made it durable.
#[derive(Debug)]
pub struct ModelSnapshot {
    pub version: u64,
    pub manifest: Arc<Manifest>,
    pub params: GlobalModel,
    /// SCAFFOLD's server control variate, as values.
    pub control_values: Option<Arc<Vec<f32>>>,
    /// Checksum of the parameters' wire payload.
    pub crc32: u32,
    /// SCAFFOLD's server control variate at this version, encoded, with its checksum.
    pub control: Option<(Bytes, u32)>,
    /// Set once the version is on disk; until then it is not served.
    pub durable: std::sync::atomic::AtomicBool,
}

impl ModelSnapshot {
    /// Publishes `params` (and the server control variate, if any) as version `version`.
    pub fn new(version: u64, manifest: Arc<Manifest>, params: Arc<Vec<f32>>, control: Option<Arc<Vec<f32>>>) -> Self {
        let control_values = control.clone();
        let control = control.map(|c| {
            let bytes = f32_payload(c);
            let crc = crc32(&bytes);
            (bytes, crc)
        });
        Self {
            version,
            crc32: crc32(&f32_payload(params.clone())),
            manifest,
            params: GlobalModel::Memory(params),
            control_values,
            control,
            durable: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The same version, durable, read from `stored` (its checkpoint file).
    pub fn stored(&self, stored: Arc<StoredModel>) -> Self {
        Self {
            version: self.version,
            manifest: self.manifest.clone(),
            params: GlobalModel::Stored(stored),
            control_values: self.control_values.clone(),
            crc32: self.crc32,
            control: self.control.clone(),
            durable: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Bytes of the parameters' wire payload.
    pub fn payload_len(&self) -> usize {
        4 * self.params.len()
    }

    /// Marks the version as saved, so fetches may be served.
    pub fn mark_durable(self) -> Self {
        self.durable.store(true, Ordering::Release);
        self
    }
}

/// Counters the service updates and the driver reads per round.
#[derive(Debug, Default)]
pub struct Traffic {
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub rejected_updates: AtomicU64,
    /// Model bytes sent to each node since the last round closed.
    pub down_by_node: Mutex<BTreeMap<String, u64>>,
    /// Refused joins and updates by reason since the last round closed.
    pub refusals: Mutex<BTreeMap<&'static str, u64>>,
    /// Refused updates per node over the whole run.
    pub refused_by_node: Mutex<BTreeMap<String, u64>>,
    /// Which refusals to log (a flood's are counted, not all logged).
    log_gate: crate::runtime::log_gate::LogGate,
}

impl Traffic {
    /// Counts one refused update: in `rejected_updates`, under `reason`,
    /// and for `node` when it is known.
    pub fn count_refused_update(&self, reason: &'static str, node: Option<&str>) {
        self.rejected_updates.fetch_add(1, Ordering::Relaxed);
        self.count_refusal(reason);
        if let Some(node) = node {
            let mut map = self
                .refused_by_node
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *map.entry(node.to_owned()).or_default() += 1;
        }
    }

    /// Refused updates per node so far.
    pub fn refused_by_node(&self) -> BTreeMap<String, u64> {
        self.refused_by_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts one refusal (of a join or an update) for `reason`.
    /// Whether to log a refusal of `kind` ([`crate::runtime::log_gate`]).
    pub fn log_refusal(&self, kind: &'static str) -> bool {
        self.log_gate.allow(kind)
    }

    pub fn count_refusal(&self, reason: &'static str) {
        let mut map = self.refusals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry(reason).or_default() += 1;
    }

    /// The refusal counts since the last call.
    pub fn take_refusals(&self) -> BTreeMap<String, u64> {
        let map = std::mem::take(&mut *self.refusals.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// Counts `bytes` of model stream sent to `node`.
    pub fn count_down(&self, node: &str, bytes: u64) {
        self.bytes_down.fetch_add(bytes, Ordering::Relaxed);
        let mut map = self
            .down_by_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry(node.to_owned()).or_default() += bytes;
    }

    /// The per-node downlink counts since the last call.
    pub fn take_down_by_node(&self) -> BTreeMap<String, u64> {
        std::mem::take(
            &mut *self
                .down_by_node
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub rounds_completed: u64,
    pub final_test_accuracy: Option<f64>,
    pub final_test_loss: Option<f64>,
    pub out_dir: std::path::PathBuf,
}

/// Everything the driver owns.
pub struct Driver {
    pub machine: RoundMachine,
    pub commands: mpsc::UnboundedReceiver<Command>,
    pub snapshot: watch::Sender<Arc<ModelSnapshot>>,
    pub manifest: Arc<Manifest>,
    pub evaluator: Evaluator,
    pub store: Option<RunStore>,
    pub traffic: Arc<Traffic>,
    pub eval_every: u32,
    pub total_rounds: u64,
    streams: HashMap<String, mpsc::Sender<Instruction>>,
    /// Fold jobs go to one dedicated thread (folds serialize on the
    /// round's sum anyway); one thread keeps decoding buffers in one place
    /// instead of spread over a growing blocking pool.
    fold_jobs: std::sync::mpsc::Sender<Box<FoldJob>>,
    folds_rx: mpsc::UnboundedReceiver<Folded>,
    round_started: Option<Instant>,
    last_counters: (u64, u64, u64),
    aggregation_seconds: f64,
    status: Option<watch::Sender<crate::runtime::status::Status>>,
    metrics: Arc<Metrics>,
    /// Per-node sums over the run's rounds, for status reports.
    node_totals: BTreeMap<String, NodeTotals>,
    /// When the status was last published, and the model version and phase it showed.
    published: Option<(Instant, u64, PhaseKind)>,
    /// The curves being drawn, if a drawing is still running.
    curves: Option<tokio::task::JoinHandle<()>>,
    /// Global models larger than this are read from their checkpoint while
    /// a round runs ([`crate::runtime::global`]).
    resident_model_bytes: u64,
    /// Each new global model's central loss may be at most this many times
    /// the last committed model's (`strategy.max_loss_ratio`), if checked.
    model_check: Option<f64>,
    /// The last committed model's central test loss.
    reference_loss: Option<f64>,
    /// The evaluation the check made of the round being closed.
    checked_eval: Option<(u64, EvalMetrics, Duration)>,
}

/// A node's sums over the rounds it took part in.
#[derive(Debug, Default, Clone)]
struct NodeTotals {
    bytes_up: u64,
    bytes_down: u64,
    last_train_seconds: Option<f64>,
}

impl NodeTotals {
    /// Adds a persisted round's per-node figures to `totals`.
    fn absorb(totals: &mut BTreeMap<String, NodeTotals>, rec: &RoundRecord) {
        for p in &rec.participants {
            let t = totals.entry(p.node.clone()).or_default();
            t.bytes_up += p.bytes_up;
            t.last_train_seconds = Some(p.train_seconds);
        }
        for (node, bytes) in &rec.bytes_down_by_node {
            totals.entry(node.clone()).or_default().bytes_down += bytes;
        }
    }
}

/// The gauges that describe the last completed round.
fn show_last_round(m: &Metrics, rec: &RoundRecord) {
    m.participants.set(rec.participants.len() as i64);
    if let (Some(a), Some(l)) = (rec.test_accuracy, rec.test_loss) {
        m.test_accuracy.set(a);
        m.test_loss.set(l);
    }
    if let Some(p) = &rec.privacy {
        m.privacy_epsilon.set(p.epsilon);
    }
}

fn round_point(rec: &RoundRecord) -> crate::runtime::status::RoundPoint {
    crate::runtime::status::RoundPoint {
        round: rec.round,
        participants: rec.participants.len(),
        test_accuracy: rec.test_accuracy,
        test_loss: rec.test_loss,
        federated_accuracy: rec.federated_accuracy,
        federated_loss: rec.federated_loss,
        bytes_up: rec.bytes_up,
        bytes_down: rec.bytes_down,
        round_seconds: rec.round_seconds,
        rejected_updates: rec.rejected_updates,
        epsilon: rec.privacy.as_ref().map(|p| p.epsilon),
        secure_survivors: rec.secure_aggregation.as_ref().map(|s| s.survivors),
        secure_dropped: rec.secure_aggregation.as_ref().map(|s| s.dropped),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        machine: RoundMachine,
        commands: mpsc::UnboundedReceiver<Command>,
        snapshot: watch::Sender<Arc<ModelSnapshot>>,
        manifest: Arc<Manifest>,
        evaluator: Evaluator,
        store: RunStore,
        traffic: Arc<Traffic>,
        eval_every: u32,
        total_rounds: u64,
    ) -> Self {
        let (folds_tx, folds_rx) = mpsc::unbounded_channel();
        let (fold_jobs, jobs) = std::sync::mpsc::channel::<Box<FoldJob>>();
        std::thread::Builder::new()
            .name("fold".into())
            .spawn(move || {
                // Ends when the driver (the only sender) is dropped.
                for job in jobs {
                    if folds_tx.send(job.run()).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning the fold thread");
        Self {
            fold_jobs,
            folds_rx,
            machine,
            commands,
            snapshot,
            manifest,
            evaluator,
            store: Some(store),
            traffic,
            eval_every,
            total_rounds,
            streams: HashMap::new(),
            round_started: None,
            last_counters: (0, 0, 0),
            published: None,
            curves: None,
            aggregation_seconds: 0.0,
            status: None,
            metrics: Arc::new(Metrics::new()),
            node_totals: BTreeMap::new(),
            resident_model_bytes: u64::MAX,
            model_check: None,
            reference_loss: None,
            checked_eval: None,
        }
    }

    /// Checks each new global model before it is committed: its central
    /// loss may be at most `ratio` times the last committed model's. The
    /// reference is the last round's recorded loss, or the current model's,
    /// evaluated now.
    pub async fn with_model_check(mut self, ratio: f64) -> Result<Self> {
        let recorded = self
            .store
            .as_ref()
            .and_then(|s| s.history.rounds.last())
            .and_then(|r| r.test_loss);
        self.reference_loss = match (recorded, self.machine.global().in_memory()) {
            (Some(loss), _) => Some(loss),
            (None, Some(global)) => Some(self.evaluator.evaluate(global.clone()).await?.loss),
            (None, None) => None,
        };
        tracing::info!(
            max_loss_ratio = ratio,
            reference_loss = self.reference_loss.map(|l| format!("{l:.4}")),
            "each new global model is checked before it is committed"
        );
        self.model_check = Some(ratio);
        Ok(self)
    }

    /// Reads global models larger than `bytes` from their checkpoint while
    /// rounds run, starting with the current one ([`crate::runtime::global`]).
    pub async fn with_resident_model_bytes(mut self, bytes: u64) -> Result<Self> {
        self.resident_model_bytes = bytes;
        self.store_large_global().await?;
        if matches!(self.machine.global(), GlobalModel::Stored(_)) {
            tracing::info!(
                model_bytes = 4 * self.machine.global().len() as u64,
                resident_model_bytes = bytes,
                "the global model is read from its checkpoint while rounds run"
            );
        }
        Ok(self)
    }

    /// Once the current version is durable: when it is larger than
    /// `resident_model_bytes`, the round machine and fetches read it from its
    /// checkpoint from now on, and the copy in memory is freed.
    async fn store_large_global(&mut self) -> Result<()> {
        let GlobalModel::Memory(values) = self.machine.global() else {
            return Ok(());
        };
        if crate::runtime::global::stays_resident(values.len(), self.resident_model_bytes) {
            return Ok(());
        }
        let bytes = 4 * values.len() as u64;
        let version = self.machine.version();
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| Error::Internal("run store missing".into()))?;
        let path = store.checkpoint_file(version);
        let manifest = self.manifest.clone();
        let stored = tokio::task::spawn_blocking(move || {
            StoredModel::open(&path, &manifest, fedge_common::checkpoint::MODEL_PREFIX)
        })
        .await
        .map_err(|e| Error::Internal(format!("opening the checkpoint failed: {e}")))??;
        let stored = Arc::new(stored);
        let published = self.snapshot.borrow().stored(stored.clone());
        if published.version != version {
            return Err(Error::Internal(format!(
                "published model version {} is not the machine's {version}",
                published.version
            )));
        }
        self.snapshot.send_replace(Arc::new(published));
        self.machine.store_global(stored)?;
        crate::runtime::memory::release_free_memory_off_runtime().await;
        tracing::debug!(
            version,
            bytes,
            "global model read from its checkpoint while the next round runs"
        );
        Ok(())
    }

    /// Publishes the run's [`crate::runtime::status::Status`] on `tx` after every
    /// event, and records into `metrics`; both start from the rounds a
    /// resumed run already holds.
    pub fn with_status(mut self, tx: watch::Sender<crate::runtime::status::Status>, metrics: Arc<Metrics>) -> Self {
        if let Some(store) = &self.store {
            for rec in &store.history.rounds {
                NodeTotals::absorb(&mut self.node_totals, rec);
            }
            if let Some(last) = store.history.rounds.last() {
                show_last_round(&metrics, last);
            }
        }
        metrics.total_rounds.set(self.total_rounds as i64);
        self.status = Some(tx);
        self.metrics = metrics;
        self
    }

    /// Records a persisted round into the metrics and the per-node totals.
    fn record_round(&mut self, rec: &RoundRecord) {
        NodeTotals::absorb(&mut self.node_totals, rec);
        let m = &self.metrics;
        show_last_round(m, rec);
        if rec.test_accuracy.is_some() {
            m.eval_seconds.observe(rec.eval_seconds);
        }
        m.bytes_up.inc_by(rec.bytes_up);
        m.bytes_down.inc_by(rec.bytes_down);
        m.count_refusals(&rec.refusals);
        m.round_seconds.observe(rec.round_seconds);
        m.aggregation_seconds.observe(rec.aggregation_seconds);
    }

    fn publish_status(&mut self) {
        let m = &self.metrics;
        m.rounds_completed.set(self.machine.version() as i64);
        m.round.set(self.machine.current_round().unwrap_or(0) as i64);
        m.connected_nodes.set(self.machine.connected_nodes() as i64);
        let Some(tx) = &self.status else { return };
        // The node table costs O(nodes): rebuild it at most every 200 ms
        // (the driver's tick publishes what the skipped events changed),
        // and at once when a round completes or the phase changes.
        let (version, phase_kind) = (self.machine.version(), self.machine.phase());
        if self
            .published
            .is_some_and(|(at, v, p)| at.elapsed() < Duration::from_millis(200) && v == version && p == phase_kind)
        {
            return;
        }
        self.published = Some((Instant::now(), version, phase_kind));
        let history = self
            .store
            .as_ref()
            .map(|s| s.history.rounds.as_slice())
            .unwrap_or_default();
        let last = history.last();
        let rejected = self.traffic.refused_by_node();
        let nodes: Vec<crate::runtime::status::NodeStatus> = self
            .machine
            .node_views()
            .into_iter()
            .map(|v| {
                let totals = self.node_totals.get(&v.name).cloned().unwrap_or_default();
                crate::runtime::status::NodeStatus {
                    rejected_updates: rejected.get(&v.name).copied().unwrap_or(0),
                    name: v.name,
                    state: v.state.into(),
                    connected: v.connected,
                    last_seen_ms: v.last_seen_ms,
                    rounds_contributed: v.rounds_contributed,
                    num_samples: v.num_samples,
                    last_train_seconds: totals.last_train_seconds,
                    bytes_up: totals.bytes_up,
                    bytes_down: totals.bytes_down,
                }
            })
            .collect();
        let privacy = self.machine.privacy().map(|p| crate::runtime::status::PrivacyStatus {
            noise: p.mode.name().into(),
            noise_multiplier: p.noise_multiplier,
            clip_norm: p.clip,
            epsilon: p.epsilon(),
            delta: p.delta,
            epsilon_budget: p.budget,
        });
        let secure = self.machine.secure_settings().map(|s| {
            let current = self.machine.secure_round();
            crate::runtime::status::SecureStatus {
                neighbours: s.neighbours,
                max_dropout: s.max_dropout,
                threshold: current
                    .map(|(_, t)| t)
                    .or_else(|| last.and_then(|r| r.secure_aggregation.as_ref()).map(|r| r.threshold)),
                step: current.map(|(step, _)| step.name().to_owned()),
            }
        });
        let phase = crate::runtime::status::phase_label(self.machine.phase());
        // Readers only ever borrow the latest status; none waits for changes.
        tx.send_modify(|s| {
            s.phase = phase.into();
            s.round = self.machine.current_round();
            s.completed_rounds = self.machine.version();
            s.connected_nodes = self.machine.connected_nodes();
            s.last_test_accuracy = last.and_then(|r| r.test_accuracy);
            s.last_test_loss = last.and_then(|r| r.test_loss);
            s.nodes = nodes;
            if privacy.is_some() {
                s.privacy = privacy;
            }
            s.secure_aggregation = secure;
            // The history only grows: add the rounds not shown yet.
            let shown = s.rounds.len();
            s.rounds.extend(history.iter().skip(shown).map(round_point));
        });
    }

    /// Runs until the last round is persisted (returns the summary) or
    /// `cancel` fires (returns `None`; every completed round is already on disk).
    pub async fn run(mut self, cancel: CancellationToken) -> Result<Option<RunSummary>> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let outputs = tokio::select! {
                _ = cancel.cancelled() => {
                    tracing::info!(version = self.machine.version(), "driver stopping; completed rounds are on disk");
                    return Ok(None);
                }
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => return Ok(None),
                },
                Some(done) = self.folds_rx.recv() => self.machine.folded(done, now_ms()),
                _ = tick.tick() => self.machine.tick(now_ms()),
            };
            let finished = self.carry_out(outputs).await?;
            self.publish_status();
            if let Some(summary) = finished {
                return Ok(Some(summary));
            }
        }
    }

    fn handle(&mut self, cmd: Command) -> Vec<Output> {
        let now = now_ms();
        match cmd {
            Command::Join {
                name,
                num_samples,
                previous,
                reply,
            } => {
                let session = uuid::Uuid::new_v4().to_string();
                let old = self.machine.session_of(&name).map(str::to_owned);
                match self
                    .machine
                    .join(&name, &session, num_samples, previous.as_deref(), now)
                {
                    Ok(()) => {
                        // A rejoin replaces the node's previous session and stream.
                        if let Some(old) = old {
                            self.streams.remove(&old);
                        }
                        tracing::info!(node = %name, num_samples, "node joined");
                        let _ = reply.send(Ok(session));
                    }
                    Err(e) => {
                        if self.traffic.log_refusal("join refused") {
                            tracing::warn!(node = %name, reason = %e, "join refused");
                        }
                        self.traffic.count_refusal(e.label());
                        let _ = reply.send(Err(e));
                    }
                }
                Vec::new()
            }
            Command::Connect { session, stream, reply } => match self.machine.connect(&session, now) {
                Ok(out) => {
                    self.streams.insert(session, stream);
                    let _ = reply.send(Ok(()));
                    out
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    Vec::new()
                }
            },
            Command::Disconnect { session } => {
                if self.streams.remove(&session).is_some() {
                    if let Some(node) = self.machine.node_of(&session) {
                        tracing::info!(node, "node disconnected");
                    }
                    self.machine.disconnect(&session, now)
                } else {
                    Vec::new()
                }
            }
            Command::Refuse { session, round } => self.machine.refuse(&session, round, now),
            Command::Identify { session, reply } => {
                let _ = reply.send(self.machine.node_of(&session).map(str::to_owned));
                Vec::new()
            }
            Command::AdmitFetch {
                session,
                version,
                reply,
            } => {
                let r = self.machine.admit_fetch(&session, version);
                if let Err(e) = &r {
                    self.traffic.count_refusal(e.label());
                }
                let _ = reply.send(r);
                Vec::new()
            }
            Command::Admit {
                session,
                round,
                base_version,
                reply,
            } => {
                let r = self.machine.admit(&session, round, base_version);
                if let Err(e) = &r {
                    self.traffic
                        .count_refused_update(e.label(), self.machine.node_of(&session));
                }
                let _ = reply.send(r);
                Vec::new()
            }
            Command::SecAgg {
                session,
                round,
                input,
                bytes,
                reply,
            } => match self.machine.secure_message(&session, round, input, bytes, now) {
                Ok(out) => {
                    let _ = reply.send(Ok(()));
                    out
                }
                Err(e) => {
                    self.traffic.count_refusal(e.label());
                    let _ = reply.send(Err(e));
                    Vec::new()
                }
            },
            Command::Submit { session, update, reply } => {
                let node = self.machine.node_of(&session).unwrap_or("?").to_owned();
                let round = update.round;
                match self.machine.submit(&session, update, now) {
                    Ok((accepted, out)) => {
                        tracing::info!(node = %node, round, accepted, "update accepted");
                        self.metrics.updates_accepted.inc();
                        if let Some(started) = self.round_started {
                            self.metrics.update_latency.observe(started.elapsed().as_secs_f64());
                        }
                        let _ = reply.send(Ok(accepted));
                        out
                    }
                    Err(e) => {
                        self.traffic.count_refused_update(e.label(), Some(&node));
                        let content = e.is_content();
                        let _ = reply.send(Err(e));
                        if content {
                            self.machine.refuse(&session, round, now)
                        } else {
                            Vec::new()
                        }
                    }
                }
            }
        }
    }

    async fn carry_out(&mut self, outputs: Vec<Output>) -> Result<Option<RunSummary>> {
        let mut queue: VecDeque<Output> = outputs.into();
        while let Some(out) = queue.pop_front() {
            match out {
                Output::Assign { node, task } => {
                    if self.round_started.is_none() {
                        self.round_started = Some(Instant::now());
                    }
                    self.send_task(&node, &task);
                }
                Output::Fold(job) => {
                    // Folds run beside the driver, on the fold thread;
                    // results come back through `folds_rx`.
                    self.fold_jobs
                        .send(job)
                        .map_err(|_| Error::Internal("the fold thread stopped".into()))?;
                }
                Output::Aggregate(job) => {
                    let round = job.round();
                    let mut done = tokio::task::spawn_blocking(move || job.run())
                        .await
                        .map_err(|e| Error::Internal(format!("aggregation task failed: {e}")))?;
                    tracing::debug!(round, seconds = format!("{:.3}", done.seconds()), "aggregation done");
                    self.aggregation_seconds = done.seconds();
                    self.check_model(round, &mut done).await?;
                    queue.extend(self.machine.aggregated(done, now_ms()));
                }
                Output::Close(closed) => {
                    self.close_round(closed).await?;
                    self.store_large_global().await?;
                    self.round_started = None;
                    queue.extend(self.machine.persisted(now_ms()));
                }
                Output::SecAgg { node, message } => self.send_secure(&node, message),
                Output::Finished => {
                    self.draw_curves(true).await;
                    return self.finish().map(Some);
                }
                Output::Abort(reason) => {
                    tracing::error!(reason, "run stopped");
                    self.stop_nodes(&reason);
                    return Err(Error::RunFailed(reason));
                }
            }
        }
        Ok(None)
    }

    /// The check of a new global model (`strategy.max_loss_ratio`): its
    /// central loss against the last committed model's. A model that fails
    /// is rejected (the round is retried without the update the machine
    /// suspects most); one that passes keeps its evaluation for the round's record.
    async fn check_model(&mut self, round: u64, done: &mut Aggregated) -> Result<()> {
        let (Some(ratio), Some(candidate)) = (self.model_check, done.candidate().cloned()) else {
            return Ok(());
        };
        crate::runtime::memory::release_free_memory_off_runtime().await;
        let started = Instant::now();
        let eval = self.evaluator.evaluate(candidate).await?;
        match self.reference_loss {
            Some(reference) if eval.loss.is_nan() || eval.loss > ratio * reference => done.reject(format!(
                "the new global model's central loss {:.4} is more than {ratio} times the last model's {reference:.4} \
                 (strategy.max_loss_ratio)",
                eval.loss
            )),
            _ => self.checked_eval = Some((round, eval, started.elapsed())),
        }
        Ok(())
    }

    fn send_task(&mut self, node: &str, task: &Task) {
        let Some(session) = self.machine.session_of(node) else {
            return;
        };
        let Some(stream) = self.streams.get(session) else {
            tracing::warn!(node, round = task.round, "selected node has no open instruction stream");
            return;
        };
        if stream.try_send(Instruction::Train(task.clone())).is_err() {
            tracing::warn!(
                node,
                round = task.round,
                "could not queue task on the node's instruction stream"
            );
        }
    }

    /// Queues a secure-aggregation message on the node's instruction stream.
    fn send_secure(&mut self, node: &str, message: SecAggOutput) {
        let stream = self.machine.session_of(node).and_then(|s| self.streams.get(s));
        match stream {
            Some(stream) if stream.try_send(Instruction::SecAgg(message)).is_ok() => {}
            _ => tracing::warn!(
                node,
                "could not queue a secure aggregation message; the node counts as dropped"
            ),
        }
    }

    async fn close_round(&mut self, closed: ClosedRound) -> Result<()> {
        // Publish the new version first: the previous one is then freed, so
        // evaluation and persisting run with one global model in memory.
        // It is served only once it is durable (below), and tasks name it
        // only after that.
        let snapshot = ModelSnapshot::new(
            closed.version,
            self.manifest.clone(),
            closed.global.clone(),
            closed.control.clone(),
        );
        self.snapshot.send_replace(Arc::new(snapshot));
        let train_phase = self.round_started.map(|t| t.elapsed()).unwrap_or_default();
        let eval_due = self.eval_every > 0
            && (closed.round.is_multiple_of(u64::from(self.eval_every)) || closed.round == self.total_rounds);
        let eval_start = Instant::now();
        // The check's evaluation is the round's: it counts as evaluation
        // time, not as the training phase it ran in.
        let checked = self.checked_eval.take().filter(|(r, _, _)| *r == closed.round);
        let checked_seconds = checked.as_ref().map_or(Duration::ZERO, |(_, _, d)| *d);
        let train_phase = train_phase.saturating_sub(checked_seconds);
        let eval = if let Some((_, e, _)) = checked {
            Some(e)
        } else if eval_due {
            // The round's uploads are over: return what they freed before
            // the evaluation's activations are allocated beside the model.
            crate::runtime::memory::release_free_memory_off_runtime().await;
            Some(self.evaluator.evaluate(closed.global.clone()).await?)
        } else {
            None
        };
        let eval_seconds = (eval_start.elapsed() + checked_seconds).as_secs_f64();
        if let Some(e) = eval {
            self.reference_loss = Some(e.loss);
        }
        let up = self.traffic.bytes_up.load(Ordering::Relaxed);
        let down = self.traffic.bytes_down.load(Ordering::Relaxed);
        let rejected = self.traffic.rejected_updates.load(Ordering::Relaxed);
        let (up0, down0, rej0) = std::mem::replace(&mut self.last_counters, (up, down, rejected));
        let federated = federated_eval(&closed.contributions);
        let down_by_node = self.traffic.take_down_by_node();
        let record = RoundRecord {
            round: closed.round,
            selected: closed.selected,
            participants: closed
                .contributions
                .iter()
                .map(|c| participant(c, down_by_node.get(&c.node).copied().unwrap_or(0)))
                .collect(),
            bytes_down_by_node: down_by_node,
            test_loss: eval.map(|e| e.loss),
            test_accuracy: eval.map(|e| e.accuracy),
            federated_loss: federated.map(|e| e.loss),
            federated_accuracy: federated.map(|e| e.accuracy),
            federated_examples: federated.map_or(0, |e| e.examples),
            bytes_up: up - up0,
            bytes_down: down - down0,
            rejected_updates: rejected - rej0,
            refusals: self.traffic.take_refusals(),
            train_phase_seconds: train_phase.as_secs_f64(),
            aggregation_seconds: self.aggregation_seconds,
            eval_seconds,
            // Set when the round is persisted.
            checkpoint_seconds: 0.0,
            round_seconds: train_phase.as_secs_f64() + eval_seconds,
            privacy: closed.privacy.clone(),
            secure_aggregation: closed.secure.clone(),
        };
        let mut store = self
            .store
            .take()
            .ok_or_else(|| Error::Internal("run store missing".into()))?;
        let persist_start = Instant::now();
        let closed_for_store = closed.clone();
        let (store, res) = tokio::task::spawn_blocking(move || {
            let res = store.persist_round(&closed_for_store, record);
            (store, res)
        })
        .await
        .map_err(|e| Error::Internal(format!("checkpoint task failed: {e}")))?;
        self.store = Some(store);
        res?;
        self.snapshot.borrow().durable.store(true, Ordering::Release);
        // The round's update chunks and the previous model were freed in
        // the threads that handled them; return that memory before the
        // next round's sum is built.
        crate::runtime::memory::release_free_memory_off_runtime().await;
        self.draw_curves(false).await;
        let checkpoint_seconds = persist_start.elapsed().as_secs_f64();
        if let Some(last) = self.store.as_mut().and_then(|s| s.history.rounds.last_mut()) {
            last.checkpoint_seconds = checkpoint_seconds;
        }
        let rec = self.store.as_ref().and_then(|s| s.history.rounds.last()).cloned();
        if let Some(rec) = rec {
            self.record_round(&rec);
            tracing::info!(
                round = rec.round,
                of = self.total_rounds,
                participants = rec.participants.len(),
                test_accuracy = rec
                    .test_accuracy
                    .map(|a| format!("{:.2}%", a * 100.0))
                    .unwrap_or_else(|| "-".into()),
                test_loss = rec.test_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into()),
                federated_accuracy = rec
                    .federated_accuracy
                    .map(|a| format!("{:.2}%", a * 100.0))
                    .unwrap_or_else(|| "-".into()),
                round_s = format!("{:.2}", rec.round_seconds + checkpoint_seconds),
                bytes_up = rec.bytes_up,
                bytes_down = rec.bytes_down,
                update_payload_bytes = rec.participants.iter().map(|p| p.payload_bytes).sum::<u64>(),
                epsilon = rec.privacy.as_ref().map(|p| format!("{:.3}", p.epsilon)),
                "round complete"
            );
        }
        Ok(())
    }

    /// Redraws `curves.svg`/`.png` off the round's path: the next round
    /// starts while they are drawn, and a round that closes while the last
    /// drawing is still running leaves it to the next one. With `settle`
    /// (the run's end) it waits for that drawing and draws every round.
    async fn draw_curves(&mut self, settle: bool) {
        if let Some(pending) = self.curves.take() {
            if settle || pending.is_finished() {
                let _ = pending.await;
            } else {
                self.curves = Some(pending);
                return;
            }
        }
        let Some(store) = &self.store else { return };
        let dir = store.dir().to_path_buf();
        let rounds: Vec<_> = store.history.rounds.iter().map(round_point).collect();
        let drawing = tokio::task::spawn_blocking(move || {
            // Curves are a convenience: a failure to draw them is logged, not fatal.
            if let Err(e) = crate::runtime::plots::write(&dir, &rounds) {
                tracing::warn!(error = %e, "curves not drawn");
            }
        });
        if settle {
            let _ = drawing.await;
        } else {
            self.curves = Some(drawing);
        }
    }

    fn stop_nodes(&self, reason: &str) {
        for stream in self.streams.values() {
            let _ = stream.try_send(Instruction::Stop(reason.into()));
        }
    }

    fn finish(&mut self) -> Result<RunSummary> {
        let stop_reason = self.machine.stop_reason().map(str::to_owned);
        self.stop_nodes(stop_reason.as_deref().unwrap_or("run complete"));
        let store = self
            .store
            .as_mut()
            .ok_or_else(|| Error::Internal("run store missing".into()))?;
        store.history.stop_reason = stop_reason;
        store.finish()?;
        let last = store.history.rounds.last();
        let summary = RunSummary {
            rounds_completed: self.machine.version(),
            final_test_accuracy: last.and_then(|r| r.test_accuracy),
            final_test_loss: last.and_then(|r| r.test_loss),
            out_dir: store.dir().to_path_buf(),
        };
        tracing::info!(
            rounds = summary.rounds_completed,
            test_accuracy = summary.final_test_accuracy.map(|a| format!("{:.2}%", a * 100.0)).unwrap_or_else(|| "-".into()),
            model = %store.model_path().display(),
            peak_rss_mb = store.history.peak_rss_bytes.map(|b| b / (1 << 20)),
            "run complete; global model saved"
        );
        Ok(summary)
    }
}
