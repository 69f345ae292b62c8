//! The jobs that end a round, run beside the driver: the aggregation with
//! the check of the model it produces ([`aggregate`]), and the closed
//! round's evaluation, record and checkpoint ([`CloseJob`]). Each returns
//! what the driver feeds back into the round machine.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fedge_common::task::EvalMetrics;

use super::Traffic;
use crate::core::round::{Aggregated, AggregationJob, ClosedRound};
use crate::runtime::evaluator::Evaluator;
use crate::runtime::global::StoredModel;
use crate::runtime::memory::release_free_memory_off_runtime;
use crate::runtime::store::{RoundRecord, RunStore, federated_eval, participant};
use crate::{Error, Result};

/// The check of a new global model (`strategy.max_loss_ratio`): its central
/// loss against the last committed model's.
#[derive(Debug)]
pub(super) struct ModelCheck {
    ratio: f64,
    reference: Option<f64>,
    evaluator: Arc<Evaluator>,
}

/// The check's evaluation of a round's new model, which that round's record
/// keeps (it counts as evaluation time, not training).
#[derive(Debug, Clone, Copy)]
pub(super) struct CheckedEval {
    pub(super) round: u64,
    eval: EvalMetrics,
    took: Duration,
}

impl ModelCheck {
    pub(super) fn new(ratio: f64, reference: Option<f64>, evaluator: Arc<Evaluator>) -> Self {
        Self {
            ratio,
            reference,
            evaluator,
        }
    }

    /// Evaluates `done`'s new model: one whose loss is more than `ratio`
    /// times the reference (or not a number) is rejected, and the round
    /// machine retries the round without the update it suspects most; one
    /// that passes gives its evaluation to the round's record.
    async fn run(self, done: &mut Aggregated) -> Result<Option<CheckedEval>> {
        let Some(candidate) = done.candidate().cloned() else {
            return Ok(None);
        };
        release_free_memory_off_runtime().await;
        let started = Instant::now();
        let eval = self.evaluator.evaluate(candidate).await?;
        let ratio = self.ratio;
        match self.reference {
            Some(reference) if eval.loss.is_nan() || eval.loss > ratio * reference => {
                done.reject(format!(
                    "the new global model's central loss {:.4} is more than {ratio} times the last model's \
                     {reference:.4} (strategy.max_loss_ratio)",
                    eval.loss
                ));
                Ok(None)
            }
            _ => Ok(Some(CheckedEval {
                round: done.round(),
                eval,
                took: started.elapsed(),
            })),
        }
    }
}

/// Runs a round's aggregation off the async runtime, then the model check
/// when the run has one.
pub(super) async fn aggregate(
    job: AggregationJob,
    check: Option<ModelCheck>,
) -> Result<(Box<Aggregated>, Option<CheckedEval>)> {
    let mut done = tokio::task::spawn_blocking(move || job.run())
        .await
        .map_err(|e| Error::Internal(format!("aggregation task failed: {e}")))?;
    let checked = match check {
        Some(check) => check.run(&mut done).await?,
        None => None,
    };
    Ok((Box::new(done), checked))
}

/// A closed round to evaluate (unless the check already did), record and
/// save, with what it needs from the driver.
pub(super) struct CloseJob {
    pub(super) closed: ClosedRound,
    pub(super) store: RunStore,
    pub(super) evaluator: Arc<Evaluator>,
    /// Whether `eval.every` asks for an evaluation this round.
    pub(super) eval_due: bool,
    pub(super) checked: Option<CheckedEval>,
    /// From the round's first task to its close.
    pub(super) train_phase: Duration,
    pub(super) aggregation_seconds: f64,
    pub(super) traffic: Arc<Traffic>,
    /// The traffic counters (bytes up, bytes down, refused updates) when
    /// the last round closed.
    pub(super) last_counters: (u64, u64, u64),
    pub(super) resident_model_bytes: u64,
}

/// What a [`CloseJob`] gives back: the store, holding the round.
pub(super) struct Persisted {
    pub(super) store: RunStore,
    /// The traffic counters as this round's record took them.
    pub(super) last_counters: (u64, u64, u64),
    /// The new model's central loss, when it was evaluated.
    pub(super) test_loss: Option<f64>,
    /// The new model, read from its checkpoint from now on when it is larger
    /// than `limits.resident_model_bytes`.
    pub(super) stored: Option<Arc<StoredModel>>,
}

impl std::fmt::Debug for Persisted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persisted")
            .field("round", &self.store.history.rounds.last().map(|r| r.round))
            .field("test_loss", &self.test_loss)
            .finish_non_exhaustive()
    }
}

