//! In-process simulation of a fleet (`coordinator simulate`): thousands of
//! virtual nodes in this process, for research runs that need more nodes
//! than a machine can hold as processes.
//!
//! Nothing of the run is simulated but the network and the processes:
//!
//! - the run is assembled as a served one ([`crate::assemble`]): the same
//!   [`Driver`](crate::runtime::driver::Driver), round machine, strategy, evaluator,
//!   store (checkpoints, `run.json`, resume), status, dashboard and metrics;
//! - a virtual node joins and connects through the driver's own
//!   [`Command`]s, reads its tasks from an instruction stream like a
//!   daemon's, and submits its update through the same intake checks as
//!   one that arrived over gRPC (manifest size, checksum, finiteness, norm);
//! - its training is the edge node's own job ([`fedge_learn::job::LocalModel`]
//!   and [`fedge_learn::job::NodeState`]): the same local training,
//!   node-side privacy and update encoding (with error feedback).
//!
//! What is shared: the training split is loaded once and each node holds
//! only the indices of its share ([`Shares`]); a node's samples are copied
//! out when one of a pool of training threads picks up its job, and freed
//! after. Each training thread owns one model; a virtual node owns no
//! tensors between rounds. Node state that must outlive a round (SCAFFOLD's
//! control variate, error-feedback residuals) is kept in
//! `OUT_DIR/nodes/NAME/`, so memory does not grow with the number of nodes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedge_common::codec::Codec;
use fedge_common::task::Algorithm;
use fedge_common::wire::crc32;
use fedge_learn::data::{Dataset, Split};
use fedge_learn::job::{AdversaryConfig, Job, LocalModel, NodeState, TrainResult, Work};
use fedge_learn::model::ModelKind;
use fedge_learn::train::Pace;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::api::intake::{Intake, SpoolBudget};
use crate::core::round::{Body, Rejection, Task, Update, UpdateKind};
use crate::runtime::driver::{Command, Instruction, ModelSnapshot, Traffic};
use crate::server::{Assembled, Parts, assemble, driver_outcome, prepare_http, spawn_http, stop_driver};
use crate::{CoordinatorConfig, Error, Result, RunSummary};

/// Instructions a virtual node may have queued (a task, and a stop).
const INSTRUCTION_QUEUE: usize = 4;

/// The training split, held once, and each node's share of it.
#[derive(Debug)]
pub struct Shares {
    /// `u8` images, `[N, C, H, W]` flattened.
    images: Vec<u8>,
    labels: Vec<i64>,
    shape: [i64; 3],
    classes: Vec<String>,
    /// Each node's sample indices.
    parts: Vec<Vec<i64>>,
}

impl Shares {
    /// Loads `config.data`'s training split and splits it among the
    /// configured number of nodes (`simulation.partition`, seeded by `seed`).
    pub fn load(config: &CoordinatorConfig) -> Result<Self> {
        let sim = &config.simulation;
        let scheme = sim.scheme()?;
        let data = config.data.source()?.load(Split::Train)?;
        let labels = data.label_vec();
        let parts = scheme.split(&labels, sim.nodes as usize, config.seed)?;
        let shape = data.shape();
        let images = Vec::<u8>::try_from(&data.images.flatten(0, -1))
            .map_err(|e| Error::Internal(format!("reading the training images: {e}")))?;
        Ok(Self {
            images,
            labels,
            shape,
            classes: data.classes.clone(),
            parts,
        })
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.parts.len()
    }

    /// Samples of node `i`.
    pub fn len_of(&self, i: usize) -> usize {
        self.parts[i].len()
    }

    /// Node `i`'s samples, copied out as a data set of its own.
    pub fn dataset(&self, i: usize) -> Dataset {
        let per = (self.shape[0] * self.shape[1] * self.shape[2]) as usize;
        let idx = &self.parts[i];
        let mut images = Vec::with_capacity(idx.len() * per);
        let mut labels = Vec::with_capacity(idx.len());
        for &j in idx {
            let j = j as usize;
            images.extend_from_slice(&self.images[j * per..(j + 1) * per]);
            labels.push(self.labels[j]);
        }
        Dataset::from_raw(&images, &labels, self.shape, self.classes.clone())
    }
}

/// The name of virtual node `i` (0-based).
pub fn node_name(i: usize) -> String {
    format!("sim-{}", i + 1)
}

/// One job for the training pool.
struct PoolJob {
    node: usize,
    job: Job,
    reply: oneshot::Sender<fedge_learn::Result<TrainResult>>,
}

