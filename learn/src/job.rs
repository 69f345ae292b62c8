//! One round of a node's work, on the thread that owns its data and model:
//! local training from the round's global model, the node's differential
//! privacy, (robustness experiments only) a simulated adversary, and
//! encoding with the run's codec; and what a node keeps across rounds
//! (SCAFFOLD's client control variate, the codec's error-feedback
//! residual). The edge node's training thread and the simulator's training
//! pool both run it; async code never touches a tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use fedge_common::codec::{Codec, encode_with_feedback};
use fedge_common::params::{self, Manifest};
use fedge_common::task::{Algorithm, EvalMetrics, Hyperparameters, PrivacyTask, TrainMetrics};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use tch::nn::VarStore;

use crate::data::Dataset;
use crate::model::{ModelKind, Net};
use crate::tensors;
use crate::train::{LocalObjective, Pace, evaluate, gradient, train};
use crate::{Error, Result};

/// What one round of local work produced.
#[derive(Debug)]
pub struct TrainResult {
    /// `w_local − w_global` in manifest order, or the gradient for FedSGD.
    pub delta: Vec<f32>,
    /// Whether `delta` is a gradient (FedSGD).
    pub is_gradient: bool,
    /// SCAFFOLD: the client control variate's change this round.
    pub control_delta: Option<Vec<f32>>,
    pub metrics: TrainMetrics,
    /// The received global model on the held-out data, when asked and there is any.
    pub holdout: Option<EvalMetrics>,
    /// `delta` (then `control_delta`) encoded with the run's codec.
    pub payload: Vec<u8>,
}

/// One round's work order.
pub struct Job {
    pub run_id: String,
    /// The round this job trains for (progress display).
    pub round: u64,
    pub kind: ModelKind,
    pub classes: i64,
    pub manifest: Arc<Manifest>,
    pub global: Arc<Vec<f32>>,
    /// SCAFFOLD's server control variate for this round.
    pub server_control: Option<Arc<Vec<f32>>>,
    pub hyper: Hyperparameters,
    /// How to encode the update.
    pub codec: Codec,
}

/// One vector a node keeps across rounds under a key (the run it belongs
/// to), in memory and, with a state folder, in a file there.
struct Kept {
    file: &'static str,
    /// Metadata entry of the file that holds the key.
    key_name: &'static str,
    what: &'static str,
    value: Option<(String, Vec<f32>)>,
}

impl Kept {
    fn new(file: &'static str, key_name: &'static str, what: &'static str) -> Self {
        Self {
            file,
            key_name,
            what,
            value: None,
        }
    }

    /// Leaves in `value` the vector of `len` values stored under `key`, kept
    /// in memory or read back from `dir`, or nothing.
    fn look_up(&mut self, dir: Option<&Path>, key: &str, len: usize) -> Result<()> {
        if self.value.as_ref().is_some_and(|(k, v)| k == key && v.len() == len) {
            return Ok(());
        }
        self.value = None;
        if let Some(dir) = dir {
            let path = dir.join(self.file);
            if path.exists() {
                let loaded = params::load_safetensors(&path)?;
                if loaded.metadata.get(self.key_name).map(String::as_str) == Some(key) && loaded.values.len() == len {
                    tracing::info!(path = %path.display(), "{} restored", self.what);
                    self.value = Some((key.to_owned(), loaded.values));
                }
            }
        }
        Ok(())
    }

    /// A copy of the vector stored under `key`, which stays kept.
    fn get(&mut self, dir: Option<&Path>, key: &str, len: usize) -> Result<Option<Vec<f32>>> {
        self.look_up(dir, key, len)?;
        Ok(self.value.as_ref().map(|(_, v)| v.clone()))
    }

    /// The vector stored under `key`, handed over (store it again after use).
    fn take(&mut self, dir: Option<&Path>, key: &str, len: usize) -> Result<Option<Vec<f32>>> {
        self.look_up(dir, key, len)?;
        Ok(self.value.take().map(|(_, v)| v))
    }

