//! Local training and evaluation on one process's data.
//!
//! These functions run tensor work and block: call them from a dedicated
//! thread that owns the `VarStore`, never from an async task.

use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, ModuleT, OptimizerConfig, VarStore};
use tch::{Device, Tensor};

use crate::Result;
use crate::data::Dataset;

/// Hyper-parameters of one round of local training.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hyperparameters {
    pub epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Upper bound on optimizer steps; 0 means only the epochs bound.
    pub max_steps: u64,
    /// Seed of this round's shuffling and augmentation.
    pub seed: u64,
    /// Augmentation: random crops after zero padding by this many pixels (0: off).
    pub crop_padding: u32,
    /// Augmentation: random horizontal flips.
    pub horizontal_flip: bool,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.05,
            momentum: 0.9,
            weight_decay: 0.0,
            max_steps: 0,
            seed: 0,
            crop_padding: 0,
            horizontal_flip: false,
        }
    }
}

/// What a round of local training did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainMetrics {
    /// Mean training loss over the steps.
    pub loss: f64,
    /// Training accuracy over the examples seen.
    pub accuracy: f64,
    pub steps: u64,
    pub examples: u64,
    pub train_seconds: f64,
}

/// Loss and accuracy of a model on a data set.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub accuracy: f64,
    pub examples: u64,
}

/// Trains `net` (whose variables live in `vs`) on `data` with SGD (momentum,
/// weight decay), fresh optimizer state, for `epochs` passes or `max_steps`
/// steps, whichever comes first.
pub fn train(net: &impl ModuleT, vs: &VarStore, data: &Dataset, h: &Hyperparameters) -> Result<TrainMetrics> {
    let start = Instant::now();
    let device = vs.device();
    let mut opt = nn::Sgd {
        momentum: h.momentum,
        dampening: 0.0,
        wd: h.weight_decay,
        nesterov: false,
    }
    .build(vs, h.learning_rate)?;
    let n = data.len();
    let batch = (h.batch_size.max(1) as usize).min(n.max(1));
    let mut rng = ChaCha8Rng::seed_from_u64(h.seed);
    let mut order: Vec<i64> = (0..n as i64).collect();
    let (mut steps, mut examples, mut correct) = (0u64, 0u64, 0f64);
    let mut loss_sum = 0f64;
    'epochs: for _ in 0..h.epochs.max(1) {
        order.shuffle(&mut rng);
        for idx in order.chunks(batch) {
            if h.max_steps > 0 && steps >= h.max_steps {
                break 'epochs;
            }
            let (x, y) = if h.crop_padding > 0 || h.horizontal_flip {
                data.augmented_batch(idx, device, h.crop_padding as i64, h.horizontal_flip, &mut rng)
            } else {
                data.batch(&Tensor::from_slice(idx), device)
            };
            let logits = net.forward_t(&x, true);
            let loss = logits.cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            loss_sum += loss.double_value(&[]);
            correct += logits
                .argmax(-1, false)
                .eq_tensor(&y)
                .sum(tch::Kind::Int64)
                .double_value(&[]);
            steps += 1;
            examples += idx.len() as u64;
        }
    }
    Ok(TrainMetrics {
        loss: if steps > 0 { loss_sum / steps as f64 } else { 0.0 },
        accuracy: if examples > 0 { correct / examples as f64 } else { 0.0 },
        steps,
        examples,
        train_seconds: start.elapsed().as_secs_f64(),
    })
}

/// Evaluates `net` on `data` in batches of `batch_size`.
pub fn evaluate(net: &impl ModuleT, data: &Dataset, batch_size: usize, device: Device) -> EvalMetrics {
    let n = data.len();
    if n == 0 {
        return EvalMetrics::default();
    }
    let (mut loss_sum, mut correct) = (0f64, 0f64);
    tch::no_grad(|| {
        let mut start = 0;
        while start < n {
            let end = (start + batch_size.max(1)).min(n);
            let idx = Tensor::arange_start(start as i64, end as i64, (tch::Kind::Int64, Device::Cpu));
            let (x, y) = data.batch(&idx, device);
            let logits = net.forward_t(&x, false);
            loss_sum += logits.cross_entropy_for_logits(&y).double_value(&[]) * (end - start) as f64;
            correct += logits
                .argmax(-1, false)
                .eq_tensor(&y)
                .sum(tch::Kind::Int64)
                .double_value(&[]);
            start = end;
        }
    });
    EvalMetrics {
        loss: loss_sum / n as f64,
        accuracy: correct / n as f64,
        examples: n as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let m = train(&net, &vs, &train_set, &h).unwrap();
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
        let m = train(&net, &vs, &data, &h).unwrap();
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
        let m = train(&net, &vs, &data, &h).unwrap();
        assert_eq!((m.steps, m.examples), (2, 64));
    }
}
