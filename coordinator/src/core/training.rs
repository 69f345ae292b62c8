//! What nodes train with, round by round: the local hyper-parameters of
//! `[train]` and the learning-rate schedule over rounds, which the round
//! machine turns into each task's [`Hyperparameters`]. The configuration
//! layer reads and checks the section (`config::training`).

use fedge_common::task::{Algorithm, Hyperparameters, LocalOptimizer};
use serde::{Deserialize, Serialize};

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
