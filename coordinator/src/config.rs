//! The coordinator's configuration: every field documented, with defaults
//! that run a small federated job on loopback, and a `validate()` that says
//! what is wrong in words.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedge_common::config::{LogFormat, load_layered};
use fedge_common::task::{Algorithm, Hyperparameters, LocalOptimizer};
use fedge_learn::data::DataConfig;
use fedge_learn::model::ModelKind;
use fedge_learn::partition::{Scheme, SchemeParams};
use serde::{Deserialize, Serialize};

use crate::core::strategy::{Aggregator, Precision, ServerOpt, Weighting};
use crate::{Error, Result};
use fedge_common::codec::Codec;

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

/// Client-level differential privacy (DP-FedAvg, McMahan et al. 2018).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Who adds the Gaussian noise: `off`, `central` (the coordinator, to
    /// the sum; nodes trust it with their clipped updates) or `distributed`
    /// (each of the round's m nodes adds 1/√m of it to its own update).
    pub noise: NoiseMode,
    /// Noise standard deviation over the clipping norm (z).
    pub noise_multiplier: f64,
    /// L2 norm every update is clipped to (the initial one when adaptive).
    pub clip_norm: f64,
    /// Let the clipping norm follow `target_quantile` of the update norms
    /// (Andrew et al. 2021).
    pub adaptive_clip: bool,
    /// Adaptive clipping: the fraction of updates that should need no clipping.
    pub target_quantile: f64,
    /// Adaptive clipping: learning rate of the geometric update of the norm.
    pub clip_learning_rate: f64,
    /// Adaptive clipping: standard deviation of the noise on the count of
    /// unclipped updates (0: a twentieth of the nodes per round).
    pub clip_count_stddev: f64,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    /// Stop the run before a round would take ε past this (0: no budget).
    pub epsilon_budget: f64,
}

/// Who adds DP noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseMode {
    #[default]
    Off,
    Central,
    Distributed,
}

impl NoiseMode {
    /// The name in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Central => "central",
            Self::Distributed => "distributed",
        }
    }
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            noise: NoiseMode::Off,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            adaptive_clip: false,
            target_quantile: 0.5,
            clip_learning_rate: 0.2,
            clip_count_stddev: 0.0,
            delta: 1e-5,
            epsilon_budget: 0.0,
        }
    }
}

impl PrivacyConfig {
    /// Whether differential privacy is on.
    pub fn enabled(&self) -> bool {
        self.noise != NoiseMode::Off
    }

    fn validate(&self, strategy: &StrategyConfig, algorithm: Algorithm) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        let bad = |m: String| Err(Error::Config(format!("privacy: {m}")));
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return bad(format!(
                "noise_multiplier must be positive, got {}",
                self.noise_multiplier
            ));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return bad(format!("clip_norm must be positive, got {}", self.clip_norm));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return bad(format!("delta must be in (0, 1), got {}", self.delta));
        }
        if !(self.epsilon_budget.is_finite() && self.epsilon_budget >= 0.0) {
            return bad(format!(
                "epsilon_budget must be zero (none) or positive, got {}",
                self.epsilon_budget
            ));
        }
        if self.adaptive_clip {
            if !(self.target_quantile > 0.0 && self.target_quantile < 1.0) {
                return bad(format!(
                    "target_quantile must be in (0, 1), got {}",
                    self.target_quantile
                ));
            }
            if !(self.clip_learning_rate.is_finite() && self.clip_learning_rate > 0.0) {
                return bad(format!(
                    "clip_learning_rate must be positive, got {}",
                    self.clip_learning_rate
                ));
            }
            if !(self.clip_count_stddev.is_finite() && self.clip_count_stddev >= 0.0) {
                return bad(format!(
                    "clip_count_stddev must be zero (automatic) or positive, got {}",
                    self.clip_count_stddev
                ));
            }
        }
        let agg = strategy.aggregator();
        if agg != Aggregator::Mean {
            return bad(format!(
                "differential privacy bounds what one node adds to a sum of clipped updates, so it needs \
                 strategy.aggregator = \"mean\"; {agg} looks at individual updates"
            ));
        }
        if strategy.clip_norm > 0.0 {
            return bad(
                "strategy.clip_norm and privacy.clip_norm both clip updates; set only privacy.clip_norm".into(),
            );
        }
        if algorithm == Algorithm::Scaffold {
            return bad(
                "train.algorithm = \"scaffold\" sends control variates that the clipping does not bound; \
                 use fedavg, fedprox or fedsgd"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Secure aggregation (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020):
/// nodes mask their quantized updates with pairwise masks that cancel in
/// the sum, so the coordinator learns the sum of the round's surviving
/// updates and nothing about any one of them. See `fedge_common::secagg`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecureAggregationConfig {
    pub enabled: bool,
    /// Neighbours of each node (SecAgg+'s graph: a node shares secrets and
    /// masks with these only); 0: every other node of the round (SecAgg).
    pub neighbours: u32,
    /// Fraction of a node's share holders that may drop out while its
    /// secrets can still be rebuilt: the Shamir threshold is
    /// ⌈(1 − max_dropout) · holders⌉. Below 0.5, so that no two disjoint
    /// sets of holders can both rebuild a secret.
    pub max_dropout: f64,
    /// Update values are clamped to [−range, range] before quantization.
    pub range: f64,
    /// How long the key advertisement, key sharing and unmasking steps each
    /// wait for the nodes before going on without those that are silent.
    #[serde(with = "humantime_serde")]
    pub step_timeout: Duration,
}

impl Default for SecureAggregationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            neighbours: 0,
            max_dropout: 0.3,
            range: 4.0,
            step_timeout: Duration::from_secs(30),
        }
    }
}

