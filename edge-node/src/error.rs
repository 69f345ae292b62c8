//! The one error type of the edge-node library.

/// Result alias of the edge-node library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What ends a session or the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shared-library failure (data, model, parameters, payloads).
    #[error(transparent)]
    Common(#[from] fedge_common::Error),

    /// Data, model or training failure.
    #[error(transparent)]
    Learn(#[from] fedge_learn::Error),

    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The coordinator could not be reached (the transport error and its causes).
    #[error("connecting to the coordinator: {0}")]
    Connect(String),

    /// The coordinator answered with an error status.
    #[error("coordinator: {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),

    /// The coordinator refused this node for good (protocol or model mismatch).
    #[error("refused by the coordinator: {0}")]
    Refused(String),

    /// The coordinator sent something this node cannot use.
    #[error("protocol: {0}")]
    Protocol(String),

    /// The training thread stopped.
    #[error("trainer: {0}")]
    Trainer(String),
}
