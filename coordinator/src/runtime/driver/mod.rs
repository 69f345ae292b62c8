//! The driver: one task that owns the [`RoundMachine`], feeds it the events
//! the gRPC service reports, and carries out its outputs: routing tasks to
//! nodes' instruction streams, evaluating and persisting closed rounds, and
//! publishing each new global model for fetching.
//!
//! The service talks to it over a channel of [`Command`]s, so the machine
//! needs no lock and sees events in one order. Work the machine hands out
//! (folding an update, aggregating a round and checking its model, evaluating
//! and saving a closed round) runs beside the driver, and every result comes
//! back the same way, as a [`Completion`] on one channel that the driver's
//! loop reads beside the commands: the driver keeps serving joins, fetches
//! and status while models are combined, evaluated and saved.
//!
//! - `command`: what the service says to the driver, and the driver to a node;
//! - `snapshot`: the model version fetches are served from;
//! - `traffic`: the byte and refusal counters the service keeps;
//! - `close`: a closed round's evaluation, record and checkpoint;
//! - `evaluation`: an asynchronous run's steps evaluated beside them;
//! - `report`: the run's status, metrics and per-node sums.

mod close;
mod command;
mod evaluation;
mod report;
mod snapshot;
mod traffic;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedge_common::params::Manifest;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::close::{CheckedEval, CloseJob, Persisted};
pub use self::command::{Command, Instruction, ask};
use self::evaluation::StepEvals;
use self::report::{NodeTotals, round_point};
pub use self::snapshot::ModelSnapshot;
pub use self::traffic::Traffic;
use crate::core::round::{Aggregated, FoldJob, Folded, Output, PhaseKind, RoundMachine, Task};
use crate::core::secure::SecAggOutput;
use crate::runtime::evaluator::Evaluator;
use crate::runtime::global::StoredModel;
use crate::runtime::metrics::Metrics;
use crate::runtime::store::RunStore;
use crate::{Error, Result};

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub rounds_completed: u64,
    pub final_test_accuracy: Option<f64>,
    pub final_test_loss: Option<f64>,
    pub out_dir: std::path::PathBuf,
}

/// A job the driver started, come back: each goes back into the round
/// machine ([`RoundMachine::folded`], [`RoundMachine::aggregated`],
/// [`RoundMachine::persisted`]).
#[derive(Debug)]
enum Completion {
    /// An update folded into the round's sum (on the fold thread).
    Folded(Folded),
    /// The round's aggregation, with the model check's evaluation of the
    /// new model when the run checks models.
    Aggregated(Result<(Box<Aggregated>, Option<CheckedEval>)>),
    /// A closed round evaluated, recorded and saved.
    Persisted(Result<Box<Persisted>>),
    /// An asynchronous run's saved step evaluated.
    Evaluated {
        version: u64,
        result: Result<fedge_common::task::EvalMetrics>,
        seconds: f64,
    },
}

