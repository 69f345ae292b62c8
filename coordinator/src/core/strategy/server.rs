//! Server optimizers: how the aggregated update moves the global model.
//!
//! The aggregated update `Δ` (mean of `w_local − w_global`) is treated as a
//! pseudo-gradient step, as in Reddi et al. 2021, "Adaptive Federated
//! Optimization" (Algorithm 2), and Hsu et al. 2019 for server momentum:
//!
//! - `sgd`: `x ← x + η·Δ` (plain FedAvg when `η = 1`);
//! - `momentum` (FedAvgM): `v ← β·v + Δ`, `x ← x + η·v`;
//! - `adagrad`, `adam`, `yogi` (FedAdagrad, FedAdam, FedYogi):
//!   `m ← β₁·m + (1 − β₁)·Δ`, then
//!   `v ← v + Δ²` (adagrad), `v ← β₂·v + (1 − β₂)·Δ²` (adam),
//!   `v ← v − (1 − β₂)·Δ²·sign(v − Δ²)` (yogi), and `x ← x + η·m / (√v + τ)`,
//!   with `v` starting at `τ²` and no bias correction, as in the paper.
//!
//! State vectors are f32 (the model's precision); arithmetic is f64.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::core::model::GlobalModel;

const BLOCK: usize = 16 * 1024;

/// Which server optimizer, with its constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerOpt {
    Sgd,
    Momentum { beta: f64 },
    Adagrad { beta1: f64, tau: f64 },
    Adam { beta1: f64, beta2: f64, tau: f64 },
    Yogi { beta1: f64, beta2: f64, tau: f64 },
}

impl ServerOpt {
    /// Name as written in the configuration.
    pub fn name(&self) -> &'static str {
        match self {
            ServerOpt::Sgd => "sgd",
            ServerOpt::Momentum { .. } => "momentum",
            ServerOpt::Adagrad { .. } => "adagrad",
            ServerOpt::Adam { .. } => "adam",
            ServerOpt::Yogi { .. } => "yogi",
        }
    }

    fn tau(&self) -> Option<f64> {
        match *self {
            ServerOpt::Adagrad { tau, .. } | ServerOpt::Adam { tau, .. } | ServerOpt::Yogi { tau, .. } => Some(tau),
            _ => None,
        }
    }
}

/// A server optimizer and its state across rounds.
#[derive(Debug, Clone)]
pub struct ServerOptimizer {
    opt: ServerOpt,
    lr: f64,
    /// First moment (momentum buffer for FedAvgM).
    m: Vec<f32>,
    /// Second moment (adaptive optimizers).
    v: Vec<f32>,
    steps: u64,
}

impl ServerOptimizer {
    /// A fresh optimizer for a model of `numel` parameters.
    pub fn new(opt: ServerOpt, lr: f64, numel: usize) -> Self {
        let m = if matches!(opt, ServerOpt::Sgd) {
            Vec::new()
        } else {
            vec![0.0; numel]
        };
        let v = match opt.tau() {
            Some(tau) => vec![(tau * tau) as f32; numel],
            None => Vec::new(),
        };
        Self {
            opt,
            lr,
            m,
            v,
            steps: 0,
        }
    }

