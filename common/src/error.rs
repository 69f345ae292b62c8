//! The one error type of `fedge-common`.

use std::path::PathBuf;

/// Result alias used throughout `fedge-common`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the shared library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data set file or folder is missing, unreadable or malformed.
    #[error("data set {path}: {reason}")]
    Data { path: PathBuf, reason: String },

    /// A configuration value is missing or out of range.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// Local training stopped because the process is shutting down.
    #[error("training stopped: the node is shutting down")]
    Cancelled,

    /// A configuration source (file, environment) could not be read or parsed.
    #[error("reading configuration: {0}")]
    ConfigSource(#[from] config::ConfigError),

    /// A model or update payload does not match what was announced.
    #[error("payload: {0}")]
    Payload(String),

    /// A payload arrived whole but its bytes differ from what was sent.
    #[error("payload: {0}")]
    Checksum(String),

    /// A parameter set does not fit the model it is loaded into.
    #[error("parameters: {0}")]
    Params(String),

    /// The model architecture is unknown to this build.
    #[error("unknown model `{name}` (this build knows: {known})")]
    UnknownModel { name: String, known: String },

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

    /// A safetensors file could not be read or written.
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),

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
