//! Differential privacy on the coordinator (`[privacy]`): the clipping norm
//! of each round (fixed or adaptive), the noise, and the accountant that
//! turns rounds into the ε a run has spent. The arithmetic is in
//! [`fedge_common::privacy`]; this is the run's state, carried by the
//! [`crate::core::strategy::Strategy`] from round to round.
//!
//! - `central`: nodes send their updates as they are; the coordinator clips
//!   each to `C`, averages them with equal weights and adds Gaussian noise
//!   of standard deviation `z·C/n` to the mean of `n` updates (the sum gets
//!   `z·C`). Nodes trust the coordinator with their clipped updates.
//! - `distributed`: each of the round's `m` nodes clips its update and adds
//!   noise of `z·C/√m`, so that the sum of all `m` carries `z·C`; the
//!   coordinator only averages. When fewer than `m` deliver, the sum carries
//!   less noise, and the accountant counts the noise that is there. Without
//!   secure aggregation the coordinator still sees each node's (weakly
//!   noised) update: the guarantee is for what the run releases.
//!
//! The accountant treats a round as the Poisson-sampled Gaussian mechanism
//! with `q` = nodes asked / nodes available, the convention of DP-FedAvg;
//! fedge asks a fixed number of nodes, uniformly, without replacement.

use fedge_common::privacy::{Accountant, AdaptiveClip, add_noise};
use fedge_common::task::PrivacyTask;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Who adds DP noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseMode {
    #[default]
    Off,
    Central,
    Distributed,
}

impl NoiseMode {
    /// The name in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Central => "central",
            Self::Distributed => "distributed",
        }
    }
}

/// The run's privacy state.
#[derive(Debug, Clone)]
pub struct Privacy {
    pub mode: NoiseMode,
    /// z: the noise of a round over the clipping norm (count and updates together).
    pub noise_multiplier: f64,
    /// The clipping norm of the next round.
    pub clip: f64,
    /// Adaptive clipping as configured (a `count_stddev` of 0: a twentieth
    /// of each round's nodes).
    adaptive: Option<AdaptiveClip>,
    pub delta: f64,
    /// Stop before ε would pass this.
    pub budget: Option<f64>,
    pub accountant: Accountant,
}

/// What one round does for privacy, decided when it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundPlan {
    /// Probability that a given available node is asked.
    pub sampling_rate: f64,
    /// Nodes asked (m).
    pub asked: usize,
    pub clip: f64,
    /// The noise multiplier the updates get (z, or less when adaptive
    /// clipping's count takes a share).
    pub update_multiplier: f64,
    /// Adaptive clipping in this round, with the standard deviation of the
    /// noise on its count of unclipped updates.
    pub adaptive: Option<AdaptiveClip>,
}

/// A closed round's privacy figures, in `run.json` and the logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundPrivacy {
    pub noise: NoiseMode,
    pub sampling_rate: f64,
    /// The noise multiplier the round is accounted with (what the released
    /// sum carried, count included).
    pub noise_multiplier: f64,
    pub clip_norm: f64,
    /// The clipping norm adaptive clipping chose for the next round.
    pub next_clip_norm: f64,
    /// Updates whose norm was at most `clip_norm` before clipping.
    pub unclipped: usize,
    pub updates: usize,
    /// ε spent by the run after this round, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
}

impl Privacy {
    /// A run's privacy state before its first round: noise by `mode` at
    /// `noise_multiplier` times the clipping norm `clip` (adapted when
    /// `adaptive` is given), accounted at `delta`, stopping before ε would
    /// pass `budget`.
    pub fn new(
        mode: NoiseMode,
        noise_multiplier: f64,
        clip: f64,
        adaptive: Option<AdaptiveClip>,
        delta: f64,
        budget: Option<f64>,
    ) -> Self {
        Self {
            mode,
            noise_multiplier,
            clip,
            adaptive,
            delta,
            budget,
            accountant: Accountant::default(),
        }
    }

    /// ε spent so far.
    pub fn epsilon(&self) -> f64 {
        self.accountant.epsilon(self.delta)
    }

    /// Why a round asking `asked` of `available` nodes must not run: it
    /// would take ε past the budget.
    pub fn over_budget(&self, asked: usize, available: usize) -> Option<String> {
        let budget = self.budget?;
        let next = self.accountant.epsilon_after(
            asked as f64 / available.max(1) as f64,
            self.noise_multiplier,
            self.delta,
        );
        (next > budget).then(|| {
            format!(
                "the privacy budget is spent: another round would take epsilon from {:.3} to {next:.3}, \
                 past privacy.epsilon_budget = {budget} (delta {:e})",
                self.epsilon(),
                self.delta
            )
        })
    }