    /// Keeps `values` under `key`, durably when there is a state folder.
    fn store(&mut self, dir: Option<&Path>, key: &str, values: Vec<f32>) -> Result<()> {
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            let meta = HashMap::from([(self.key_name.to_string(), key.to_string())]);
            params::save_tensors(
                &dir.join(self.file),
                vec![("values".to_string(), vec![values.len() as i64], values.as_slice())],
                meta,
            )?;
        }
        self.value = Some((key.to_owned(), values));
        Ok(())
    }
}

/// State a node keeps across rounds (and, with a state folder, across restarts).
/// What a node keeps across rounds: SCAFFOLD's control variate and the
/// codec's error-feedback residual, in memory and, with a state folder, on disk.
pub struct NodeState {
    dir: Option<PathBuf>,
    /// SCAFFOLD's client control variate cᵢ, keyed by run.
    control: Kept,
    /// What earlier payloads did not carry (error feedback), keyed by run and codec.
    residual: Kept,
}

impl NodeState {
    /// A node's state, kept in `dir` when given (read back from there on first use).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            control: Kept::new("scaffold-control.safetensors", "run_id", "scaffold control variate"),
            residual: Kept::new("codec-residual.safetensors", "key", "error-feedback residual"),
        }
    }

    /// Encodes the update (main section, then the control section) with
    /// `codec`, through the error-feedback residual when the codec needs one.
    fn encode(&mut self, job: &Job, delta: &[f32], control: Option<&[f32]>) -> Result<Vec<u8>> {
        let joined;
        let values = match control {
            Some(c) => {
                joined = [delta, c].concat();
                joined.as_slice()
            }
            None => delta,
        };
        let seed = job.hyper.seed;
        if !job.codec.uses_error_feedback() {
            return Ok(job.codec.encode(values, seed));
        }
        let key = format!("{}/{}", job.run_id, job.codec);
        let dir = self.dir.as_deref();
        let mut residual = self.residual.take(dir, &key, values.len())?.unwrap_or_default();
        let payload = encode_with_feedback(&job.codec, values, &mut residual, seed);
        self.residual.store(dir, &key, residual)?;
        Ok(payload)
    }

    /// cᵢ for `run_id`: kept, or read back from the state folder, or zeros.
    fn control(&mut self, run_id: &str, manifest: &Manifest) -> Result<Vec<f32>> {
        let n = manifest.numel();
        Ok(self
            .control
            .get(self.dir.as_deref(), run_id, n)?
            .unwrap_or_else(|| vec![0.0; n]))
    }

    fn store_control(&mut self, run_id: &str, c: Vec<f32>) -> Result<()> {
        self.control.store(self.dir.as_deref(), run_id, c)
    }
}

/// Where a job's training happens: the node's data, whether to stop, how to report.
pub struct Work<'a> {
    pub data: &'a Dataset,
    /// Held-out samples the received global model is evaluated on, when asked.
    pub held_out: Option<&'a Dataset>,
    /// Set to stop training before its next step.
    pub cancel: &'a Arc<AtomicBool>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    pub adversary: &'a AdversaryConfig,
    /// The emulated device speed (`train.slowdown`).
    pub pace: Pace,
}

/// A model on one training thread, built on first use and rebuilt when a
/// job names another architecture. The edge-node daemon has one; an
/// in-process simulation has one per training thread, shared by the
/// virtual nodes whose jobs that thread runs.
pub struct LocalModel {
    device: tch::Device,
    built: Option<(ModelKind, VarStore, Net)>,
}

impl LocalModel {
    pub fn new(device: tch::Device) -> Self {
        Self { device, built: None }
    }

    /// One round of a node's work: local training from the job's global
    /// model, then the node's differential privacy, then (robustness
    /// experiments only) the adversary, then encoding with the run's codec.
    pub fn work(&mut self, work: &Work<'_>, job: &Job, state: &mut NodeState) -> Result<TrainResult> {
        if self.built.as_ref().is_none_or(|(k, _, _)| *k != job.kind) {
            let vs = VarStore::new(self.device);
            let net = job.kind.build(&vs.root(), work.data.shape(), job.classes);
            self.built = Some((job.kind, vs, net));
        }
        let (_, vs, net) = self.built.as_mut().expect("model built above");
        let mut r = run_job(vs, net, work, job, state)?;
        if let Some(p) = job.hyper.privacy {
            privatize(&mut r, p, job.hyper.learning_rate, &mut rand::rng());
        }
        work.adversary.apply(&mut r.delta, job.hyper.seed);
        // Secure aggregation masks the raw values (in the session).
        if job.codec != Codec::Masked {
            let start = std::time::Instant::now();
            r.payload = state.encode(job, &r.delta, r.control_delta.as_deref())?;
            r.metrics.encode_seconds = start.elapsed().as_secs_f64();
        }
        Ok(r)
    }
}

