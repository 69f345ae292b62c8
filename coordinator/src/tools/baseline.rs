//! The centralized baseline: the same model and local-training code, trained
//! in one process on all the training data. It is the floor a federated run
//! is measured against (same math, no federation).

use std::time::Instant;

use fedge_learn::data::Split;
use fedge_learn::train::{LocalObjective, evaluate, train};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

use crate::{CoordinatorConfig, Result};

/// What a centralized run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineReport {
    pub model: String,
    pub data: String,
    pub train_samples: usize,
    pub test_samples: usize,
    pub epochs: u32,
    pub threads: usize,
    /// Loading and decoding the training split, seconds.
    pub load_train_seconds: f64,
    /// Loading and decoding the test split, seconds.
    pub load_test_seconds: f64,
    /// Training only, seconds.
    pub train_seconds: f64,
    pub eval_seconds: f64,
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// Trains `config.model` on the whole training split for `epochs` epochs with
/// `config.train`'s hyper-parameters, then evaluates on the test split.
/// Blocking: call from a blocking thread or `main`.
pub fn run_baseline(config: &CoordinatorConfig, epochs: u32, threads: usize) -> Result<BaselineReport> {
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let kind = config.model_kind()?;
    let source = config.data.source()?;
    let t = Instant::now();
    let train_set = source.load(Split::Train)?;
    let load_train_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let test_set = source.load(Split::Test)?;
    let load_test_seconds = t.elapsed().as_secs_f64();
    tracing::info!(
        train = train_set.len(),
        test = test_set.len(),
        load_train_s = format!("{load_train_seconds:.2}"),
        load_test_s = format!("{load_test_seconds:.2}"),
        "data loaded"
    );
    tch::manual_seed(config.seed as i64);
    let vs = VarStore::new(tch::Device::Cpu);
    let net = kind.build(&vs.root(), train_set.shape(), train_set.num_classes());
    // The floor trains plainly: the first round's learning rate, no federated terms.
    let mut hyper = config.train.hyperparameters(1, 1, config.seed, false);
    hyper.epochs = epochs;
    tracing::info!(model = %kind, data = %source.describe(), samples = train_set.len(), epochs, "centralized training");
    let m = train(&net, &vs, &train_set, &hyper, &LocalObjective::default())?;
    let t = Instant::now();
    let eval = evaluate(&net, &test_set, config.eval.batch_size, tch::Device::Cpu);
    let report = BaselineReport {
        model: kind.name().into(),
        data: source.describe(),
        train_samples: train_set.len(),
        test_samples: test_set.len(),
        epochs,
        threads: tch::get_num_threads() as usize,
        load_train_seconds,
        load_test_seconds,
        train_seconds: m.train_seconds,
        eval_seconds: t.elapsed().as_secs_f64(),
        train_loss: m.loss,
        test_loss: eval.loss,
        test_accuracy: eval.accuracy,
        peak_rss_bytes: fedge_common::fsutil::peak_rss_bytes(),
    };
    tracing::info!(
        train_s = format!("{:.1}", report.train_seconds),
        test_accuracy = format!("{:.2}%", report.test_accuracy * 100.0),
        test_loss = format!("{:.4}", report.test_loss),
        "centralized baseline done"
    );
    Ok(report)
}
