//! Server strategies: pure arithmetic over flat parameter vectors.
//!
//! A strategy is three independent choices, each in the configuration's
//! `[strategy]` table:
//!
//! - update norm bounding: each update is scaled down to an L2 norm of at
//!   most `clip_norm` before it is aggregated ([`clip_scale`]);
//! - an [`Aggregator`] that combines the round's updates into one
//!   ([`aggregate`]: weighted mean, median, trimmed mean, Krum, Multi-Krum, Bulyan);
//! - a [`ServerOptimizer`] that moves the global model by the combined update
//!   ([`server`]: plain, FedAvgM, FedAdagrad, FedAdam, FedYogi).
//!
//! SCAFFOLD's server control variate lives here too ([`Strategy::control`]).
//! All state that must survive a restart is exposed by [`Strategy::state`].

pub mod aggregate;
pub mod server;

use std::collections::BTreeMap;

pub use aggregate::{Aggregator, MeanSum, Precision, RoundAggregate, UpdateSource};
pub use server::{ServerOpt, ServerOptimizer};

/// The factor that brings an update of L2 norm `norm` down to at most `bound`.
pub fn clip_scale(norm: f64, bound: Option<f64>) -> f64 {
    match bound {
        Some(bound) if norm > bound => bound / norm,
        _ => 1.0,
    }
}

/// How much one node's update weighs in the mean: its sample count
/// (FedAvg), capped at `max_factor` times the (lower) median count its
/// round's cohort declared, or the same for every node (`equal`).
///
/// The cap is what keeps one node that lies about its data from
/// outweighing the rest: with `n` nodes of about equal data and a cap of
/// `k`, one node holds at most `k / (k + n − 1)` of the round's weight.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Weighting {
    pub equal: bool,
    pub max_factor: Option<f64>,
}

impl Weighting {
    /// The most one update may weigh in a round whose nodes declared
    /// `declared` samples (`None`: no cap).
    pub fn cap(&self, declared: impl Iterator<Item = u64>) -> Option<f64> {
        if self.equal {
            return Some(1.0);
        }
        let factor = self.max_factor?;
        let mut counts: Vec<u64> = declared.collect();
        if counts.is_empty() {
            return None;
        }
        counts.sort_unstable();
        // The lower median: in a cohort of two, one huge claim does not
        // raise the cap.
        let median = counts[(counts.len() - 1) / 2] as f64;
        (median > 0.0).then_some(factor * median)
    }
}

/// L2 norm in f64.
pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// Everything the coordinator carries from round to round besides the model.
#[derive(Debug, Clone)]
pub struct Strategy {
    pub aggregator: Aggregator,
    pub server: ServerOptimizer,
    /// Bound on each update's L2 norm; larger ones are scaled down to it (`None`: unbounded).
    pub clip_norm: Option<f64>,
    /// Updates with a larger L2 norm are refused outright (`None`: no limit).
    pub max_norm: Option<f64>,
    /// Updates whose norm exceeds this many times the median norm of the
    /// last completed round's updates (before any, the starting model's
    /// norm) are refused (`None`: off).
    pub max_norm_factor: Option<f64>,
    /// How updates are weighted in the mean.
    pub weighting: Weighting,
    /// SCAFFOLD's server control variate `c`, when the run uses SCAFFOLD.
    pub control: Option<Vec<f32>>,
    /// Precision of the mean's running sum.
    pub precision: Precision,
    /// Differential privacy: clipping, noise and the accountant (`None`: off).
    pub privacy: Option<crate::core::privacy::Privacy>,
}

impl Strategy {
    /// A fresh strategy for a model of `numel` parameters.
    pub fn new(
        aggregator: Aggregator,
        server: ServerOptimizer,
        clip_norm: Option<f64>,
        scaffold: bool,
        numel: usize,
    ) -> Self {
        Self {
            aggregator,
            server,
            clip_norm,
            max_norm: None,
            max_norm_factor: None,
            weighting: Weighting::default(),
            control: scaffold.then(|| vec![0.0; numel]),
            precision: Precision::F64,
            privacy: None,
        }
    }

