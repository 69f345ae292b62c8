//! The one error type of the coordinator library.

/// Result alias of the coordinator library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What stops the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Protocol-crate failure (payloads, parameter files, files).
    #[error(transparent)]
    Common(#[from] fedge_common::Error),

    /// Data, model or training failure.
    #[error(transparent)]
    Learn(#[from] fedge_learn::Error),

    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),

    /// A background worker (evaluation thread, driver) stopped unexpectedly.
    #[error("internal: {0}")]
    Internal(String),

    /// The run could not go on.
    #[error("run failed: {0}")]
    RunFailed(String),

    /// A checkpoint to resume from is unreadable or does not fit the run.
    #[error("checkpoint: {0}")]
    Checkpoint(String),

    /// A local fleet could not be started or supervised.
    #[error("fleet: {0}")]
    Fleet(String),

    /// An I/O failure outside `fedge-common`'s file helpers.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
