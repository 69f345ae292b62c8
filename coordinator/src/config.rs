//! The coordinator's configuration: every field documented, with defaults
//! that run a small federated job on loopback, and a `validate()` that says
//! what is wrong in words.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedge_common::config::{DataConfig, LogFormat, load_layered};
use fedge_common::model::ModelKind;
use fedge_common::train::Hyperparameters;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Environment prefix of coordinator settings (`FEDGE_ROUNDS=5`, `FEDGE_TRAIN__LEARNING_RATE=0.1`).
pub const ENV_PREFIX: &str = "FEDGE";

/// Everything the coordinator reads at start-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Model architecture, by name (`cnn`, `cnn-wide`).
    pub model: String,
    /// Number of rounds to run.
    pub rounds: u32,
    /// Seed of model initialization, node sampling and per-round shuffling seeds.
    pub seed: u64,
    /// Where the global model, per-round checkpoints and run history go.
    pub out_dir: PathBuf,
    /// Which nodes take part in each round.
    pub sampling: SamplingConfig,
    /// Local training hyper-parameters sent to nodes with each task.
    pub train: TrainConfig,
    /// Central evaluation data (the test split).
    pub data: DataConfig,
    /// Central evaluation.
    pub eval: EvalConfig,
    /// Transport settings.
    pub wire: WireConfig,
    /// Checkpoint settings.
    pub checkpoint: CheckpointConfig,
    /// Log output format.
    pub log_format: LogFormat,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".parse().expect("valid address"),
            model: ModelKind::Cnn.name().into(),
            rounds: 5,
            seed: 42,
            out_dir: PathBuf::from("runs/latest"),
            sampling: SamplingConfig::default(),
            train: TrainConfig::default(),
            data: DataConfig::default(),
            eval: EvalConfig::default(),
            wire: WireConfig::default(),
            checkpoint: CheckpointConfig::default(),
            log_format: LogFormat::Text,
        }
    }
}

/// Node sampling and round closing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// Fraction of connected nodes asked to train in a round (0, 1].
    pub fraction: f64,
    /// Fewest nodes per round: at least this many are asked, and a round
    /// closes at its deadline only if at least this many updates arrived.
    pub min_nodes: u32,
    /// Fewest connected nodes before a round starts.
    pub min_available: u32,
    /// How long a round waits for updates before closing with what it has.
    #[serde(with = "humantime_serde")]
    pub round_deadline: Duration,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            fraction: 1.0,
            min_nodes: 2,
            min_available: 2,
            round_deadline: Duration::from_secs(600),
        }
    }
}

/// Local training hyper-parameters, sent to nodes with every task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Local epochs per round.
    pub epochs: u32,
    /// Local batch size.
    pub batch_size: u32,
    /// SGD learning rate.
    pub learning_rate: f64,
    /// SGD momentum (optimizer state is fresh each round).
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Upper bound on local steps per round; 0: the epochs alone bound training.
    pub max_steps: u64,
    /// Augmentation: random crops after zero padding by this many pixels (0: off).
    pub crop_padding: u32,
    /// Augmentation: random horizontal flips.
    pub horizontal_flip: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let h = Hyperparameters::default();
        Self {
            epochs: h.epochs,
            batch_size: h.batch_size,
            learning_rate: h.learning_rate,
            momentum: h.momentum,
            weight_decay: h.weight_decay,
            max_steps: h.max_steps,
            crop_padding: h.crop_padding,
            horizontal_flip: h.horizontal_flip,
        }
    }
}

impl TrainConfig {
    /// The hyper-parameters for one round, with that round's shuffling seed.
    pub fn hyperparameters(&self, seed: u64) -> Hyperparameters {
        Hyperparameters {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            max_steps: self.max_steps,
            seed,
            crop_padding: self.crop_padding,
            horizontal_flip: self.horizontal_flip,
        }
    }
}

/// Central evaluation of the global model on the coordinator's test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate after every `every` rounds (and always after the last); 0 disables.
    pub every: u32,
    /// Evaluation batch size.
    pub batch_size: usize,
    /// libtorch intra-op threads of the coordinator (0: libtorch's default).
    pub threads: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: 1,
            batch_size: 500,
            threads: 0,
        }
    }
}

/// Transport settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WireConfig {
    /// Size of one model chunk on the wire, in bytes.
    pub chunk_bytes: usize,
}

impl Default for WireConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: fedge_common::wire::DEFAULT_CHUNK_BYTES,
        }
    }
}

