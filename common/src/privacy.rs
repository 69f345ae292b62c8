//! Client-level differential privacy for federated averaging (DP-FedAvg,
//! McMahan et al. 2018): every update is clipped to an L2 norm `C`, the
//! coordinator averages the clipped updates with equal weights, and
//! Gaussian noise of standard deviation `z·C` is added to their sum, either
//! by the coordinator (central) or split over the nodes (distributed: each
//! of `m` nodes adds `z·C/√m` to its own update).
//!
//! - [`clip`] and [`add_noise`]: what a node (or the coordinator) does to an update.
//! - [`AdaptiveClip`]: `C` follows a target quantile of the update norms
//!   (Andrew et al. 2021, "Differentially Private Learning with Adaptive
//!   Clipping"), from a noised count of the updates that needed no clipping.
//! - [`Accountant`]: Rényi DP of the Poisson-sampled Gaussian mechanism
//!   (Mironov, Talwar and Zhang 2019) composed over rounds, converted to
//!   (ε, δ) with the bound of Canonne, Kamath and Steinke 2020 (as Google's
//!   `dp_accounting` does).

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// The Rényi orders the accountant tracks: the integer orders of
/// `dp_accounting`'s defaults.
pub fn orders() -> Vec<u32> {
    (2..64).chain([128, 256, 512, 1024]).collect()
}

/// `log(exp(a) + exp(b))` without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    (lo - hi).exp().ln_1p() + hi
}

/// The RDP of order `alpha` of one step of the Gaussian mechanism with noise
/// multiplier `sigma` on a Poisson sample of rate `q` (Mironov et al. 2019,
/// Section 3.3, the integer-order formula):
/// `log Σₖ C(α,k) (1−q)^(α−k) q^k exp((k²−k)/(2σ²)) / (α−1)`.
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, alpha: u32) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if sigma <= 0.0 {
        return f64::INFINITY;
    }
    let a = f64::from(alpha);
    if q >= 1.0 {
        return a / (2.0 * sigma * sigma);
    }
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let mut log_a = f64::NEG_INFINITY;
    let mut log_binom = 0.0f64;
    for k in 0..=alpha {
        let kf = f64::from(k);
        if k > 0 {
            // C(α, k) = C(α, k−1)·(α−k+1)/k
            log_binom += (a - kf + 1.0).ln() - kf.ln();
        }
        let term = log_binom + kf * log_q + (a - kf) * log_1mq + (kf * kf - kf) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a / (a - 1.0)
}

/// The smallest ε over the orders for which RDP values `rdp` (one per
/// [`orders`]) give (ε, δ)-DP, and the order that gives it.
pub fn epsilon_from_rdp(rdp: &[f64], delta: f64) -> (f64, u32) {
    let mut best = (f64::INFINITY, 0);
    for (&alpha, &r) in orders().iter().zip(rdp) {
        let a = f64::from(alpha);
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        };
        if eps < best.0 {
            best = (eps, alpha);
        }
    }
    (best.0.max(0.0), best.1)
}

/// The privacy spent by a run so far: RDP at each of [`orders`], summed
/// over its rounds (composition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accountant {
    rdp: Vec<f64>,
    /// Rounds accounted.
    pub rounds: u64,
}

impl Default for Accountant {
    fn default() -> Self {
        Self {
            rdp: vec![0.0; orders().len()],
            rounds: 0,
        }
    }
}

impl Accountant {
    /// Accounts one round: a node's update is in it with probability `q`,
    /// and the sum of the clipped updates gets noise of `noise_multiplier`
    /// times the clipping norm.
    pub fn add_round(&mut self, q: f64, noise_multiplier: f64) {
        for (r, alpha) in self.rdp.iter_mut().zip(orders()) {
            *r += rdp_sampled_gaussian(q, noise_multiplier, alpha);
        }
        self.rounds += 1;
    }

    /// ε at `delta` after the rounds accounted so far.
    pub fn epsilon(&self, delta: f64) -> f64 {
        epsilon_from_rdp(&self.rdp, delta).0
    }

