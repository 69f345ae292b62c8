//! `fedge-learn`: what fedge trains with, on libtorch (`tch`).
//!
//! The edge node runs its local training here; the coordinator uses it for
//! central evaluation, the simulator's virtual nodes, baselines, partitions
//! and exports. Everything that moves between processes is in
//! `fedge-common`, which does not link libtorch.
//!
//! # Layout
//!
//! - [`model`]: the model zoo ([`model::ModelKind`]), each a `tch` `ModuleT`.
//! - [`tensors`]: a model's [`fedge_common::params::Manifest`], and its
//!   variables to and from flat `f32` buffers.
//! - [`data`]: data sets (CIFAR-10 binary, MNIST IDX, image folders, the
//!   synthetic set), format detection, normalization, the `[data]` section.
//! - [`partition`]: how a simulated fleet splits a data set: IID, Dirichlet
//!   label skew, label shards, log-normal quantity skew.
//! - [`train`]: local training (SGD, Adam) and evaluation, to run on a
//!   blocking thread.
//! - [`job`]: one round of a node's work (train, privatize, encode) and the
//!   state a node keeps across rounds; the edge node's training thread and
//!   the simulator's training pool both run it.
//! - [`export`]: a trained model with its card, for use outside fedge.
//! - [`Error`]: this crate's one error type.
//!
//! All of it blocks and computes: call it from a thread that owns the
//! `VarStore`, never from an async task.

pub mod data;
mod error;
pub mod export;
pub mod job;
pub mod model;
pub mod partition;
pub mod tensors;
pub mod train;

pub use error::{Error, Result};
