//! The one error type of `fedge-common`.

use std::path::PathBuf;

/// Result alias used throughout `fedge-common`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the protocol crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is missing or out of range.
    #[error("invalid configuration: {0}")]
    Config(String),

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

    /// A checkpoint file is unreadable, or belongs to another run or model.
    #[error("checkpoint: {0}")]
    Checkpoint(String),

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
}
