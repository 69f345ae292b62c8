//! `[strategy]`: update bounds, the aggregator, the server optimizer and
//! the accumulator's precision.

use serde::{Deserialize, Serialize};

use crate::core::strategy::{Aggregator, Precision, ServerOpt, Weighting};
use crate::{Error, Result};

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

impl StrategyConfig {
    /// Checks this section's ranges.
    pub(super) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(0.0..0.5).contains(&self.trim_fraction) {
            return bad(format!(
                "strategy.trim_fraction must be in [0, 0.5), got {}",
                self.trim_fraction
            ));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm >= 0.0) {
            return bad(format!(
                "strategy.clip_norm must be zero (off) or positive, got {}",
                self.clip_norm
            ));
        }
        if !(self.max_update_norm.is_finite() && self.max_update_norm >= 0.0) {
            return bad(format!(
                "strategy.max_update_norm must be zero (off) or positive, got {}",
                self.max_update_norm
            ));
        }
        for (name, v) in [
            ("max_norm_factor", self.max_norm_factor),
            ("max_weight_factor", self.max_weight_factor),
            ("max_loss_ratio", self.max_loss_ratio),
        ] {
            if !(v.is_finite() && (v == 0.0 || v >= 1.0)) {
                return bad(format!("strategy.{name} must be 0 (off) or at least 1, got {v}"));
            }
        }
        if !(self.server_lr.is_finite() && self.server_lr > 0.0) {
            return bad(format!(
                "strategy.server_lr must be a positive number, got {}",
                self.server_lr
            ));
        }
        for (name, v) in [
            ("server_momentum", self.server_momentum),
            ("beta1", self.beta1),
            ("beta2", self.beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("strategy.{name} must be in [0, 1), got {v}"));
            }
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return bad(format!("strategy.tau must be positive, got {}", self.tau));
        }
        let _: ServerOpt = self.server_opt();
        Ok(())
    }
}
