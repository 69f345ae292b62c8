//! `[sampling]`, `[train]` and `[eval]`: which nodes a round asks, what
//! they train with, and how the coordinator evaluates.

use std::time::Duration;

use fedge_common::task::{Algorithm, Hyperparameters, LocalOptimizer};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

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

impl SamplingConfig {
    /// Checks this section's ranges.
    pub(super) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return bad(format!("sampling.fraction must be in (0, 1], got {}", self.fraction));
        }
        if self.min_nodes == 0 {
            return bad("sampling.min_nodes must be at least 1".into());
        }
        if self.min_available < self.min_nodes {
            return bad(format!(
                "sampling.min_available ({}) must be at least sampling.min_nodes ({})",
                self.min_available, self.min_nodes
            ));
        }
        if self.round_deadline.is_zero() {
            return bad("sampling.round_deadline must be longer than zero".into());
        }
        if !(self.straggler_factor.is_finite() && (self.straggler_factor == 0.0 || self.straggler_factor >= 1.0)) {
            return bad(format!(
                "sampling.straggler_factor must be 0 (off) or at least 1, got {}",
                self.straggler_factor
            ));
        }
        Ok(())
    }
}

impl TrainConfig {
    /// Checks this section's ranges.
    pub(super) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.epochs == 0 {
            return bad("train.epochs must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("train.batch_size must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!(
                "train.learning_rate must be a positive number, got {}",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("train.momentum must be in [0, 1), got {}", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "train.weight_decay must be zero or positive, got {}",
                self.weight_decay
            ));
        }
        if !(self.proximal_mu.is_finite() && self.proximal_mu >= 0.0) {
            return bad(format!(
                "train.proximal_mu must be zero or positive, got {}",
                self.proximal_mu
            ));
        }
        if !(self.lr_decay.is_finite() && self.lr_decay > 0.0 && self.lr_decay <= 1.0) {
            return bad(format!("train.lr_decay must be in (0, 1], got {}", self.lr_decay));
        }
        if self.lr_step_rounds == 0 {
            return bad("train.lr_step_rounds must be at least 1".into());
        }
        if !(self.lr_min.is_finite() && self.lr_min >= 0.0 && self.lr_min <= self.learning_rate) {
            return bad(format!(
                "train.lr_min must be in [0, train.learning_rate], got {}",
                self.lr_min
            ));
        }
        Ok(())
    }
}

impl EvalConfig {
    /// Checks this section's ranges.
    pub(super) fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::Config("eval.batch_size must be at least 1".into()));
        }
        Ok(())
    }
}
