//! The global model as the core sees it: its values in memory
//! ([`GlobalModel::Memory`]), or behind a [`ModelFile`] the runtime reads
//! them from a block at a time ([`GlobalModel::Stored`]; the runtime's
//! implementation is a durable checkpoint, `runtime::global::StoredModel`).
//! The core never opens a file itself: it only visits values.

use std::sync::Arc;

use crate::Result;

/// Values read at a time when a stored model is visited (4 MiB).
const READ_BLOCK: usize = 1 << 20;

/// A global model's values held outside memory, read on demand.
pub trait ModelFile: std::fmt::Debug + Send + Sync {
    /// Number of parameters.
    fn numel(&self) -> usize;

    /// Fills `buf` with the wire payload's bytes (little-endian f32 in
    /// manifest order) from `start` on.
    fn read_payload(&self, start: usize, buf: &mut [u8]) -> Result<()>;

    /// Bytes of the model's wire payload.
    fn payload_len(&self) -> usize {
        4 * self.numel()
    }

    /// Fills `out` with the values from `offset` on.
    fn read_values(&self, offset: usize, out: &mut [f32]) -> Result<()> {
        // The payload is little-endian; so is every platform fedge builds for.
        const { assert!(cfg!(target_endian = "little")) };
        self.read_payload(4 * offset, bytemuck::cast_slice_mut(out))
    }
}

/// The current global model: in memory, or in a file.
#[derive(Debug, Clone)]
pub enum GlobalModel {
    Memory(Arc<Vec<f32>>),
    Stored(Arc<dyn ModelFile>),
}

impl GlobalModel {
    /// Number of parameters.
    pub fn len(&self) -> usize {
        match self {
            GlobalModel::Memory(v) => v.len(),
            GlobalModel::Stored(s) => s.numel(),
        }
    }

    /// Whether the model has no parameters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values, when they are in memory.
    pub fn in_memory(&self) -> Option<&Arc<Vec<f32>>> {
        match self {
            GlobalModel::Memory(v) => Some(v),
            GlobalModel::Stored(_) => None,
        }
    }

    /// Hands every value to `sink` as `(offset, run)`, in order: all at
    /// once from memory, blocks of at most 4 MiB from a file.
    pub fn visit(&self, sink: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
        match self {
            GlobalModel::Memory(v) => {
                sink(0, v);
                Ok(())
            }
            GlobalModel::Stored(s) => {
                let numel = s.numel();
                let mut block = vec![0f32; READ_BLOCK.min(numel)];
                let mut offset = 0;
                while offset < numel {
                    let n = READ_BLOCK.min(numel - offset);
                    s.read_values(offset, &mut block[..n])?;
                    sink(offset, &block[..n]);
                    offset += n;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model file in memory that counts its reads.
    #[derive(Debug)]
    struct Values(Vec<f32>, std::sync::atomic::AtomicUsize);

    impl ModelFile for Values {
        fn numel(&self) -> usize {
            self.0.len()
        }

        fn read_payload(&self, start: usize, buf: &mut [u8]) -> Result<()> {
            let bytes: &[u8] = bytemuck::cast_slice(&self.0);
            buf.copy_from_slice(&bytes[start..start + buf.len()]);
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn a_stored_model_is_visited_in_blocks_in_order() {
        let values: Vec<f32> = (0..READ_BLOCK * 2 + 7).map(|i| i as f32).collect();
        let file = Arc::new(Values(values.clone(), Default::default()));
        let model = GlobalModel::Stored(file.clone());
        assert_eq!(model.len(), values.len());
        assert!(model.in_memory().is_none());
        let mut seen = Vec::new();
        model
            .visit(&mut |offset, run| {
                assert_eq!(offset, seen.len());
                assert!(run.len() <= READ_BLOCK);
                seen.extend_from_slice(run);
            })
            .unwrap();
        assert_eq!(seen, values);
        assert_eq!(file.1.load(std::sync::atomic::Ordering::Relaxed), 3);
    }
}