impl CloseJob {
    pub(super) async fn run(self) -> Result<Box<Persisted>> {
        let closed = self.closed;
        let eval_start = Instant::now();
        let checked_seconds = self.checked.as_ref().map_or(Duration::ZERO, |c| c.took);
        let train_phase = self.train_phase.saturating_sub(checked_seconds);
        let eval = if let Some(c) = self.checked {
            Some(c.eval)
        } else if self.eval_due {
            // The round's uploads are over: return what they freed before
            // the evaluation's activations are allocated beside the model.
            release_free_memory_off_runtime().await;
            Some(self.evaluator.evaluate(closed.global.clone()).await?)
        } else {
            None
        };
        let eval_seconds = (eval_start.elapsed() + checked_seconds).as_secs_f64();
        let traffic = &self.traffic;
        let up = traffic.bytes_up.load(Ordering::Relaxed);
        let down = traffic.bytes_down.load(Ordering::Relaxed);
        let rejected = traffic.rejected_updates.load(Ordering::Relaxed);
        let (up0, down0, rej0) = self.last_counters;
        let federated = federated_eval(&closed.contributions);
        let down_by_node = traffic.take_down_by_node();
        let record = RoundRecord {
            round: closed.round,
            selected: closed.selected,
            participants: closed
                .contributions
                .iter()
                .map(|c| participant(c, down_by_node.get(&c.node).copied().unwrap_or(0)))
                .collect(),
            bytes_down_by_node: down_by_node,
            test_loss: eval.map(|e| e.loss),
            test_accuracy: eval.map(|e| e.accuracy),
            federated_loss: federated.map(|e| e.loss),
            federated_accuracy: federated.map(|e| e.accuracy),
            federated_examples: federated.map_or(0, |e| e.examples),
            bytes_up: up - up0,
            bytes_down: down - down0,
            rejected_updates: rejected - rej0,
            refusals: traffic.take_refusals(),
            train_phase_seconds: train_phase.as_secs_f64(),
            aggregation_seconds: self.aggregation_seconds,
            eval_seconds,
            // Set once the round is persisted.
            checkpoint_seconds: 0.0,
            round_seconds: train_phase.as_secs_f64() + eval_seconds,
            privacy: closed.privacy.clone(),
            secure_aggregation: closed.secure.clone(),
            staleness: staleness_histogram(&closed.contributions),
            closed_unix_ms: closed.closed_ms,
        };
        let persist_start = Instant::now();
        let resident = self.resident_model_bytes;
        let mut store = self.store;
        let (mut store, stored) = tokio::task::spawn_blocking(move || -> Result<_> {
            store.persist_round(&closed, record)?;
            // A large model is read back from the checkpoint that made it
            // durable, and the copy in memory is freed.
            let stored = if crate::runtime::global::stays_resident(closed.global.len(), resident) {
                None
            } else {
                Some(Arc::new(StoredModel::of_checkpoint(&store, closed.version)?))
            };
            Ok((store, stored))
        })
        .await
        .map_err(|e| Error::Internal(format!("checkpoint task failed: {e}")))??;
        // The round's update chunks and the previous model were freed in
        // the threads that handled them; return that memory before the
        // next round's sum is built.
        release_free_memory_off_runtime().await;
        if let Some(last) = store.history.rounds.last_mut() {
            last.checkpoint_seconds = persist_start.elapsed().as_secs_f64();
        }
        Ok(Box::new(Persisted {
            store,
            last_counters: (up, down, rejected),
            test_loss: eval.map(|e| e.loss),
            stored,
        }))
    }
}

/// An asynchronous step's updates counted by staleness (`None` for a
/// synchronous round).
pub(super) fn staleness_histogram(
    contributions: &[crate::core::round::Contribution],
) -> Option<std::collections::BTreeMap<u64, u64>> {
    let mut histogram = std::collections::BTreeMap::new();
    for s in contributions.iter().filter_map(|c| c.staleness) {
        *histogram.entry(s.versions).or_insert(0) += 1;
    }
    (!histogram.is_empty()).then_some(histogram)
}

/// Logs a persisted round, or an asynchronous run's server step.
pub(super) fn log_round(rec: &RoundRecord, total_rounds: u64) {
    let percent = |a: Option<f64>| a.map_or_else(|| "-".into(), |a| format!("{:.2}%", a * 100.0));
    let test_loss = rec.test_loss.map_or_else(|| "-".into(), |l| format!("{l:.4}"));
    let seconds = format!("{:.2}", rec.round_seconds + rec.checkpoint_seconds);
    let payload: u64 = rec.participants.iter().map(|p| p.payload_bytes).sum();
    match &rec.staleness {
        Some(staleness) => tracing::info!(
            step = rec.round,
            of = total_rounds,
            updates = rec.participants.len(),
            staleness = format!("{staleness:?}"),
            test_accuracy = percent(rec.test_accuracy),
            test_loss,
            buffer_s = seconds,
            bytes_up = rec.bytes_up,
            bytes_down = rec.bytes_down,
            update_payload_bytes = payload,
            "step complete"
        ),
        None => tracing::info!(
            round = rec.round,
            of = total_rounds,
            participants = rec.participants.len(),
            test_accuracy = percent(rec.test_accuracy),
            test_loss,
            federated_accuracy = percent(rec.federated_accuracy),
            round_s = seconds,
            bytes_up = rec.bytes_up,
            bytes_down = rec.bytes_down,
            update_payload_bytes = payload,
            epsilon = rec.privacy.as_ref().map(|p| format!("{:.3}", p.epsilon)),
            "round complete"
        ),
    }
}
