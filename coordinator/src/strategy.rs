//! Aggregation strategies: pure arithmetic over flat parameter vectors.
//!
//! Updates are folded into a running aggregate as they arrive, so the
//! coordinator holds O(model) state per round whatever the number of nodes.

/// Weighted federated averaging (McMahan et al. 2017): the new global model
/// is `w + Σ nᵢ·Δᵢ / Σ nᵢ`, with `Δᵢ = wᵢ − w` and `nᵢ` the node's sample count.
/// Sums are kept in f64 so the result does not depend on arrival order
/// beyond f64 rounding.
#[derive(Debug, Clone)]
pub struct FedAvg {
    sum: Vec<f64>,
    weight: f64,
    count: usize,
}

impl FedAvg {
    /// An empty aggregate for a model of `numel` parameters.
    pub fn new(numel: usize) -> Self {
        Self {
            sum: vec![0.0; numel],
            weight: 0.0,
            count: 0,
        }
    }

    /// Folds one update of weight `weight` (its sample count).
    pub fn add(&mut self, delta: &[f32], weight: f64) {
        debug_assert_eq!(delta.len(), self.sum.len());
        for (s, &d) in self.sum.iter_mut().zip(delta) {
            *s += weight * f64::from(d);
        }
        self.weight += weight;
        self.count += 1;
    }

    /// Updates folded so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The weighted mean update, applied to `global`. With no updates the
    /// model is returned unchanged.
    pub fn apply(&self, global: &[f32]) -> Vec<f32> {
        if self.weight <= 0.0 {
            return global.to_vec();
        }
        global
            .iter()
            .zip(&self.sum)
            .map(|(&g, &s)| (f64::from(g) + s / self.weight) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn weighted_mean_of_known_vectors() {
        let global = [1.0f32, -1.0, 0.5];
        let mut agg = FedAvg::new(3);
        agg.add(&[1.0, 2.0, 3.0], 1.0);
        agg.add(&[-1.0, 0.0, 3.0], 3.0);
        // mean delta: [(1 - 3)/4, 2/4, (3 + 9)/4] = [-0.5, 0.5, 3.0]
        assert_eq!(agg.apply(&global), vec![0.5, -0.5, 3.5]);
        assert_eq!(agg.count(), 2);
    }

    #[test]
    fn no_updates_leaves_the_model() {
        assert_eq!(FedAvg::new(2).apply(&[3.0, 4.0]), vec![3.0, 4.0]);
    }

    proptest! {
        #[test]
        fn equals_a_direct_computation_and_ignores_order(
            updates in proptest::collection::vec((proptest::collection::vec(-10.0f32..10.0, 5), 1u32..1000), 1..8)
        ) {
            let global = [0.25f32, -3.0, 7.0, 0.0, 1.0];
            let mut fwd = FedAvg::new(5);
            let mut rev = FedAvg::new(5);
            for (d, w) in &updates { fwd.add(d, f64::from(*w)); }
            for (d, w) in updates.iter().rev() { rev.add(d, f64::from(*w)); }
            let total: f64 = updates.iter().map(|(_, w)| f64::from(*w)).sum();
            for i in 0..5 {
                let direct = f64::from(global[i])
                    + updates.iter().map(|(d, w)| f64::from(*w) * f64::from(d[i])).sum::<f64>() / total;
                prop_assert!((f64::from(fwd.apply(&global)[i]) - direct).abs() <= 1e-5 * direct.abs().max(1.0));
                let (a, b) = (fwd.apply(&global)[i], rev.apply(&global)[i]);
                prop_assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0));
            }
        }
    }
}