/// What is written after each round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Keep every round's global model under `out_dir/rounds/` (besides the
    /// latest in `out_dir/model.safetensors`).
    pub keep_round_models: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            keep_round_models: true,
        }
    }
}

impl CoordinatorConfig {
    /// Reads defaults, then `file`, then `FEDGE_*` variables, then `overrides`, and validates.
    pub fn load(file: Option<&Path>, overrides: &[(String, String)]) -> Result<Self> {
        Self::load_with_env(file, std::env::vars(), overrides)
    }

    /// [`CoordinatorConfig::load`] with the environment given explicitly.
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Self> {
        let cfg: Self = load_layered(file, env, ENV_PREFIX, &["FEDGE_NODE_"], overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configured model architecture.
    pub fn model_kind(&self) -> Result<ModelKind> {
        Ok(self.model.parse()?)
    }

    /// Checks ranges and cross-field rules.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        self.model_kind()?;
        if self.rounds == 0 {
            return bad("rounds must be at least 1".into());
        }
        let s = &self.sampling;
        if !(s.fraction > 0.0 && s.fraction <= 1.0) {
            return bad(format!("sampling.fraction must be in (0, 1], got {}", s.fraction));
        }
        if s.min_nodes == 0 {
            return bad("sampling.min_nodes must be at least 1".into());
        }
        if s.min_available < s.min_nodes {
            return bad(format!(
                "sampling.min_available ({}) must be at least sampling.min_nodes ({})",
                s.min_available, s.min_nodes
            ));
        }
        if s.round_deadline.is_zero() {
            return bad("sampling.round_deadline must be longer than zero".into());
        }
        let t = &self.train;
        if t.epochs == 0 {
            return bad("train.epochs must be at least 1".into());
        }
        if t.batch_size == 0 {
            return bad("train.batch_size must be at least 1".into());
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return bad(format!(
                "train.learning_rate must be a positive number, got {}",
                t.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&t.momentum) {
            return bad(format!("train.momentum must be in [0, 1), got {}", t.momentum));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return bad(format!(
                "train.weight_decay must be zero or positive, got {}",
                t.weight_decay
            ));
        }
        if self.eval.batch_size == 0 {
            return bad("eval.batch_size must be at least 1".into());
        }
        let c = self.wire.chunk_bytes;
        if !(1024..=fedge_common::wire::MAX_CHUNK_BYTES).contains(&c) {
            return bad(format!(
                "wire.chunk_bytes must be between 1024 and {}, got {c}",
                fedge_common::wire::MAX_CHUNK_BYTES
            ));
        }
        if self.out_dir.as_os_str().is_empty() {
            return bad("out_dir must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(k: &str, v: &str) -> String {
        CoordinatorConfig::load_with_env(None, [], &[(k.into(), v.into())])
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_are_valid_and_the_example_file_lists_them() {
        CoordinatorConfig::default().validate().unwrap();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("coordinator.example.toml");
        assert_eq!(
            CoordinatorConfig::load_with_env(Some(&example), [], &[]).unwrap(),
            CoordinatorConfig::default()
        );
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(with("rounds", "0"), "invalid configuration: rounds must be at least 1");
        assert_eq!(
            with("sampling.fraction", "1.5"),
            "invalid configuration: sampling.fraction must be in (0, 1], got 1.5"
        );
        assert_eq!(
            with("sampling.min_available", "1"),
            "invalid configuration: sampling.min_available (1) must be at least sampling.min_nodes (2)"
        );
        assert_eq!(
            with("model", "vgg"),
            "unknown model `vgg` (this build knows: cnn, cnn-wide, mnist-cnn, 2nn, resnet20)"
        );
        assert!(with("sampling.round_deadline", "soon").contains("round_deadline"));
        assert!(with("listen", "nowhere").contains("listen"));
    }

    #[test]
    fn toml_file_and_overrides_combine() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "rounds = 3\n[sampling]\nround_deadline = \"90s\"\n[train]\nlearning_rate = 0.1\n",
        )
        .unwrap();
        let env = [
            ("FEDGE_TRAIN__MOMENTUM".to_string(), "0.5".to_string()),
            ("FEDGE_NODE_NAME".to_string(), "not-ours".to_string()),
        ];
        let c = CoordinatorConfig::load_with_env(Some(&f), env, &[("train.epochs".into(), "2".into())]).unwrap();
        assert_eq!(c.train.momentum, 0.5);
        assert_eq!(c.rounds, 3);
        assert_eq!(c.sampling.round_deadline, Duration::from_secs(90));
        assert_eq!((c.train.learning_rate, c.train.epochs), (0.1, 2));
    }
}
