//! Data sets held on a node or on the coordinator: loading, synthesis and
//! partitioning.
//!
//! A [`Dataset`] keeps its images once, as one compact `u8` tensor
//! `[N, 3, 32, 32]`, and converts a batch to normalized f32 only when it is
//! used. Samples never leave the process that loaded them.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Image side and channels of every data set this build reads.
pub const IMAGE_SHAPE: [i64; 3] = [3, 32, 32];
const IMAGE_BYTES: usize = 3 * 32 * 32;
const CIFAR_RECORD: usize = 1 + IMAGE_BYTES;
/// CIFAR-10's class names, in label order.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
/// Per-channel mean and standard deviation used to normalize inputs (CIFAR-10's).
pub const NORMALIZE_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const NORMALIZE_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];

/// Which half of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Labeled images, held once in memory.
#[derive(Debug)]
pub struct Dataset {
    /// `u8` images `[N, 3, 32, 32]`.
    pub images: Tensor,
    /// `i64` labels `[N]`.
    pub labels: Tensor,
}

impl Dataset {
    /// Builds a data set from raw CHW image bytes and labels.
    pub fn from_raw(images: &[u8], labels: &[i64]) -> Self {
        let n = labels.len() as i64;
        Self {
            images: Tensor::from_slice(images).view([n, 3, 32, 32]),
            labels: Tensor::from_slice(labels),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    /// Whether the set holds no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples at `indices`, as a new data set.
    pub fn subset(&self, indices: &[i64]) -> Self {
        let idx = Tensor::from_slice(indices);
        Self {
            images: self.images.index_select(0, &idx),
            labels: self.labels.index_select(0, &idx),
        }
    }

    /// The batch at `indices`: normalized f32 images and labels, on `device`.
    pub fn batch(&self, indices: &Tensor, device: Device) -> (Tensor, Tensor) {
        let x = normalize(&self.images.index_select(0, indices)).to_device(device);
        let y = self.labels.index_select(0, indices).to_device(device);
        (x, y)
    }

    /// Samples per label (10 classes).
    pub fn label_histogram(&self) -> Vec<u64> {
        let labels = Vec::<i64>::try_from(&self.labels).unwrap_or_default();
        let mut h = vec![0u64; 10];
        for l in labels {
            h[l as usize] += 1;
        }
        h
    }
}

/// Converts `u8` images to f32, scaled to [0, 1] and normalized per channel.
pub fn normalize(images: &Tensor) -> Tensor {
    let mean = Tensor::from_slice(&NORMALIZE_MEAN).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&NORMALIZE_STD).view([1, 3, 1, 1]);
    (images.to_kind(Kind::Float) / 255.0 - mean) / std
}

/// Where a process gets its data.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// CIFAR-10 in its standard binary layout (`data_batch_{1..5}.bin`, `test_batch.bin`).
    Cifar10(PathBuf),
    /// A seeded, learnable synthetic set of CIFAR-shaped images.
    Synthetic {
        seed: u64,
        train_samples: usize,
        test_samples: usize,
    },
}

impl DataSource {
    /// Loads one split.
    pub fn load(&self, split: Split) -> Result<Dataset> {
        match self {
            DataSource::Cifar10(dir) => load_cifar10(dir, split),
            DataSource::Synthetic {
                seed,
                train_samples,
                test_samples,
            } => Ok(match split {
                Split::Train => synthetic(*seed, 1, *train_samples),
                Split::Test => synthetic(*seed, 2, *test_samples),
            }),
        }
    }

    /// A short human description, for logs.
    pub fn describe(&self) -> String {
        match self {
            DataSource::Cifar10(dir) => format!("cifar-10 from {}", dir.display()),
            DataSource::Synthetic { seed, .. } => format!("synthetic (seed {seed})"),
        }
    }
}

/// Resolves a CIFAR-10 folder: the folder itself, or its `cifar-10-batches-bin` child.
pub fn resolve_cifar10_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| d.join("test_batch.bin").is_file() || d.join("data_batch_1.bin").is_file())
}

/// Loads CIFAR-10's binary layout from `dir`.
pub fn load_cifar10(dir: &Path, split: Split) -> Result<Dataset> {
    let root = resolve_cifar10_dir(dir).ok_or_else(|| {
        Error::data(
            dir,
            "no CIFAR-10 binary files here (expected data_batch_1.bin .. data_batch_5.bin and test_batch.bin)",
        )
    })?;
    let files: Vec<String> = match split {
        Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        Split::Test => vec!["test_batch.bin".into()],
    };
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for name in files {
        let path = root.join(&name);
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::data(&path, "missing file of the CIFAR-10 binary layout"),
            _ => Error::io(&path, e),
        })?;
        parse_cifar10_records(&path, &bytes, &mut images, &mut labels)?;
    }
    Ok(Dataset::from_raw(&images, &labels))
}

