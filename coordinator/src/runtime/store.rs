//! What a run leaves on disk, written durably after every round:
//!
//! - `model.safetensors`: the latest global model (metadata: run id, model,
//!   round, version);
//! - `rounds/round-NNNN.safetensors`: each round's global model, when kept;
//! - `run.json`: run metadata and per-round history (participants, their
//!   training metrics and bytes, central test loss and accuracy, traffic);
//! - `checkpoint/round-NNNN.safetensors`: what a restart needs besides the
//!   history: the global model (`model/…` tensors) and the strategy's state
//!   (`strategy/…`: server optimizer moments, SCAFFOLD's control variate).
//!
//! Every file is written to a temporary file, fsynced and renamed, and
//! `run.json` is written last: the round it lists last is the one a restart
//! continues from ([`RunStore::resume`]), and its checkpoint file is on disk
//! (the previous one is removed only after `run.json` moved past it).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use fedge_common::checkpoint::{self, Checkpoint};
use fedge_common::fsutil::write_atomic;
use fedge_common::params::{Manifest, save_safetensors};
use serde::{Deserialize, Serialize};

use crate::config::CoordinatorConfig;
use crate::core::round::ClosedRound;
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
    /// Bytes of the encoded update payload (within `bytes_up`).
    #[serde(default)]
    pub payload_bytes: u64,
    /// Bytes of model streams sent to this node during the round.
    #[serde(default)]
    pub bytes_down: u64,
    /// The round's starting model on this node's held-out data.
    pub holdout_loss: Option<f64>,
    pub holdout_accuracy: Option<f64>,
    pub holdout_examples: u64,
    /// L2 norm of the update as received (`null` under secure aggregation,
    /// where the coordinator sees only the sum).
    pub update_norm: Option<f64>,
    /// Whether the update was scaled down to `strategy.clip_norm`.
    pub clipped: bool,
    /// The node's own timings: fetching the global model (0 when it had
    /// it) and encoding the update.
    #[serde(default)]
    pub fetch_seconds: f64,
    #[serde(default)]
    pub encode_seconds: f64,
    /// Receiving the update stream, from its header to its checksum.
    #[serde(default)]
    pub upload_seconds: f64,
    /// When the update was accepted, seconds after the round's tasks went
    /// out (in an asynchronous step, after its buffer opened).
    #[serde(default)]
    pub arrived_seconds: f64,
    /// The global model version the update was computed from.
    #[serde(default)]
    pub base_version: u64,
    /// Its weight in the mean before any staleness factor: its samples,
    /// capped (`null` for a masked input).
    #[serde(default)]
    pub weight: Option<f64>,
    /// Asynchronous training: the task the update answered, how many
    /// versions behind it arrived, and the factor that scaled it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staleness: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staleness_weight: Option<f64>,
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
    /// Model stream bytes by node (including nodes whose update did not count).
    #[serde(default)]
    pub bytes_down_by_node: BTreeMap<String, u64>,
    /// Updates refused during the round.
    pub rejected_updates: u64,
    /// Joins and updates refused during the round, by reason
    /// (`non_finite`, `checksum`, `unauthenticated`, ...).
    #[serde(default)]
    pub refusals: BTreeMap<String, u64>,
    /// From the round's start to the aggregated model, seconds.
    pub train_phase_seconds: f64,
    /// Aggregation and server optimizer step, seconds (part of `train_phase_seconds`).
    #[serde(default)]
    pub aggregation_seconds: f64,
    pub eval_seconds: f64,
    /// Writing the round's checkpoint, global model and curves, seconds
    /// (after `round_seconds`; in `run.json` from the next write on).
    #[serde(default)]
    pub checkpoint_seconds: f64,
    /// From the round's start to the end of its central evaluation, seconds
    /// (`train_phase_seconds + eval_seconds`; the checkpoint write follows).
    pub round_seconds: f64,
    /// Differential privacy: the round's clipping and noise, and ε spent
    /// by the run after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::core::privacy::RoundPrivacy>,
    /// Secure aggregation: threshold, quantization, who took part in each
    /// step, protocol bytes and time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<crate::core::secure::SecureRecord>,
    /// Asynchronous training: how many of the step's updates were how many
    /// versions behind (staleness → updates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staleness: Option<BTreeMap<u64, u64>>,
    /// When the round (or step) closed, ms since the Unix epoch: its model
    /// exists from then on (time to accuracy is measured to it).
    #[serde(default)]
    pub closed_unix_ms: u64,
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
    /// Times the coordinator restarted and resumed this run from its checkpoint.
    #[serde(default)]
    pub resumed: u32,
    /// Peak resident memory of the coordinator process when the run finished.
    pub peak_rss_bytes: Option<u64>,
    /// Why the run finished before its last round (its privacy budget), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    pub rounds: Vec<RoundRecord>,
}

