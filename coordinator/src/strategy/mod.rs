//! Server strategies: pure arithmetic over flat parameter vectors.
//!
//! A strategy is three independent choices, each in the configuration's
//! `[strategy]` table:
//!
//! - update norm bounding: each update is scaled down to an L2 norm of at
//!   most `clip_norm` before it is aggregated ([`clip`]);
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

pub use aggregate::{Aggregator, RoundAggregate};
pub use server::{ServerOpt, ServerOptimizer};

/// Scales `update` so its L2 norm is at most `bound`; returns the norm it had.
pub fn clip(update: &mut [f32], bound: Option<f64>) -> f64 {
    let norm = l2_norm(update);
    if let Some(bound) = bound
        && norm > bound
    {
        let scale = bound / norm;
        for v in update.iter_mut() {
            *v = (f64::from(*v) * scale) as f32;
        }
    }
    norm
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
    /// SCAFFOLD's server control variate `c`, when the run uses SCAFFOLD.
    pub control: Option<Vec<f32>>,
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
            control: scaffold.then(|| vec![0.0; numel]),
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
        if count == 0 || total == 0 {
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
    fn clipping_bounds_the_norm_and_keeps_the_direction() {
        let mut u = vec![3.0f32, 4.0];
        assert_eq!(clip(&mut u, Some(1.0)), 5.0);
        assert!((l2_norm(&u) - 1.0).abs() < 1e-6);
        assert!((u[0] / u[1] - 0.75).abs() < 1e-6);
        let mut small = vec![0.3f32, 0.4];
        assert!((clip(&mut small, Some(1.0)) - 0.5).abs() < 1e-6);
        assert_eq!(small, vec![0.3, 0.4]);
        let mut big = vec![30.0f32, 40.0];
        assert_eq!(clip(&mut big, None), 50.0);
        assert_eq!(big, vec![30.0, 40.0]);
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