impl SecureAggregationConfig {
    fn validate(&self, config: &CoordinatorConfig) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let bad = |m: String| Err(Error::Config(format!("secure_aggregation: {m}")));
        if !(0.0..0.5).contains(&self.max_dropout) {
            return bad(format!("max_dropout must be in [0, 0.5), got {}", self.max_dropout));
        }
        if !(self.range.is_finite() && self.range > 0.0) {
            return bad(format!("range must be positive, got {}", self.range));
        }
        if self.step_timeout.is_zero() {
            return bad("step_timeout must be longer than zero".into());
        }
        if self.neighbours == 1 {
            return bad("neighbours must be 0 (every node) or at least 2".into());
        }
        if config.sampling.min_nodes < 3 {
            return bad(format!(
                "sampling.min_nodes is {}; a sum of fewer than 3 updates would show one node's update to \
                 another who knows its own, so secure aggregation needs at least 3",
                config.sampling.min_nodes
            ));
        }
        let st = &config.strategy;
        let agg = st.aggregator();
        if agg != Aggregator::Mean {
            return bad(format!(
                "the coordinator sees only the sum of the updates, so it cannot run strategy.aggregator = \
                 \"{agg}\", which looks at individual updates; use \"mean\""
            ));
        }
        if st.clip_norm > 0.0 || st.max_update_norm > 0.0 {
            return bad(
                "strategy.clip_norm and strategy.max_update_norm need each update's norm, which the coordinator \
                 cannot see; clip on the nodes with privacy.clip_norm"
                    .into(),
            );
        }
        if config.train.algorithm == Algorithm::Scaffold {
            return bad(
                "train.algorithm = \"scaffold\" sends control variates beside the update; use fedavg, \
                 fedprox or fedsgd"
                    .into(),
            );
        }
        if config.codec.update != "f32" {
            return bad(format!(
                "masked updates are 32-bit ring elements, so codec.update must be \"f32\" (got \"{}\")",
                config.codec.update
            ));
        }
        if config.privacy.noise == NoiseMode::Central {
            return bad(
                "privacy.noise = \"central\" has the coordinator clip each update, which it cannot see; \
                 use \"distributed\" (the nodes clip and add the noise)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The coordinator's HTTP server: dashboard, `/api/*`, `/metrics`,
/// `/healthz`. It follows `security`: HTTPS with the coordinator's
/// certificate when gRPC uses TLS, and operator authentication (a bearer
/// token or an operator's client certificate, see `operators`) when nodes
/// must authenticate or `operators` is set. `/healthz` and the dashboard's
/// page itself (which holds no data) stay open.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address, e.g. `0.0.0.0:8080`; unset: no HTTP server.
    pub listen: Option<SocketAddr>,
    /// A TOML file of operators (`[operators]` with `name = "sha256:<hex>"`
    /// token hashes; `coordinator certs` writes one). A request is let in
    /// with `Authorization: Bearer <token>` of a listed operator, or over a
    /// client certificate (signed by `security.client_ca`) whose common
    /// name is a listed operator's.
    pub operators: Option<PathBuf>,
    /// Serve plaintext HTTP to anyone, whatever `security` says (behind a
    /// proxy that does TLS and authentication itself).
    pub insecure: bool,
}

impl HttpConfig {
    /// Whether the HTTP side is served over TLS.
    pub fn tls(&self, security: &SecurityConfig) -> bool {
        security.tls_cert.is_some() && !self.insecure
    }

    /// Whether requests for data must come from an operator.
    pub fn authenticated(&self, security: &SecurityConfig) -> bool {
        !self.insecure && (self.operators.is_some() || security.node_auth != NodeAuth::None)
    }

    fn validate(&self, security: &SecurityConfig) -> Result<()> {
        if self.listen.is_none() {
            return Ok(());
        }
        if self.insecure && self.operators.is_some() {
            return Err(Error::Config(
                "http: insecure = true serves the HTTP side to anyone, yet operators is set; choose one".into(),
            ));
        }
        if self.authenticated(security) && self.operators.is_none() {
            return Err(Error::Config(format!(
                "http: nodes must authenticate (security.node_auth = \"{}\"), so the HTTP side must too: set \
                 http.operators to a file of operator token hashes (`coordinator certs` writes operators.toml), \
                 or http.insecure = true to serve it to anyone (behind your own authenticating proxy)",
                security.node_auth.name()
            )));
        }
        Ok(())
    }
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

/// An in-process simulation (`coordinator simulate`): virtual nodes,
/// each holding one share of `data.path`'s training split, trained by a
/// pool of threads with the edge node's own training code, driving this
/// run's round machine. Every other section applies as in a served run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulationConfig {
    /// Number of virtual nodes (named sim-1 … sim-N).
    pub nodes: u32,
    /// How the training split is shared among them: `iid`, `dirichlet`,
    /// `shards` or `quantity` (as `coordinator partition`).
    pub partition: String,
    /// Dirichlet concentration α (`dirichlet`).
    pub alpha: f64,
    /// Fewest samples a Dirichlet draw must give each node (`dirichlet`).
    pub min_size: usize,
    /// Shards, so at most this many labels, per node (`shards`).
    pub labels_per_node: usize,
    /// σ of the log-normal node sizes (`quantity`).
    pub sigma: f64,
    /// Training threads, each running one node's job at a time (0: one per core).
    pub trainers: u32,
    /// libtorch threads of each training thread.
    pub trainer_threads: u32,
}

impl Default for SimulationConfig {
    fn default() -> Self {
        Self {
            nodes: 100,
            partition: "iid".into(),
            alpha: 0.5,
            min_size: 10,
            labels_per_node: 2,
            sigma: 1.0,
            trainers: 0,
            trainer_threads: 1,
        }
    }
}

impl SimulationConfig {
    /// The partition scheme, validated.
    pub fn scheme(&self) -> Result<Scheme> {
        Scheme::from_params(&SchemeParams {
            name: &self.partition,
            alpha: self.alpha,
            min_size: self.min_size,
            labels_per_node: self.labels_per_node,
            sigma: self.sigma,
        })
        .map_err(|e| match e {
            fedge_learn::Error::Config(m) => Error::Config(format!("simulation: {m}")),
            other => other.into(),
        })
    }

    /// Training threads: as configured, or one per core.
    pub fn trainer_count(&self) -> usize {
        match self.trainers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.nodes == 0 {
            return Err(Error::Config("simulation.nodes must be at least 1".into()));
        }
        if self.trainer_threads == 0 {
            return Err(Error::Config("simulation.trainer_threads must be at least 1".into()));
        }
        self.scheme().map(drop)
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
    /// Attempts a round gets (retries after too few updates) before the run
    /// stops with an error; 0: retry forever.
    pub max_attempts: u32,
    /// Nodes that were asked to train and did not deliver within this many
    /// rounds are picked only after every other available node; those that
    /// stayed connected without delivering (too slow, refused, or holding
    /// their update back) sit those rounds out, as if they were away, while
    /// `min_nodes` others are available, twice as many after each further
    /// cut before they deliver again, up to 32 times (0: off).
    pub failure_cooldown_rounds: u32,
    /// Once half the selected nodes (and at least `min_nodes`) have
    /// delivered, a round closes without the others when this many times
    /// as long as that half took has passed since the round started (and
    /// at least a second after the half): no node that holds back its
    /// update, slow or hostile, stalls a round until its deadline (0: wait
    /// for the deadline; simulations never cut).
    pub straggler_factor: f64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            fraction: 1.0,
            min_nodes: 2,
            min_available: 2,
            round_deadline: Duration::from_secs(600),
            max_attempts: 10,
            failure_cooldown_rounds: 3,
            straggler_factor: 3.0,
        }
    }
}

/// Local training hyper-parameters, sent to nodes with every task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// What nodes compute: `fedavg`, `fedsgd`, `fedprox` or `scaffold`.
    pub algorithm: Algorithm,
    /// FedProx's proximal weight μ.
    pub proximal_mu: f64,
    /// Local optimizer: `sgd` (momentum, weight decay) or `adam`.
    pub optimizer: LocalOptimizer,
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
    /// Learning rate by round: `constant`, `step` (× `lr_decay` every
    /// `lr_step_rounds`), `exponential` (× `lr_decay` every round) or `cosine`
    /// (from `learning_rate` down to `lr_min` at the last round).
    pub lr_schedule: LrSchedule,
    pub lr_decay: f64,
    pub lr_step_rounds: u32,
    pub lr_min: f64,
}

