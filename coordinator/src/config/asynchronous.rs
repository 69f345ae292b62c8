//! `[async]`: asynchronous buffered aggregation (FedBuff) instead of rounds.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::core::round::{AsyncSettings, StalenessWeight};
use crate::{Error, Result};

/// How an update's staleness `s` (versions the global model moved since its
/// base) scales it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StalenessWeightName {
    /// 1, however stale.
    Constant,
    /// `1/sqrt(1 + s)` (FedBuff).
    Sqrt,
    /// `(1 + s)^-exponent`.
    Polynomial,
    /// 1 up to `hinge_b` versions behind, then `1 / (hinge_a·(s − hinge_b) + 1)` (FedAsync).
    Hinge,
}

/// Asynchronous training: nodes train all the time, each from the newest
/// saved model; every `buffer_size` updates make one server step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AsyncConfig {
    /// Train asynchronously instead of in rounds; `rounds` then counts
    /// server steps, and `sampling.round_deadline` bounds each task.
    pub enabled: bool,
    /// Nodes kept training at once (0: every connected node).
    pub concurrency: u32,
    /// Updates per server step (K); a step takes at most one update per node.
    pub buffer_size: u32,
    /// Updates whose base version is more than this many versions behind
    /// the current one are refused.
    pub max_staleness: u32,
    /// `constant`, `sqrt`, `polynomial` or `hinge`.
    pub staleness_weight: StalenessWeightName,
    /// The exponent `a` of `polynomial`: `(1 + s)^-a`.
    pub exponent: f64,
    /// The slope of `hinge`.
    pub hinge_a: f64,
    /// The versions behind that `hinge` forgives.
    pub hinge_b: u32,
}

impl Default for AsyncConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            concurrency: 0,
            buffer_size: 4,
            max_staleness: 20,
            staleness_weight: StalenessWeightName::Sqrt,
            exponent: 0.5,
            hinge_a: 10.0,
            hinge_b: 4,
        }
    }
}

impl AsyncConfig {
    pub(super) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("async: {m}")));
        if self.buffer_size == 0 {
            return bad("buffer_size must be at least 1");
        }
        if !(self.exponent.is_finite() && self.exponent >= 0.0) {
            return bad("exponent must be a finite number of at least 0");
        }
        if !(self.hinge_a.is_finite() && self.hinge_a >= 0.0) {
            return bad("hinge_a must be a finite number of at least 0");
        }
        Ok(())
    }

    /// The staleness weight these settings name.
    pub fn weight(&self) -> StalenessWeight {
        match self.staleness_weight {
            StalenessWeightName::Constant => StalenessWeight::Constant,
            StalenessWeightName::Sqrt => StalenessWeight::Polynomial { exponent: 0.5 },
            StalenessWeightName::Polynomial => StalenessWeight::Polynomial {
                exponent: self.exponent,
            },
            StalenessWeightName::Hinge => StalenessWeight::Hinge {
                a: self.hinge_a,
                b: u64::from(self.hinge_b),
            },
        }
    }

    /// The round machine's settings, when asynchronous training is on;
    /// task numbers start at `first_task`, and `applied` are the (node,
    /// task) pairs a resumed run's recent steps applied.
    pub fn settings(&self, first_task: u64, applied: BTreeSet<(String, u64)>) -> Option<AsyncSettings> {
        self.enabled.then(|| AsyncSettings {
            concurrency: self.concurrency as usize,
            buffer_size: self.buffer_size as usize,
            max_staleness: u64::from(self.max_staleness),
            weight: self.weight(),
            first_task,
            applied,
        })
    }
}
