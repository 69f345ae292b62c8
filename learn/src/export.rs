//! A trained model as users take it away: `model.safetensors` (the weights,
//! named as in PyTorch's `state_dict` of the same architecture) beside
//! `model.json`, a [`ModelCard`] saying which architecture they belong to,
//! the input shape and normalization, and the class names. Both
//! `edge-node predict` and a PyTorch user need nothing else.

use std::path::{Path, PathBuf};

use fedge_common::params::{Manifest, TensorMeta, load_safetensors};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use crate::data::{GRAY_MEAN, GRAY_STD, RGB_MEAN, RGB_STD};
use crate::model::{ModelKind, Net};
use crate::tensors::{load_into, manifest_of};
use crate::{Error, Result};

/// The `format` of a model card this build writes and reads.
pub const CARD_FORMAT: &str = "fedge-model/1";

/// `model.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelCard {
    /// [`CARD_FORMAT`].
    pub format: String,
    /// Architecture name (`cnn`, `resnet20`, ...; see docs/data.md, "Models").
    pub model: String,
    /// The architecture in words, layer by layer.
    pub architecture: String,
    /// `[channels, height, width]` the model takes.
    pub input_shape: [i64; 3],
    /// Output index → class name.
    pub classes: Vec<String>,
    /// How pixels become inputs: `(pixel * scale - mean[c]) / std[c]`.
    pub normalization: Normalization,
    /// Trainable values in all.
    pub parameters: usize,
    /// Every tensor of the weights file, by name and shape.
    pub tensors: Vec<TensorMeta>,
    /// The weights file, beside this one.
    pub weights: String,
}

/// Input normalization of a [`ModelCard`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    pub scale: f32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    /// What [`crate::data::normalize`] applies to `channels`-channel images.
    pub fn for_channels(channels: i64) -> Self {
        let (mean, std) = if channels == 3 {
            (RGB_MEAN.to_vec(), RGB_STD.to_vec())
        } else {
            (vec![GRAY_MEAN], vec![GRAY_STD])
        };
        Self {
            scale: 1.0 / 255.0,
            mean,
            std,
        }
    }
}

impl ModelCard {
    pub fn new(kind: ModelKind, input_shape: [i64; 3], classes: Vec<String>, manifest: &Manifest) -> Self {
        Self {
            format: CARD_FORMAT.into(),
            model: kind.name().into(),
            architecture: kind.describe().into(),
            input_shape,
            classes,
            normalization: Normalization::for_channels(input_shape[0]),
            parameters: manifest.numel(),
            tensors: manifest.tensors.clone(),
            weights: "model.safetensors".into(),
        }
    }

