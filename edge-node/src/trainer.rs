//! The training thread: owns the node's data, its `VarStore` and model, and
//! runs local training when the session asks. Async code talks to it over
//! channels and never touches a tensor.

use std::sync::Arc;
use std::sync::mpsc;

use fedge_common::data::Dataset;
use fedge_common::model::{ModelKind, Net};
use fedge_common::params::{self, Manifest};
use fedge_common::train::{EvalMetrics, Hyperparameters, TrainMetrics, evaluate, train};
use tch::nn::VarStore;
use tokio::sync::oneshot;

use crate::{Error, Result};

/// What one round of local training produced.
#[derive(Debug)]
pub struct TrainResult {
    /// `w_local − w_global`, in manifest order.
    pub delta: Vec<f32>,
    pub metrics: TrainMetrics,
    /// The received global model on the held-out data, when there is any.
    pub holdout: Option<EvalMetrics>,
}

struct Job {
    kind: ModelKind,
    classes: i64,
    manifest: Arc<Manifest>,
    global: Arc<Vec<f32>>,
    hyper: Hyperparameters,
    reply: oneshot::Sender<Result<TrainResult>>,
}

/// Handle to the training thread.
#[derive(Debug, Clone)]
pub struct Trainer {
    tx: mpsc::Sender<Job>,
}

impl Trainer {
    /// Starts the thread; it takes ownership of the data.
    pub fn spawn(data: Dataset, held_out: Option<Dataset>, device: tch::Device, threads: usize) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || {
                if threads > 0 {
                    tch::set_num_threads(threads as i32);
                }
                let mut model: Option<(ModelKind, VarStore, Net)> = None;
                while let Ok(job) = rx.recv() {
                    if model.as_ref().is_none_or(|(k, _, _)| *k != job.kind) {
                        let vs = VarStore::new(device);
                        let net = job.kind.build(&vs.root(), data.shape(), job.classes);
                        model = Some((job.kind, vs, net));
                    }
                    let (_, vs, net) = model.as_mut().expect("model built above");
                    let result = run_job(vs, net, &data, held_out.as_ref(), &job);
                    let _ = job.reply.send(result);
                }
            })
            .map_err(|e| Error::Trainer(format!("cannot start the training thread: {e}")))?;
        Ok(Self { tx })
    }

    /// Trains `kind` from `global` with `hyper` and returns the update.
    pub async fn train(
        &self,
        kind: ModelKind,
        classes: i64,
        manifest: Arc<Manifest>,
        global: Arc<Vec<f32>>,
        hyper: Hyperparameters,
    ) -> Result<TrainResult> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                kind,
                classes,
                manifest,
                global,
                hyper,
                reply,
            })
            .map_err(|_| Error::Trainer("training thread is gone".into()))?;
        rx.await
            .map_err(|_| Error::Trainer("training thread dropped the job".into()))?
    }
}

fn run_job(vs: &mut VarStore, net: &Net, data: &Dataset, held_out: Option<&Dataset>, job: &Job) -> Result<TrainResult> {
    params::load_into(vs, &job.manifest, &job.global)?;
    let holdout = held_out.map(|h| evaluate(net, h, 256, vs.device()));
    let metrics = train(net, vs, data, &job.hyper)?;
    let mut delta = params::flatten(vs, &job.manifest)?;
    for (d, g) in delta.iter_mut().zip(job.global.iter()) {
        *d -= g;
    }
    Ok(TrainResult {
        delta,
        metrics,
        holdout,
    })
}
