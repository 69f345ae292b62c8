//! `[simulation]`: `coordinator simulate`'s virtual nodes and their data.

use fedge_learn::partition::{Scheme, SchemeParams};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// An in-process simulation (`coordinator simulate`): virtual nodes,
/// each holding one share of `data.path`'s training split, trained by a
/// pool of threads with the edge node's own training code, driving this
/// run's round machine. Every other section applies as in a served run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulationConfig {
    /// Number of virtual nodes (named sim-1 … sim-N).
    pub nodes: u32,
    /// How the training split is shared among them: `iid`, `dirichlet`,
    /// `shards` or `quantity` (as `coordinator partition`).
    pub partition: String,
    /// Dirichlet concentration α (`dirichlet`).
    pub alpha: f64,
    /// Fewest samples a Dirichlet draw must give each node (`dirichlet`).
    pub min_size: usize,
    /// Shards, so at most this many labels, per node (`shards`).
    pub labels_per_node: usize,
    /// σ of the log-normal node sizes (`quantity`).
    pub sigma: f64,
    /// Training threads, each running one node's job at a time (0: one per core).
    pub trainers: u32,
    /// libtorch threads of each training thread.
    pub trainer_threads: u32,
}

impl Default for SimulationConfig {
    fn default() -> Self {
        Self {
            nodes: 100,
            partition: "iid".into(),
            alpha: 0.5,
            min_size: 10,
            labels_per_node: 2,
            sigma: 1.0,
            trainers: 0,
            trainer_threads: 1,
        }
    }
}

impl SimulationConfig {
    /// The partition scheme, validated.
    pub fn scheme(&self) -> Result<Scheme> {
        Scheme::from_params(&SchemeParams {
            name: &self.partition,
            alpha: self.alpha,
            min_size: self.min_size,
            labels_per_node: self.labels_per_node,
            sigma: self.sigma,
        })
        .map_err(|e| match e {
            fedge_learn::Error::Config(m) => Error::Config(format!("simulation: {m}")),
            other => other.into(),
        })
    }

    /// Training threads: as configured, or one per core.
    pub fn trainer_count(&self) -> usize {
        match self.trainers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        }
    }

    pub(super) fn validate(&self) -> Result<()> {
        if self.nodes == 0 {
            return Err(Error::Config("simulation.nodes must be at least 1".into()));
        }
        if self.trainer_threads == 0 {
            return Err(Error::Config("simulation.trainer_threads must be at least 1".into()));
        }
        self.scheme().map(drop)
    }
}
