//! The work the round machine hands out to run off the async runtime:
//! folding an accepted update into the round's aggregate ([`FoldJob`]),
//! aggregating and taking the server step when the round closes
//! ([`AggregationJob`]), and what comes back ([`Folded`], [`Aggregated`],
//! [`ClosedRound`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::core::model::GlobalModel;
use crate::core::privacy::{RoundPlan, RoundPrivacy};
use crate::core::secure::{SecureRecord, UnmaskJob};
use crate::core::strategy::aggregate::lock;
use crate::core::strategy::{MeanSum, RoundAggregate, Strategy, UpdateSource, l2_norm};

use super::{Contribution, cosine};

/// A round that reached its end; the driver persists and evaluates it, then
/// calls [`RoundMachine::persisted`].
#[derive(Debug, Clone)]
pub struct ClosedRound {
    pub round: u64,
    /// The new global model version (equal to `round`).
    pub version: u64,
    pub global: Arc<Vec<f32>>,
    pub contributions: Vec<Contribution>,
    pub selected: usize,
    pub started_ms: u64,
    pub closed_ms: u64,
    /// SCAFFOLD's server control variate after the round, if the run uses it.
    pub control: Option<Arc<Vec<f32>>>,
    /// Strategy state to checkpoint: named vectors and the server optimizer's steps.
    pub strategy_state: Arc<(BTreeMap<String, Vec<f32>>, u64)>,
    /// Differential privacy: the round's noise, clipping and the run's ε after it.
    pub privacy: Option<RoundPrivacy>,
    /// Secure aggregation: who took part in each step.
    pub secure: Option<SecureRecord>,
}

/// A round's aggregation, to run off the async runtime.
#[derive(Debug)]
pub struct AggregationJob {
    pub(super) round: u64,
    pub(super) global: GlobalModel,
    pub(super) aggregate: RoundAggregate,
    pub(super) total_nodes: usize,
    pub(super) strategy: Strategy,
    /// Differential privacy: the round's plan and how many updates needed no clipping.
    pub(super) privacy: Option<(RoundPlan, usize)>,
    /// Secure aggregation: the masked sum to unmask instead of `aggregate`.
    pub(super) unmask: Option<UnmaskJob>,
    /// Whether to keep the step (new global − old) for the next round's
    /// alignments ([`RoundSettings::track_direction`]).
    pub(super) track_direction: bool,
}

/// Folding one accepted update into the round's running sum, to run off the
/// async runtime; its result goes back through [`RoundMachine::folded`].
#[derive(Debug)]
pub struct FoldJob {
    pub(super) round: u64,
    pub(super) attempt: u32,
    pub(super) node: String,
    pub(super) target: FoldTarget,
    pub(super) source: Arc<dyn UpdateSource>,
    pub(super) weight: f64,
    pub(super) scale: f64,
    /// The last committed step, to measure the update's alignment with.
    pub(super) direction: Option<Arc<Vec<f32>>>,
}

/// Where a [`FoldJob`] adds its update.
#[derive(Debug)]
pub(super) enum FoldTarget {
    /// The mean's running sum.
    Mean(Arc<Mutex<MeanSum>>),
    /// Secure aggregation's masked sum in `Z_2^32`, as node `id`'s input.
    Masked {
        server: Arc<Mutex<fedge_common::secagg::Server>>,
        id: fedge_common::secagg::NodeId,
    },
}

/// What a [`FoldJob`] did.
#[derive(Debug)]
pub struct Folded {
    pub(super) round: u64,
    pub(super) attempt: u32,
    pub(super) node: String,
    pub(super) result: Result<(), String>,
    pub(super) alignment: Option<f64>,
}

impl FoldJob {
    /// Decodes the update and adds it to the sum (blocking, CPU-bound).
    pub fn run(self) -> Folded {
        let result = match &self.target {
            FoldTarget::Mean(sum) => lock(sum).fold(self.source.as_ref(), self.weight, self.scale),
            FoldTarget::Masked { server, id } => {
                // Masked values travel as the bits of f32s (`Codec::Masked`).
                let mut words = vec![0u32; self.source.len()];
                self.source
                    .visit(&mut |offset, values| {
                        for (w, v) in words[offset..offset + values.len()].iter_mut().zip(values) {
                            *w = v.to_bits();
                        }
                    })
                    .and_then(|()| lock(server).add_masked(*id, &words).map_err(|e| e.to_string()))
            }
        };
        let alignment = match (&result, &self.direction) {
            (Ok(()), Some(direction)) => cosine(self.source.as_ref(), direction, self.scale),
            _ => None,
        };
        Folded {
            round: self.round,
            attempt: self.attempt,
            node: self.node,
            result,
            alignment,
        }
    }
}

