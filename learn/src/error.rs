//! The one error type of `fedge-learn`.

use std::path::PathBuf;

/// Result alias used throughout `fedge-learn`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong loading data, building models and training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A protocol-crate failure (parameter files, codecs, file writes).
    #[error(transparent)]
    Common(#[from] fedge_common::Error),

    /// A data set file or folder is missing, unreadable or malformed.
    #[error("data set {path}: {reason}")]
    Data { path: PathBuf, reason: String },

    /// A configuration value is missing or out of range.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// Local training stopped because the process is shutting down.
    #[error("training stopped: the node is shutting down")]
    Cancelled,

    /// A parameter set does not fit the model it is loaded into.
    #[error("parameters: {0}")]
    Params(String),

    /// A file's content does not match what its header announced.
    #[error("payload: {0}")]
    Payload(String),

    /// The model architecture is unknown to this build.
    #[error("unknown model `{name}` (this build knows: {known})")]
    UnknownModel { name: String, known: String },

    /// A task is missing what its algorithm needs.
    #[error("protocol: {0}")]
    Protocol(String),

    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// JSON metadata could not be read or written.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Data`] for `path`.
    pub fn data(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Data {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
