//! `[sampling]`, `[train]` and `[eval]`: which nodes a round asks, what
//! they train with, and how the coordinator evaluates.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::core::training::{LrSchedule, TrainConfig};
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