/// Why a round's aggregation produced no new global model; the round
/// machine retries the round, and whom it leaves out depends on the cause.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregationFailure {
    /// The updates could not be combined (too few for the robust
    /// aggregator, or a secure sum that failed its checks).
    #[error("{0}")]
    Combine(String),
    /// The combined update holds a value that is not finite.
    #[error("the combined update has a non-finite value at index {index} (its updates' sum overflowed)")]
    NonFiniteUpdate { index: usize },
    /// The server optimizer could not read the current global model.
    #[error("{0}")]
    ServerStep(String),
    /// The server step produced a value that is not finite.
    #[error("the new global model has a non-finite value at index {index}")]
    NonFiniteModel { index: usize },
    /// The driver's check refused the new model (`strategy.max_loss_ratio`).
    #[error("{0}")]
    Rejected(String),
}

/// What an [`AggregationJob`] produced.
#[derive(Debug)]
pub struct Aggregated {
    pub(super) round: u64,
    pub(super) result: Result<Arc<Vec<f32>>, AggregationFailure>,
    pub(super) strategy: Strategy,
    pub(super) seconds: f64,
    pub(super) privacy: Option<RoundPrivacy>,
    /// The strategy before the server step (when the model is checked).
    pub(super) before: Option<Box<Strategy>>,
    /// The new model's L2 norm (computed here, off the async runtime).
    pub(super) model_norm: f64,
    /// The step the new model takes (new global − old), when tracked and
    /// the old model is in memory.
    pub(super) direction: Option<Arc<Vec<f32>>>,
    /// Secure aggregation: nodes caught misbehaving while unmasking (name,
    /// what they did).
    pub(super) misbehaved: Vec<(String, String)>,
}

impl AggregationJob {
    /// The round being aggregated.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Combines the updates and applies the server optimizer (blocking, CPU-bound).
    pub fn run(mut self) -> Aggregated {
        let start = std::time::Instant::now();
        let mut count = self.aggregate.count();
        let mut privacy = None;
        let mut unclipped_secure = None;
        // The strategy as it was before the step: a failed or rejected step
        // leaves no trace in it.
        let before = Some(Box::new(self.strategy.clone()));
        let mut misbehaved = Vec::new();
        let combined = match self.unmask.take() {
            Some(job) => {
                let (unmasked, blamed) = job.run();
                misbehaved = blamed;
                unmasked.map(|u| {
                    count = u.survivors;
                    unclipped_secure = Some(u.unclipped);
                    (u.mean, None)
                })
            }
            None => self.aggregate.finish(),
        }
        .map_err(AggregationFailure::Combine);
        let result = combined.and_then(|(mut delta, control_sum)| {
            // Nothing non-finite reaches the server optimizer's state or
            // the global model: the round is retried instead.
            if let Some(index) = delta.iter().position(|v| !v.is_finite()) {
                return Err(AggregationFailure::NonFiniteUpdate { index });
            }
            if let (Some((plan, unclipped)), Some(p)) = (&self.privacy, &mut self.strategy.privacy) {
                let unclipped = unclipped_secure.unwrap_or(*unclipped);
                // The noise comes from the operating system-seeded CSPRNG.
                privacy = Some(p.close_round(plan, &mut delta, count, unclipped, &mut rand::rng()));
            }
            let next = self
                .strategy
                .server
                .step_model(&self.global, delta)
                .map_err(|e| AggregationFailure::ServerStep(e.to_string()))?;
            if let Some(index) = next.iter().position(|v| !v.is_finite()) {
                return Err(AggregationFailure::NonFiniteModel { index });
            }
            if let Some(sum) = &control_sum {
                self.strategy.update_control(sum, count, self.total_nodes);
            }
            Ok(Arc::new(next))
        });
        let (model_norm, direction) = match &result {
            Ok(next) => (
                l2_norm(next),
                match (&self.global, self.track_direction) {
                    (GlobalModel::Memory(old), true) => {
                        Some(Arc::new(next.iter().zip(old.iter()).map(|(n, o)| n - o).collect()))
                    }
                    _ => None,
                },
            ),
            Err(_) => (f64::NAN, None),
        };
        let mut done = Aggregated {
            round: self.round,
            result,
            strategy: self.strategy,
            seconds: start.elapsed().as_secs_f64(),
            privacy,
            before,
            model_norm,
            direction,
            misbehaved,
        };
        // A step that failed part-way leaves the strategy as it was.
        if done.result.is_err()
            && let Some(before) = done.before.take()
        {
            done.strategy = *before;
            done.privacy = None;
        }
        done
    }
}

impl Aggregated {
    /// The round aggregated.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Seconds the aggregation took.
    pub fn seconds(&self) -> f64 {
        self.seconds
    }

    /// The new global model, when the aggregation produced one.
    pub fn candidate(&self) -> Option<&Arc<Vec<f32>>> {
        self.result.as_ref().ok()
    }

    /// Refuses the new model for `reason`: the strategy goes back to where
    /// it was before the server step (the round's privacy is not counted),
    /// and [`RoundMachine::aggregated`] retries the round without the
    /// update it suspects most ([`suspect`]).
    pub fn reject(&mut self, reason: String) {
        if let Some(before) = self.before.take() {
            self.strategy = *before;
        }
        self.privacy = None;
        self.result = Err(AggregationFailure::Rejected(reason));
    }
}