/// Training threads shared by every virtual node: each owns one model and
/// runs one node's job at a time.
struct Pool {
    jobs: std::sync::mpsc::Sender<PoolJob>,
    cancel: Arc<AtomicBool>,
}

impl Pool {
    fn spawn(shares: Arc<Shares>, trainers: usize, threads: usize, state_root: PathBuf) -> Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<PoolJob>();
        let rx = Arc::new(Mutex::new(rx));
        let cancel = Arc::new(AtomicBool::new(false));
        for t in 0..trainers {
            let (rx, shares, cancel, root) = (rx.clone(), shares.clone(), cancel.clone(), state_root.clone());
            std::thread::Builder::new()
                .name(format!("sim-trainer-{t}"))
                .spawn(move || {
                    tch::set_num_threads(threads as i32);
                    let mut model = LocalModel::new(tch::Device::Cpu);
                    let adversary = AdversaryConfig::default();
                    loop {
                        // The lock is held only while waiting for the next job.
                        let next = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
                        let Ok(PoolJob { node, job, reply }) = next else {
                            return;
                        };
                        let data = shares.dataset(node);
                        // State that outlives the round lives on disk, read back per job.
                        let keeps_state = job.codec.uses_error_feedback() || job.hyper.algorithm == Algorithm::Scaffold;
                        let mut state = NodeState::new(keeps_state.then(|| root.join(node_name(node))));
                        let work = Work {
                            data: &data,
                            held_out: None,
                            cancel: &cancel,
                            progress: false,
                            adversary: &adversary,
                            pace: Pace::default(),
                        };
                        let _ = reply.send(model.work(&work, &job, &mut state));
                    }
                })
                .map_err(|e| Error::Internal(format!("starting a training thread: {e}")))?;
        }
        Ok(Self { jobs, cancel })
    }

    async fn train(&self, node: usize, job: Job) -> Result<TrainResult> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(PoolJob { node, job, reply })
            .map_err(|_| Error::Internal("the training pool stopped".into()))?;
        let trained = rx
            .await
            .map_err(|_| Error::Internal("the training pool dropped the job".into()))?;
        trained.map_err(|e| Error::Internal(format!("local training: {e}")))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Training in progress stops before its next step; the threads end
        // when the job channel closes.
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// What every virtual node shares.
struct Fleet {
    commands: mpsc::UnboundedSender<Command>,
    snapshot: watch::Receiver<Arc<ModelSnapshot>>,
    traffic: Arc<Traffic>,
    pool: Pool,
    shares: Arc<Shares>,
    run_id: String,
    kind: ModelKind,
    classes: i64,
    codec: Codec,
    spool_dir: PathBuf,
    spool_budget: SpoolBudget,
    /// Asynchronous training: a task may be served a newer version than it names.
    asynchronous: bool,
}