/// Learning-rate schedules over rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    #[default]
    Constant,
    Step,
    Exponential,
    Cosine,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let h = Hyperparameters::default();
        Self {
            algorithm: h.algorithm,
            proximal_mu: 0.01,
            optimizer: h.optimizer,
            epochs: h.epochs,
            batch_size: h.batch_size,
            learning_rate: h.learning_rate,
            momentum: h.momentum,
            weight_decay: h.weight_decay,
            max_steps: h.max_steps,
            crop_padding: h.crop_padding,
            horizontal_flip: h.horizontal_flip,
            lr_schedule: LrSchedule::Constant,
            lr_decay: 0.5,
            lr_step_rounds: 10,
            lr_min: 0.0,
        }
    }
}

impl TrainConfig {
    /// The local learning rate of round `round` (1-based) of `total`.
    pub fn learning_rate_at(&self, round: u64, total: u64) -> f64 {
        let done = round.saturating_sub(1) as f64;
        match self.lr_schedule {
            LrSchedule::Constant => self.learning_rate,
            LrSchedule::Step => {
                let steps = round.saturating_sub(1) / u64::from(self.lr_step_rounds.max(1));
                self.learning_rate * self.lr_decay.powi(steps as i32)
            }
            LrSchedule::Exponential => self.learning_rate * self.lr_decay.powf(done),
            LrSchedule::Cosine => {
                let span = total.saturating_sub(1).max(1) as f64;
                let t = (done / span).min(1.0);
                self.lr_min + (self.learning_rate - self.lr_min) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
            }
        }
    }

    /// The hyper-parameters of round `round` of `total`, with that node's seed.
    pub fn hyperparameters(&self, round: u64, total: u64, seed: u64, evaluate: bool) -> Hyperparameters {
        Hyperparameters {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate_at(round, total),
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            max_steps: self.max_steps,
            seed,
            crop_padding: self.crop_padding,
            horizontal_flip: self.horizontal_flip,
            algorithm: self.algorithm,
            proximal_mu: self.proximal_mu,
            optimizer: self.optimizer,
            evaluate,
            privacy: None,
        }
    }
}

/// The server side of the algorithm: update bounding, aggregation, server optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StrategyConfig {
    /// `mean` (FedAvg, weighted by samples), `median`, `trimmed-mean`,
    /// `krum`, `multi-krum` or `bulyan`.
    pub aggregator: AggregatorName,
    /// Trimmed mean: fraction β of values dropped at each end, per coordinate, in [0, 0.5).
    pub trim_fraction: f64,
    /// Krum, Multi-Krum, Bulyan: number f of Byzantine updates to tolerate.
    pub byzantine: u32,
    /// Multi-Krum: updates averaged (0: all but `byzantine`).
    pub multi_krum_m: u32,
    /// Bound on each update's L2 norm; larger updates are scaled down to it (0: off).
    pub clip_norm: f64,
    /// Updates whose L2 norm exceeds this are refused (0: no limit).
    pub max_update_norm: f64,
    /// Updates whose L2 norm exceeds this many times the larger of the
    /// global model's norm and the median norm of the last completed
    /// round's updates are refused (0: off). Needs no tuning: it follows
    /// the run's own scale.
    pub max_norm_factor: f64,
    /// A node's FedAvg weight is its sample count, capped at this many
    /// times the median count its round's cohort declared at join, so a
    /// node that lies about its data cannot outweigh the rest (0: no cap).
    pub max_weight_factor: f64,
    /// Weigh every update the same, whatever its sample count.
    pub equal_weights: bool,
    /// Each new global model is evaluated before it is committed; one whose
    /// central loss exceeds this many times the last committed model's is
    /// rejected, and the round retried without the update that weighed
    /// most (0: no check; off under differential privacy).
    pub max_loss_ratio: f64,
    /// `sgd` (FedAvg when `server_lr` = 1), `momentum` (FedAvgM), `adagrad`,
    /// `adam` or `yogi` (FedAdagrad, FedAdam, FedYogi).
    pub server_optimizer: ServerOptName,
    /// Server learning rate η (adaptive optimizers usually want 0.01 to 0.1).
    pub server_lr: f64,
    /// FedAvgM's server momentum β.
    pub server_momentum: f64,
    /// Adaptive optimizers' β₁, β₂ and τ (Reddi et al. 2021).
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
    /// Precision of the mean's running sum: `f64` (the result does not depend
    /// on arrival order; 8 bytes per parameter), `f32` (4 bytes per
    /// parameter), or `auto` (f64 up to 16 M parameters, f32 above).
    pub accumulator: AccumulatorName,
}

