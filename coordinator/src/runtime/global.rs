//! Where the coordinator keeps the global model while a round runs.
//!
//! A model up to `limits.resident_model_bytes` stays in memory
//! ([`GlobalModel::Memory`](crate::core::model::GlobalModel::Memory)). A larger one is in memory only from its
//! round's aggregation until it is durable (evaluated, persisted); while the
//! next round runs it is read back from the checkpoint file that made it
//! durable ([`GlobalModel::Stored`](crate::core::model::GlobalModel::Stored)): fetches stream it from there and the
//! next aggregation reads it a block at a time. The round's running sum is
//! then the only model-sized buffer the coordinator holds while updates
//! arrive, so its memory is one model plus its fixed costs rather than two.
//!
//! The core sees a stored model as a [`ModelFile`]
//! ([`crate::core::model`]); this module reads it from the checkpoint.
//!
//! A [`StoredModel`] keeps its file open: the checkpoint may be replaced or
//! removed by later rounds while a fetch still reads it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fedge_common::params::Manifest;
use safetensors::tensor::Metadata;

use crate::core::model::ModelFile;
use crate::runtime::store::RunStore;
use crate::{Error, Result};

/// Whether a model of `numel` f32 values is small enough to stay in memory
/// under `limits.resident_model_bytes` (larger ones are read from files).
pub fn stays_resident(numel: usize, resident_bytes: u64) -> bool {
    4 * numel as u64 <= resident_bytes
}

/// A global model in a safetensors file, read on demand.
#[derive(Debug)]
pub struct StoredModel {
    path: PathBuf,
    file: File,
    /// Each tensor's first byte in the file and its value count, in manifest order.
    segments: Vec<(u64, usize)>,
    numel: usize,
}

impl StoredModel {
    /// The global model of `round`'s restart checkpoint in `store`.
    pub fn of_checkpoint(store: &RunStore, round: u64) -> Result<Self> {
        Self::open(
            &store.checkpoint_file(round),
            store.manifest(),
            fedge_common::checkpoint::MODEL_PREFIX,
        )
    }

    /// Opens the safetensors file at `path`, which holds each tensor of
    /// `manifest` as f32 under the name `prefix` + its name.
    pub fn open(path: &Path, manifest: &Manifest, prefix: &str) -> Result<Self> {
        let bad = |what: String| Error::Checkpoint(format!("{}: {what}", path.display()));
        let file = File::open(path).map_err(|e| Error::Io {
            context: format!("opening {}", path.display()),
            source: e,
        })?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::Io {
                context: format!("reading the size of {}", path.display()),
                source: e,
            })?
            .len();
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0)
            .map_err(|e| bad(format!("cannot read the header length ({e})")))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
            return Err(bad(format!(
                "header of {header_len} bytes does not fit a file of {file_len}"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| bad(format!("cannot read the header ({e})")))?;
        let metadata: Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(format!("unreadable header ({e})")))?;
        let infos = metadata.tensors();
        let data_start = 8 + header_len;
        let mut segments = Vec::with_capacity(manifest.tensors.len());
        for t in &manifest.tensors {
            let name = format!("{prefix}{}", t.name);
            let info = infos
                .get(&name)
                .ok_or_else(|| bad(format!("tensor `{name}` is missing")))?;
            let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
            if info.dtype != safetensors::Dtype::F32 || shape != t.shape {
                return Err(bad(format!(
                    "tensor `{name}` is {:?} {:?}; the model needs F32 {:?}",
                    info.dtype, info.shape, t.shape
                )));
            }
            let (begin, end) = info.data_offsets;
            if end.checked_sub(begin) != Some(4 * t.numel()) || data_start + end as u64 > file_len {
                return Err(bad(format!("tensor `{name}`'s data lies outside the file")));
            }
            segments.push((data_start + begin as u64, t.numel()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            numel: manifest.numel(),
            segments,
        })
    }
}

impl ModelFile for StoredModel {
    fn numel(&self) -> usize {
        self.numel
    }

