//! `fedge-common`: the protocol both sides speak, without libtorch.
//!
//! Everything here is plain Rust over flat `f32` buffers and bytes, so what
//! only decodes or checks payloads (the fuzz targets, the coordinator's
//! intake) builds without the tensor library; models and training live in
//! `fedge-learn`.
//!
//! # Layout
//!
//! - [`pb`]: types generated from `proto/fedge/v1/federation.proto`, and the
//!   protocol version.
//! - [`wire`]: chunked payloads with a manifest and a checksum, and the one
//!   place where wire types convert to domain ones.
//! - [`codec`]: update codecs (f32, f16, bf16, int8, top-k, sign), error
//!   feedback, and the chunk-by-chunk decoder.
//! - [`params`]: named, ordered parameter sets (a [`params::Manifest`] plus a
//!   flat `f32` buffer), saved as and read from safetensors.
//! - [`checkpoint`]: the coordinator's restart checkpoint file.
//! - [`task`]: what a round asks of a node and what it reports (algorithm,
//!   hyperparameters, metrics), as plain types.
//! - [`privacy`]: differential privacy: clipping, Gaussian noise, adaptive
//!   clipping and the RDP accountant.
//! - [`secagg`]: secure aggregation (SecAgg+): the protocol's client and
//!   server state machines, quantization into Z_2^32, masks, Shamir shares.
//! - [`config`]: the layered configuration loader (defaults, TOML file,
//!   environment, flags) and the logging section both daemons share.
//! - [`security`]: node tokens (stored hashed) and PEM files for TLS.
//! - [`telemetry`]: `tracing` setup.
//! - [`fsutil`]: durable (atomic) file writes.
//! - [`shutdown`]: the ctrl-c / SIGTERM future both daemons stop on.
//! - [`worker`]: a named thread that takes messages, joined on drop.
//! - [`Error`]: this crate's one error type.
//!
//! Modules depend downwards only: `wire` on `codec`, `params`, `task`, `pb`
//! and `secagg`; `codec` and `checkpoint` on `params`; `params` on `fsutil`.

pub mod checkpoint;
pub mod codec;
pub mod config;
mod error;
pub mod fsutil;
pub mod params;
pub mod pb;
pub mod privacy;
pub mod secagg;
pub mod security;
pub mod shutdown;
pub mod task;
pub mod telemetry;
pub mod wire;
pub mod worker;

pub use error::{Error, Result};
