//! Local training and evaluation on one process's data.
//!
//! These functions run tensor work and block: call them from a dedicated
//! thread that owns the `VarStore`, never from an async task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fedge_common::task::{EvalMetrics, Hyperparameters, LocalOptimizer, TrainMetrics};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, ModuleT, OptimizerConfig, VarStore};
use tch::{Device, Tensor};

use crate::Result;
use crate::data::Dataset;

/// A progress callback: (steps done, steps in all, this step's loss).
pub type StepReport = Box<dyn Fn(u64, u64, f64)>;

/// An emulated device speed: after each step the training thread waits so
/// that the step takes `slowdown` times its real time (the edge node's
/// `train.slowdown`). The thread sleeps while it waits, so a slowed node
/// leaves the CPU to the others on the same machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace(f64);

impl Default for Pace {
    fn default() -> Self {
        Self(1.0)
    }
}

impl Pace {
    /// Longest single sleep, so a stop is noticed within it.
    const SLICE: Duration = Duration::from_millis(50);

    /// Steps `factor` times slower than real (1, or anything not above it: real speed).
    pub fn slowdown(factor: f64) -> Self {
        Self(if factor.is_finite() && factor > 1.0 {
            factor
        } else {
            1.0
        })
    }

    /// The slowdown factor.
    pub fn factor(self) -> f64 {
        self.0
    }

    /// How long to wait after a step that took `step`.
    pub fn wait_after(self, step: Duration) -> Duration {
        step.mul_f64(self.0 - 1.0)
    }

    /// Waits after a step that took `step`, waking to return early once
    /// `cancel` is set.
    fn pause(self, step: Duration, cancel: Option<&AtomicBool>) {
        let until = Instant::now() + self.wait_after(step);
        loop {
            let now = Instant::now();
            if now >= until || cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return;
            }
            std::thread::sleep((until - now).min(Self::SLICE));
        }
    }
}