/// Precision names in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccumulatorName {
    #[default]
    Auto,
    F64,
    F32,
}

/// Models up to this many parameters get an f64 running sum under `auto`.
pub const AUTO_F64_MAX_PARAMETERS: usize = 16 << 20;

/// Aggregator names in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AggregatorName {
    #[default]
    Mean,
    Median,
    TrimmedMean,
    Krum,
    MultiKrum,
    Bulyan,
}

/// Server optimizer names in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerOptName {
    #[default]
    Sgd,
    Momentum,
    Adagrad,
    Adam,
    Yogi,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            aggregator: AggregatorName::Mean,
            trim_fraction: 0.1,
            byzantine: 1,
            multi_krum_m: 0,
            clip_norm: 0.0,
            max_update_norm: 0.0,
            max_norm_factor: 5.0,
            max_weight_factor: 4.0,
            equal_weights: false,
            max_loss_ratio: 2.0,
            server_optimizer: ServerOptName::Sgd,
            server_lr: 1.0,
            server_momentum: 0.9,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            accumulator: AccumulatorName::Auto,
        }
    }
}

impl StrategyConfig {
    /// The configured aggregator.
    pub fn aggregator(&self) -> Aggregator {
        let f = self.byzantine as usize;
        match self.aggregator {
            AggregatorName::Mean => Aggregator::Mean,
            AggregatorName::Median => Aggregator::Median,
            AggregatorName::TrimmedMean => Aggregator::TrimmedMean {
                beta: self.trim_fraction,
            },
            AggregatorName::Krum => Aggregator::Krum { f },
            AggregatorName::MultiKrum => Aggregator::MultiKrum {
                f,
                m: self.multi_krum_m as usize,
            },
            AggregatorName::Bulyan => Aggregator::Bulyan { f },
        }
    }

    /// The configured server optimizer.
    pub fn server_opt(&self) -> ServerOpt {
        let (beta1, beta2, tau) = (self.beta1, self.beta2, self.tau);
        match self.server_optimizer {
            ServerOptName::Sgd => ServerOpt::Sgd,
            ServerOptName::Momentum => ServerOpt::Momentum {
                beta: self.server_momentum,
            },
            ServerOptName::Adagrad => ServerOpt::Adagrad { beta1, tau },
            ServerOptName::Adam => ServerOpt::Adam { beta1, beta2, tau },
            ServerOptName::Yogi => ServerOpt::Yogi { beta1, beta2, tau },
        }
    }

    /// The running sum's precision for a model of `numel` parameters.
    pub fn precision(&self, numel: usize) -> Precision {
        match self.accumulator {
            AccumulatorName::F64 => Precision::F64,
            AccumulatorName::F32 => Precision::F32,
            AccumulatorName::Auto if numel <= AUTO_F64_MAX_PARAMETERS => Precision::F64,
            AccumulatorName::Auto => Precision::F32,
        }
    }

    /// The bound on update norms, if any.
    pub fn clip(&self) -> Option<f64> {
        (self.clip_norm > 0.0).then_some(self.clip_norm)
    }

    /// The norm above which updates are refused, if any.
    pub fn max_norm(&self) -> Option<f64> {
        (self.max_update_norm > 0.0).then_some(self.max_update_norm)
    }

    /// The multiple of the model's (or last round's median update) norm
    /// above which updates are refused, if any.
    pub fn max_norm_factor(&self) -> Option<f64> {
        (self.max_norm_factor > 0.0).then_some(self.max_norm_factor)
    }

    /// How updates are weighted in the mean.
    pub fn weighting(&self) -> Weighting {
        Weighting {
            equal: self.equal_weights,
            max_factor: (self.max_weight_factor > 0.0).then_some(self.max_weight_factor),
        }
    }
}

/// Central evaluation of the global model on the coordinator's test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate after every `every` rounds (and always after the last); 0 disables.
    pub every: u32,
    /// Federated evaluation (nodes' held-out data) every this many rounds
    /// (and always in the last); 0 disables.
    pub federated_every: u32,
    /// Evaluation batch size. Activations grow with it (a batch of 500
    /// CIFAR-10 images through the wide model holds ~300 MiB), while
    /// evaluation speed barely does beyond ~100.
    pub batch_size: usize,
    /// libtorch intra-op threads of the coordinator (0: libtorch's default).
    pub threads: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: 1,
            federated_every: 1,
            batch_size: 100,
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

/// Update compression: the codec every node uses for its updates,
/// announced when it joins. Models always travel as f32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CodecConfig {
    /// `f32` (lossless), `f16`, `bf16`, `int8` (per-block scale, stochastic
    /// rounding), `topk` (largest magnitudes, error feedback) or `sign`
    /// (signs and per-block magnitude, error feedback).
    pub update: String,
    /// Values per block of `int8` and `sign`.
    pub block: u32,
    /// `topk`: fraction of values each node sends, in (0, 1].
    pub topk_fraction: f64,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            update: "f32".into(),
            block: fedge_common::codec::DEFAULT_BLOCK,
            topk_fraction: 0.01,
        }
    }
}