/// Differential privacy on the node: clips the model change the update
/// makes to `p.clip_norm` (for a FedSGD gradient g the change is −η·g, so g
/// is clipped to `clip_norm / η`), then adds the node's share of the noise,
/// drawn from the operating system-seeded CSPRNG, and records whether
/// clipping was needed (adaptive clipping counts it).
fn privatize(r: &mut TrainResult, p: PrivacyTask, learning_rate: f64, rng: &mut impl rand::Rng) {
    let unit = if r.is_gradient && learning_rate > 0.0 {
        learning_rate
    } else {
        1.0
    };
    let norm = fedge_common::privacy::clip(&mut r.delta, p.clip_norm / unit);
    fedge_common::privacy::add_noise(&mut r.delta, p.noise_stddev / unit, rng);
    r.metrics.unclipped = Some(norm <= p.clip_norm / unit);
}

/// A terminal progress bar of one round's local training, drawn on stderr
/// and cleared when the last step is done.
fn progress_bar(round: u64) -> crate::train::StepReport {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "round {prefix:>4} [{bar:32.cyan/blue}] {pos}/{len} steps  loss {msg}  {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(round.to_string());
    Box::new(move |done, total, loss| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(format!("{loss:.4}"));
        if done >= total {
            bar.finish_and_clear();
        }
    })
}

fn run_job(vs: &mut VarStore, net: &Net, work: &Work<'_>, job: &Job, state: &mut NodeState) -> Result<TrainResult> {
    let data = work.data;
    let h = &job.hyper;
    tensors::load_into(vs, &job.manifest, &job.global)?;
    let holdout = if h.evaluate {
        work.held_out.map(|d| evaluate(net, d, 256, vs.device()))
    } else {
        None
    };
    if h.algorithm == Algorithm::FedSgd {
        let (grad, metrics) = gradient(net, vs, data, h, &job.manifest, work.pace)?;
        return Ok(TrainResult {
            delta: grad,
            is_gradient: true,
            control_delta: None,
            metrics,
            holdout,
            payload: Vec::new(),
        });
    }
    let device = vs.device();
    let mut objective = LocalObjective {
        cancel: Some(work.cancel.clone()),
        on_step: work.progress.then(|| progress_bar(job.round)),
        pace: work.pace,
        ..LocalObjective::default()
    };
    let mut client_control = None;
    match h.algorithm {
        Algorithm::FedProx if h.proximal_mu > 0.0 => {
            objective.proximal = Some((h.proximal_mu, tensors::to_tensors(&job.manifest, &job.global, device)?));
        }
        Algorithm::Scaffold => {
            let c = job
                .server_control
                .as_ref()
                .ok_or_else(|| Error::Protocol("a scaffold task without the server control variate".into()))?;
            let ci = state.control(&job.run_id, &job.manifest)?;
            let correction: Vec<f32> = c.iter().zip(&ci).map(|(c, ci)| c - ci).collect();
            objective.correction = tensors::to_tensors(&job.manifest, &correction, device)?;
            client_control = Some(ci);
        }
        _ => {}
    }
    let metrics = train(net, vs, data, h, &objective)?;
    let mut delta = tensors::flatten(vs, &job.manifest)?;
    for (d, g) in delta.iter_mut().zip(job.global.iter()) {
        *d -= g;
    }
    let control_delta = match (client_control, &job.server_control) {
        (Some(ci), Some(c)) => {
            // Option II of Karimireddy et al. 2020:
            // cᵢ⁺ = cᵢ − c + (x − yᵢ)/(K·η) = cᵢ − c − Δ/(K·η), with η the
            // effective step of SGD with momentum β, η/(1 − β): the correction
            // goes through the momentum buffer like the gradient it corrects.
            let k_eta = metrics.steps.max(1) as f64 * h.learning_rate / (1.0 - h.momentum);
            let new: Vec<f32> = ci
                .iter()
                .zip(c.iter())
                .zip(&delta)
                .map(|((&ci, &c), &d)| (f64::from(ci) - f64::from(c) - f64::from(d) / k_eta) as f32)
                .collect();
            let change = new.iter().zip(&ci).map(|(n, o)| n - o).collect();
            state.store_control(&job.run_id, new)?;
            Some(change)
        }
        _ => None,
    };
    Ok(TrainResult {
        delta,
        is_gradient: false,
        control_delta,
        metrics,
        holdout,
        payload: Vec::new(),
    })
}