    /// The plan of a round asking `asked` of `available` nodes, or why it
    /// cannot run: adaptive clipping's count cannot take its share of the noise.
    pub fn plan(&self, asked: usize, available: usize) -> Result<RoundPlan, String> {
        let sampling_rate = asked as f64 / available.max(1) as f64;
        let adaptive = self.adaptive.as_ref().map(|a| AdaptiveClip {
            count_stddev: if a.count_stddev > 0.0 {
                a.count_stddev
            } else {
                asked as f64 / 20.0
            },
            ..a.clone()
        });
        let update_multiplier = match &adaptive {
            Some(a) => a.update_noise_multiplier(self.noise_multiplier)?,
            None => self.noise_multiplier,
        };
        Ok(RoundPlan {
            sampling_rate,
            asked,
            clip: self.clip,
            update_multiplier,
            adaptive,
        })
    }

    /// What a node is told: in `distributed` mode it clips and adds its
    /// share of the noise; in `central` mode it sends its update as it is.
    pub fn task(&self, plan: &RoundPlan) -> Option<PrivacyTask> {
        (self.mode == NoiseMode::Distributed).then(|| PrivacyTask {
            clip_norm: plan.clip,
            noise_stddev: plan.update_multiplier * plan.clip / (plan.asked.max(1) as f64).sqrt(),
        })
    }

    /// The bound the coordinator clips each update to (central mode only:
    /// distributed updates carry noise and are clipped by their nodes).
    pub fn coordinator_clip(&self, plan: &RoundPlan) -> Option<f64> {
        (self.mode == NoiseMode::Central).then_some(plan.clip)
    }

    /// Finishes a round over `mean`, the equal-weight mean of `updates`
    /// clipped updates of which `unclipped` needed no clipping: adds the
    /// central noise, moves the clipping norm, accounts the round.
    pub fn close_round(
        &mut self,
        plan: &RoundPlan,
        mean: &mut [f32],
        updates: usize,
        unclipped: usize,
        rng: &mut impl rand::Rng,
    ) -> RoundPrivacy {
        let n = updates.max(1) as f64;
        let update_multiplier = match self.mode {
            NoiseMode::Central => {
                add_noise(mean, plan.update_multiplier * plan.clip / n, rng);
                plan.update_multiplier
            }
            // Each of the m asked nodes added 1/√m of the noise; n delivered.
            _ => plan.update_multiplier * (n / plan.asked.max(1) as f64).sqrt().min(1.0),
        };
        let noise_multiplier = match &plan.adaptive {
            Some(a) if a.count_stddev > 0.0 => {
                (update_multiplier.powi(-2) + (2.0 * a.count_stddev).powi(-2)).powf(-0.5)
            }
            _ => update_multiplier,
        };
        let next_clip = plan
            .adaptive
            .as_ref()
            .map_or(plan.clip, |a| a.next(plan.clip, unclipped, updates, rng));
        self.clip = next_clip;
        self.accountant.add_round(plan.sampling_rate, noise_multiplier);
        RoundPrivacy {
            noise: self.mode,
            sampling_rate: plan.sampling_rate,
            noise_multiplier,
            clip_norm: plan.clip,
            next_clip_norm: next_clip,
            unclipped,
            updates,
            epsilon: self.epsilon(),
            delta: self.delta,
        }
    }

