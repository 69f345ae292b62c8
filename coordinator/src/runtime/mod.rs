//! The runtime: the tasks and threads that run the core, and what they
//! keep: the driver (owns the round machine, carries out its outputs),
//! central evaluation, the run's store, the global model's home, memory
//! hand-back, metrics, the curves drawn beside the model, the run's status
//! as published for the HTTP side, and the refusal log's throttle.

pub mod driver;
pub(crate) mod evaluator;
pub(crate) mod global;
pub(crate) mod log_gate;
pub mod memory;
pub(crate) mod metrics;
pub(crate) mod plots;
pub mod status;
pub(crate) mod store;