/// A simulated Byzantine node, to measure how an aggregator copes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdversaryConfig {
    /// `none`, `sign-flip` (send `−scale ×` the honest update) or `noise`
    /// (send Gaussian noise of standard deviation `scale`).
    pub kind: AdversaryKind,
    pub scale: f64,
}

/// Kinds of corrupted updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdversaryKind {
    #[default]
    None,
    SignFlip,
    Noise,
}

impl Default for AdversaryConfig {
    fn default() -> Self {
        Self {
            kind: AdversaryKind::None,
            scale: 10.0,
        }
    }
}

impl AdversaryConfig {
    /// Corrupts an honest update as configured (robustness experiments only).
    pub fn apply(&self, update: &mut [f32], seed: u64) {
        match self.kind {
            AdversaryKind::None => {}
            AdversaryKind::SignFlip => {
                for v in update.iter_mut() {
                    *v = (-self.scale * f64::from(*v)) as f32;
                }
            }
            AdversaryKind::Noise => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xad5e_25a1);
                let normal = Normal::new(0.0, self.scale).expect("scale validated positive");
                for v in update.iter_mut() {
                    *v = normal.sample(&mut rng) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::manifest_of;

    #[test]
    fn privacy_clips_the_models_change_and_adds_the_nodes_noise() {
        use rand::SeedableRng;
        let result = |delta: Vec<f32>, is_gradient: bool| TrainResult {
            delta,
            is_gradient,
            control_delta: None,
            metrics: TrainMetrics::default(),
            holdout: None,
            payload: Vec::new(),
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let clip_only = PrivacyTask {
            clip_norm: 1.0,
            noise_stddev: 0.0,
        };
        let mut r = result(vec![3.0, 4.0], false);
        privatize(&mut r, clip_only, 0.1, &mut rng);
        assert!((r.delta[0] - 0.6).abs() < 1e-6 && (r.delta[1] - 0.8).abs() < 1e-6);
        assert_eq!(r.metrics.unclipped, Some(false));
        let mut r = result(vec![0.3, 0.4], false);
        privatize(&mut r, clip_only, 0.1, &mut rng);
        assert_eq!((r.delta.clone(), r.metrics.unclipped), (vec![0.3, 0.4], Some(true)));
        // A FedSGD gradient g moves the model by −η·g: g is clipped to C/η.
        let mut r = result(vec![30.0, 40.0], true);
        privatize(&mut r, clip_only, 0.1, &mut rng);
        assert!((r.delta[0] - 6.0).abs() < 1e-5 && (r.delta[1] - 8.0).abs() < 1e-5);
        // Noise of the stated standard deviation on every value.
        let mut r = result(vec![0.0; 50_000], false);
        let noisy = PrivacyTask {
            clip_norm: 1.0,
            noise_stddev: 0.2,
        };
        privatize(&mut r, noisy, 0.1, &mut rng);
        let var = r.delta.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / r.delta.len() as f64;
        assert!((var - 0.04).abs() < 0.002, "{var}");
    }

    #[test]
    fn adversaries_corrupt_as_configured() {
        let mut u = vec![1.0f32, -2.0];
        AdversaryConfig {
            kind: AdversaryKind::SignFlip,
            scale: 10.0,
        }
        .apply(&mut u, 0);
        assert_eq!(u, vec![-10.0, 20.0]);
        let mut honest = vec![1.0f32, -2.0];
        AdversaryConfig::default().apply(&mut honest, 0);
        assert_eq!(honest, vec![1.0, -2.0]);
        let mut noisy = vec![0.0f32; 10_000];
        AdversaryConfig {
            kind: AdversaryKind::Noise,
            scale: 3.0,
        }
        .apply(&mut noisy, 7);
        let var = noisy.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 10_000.0;
        assert!((var.sqrt() - 3.0).abs() < 0.1, "std {}", var.sqrt());
    }

    #[test]
    fn the_scaffold_control_variate_estimates_the_local_gradient() {
        // With a tiny learning rate the weights barely move, so cᵢ⁺ (from
        // 200 steps of SGD with momentum 0.9) must match the full-batch
        // gradient at the global model in direction and size.
        tch::manual_seed(1);
        let data = crate::data::synthetic(3, 1, 3200);
        let kind = ModelKind::Mlp2nn;
        let mut vs = VarStore::new(tch::Device::Cpu);
        let net = kind.build(&vs.root(), data.shape(), 10);
        let manifest = Arc::new(manifest_of(&vs));
        let global = Arc::new(tensors::flatten(&vs, &manifest).unwrap());
        let hyper = Hyperparameters {
            algorithm: Algorithm::Scaffold,
            batch_size: 16,
            learning_rate: 1e-4,
            momentum: 0.9,
            evaluate: false,
            ..Default::default()
        };
        let (grad, _) = gradient(&net, &vs, &data, &hyper, &manifest, Pace::default()).unwrap();
        let job = Job {
            run_id: "run-test".into(),
            round: 1,
            kind,
            classes: 10,
            manifest: manifest.clone(),
            global,
            server_control: Some(Arc::new(vec![0.0; manifest.numel()])),
            hyper,
            codec: Codec::F32,
        };
        let mut state = NodeState::new(None);
        let work = Work {
            data: &data,
            held_out: None,
            cancel: &Arc::default(),
            progress: false,
            adversary: &AdversaryConfig::default(),
            pace: Pace::default(),
        };
        let r = run_job(&mut vs, &net, &work, &job, &mut state).unwrap();
        assert_eq!(r.metrics.steps, 200);
        let ci = r.control_delta.unwrap();
        let dot: f64 = ci.iter().zip(&grad).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
        let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let (nc, ng) = (norm(&ci), norm(&grad));
        let cosine = dot / (nc * ng);
        assert!(cosine > 0.95, "direction: cosine {cosine}");
        assert!((0.85..1.15).contains(&(nc / ng)), "size: |c_i| / |grad| = {}", nc / ng);
        // The node keeps cᵢ for the next round.
        assert_eq!(
            state.control.value.as_ref().map(|(id, c)| (id.as_str(), c.len())),
            Some(("run-test", ci.len()))
        );
    }

    #[test]
    fn the_error_feedback_residual_survives_a_restart_and_is_keyed_by_run_and_codec() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = Arc::new(Manifest::default());
        let job = |run: &str, codec: Codec| Job {
            run_id: run.into(),
            round: 1,
            kind: ModelKind::Cnn,
            classes: 10,
            manifest: manifest.clone(),
            global: Arc::new(Vec::new()),
            server_control: None,
            hyper: Hyperparameters::default(),
            codec,
        };
        let topk = Codec::TopK { fraction: 0.25 };
        let update = [4.0f32, 3.0, 2.0, 1.0];
        let mut state = NodeState::new(Some(dir.path().to_path_buf()));
        let first = state.encode(&job("r1", topk), &update, None).unwrap();
        assert_eq!(
            fedge_common::codec::decode(&topk, 4, &first).unwrap(),
            vec![4.0, 0.0, 0.0, 0.0]
        );
        // A restarted node reads the residual back: 3 + 3 = 6 now leads.
        let mut restarted = NodeState::new(Some(dir.path().to_path_buf()));
        let second = restarted.encode(&job("r1", topk), &update, None).unwrap();
        assert_eq!(
            fedge_common::codec::decode(&topk, 4, &second).unwrap(),
            vec![0.0, 6.0, 0.0, 0.0]
        );
        // Another run starts from zero.
        let mut other = NodeState::new(Some(dir.path().to_path_buf()));
        let fresh = other.encode(&job("r2", topk), &update, None).unwrap();
        assert_eq!(fresh, first);
        // Unbiased codecs keep no residual.
        let plain = other.encode(&job("r2", Codec::F16), &update, None).unwrap();
        assert_eq!(plain.len(), 8);
    }
}