    fn read_payload(&self, start: usize, buf: &mut [u8]) -> Result<()> {
        let end = start + buf.len();
        if end > self.payload_len() {
            return Err(Error::Internal(format!(
                "read of payload bytes {start}..{end} past the model's {}",
                self.payload_len()
            )));
        }
        let mut seg_start = 0usize;
        for &(file_offset, numel) in &self.segments {
            let seg_end = seg_start + 4 * numel;
            let (lo, hi) = (start.max(seg_start), end.min(seg_end));
            if lo < hi {
                let at = file_offset + (lo - seg_start) as u64;
                self.file
                    .read_exact_at(&mut buf[lo - start..hi - start], at)
                    .map_err(|e| Error::Io {
                        context: format!("reading the global model from {}", self.path.display()),
                        source: e,
                    })?;
            }
            if seg_end >= end {
                break;
            }
            seg_start = seg_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fedge_common::params::TensorMeta;

    use super::*;
    use std::sync::Arc;

    use crate::core::model::GlobalModel;
    use crate::runtime::store::RunHistory;

    fn manifest() -> Manifest {
        // Not in name order, so the file's order differs from the manifest's.
        Manifest {
            tensors: vec![
                TensorMeta {
                    name: "w".into(),
                    shape: vec![3, 5],
                },
                TensorMeta {
                    name: "b".into(),
                    shape: vec![3],
                },
                TensorMeta {
                    name: "a".into(),
                    shape: vec![7],
                },
            ],
        }
    }

    #[test]
    fn a_stored_model_reads_back_what_the_checkpoint_holds_in_manifest_order() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest();
        let values: Vec<f32> = (0..m.numel()).map(|i| i as f32 * 0.5 - 3.0).collect();
        let store = RunStore::create(dir.path(), false, m.clone(), RunHistory::for_tests("r")).unwrap();
        let mut strategy = BTreeMap::new();
        strategy.insert("server/m".to_string(), vec![9.0f32; 4]);
        store.write_checkpoint(0, &values, &strategy, 0).unwrap();
        let stored = StoredModel::open(&store.checkpoint_file(0), &m, "model/").unwrap();
        assert_eq!(stored.numel(), values.len());

        let mut all = vec![0f32; values.len()];
        stored.read_values(0, &mut all).unwrap();
        assert_eq!(all, values);
        // Any byte range of the payload, across tensor boundaries.
        let payload: &[u8] = bytemuck::cast_slice(&values);
        for (start, len) in [(0, 1), (3, 70), (59, 13), (60, 40), (payload.len() - 5, 5)] {
            let mut buf = vec![0u8; len];
            stored.read_payload(start, &mut buf).unwrap();
            assert_eq!(buf, payload[start..start + len], "bytes {start}..+{len}");
        }
        let mut past = vec![0u8; 2];
        assert!(stored.read_payload(payload.len() - 1, &mut past).is_err());

        // Visiting in blocks sees every value once, in order.
        let mut seen = Vec::new();
        GlobalModel::Stored(Arc::new(stored))
            .visit(&mut |offset, run| {
                assert_eq!(offset, seen.len());
                seen.extend_from_slice(run);
            })
            .unwrap();
        assert_eq!(seen, values);

        // The open file outlives the checkpoint's removal.
        let stored = StoredModel::open(&store.checkpoint_file(0), &m, "model/").unwrap();
        std::fs::remove_file(store.checkpoint_file(0)).unwrap();
        let mut again = vec![0f32; values.len()];
        stored.read_values(0, &mut again).unwrap();
        assert_eq!(again, values);
    }

    #[test]
    fn a_file_that_does_not_hold_the_model_is_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest();
        let store = RunStore::create(dir.path(), false, m.clone(), RunHistory::for_tests("r")).unwrap();
        store
            .write_checkpoint(0, &vec![1.0; m.numel()], &BTreeMap::new(), 0)
            .unwrap();
        let path = store.checkpoint_file(0);

        let other = Manifest {
            tensors: vec![TensorMeta {
                name: "w".into(),
                shape: vec![5, 3],
            }],
        };
        let err = StoredModel::open(&path, &other, "model/").unwrap_err().to_string();
        assert!(
            err.contains("tensor `model/w` is F32 [3, 5]; the model needs F32 [5, 3]"),
            "{err}"
        );
        let err = StoredModel::open(&path, &m, "strategy/").unwrap_err().to_string();
        assert!(err.contains("tensor `strategy/w` is missing"), "{err}");

        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        let err = StoredModel::open(&path, &m, "model/").unwrap_err().to_string();
        assert!(
            err.starts_with("checkpoint: ") && err.contains("does not fit a file of 15"),
            "{err}"
        );
    }

    #[test]
    fn the_server_step_moves_a_stored_model_as_it_moves_the_one_in_memory() {
        use crate::core::strategy::{ServerOpt, ServerOptimizer};
        // Larger than one read block, with a tensor boundary inside a block.
        let m = Manifest {
            tensors: vec![
                TensorMeta {
                    name: "a".into(),
                    shape: vec![1_500, 1_000],
                },
                TensorMeta {
                    name: "b".into(),
                    shape: vec![1_000_003],
                },
            ],
        };
        let n = m.numel();
        let global: Vec<f32> = (0..n).map(|i| ((i % 1013) as f32).sin()).collect();
        let delta: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
        let dir = tempfile::tempdir().unwrap();
        let store = RunStore::create(dir.path(), false, m.clone(), RunHistory::for_tests("r")).unwrap();
        store.write_checkpoint(3, &global, &BTreeMap::new(), 0).unwrap();
        let stored = GlobalModel::Stored(Arc::new(
            StoredModel::open(&store.checkpoint_file(3), &m, "model/").unwrap(),
        ));
        let opt = ServerOpt::Adam {
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        let (mut a, mut b) = (ServerOptimizer::new(opt, 0.1, n), ServerOptimizer::new(opt, 0.1, n));
        let from_memory = a.step(&global, delta.clone());
        let from_disk = b.step_model(&stored, delta).unwrap();
        assert!(from_memory == from_disk, "the two steps differ");
        assert_eq!(a.state(), b.state());
    }
}