    /// Copies of the named state vectors and the server optimizer's step
    /// count, for checkpoints.
    pub fn state(&self) -> (BTreeMap<String, Vec<f32>>, u64) {
        let (named, steps) = self.server.state();
        let mut owned: BTreeMap<String, Vec<f32>> = named.into_iter().map(|(k, v)| (k, v.to_vec())).collect();
        if let Some(c) = &self.control {
            owned.insert("scaffold.c".to_string(), c.clone());
        }
        (owned, steps)
    }

    /// Restores what [`Strategy::state`] saved.
    pub fn restore(&mut self, mut named: BTreeMap<String, Vec<f32>>, steps: u64) -> Result<(), String> {
        if let Some(c) = &mut self.control {
            let saved = named
                .remove("scaffold.c")
                .ok_or("the checkpoint has no SCAFFOLD control variate `scaffold.c`")?;
            if saved.len() != c.len() {
                return Err(format!(
                    "`scaffold.c` has {} values; the model has {}",
                    saved.len(),
                    c.len()
                ));
            }
            *c = saved;
        }
        self.server.restore(named, steps)
    }

    /// Applies SCAFFOLD's server step `c ← c + (|S| / N) · mean(Δcᵢ)` given
    /// the sum of the round's control deltas over `count` nodes of `total`.
    pub fn update_control(&mut self, sum: &[f64], count: usize, total: usize) {
        let Some(c) = &mut self.control else { return };
        if count == 0 || total == 0 || sum.len() != c.len() {
            return;
        }
        let scale = 1.0 / total as f64;
        for (c, &s) in c.iter_mut().zip(sum) {
            *c = (f64::from(*c) + s * scale) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_bounds_the_norm() {
        let u = [3.0f32, 4.0];
        let norm = l2_norm(&u);
        assert_eq!(norm, 5.0);
        let s = clip_scale(norm, Some(1.0));
        let clipped: Vec<f32> = u.iter().map(|&v| (f64::from(v) * s) as f32).collect();
        assert!((l2_norm(&clipped) - 1.0).abs() < 1e-6);
        assert_eq!(clip_scale(0.5, Some(1.0)), 1.0);
        assert_eq!(clip_scale(50.0, None), 1.0);
    }

    #[test]
    fn weights_are_capped_at_a_multiple_of_the_cohorts_median() {
        let capped = Weighting {
            equal: false,
            max_factor: Some(4.0),
        };
        // One node claims 2^64 - 1 samples beside two of 5,000: it weighs
        // at most 4 x 5,000, two thirds of the round, not all of it.
        let cap = capped.cap([5_000, u64::MAX, 5_000].into_iter()).unwrap();
        assert_eq!(cap, 20_000.0);
        assert_eq!(capped.cap([10, 30].into_iter()), Some(40.0));
        assert_eq!(capped.cap([100, u64::MAX].into_iter()), Some(400.0));
        assert_eq!(capped.cap(std::iter::empty()), None);
        assert_eq!(Weighting::default().cap([1, 2].into_iter()), None);
        let equal = Weighting {
            equal: true,
            max_factor: None,
        };
        assert_eq!(equal.cap([7, 9].into_iter()), Some(1.0));
    }

    #[test]
    fn scaffold_control_moves_by_the_sampled_share() {
        let mut s = Strategy::new(
            Aggregator::Mean,
            ServerOptimizer::new(ServerOpt::Sgd, 1.0, 2),
            None,
            true,
            2,
        );
        // Two of four nodes sent Δc = [1, 2] and [3, 4]: c += (2/4)·mean = [1, 1.5].
        s.update_control(&[4.0, 6.0], 2, 4);
        assert_eq!(s.control.as_deref(), Some(&[1.0f32, 1.5][..]));
        let (owned, _) = s.state();
        assert!(owned.contains_key("scaffold.c"));
        let mut t = Strategy::new(
            Aggregator::Mean,
            ServerOptimizer::new(ServerOpt::Sgd, 1.0, 2),
            None,
            true,
            2,
        );
        t.restore(owned, 0).unwrap();
        assert_eq!(t.control, s.control);
    }
}