    /// Writes `dir/model.json`.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("model.json");
        fedge_common::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }

    /// Reads a model card: `path` is `model.json` or the folder holding it.
    pub fn read(path: &Path) -> Result<(Self, PathBuf)> {
        let file = if path.is_dir() {
            path.join("model.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        let card: Self =
            serde_json::from_slice(&text).map_err(|e| Error::data(&file, format!("not a fedge model card: {e}")))?;
        if card.format != CARD_FORMAT {
            return Err(Error::data(
                &file,
                format!("model card format `{}`; this build reads `{CARD_FORMAT}`", card.format),
            ));
        }
        Ok((card, file))
    }
}

/// A model loaded for inference on the CPU.
pub struct Classifier {
    pub card: ModelCard,
    net: Net,
    _vs: VarStore,
}

impl Classifier {
    /// Loads the card at `path` (`model.json` or its folder) and its weights.
    pub fn load(path: &Path) -> Result<Self> {
        let (card, file) = ModelCard::read(path)?;
        let kind: ModelKind = card.model.parse()?;
        let weights = file.parent().unwrap_or(Path::new(".")).join(&card.weights);
        let loaded = load_safetensors(&weights)?;
        Self::from_parts(card, kind, &loaded.manifest, &loaded.values).map_err(|e| Error::data(&weights, e.to_string()))
    }

    /// A classifier of `card`'s architecture with the weights `values`
    /// (laid out as `manifest`).
    pub fn from_parts(card: ModelCard, kind: ModelKind, manifest: &Manifest, values: &[f32]) -> Result<Self> {
        let mut vs = VarStore::new(Device::Cpu);
        let net = kind.build(&vs.root(), card.input_shape, card.classes.len() as i64);
        let own = manifest_of(&vs);
        if &own != manifest {
            return Err(Error::Params(format!(
                "these weights do not fit a {} model for {:?} inputs",
                card.model, card.input_shape
            )));
        }
        load_into(&mut vs, &own, values)?;
        vs.freeze();
        Ok(Self { card, net, _vs: vs })
    }

    /// Class probabilities for `images`, `[N, C, H, W]` u8 pixels.
    pub fn probabilities(&self, images: &Tensor) -> Tensor {
        let n = &self.card.normalization;
        let c = self.card.input_shape[0];
        let mean = Tensor::from_slice(&n.mean).view([1, c, 1, 1]);
        let std = Tensor::from_slice(&n.std).view([1, c, 1, 1]);
        let x = (images.to_kind(Kind::Float) * f64::from(n.scale) - mean) / std;
        tch::no_grad(|| self.net.forward_t(&x, false).softmax(-1, Kind::Float))
    }
}

/// (class, probability, the top classes with theirs), most likely first.
pub type Ranked = (String, f32, Vec<(String, f32)>);

/// What [`Classifier::classify_files`] says of one image.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    pub file: PathBuf,
    /// The most likely class and its probability.
    pub class: String,
    pub probability: f32,
    /// The `top` most likely classes, most likely first.
    pub top: Vec<(String, f32)>,
}

impl Classifier {
    /// Classifies image files (any size: they are resized to the model's
    /// input), `batch` at a time.
    pub fn classify_files(&self, files: &[PathBuf], batch: usize, top: usize) -> Result<Vec<Prediction>> {
        let mut out = Vec::with_capacity(files.len());
        for chunk in files.chunks(batch.max(1)) {
            let pixels = self.read_images(chunk)?;
            for (f, (class, probability, top)) in chunk.iter().zip(self.classify_pixels(&pixels, top)?) {
                out.push(Prediction {
                    file: f.clone(),
                    class,
                    probability,
                    top,
                });
            }
        }
        Ok(out)
    }

    /// Decodes image files (resizing them to the model's input) into the
    /// pixels [`Classifier::classify_pixels`] takes.
    pub fn read_images(&self, files: &[PathBuf]) -> Result<Vec<u8>> {
        let shape = self.card.input_shape;
        let mut pixels = Vec::with_capacity(files.len() * (shape.iter().product::<i64>() as usize));
        for f in files {
            pixels.extend(crate::data::folder::image_pixels(f, shape)?);
        }
        Ok(pixels)
    }

    /// Classifies images given as channel-major `u8` pixels of the card's
    /// input shape, one after another: (class, probability, `top` classes).
    pub fn classify_pixels(&self, pixels: &[u8], top: usize) -> Result<Vec<Ranked>> {
        let shape = self.card.input_shape;
        let per = shape.iter().product::<i64>() as usize;
        if per == 0 || !pixels.len().is_multiple_of(per) {
            return Err(Error::Params(format!(
                "{} bytes of pixels are not whole {shape:?} images",
                pixels.len()
            )));
        }
        let n = (pixels.len() / per) as i64;
        let x = Tensor::from_slice(pixels).view([n, shape[0], shape[1], shape[2]]);
        let probs = self.probabilities(&x);
        let name = |k: usize| self.card.classes.get(k).cloned().unwrap_or_else(|| k.to_string());
        (0..n)
            .map(|i| {
                let row = Vec::<f32>::try_from(probs.get(i))?;
                let mut ranked: Vec<(usize, f32)> = row.into_iter().enumerate().collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
                let top = ranked.iter().take(top.max(1)).map(|&(k, p)| (name(k), p)).collect();
                Ok((name(ranked[0].0), ranked[0].1, top))
            })
            .collect()
    }
}