/// Everything the driver owns.
pub struct Driver {
    machine: RoundMachine,
    commands: mpsc::UnboundedReceiver<Command>,
    snapshot: watch::Sender<Arc<ModelSnapshot>>,
    manifest: Arc<Manifest>,
    evaluator: Arc<Evaluator>,
    /// Out in the close job while a closed round is saved ([`Driver::closing`]).
    store: Option<RunStore>,
    traffic: Arc<Traffic>,
    eval_every: u32,
    total_rounds: u64,
    streams: HashMap<String, mpsc::Sender<Instruction>>,
    /// Fold jobs go to one dedicated thread (folds serialize on the
    /// round's sum anyway); one thread keeps decoding buffers in one place
    /// instead of spread over a growing blocking pool.
    fold_jobs: std::sync::mpsc::Sender<Box<FoldJob>>,
    /// Where the fold thread, aggregation and close jobs report.
    completions_tx: mpsc::UnboundedSender<Completion>,
    completions: mpsc::UnboundedReceiver<Completion>,
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
    checked_eval: Option<CheckedEval>,
    /// An asynchronous run's new version while it is saved: published for
    /// fetches once durable, while the previous one keeps being served.
    saving: Option<Arc<ModelSnapshot>>,
    /// An asynchronous step being saved, with its model, when it is due
    /// for central evaluation once saved.
    step_model: Option<(u64, Arc<Vec<f32>>)>,
    step_evals: StepEvals,
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
        let (completions_tx, completions) = mpsc::unbounded_channel();
        let (fold_jobs, jobs) = std::sync::mpsc::channel::<Box<FoldJob>>();
        let folds_tx = completions_tx.clone();
        std::thread::Builder::new()
            .name("fold".into())
            .spawn(move || {
                // Ends when the driver (the only sender) is dropped.
                for job in jobs {
                    if folds_tx.send(Completion::Folded(job.run())).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning the fold thread");
        Self {
            fold_jobs,
            completions_tx,
            completions,
            machine,
            commands,
            snapshot,
            manifest,
            evaluator: Arc::new(evaluator),
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
            saving: None,
            step_model: None,
            step_evals: StepEvals::default(),
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
        let len = self.machine.global().len();
        if !crate::runtime::global::stays_resident(len, bytes) && self.machine.global().in_memory().is_some() {
            let store = self
                .store
                .as_ref()
                .ok_or_else(|| Error::Internal("run store missing".into()))?;
            let stored = StoredModel::of_checkpoint(store, self.machine.version())?;
            self.read_global_from(Arc::new(stored)).await?;
            tracing::info!(
                model_bytes = 4 * len as u64,
                resident_model_bytes = bytes,
                "the global model is read from its checkpoint while rounds run"
            );
        }
        Ok(self)
    }

    /// The current version is durable in `stored`: the round machine and
    /// fetches read it from there from now on, and the copy in memory is freed.
    async fn read_global_from(&mut self, stored: Arc<StoredModel>) -> Result<()> {
        let version = self.machine.version();
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
            bytes = 4 * self.machine.global().len() as u64,
            "global model read from its checkpoint while the next round runs"
        );
        Ok(())
    }

    /// Runs until the last round is persisted (returns the summary) or
    /// `cancel` fires (returns `None`; every completed round is on disk: a
    /// round being saved is saved first).
    pub async fn run(mut self, cancel: CancellationToken) -> Result<Option<RunSummary>> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let outputs = tokio::select! {
                _ = cancel.cancelled() => {
                    self.settle().await;
                    tracing::info!(version = self.machine.version(), "driver stopping; completed rounds are on disk");
                    return Ok(None);
                }
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => {
                        self.settle().await;
                        return Ok(None);
                    }
                },
                Some(done) = self.completions.recv() => self.complete(done).await?,
                _ = tick.tick() => self.machine.tick(now_ms()),
            };
            let finished = self.carry_out(outputs).await?;
            self.publish_status();
            if let Some(summary) = finished {
                return Ok(Some(summary));
            }
        }
    }

    /// Waits for a close job that is saving a round, so a stop leaves that
    /// round on disk too.
    async fn settle(&mut self) {
        while self.closing() {
            match self.completions.recv().await {
                Some(Completion::Persisted(Ok(persisted))) => self.store = Some(persisted.store),
                Some(Completion::Persisted(Err(_))) | None => return,
                Some(_) => {}
            }
        }
    }

    /// Whether a close job is saving a round: it holds the run's store.
    fn closing(&self) -> bool {
        self.store.is_none()
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
            // An asynchronous task outlives a transient failure: the node
            // sends its update again.
            Command::Refuse { transient: true, .. } if self.machine.is_async() => Vec::new(),
            Command::Refuse { session, round, .. } => self.machine.refuse(&session, round, now),
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
                let refused = r.is_err();
                if let Err(e) = &r {
                    self.traffic
                        .count_refused_update(e.label(), self.machine.node_of(&session));
                }
                let _ = reply.send(r);
                // An asynchronous task ends with its refused update, and
                // the node gets a new one.
                if refused && self.machine.is_async() {
                    self.machine.refuse(&session, round, now)
                } else {
                    Vec::new()
                }
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
                        let content = e.is_content() || self.machine.is_async();
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

    /// Carries out the machine's outputs: messages go to nodes at once; jobs
    /// start beside the driver and come back as [`Completion`]s.
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
                    self.fold_jobs
                        .send(job)
                        .map_err(|_| Error::Internal("the fold thread stopped".into()))?;
                }
                Output::Aggregate(job) => {
                    let check = self
                        .model_check
                        .map(|ratio| close::ModelCheck::new(ratio, self.reference_loss, self.evaluator.clone()));
                    let done = self.completions_tx.clone();
                    tokio::spawn(async move {
                        let _ = done.send(Completion::Aggregated(close::aggregate(*job, check).await));
                    });
                }
                Output::Close(closed) => {
                    // Publish the new version first: the previous one is then
                    // freed, so evaluation and persisting run with one global
                    // model in memory. It is served only once it is durable,
                    // and tasks name it only after that.
                    let snapshot = Arc::new(ModelSnapshot::new(
                        closed.version,
                        self.manifest.clone(),
                        closed.global.clone(),
                        closed.control.clone(),
                    ));
                    if self.machine.is_async() {
                        // Nodes keep training and fetching while the step
                        // is saved: they get the previous version meanwhile.
                        self.saving = Some(snapshot);
                    } else {
                        self.snapshot.send_replace(snapshot);
                    }
                    let store = self
                        .store
                        .take()
                        .ok_or_else(|| Error::Internal("run store missing".into()))?;
                    let mut eval_due = self.eval_every > 0
                        && (closed.round.is_multiple_of(u64::from(self.eval_every))
                            || closed.round == self.total_rounds);
                    let checked = self.checked_eval.take().filter(|c| c.round == closed.round);
                    if self.machine.is_async() {
                        // Evaluated once saved, beside the next steps.
                        if eval_due && checked.is_none() {
                            self.step_model = Some((closed.version, closed.global.clone()));
                        }
                        eval_due = false;
                    }
                    // An asynchronous step's updates arrived while its
                    // buffer was open; a round's from its first task on.
                    let train_phase = if self.machine.is_async() {
                        Duration::from_millis(closed.closed_ms.saturating_sub(closed.started_ms))
                    } else {
                        self.round_started.map(|t| t.elapsed()).unwrap_or_default()
                    };
                    let job = CloseJob {
                        checked,
                        closed,
                        store,
                        evaluator: self.evaluator.clone(),
                        eval_due,
                        train_phase,
                        aggregation_seconds: self.aggregation_seconds,
                        traffic: self.traffic.clone(),
                        last_counters: self.last_counters,
                        resident_model_bytes: self.resident_model_bytes,
                    };
                    let done = self.completions_tx.clone();
                    tokio::spawn(async move {
                        let _ = done.send(Completion::Persisted(job.run().await));
                    });
                }
                Output::SecAgg { node, message } => self.send_secure(&node, message),
                Output::Finished => {
                    self.settle_step_evals().await?;
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

    /// Feeds a job's result back into the round machine.
    async fn complete(&mut self, done: Completion) -> Result<Vec<Output>> {
        Ok(match done {
            Completion::Folded(folded) => self.machine.folded(folded, now_ms()),
            Completion::Aggregated(result) => {
                let (done, checked) = result?;
                tracing::debug!(
                    round = done.round(),
                    seconds = format!("{:.3}", done.seconds()),
                    "aggregation done"
                );
                self.aggregation_seconds = done.seconds();
                self.checked_eval = checked;
                self.machine.aggregated(*done, now_ms())
            }
            Completion::Evaluated {
                version,
                result,
                seconds,
            } => {
                self.step_evaluated(version, result, seconds)?;
                Vec::new()
            }
            Completion::Persisted(result) => {
                let persisted = *result?;
                self.store = Some(persisted.store);
                self.record_step_evals();
                if let Some((version, global)) = self.step_model.take() {
                    self.evaluate_step(version, global);
                }
                match self.saving.take() {
                    Some(saved) => {
                        saved.durable.store(true, Ordering::Release);
                        self.snapshot.send_replace(saved);
                    }
                    None => self.snapshot.borrow().durable.store(true, Ordering::Release),
                }
                self.last_counters = persisted.last_counters;
                if let Some(loss) = persisted.test_loss {
                    self.reference_loss = Some(loss);
                }
                if let Some(stored) = persisted.stored {
                    self.read_global_from(stored).await?;
                }
                self.draw_curves(false).await;
                self.round_started = None;
                let rec = self.store.as_ref().and_then(|s| s.history.rounds.last()).cloned();
                if let Some(rec) = rec {
                    self.record_round(&rec);
                    close::log_round(&rec, self.total_rounds);
                }
                self.machine.persisted(now_ms())
            }
        })
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