    /// Restores the accountant and the clipping norm from the rounds a
    /// resumed run has completed.
    pub fn replay<'a>(&mut self, rounds: impl IntoIterator<Item = Option<&'a RoundPrivacy>>) -> Result<()> {
        let mut accountant = Accountant::default();
        for (i, r) in rounds.into_iter().enumerate() {
            let r = r.ok_or_else(|| {
                Error::Checkpoint(format!(
                    "round {} of the run to resume has no privacy record: it ran without differential privacy, \
                     so this run's epsilon cannot be known; start a new run",
                    i + 1
                ))
            })?;
            accountant.add_round(r.sampling_rate, r.noise_multiplier);
            self.clip = r.next_clip_norm;
        }
        self.accountant = accountant;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    /// A run's privacy at z = 1, C = 2, δ = 1e-5, with `privacy.*`'s
    /// defaults for adaptive clipping (quantile 0.5, rate 0.2) when `count_stddev` is set.
    fn privacy(noise: NoiseMode, count_stddev: Option<f64>, budget: Option<f64>) -> Privacy {
        let adaptive = count_stddev.map(|count_stddev| AdaptiveClip {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_stddev,
        });
        Privacy::new(noise, 1.0, 2.0, adaptive, 1e-5, budget)
    }

    #[test]
    fn central_noise_goes_on_the_mean_with_the_stated_variance() {
        let mut p = privacy(NoiseMode::Central, None, None);
        let plan = p.plan(4, 8).unwrap();
        assert_eq!(plan.sampling_rate, 0.5);
        assert_eq!(p.task(&plan), None, "central: nodes send their updates as they are");
        assert_eq!(p.coordinator_clip(&plan), Some(2.0));
        let mut mean = vec![0.0f32; 100_000];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let r = p.close_round(&plan, &mut mean, 4, 4, &mut rng);
        // The sum of 4 gets z·C = 2: the mean gets 2/4 = 0.5.
        let var = mean.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / mean.len() as f64;
        assert!((var - 0.25).abs() < 0.01, "{var}");
        assert_eq!(r.noise_multiplier, 1.0);
        let mut reference = Accountant::default();
        reference.add_round(0.5, 1.0);
        assert_eq!(r.epsilon, reference.epsilon(1e-5));
        assert_eq!(r.next_clip_norm, 2.0);
    }

    #[test]
    fn distributed_noise_is_split_and_dropouts_are_accounted() {
        let mut p = privacy(NoiseMode::Distributed, None, None);
        let plan = p.plan(4, 4).unwrap();
        let task = p.task(&plan).unwrap();
        assert_eq!(task.clip_norm, 2.0);
        // Four nodes' noise of z·C/√4 = 1 each sums to variance 4 = (z·C)².
        assert!((task.noise_stddev - 1.0).abs() < 1e-12);
        assert_eq!(p.coordinator_clip(&plan), None);
        let mut mean = vec![0.25f32; 10];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        // Only one of the four delivered: its sum carries z·C/2.
        let r = p.close_round(&plan, &mut mean, 1, 1, &mut rng);
        assert_eq!(mean, vec![0.25f32; 10], "the coordinator adds nothing");
        assert!((r.noise_multiplier - 0.5).abs() < 1e-12);
    }

    #[test]
    fn the_budget_stops_the_run_before_it_is_exceeded() {
        let mut p = privacy(NoiseMode::Central, None, Some(10.0));
        let mut rounds = 0;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let why = loop {
            if let Some(why) = p.over_budget(8, 8) {
                break why;
            }
            let plan = p.plan(8, 8).unwrap();
            p.close_round(&plan, &mut [0.0], 8, 8, &mut rng);
            rounds += 1;
        };
        assert!(p.epsilon() <= 10.0 && rounds > 0);
        assert!(
            p.accountant.epsilon_after(1.0, 1.0, 1e-5) > 10.0,
            "stopped one round early"
        );
        assert!(why.contains("past privacy.epsilon_budget = 10"), "{why}");
    }

    #[test]
    fn adaptive_clipping_shares_the_noise_and_a_resume_replays_the_rounds() {
        let mut p = privacy(NoiseMode::Central, Some(5.0), None);
        let plan = p.plan(10, 20).unwrap();
        assert!((plan.update_multiplier - (1.0f64 - 0.01).powf(-0.5)).abs() < 1e-12);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let mut records = Vec::new();
        for _ in 0..3 {
            let plan = p.plan(10, 20).unwrap();
            // Every update fits: the norm shrinks.
            let r = p.close_round(&plan, &mut [0.0; 4], 10, 10, &mut rng);
            assert!((r.noise_multiplier - 1.0).abs() < 1e-9, "{}", r.noise_multiplier);
            records.push(r);
        }
        assert!(p.clip < 2.0);
        let mut resumed = privacy(NoiseMode::Central, Some(5.0), None);
        resumed.replay(records.iter().map(Some)).unwrap();
        assert_eq!(resumed.clip, p.clip);
        assert_eq!(resumed.epsilon(), p.epsilon());
        let e = resumed.replay([None]).unwrap_err().to_string();
        assert!(e.contains("round 1 of the run to resume has no privacy record"), "{e}");
        // Too little count noise for z: refused with the reason.
        let e = privacy(NoiseMode::Central, Some(0.1), None).plan(10, 20).unwrap_err();
        assert!(e.contains("raise privacy.clip_count_stddev"), "{e}");
    }
}
