//! `[wire]` and `[codec]`: payload chunking and the update codec.

use fedge_common::codec::Codec;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Transport settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WireConfig {
    /// Size of one model chunk on the wire, in bytes.
    pub chunk_bytes: usize,
}

impl Default for WireConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: fedge_common::wire::DEFAULT_CHUNK_BYTES,
        }
    }
}

/// Update compression: the codec every node uses for its updates,
/// announced when it joins. Models always travel as f32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CodecConfig {
    /// `f32` (lossless), `f16`, `bf16`, `int8` (per-block scale, stochastic
    /// rounding), `topk` (largest magnitudes, error feedback) or `sign`
    /// (signs and per-block magnitude, error feedback).
    pub update: String,
    /// Values per block of `int8` and `sign`.
    pub block: u32,
    /// `topk`: fraction of values each node sends, in (0, 1].
    pub topk_fraction: f64,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            update: "f32".into(),
            block: fedge_common::codec::DEFAULT_BLOCK,
            topk_fraction: 0.01,
        }
    }
}

impl CodecConfig {
    /// The configured codec.
    pub fn codec(&self) -> Result<Codec> {
        let named = |e: fedge_common::Error| {
            Error::Config(format!(
                "codec: {}",
                e.to_string().trim_start_matches("invalid configuration: ")
            ))
        };
        // Every field is checked, whichever codec is chosen.
        Codec::Int8 { block: self.block }.validate().map_err(named)?;
        Codec::TopK {
            fraction: self.topk_fraction,
        }
        .validate()
        .map_err(named)?;
        Codec::from_parts(&self.update, self.block, self.topk_fraction).map_err(named)
    }
}

impl WireConfig {
    /// Checks this section's ranges.
    pub(super) fn validate(&self) -> Result<()> {
        let c = self.chunk_bytes;
        if !(1024..=fedge_common::wire::MAX_CHUNK_BYTES).contains(&c) {
            return Err(Error::Config(format!(
                "wire.chunk_bytes must be between 1024 and {}, got {c}",
                fedge_common::wire::MAX_CHUNK_BYTES
            )));
        }
        Ok(())
    }
}

impl CodecConfig {
    /// Checks that the codec names one this build has.
    pub(super) fn validate(&self) -> Result<()> {
        self.codec().map(drop)
    }
}