impl Fleet {
    /// Sends the driver a command and waits for its answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        crate::runtime::driver::ask(&self.commands, make)
            .await
            .ok_or_else(|| Error::Internal("the driver stopped".into()))
    }

    /// One virtual node: reads its instruction stream until the run stops it.
    async fn node(self: Arc<Self>, i: usize, session: String, mut instructions: mpsc::Receiver<Instruction>) {
        let name = node_name(i);
        while let Some(instruction) = instructions.recv().await {
            match instruction {
                Instruction::Train(task) => {
                    let round = task.round;
                    match self.task(i, &name, &session, task).await {
                        // The run ended while this node trained (an asynchronous run's last step).
                        Err(_) if self.commands.is_closed() => break,
                        Err(e) => tracing::warn!(node = %name, round, error = %e, "virtual node: no update this round"),
                        Ok(()) => {}
                    }
                }
                Instruction::Stop(_) => break,
                Instruction::SecAgg(_) => {}
            }
        }
    }

    /// A training task: the global model (as a daemon would fetch it), the
    /// edge node's local training and encoding, and the update's submission.
    async fn task(&self, i: usize, name: &str, session: &str, task: Task) -> Result<()> {
        let hyper = task.hyper;
        let snapshot = if self.asynchronous && self.snapshot.borrow().version < task.version {
            // The task names a version still being saved: wait for it, as a
            // daemon's fetch does.
            let mut saved = self.snapshot.clone();
            match tokio::time::timeout(Duration::from_secs(60), saved.wait_for(|s| s.version >= task.version)).await {
                Ok(Ok(s)) => s.clone(),
                _ => {
                    return Err(Error::Internal(format!(
                        "model version {} was not saved in time",
                        task.version
                    )));
                }
            }
        } else {
            self.snapshot.borrow().clone()
        };
        let newer_served = self.asynchronous && snapshot.version > task.version;
        if (snapshot.version != task.version && !newer_served) || !snapshot.durable.load(Ordering::Acquire) {
            return Err(Error::Internal(format!(
                "the task names model version {}, the published one is {}",
                task.version, snapshot.version
            )));
        }
        // As a daemon's fetch: an asynchronous run serves the newest saved
        // version, and the update starts from it.
        let base_version = snapshot.version;
        if self.asynchronous {
            let admitted = self
                .ask(|reply| Command::AdmitFetch {
                    session: session.to_owned(),
                    version: base_version,
                    reply,
                })
                .await?;
            if let Err(r) = admitted {
                tracing::debug!(node = name, round = task.round, reason = %r, "virtual node: fetch not admitted");
                return Ok(());
            }
        }
        let server_control = (hyper.algorithm == Algorithm::Scaffold)
            .then(|| snapshot.control_values.clone())
            .flatten();
        // What a daemon would have fetched.
        let fetched = snapshot.payload_len() + snapshot.control.as_ref().map_or(0, |(c, _)| c.len());
        self.traffic.count_down(name, fetched as u64);
        let manifest = snapshot.manifest.clone();
        let job = Job {
            run_id: self.run_id.clone(),
            round: task.round,
            kind: self.kind,
            classes: self.classes,
            manifest: manifest.clone(),
            global: snapshot
                .params
                .in_memory()
                .cloned()
                .ok_or_else(|| Error::Internal("a simulation keeps the global model in memory".into()))?,
            server_control,
            hyper,
            codec: self.codec,
        };
        drop(snapshot);
        let result = self.pool.train(i, job).await?;
        let admitted = self
            .ask(|reply| Command::Admit {
                session: session.to_owned(),
                round: task.round,
                base_version,
                reply,
            })
            .await?;
        if let Err(r) = admitted {
            tracing::debug!(node = name, round = task.round, reason = %r, "virtual node: update not admitted");
            return Ok(());
        }
        let payload = result.payload;
        let sections = if result.control_delta.is_some() { 2 } else { 1 };
        let received = Intake::new(
            self.codec,
            manifest.numel(),
            sections,
            payload.len() as u64,
            &self.spool_dir,
            &self.spool_budget,
        )
        .and_then(|mut intake| {
            intake.push(&payload)?;
            intake.finish(crc32(&payload))
        });
        let received = match received {
            Ok(r) => r,
            Err(e) => {
                // As for a stream that fails its checks: the round stops waiting for this node.
                let _ = self.commands.send(Command::Refuse {
                    session: session.to_owned(),
                    round: task.round,
                    transient: false,
                });
                return Err(e.into());
            }
        };
        let bytes = payload.len() as u64;
        drop(payload);
        self.traffic.bytes_up.fetch_add(bytes, Ordering::Relaxed);
        let update = Update {
            round: task.round,
            base_version,
            num_samples: self.shares.len_of(i) as u64,
            kind: if result.is_gradient {
                UpdateKind::Gradient
            } else {
                UpdateKind::Delta
            },
            body: Body {
                source: Arc::new(received.update),
                control: sections == 2,
                norm: received.norm,
                non_finite: received.non_finite,
            },
            metrics: result.metrics,
            federated_eval: None,
            wire_bytes: bytes,
            payload_bytes: bytes,
            upload_seconds: 0.0,
        };
        let submitted: std::result::Result<usize, Rejection> = self
            .ask(|reply| Command::Submit {
                session: session.to_owned(),
                update,
                reply,
            })
            .await?;
        if let Err(r) = submitted {
            tracing::debug!(node = name, round = task.round, reason = %r, "virtual node: update refused");
        }
        Ok(())
    }
}

/// Completes a configuration for a simulation: virtual nodes reach the
/// driver in-process, so no gRPC is served and no certificate is needed
/// (unless the HTTP side uses one), and rounds start once every virtual
/// node is connected.
pub fn complete(config: &mut CoordinatorConfig) {
    if config.security.tls_cert.is_none() {
        config.security.insecure = true;
    }
    let nodes = config.simulation.nodes;
    config.sampling.min_available = config.sampling.min_available.max(nodes);
}

