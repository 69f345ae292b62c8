//! Prometheus metrics of a run, served at `/metrics` on `http.listen`.
//! The driver records into [`Metrics`] as rounds progress; the HTTP server
//! encodes it in the text exposition format on every scrape.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of the refusal counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

/// Everything `/metrics` shows (names carry the `fedge_` prefix).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub rounds_completed: Gauge,
    pub total_rounds: Gauge,
    pub round: Gauge,
    pub connected_nodes: Gauge,
    pub participants: Gauge,
    pub test_accuracy: Gauge<f64, AtomicU64>,
    pub test_loss: Gauge<f64, AtomicU64>,
    /// Differential privacy: ε spent by the run so far.
    pub privacy_epsilon: Gauge<f64, AtomicU64>,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    pub updates_accepted: Counter,
    pub refusals: Family<Reason, Counter>,
    pub update_latency: Histogram,
    pub round_seconds: Histogram,
    pub aggregation_seconds: Histogram,
    pub eval_seconds: Histogram,
    /// Asynchronous training: each applied update's staleness, in versions.
    pub update_staleness: Histogram,
    /// Asynchronous training: nodes training now.
    pub in_flight_nodes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fedge");
        let seconds = || Histogram::new(exponential_buckets(0.005, 2.0, 18));
        let m = Self {
            rounds_completed: Gauge::default(),
            total_rounds: Gauge::default(),
            round: Gauge::default(),
            connected_nodes: Gauge::default(),
            participants: Gauge::default(),
            test_accuracy: Gauge::default(),
            test_loss: Gauge::default(),
            privacy_epsilon: Gauge::default(),
            bytes_up: Counter::default(),
            bytes_down: Counter::default(),
            updates_accepted: Counter::default(),
            refusals: Family::default(),
            update_latency: seconds(),
            round_seconds: seconds(),
            aggregation_seconds: seconds(),
            eval_seconds: seconds(),
            update_staleness: Histogram::new([0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 55.0]),
            in_flight_nodes: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "rounds_completed",
            "Rounds aggregated and saved (the global model's version)",
            m.rounds_completed.clone(),
        );
        r.register(
            "total_rounds",
            "Rounds the run is configured for",
            m.total_rounds.clone(),
        );
        r.register("round", "The round in progress (0: none)", m.round.clone());
        r.register(
            "connected_nodes",
            "Nodes with an open instruction stream",
            m.connected_nodes.clone(),
        );
        r.register(
            "round_participants",
            "Nodes whose updates the last round aggregated",
            m.participants.clone(),
        );
        r.register(
            "test_accuracy",
            "Central test accuracy after the last evaluated round (0..1)",
            m.test_accuracy.clone(),
        );
        r.register(
            "test_loss",
            "Central test loss after the last evaluated round",
            m.test_loss.clone(),
        );
        r.register(
            "privacy_epsilon",
            "Differential privacy: epsilon spent by the run so far (at the configured delta; 0 without privacy)",
            m.privacy_epsilon.clone(),
        );
        r.register(
            "received_bytes",
            "Update stream bytes received from nodes",
            m.bytes_up.clone(),
        );
        r.register("sent_bytes", "Model stream bytes sent to nodes", m.bytes_down.clone());
        r.register(
            "updates_accepted",
            "Updates accepted into a round",
            m.updates_accepted.clone(),
        );
        r.register("refusals", "Refused joins and updates, by reason", m.refusals.clone());
        r.register(
            "update_latency_seconds",
            "From a round's first task to each accepted update",
            m.update_latency.clone(),
        );
        r.register(
            "round_duration_seconds",
            "Round wall time, first task to saved model",
            m.round_seconds.clone(),
        );
        r.register(
            "aggregation_duration_seconds",
            "Time to combine a round's updates and apply them",
            m.aggregation_seconds.clone(),
        );
        r.register(
            "evaluation_duration_seconds",
            "Central evaluation time per evaluated round",
            m.eval_seconds.clone(),
        );
        r.register(
            "update_staleness",
            "Asynchronous training: versions the global model moved between an applied update's base and its arrival",
            m.update_staleness.clone(),
        );
        r.register(
            "in_flight_nodes",
            "Asynchronous training: nodes training now",
            m.in_flight_nodes.clone(),
        );
        Self { registry, ..m }
    }

    /// Adds a round's refusal counts.
    pub fn count_refusals(&self, refusals: &BTreeMap<String, u64>) {
        for (reason, n) in refusals {
            self.refusals
                .get_or_create(&Reason { reason: reason.clone() })
                .inc_by(*n);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_family_with_its_prefix() {
        let m = Metrics::new();
        m.rounds_completed.set(3);
        m.test_accuracy.set(0.875);
        m.bytes_up.inc_by(1000);
        m.update_latency.observe(0.3);
        m.count_refusals(&BTreeMap::from([("non_finite".to_string(), 2)]));
        let text = m.encode();
        for line in [
            "fedge_rounds_completed 3",
            "fedge_test_accuracy 0.875",
            "fedge_received_bytes_total 1000",
            "fedge_refusals_total{reason=\"non_finite\"} 2",
            "fedge_update_latency_seconds_count 1",
            "# TYPE fedge_round_duration_seconds histogram",
            "# TYPE fedge_update_staleness histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
    }
}