impl CodecConfig {
    /// The configured codec.
    pub fn codec(&self) -> Result<Codec> {
        let named = |e: fedge_common::Error| {
            Error::Config(format!(
                "codec: {}",
                e.to_string().trim_start_matches("invalid configuration: ")
            ))
        };
        // Every field is checked, whichever codec is chosen.
        Codec::Int8 { block: self.block }.validate().map_err(named)?;
        Codec::TopK {
            fraction: self.topk_fraction,
        }
        .validate()
        .map_err(named)?;
        Codec::from_parts(&self.update, self.block, self.topk_fraction).map_err(named)
    }
}

/// What is written after each round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Keep every round's global model under `out_dir/rounds/` (besides the
    /// latest in `out_dir/model.safetensors`).
    pub keep_round_models: bool,
    /// Continue an unfinished run found in `out_dir` (its model, strategy
    /// state and history) instead of starting over.
    pub resume: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            keep_round_models: true,
            resume: true,
        }
    }
}

/// Transport security and node identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Serve plaintext gRPC without TLS. For development on one machine
    /// only; the coordinator says so loudly at start. Without it, `tls_cert`
    /// and `tls_key` are required.
    pub insecure: bool,
    /// The coordinator's certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// The coordinator's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The CA that signs node certificates (PEM). Set: every connection must
    /// present a certificate it signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// How a node proves its name when it joins: `certificate` (mutual TLS;
    /// the certificate's common name is the node's name), `token` (a
    /// per-node secret sent as `authorization: Bearer …`, checked against
    /// `tokens`), or `none`.
    pub node_auth: NodeAuth,
    /// `token`: a TOML file mapping node names to `sha256:<hex>` token
    /// hashes (`coordinator certs` writes one). Unlisted names are refused.
    pub tokens: Option<PathBuf>,
    /// Names of the nodes that may join; empty: any node that authenticates.
    pub allow: Vec<String>,
}

/// How nodes authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeAuth {
    #[default]
    None,
    Token,
    Certificate,
}

impl NodeAuth {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Token => "token",
            Self::Certificate => "certificate",
        }
    }
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            insecure: false,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            node_auth: NodeAuth::None,
            tokens: None,
            allow: Vec::new(),
        }
    }
}

impl SecurityConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("security: {m}")));
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => return bad("tls_cert and tls_key go together; set both or neither"),
            (None, None) if !self.insecure => {
                return bad(
                    "no TLS certificate configured: set security.tls_cert and security.tls_key \
                     (`coordinator certs` makes a development CA and certificates), or set \
                     security.insecure = true to serve plaintext gRPC (development only)",
                );
            }
            (Some(_), Some(_)) if self.insecure => {
                return bad("security.insecure = true contradicts tls_cert/tls_key; choose one");
            }
            _ => {}
        }
        if self.client_ca.is_some() && self.tls_cert.is_none() {
            return bad("client_ca (mutual TLS) needs tls_cert and tls_key");
        }
        match self.node_auth {
            NodeAuth::Certificate if self.client_ca.is_none() => {
                bad("node_auth = \"certificate\" needs client_ca, the CA that signs node certificates")
            }
            NodeAuth::Token if self.tokens.is_none() => {
                bad("node_auth = \"token\" needs tokens, the file of node token hashes")
            }
            _ => Ok(()),
        }?;
        if let Some(n) = self.allow.iter().find(|n| n.trim().is_empty()) {
            return bad(&format!("allow lists an empty node name ({n:?})"));
        }
        Ok(())
    }
}

/// Bounds on uploads, so that slow, stalled or hostile clients cannot hold
/// up others or grow the coordinator's memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Update streams read at once; further uploads wait for a slot.
    pub max_concurrent_uploads: u32,
    /// Announced payload bytes of the updates being read at once; an upload
    /// waits until its bytes fit, and one larger than this is refused.
    pub max_inflight_bytes: u64,
    /// Model downloads streamed at once; more wait for a slot.
    pub max_concurrent_downloads: u32,
    /// How long an upload or download may wait for a slot before it is
    /// refused (`RESOURCE_EXHAUSTED`; the node retries).
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// A download holds its slot at most this long: a client that stops
    /// reading cannot keep others waiting (its node still has no second
    /// download while the stream is open).
    #[serde(with = "humantime_serde")]
    pub download_slot_timeout: Duration,
    /// An update stream that sends nothing for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// An update stream must deliver its payload at least this fast on
    /// average (after a grace of `stream_idle_timeout`), or it is dropped:
    /// a trickle cannot hold an upload slot for ever (0: no floor).
    pub min_upload_bytes_per_sec: u64,
    /// Largest gRPC message (one chunk) the coordinator accepts, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// HTTP/2 receive window per stream, in bytes: what one client may have
    /// in flight towards the coordinator before it is read. An upload
    /// waiting for a slot holds up to this much; larger windows move data
    /// faster over long links.
    pub stream_window_bytes: u32,
    /// Memory that received updates waiting to be folded (or, for robust
    /// aggregators, to be aggregated) may hold together; beyond it they
    /// are spooled to `out_dir/spool/`.
    pub spool_memory_bytes: u64,
    /// Global models up to this size stay in memory while a round runs;
    /// larger ones are read back from their checkpoint file (fetches stream
    /// from it, the aggregation reads it a block at a time), so the round's
    /// running sum is the only model-sized buffer. Simulations keep the
    /// model in memory, where their virtual nodes read it.
    pub resident_model_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_concurrent_uploads: 64,
            max_inflight_bytes: 8 << 30,
            max_concurrent_downloads: 64,
            queue_timeout: Duration::from_secs(300),
            download_slot_timeout: Duration::from_secs(120),
            stream_idle_timeout: Duration::from_secs(60),
            min_upload_bytes_per_sec: 4096,
            max_message_bytes: 4 << 20,
            max_streams_per_connection: 16,
            stream_window_bytes: 1 << 20,
            spool_memory_bytes: 256 << 20,
            resident_model_bytes: 64 << 20,
        }
    }
}

