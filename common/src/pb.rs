//! Types generated from `proto/fedge/v1/federation.proto`.
//!
//! They stay at the edges: the coordinator's and the node's gRPC adapters
//! convert them to domain types, and the core logic never sees `pb::` types.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("fedge.v1");

/// The protocol version this build speaks. A coordinator refuses nodes whose
/// version differs, naming both.
pub const PROTOCOL_VERSION: u32 = 5;
