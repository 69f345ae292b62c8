//! Counters the gRPC service updates as bytes and refusals pass, and the
//! driver reads per round.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters the service updates and the driver reads per round.
#[derive(Debug, Default)]
pub struct Traffic {
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub rejected_updates: AtomicU64,
    /// Model bytes sent to each node since the last round closed.
    pub down_by_node: Mutex<BTreeMap<String, u64>>,
    /// Refused joins and updates by reason since the last round closed.
    pub refusals: Mutex<BTreeMap<&'static str, u64>>,
    /// Refused updates per node over the whole run.
    pub refused_by_node: Mutex<BTreeMap<String, u64>>,
    /// Which refusals to log (a flood's are counted, not all logged).
    log_gate: crate::runtime::log_gate::LogGate,
}

impl Traffic {
    /// Counts one refused update: in `rejected_updates`, under `reason`,
    /// and for `node` when it is known.
    pub fn count_refused_update(&self, reason: &'static str, node: Option<&str>) {
        self.rejected_updates.fetch_add(1, Ordering::Relaxed);
        self.count_refusal(reason);
        if let Some(node) = node {
            let mut map = self
                .refused_by_node
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *map.entry(node.to_owned()).or_default() += 1;
        }
    }

    /// Refused updates per node so far.
    pub fn refused_by_node(&self) -> BTreeMap<String, u64> {
        self.refused_by_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts one refusal (of a join or an update) for `reason`.
    /// Whether to log a refusal of `kind` ([`crate::runtime::log_gate`]).
    pub fn log_refusal(&self, kind: &'static str) -> bool {
        self.log_gate.allow(kind)
    }

    pub fn count_refusal(&self, reason: &'static str) {
        let mut map = self.refusals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry(reason).or_default() += 1;
    }

    /// The refusal counts since the last call.
    pub fn take_refusals(&self) -> BTreeMap<String, u64> {
        let map = std::mem::take(&mut *self.refusals.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// Counts `bytes` of model stream sent to `node`.
    pub fn count_down(&self, node: &str, bytes: u64) {
        self.bytes_down.fetch_add(bytes, Ordering::Relaxed);
        let mut map = self
            .down_by_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry(node.to_owned()).or_default() += bytes;
    }

    /// The per-node downlink counts since the last call.
    pub fn take_down_by_node(&self) -> BTreeMap<String, u64> {
        std::mem::take(
            &mut *self
                .down_by_node
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}
