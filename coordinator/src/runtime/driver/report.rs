//! What the driver reports: the run's status for the HTTP side, the
//! Prometheus metrics, and per-node sums over the rounds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Driver;
use crate::runtime::metrics::Metrics;
use crate::runtime::status::{AsyncStatus, NodeStatus, PrivacyStatus, RoundPoint, SecureStatus, Status, phase_label};
use crate::runtime::store::RoundRecord;

/// A node's sums over the rounds it took part in.
#[derive(Debug, Default, Clone)]
pub(super) struct NodeTotals {
    bytes_up: u64,
    bytes_down: u64,
    last_train_seconds: Option<f64>,
}

impl NodeTotals {
    /// Adds a persisted round's per-node figures to `totals`.
    pub(super) fn absorb(totals: &mut BTreeMap<String, NodeTotals>, rec: &RoundRecord) {
        for p in &rec.participants {
            let t = totals.entry(p.node.clone()).or_default();
            t.bytes_up += p.bytes_up;
            t.last_train_seconds = Some(p.train_seconds);
        }
        for (node, bytes) in &rec.bytes_down_by_node {
            totals.entry(node.clone()).or_default().bytes_down += bytes;
        }
    }
}

/// The gauges that describe the last completed round.
fn show_last_round(m: &Metrics, rec: &RoundRecord) {
    m.participants.set(rec.participants.len() as i64);
    if let (Some(a), Some(l)) = (rec.test_accuracy, rec.test_loss) {
        m.test_accuracy.set(a);
        m.test_loss.set(l);
    }
    if let Some(p) = &rec.privacy {
        m.privacy_epsilon.set(p.epsilon);
    }
}

pub(super) fn round_point(rec: &RoundRecord) -> RoundPoint {
    RoundPoint {
        round: rec.round,
        participants: rec.participants.len(),
        test_accuracy: rec.test_accuracy,
        test_loss: rec.test_loss,
        federated_accuracy: rec.federated_accuracy,
        federated_loss: rec.federated_loss,
        bytes_up: rec.bytes_up,
        bytes_down: rec.bytes_down,
        round_seconds: rec.round_seconds,
        rejected_updates: rec.rejected_updates,
        epsilon: rec.privacy.as_ref().map(|p| p.epsilon),
        secure_survivors: rec.secure_aggregation.as_ref().map(|s| s.survivors),
        secure_dropped: rec.secure_aggregation.as_ref().map(|s| s.dropped),
        staleness: rec.staleness.clone(),
    }
}

impl Driver {
    /// Publishes the run's [`Status`] on `tx` after every
    /// event, and records into `metrics`; both start from the rounds a
    /// resumed run already holds.
    pub fn with_status(mut self, tx: watch::Sender<Status>, metrics: Arc<Metrics>) -> Self {
        if let Some(store) = &self.store {
            for rec in &store.history.rounds {
                NodeTotals::absorb(&mut self.node_totals, rec);
            }
            if let Some(last) = store.history.rounds.last() {
                show_last_round(&metrics, last);
            }
        }
        metrics.total_rounds.set(self.total_rounds as i64);
        self.status = Some(tx);
        self.metrics = metrics;
        self
    }

    /// Records a persisted round into the metrics and the per-node totals.
    pub(super) fn record_round(&mut self, rec: &RoundRecord) {
        NodeTotals::absorb(&mut self.node_totals, rec);
        let m = &self.metrics;
        show_last_round(m, rec);
        if rec.test_accuracy.is_some() {
            m.eval_seconds.observe(rec.eval_seconds);
        }
        m.bytes_up.inc_by(rec.bytes_up);
        m.bytes_down.inc_by(rec.bytes_down);
        m.count_refusals(&rec.refusals);
        m.round_seconds.observe(rec.round_seconds);
        m.aggregation_seconds.observe(rec.aggregation_seconds);
        for s in rec.participants.iter().filter_map(|p| p.staleness) {
            m.update_staleness.observe(s as f64);
        }
    }

