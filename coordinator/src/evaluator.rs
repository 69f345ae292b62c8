//! Central evaluation on a dedicated thread, so tensor work never runs on
//! the async runtime. The thread builds the model for each evaluation and
//! drops it after, so between evaluations the coordinator holds the global
//! model once.

use std::sync::Arc;
use std::sync::mpsc;

use fedge_common::data::{DataSource, Split};
use fedge_common::model::ModelKind;
use fedge_common::params::{self, Manifest};
use fedge_common::train::{EvalMetrics, evaluate};
use fedge_common::worker::Worker;
use tch::nn::VarStore;
use tokio::sync::oneshot;

use crate::{Error, Result};

struct Job {
    params: Arc<Vec<f32>>,
    reply: oneshot::Sender<Result<EvalMetrics>>,
}

/// Handle to the evaluation thread.
/// Dropping it stops the thread after an evaluation in progress
/// ([`Worker`]), so the process never exits while libtorch computes.
#[derive(Debug)]
pub struct Evaluator {
    worker: Worker<Job>,
}

/// What the evaluation thread reports once it is ready.
#[derive(Debug)]
pub struct InitialModel {
    pub manifest: Manifest,
    pub params: Vec<f32>,
    pub test_samples: usize,
    /// `[channels, height, width]` of the data, which nodes' data must match.
    pub input_shape: [i64; 3],
    pub classes: Vec<String>,
}

impl Evaluator {
    /// Starts the thread: loads the test split of `source`, initializes the
    /// model with `seed`, and returns the initial parameters.
    pub async fn spawn(
        kind: ModelKind,
        source: DataSource,
        seed: u64,
        batch_size: usize,
        threads: usize,
    ) -> Result<(Self, InitialModel)> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let worker = Worker::spawn("evaluator", move |rx: mpsc::Receiver<Job>| {
            if threads > 0 {
                tch::set_num_threads(threads as i32);
            }
            let setup = || -> Result<_> {
                let test = source.load(Split::Test)?;
                tch::manual_seed(seed as i64);
                let mut vs = VarStore::new(tch::Device::Cpu);
                let net = kind.build(&vs.root(), test.shape(), test.num_classes());
                let manifest = Manifest::of_var_store(&vs);
                let params = params::flatten(&vs, &manifest)?;
                vs.freeze();
                drop((net, vs));
                Ok((test, manifest, params))
            };
            let (test, manifest, initial) = match setup() {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(InitialModel {
                manifest: manifest.clone(),
                params: initial,
                test_samples: test.len(),
                input_shape: test.shape(),
                classes: test.classes.clone(),
            }));
            while let Ok(job) = rx.recv() {
                // The model is built for each evaluation and dropped after
                // it, so the coordinator holds no second copy of the
                // global model between evaluations.
                let mut vs = VarStore::new(tch::Device::Cpu);
                let net = kind.build(&vs.root(), test.shape(), test.num_classes());
                vs.freeze();
                let result = params::load_into(&mut vs, &manifest, &job.params)
                    .map(|()| evaluate(&net, &test, batch_size, tch::Device::Cpu))
                    .map_err(Error::from);
                drop((net, vs));
                let _ = job.reply.send(result);
            }
        })
        .map_err(|e| Error::Io {
            context: "starting the evaluation thread".into(),
            source: e,
        })?;
        let initial = ready_rx
            .await
            .map_err(|_| Error::Internal("evaluation thread stopped during start-up".into()))??;
        Ok((Self { worker }, initial))
    }

    /// Evaluates `params` on the test split.
    pub async fn evaluate(&self, params: Arc<Vec<f32>>) -> Result<EvalMetrics> {
        let (reply, rx) = oneshot::channel();
        self.worker
            .send(Job { params, reply })
            .map_err(|_| Error::Internal("evaluation thread is gone".into()))?;
        rx.await
            .map_err(|_| Error::Internal("evaluation thread dropped a job".into()))?
    }
}