#[cfg(test)]
impl RunHistory {
    /// The history of a fresh run with default settings.
    pub(crate) fn for_tests(run_id: &str) -> Self {
        Self {
            run_id: run_id.into(),
            model: "cnn".into(),
            parameters: 3,
            data: "synthetic".into(),
            protocol_version: 2,
            fedge_version: "test".into(),
            config: CoordinatorConfig::default(),
            started_unix_ms: 0,
            finished: false,
            resumed: 0,
            peak_rss_bytes: None,
            stop_reason: None,
            rounds: Vec::new(),
        }
    }
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
        for sub in ["rounds", "checkpoint"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| Error::Io {
                context: format!("creating {}", dir.display()),
                source: e,
            })?;
        }
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

    /// Writes the initial global model as `rounds/round-0000.safetensors`
    /// (when round models are kept), the round-0 checkpoint, and `run.json`.
    pub fn persist_initial(&self, params: &[f32], strategy: &BTreeMap<String, Vec<f32>>) -> Result<()> {
        self.write_checkpoint(0, params, strategy, 0)?;
        if self.keep_round_models {
            let path = self.dir.join("rounds").join("round-0000.safetensors");
            save_safetensors(&path, &self.manifest, params, self.metadata(0, 0))?;
        }
        self.write_history()
    }

    /// Durably records a closed round: its model and checkpoint files first,
    /// then `run.json`, then the previous checkpoint is removed.
    pub fn persist_round(&mut self, closed: &ClosedRound, record: RoundRecord) -> Result<()> {
        let metadata = self.metadata(closed.round, closed.version);
        let (named, steps) = closed.strategy_state.as_ref();
        self.write_checkpoint(closed.round, &closed.global, named, *steps)?;
        if self.keep_round_models {
            let path = self
                .dir
                .join("rounds")
                .join(format!("round-{:04}.safetensors", closed.round));
            save_safetensors(&path, &self.manifest, &closed.global, metadata.clone())?;
        }
        save_safetensors(&self.model_path(), &self.manifest, &closed.global, metadata)?;
        self.history.rounds.push(record);
        self.write_history()?;
        if closed.round > 0 {
            let old = self.checkpoint_file(closed.round - 1);
            if old.exists() {
                std::fs::remove_file(&old).map_err(|e| Error::Io {
                    context: format!("removing {}", old.display()),
                    source: e,
                })?;
            }
        }
        Ok(())
    }

    /// The model's tensors, in the order the checkpoints hold them.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The restart checkpoint of `round` (`checkpoint/round-NNNN.safetensors`).
    pub fn checkpoint_file(&self, round: u64) -> PathBuf {
        self.dir
            .join("checkpoint")
            .join(format!("round-{round:04}.safetensors"))
    }

    /// Writes the restart checkpoint of `round`: global model and strategy state.
    pub fn write_checkpoint(
        &self,
        round: u64,
        global: &[f32],
        strategy: &BTreeMap<String, Vec<f32>>,
        steps: u64,
    ) -> Result<()> {
        let meta = self.metadata(round, round);
        Ok(checkpoint::write(
            &self.checkpoint_file(round),
            &self.manifest,
            global,
            strategy,
            steps,
            meta,
        )?)
    }

    /// Reads back a run left unfinished in `dir`: its history, the global
    /// model and strategy state of the last round `run.json` lists. `None`
    /// when `dir` holds no run, or a finished one.
    pub fn resume(dir: &Path, keep_round_models: bool, manifest: Manifest) -> Result<Option<(Self, Checkpoint)>> {
        match Self::unfinished(dir, keep_round_models, manifest)? {
            Some(store) => {
                let checkpoint = store.read_checkpoint()?;
                Ok(Some((store, checkpoint)))
            }
            None => Ok(None),
        }
    }

    /// The store of a run left unfinished in `dir`, from its history; `None`
    /// when `dir` holds no run, or a finished one. Its checkpoint is read by
    /// [`RunStore::read_checkpoint`].
    pub fn unfinished(dir: &Path, keep_round_models: bool, manifest: Manifest) -> Result<Option<Self>> {
        let path = dir.join("run.json");
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Io {
                    context: format!("reading {}", path.display()),
                    source: e,
                });
            }
        };
        let history: RunHistory = serde_json::from_slice(&text).map_err(|e| {
            Error::Checkpoint(format!(
                "{} is not a fedge run history ({e}); move it away or choose another out_dir",
                path.display()
            ))
        })?;
        if history.finished {
            return Ok(None);
        }
        Self::create(dir, keep_round_models, manifest, history).map(Some)
    }

    /// The global model and strategy state of the last round `run.json`
    /// lists, from its checkpoint file.
    pub fn read_checkpoint(&self) -> Result<Checkpoint> {
        let round = self.history.rounds.last().map_or(0, |r| r.round);
        let file = self.checkpoint_file(round);
        let bytes = std::fs::read(&file).map_err(|e| {
            Error::Checkpoint(format!(
                "cannot read the checkpoint of round {round} ({}: {e})",
                file.display()
            ))
        })?;
        checkpoint::parse(&bytes, &self.manifest, &self.history.run_id, round).map_err(|e| {
            Error::Checkpoint(format!(
                "{}: {}",
                file.display(),
                e.to_string().trim_start_matches("checkpoint: ")
            ))
        })
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
pub fn participant(c: &crate::core::round::Contribution, bytes_down: u64) -> Participant {
    Participant {
        node: c.node.clone(),
        num_samples: c.num_samples,
        train_loss: c.metrics.loss,
        train_accuracy: c.metrics.accuracy,
        steps: c.metrics.steps,
        train_seconds: c.metrics.train_seconds,
        bytes_up: c.wire_bytes,
        payload_bytes: c.payload_bytes,
        bytes_down,
        holdout_loss: c.federated_eval.map(|e| e.loss),
        holdout_accuracy: c.federated_eval.map(|e| e.accuracy),
        holdout_examples: c.federated_eval.map_or(0, |e| e.examples),
        update_norm: c.update_norm.is_finite().then_some(c.update_norm),
        clipped: c.clipped,
        fetch_seconds: c.metrics.fetch_seconds,
        encode_seconds: c.metrics.encode_seconds,
        upload_seconds: c.upload_seconds,
        arrived_seconds: c.arrived_seconds,
        base_version: c.base_version,
        weight: c.weight.is_finite().then_some(c.weight),
        task: c.staleness.map(|s| s.task),
        staleness: c.staleness.map(|s| s.versions),
        staleness_weight: c.staleness.map(|s| s.factor),
    }
}

/// Federated evaluation of a round: the participants' held-out metrics
/// averaged by example count, or `None` when no participant held data out.
pub fn federated_eval(contributions: &[crate::core::round::Contribution]) -> Option<fedge_common::task::EvalMetrics> {
    let evals: Vec<_> = contributions.iter().filter_map(|c| c.federated_eval).collect();
    let examples: u64 = evals.iter().map(|e| e.examples).sum();
    (examples > 0).then(|| {
        let w = |f: fn(&fedge_common::task::EvalMetrics) -> f64| {
            evals.iter().map(|e| f(e) * e.examples as f64).sum::<f64>() / examples as f64
        };
        fedge_common::task::EvalMetrics {
            loss: w(|e| e.loss),
            accuracy: w(|e| e.accuracy),
            examples,
        }
    })
}

#[cfg(test)]
mod tests {
    use fedge_common::params::TensorMeta;

    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            tensors: vec![TensorMeta {
                name: "w".into(),
                shape: vec![3],
            }],
        }
    }

    fn history(run_id: &str) -> RunHistory {
        RunHistory::for_tests(run_id)
    }

    fn record(round: u64) -> RoundRecord {
        RoundRecord {
            round,
            selected: 1,
            participants: Vec::new(),
            test_loss: None,
            test_accuracy: None,
            federated_loss: None,
            federated_accuracy: None,
            federated_examples: 0,
            bytes_up: 0,
            bytes_down: 0,
            bytes_down_by_node: BTreeMap::new(),
            rejected_updates: 0,
            refusals: BTreeMap::new(),
            train_phase_seconds: 0.0,
            aggregation_seconds: 0.0,
            eval_seconds: 0.0,
            checkpoint_seconds: 0.0,
            round_seconds: 0.0,
            privacy: None,
            secure_aggregation: None,
            staleness: None,
            closed_unix_ms: 0,
        }
    }

    fn closed(round: u64, global: Vec<f32>, m: Vec<f32>) -> ClosedRound {
        ClosedRound {
            round,
            version: round,
            global: std::sync::Arc::new(global),
            contributions: Vec::new(),
            selected: 1,
            started_ms: 0,
            closed_ms: 0,
            control: None,
            strategy_state: std::sync::Arc::new((BTreeMap::from([("server.m".to_string(), m)]), round)),
            privacy: None,
            secure: None,
        }
    }

    #[test]
    fn an_unfinished_run_resumes_from_its_last_listed_round() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RunStore::create(dir.path(), false, manifest(), history("run-1")).unwrap();
        store
            .persist_initial(&[0.0; 3], &BTreeMap::from([("server.m".to_string(), vec![0.0; 3])]))
            .unwrap();
        store
            .persist_round(&closed(1, vec![1.0; 3], vec![0.1; 3]), record(1))
            .unwrap();
        store
            .persist_round(&closed(2, vec![2.0; 3], vec![0.2; 3]), record(2))
            .unwrap();
        assert!(!dir.path().join("checkpoint/round-0001.safetensors").exists());

        let (store, cp) = RunStore::resume(dir.path(), false, manifest()).unwrap().unwrap();
        assert_eq!(store.history.run_id, "run-1");
        assert_eq!((cp.round, cp.global.clone(), cp.server_steps), (2, vec![2.0; 3], 2));
        assert_eq!(cp.strategy["server.m"], vec![0.2; 3]);

        // Another model in the same folder is refused, naming both sizes.
        let other = Manifest {
            tensors: vec![TensorMeta {
                name: "w".into(),
                shape: vec![4],
            }],
        };
        let err = RunStore::resume(dir.path(), false, other).unwrap_err().to_string();
        assert!(
            err.contains("holds a model of 3 parameters in 1 tensors; this run's model has 4 in 1"),
            "{err}"
        );

        // A damaged checkpoint is refused with the round it belongs to.
        std::fs::write(dir.path().join("checkpoint/round-0002.safetensors"), b"garbage").unwrap();
        let err = RunStore::resume(dir.path(), false, manifest()).unwrap_err().to_string();
        assert!(
            err.starts_with("checkpoint: ")
                && err.contains("round-0002.safetensors: cannot read the checkpoint of round 2"),
            "{err}"
        );

        // A finished run is not resumed; an empty folder has nothing to resume.
        let mut store = RunStore::create(dir.path(), false, manifest(), history("run-1")).unwrap();
        store.finish().unwrap();
        assert!(RunStore::resume(dir.path(), false, manifest()).unwrap().is_none());
        let empty = tempfile::tempdir().unwrap();
        assert!(RunStore::resume(empty.path(), false, manifest()).unwrap().is_none());
        std::fs::write(empty.path().join("run.json"), b"{ not json").unwrap();
        let err = RunStore::resume(empty.path(), false, manifest())
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a fedge run history"), "{err}");
    }
}
