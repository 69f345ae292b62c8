//! Central evaluation of an asynchronous run's server steps, beside them:
//! a saved version that falls due (`eval.every`, and always the last) is
//! evaluated on the evaluator's thread while updates keep arriving and
//! later steps are aggregated and saved; its figures go into that step's
//! record when they come back. While one evaluation runs, the newest
//! version that falls due waits, and only that one.
//!
//! A synchronous round is evaluated in its close job instead, before its
//! record is written.

use std::sync::Arc;
use std::time::Instant;

use fedge_common::task::EvalMetrics;

use super::{Completion, Driver};
use crate::Result;

/// The evaluations of an asynchronous run's steps.
#[derive(Debug, Default)]
pub(super) struct StepEvals {
    /// The version being evaluated.
    running: Option<u64>,
    /// The newest version due while another was evaluated, with its model.
    waiting: Option<(u64, Arc<Vec<f32>>)>,
    /// Results whose step record is out in a close job.
    unrecorded: Vec<StepEval>,
}

/// One step's evaluation, come back.
#[derive(Debug)]
pub(super) struct StepEval {
    version: u64,
    eval: EvalMetrics,
    seconds: f64,
}

impl StepEvals {
    /// Whether an evaluation runs or waits.
    fn pending(&self) -> bool {
        self.running.is_some() || self.waiting.is_some()
    }
}

impl Driver {
    /// Evaluates saved version `version` (`global`) beside the steps, or
    /// has it wait for the evaluation in progress.
    pub(super) fn evaluate_step(&mut self, version: u64, global: Arc<Vec<f32>>) {
        if self.step_evals.running.is_some() {
            self.step_evals.waiting = Some((version, global));
            return;
        }
        self.step_evals.running = Some(version);
        let evaluator = self.evaluator.clone();
        let done = self.completions_tx.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = evaluator.evaluate(global).await;
            let _ = done.send(Completion::Evaluated {
                version,
                result,
                seconds: started.elapsed().as_secs_f64(),
            });
        });
    }

    /// A step's evaluation came back: it goes into the step's record, and
    /// the version waiting, if any, is evaluated next.
    pub(super) fn step_evaluated(&mut self, version: u64, result: Result<EvalMetrics>, seconds: f64) -> Result<()> {
        self.step_evals.running = None;
        let eval = result?;
        self.step_evals.unrecorded.push(StepEval { version, eval, seconds });
        self.record_step_evals();
        if let Some((next, global)) = self.step_evals.waiting.take() {
            self.evaluate_step(next, global);
        }
        Ok(())
    }

    /// Writes the evaluations that came back into their steps' records
    /// (when the run's store is not out in a close job; `run.json` has them
    /// from its next write on), the metrics and the log.
    pub(super) fn record_step_evals(&mut self) {
        let Some(store) = &mut self.store else {
            return;
        };
        for done in self.step_evals.unrecorded.drain(..) {
            let Some(rec) = store.history.rounds.iter_mut().rev().find(|r| r.round == done.version) else {
                continue;
            };
            rec.test_loss = Some(done.eval.loss);
            rec.test_accuracy = Some(done.eval.accuracy);
            rec.eval_seconds = done.seconds;
            self.metrics.test_accuracy.set(done.eval.accuracy);
            self.metrics.test_loss.set(done.eval.loss);
            self.metrics.eval_seconds.observe(done.seconds);
            self.reference_loss = Some(done.eval.loss);
            self.published = None;
            tracing::info!(
                step = done.version,
                of = self.total_rounds,
                test_accuracy = format!("{:.2}%", done.eval.accuracy * 100.0),
                test_loss = format!("{:.4}", done.eval.loss),
                eval_s = format!("{:.2}", done.seconds),
                "step evaluated"
            );
        }
    }

    /// Waits for the evaluations still running or waiting (the run's last
    /// step is among them) and records them.
    pub(super) async fn settle_step_evals(&mut self) -> Result<()> {
        while self.step_evals.pending() {
            match self.completions.recv().await {
                Some(Completion::Evaluated {
                    version,
                    result,
                    seconds,
                }) => self.step_evaluated(version, result, seconds)?,
                Some(_) => {}
                None => break,
            }
        }
        self.record_step_evals();
        Ok(())
    }
}