/// Extra terms of the local objective, per trainable variable.
#[derive(Default)]
pub struct LocalObjective {
    /// FedProx: `(μ, w_global)`; adds `μ·(w − w_global)` to each gradient.
    pub proximal: Option<(f64, Vec<(String, Tensor)>)>,
    /// SCAFFOLD: `c − cᵢ` per variable, added to each gradient.
    pub correction: Vec<(String, Tensor)>,
    /// Set when the process is shutting down: training stops before its
    /// next step with [`crate::Error::Cancelled`].
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Called after every step with (steps done, steps in all, this step's loss),
    /// for progress displays.
    pub on_step: Option<StepReport>,
    /// The emulated device speed.
    pub pace: Pace,
}

impl LocalObjective {
    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// Trains `net` (whose variables live in `vs`) on `data` with a fresh
/// optimizer (SGD with momentum and weight decay, or Adam) for `epochs`
/// passes or `max_steps` steps, whichever comes first, adding `objective`'s
/// terms to every gradient.
pub fn train(
    net: &impl ModuleT,
    vs: &VarStore,
    data: &Dataset,
    h: &Hyperparameters,
    objective: &LocalObjective,
) -> Result<TrainMetrics> {
    let start = Instant::now();
    let device = vs.device();
    let mut opt = match h.optimizer {
        LocalOptimizer::Sgd => nn::Sgd {
            momentum: h.momentum,
            dampening: 0.0,
            wd: h.weight_decay,
            nesterov: false,
        }
        .build(vs, h.learning_rate)?,
        LocalOptimizer::Adam => nn::Adam {
            wd: h.weight_decay,
            ..Default::default()
        }
        .build(vs, h.learning_rate)?,
    };
    let vars = vs.variables();
    let var = |name: &str| -> Result<Tensor> {
        vars.get(name)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| crate::Error::Params(format!("model has no tensor `{name}`")))
    };
    let proximal: Vec<(Tensor, Tensor, f64)> = match &objective.proximal {
        Some((mu, anchors)) => anchors
            .iter()
            .map(|(name, anchor)| Ok((var(name)?, anchor.shallow_clone(), *mu)))
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    let correction: Vec<(Tensor, Tensor)> = objective
        .correction
        .iter()
        .map(|(name, c)| Ok((var(name)?, c.shallow_clone())))
        .collect::<Result<_>>()?;
    let n = data.len();
    let batch = (h.batch_size.max(1) as usize).min(n.max(1));
    let mut rng = ChaCha8Rng::seed_from_u64(h.seed);
    let mut order: Vec<i64> = (0..n as i64).collect();
    let (mut steps, mut examples, mut correct) = (0u64, 0u64, 0f64);
    let mut loss_sum = 0f64;
    let per_epoch = n.div_ceil(batch) as u64;
    let total = match h.max_steps {
        0 => per_epoch * u64::from(h.epochs.max(1)),
        max => max.min(per_epoch * u64::from(h.epochs.max(1))),
    };
    'epochs: for _ in 0..h.epochs.max(1) {
        order.shuffle(&mut rng);
        for idx in order.chunks(batch) {
            if h.max_steps > 0 && steps >= h.max_steps {
                break 'epochs;
            }
            if objective.cancelled() {
                return Err(crate::Error::Cancelled);
            }
            let step_start = Instant::now();
            let (x, y) = if h.crop_padding > 0 || h.horizontal_flip {
                data.augmented_batch(idx, device, h.crop_padding as i64, h.horizontal_flip, &mut rng)
            } else {
                data.batch(&Tensor::from_slice(idx), device)
            };
            let logits = net.forward_t(&x, true);
            let loss = logits.cross_entropy_for_logits(&y);
            opt.zero_grad();
            loss.backward();
            if !proximal.is_empty() || !correction.is_empty() {
                tch::no_grad(|| {
                    for (w, anchor, mu) in &proximal {
                        let mut g = w.grad();
                        if g.defined() {
                            let _ = g.g_add_(&((w - anchor) * *mu));
                        }
                    }
                    for (w, c) in &correction {
                        let mut g = w.grad();
                        if g.defined() {
                            let _ = g.g_add_(c);
                        }
                    }
                });
            }
            opt.step();
            let step_loss = loss.double_value(&[]);
            loss_sum += step_loss;
            correct += correct_predictions(&logits, &y);
            steps += 1;
            examples += idx.len() as u64;
            objective.pace.pause(step_start.elapsed(), objective.cancel.as_deref());
            if let Some(report) = &objective.on_step {
                report(steps, total, step_loss);
            }
        }
    }
    Ok(TrainMetrics {
        loss: if steps > 0 { loss_sum / steps as f64 } else { 0.0 },
        accuracy: if examples > 0 { correct / examples as f64 } else { 0.0 },
        steps,
        examples,
        train_seconds: start.elapsed().as_secs_f64(),
        ..TrainMetrics::default()
    })
}

/// FedSGD's local step: the gradient of the mean loss over the local data
/// (or its first `max_steps` batches) at the model's current weights, plus
/// `weight_decay · w`, in `manifest` order. Variables without a gradient
/// (running statistics) get zeros. The model is not changed. Each batch is
/// slowed to `pace`.
pub fn gradient(
    net: &impl ModuleT,
    vs: &VarStore,
    data: &Dataset,
    h: &Hyperparameters,
    manifest: &fedge_common::params::Manifest,
    pace: Pace,
) -> Result<(Vec<f32>, TrainMetrics)> {
    let start = Instant::now();
    let device = vs.device();
    let vars = vs.variables();
    for t in vars.values() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let n = data.len();
    let batch = (h.batch_size.max(1) as usize).min(n.max(1));
    let mut rng = ChaCha8Rng::seed_from_u64(h.seed);
    let mut order: Vec<i64> = (0..n as i64).collect();
    order.shuffle(&mut rng);
    let (mut steps, mut examples, mut correct, mut loss_sum) = (0u64, 0u64, 0f64, 0f64);
    for idx in order.chunks(batch) {
        if h.max_steps > 0 && steps >= h.max_steps {
            break;
        }
        let step_start = Instant::now();
        let (x, y) = data.batch(&Tensor::from_slice(idx), device);
        let logits = net.forward_t(&x, true);
        // Sum of per-example losses; divided by the example count below.
        let loss = logits.cross_entropy_for_logits(&y) * idx.len() as f64;
        loss.backward();
        loss_sum += loss.double_value(&[]);
        correct += correct_predictions(&logits, &y);
        steps += 1;
        examples += idx.len() as u64;
        pace.pause(step_start.elapsed(), None);
    }
    let mut out = vec![0f32; manifest.numel()];
    let mut offset = 0;
    let scale = 1.0 / examples.max(1) as f64;
    tch::no_grad(|| -> Result<()> {
        for meta in &manifest.tensors {
            let w = vars
                .get(&meta.name)
                .ok_or_else(|| crate::Error::Params(format!("model has no tensor `{}`", meta.name)))?;
            let k = meta.numel();
            let g = w.grad();
            if g.defined() {
                let total = g * scale + w * h.weight_decay;
                let total = total.to_device(Device::Cpu).to_kind(tch::Kind::Float).contiguous();
                total.f_copy_data(&mut out[offset..offset + k], k)?;
            }
            offset += k;
        }
        Ok(())
    })?;
    Ok((
        out,
        TrainMetrics {
            loss: if examples > 0 { loss_sum / examples as f64 } else { 0.0 },
            accuracy: if examples > 0 { correct / examples as f64 } else { 0.0 },
            steps,
            examples,
            train_seconds: start.elapsed().as_secs_f64(),
            ..TrainMetrics::default()
        },
    ))
}

/// Number of rows of `logits` whose arg-max is the label in `y`.
fn correct_predictions(logits: &Tensor, y: &Tensor) -> f64 {
    logits
        .argmax(-1, false)
        .eq_tensor(y)
        .sum(tch::Kind::Int64)
        .double_value(&[])
}

/// Evaluates `net` on `data` in batches of `batch_size`.
pub fn evaluate(net: &impl ModuleT, data: &Dataset, batch_size: usize, device: Device) -> EvalMetrics {
    let n = data.len();
    let step = batch_size.max(1);
    let batches = (0..n).step_by(step).map(|start| {
        let end = (start + step).min(n);
        let idx = Tensor::arange_start(start as i64, end as i64, (tch::Kind::Int64, Device::Cpu));
        Ok::<_, std::convert::Infallible>(data.batch(&idx, device))
    });
    match evaluate_batches(net, batches) {
        Ok(metrics) => metrics,
        Err(never) => match never {},
    }
}

/// Evaluates `net` on batches of normalized inputs and their labels, taken
/// as they come (from memory or read from disk); stops at the first batch
/// that cannot be had.
pub fn evaluate_batches<E>(
    net: &impl ModuleT,
    batches: impl Iterator<Item = std::result::Result<(Tensor, Tensor), E>>,
) -> std::result::Result<EvalMetrics, E> {
    let (mut loss_sum, mut correct, mut n) = (0f64, 0f64, 0u64);
    tch::no_grad(|| {
        for batch in batches {
            let (x, y) = batch?;
            let k = y.size()[0];
            let logits = net.forward_t(&x, false);
            loss_sum += logits.cross_entropy_for_logits(&y).double_value(&[]) * k as f64;
            correct += correct_predictions(&logits, &y);
            n += k as u64;
        }
        Ok(())
    })?;
    Ok(if n == 0 {
        EvalMetrics::default()
    } else {
        EvalMetrics {
            loss: loss_sum / n as f64,
            accuracy: correct / n as f64,
            examples: n,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slowed_step_waits_its_factor_and_a_stop_cuts_the_wait_short() {
        assert_eq!(
            Pace::slowdown(4.0).wait_after(Duration::from_millis(100)),
            Duration::from_millis(300)
        );
        assert_eq!(Pace::slowdown(1.0).wait_after(Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(Pace::slowdown(0.5), Pace::default());
        assert_eq!(Pace::slowdown(f64::NAN).factor(), 1.0);
        // A step of 1 s at 1000x would wait 999 s; a stop ends the wait.
        let cancel = std::sync::Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::Relaxed);
        });
        let started = Instant::now();
        Pace::slowdown(1000.0).pause(Duration::from_secs(1), Some(&cancel));
        stopper.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    }
    use crate::data::synthetic;
    use crate::model::ModelKind;

    #[test]
    fn training_on_synthetic_data_beats_chance() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let net = ModelKind::Cnn.build(&vs.root(), [3, 32, 32], 10);
        let train_set = synthetic(3, 1, 1500);
        let test_set = synthetic(3, 2, 500);
        let before = evaluate(&net, &test_set, 250, Device::Cpu);
        let h = Hyperparameters {
            epochs: 2,
            learning_rate: 0.02,
            ..Default::default()
        };
        let m = train(&net, &vs, &train_set, &h, &LocalObjective::default()).unwrap();
        assert_eq!(m.examples, 3000);
        assert_eq!(m.steps, 2 * 1500_u64.div_ceil(32));
        let after = evaluate(&net, &test_set, 250, Device::Cpu);
        assert!(
            after.accuracy > 0.5,
            "accuracy {} (before {})",
            after.accuracy,
            before.accuracy
        );
        assert!(after.loss < before.loss);
    }

    #[test]
    fn augmentation_trains_too() {
        let vs = VarStore::new(Device::Cpu);
        let net = ModelKind::Cnn.build(&vs.root(), [3, 32, 32], 10);
        let data = synthetic(3, 1, 64);
        let h = Hyperparameters {
            crop_padding: 4,
            horizontal_flip: true,
            ..Default::default()
        };
        let m = train(&net, &vs, &data, &h, &LocalObjective::default()).unwrap();
        assert_eq!(m.examples, 64);
        assert!(m.loss.is_finite());
    }

    #[test]
    fn max_steps_bounds_training() {
        let vs = VarStore::new(Device::Cpu);
        let net = ModelKind::Cnn.build(&vs.root(), [3, 32, 32], 10);
        let data = synthetic(3, 1, 200);
        let h = Hyperparameters {
            max_steps: 2,
            epochs: 5,
            ..Default::default()
        };
        let m = train(&net, &vs, &data, &h, &LocalObjective::default()).unwrap();
        assert_eq!((m.steps, m.examples), (2, 64));
    }

    #[test]
    fn progress_is_reported_after_every_step_with_the_total() {
        let vs = VarStore::new(Device::Cpu);
        let net = ModelKind::Mlp2nn.build(&vs.root(), [3, 32, 32], 10);
        let data = synthetic(3, 1, 100);
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let log = seen.clone();
        let objective = LocalObjective {
            on_step: Some(Box::new(move |done, total, loss| {
                log.borrow_mut().push((done, total, loss))
            })),
            ..LocalObjective::default()
        };
        let h = Hyperparameters {
            epochs: 2,
            batch_size: 32,
            ..Default::default()
        };
        let m = train(&net, &vs, &data, &h, &objective).unwrap();
        let seen = seen.borrow();
        // 100 samples in batches of 32: 4 steps per epoch, 8 in all.
        assert_eq!(m.steps, 8);
        assert_eq!(
            seen.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
            (1..=8).map(|i| (i, 8)).collect::<Vec<_>>()
        );
        assert!(seen.iter().all(|s| s.2.is_finite() && s.2 > 0.0));
    }

    #[test]
    fn a_cancelled_objective_stops_training_with_a_clear_error() {
        let vs = VarStore::new(Device::Cpu);
        let net = ModelKind::Mlp2nn.build(&vs.root(), [3, 32, 32], 10);
        let data = synthetic(3, 1, 64);
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let objective = LocalObjective {
            cancel: Some(cancel),
            ..LocalObjective::default()
        };
        let e = train(&net, &vs, &data, &Hyperparameters::default(), &objective).unwrap_err();
        assert_eq!(e.to_string(), "training stopped: the node is shutting down");
    }

    fn small() -> (VarStore, crate::model::Net, fedge_common::params::Manifest) {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let net = ModelKind::Mlp2nn.build(&vs.root(), [3, 32, 32], 10);
        let manifest = crate::tensors::manifest_of(&vs);
        (vs, net, manifest)
    }

    #[test]
    fn the_fedsgd_gradient_does_not_depend_on_the_batching() {
        let (vs, net, manifest) = small();
        let data = synthetic(1, 4, 20);
        let whole = Hyperparameters {
            batch_size: 20,
            weight_decay: 0.01,
            ..Default::default()
        };
        let before = crate::tensors::flatten(&vs, &manifest).unwrap();
        let (g1, m1) = gradient(&net, &vs, &data, &whole, &manifest, Pace::default()).unwrap();
        let (g2, m2) = gradient(
            &net,
            &vs,
            &data,
            &Hyperparameters {
                batch_size: 7,
                ..whole.clone()
            },
            &manifest,
            Pace::default(),
        )
        .unwrap();
        assert_eq!((m1.examples, m2.examples, m2.steps), (20, 20, 3));
        assert!((m1.loss - m2.loss).abs() < 1e-5);
        for (a, b) in g1.iter().zip(&g2) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1e-2), "{a} vs {b}");
        }
        assert_eq!(
            crate::tensors::flatten(&vs, &manifest).unwrap(),
            before,
            "weights moved"
        );
        // A step against the gradient lowers the loss.
        let mut vs = vs;
        let stepped: Vec<f32> = before.iter().zip(&g1).map(|(w, g)| w - 0.1 * g).collect();
        crate::tensors::load_into(&mut vs, &manifest, &stepped).unwrap();
        let (_, m3) = gradient(&net, &vs, &data, &whole, &manifest, Pace::default()).unwrap();
        assert!(m3.loss < m1.loss, "{} !< {}", m3.loss, m1.loss);
    }

    #[test]
    fn a_scaffold_correction_shifts_each_step_by_minus_lr_times_it() {
        let data = synthetic(1, 4, 16);
        let h = Hyperparameters {
            batch_size: 16,
            max_steps: 1,
            momentum: 0.0,
            learning_rate: 0.1,
            ..Default::default()
        };
        // Both runs start from the same weights, loaded explicitly: libtorch's
        // global generator is shared with tests running in parallel.
        let (vs, _, manifest) = small();
        let init = crate::tensors::flatten(&vs, &manifest).unwrap();
        let run = |objective: &LocalObjective| {
            let (mut vs, net, manifest) = small();
            crate::tensors::load_into(&mut vs, &manifest, &init).unwrap();
            train(&net, &vs, &data, &h, objective).unwrap();
            crate::tensors::flatten(&vs, &manifest).unwrap()
        };
        let plain = run(&LocalObjective::default());
        let correction = manifest
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    Tensor::full(t.shape.as_slice(), 0.5, (tch::Kind::Float, Device::Cpu)),
                )
            })
            .collect();
        drop(vs);
        let corrected = run(&LocalObjective {
            correction,
            ..Default::default()
        });
        for (a, b) in plain.iter().zip(&corrected) {
            assert!((a - 0.05 - b).abs() < 1e-5, "{a} - 0.05 != {b}");
        }
    }

    #[test]
    fn a_large_proximal_term_keeps_the_model_near_the_global_one() {
        let data = synthetic(1, 4, 64);
        let h = Hyperparameters {
            epochs: 3,
            batch_size: 8,
            learning_rate: 0.05,
            ..Default::default()
        };
        let drift = |mu: f64| {
            let (vs, net, manifest) = small();
            let start = crate::tensors::flatten(&vs, &manifest).unwrap();
            let anchors = vs
                .variables()
                .into_iter()
                .map(|(k, v)| (k, v.detach().copy()))
                .collect();
            let objective = LocalObjective {
                proximal: (mu > 0.0).then_some((mu, anchors)),
                ..Default::default()
            };
            train(&net, &vs, &data, &h, &objective).unwrap();
            let end = crate::tensors::flatten(&vs, &manifest).unwrap();
            start
                .iter()
                .zip(&end)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let (free, held) = (drift(0.0), drift(5.0));
        assert!(held < 0.5 * free, "drift with mu=5: {held}, without: {free}");
    }
}