    pub(super) fn publish_status(&mut self) {
        let m = &self.metrics;
        // A round counts as completed once it is saved: while its close job
        // runs, the machine already holds its version.
        let completed = self.machine.version().saturating_sub(u64::from(self.closing()));
        m.rounds_completed.set(completed as i64);
        m.round.set(self.machine.current_round().unwrap_or(0) as i64);
        m.connected_nodes.set(self.machine.connected_nodes() as i64);
        let asynchronous = self.machine.async_view().map(|v| AsyncStatus {
            in_flight: v.in_flight,
            buffered: v.buffered,
            buffer_size: v.buffer_size,
            waiting_steps: v.waiting_steps,
            durable_version: v.durable_version,
        });
        m.in_flight_nodes
            .set(asynchronous.as_ref().map_or(0, |a| a.in_flight) as i64);
        let Some(tx) = &self.status else { return };
        // The node table costs O(nodes): rebuild it at most every 200 ms
        // (the driver's tick publishes what the skipped events changed),
        // and at once when a round completes or the phase changes.
        let (version, phase_kind) = (self.machine.version(), self.machine.phase());
        if self
            .published
            .is_some_and(|(at, v, p)| at.elapsed() < Duration::from_millis(200) && v == version && p == phase_kind)
        {
            return;
        }
        self.published = Some((Instant::now(), version, phase_kind));
        // While a closed round is being saved its store is out in the
        // close job: the history shown stays as it was until it is back.
        let history = self.store.as_ref().map(|s| s.history.rounds.as_slice());
        let last = history.and_then(<[RoundRecord]>::last);
        let rejected = self.traffic.refused_by_node();
        let nodes: Vec<NodeStatus> = self
            .machine
            .node_views()
            .into_iter()
            .map(|v| {
                let totals = self.node_totals.get(&v.name).cloned().unwrap_or_default();
                NodeStatus {
                    rejected_updates: rejected.get(&v.name).copied().unwrap_or(0),
                    name: v.name,
                    state: v.state.into(),
                    connected: v.connected,
                    last_seen_ms: v.last_seen_ms,
                    rounds_contributed: v.rounds_contributed,
                    num_samples: v.num_samples,
                    last_train_seconds: totals.last_train_seconds,
                    bytes_up: totals.bytes_up,
                    bytes_down: totals.bytes_down,
                }
            })
            .collect();
        let privacy = self.machine.privacy().map(|p| PrivacyStatus {
            noise: p.mode.name().into(),
            noise_multiplier: p.noise_multiplier,
            clip_norm: p.clip,
            epsilon: p.epsilon(),
            delta: p.delta,
            epsilon_budget: p.budget,
        });
        let secure = self.machine.secure_settings().map(|s| {
            let current = self.machine.secure_round();
            SecureStatus {
                neighbours: s.neighbours,
                max_dropout: s.max_dropout,
                threshold: current
                    .map(|(_, t)| t)
                    .or_else(|| last.and_then(|r| r.secure_aggregation.as_ref()).map(|r| r.threshold)),
                step: current.map(|(step, _)| step.name().to_owned()),
            }
        });
        let phase = phase_label(self.machine.phase());
        // Readers only ever borrow the latest status; none waits for changes.
        tx.send_modify(|s| {
            s.phase = phase.into();
            s.round = self.machine.current_round();
            s.completed_rounds = completed;
            s.connected_nodes = self.machine.connected_nodes();
            s.nodes = nodes;
            s.asynchronous = asynchronous;
            if privacy.is_some() {
                s.privacy = privacy;
            }
            let shown_threshold = s.secure_aggregation.as_ref().and_then(|a| a.threshold);
            s.secure_aggregation = secure.map(|mut a| {
                if history.is_none() {
                    a.threshold = a.threshold.or(shown_threshold);
                }
                a
            });
            if let Some(history) = history {
                s.last_test_accuracy = last.and_then(|r| r.test_accuracy);
                s.last_test_loss = last.and_then(|r| r.test_loss);
                // The history only grows: add the rounds not shown yet, and
                // the evaluations of recent asynchronous steps that came
                // back after their step was shown.
                let shown = s.rounds.len();
                s.rounds.extend(history.iter().skip(shown).map(round_point));
                for (point, rec) in s.rounds.iter_mut().zip(history).rev().take(32) {
                    if point.test_accuracy.is_none() && rec.test_accuracy.is_some() {
                        *point = round_point(rec);
                    }
                }
                if last.is_some_and(|r| r.test_accuracy.is_none()) {
                    s.last_test_accuracy = history.iter().rev().find_map(|r| r.test_accuracy);
                    s.last_test_loss = history.iter().rev().find_map(|r| r.test_loss);
                }
            }
        });
    }
}