    /// The optimizer kind.
    pub fn kind(&self) -> ServerOpt {
        self.opt
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Moves `global` by the aggregated update `delta` and returns the new
    /// model, written over `delta`'s buffer (no model-sized allocation).
    pub fn step(&mut self, global: &[f32], mut delta: Vec<f32>) -> Vec<f32> {
        debug_assert_eq!(global.len(), delta.len());
        self.apply(0, global, &mut delta);
        self.steps += 1;
        delta
    }

    /// [`ServerOptimizer::step`] for a global model in memory or on disk
    /// (read a block at a time); fails only when the model cannot be read.
    pub fn step_model(&mut self, global: &GlobalModel, mut delta: Vec<f32>) -> crate::Result<Vec<f32>> {
        debug_assert_eq!(global.len(), delta.len());
        global.visit(&mut |offset, x| self.apply(offset, x, &mut delta[offset..offset + x.len()]))?;
        self.steps += 1;
        Ok(delta)
    }

    /// Moves the values at `offset..offset + global.len()` (`global`) by
    /// `delta`, writing the result over `delta`.
    fn apply(&mut self, offset: usize, global: &[f32], delta: &mut [f32]) {
        let range = offset..offset + global.len();
        let m = self.m.get_mut(range.clone()).unwrap_or_default();
        let v = self.v.get_mut(range).unwrap_or_default();
        let lr = self.lr;
        match self.opt {
            ServerOpt::Sgd => delta
                .par_chunks_mut(BLOCK)
                .zip(global.par_chunks(BLOCK))
                .for_each(|(d, x)| {
                    for (d, &x) in d.iter_mut().zip(x) {
                        *d = (f64::from(x) + lr * f64::from(*d)) as f32;
                    }
                }),
            ServerOpt::Momentum { beta } => delta
                .par_chunks_mut(BLOCK)
                .zip(m.par_chunks_mut(BLOCK))
                .zip(global.par_chunks(BLOCK))
                .for_each(|((d, m), x)| {
                    for ((d, m), &x) in d.iter_mut().zip(m).zip(x) {
                        let v = beta * f64::from(*m) + f64::from(*d);
                        *m = v as f32;
                        *d = (f64::from(x) + lr * v) as f32;
                    }
                }),
            opt => {
                let (beta1, tau) = match opt {
                    ServerOpt::Adagrad { beta1, tau }
                    | ServerOpt::Adam { beta1, tau, .. }
                    | ServerOpt::Yogi { beta1, tau, .. } => (beta1, tau),
                    _ => unreachable!("plain optimizers handled above"),
                };
                delta
                    .par_chunks_mut(BLOCK)
                    .zip(m.par_chunks_mut(BLOCK))
                    .zip(v.par_chunks_mut(BLOCK))
                    .zip(global.par_chunks(BLOCK))
                    .for_each(|(((dd, m), v), x)| {
                        for (((dd, m), v), &x) in dd.iter_mut().zip(m).zip(v).zip(x) {
                            let d = f64::from(*dd);
                            let mn = beta1 * f64::from(*m) + (1.0 - beta1) * d;
                            let vp = f64::from(*v);
                            let vn = match opt {
                                ServerOpt::Adagrad { .. } => vp + d * d,
                                ServerOpt::Adam { beta2, .. } => beta2 * vp + (1.0 - beta2) * d * d,
                                ServerOpt::Yogi { beta2, .. } => {
                                    let sign = match vp.total_cmp(&(d * d)) {
                                        std::cmp::Ordering::Greater => 1.0,
                                        std::cmp::Ordering::Less => -1.0,
                                        std::cmp::Ordering::Equal => 0.0,
                                    };
                                    vp - (1.0 - beta2) * d * d * sign
                                }
                                _ => unreachable!(),
                            };
                            *m = mn as f32;
                            *v = vn as f32;
                            *dd = (f64::from(x) + lr * mn / (vn.sqrt() + tau)) as f32;
                        }
                    });
            }
        }
    }

    /// The state to checkpoint: named vectors and the step count.
    pub fn state(&self) -> (BTreeMap<String, &[f32]>, u64) {
        let mut named = BTreeMap::new();
        if !self.m.is_empty() {
            named.insert("server.m".to_string(), self.m.as_slice());
        }
        if !self.v.is_empty() {
            named.insert("server.v".to_string(), self.v.as_slice());
        }
        (named, self.steps)
    }

    /// Restores checkpointed state; refuses state of another shape.
    pub fn restore(&mut self, mut named: BTreeMap<String, Vec<f32>>, steps: u64) -> Result<(), String> {
        for (name, slot) in [("server.m", &mut self.m), ("server.v", &mut self.v)] {
            if slot.is_empty() {
                continue;
            }
            let v = named.remove(name).ok_or_else(|| {
                format!(
                    "the checkpoint has no `{name}` for the {} server optimizer",
                    self.opt.name()
                )
            })?;
            if v.len() != slot.len() {
                return Err(format!("`{name}` has {} values; the model has {}", v.len(), slot.len()));
            }
            *slot = v;
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A direct transcription of Reddi et al. 2021, Algorithm 2 (and FedAvgM),
    /// one coordinate at a time, in f64.
    fn reference(opt: ServerOpt, lr: f64, x0: &[f64], deltas: &[Vec<f64>]) -> Vec<f64> {
        let n = x0.len();
        let mut x = x0.to_vec();
        let tau = opt.tau().unwrap_or(0.0);
        let mut m = vec![0.0; n];
        let mut v = vec![tau * tau; n];
        for d in deltas {
            for i in 0..n {
                match opt {
                    ServerOpt::Sgd => x[i] += lr * d[i],
                    ServerOpt::Momentum { beta } => {
                        m[i] = beta * m[i] + d[i];
                        x[i] += lr * m[i];
                    }
                    ServerOpt::Adagrad { beta1, tau } => {
                        m[i] = beta1 * m[i] + (1.0 - beta1) * d[i];
                        v[i] += d[i] * d[i];
                        x[i] += lr * m[i] / (v[i].sqrt() + tau);
                    }
                    ServerOpt::Adam { beta1, beta2, tau } => {
                        m[i] = beta1 * m[i] + (1.0 - beta1) * d[i];
                        v[i] = beta2 * v[i] + (1.0 - beta2) * d[i] * d[i];
                        x[i] += lr * m[i] / (v[i].sqrt() + tau);
                    }
                    ServerOpt::Yogi { beta1, beta2, tau } => {
                        m[i] = beta1 * m[i] + (1.0 - beta1) * d[i];
                        let d2 = d[i] * d[i];
                        let s = if v[i] > d2 {
                            1.0
                        } else if v[i] < d2 {
                            -1.0
                        } else {
                            0.0
                        };
                        v[i] -= (1.0 - beta2) * d2 * s;
                        x[i] += lr * m[i] / (v[i].sqrt() + tau);
                    }
                }
            }
        }
        x
    }

    fn all() -> Vec<ServerOpt> {
        vec![
            ServerOpt::Sgd,
            ServerOpt::Momentum { beta: 0.9 },
            ServerOpt::Adagrad { beta1: 0.9, tau: 1e-3 },
            ServerOpt::Adam {
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
            ServerOpt::Yogi {
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
        ]
    }

    #[test]
    fn fedavg_with_unit_server_lr_adds_the_update() {
        let mut o = ServerOptimizer::new(ServerOpt::Sgd, 1.0, 2);
        assert_eq!(o.step(&[1.0, 2.0], vec![0.5, -1.0]), vec![1.5, 1.0]);
        assert_eq!(o.steps(), 1);
        assert!(o.state().0.is_empty());
    }

    #[test]
    fn momentum_accumulates() {
        let mut o = ServerOptimizer::new(ServerOpt::Momentum { beta: 0.5 }, 1.0, 1);
        let x = o.step(&[0.0], vec![1.0]);
        assert_eq!(x, vec![1.0]);
        // v = 0.5·1 + 1 = 1.5
        assert_eq!(o.step(&x, vec![1.0]), vec![2.5]);
    }

    #[test]
    fn state_restores_into_a_fresh_optimizer() {
        let opt = ServerOpt::Adam {
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        let mut a = ServerOptimizer::new(opt, 0.1, 3);
        let x1 = a.step(&[0.0, 1.0, 2.0], vec![0.1, -0.2, 0.3]);
        let (named, steps) = a.state();
        let owned = named.into_iter().map(|(k, v)| (k, v.to_vec())).collect();
        let mut b = ServerOptimizer::new(opt, 0.1, 3);
        b.restore(owned, steps).unwrap();
        assert_eq!(a.step(&x1, vec![0.3, 0.3, 0.3]), b.step(&x1, vec![0.3, 0.3, 0.3]));
        let err = ServerOptimizer::new(opt, 0.1, 4)
            .restore(BTreeMap::from([("server.m".to_string(), vec![0.0; 3])]), 1)
            .unwrap_err();
        assert_eq!(err, "`server.m` has 3 values; the model has 4");
        let err = ServerOptimizer::new(opt, 0.1, 3)
            .restore(BTreeMap::new(), 1)
            .unwrap_err();
        assert_eq!(err, "the checkpoint has no `server.m` for the adam server optimizer");
    }

    proptest! {
        #[test]
        fn every_server_optimizer_equals_the_reference(
            x0 in proptest::collection::vec(-5.0f32..5.0, 4),
            deltas in proptest::collection::vec(proptest::collection::vec(-1.0f32..1.0, 4), 1..6),
            lr in 0.01f64..1.0,
        ) {
            for opt in all() {
                let mut o = ServerOptimizer::new(opt, lr, 4);
                let mut x = x0.clone();
                for d in &deltas {
                    x = o.step(&x, d.clone());
                }
                let want = reference(
                    opt,
                    lr,
                    &x0.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                    &deltas.iter().map(|d| d.iter().map(|&v| f64::from(v)).collect()).collect::<Vec<_>>(),
                );
                for (got, want) in x.iter().zip(&want) {
                    // f32 state and model: a few ulps per step, amplified by 1/(√v + τ).
                    prop_assert!((f64::from(*got) - want).abs() <= 1e-3 * want.abs().max(1.0), "{}: {x:?} vs {want:?}", opt.name());
                }
            }
        }
    }
}