fn parse_cifar10_records(path: &Path, bytes: &[u8], images: &mut Vec<u8>, labels: &mut Vec<i64>) -> Result<()> {
    if bytes.is_empty() {
        return Err(Error::data(path, "file is empty"));
    }
    if bytes.len() % CIFAR_RECORD != 0 {
        return Err(Error::data(
            path,
            format!(
                "truncated: {} bytes is not a whole number of {CIFAR_RECORD}-byte records ({} whole records, {} bytes left over)",
                bytes.len(),
                bytes.len() / CIFAR_RECORD,
                bytes.len() % CIFAR_RECORD
            ),
        ));
    }
    images.reserve(bytes.len() / CIFAR_RECORD * IMAGE_BYTES);
    for (i, rec) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
        let label = rec[0];
        if label >= 10 {
            return Err(Error::data(
                path,
                format!("record {i} has label {label}; CIFAR-10 labels are 0..=9"),
            ));
        }
        labels.push(i64::from(label));
        images.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

/// A learnable synthetic set: each class has a blocky random prototype
/// image; a sample is its class prototype blended with strong noise and a
/// random brightness shift. `stream` separates train (1) from test (2) draws
/// of the same classes.
pub fn synthetic(seed: u64, stream: u64, n: usize) -> Dataset {
    let mut proto_rng = ChaCha8Rng::seed_from_u64(seed);
    // 10 prototypes of 8x8 colour blocks, upsampled to 32x32.
    let prototypes: Vec<Vec<u8>> = (0..10)
        .map(|_| {
            let blocks: Vec<u8> = (0..3 * 8 * 8).map(|_| proto_rng.random()).collect();
            let mut img = vec![0u8; IMAGE_BYTES];
            for c in 0..3 {
                for y in 0..32 {
                    for x in 0..32 {
                        img[c * 1024 + y * 32 + x] = blocks[c * 64 + (y / 4) * 8 + x / 4];
                    }
                }
            }
            img
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let mut images = Vec::with_capacity(n * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let label = rng.random_range(0..10usize);
        let shift: f32 = rng.random_range(-30.0..30.0);
        for &p in &prototypes[label] {
            let noise: f32 = rng.random_range(-80.0..80.0);
            images.push((0.25 * f32::from(p) + 96.0 + noise + shift).clamp(0.0, 255.0) as u8);
        }
        labels.push(label as i64);
    }
    Dataset::from_raw(&images, &labels)
}

/// Splits `0..n` into `parts` disjoint shards of near-equal size (sizes
/// differ by at most one), after a shuffle seeded by `seed`.
pub fn iid_partition(n: usize, parts: usize, seed: u64) -> Vec<Vec<i64>> {
    let mut idx: Vec<i64> = (0..n as i64).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let parts = parts.max(1);
    let (base, extra) = (n / parts, n % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let len = base + usize::from(p < extra);
        out.push(idx[start..start + len].to_vec());
        start += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
    }

    fn records(labels: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &l) in labels.iter().enumerate() {
            out.push(l);
            out.extend(std::iter::repeat_n(i as u8, IMAGE_BYTES));
        }
        out
    }

    #[test]
    fn cifar10_binary_layout_loads() {
        let dir = tempfile::tempdir().unwrap();
        for i in 1..=5 {
            write(&dir.path().join(format!("data_batch_{i}.bin")), &records(&[i, 9]));
        }
        write(&dir.path().join("test_batch.bin"), &records(&[3, 4, 5]));
        let train = load_cifar10(dir.path(), Split::Train).unwrap();
        assert_eq!(train.len(), 10);
        assert_eq!(
            Vec::<i64>::try_from(&train.labels).unwrap(),
            vec![1, 9, 2, 9, 3, 9, 4, 9, 5, 9]
        );
        let test = load_cifar10(dir.path(), Split::Test).unwrap();
        assert_eq!(test.images.size(), vec![3, 3, 32, 32]);
        assert_eq!(test.images.int64_value(&[1, 2, 31, 31]), 1);
    }

    #[test]
    fn cifar10_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_cifar10(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(err.contains("no CIFAR-10 binary files here"), "{err}");

        write(&dir.path().join("test_batch.bin"), &records(&[1]));
        let err = load_cifar10(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(
            err.ends_with("data_batch_1.bin: missing file of the CIFAR-10 binary layout"),
            "{err}"
        );

        let mut truncated = records(&[1, 2]);
        truncated.truncate(CIFAR_RECORD + 100);
        write(&dir.path().join("test_batch.bin"), &truncated);
        let err = load_cifar10(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(
            err.ends_with("truncated: 3173 bytes is not a whole number of 3073-byte records (1 whole records, 100 bytes left over)"),
            "{err}"
        );

        write(&dir.path().join("test_batch.bin"), &records(&[1, 12]));
        let err = load_cifar10(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(
            err.ends_with("record 1 has label 12; CIFAR-10 labels are 0..=9"),
            "{err}"
        );
    }

    #[test]
    fn iid_partition_is_disjoint_complete_balanced_and_deterministic() {
        for (n, parts) in [(10, 3), (1000, 8), (7, 7), (5, 8)] {
            let p = iid_partition(n, parts, 7);
            assert_eq!(p.len(), parts);
            let mut all: Vec<i64> = p.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(all, (0..n as i64).collect::<Vec<_>>());
            let sizes: Vec<usize> = p.iter().map(Vec::len).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            assert_eq!(p, iid_partition(n, parts, 7));
        }
        assert_ne!(iid_partition(100, 4, 1), iid_partition(100, 4, 2));
    }

    #[test]
    fn synthetic_is_deterministic_and_covers_every_class() {
        let a = synthetic(5, 1, 500);
        let b = synthetic(5, 1, 500);
        assert!(a.images.equal(&b.images) && a.labels.equal(&b.labels));
        assert!(a.label_histogram().iter().all(|&c| c > 20));
        let test = synthetic(5, 2, 500);
        assert!(!test.images.equal(&a.images));
    }

    #[test]
    fn normalize_centres_channels() {
        let x = Tensor::full([1, 3, 2, 2], 128, (Kind::Uint8, Device::Cpu));
        let y = normalize(&x);
        let v = y.double_value(&[0, 0, 0, 0]);
        assert!((v - (128.0 / 255.0 - 0.4914) / 0.2470).abs() < 1e-5);
    }
}
