//! The node's training thread: owns the node's data, its model and the
//! state it keeps across rounds, and runs one [`Job`] at a time when the
//! session asks ([`fedge_learn::job`] does the work). Async code talks to it
//! over channels and never touches a tensor.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use fedge_common::worker::Worker;
use fedge_learn::data::Dataset;
use fedge_learn::job::{AdversaryConfig, Job, LocalModel, NodeState, TrainResult, Work};
use fedge_learn::train::Pace;
use tokio::sync::oneshot;

use crate::{Error, Result};

struct Envelope {
    job: Job,
    reply: oneshot::Sender<Result<TrainResult>>,
}

/// How the training thread trains.
#[derive(Debug)]
pub struct TrainerSettings {
    pub device: tch::Device,
    /// libtorch intra-op threads (0: libtorch's default).
    pub threads: usize,
    /// Where state kept across rounds is stored (none: in memory only).
    pub state_dir: Option<PathBuf>,
    pub adversary: AdversaryConfig,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// The emulated device speed (`train.slowdown`).
    pub pace: Pace,
}

/// Handle to the training thread. Dropping it stops the thread: training
/// in progress ends before its next step, and the drop waits for that
/// ([`Worker`]), so the process never exits while libtorch is mid-computation.
#[derive(Debug)]
pub struct Trainer {
    /// Set for good when the trainer is dropped.
    shutdown: Arc<AtomicBool>,
    /// Stops the job in progress; cleared when the next job starts.
    interrupt: Arc<AtomicBool>,
    worker: Worker<Envelope>,
}

impl Drop for Trainer {
    fn drop(&mut self) {
        // The worker field is dropped (and joined) after this. Shutdown is
        // set before the interrupt: a job starting meanwhile sees one of them.
        self.shutdown.store(true, Ordering::SeqCst);
        self.interrupt.store(true, Ordering::SeqCst);
    }
}

impl Trainer {
    /// Starts the thread; it takes ownership of the data.
    pub fn spawn(data: Dataset, held_out: Option<Dataset>, settings: TrainerSettings) -> Result<Self> {
        let TrainerSettings {
            device,
            threads,
            state_dir,
            adversary,
            progress,
            pace,
        } = settings;
        let shutdown = Arc::new(AtomicBool::new(false));
        let interrupt = Arc::new(AtomicBool::new(false));
        let (stopping, stop) = (shutdown.clone(), interrupt.clone());
        let worker = Worker::spawn("trainer", move |rx: mpsc::Receiver<Envelope>| {
            if threads > 0 {
                tch::set_num_threads(threads as i32);
            }
            let mut model = LocalModel::new(device);
            let mut state = NodeState::new(state_dir);
            while let Ok(Envelope { job, reply }) = rx.recv() {
                // An interrupt of an earlier job does not stop this one.
                stop.store(false, Ordering::SeqCst);
                if stopping.load(Ordering::SeqCst) {
                    let _ = reply.send(Err(Error::Trainer("the training thread is stopping".into())));
                    continue;
                }
                let work = Work {
                    data: &data,
                    held_out: held_out.as_ref(),
                    cancel: &stop,
                    progress,
                    adversary: &adversary,
                    pace,
                };
                let _ = reply.send(model.work(&work, &job, &mut state).map_err(Error::from));
            }
        })
        .map_err(|e| Error::Trainer(format!("cannot start the training thread: {e}")))?;
        Ok(Self {
            shutdown,
            interrupt,
            worker,
        })
    }

    /// Stops the job in progress before its next step (the node went away);
    /// the next job runs as usual.
    pub fn interrupt(&self) {
        self.interrupt.store(true, Ordering::SeqCst);
    }

    /// Runs `job` on the training thread and returns the update.
    pub async fn train(&self, job: Job) -> Result<TrainResult> {
        let (reply, rx) = oneshot::channel();
        self.worker
            .send(Envelope { job, reply })
            .map_err(|_| Error::Trainer("training thread is gone".into()))?;
        rx.await
            .map_err(|_| Error::Trainer("training thread dropped the job".into()))?
    }
}
