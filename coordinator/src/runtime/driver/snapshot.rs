//! The global model version fetches are served from.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fedge_common::params::Manifest;
use fedge_common::wire::{crc32, f32_payload};
use prost::bytes::Bytes;

use crate::core::model::{GlobalModel, ModelFile};

/// A global model version, shared by every fetch: in memory (fetches send a
/// little-endian view of the round machine's own vector, not a copy), or in
/// the checkpoint file that made it durable.
#[derive(Debug)]
pub struct ModelSnapshot {
    pub version: u64,
    pub manifest: Arc<Manifest>,
    pub params: GlobalModel,
    /// SCAFFOLD's server control variate, as values.
    pub control_values: Option<Arc<Vec<f32>>>,
    /// Checksum of the parameters' wire payload.
    pub crc32: u32,
    /// SCAFFOLD's server control variate at this version, encoded, with its checksum.
    pub control: Option<(Bytes, u32)>,
    /// Set once the version is on disk; until then it is not served.
    pub durable: AtomicBool,
}

impl ModelSnapshot {
    /// Publishes `params` (and the server control variate, if any) as version `version`.
    pub fn new(version: u64, manifest: Arc<Manifest>, params: Arc<Vec<f32>>, control: Option<Arc<Vec<f32>>>) -> Self {
        let control_values = control.clone();
        let control = control.map(|c| {
            let bytes = f32_payload(c);
            let crc = crc32(&bytes);
            (bytes, crc)
        });
        Self {
            version,
            crc32: crc32(&f32_payload(params.clone())),
            manifest,
            params: GlobalModel::Memory(params),
            control_values,
            control,
            durable: AtomicBool::new(false),
        }
    }

    /// The same version, durable, read from `stored` (its checkpoint file).
    pub fn stored(&self, stored: Arc<dyn ModelFile>) -> Self {
        Self {
            version: self.version,
            manifest: self.manifest.clone(),
            params: GlobalModel::Stored(stored),
            control_values: self.control_values.clone(),
            crc32: self.crc32,
            control: self.control.clone(),
            durable: AtomicBool::new(true),
        }
    }

    /// Bytes of the parameters' wire payload.
    pub fn payload_len(&self) -> usize {
        4 * self.params.len()
    }

    /// Marks the version as saved, so fetches may be served.
    pub fn mark_durable(self) -> Self {
        self.durable.store(true, Ordering::Release);
        self
    }
}