    /// ε at `delta` if one more round with `q` and `noise_multiplier` ran.
    pub fn epsilon_after(&self, q: f64, noise_multiplier: f64, delta: f64) -> f64 {
        let mut next = self.clone();
        next.add_round(q, noise_multiplier);
        next.epsilon(delta)
    }
}

/// Scales `v` down to an L2 norm of at most `bound`; returns its norm before.
pub fn clip(v: &mut [f32], bound: f64) -> f64 {
    let norm = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    if norm > bound && norm > 0.0 {
        let s = bound / norm;
        for x in v.iter_mut() {
            *x = (f64::from(*x) * s) as f32;
        }
    }
    norm
}

/// Adds independent Gaussian noise of standard deviation `stddev` to every value.
pub fn add_noise(v: &mut [f32], stddev: f64, rng: &mut impl Rng) {
    if stddev <= 0.0 {
        return;
    }
    for x in v.iter_mut() {
        let z: f64 = StandardNormal.sample(rng);
        *x = (f64::from(*x) + stddev * z) as f32;
    }
}

/// Adaptive clipping (Andrew et al. 2021): after each round the clipping
/// norm moves geometrically towards the `target_quantile` of the update
/// norms, `C ← C·exp(−η·(b̄ − γ))`, where `b̄` is the fraction of updates
/// that needed no clipping, counted with Gaussian noise of
/// `count_stddev` so that the count is private too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClip {
    pub target_quantile: f64,
    pub learning_rate: f64,
    pub count_stddev: f64,
}

impl AdaptiveClip {
    /// The noise multiplier left for the updates when the whole round must
    /// be `noise_multiplier`-private and the count takes its share:
    /// `z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)` (Andrew et al. 2021, Theorem 1).
    pub fn update_noise_multiplier(&self, noise_multiplier: f64) -> Result<f64, String> {
        let rest = noise_multiplier.powi(-2) - (2.0 * self.count_stddev).powi(-2);
        if rest <= 0.0 {
            return Err(format!(
                "the noise on the clipped count (stddev {}) is too small for noise multiplier {}: it must exceed \
                 half of it (raise privacy.clip_count_stddev above {}, or lower the noise multiplier)",
                self.count_stddev,
                noise_multiplier,
                noise_multiplier / 2.0
            ));
        }
        Ok(rest.powf(-0.5))
    }

