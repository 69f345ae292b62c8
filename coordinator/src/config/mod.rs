//! The coordinator's configuration: every field documented, with defaults
//! that run a small federated job on loopback, and a `validate()` that says
//! what is wrong in words.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedge_common::config::{LogFormat, load_layered};
use fedge_learn::data::DataConfig;
use fedge_learn::model::ModelKind;
use serde::{Deserialize, Serialize};

pub use crate::core::privacy::NoiseMode;
use crate::{Error, Result};

mod asynchronous;
mod checkpoint;
mod http;
mod limits;
mod privacy;
mod rules;
mod security;
mod simulation;
mod strategy;
#[cfg(test)]
mod tests;
mod training;
mod wire;

pub use asynchronous::{AsyncConfig, StalenessWeightName};
pub use checkpoint::CheckpointConfig;
pub use http::HttpConfig;
pub use limits::LimitsConfig;
pub use privacy::{PrivacyConfig, SecureAggregationConfig};
pub use security::{NodeAuth, SecurityConfig};
pub use simulation::SimulationConfig;
pub use strategy::{AUTO_F64_MAX_PARAMETERS, AccumulatorName, AggregatorName, ServerOptName, StrategyConfig};
pub use training::{EvalConfig, LrSchedule, SamplingConfig, TrainConfig};
pub use wire::{CodecConfig, WireConfig};

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
    /// Asynchronous buffered aggregation instead of rounds (`[async]`).
    #[serde(rename = "async")]
    pub asynchronous: AsyncConfig,
    /// Local training hyper-parameters sent to nodes with each task.
    pub train: TrainConfig,
    /// How updates are bounded, combined and applied to the global model.
    pub strategy: StrategyConfig,
    /// Central evaluation data (the test split).
    pub data: DataConfig,
    /// Central evaluation.
    pub eval: EvalConfig,
    /// Transport settings.
    pub wire: WireConfig,
    /// How nodes encode their updates.
    pub codec: CodecConfig,
    /// Checkpoint settings.
    pub checkpoint: CheckpointConfig,
    /// TLS, node authentication and the allow-list.
    pub security: SecurityConfig,
    /// Bounds on what uploads may hold: concurrency, bytes in flight, idle time.
    pub limits: LimitsConfig,
    /// The HTTP side: health check and JSON status.
    pub http: HttpConfig,
    /// Differential privacy (DP-FedAvg).
    pub privacy: PrivacyConfig,
    /// Secure aggregation (SecAgg+): the coordinator sees only the sum.
    pub secure_aggregation: SecureAggregationConfig,
    /// In-process simulation of a fleet (`coordinator simulate`).
    pub simulation: SimulationConfig,
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
            asynchronous: AsyncConfig::default(),
            train: TrainConfig::default(),
            strategy: StrategyConfig::default(),
            data: DataConfig::default(),
            eval: EvalConfig::default(),
            wire: WireConfig::default(),
            codec: CodecConfig::default(),
            checkpoint: CheckpointConfig::default(),
            security: SecurityConfig::default(),
            limits: LimitsConfig::default(),
            http: HttpConfig::default(),
            privacy: PrivacyConfig::default(),
            secure_aggregation: SecureAggregationConfig::default(),
            simulation: SimulationConfig::default(),
            log_format: LogFormat::Text,
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
        let cfg = Self::load_unchecked(file, env, overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`CoordinatorConfig::load_with_env`] without [`CoordinatorConfig::validate`],
    /// for callers that complete the configuration first (a local fleet
    /// adds its development certificates).
    pub fn load_unchecked(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Self> {
        load_layered(file, env, ENV_PREFIX, &["FEDGE_NODE_"], overrides).map_err(Error::from)
    }

    /// The configured model architecture.
    pub fn model_kind(&self) -> Result<ModelKind> {
        Ok(self.model.parse()?)
    }

    /// Checks every section's ranges (beside each section) and the rules
    /// that tie sections together (`rules.rs`), each rule after the
    /// sections it reads.
    pub fn validate(&self) -> Result<()> {
        self.model_kind()?;
        if self.rounds == 0 {
            return Err(Error::Config("rounds must be at least 1".into()));
        }
        if self.out_dir.as_os_str().is_empty() {
            return Err(Error::Config("out_dir must not be empty".into()));
        }
        self.check_ports()?;
        self.sampling.validate()?;
        self.train.validate()?;
        self.strategy.validate()?;
        self.check_training()?;
        self.codec.validate()?;
        self.eval.validate()?;
        self.wire.validate()?;
        self.security.validate()?;
        self.http.validate()?;
        self.check_access()?;
        self.privacy.validate()?;
        self.check_privacy()?;
        self.secure_aggregation.validate()?;
        self.check_secure_aggregation()?;
        self.asynchronous.validate()?;
        self.check_async()?;
        self.simulation.validate()?;
        self.limits.validate()?;
        self.check_limits()
    }
}
