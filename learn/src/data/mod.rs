//! Data sets held on a node or on the coordinator: formats, detection and
//! synthesis (partitioning lives in [`crate::partition`]).
//!
//! A [`Dataset`] keeps its images once, as one compact `u8` tensor
//! `[N, C, H, W]`, and converts a batch to normalized f32 only when it is
//! used. Samples never leave the process that loaded them.
//!
//! Formats, detected from a path by [`detect`]:
//! - [`cifar`]: CIFAR-10's binary layout (`data_batch_N.bin`, `test_batch.bin`);
//! - [`mnist`]: MNIST's IDX files (`*-idx3-ubyte`, `*-idx1-ubyte`, plain or `.gz`);
//! - [`folder`]: image folders, one sub-folder per class (JPEG, PNG), with
//!   optional `train/` and `test/` halves;
//! - [`synthetic`]: a seeded, learnable synthetic set.

pub mod cifar;
pub mod folder;
pub mod mnist;
pub mod synthetic;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

pub use cifar::{CIFAR10_CLASSES, load_cifar10, resolve_cifar10_dir};
pub use synthetic::synthetic;

/// Per-channel mean and standard deviation used to normalize 3-channel
/// inputs (CIFAR-10's statistics).
pub const RGB_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const RGB_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
/// The same for 1-channel inputs (MNIST's statistics).
pub const GRAY_MEAN: f32 = 0.1307;
pub const GRAY_STD: f32 = 0.3081;

/// Which half of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// Labeled images, held once in memory.
#[derive(Debug)]
pub struct Dataset {
    /// `u8` images `[N, C, H, W]`.
    pub images: Tensor,
    /// `i64` labels `[N]`.
    pub labels: Tensor,
    /// Class names, in label order.
    pub classes: Vec<String>,
}

impl Dataset {
    /// Builds a data set from raw CHW image bytes of `shape` and labels.
    pub fn from_raw(images: &[u8], labels: &[i64], shape: [i64; 3], classes: Vec<String>) -> Self {
        let n = labels.len() as i64;
        Self {
            images: Tensor::from_slice(images).view([n, shape[0], shape[1], shape[2]]),
            labels: Tensor::from_slice(labels),
            classes,
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

    /// `[channels, height, width]` of every image.
    pub fn shape(&self) -> [i64; 3] {
        let s = self.images.size();
        [s[1], s[2], s[3]]
    }

    /// Number of classes.
    pub fn num_classes(&self) -> i64 {
        self.classes.len() as i64
    }

    /// Labels as a vector.
    pub fn label_vec(&self) -> Vec<i64> {
        Vec::<i64>::try_from(&self.labels).unwrap_or_default()
    }

    /// The samples at `indices`, as a new data set.
    pub fn subset(&self, indices: &[i64]) -> Self {
        let idx = Tensor::from_slice(indices);
        Self {
            images: self.images.index_select(0, &idx),
            labels: self.labels.index_select(0, &idx),
            classes: self.classes.clone(),
        }
    }

    /// The batch at `indices`: normalized f32 images and labels, on `device`.
    pub fn batch(&self, indices: &Tensor, device: Device) -> (Tensor, Tensor) {
        let x = normalize(&self.images.index_select(0, indices)).to_device(device);
        let y = self.labels.index_select(0, indices).to_device(device);
        (x, y)
    }

    /// The batch at `indices` with training augmentation: each image is
    /// zero-padded by `pad` pixels and randomly cropped back to its size,
    /// and flipped left-right with probability ½ when `flip` is set.
    pub fn augmented_batch(
        &self,
        indices: &[i64],
        device: Device,
        pad: i64,
        flip: bool,
        rng: &mut impl rand::Rng,
    ) -> (Tensor, Tensor) {
        let idx = Tensor::from_slice(indices);
        let imgs = self.images.index_select(0, &idx);
        let [_, h, w] = self.shape();
        let padded = if pad > 0 {
            imgs.constant_pad_nd([pad, pad, pad, pad])
        } else {
            imgs
        };
        let crops: Vec<Tensor> = (0..indices.len() as i64)
            .map(|i| {
                let (dy, dx) = (rng.random_range(0..=2 * pad), rng.random_range(0..=2 * pad));
                let c = padded.get(i).narrow(1, dy, h).narrow(2, dx, w);
                if flip && rng.random_bool(0.5) { c.flip([2]) } else { c }
            })
            .collect();
        let x = normalize(&Tensor::stack(&crops, 0)).to_device(device);
        let y = self.labels.index_select(0, &idx).to_device(device);
        (x, y)
    }

    /// Samples per class.
    pub fn label_histogram(&self) -> Vec<u64> {
        let mut h = vec![0u64; self.classes.len()];
        for l in self.label_vec() {
            h[l as usize] += 1;
        }
        h
    }
}

/// Converts `u8` images `[N, C, H, W]` to f32, scaled to [0, 1] and
/// normalized per channel ([`RGB_MEAN`] for 3 channels, [`GRAY_MEAN`] for 1).
pub fn normalize(images: &Tensor) -> Tensor {
    let x = images.to_kind(Kind::Float) / 255.0;
    if images.size()[1] == 3 {
        let mean = Tensor::from_slice(&RGB_MEAN).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&RGB_STD).view([1, 3, 1, 1]);
        (x - mean) / std
    } else {
        (x - f64::from(GRAY_MEAN)) / f64::from(GRAY_STD)
    }
}

/// Where a process gets its data.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// CIFAR-10 in its standard binary layout.
    Cifar10(PathBuf),
    /// MNIST-format IDX files.
    Mnist(PathBuf),
    /// An image folder (one sub-folder per class, optionally under `train/` and `test/`).
    ImageFolder(PathBuf),
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
            DataSource::Mnist(dir) => mnist::load_mnist(dir, split),
            DataSource::ImageFolder(dir) => folder::load_image_folder(dir, split),
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

