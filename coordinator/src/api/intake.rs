//! Receiving an update stream in bounded memory.
//!
//! An [`Intake`] takes an update's payload chunk by chunk as it arrives:
//! it decodes each chunk with the run's codec (refusing overlong,
//! truncated and malformed payloads), measures the main section's L2 norm,
//! notes the first non-finite value, checks the CRC-32 at the end, and
//! spools the *encoded* bytes: in memory up to [`SPOOL_IN_MEMORY_MAX`],
//! in a temporary file under the run's `spool/` folder above that. The
//! result, a [`Spooled`] update, is what the round machine accepts; folding
//! it into the round's sum decodes the spool again, chunk by chunk. So no
//! decoded per-node copy of an update ever exists, and a bad update is
//! refused before any of it reaches the aggregate.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedge_common::codec::{Codec, Decoder};
use fedge_common::wire::PayloadStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::core::strategy::UpdateSource;
use crate::{Error, Result};

/// Encoded payloads up to this size are spooled in memory (while the
/// [`SpoolBudget`] allows); larger ones go to a file.
pub const SPOOL_IN_MEMORY_MAX: u64 = 4 << 20;

/// The memory all in-memory spools may hold together (`limits.spool_memory_bytes`).
/// An update that does not fit goes to a file, so the coordinator's memory
/// for received-but-not-yet-folded updates stays bounded whatever the
/// number of nodes.
#[derive(Debug, Clone)]
pub struct SpoolBudget {
    kib: Arc<Semaphore>,
}

impl SpoolBudget {
    pub fn new(bytes: u64) -> Self {
        let kib = (bytes / 1024).min(Semaphore::MAX_PERMITS as u64) as usize;
        Self {
            kib: Arc::new(Semaphore::new(kib)),
        }
    }

    fn reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024).max(1)).ok()?;
        self.kib.clone().try_acquire_many_owned(kib).ok()
    }
}

/// Bytes read from a spool file at a time when it is decoded again.
const READ_BLOCK: usize = 1 << 20;

/// Creates `out_dir/spool`, emptied of files a killed process left behind.
pub fn prepare_spool(out_dir: &Path) -> Result<PathBuf> {
    let dir = out_dir.join("spool");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::Io {
            context: format!("clearing {}", dir.display()),
            source: e,
        })?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
        context: format!("creating {}", dir.display()),
        source: e,
    })?;
    Ok(dir)
}

#[derive(Debug)]
enum Spool {
    /// The bytes, and their share of the budget (returned when dropped).
    Memory {
        bytes: Vec<u8>,
        _budget: OwnedSemaphorePermit,
    },
    File(tempfile::NamedTempFile),
}

/// An update received whole and checked, its encoded bytes spooled.
#[derive(Debug)]
pub struct Spooled {
    codec: Codec,
    values: usize,
    payload_bytes: u64,
    spool: Spool,
}

impl Spooled {
    /// Whether the payload was spooled to a file.
    pub fn on_disk(&self) -> bool {
        matches!(self.spool, Spool::File(_))
    }
}

impl UpdateSource for Spooled {
    fn len(&self) -> usize {
        self.values
    }

