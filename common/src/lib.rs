//! `fedge-common`: what fedge's coordinator and edge nodes share.
//!
//! # Layout
//!
//! - [`pb`]: types generated from `proto/fedge/v1/federation.proto`, and the
//!   protocol version.
//! - [`model`]: the model zoo ([`model::ModelKind`]), each a `tch` `ModuleT`.
//! - [`codec`]: update codecs (f32, f16, bf16, int8, top-k, sign), error
//!   feedback, and the chunk-by-chunk decoder.
//! - [`params`]: named, ordered parameter sets (a [`params::Manifest`] plus a
//!   flat `f32` buffer), to and from a `VarStore`, saved as safetensors.
//! - [`wire`]: chunked payloads with a manifest and a checksum, and the one
//!   place where wire manifests convert to domain ones.
//! - [`data`]: CIFAR-10 binary loading, the synthetic set, normalization.
//! - [`partition`]: how a simulated fleet splits a data set: IID, Dirichlet
//!   label skew, label shards, log-normal quantity skew.
//! - [`privacy`]: differential privacy: clipping, Gaussian noise, adaptive
//!   clipping and the RDP accountant.
//! - [`secagg`]: secure aggregation (SecAgg+): the protocol's client and
//!   server state machines, quantization into Z_2^32, masks, Shamir shares.
//! - [`train`]: local training (SGD) and evaluation, to run on a blocking thread.
//! - [`config`]: configuration sections both daemons use and the layered
//!   loader (defaults, TOML file, environment, flags).
//! - [`security`]: node tokens (stored hashed) and PEM files for TLS.
//! - [`telemetry`]: `tracing` setup.
//! - [`fsutil`]: durable (atomic) file writes.
//! - [`shutdown`]: the ctrl-c / SIGTERM future both daemons stop on.
//! - [`Error`]: this crate's one error type.

pub mod codec;
pub mod config;
pub mod data;
mod error;
pub mod export;
pub mod fsutil;
pub mod model;
pub mod params;
pub mod partition;
pub mod pb;
pub mod privacy;
pub mod secagg;
pub mod security;
pub mod shutdown;
pub mod telemetry;
pub mod train;
pub mod wire;
pub mod worker;

pub use error::{Error, Result};
