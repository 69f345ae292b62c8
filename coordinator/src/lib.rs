//! The fedge coordinator: samples edge nodes, runs federated rounds,
//! aggregates their updates, evaluates and checkpoints the global model.
//!
//! # Layout, by layer
//!
//! - [`config`]: [`CoordinatorConfig`], loaded from defaults, a TOML file,
//!   `FEDGE_*` variables and flags, then validated.
//! - [`core`], pure and unit-tested without sockets or threads:
//!   - `round`: the round state machine: membership, sampling, update
//!     validation, folding and aggregation jobs, closing; it returns
//!     `Output`s for the runtime to carry out;
//!   - [`core::strategy`]: update bounding, aggregators (mean, median,
//!     trimmed mean, Krum, Multi-Krum, Bulyan) and server optimizers;
//!   - `privacy`: differential privacy's plan per round and the accountant;
//!   - `secure`: secure aggregation's steps in a round (SecAgg+; the
//!     protocol itself is `fedge_common::secagg`).
//! - [`runtime`]: what runs the core: the driver task that owns the
//!   machine and carries out its outputs, central evaluation on its own
//!   thread, the run's store (checkpoints, resume, `run.json`), where the
//!   global model lives, handing memory back, Prometheus metrics, the
//!   curves drawn beside the model.
//! - [`api`]: the adapters: the gRPC service (`fedge.v1.Federation`) and
//!   its transfer bounds, the intake that decodes update streams, TLS and
//!   node authentication, and the HTTP side (`/healthz`, `/api/status`,
//!   `/metrics`, the dashboard) with its operator client.
//! - [`tools`]: the other subcommands: a local fleet of `edge-node`
//!   processes, in-process simulation, the centralized baseline, a
//!   development PKI.
//! - `server`: [`run`], which serves one run, and the assembly it shares
//!   with the simulator.

pub mod api;
pub mod config;
pub mod core;
mod error;
pub mod runtime;
mod server;
pub mod tools;

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
pub use runtime::driver::RunSummary;
pub use server::run;
