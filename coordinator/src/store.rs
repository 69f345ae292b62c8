//! What a run leaves on disk, written durably after every round:
//!
//! - `model.safetensors`: the latest global model (metadata: run id, model,
//!   round, version);
//! - `rounds/round-NNNN.safetensors`: each round's global model, when kept;
//! - `run.json`: run metadata and per-round history (participants, their
//!   training metrics and bytes, central test loss and accuracy, traffic).
//!
//! Every file is written to a temporary file, fsynced and renamed, so a
//! crash leaves either the previous round's files or the new ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fedge_common::fsutil::write_atomic;
use fedge_common::params::{Manifest, save_safetensors};
use serde::{Deserialize, Serialize};

use crate::config::CoordinatorConfig;
use crate::round::ClosedRound;
use crate::{Error, Result};

/// One node's part in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Participant {
    pub node: String,
    pub num_samples: u64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub steps: u64,
    pub train_seconds: f64,
    /// Bytes of this node's update stream, as received.
    pub bytes_up: u64,
    /// The round's starting model on this node's held-out data.
    pub holdout_loss: Option<f64>,
    pub holdout_accuracy: Option<f64>,
    pub holdout_examples: u64,
}

/// One completed round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    pub selected: usize,
    pub participants: Vec<Participant>,
    /// Central evaluation on the test split (absent when skipped this round).
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    /// Federated evaluation: the round's starting model (version `round - 1`)
    /// on the participants' held-out data, weighted by their example counts.
    pub federated_loss: Option<f64>,
    pub federated_accuracy: Option<f64>,
    pub federated_examples: u64,
    /// Bytes received in update streams during the round.
    pub bytes_up: u64,
    /// Bytes sent in model streams during the round.
    pub bytes_down: u64,
    /// Updates refused during the round.
    pub rejected_updates: u64,
    /// From the round's start to its close, seconds.
    pub train_phase_seconds: f64,
    pub eval_seconds: f64,
    /// From the round's start to the end of its central evaluation, seconds
    /// (`train_phase_seconds + eval_seconds`; the checkpoint write follows).
    pub round_seconds: f64,
}

/// `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunHistory {
    pub run_id: String,
    pub model: String,
    pub parameters: usize,
    pub data: String,
    pub protocol_version: u32,
    pub fedge_version: String,
    pub config: CoordinatorConfig,
    pub started_unix_ms: u64,
    pub finished: bool,
    /// Peak resident memory of the coordinator process when the run finished.
    pub peak_rss_bytes: Option<u64>,
    pub rounds: Vec<RoundRecord>,
}

/// Writes a run's checkpoints and history.
#[derive(Debug)]
pub struct RunStore {
    dir: PathBuf,
    keep_round_models: bool,
    manifest: Manifest,
    pub history: RunHistory,
}

impl RunStore {
    /// Prepares `dir` (created if missing).
    pub fn create(dir: &Path, keep_round_models: bool, manifest: Manifest, history: RunHistory) -> Result<Self> {
        std::fs::create_dir_all(dir.join("rounds")).map_err(|e| Error::Io {
            context: format!("creating {}", dir.display()),
            source: e,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            keep_round_models,
            manifest,
            history,
        })
    }

    /// The output folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the latest global model.
    pub fn model_path(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }

    /// Writes the initial global model as `rounds/round-0000.safetensors` (when round models are kept).
    pub fn persist_initial(&self, params: &[f32]) -> Result<()> {
        if !self.keep_round_models {
            return Ok(());
        }
        let path = self.dir.join("rounds").join("round-0000.safetensors");
        Ok(save_safetensors(&path, &self.manifest, params, self.metadata(0, 0))?)
    }

    /// Durably records a closed round: its model files first, then `run.json`.
    pub fn persist_round(&mut self, closed: &ClosedRound, record: RoundRecord) -> Result<()> {
        let metadata = self.metadata(closed.round, closed.version);
        if self.keep_round_models {
            let path = self
                .dir
                .join("rounds")
                .join(format!("round-{:04}.safetensors", closed.round));
            save_safetensors(&path, &self.manifest, &closed.global, metadata.clone())?;
        }
        save_safetensors(&self.model_path(), &self.manifest, &closed.global, metadata)?;
        self.history.rounds.push(record);
        self.write_history()
    }

    /// Metadata stored in every checkpoint file.
    fn metadata(&self, round: u64, version: u64) -> HashMap<String, String> {
        HashMap::from([
            ("run_id".to_string(), self.history.run_id.clone()),
            ("model".to_string(), self.history.model.clone()),
            ("round".to_string(), round.to_string()),
            ("version".to_string(), version.to_string()),
        ])
    }

    /// Marks the run finished in `run.json`.
    pub fn finish(&mut self) -> Result<()> {
        self.history.finished = true;
        self.history.peak_rss_bytes = fedge_common::fsutil::peak_rss_bytes();
        self.write_history()
    }

    /// Writes `run.json`.
    pub fn write_history(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.history).map_err(fedge_common::Error::from)?;
        Ok(write_atomic(&self.dir.join("run.json"), &json)?)
    }
}

/// A participant record from a contribution.
pub fn participant(c: &crate::round::Contribution) -> Participant {
    Participant {
        node: c.node.clone(),
        num_samples: c.num_samples,
        train_loss: c.metrics.loss,
        train_accuracy: c.metrics.accuracy,
        steps: c.metrics.steps,
        train_seconds: c.metrics.train_seconds,
        bytes_up: c.wire_bytes,
        holdout_loss: c.federated_eval.map(|e| e.loss),
        holdout_accuracy: c.federated_eval.map(|e| e.accuracy),
        holdout_examples: c.federated_eval.map_or(0, |e| e.examples),
    }
}

/// Federated evaluation of a round: the participants' held-out metrics
/// averaged by example count, or `None` when no participant held data out.
pub fn federated_eval(contributions: &[crate::round::Contribution]) -> Option<fedge_common::train::EvalMetrics> {
    let evals: Vec<_> = contributions.iter().filter_map(|c| c.federated_eval).collect();
    let examples: u64 = evals.iter().map(|e| e.examples).sum();
    (examples > 0).then(|| {
        let w = |f: fn(&fedge_common::train::EvalMetrics) -> f64| {
            evals.iter().map(|e| f(e) * e.examples as f64).sum::<f64>() / examples as f64
        };
        fedge_common::train::EvalMetrics {
            loss: w(|e| e.loss),
            accuracy: w(|e| e.accuracy),
            examples,
        }
    })
}