    fn visit(&self, sink: &mut dyn FnMut(usize, &[f32])) -> std::result::Result<(), String> {
        let mut decoder = Decoder::new(self.codec, self.values, self.payload_bytes).map_err(|e| e.to_string())?;
        match &self.spool {
            Spool::Memory { bytes, .. } => decoder.push(bytes, sink).map_err(|e| e.to_string())?,
            Spool::File(file) => {
                let path = file.path().display().to_string();
                let mut f = file.reopen().map_err(|e| format!("reopening spool {path}: {e}"))?;
                let mut buf = vec![0u8; READ_BLOCK];
                loop {
                    let n = f.read(&mut buf).map_err(|e| format!("reading spool {path}: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    decoder.push(&buf[..n], sink).map_err(|e| e.to_string())?;
                }
            }
        }
        decoder.finish().map_err(|e| e.to_string())
    }
}

/// What receiving found out about an update.
#[derive(Debug)]
pub struct Received {
    pub update: Spooled,
    /// L2 norm of the main (model-sized) section.
    pub norm: f64,
    /// Index of the first NaN or infinite value.
    pub non_finite: Option<usize>,
}

/// An update payload being received. See the module docs.
#[derive(Debug)]
pub struct Intake {
    codec: Codec,
    main: usize,
    values: usize,
    payload_bytes: u64,
    stream: PayloadStream,
    spool: Spool,
    norm_sq: f64,
    non_finite: Option<usize>,
}

impl Intake {
    /// Starts receiving `sections` model-sized sections of `numel` values
    /// each, encoded with `codec` in exactly `payload_bytes` bytes.
    pub fn new(
        codec: Codec,
        numel: usize,
        sections: usize,
        payload_bytes: u64,
        spool_dir: &Path,
        budget: &SpoolBudget,
    ) -> std::result::Result<Self, fedge_common::Error> {
        let values = numel * sections;
        let stream = PayloadStream::new(codec, values, payload_bytes)?;
        let reserved = (payload_bytes <= SPOOL_IN_MEMORY_MAX)
            .then(|| budget.reserve(payload_bytes))
            .flatten();
        let spool = if let Some(permit) = reserved {
            Spool::Memory {
                bytes: Vec::with_capacity(payload_bytes as usize),
                _budget: permit,
            }
        } else {
            let file = tempfile::Builder::new()
                .prefix("update-")
                .tempfile_in(spool_dir)
                .map_err(|e| fedge_common::Error::io(spool_dir, e))?;
            Spool::File(file)
        };
        Ok(Self {
            codec,
            main: numel,
            values,
            payload_bytes,
            stream,
            spool,
            norm_sq: 0.0,
            non_finite: None,
        })
    }

    /// Decodes and spools one chunk.
    pub fn push(&mut self, chunk: &[u8]) -> std::result::Result<(), fedge_common::Error> {
        let main = self.main;
        let (norm_sq, non_finite) = (&mut self.norm_sq, &mut self.non_finite);
        self.stream.push(chunk, &mut |offset, values| {
            if non_finite.is_none()
                && let Some(i) = values.iter().position(|v| !v.is_finite())
            {
                *non_finite = Some(offset + i);
            }
            let in_main = values.len().min(main.saturating_sub(offset));
            *norm_sq += values[..in_main]
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>();
        })?;
        match &mut self.spool {
            Spool::Memory { bytes, .. } => bytes.extend_from_slice(chunk),
            Spool::File(file) => file
                .as_file_mut()
                .write_all(chunk)
                .map_err(|e| fedge_common::Error::io(file.path(), e))?,
        }
        Ok(())
    }

    /// Bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.stream.received_bytes()
    }

    /// Checks completeness and the checksum.
    pub fn finish(self, crc32: u32) -> std::result::Result<Received, fedge_common::Error> {
        self.stream.finish(crc32)?;
        Ok(Received {
            update: Spooled {
                codec: self.codec,
                values: self.values,
                payload_bytes: self.payload_bytes,
                spool: self.spool,
            },
            norm: self.norm_sq.sqrt(),
            non_finite: self.non_finite,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(codec: Codec, values: &[f32], sections: usize, dir: &Path, chunk: usize) -> Received {
        let bytes = codec.encode(values, 5);
        let mut intake = Intake::new(
            codec,
            values.len() / sections,
            sections,
            bytes.len() as u64,
            dir,
            &SpoolBudget::new(1 << 30),
        )
        .unwrap();
        for c in bytes.chunks(chunk) {
            intake.push(c).unwrap();
        }
        intake.finish(fedge_common::wire::crc32(&bytes)).unwrap()
    }

    fn visit_all(u: &Spooled) -> Vec<f32> {
        let mut out = vec![0f32; u.len()];
        u.visit(&mut |o, v| out[o..o + v.len()].copy_from_slice(v)).unwrap();
        out
    }

    #[test]
    fn small_updates_stay_in_memory_and_large_ones_go_to_disk_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let small: Vec<f32> = (0..1000).map(|i| i as f32 * 0.001).collect();
        let r = receive(Codec::F32, &small, 1, dir.path(), 333);
        assert!(!r.update.on_disk());
        assert_eq!(visit_all(&r.update), small);
        let norm = small.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        assert!((r.norm - norm).abs() < 1e-9);

        let n = (SPOOL_IN_MEMORY_MAX / 4) as usize + 10;
        let mut large: Vec<f32> = (0..2 * n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
        large[n + 3] = f32::NAN;
        let r = receive(Codec::F32, &large, 2, dir.path(), 1 << 20);
        assert!(r.update.on_disk());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // The NaN sits in the control section: found, but outside the norm.
        assert_eq!(r.non_finite, Some(n + 3));
        assert!(r.norm.is_finite());
        let back = visit_all(&r.update);
        assert_eq!(back[..n], large[..n]);
        drop(r);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "spool file removed");
    }

    #[test]
    fn updates_beyond_the_memory_budget_spool_to_disk_until_memory_is_returned() {
        let dir = tempfile::tempdir().unwrap();
        let values = vec![0.5f32; 1024]; // 4 KiB in f32
        let budget = SpoolBudget::new(8 << 10);
        let take = |budget: &SpoolBudget| {
            let bytes = Codec::F32.encode(&values, 1);
            let mut intake = Intake::new(Codec::F32, 1024, 1, bytes.len() as u64, dir.path(), budget).unwrap();
            intake.push(&bytes).unwrap();
            intake.finish(fedge_common::wire::crc32(&bytes)).unwrap()
        };
        let a = take(&budget);
        let b = take(&budget);
        let c = take(&budget);
        assert!(!a.update.on_disk() && !b.update.on_disk());
        assert!(c.update.on_disk(), "the third 4 KiB update exceeds the 8 KiB budget");
        assert_eq!(visit_all(&c.update), values);
        drop(a);
        assert!(!take(&budget).update.on_disk(), "a folded update returns its memory");
    }

    #[test]
    fn a_corrupt_or_short_payload_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v = vec![1.0f32; 64];
        let codec = Codec::Int8 { block: 16 };
        let bytes = codec.encode(&v, 1);
        let mut intake = Intake::new(codec, 64, 1, bytes.len() as u64, dir.path(), &SpoolBudget::new(1 << 30)).unwrap();
        intake.push(&bytes).unwrap();
        let err = intake
            .finish(fedge_common::wire::crc32(&bytes) ^ 1)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("payload: checksum mismatch"), "{err}");

        let mut intake = Intake::new(codec, 64, 1, bytes.len() as u64, dir.path(), &SpoolBudget::new(1 << 30)).unwrap();
        intake.push(&bytes[..10]).unwrap();
        assert_eq!(
            intake.finish(0).unwrap_err().to_string(),
            "payload: payload truncated: 10 bytes received, 80 announced"
        );
        let err = Intake::new(codec, 65, 1, bytes.len() as u64, dir.path(), &SpoolBudget::new(1 << 30))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "payload: a int8(block=16) payload of 65 values takes 85 bytes; 80 announced"
        );
    }
}