    /// Loads the samples of one split that `pick` chooses from its labels,
    /// in `pick`'s order (a node's partition). CIFAR-10 reads them without
    /// holding the whole set; other formats load it and keep the subset.
    pub fn load_part(&self, split: Split, pick: impl FnOnce(&[i64]) -> Result<Vec<i64>>) -> Result<Dataset> {
        match self {
            DataSource::Cifar10(dir) => cifar::load_cifar10_part(dir, split, pick),
            _ => {
                let full = self.load(split)?;
                let indices = pick(&full.label_vec())?;
                if let Some(&bad) = indices.iter().find(|&&i| i < 0 || i as usize >= full.len()) {
                    return Err(Error::Config(format!(
                        "sample {bad} is out of range ({} samples)",
                        full.len()
                    )));
                }
                Ok(full.subset(&indices))
            }
        }
    }

    /// A short human description, for logs.
    pub fn describe(&self) -> String {
        match self {
            DataSource::Cifar10(dir) => format!("cifar-10 binary from {}", dir.display()),
            DataSource::Mnist(dir) => format!("mnist idx from {}", dir.display()),
            DataSource::ImageFolder(dir) => format!("image folder {}", dir.display()),
            DataSource::Synthetic { seed, .. } => format!("synthetic (seed {seed})"),
        }
    }
}

/// Where a process finds its data.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A data set folder: CIFAR-10 binary, MNIST IDX or an image folder,
    /// detected from its files. When unset (or empty) the seeded synthetic
    /// set below is used instead.
    pub path: Option<PathBuf>,
    /// Seed of the synthetic set (coordinator and nodes must agree).
    pub synthetic_seed: u64,
    /// Size of the synthetic training set, before partitioning.
    pub synthetic_train_samples: usize,
    /// Size of the synthetic test set.
    pub synthetic_test_samples: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: None,
            synthetic_seed: 17,
            synthetic_train_samples: 6000,
            synthetic_test_samples: 1000,
        }
    }
}

impl DataConfig {
    /// The source this configuration names; a configured path's format is detected.
    pub fn source(&self) -> Result<DataSource> {
        match self.path.as_deref().filter(|p| !p.as_os_str().is_empty()) {
            Some(p) => detect(p),
            None => Ok(DataSource::Synthetic {
                seed: self.synthetic_seed,
                train_samples: self.synthetic_train_samples,
                test_samples: self.synthetic_test_samples,
            }),
        }
    }
}

/// Log output.
/// Detects the format of the data set at `path`.
pub fn detect(path: &Path) -> Result<DataSource> {
    if !path.exists() {
        return Err(Error::data(path, "no such file or folder"));
    }
    if !path.is_dir() {
        return Err(Error::data(path, "expected a folder holding a data set"));
    }
    if let Some(dir) = resolve_cifar10_dir(path) {
        return Ok(DataSource::Cifar10(dir));
    }
    if mnist::has_idx_files(path) {
        return Ok(DataSource::Mnist(path.to_path_buf()));
    }
    if folder::looks_like_image_folder(path) {
        return Ok(DataSource::ImageFolder(path.to_path_buf()));
    }
    Err(Error::data(
        path,
        "no data set found here: expected CIFAR-10 binary files (data_batch_N.bin, test_batch.bin), \
         MNIST IDX files (*-idx3-ubyte, *-idx1-ubyte, plain or .gz) or an image folder (one sub-folder per class)",
    ))
}

/// Reads a whole file, mapping "not found" to a data error naming `what`.
pub(crate) fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::data(path, format!("missing {what}")),
        _ => Error::io(path, e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_centres_channels() {
        let x = Tensor::full([1, 3, 2, 2], 128, (Kind::Uint8, Device::Cpu));
        let v = normalize(&x).double_value(&[0, 0, 0, 0]);
        assert!((v - (128.0 / 255.0 - 0.4914) / 0.2470).abs() < 1e-5);
        let g = Tensor::full([1, 1, 2, 2], 255, (Kind::Uint8, Device::Cpu));
        let v = normalize(&g).double_value(&[0, 0, 1, 1]);
        assert!((v - (1.0 - 0.1307) / 0.3081).abs() < 1e-5);
    }

    #[test]
    fn augmentation_keeps_shapes_and_content() {
        use rand::SeedableRng;
        let d = synthetic(1, 1, 8);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let (x, y) = d.augmented_batch(&[0, 3, 5], Device::Cpu, 4, true, &mut rng);
        assert_eq!(x.size(), vec![3, 3, 32, 32]);
        assert_eq!(y.size(), vec![3]);
        // Without padding or flips the batch equals the plain one.
        let (a, _) = d.augmented_batch(&[0, 3], Device::Cpu, 0, false, &mut rng);
        let (b, _) = d.batch(&Tensor::from_slice(&[0i64, 3]), Device::Cpu);
        assert!(a.allclose(&b, 1e-6, 1e-6, false));
    }

    #[test]
    fn detection_names_what_it_expected() {
        let dir = tempfile::tempdir().unwrap();
        let err = detect(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no data set found here"), "{err}");
        let err = detect(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(err.ends_with("nope: no such file or folder"), "{err}");
    }

    #[test]
    fn a_configured_data_path_must_hold_a_data_set() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataConfig {
            path: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        assert!(c.source().unwrap_err().to_string().contains("no data set found here"));
        assert!(matches!(
            DataConfig::default().source().unwrap(),
            DataSource::Synthetic { .. }
        ));
    }
}