/// Runs `config` (completed by [`complete`]) as a simulation: `simulation.nodes` virtual nodes in this
/// process, until the last round is saved (returns the summary) or
/// `shutdown` resolves (returns `None`).
pub async fn simulate(
    mut config: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Option<RunSummary>> {
    complete(&mut config);
    config.validate()?;
    if config.secure_aggregation.enabled {
        return Err(Error::Config(
            "simulation: secure aggregation runs its key exchange between node processes and is not simulated; \
             set secure_aggregation.enabled = false, or run a fleet (`coordinator fleet`)"
                .into(),
        ));
    }
    let sim = config.simulation.clone();
    let trainers = sim.trainer_count();
    let load_config = config.clone();
    let shares = tokio::task::spawn_blocking(move || Shares::load(&load_config))
        .await
        .map_err(|e| Error::Internal(format!("data loading task failed: {e}")))??;
    let sizes: Vec<usize> = (0..shares.nodes()).map(|i| shares.len_of(i)).collect();
    tracing::info!(
        nodes = sim.nodes,
        partition = %sim.scheme()?.describe(),
        samples = shares.labels.len(),
        smallest = sizes.iter().min().copied().unwrap_or(0),
        largest = sizes.iter().max().copied().unwrap_or(0),
        trainers,
        trainer_threads = sim.trainer_threads,
        "simulated fleet: the training split is shared among virtual nodes"
    );
    let shares = Arc::new(shares);
    let parts = match assemble(&config, true).await? {
        Assembled::Ready(parts) => *parts,
        Assembled::Finished(summary) => return Ok(Some(summary)),
    };
    let Parts {
        driver,
        commands,
        snapshot,
        manifest: _,
        traffic,
        settings,
        kind,
        codec,
        spool_dir,
        metrics,
        status,
    } = parts;
    let http_stop = CancellationToken::new();
    if let Some(http) = prepare_http(&config).await? {
        spawn_http(http, &config, status, metrics, http_stop.clone())?;
    }
    let driver_stop = CancellationToken::new();
    let mut driver_task = tokio::spawn(driver.run(driver_stop.clone()));
    let pool = Pool::spawn(
        shares.clone(),
        trainers,
        sim.trainer_threads as usize,
        config.out_dir.join("nodes"),
    )?;
    let fleet = Arc::new(Fleet {
        commands,
        snapshot,
        traffic,
        pool,
        shares: shares.clone(),
        run_id: settings.run_id,
        kind,
        classes: settings.classes.len() as i64,
        codec,
        spool_dir,
        spool_budget: SpoolBudget::new(config.limits.spool_memory_bytes),
        asynchronous: config.asynchronous.enabled,
    });
    for i in 0..shares.nodes() {
        let name = node_name(i);
        let session = fleet
            .ask(|reply| Command::Join {
                name: name.clone(),
                num_samples: shares.len_of(i) as u64,
                previous: None,
                reply,
            })
            .await?
            .map_err(|r| Error::RunFailed(format!("virtual node {name} could not join: {r}")))?;
        let (tx, rx) = mpsc::channel(INSTRUCTION_QUEUE);
        fleet
            .ask(|reply| Command::Connect {
                session: session.clone(),
                stream: tx,
                reply,
            })
            .await?
            .map_err(|r| Error::RunFailed(format!("virtual node {name} could not connect: {r}")))?;
        tokio::spawn(fleet.clone().node(i, session, rx));
    }
    tracing::info!(nodes = shares.nodes(), "virtual nodes connected");
    tokio::pin!(shutdown);
    let outcome = tokio::select! {
        res = &mut driver_task => driver_outcome(res)?,
        () = &mut shutdown => stop_driver(driver_task, &driver_stop).await?,
    };
    http_stop.cancel();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_goes_to_one_node_and_a_nodes_data_set_is_its_share() {
        let mut config = CoordinatorConfig::default();
        config.data.synthetic_train_samples = 600;
        config.simulation.nodes = 7;
        config.simulation.partition = "dirichlet".into();
        config.simulation.min_size = 5;
        let shares = Shares::load(&config).unwrap();
        assert_eq!(shares.nodes(), 7);
        let mut seen: Vec<i64> = shares.parts.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..600).collect::<Vec<i64>>());
        let full = config.data.source().unwrap().load(Split::Train).unwrap();
        for i in 0..7 {
            let own = shares.dataset(i);
            let expected = full.subset(&shares.parts[i]);
            assert_eq!(own.len(), shares.len_of(i));
            assert!(own.len() >= 5);
            assert!(own.images.equal(&expected.images) && own.labels.equal(&expected.labels));
        }
        assert_eq!(node_name(0), "sim-1");
    }
}