impl LimitsConfig {
    fn validate(&self, chunk_bytes: usize) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("limits: {m}")));
        if self.max_concurrent_uploads == 0 {
            return bad("max_concurrent_uploads must be at least 1".into());
        }
        if self.max_inflight_bytes == 0 {
            return bad("max_inflight_bytes must be at least 1".into());
        }
        if self.max_concurrent_downloads == 0 {
            return bad("max_concurrent_downloads must be at least 1".into());
        }
        if self.stream_idle_timeout.is_zero() || self.queue_timeout.is_zero() || self.download_slot_timeout.is_zero() {
            return bad("stream_idle_timeout, queue_timeout and download_slot_timeout must be longer than zero".into());
        }
        if self.max_message_bytes < chunk_bytes + 1024 {
            return bad(format!(
                "max_message_bytes ({}) must exceed wire.chunk_bytes ({chunk_bytes}) by at least 1 KiB of framing",
                self.max_message_bytes
            ));
        }
        if !(65_535..=(1 << 30)).contains(&self.stream_window_bytes) {
            return bad(format!(
                "stream_window_bytes must be between 65535 and 1 GiB, got {}",
                self.stream_window_bytes
            ));
        }
        if self.max_streams_per_connection < 4 {
            return bad("max_streams_per_connection must be at least 4 (a node holds up to 3 streams)".into());
        }
        Ok(())
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

    /// Checks ranges and cross-field rules.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        self.model_kind()?;
        if self.rounds == 0 {
            return bad("rounds must be at least 1".into());
        }
        if self.http.listen.is_some_and(|h| h == self.listen) {
            return bad(format!(
                "http.listen and listen are both {}; the HTTP server needs a port of its own",
                self.listen
            ));
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
        if !(s.straggler_factor.is_finite() && (s.straggler_factor == 0.0 || s.straggler_factor >= 1.0)) {
            return bad(format!(
                "sampling.straggler_factor must be 0 (off) or at least 1, got {}",
                s.straggler_factor
            ));
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
        if !(t.proximal_mu.is_finite() && t.proximal_mu >= 0.0) {
            return bad(format!(
                "train.proximal_mu must be zero or positive, got {}",
                t.proximal_mu
            ));
        }
        if !(t.lr_decay.is_finite() && t.lr_decay > 0.0 && t.lr_decay <= 1.0) {
            return bad(format!("train.lr_decay must be in (0, 1], got {}", t.lr_decay));
        }
        if t.lr_step_rounds == 0 {
            return bad("train.lr_step_rounds must be at least 1".into());
        }
        if !(t.lr_min.is_finite() && t.lr_min >= 0.0 && t.lr_min <= t.learning_rate) {
            return bad(format!(
                "train.lr_min must be in [0, train.learning_rate], got {}",
                t.lr_min
            ));
        }
        self.validate_strategy()?;
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
        self.security.validate()?;
        self.http.validate(&self.security)?;
        self.privacy.validate(&self.strategy, self.train.algorithm)?;
        self.secure_aggregation.validate(self)?;
        self.simulation.validate()?;
        self.limits.validate(c)?;
        Ok(())
    }

    fn validate_strategy(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let st = &self.strategy;
        if !(0.0..0.5).contains(&st.trim_fraction) {
            return bad(format!(
                "strategy.trim_fraction must be in [0, 0.5), got {}",
                st.trim_fraction
            ));
        }
        if !(st.clip_norm.is_finite() && st.clip_norm >= 0.0) {
            return bad(format!(
                "strategy.clip_norm must be zero (off) or positive, got {}",
                st.clip_norm
            ));
        }
        if !(st.max_update_norm.is_finite() && st.max_update_norm >= 0.0) {
            return bad(format!(
                "strategy.max_update_norm must be zero (off) or positive, got {}",
                st.max_update_norm
            ));
        }
        for (name, v) in [
            ("max_norm_factor", st.max_norm_factor),
            ("max_weight_factor", st.max_weight_factor),
            ("max_loss_ratio", st.max_loss_ratio),
        ] {
            if !(v.is_finite() && (v == 0.0 || v >= 1.0)) {
                return bad(format!("strategy.{name} must be 0 (off) or at least 1, got {v}"));
            }
        }
        if !(st.server_lr.is_finite() && st.server_lr > 0.0) {
            return bad(format!(
                "strategy.server_lr must be a positive number, got {}",
                st.server_lr
            ));
        }
        for (name, v) in [
            ("server_momentum", st.server_momentum),
            ("beta1", st.beta1),
            ("beta2", st.beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("strategy.{name} must be in [0, 1), got {v}"));
            }
        }
        if !(st.tau.is_finite() && st.tau > 0.0) {
            return bad(format!("strategy.tau must be positive, got {}", st.tau));
        }
        let agg = st.aggregator();
        let need = agg.min_updates();
        if (self.sampling.min_nodes as usize) < need {
            return bad(format!(
                "strategy {agg} needs at least {need} updates per round; set sampling.min_nodes to {need} or more (it is {})",
                self.sampling.min_nodes
            ));
        }
        if let Aggregator::MultiKrum { f, m } = agg
            && m > 0
            && m + f > self.sampling.min_nodes as usize
        {
            return bad(format!(
                "strategy.multi_krum_m ({m}) plus strategy.byzantine ({f}) must not exceed sampling.min_nodes ({})",
                self.sampling.min_nodes
            ));
        }
        if self.train.algorithm == Algorithm::Scaffold && agg != Aggregator::Mean {
            return bad(format!(
                "train.algorithm = \"scaffold\" averages control variates and needs strategy.aggregator = \"mean\", not {agg}"
            ));
        }
        if self.train.algorithm == Algorithm::Scaffold && self.train.optimizer != LocalOptimizer::Sgd {
            return bad("train.algorithm = \"scaffold\" estimates control variates from SGD steps and needs train.optimizer = \"sgd\"".into());
        }
        let _: ServerOpt = st.server_opt();
        self.codec.codec()?;
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
    fn defaults_are_valid_once_transport_security_is_chosen_and_the_example_lists_them() {
        let err = CoordinatorConfig::default().validate().unwrap_err().to_string();
        assert!(
            err.contains("no TLS certificate configured") && err.contains("security.insecure = true"),
            "{err}"
        );
        let mut insecure = CoordinatorConfig::default();
        insecure.security.insecure = true;
        insecure.validate().unwrap();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("coordinator.example.toml");
        assert_eq!(
            CoordinatorConfig::load_with_env(Some(&example), [], &[("security.insecure".into(), "true".into())])
                .unwrap(),
            insecure
        );
    }

    #[test]
    fn simulation_settings_are_checked() {
        let mut c = CoordinatorConfig::default();
        c.security.insecure = true;
        c.simulation.nodes = 0;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid configuration: simulation.nodes must be at least 1"
        );
        c.simulation.nodes = 10;
        c.simulation.partition = "dirichlet".into();
        c.simulation.alpha = -1.0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid configuration: simulation: "), "{err}");
        assert!(err.contains("alpha"), "{err}");
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
            "unknown model `vgg` (this build knows: cnn, cnn-wide, cnn-xl, mnist-cnn, 2nn, resnet20)"
        );
        assert_eq!(
            with("strategy.aggregator", "\"krum\""),
            "invalid configuration: strategy krum(f=1) needs at least 5 updates per round; \
             set sampling.min_nodes to 5 or more (it is 2)"
        );
        assert_eq!(
            with("strategy.trim_fraction", "0.5"),
            "invalid configuration: strategy.trim_fraction must be in [0, 0.5), got 0.5"
        );
        assert_eq!(
            with("strategy.beta2", "1.0"),
            "invalid configuration: strategy.beta2 must be in [0, 1), got 1"
        );
        assert_eq!(
            with("train.lr_decay", "1.5"),
            "invalid configuration: train.lr_decay must be in (0, 1], got 1.5"
        );
        assert!(with("strategy.aggregator", "\"average\"").contains("average"));
        assert_eq!(
            with("codec.update", "\"zstd\""),
            "invalid configuration: codec: unknown codec `zstd` (expected one of: f32, f16, bf16, int8, topk, sign)"
        );
        assert_eq!(
            with("codec.topk_fraction", "0"),
            "invalid configuration: codec: topk fraction must be in (0, 1], got 0"
        );
        assert!(with("strategy.accumulator", "\"f16\"").contains("f16"));
        assert!(with("train.algorithm", "\"fedsomething\"").contains("fedsomething"));
        let both = CoordinatorConfig::load_with_env(
            None,
            [],
            &[
                ("train.algorithm".into(), "\"scaffold\"".into()),
                ("strategy.aggregator".into(), "\"median\"".into()),
            ],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            both,
            "invalid configuration: train.algorithm = \"scaffold\" averages control variates and needs \
             strategy.aggregator = \"mean\", not median"
        );
        let adam = CoordinatorConfig::load_with_env(
            None,
            [],
            &[
                ("train.algorithm".into(), "\"scaffold\"".into()),
                ("train.optimizer".into(), "\"adam\"".into()),
            ],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            adam,
            "invalid configuration: train.algorithm = \"scaffold\" estimates control variates from SGD steps \
             and needs train.optimizer = \"sgd\""
        );
        assert!(with("sampling.round_deadline", "soon").contains("round_deadline"));
        assert!(with("listen", "nowhere").contains("listen"));
    }

    #[test]
    fn learning_rate_schedules_follow_the_rounds() {
        let mut t = TrainConfig {
            learning_rate: 0.1,
            ..TrainConfig::default()
        };
        let lr = |t: &TrainConfig| (1..=5).map(|r| t.learning_rate_at(r, 5)).collect::<Vec<_>>();
        assert_eq!(lr(&t), [0.1; 5]);
        t.lr_schedule = LrSchedule::Step;
        t.lr_step_rounds = 2;
        assert_eq!(lr(&t), [0.1, 0.1, 0.05, 0.05, 0.025]);
        t.lr_schedule = LrSchedule::Exponential;
        t.lr_decay = 0.5;
        assert_eq!(lr(&t), [0.1, 0.05, 0.025, 0.0125, 0.00625]);
        t.lr_schedule = LrSchedule::Cosine;
        t.lr_min = 0.02;
        let c = lr(&t);
        assert!(
            (c[0] - 0.1).abs() < 1e-12 && (c[2] - 0.06).abs() < 1e-12 && (c[4] - 0.02).abs() < 1e-12,
            "{c:?}"
        );
    }

    #[test]
    fn the_http_side_must_authenticate_when_nodes_do() {
        let load = |o: &[(&str, &str)]| {
            let mut all = vec![
                ("security.tls_cert".to_string(), "\"c.pem\"".to_string()),
                ("security.tls_key".into(), "\"k.pem\"".into()),
                ("security.client_ca".into(), "\"ca.pem\"".into()),
                ("security.node_auth".into(), "\"certificate\"".into()),
                ("http.listen".into(), "\"0.0.0.0:8080\"".into()),
            ];
            all.extend(o.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            CoordinatorConfig::load_with_env(None, [], &all)
        };
        let err = load(&[]).unwrap_err().to_string();
        assert!(
            err.contains("nodes must authenticate (security.node_auth = \"certificate\")")
                && err.contains("set http.operators"),
            "{err}"
        );
        let c = load(&[("http.operators", "\"operators.toml\"")]).unwrap();
        assert!(c.http.tls(&c.security) && c.http.authenticated(&c.security));
        let c = load(&[("http.insecure", "true")]).unwrap();
        assert!(!c.http.tls(&c.security) && !c.http.authenticated(&c.security));
        let err = load(&[("http.insecure", "true"), ("http.operators", "\"o.toml\"")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("yet operators is set"), "{err}");
        // Plaintext gRPC without node authentication: the HTTP side is open too, unless operators are named.
        let open = CoordinatorConfig::load_with_env(
            None,
            [],
            &[
                ("security.insecure".to_string(), "true".to_string()),
                ("http.listen".into(), "\"127.0.0.1:8080\"".into()),
            ],
        )
        .unwrap();
        assert!(!open.http.tls(&open.security) && !open.http.authenticated(&open.security));
    }

    #[test]
    fn privacy_settings_are_checked_against_the_strategy() {
        let err = |o: &[(&str, &str)]| {
            let mut all = vec![
                ("security.insecure".to_string(), "true".to_string()),
                ("privacy.noise".into(), "\"central\"".into()),
            ];
            all.extend(o.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            CoordinatorConfig::load_with_env(None, [], &all)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(err(&[]), "");
        assert!(err(&[("strategy.aggregator", "\"median\"")]).contains("needs strategy.aggregator = \"mean\""));
        assert!(
            err(&[("train.algorithm", "\"scaffold\"")]).contains("control variates that the clipping does not bound")
        );
        assert!(err(&[("strategy.clip_norm", "2.0")]).contains("set only privacy.clip_norm"));
        assert!(err(&[("privacy.noise_multiplier", "0")]).contains("privacy: noise_multiplier must be positive"));
        assert!(err(&[("privacy.delta", "1.5")]).contains("privacy: delta must be in (0, 1)"));
        assert!(
            err(&[("privacy.adaptive_clip", "true"), ("privacy.target_quantile", "1.0")])
                .contains("target_quantile must be in (0, 1)")
        );
        let e = CoordinatorConfig::load_with_env(
            None,
            [],
            &[
                ("security.insecure".to_string(), "true".to_string()),
                ("privacy.noise".into(), "\"loud\"".into()),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("privacy.noise") || e.contains("loud"), "{e}");
    }

    #[test]
    fn secure_aggregation_settings_are_checked_against_the_rest() {
        let err = |o: &[(&str, &str)]| {
            let mut all = vec![
                ("security.insecure".to_string(), "true".to_string()),
                ("secure_aggregation.enabled".into(), "true".into()),
                ("sampling.min_nodes".into(), "3".into()),
                ("sampling.min_available".into(), "3".into()),
            ];
            all.extend(o.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            CoordinatorConfig::load_with_env(None, [], &all)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(err(&[]), "");
        assert_eq!(err(&[("privacy.noise", "\"distributed\"")]), "");
        assert!(err(&[("sampling.min_nodes", "2")]).contains("secure aggregation needs at least 3"));
        assert!(err(&[("secure_aggregation.max_dropout", "0.5")]).contains("max_dropout must be in [0, 0.5)"));
        assert!(err(&[("secure_aggregation.range", "0")]).contains("range must be positive"));
        assert!(err(&[("secure_aggregation.neighbours", "1")]).contains("0 (every node) or at least 2"));
        assert!(err(&[("strategy.aggregator", "\"median\"")]).contains("cannot run strategy.aggregator = \"median\""));
        assert!(err(&[("strategy.max_update_norm", "5.0")]).contains("need each update's norm"));
        assert!(err(&[("train.algorithm", "\"scaffold\"")]).contains("sends control variates"));
        assert!(err(&[("codec.update", "\"topk\"")]).contains("codec.update must be \"f32\""));
        assert!(err(&[("privacy.noise", "\"central\"")]).contains("use \"distributed\""));
    }

    #[test]
    fn security_and_limits_are_checked() {
        let err = |pairs: &[(&str, &str)]| {
            let o: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            CoordinatorConfig::load_with_env(None, [], &o).unwrap_err().to_string()
        };
        assert_eq!(
            err(&[("security.tls_cert", "\"c.pem\"")]),
            "invalid configuration: security: tls_cert and tls_key go together; set both or neither"
        );
        assert!(
            err(&[("security.insecure", "true"), ("security.node_auth", "\"certificate\"")])
                .contains("node_auth = \"certificate\" needs client_ca")
        );
        assert!(
            err(&[("security.insecure", "true"), ("security.node_auth", "\"token\"")])
                .contains("node_auth = \"token\" needs tokens")
        );
        assert!(
            err(&[
                ("security.insecure", "true"),
                ("security.tls_cert", "\"c.pem\""),
                ("security.tls_key", "\"k.pem\"")
            ])
            .contains("contradicts")
        );
        assert_eq!(
            err(&[("security.insecure", "true"), ("limits.max_concurrent_uploads", "0")]),
            "invalid configuration: limits: max_concurrent_uploads must be at least 1"
        );
        assert!(
            err(&[("security.insecure", "true"), ("limits.max_message_bytes", "1000")])
                .contains("must exceed wire.chunk_bytes")
        );
        // Arrays are given in TOML syntax on the command line too.
        let o = [
            ("security.insecure".to_string(), "true".to_string()),
            ("security.allow".to_string(), "[\"node-1\", \"cam 7\"]".to_string()),
        ];
        let c = CoordinatorConfig::load_with_env(None, [], &o).unwrap();
        assert_eq!(c.security.allow, ["node-1", "cam 7"]);
    }

    #[test]
    fn toml_file_and_overrides_combine() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "rounds = 3\n[sampling]\nround_deadline = \"90s\"\n[train]\nlearning_rate = 0.1\n[security]\ninsecure = true\n",
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
