//! `[privacy]` and `[secure_aggregation]`: differential privacy's noise,
//! clipping and budget, and secure aggregation's threshold and deadlines.

use std::time::Duration;

use fedge_common::privacy::AdaptiveClip;
use serde::{Deserialize, Serialize};

use crate::core::privacy::NoiseMode;
use crate::core::privacy::Privacy;
use crate::{Error, Result};

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
    /// The run's privacy state; `None` when privacy is off.
    pub fn privacy(&self) -> Option<Privacy> {
        self.enabled().then(|| {
            let adaptive = self.adaptive_clip.then_some(AdaptiveClip {
                target_quantile: self.target_quantile,
                learning_rate: self.clip_learning_rate,
                count_stddev: self.clip_count_stddev,
            });
            let budget = (self.epsilon_budget > 0.0).then_some(self.epsilon_budget);
            Privacy::new(
                self.noise,
                self.noise_multiplier,
                self.clip_norm,
                adaptive,
                self.delta,
                budget,
            )
        })
    }

    /// Whether differential privacy is on.
    pub fn enabled(&self) -> bool {
        self.noise != NoiseMode::Off
    }

    pub(super) fn validate(&self) -> Result<()> {
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
    pub(super) fn validate(&self) -> Result<()> {
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
        Ok(())
    }
}
