//! The adapters between the network and the runtime: the gRPC service and
//! its transfer limits, the intake of update streams, TLS and node
//! authentication, and the HTTP side with its operator client.

pub mod http;
pub(crate) mod intake;
pub(crate) mod security;
pub(crate) mod service;