    /// The next clipping norm after a round in which `unclipped` of `n`
    /// updates had a norm of at most `clip`.
    pub fn next(&self, clip: f64, unclipped: usize, n: usize, rng: &mut impl Rng) -> f64 {
        if n == 0 {
            return clip;
        }
        let z: f64 = StandardNormal.sample(rng);
        let fraction = (unclipped as f64 + self.count_stddev * z) / n as f64;
        clip * (-self.learning_rate * (fraction - self.target_quantile)).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// (q, noise multiplier, rounds, δ, ε) computed independently with
    /// Google's `dp_accounting` 0.6.0 (`tests/python/dp_reference.py`:
    /// `RdpAccountant(orders)` with the same integer orders, Poisson-sampled
    /// Gaussian events).
    const REFERENCE: &[(f64, f64, u64, f64, f64)] = include!("privacy_reference.in");

    #[test]
    fn the_accountant_matches_dp_accounting() {
        for &(q, z, rounds, delta, expected) in REFERENCE {
            let mut a = Accountant::default();
            for _ in 0..rounds {
                a.add_round(q, z);
            }
            let eps = a.epsilon(delta);
            assert!(
                (eps - expected).abs() <= 1e-6 * expected.max(1.0),
                "q={q} z={z} rounds={rounds} delta={delta}: {eps} vs dp_accounting's {expected}"
            );
        }
    }

    #[test]
    fn without_sampling_the_rdp_is_the_gaussian_mechanisms() {
        // q = 1: RDP(α) = α/(2σ²) exactly, T rounds compose to T·α/(2σ²).
        let mut a = Accountant::default();
        for _ in 0..10 {
            a.add_round(1.0, 2.0);
        }
        for (r, alpha) in a.rdp.iter().zip(orders()) {
            assert!((r - 10.0 * f64::from(alpha) / 8.0).abs() < 1e-9);
        }
        // Sampling amplifies privacy; more noise and fewer rounds spend less.
        let eps = |q: f64, z: f64, t: u64| {
            let mut a = Accountant::default();
            (0..t).for_each(|_| a.add_round(q, z));
            a.epsilon(1e-5)
        };
        assert!(eps(0.1, 1.0, 100) < eps(1.0, 1.0, 100));
        assert!(eps(0.1, 2.0, 100) < eps(0.1, 1.0, 100));
        assert!(eps(0.1, 1.0, 50) < eps(0.1, 1.0, 100));
        assert_eq!(eps(0.0, 1.0, 100), 0.0);
        let a = Accountant::default();
        assert_eq!(a.epsilon_after(0.5, 1.0, 1e-5), eps(0.5, 1.0, 1));
    }

    #[test]
    fn clipping_bounds_every_update() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for scale in [1e-3f32, 0.5, 3.0, 1e4] {
            let mut v: Vec<f32> = (0..1000).map(|_| rng.random_range(-1.0..1.0) * scale).collect();
            let before = v.clone();
            let norm = clip(&mut v, 2.0);
            let after = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            assert!(after <= 2.0 * (1.0 + 1e-6), "{after}");
            if norm <= 2.0 {
                assert_eq!(v, before, "an update inside the bound is left alone");
            } else {
                assert!((after - 2.0).abs() < 1e-4);
                // Same direction.
                let cos = v
                    .iter()
                    .zip(&before)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>()
                    / (after * norm);
                assert!((cos - 1.0).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn noise_has_the_stated_variance() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let n = 200_000;
        let mut v = vec![0.5f32; n];
        add_noise(&mut v, 0.3, &mut rng);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        // Standard errors: mean 0.3/√n ≈ 6.7e-4, variance 0.09·√(2/n) ≈ 2.8e-4.
        assert!((mean - 0.5).abs() < 4.0 * 6.7e-4, "{mean}");
        assert!((var - 0.09).abs() < 4.0 * 2.9e-4, "{var}");
    }

    #[test]
    fn adaptive_clipping_moves_towards_the_target_quantile() {
        let a = AdaptiveClip {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_stddev: 0.0,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // All updates fit: C shrinks; none fits: C grows; on target: C stays.
        assert!(a.next(1.0, 10, 10, &mut rng) < 1.0);
        assert!(a.next(1.0, 0, 10, &mut rng) > 1.0);
        assert!((a.next(1.0, 5, 10, &mut rng) - 1.0).abs() < 1e-12);
        assert!((a.next(1.0, 10, 10, &mut rng) - (-0.1f64).exp()).abs() < 1e-12);
        // Norms uniform on [0, 4]: C settles near their median, 2.
        let mut c = 0.1;
        for _ in 0..400 {
            let norms: Vec<f64> = (0..100).map(|_| rng.random_range(0.0..4.0)).collect();
            let unclipped = norms.iter().filter(|&&n| n <= c).count();
            c = a.next(c, unclipped, norms.len(), &mut rng);
        }
        assert!((c - 2.0).abs() < 0.3, "{c}");
        // The count's noise takes a share of the privacy: the updates get less.
        let a = AdaptiveClip { count_stddev: 5.0, ..a };
        let z = a.update_noise_multiplier(1.0).unwrap();
        assert!((z - (1.0f64 - 0.01).powf(-0.5)).abs() < 1e-12);
        let small = AdaptiveClip { count_stddev: 0.4, ..a };
        let e = small.update_noise_multiplier(1.0).unwrap_err();
        assert!(e.contains("must exceed half of it"), "{e}");
    }
}
