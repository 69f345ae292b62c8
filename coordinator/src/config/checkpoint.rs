//! `[checkpoint]`: what a run keeps on disk besides the latest model.

use serde::{Deserialize, Serialize};

/// What is written after each round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Keep every round's global model under `out_dir/rounds/` (besides the
    /// latest in `out_dir/model.safetensors`).
    pub keep_round_models: bool,
    /// Continue an unfinished run found in `out_dir` (its model, strategy
    /// state and history) instead of starting over.
    pub resume: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            keep_round_models: true,
            resume: true,
        }
    }
}
