//! The model zoo: architectures a run can name in its configuration.
//!
//! Every model takes a batch of normalized images `[N, 3, 32, 32]` (f32) and
//! returns logits `[N, 10]`. Parameter names follow the `nn::Path` of each
//! layer (`conv1.weight`, `fc2.bias`, ...), which is also their name on the
//! wire and in saved safetensors files.

use std::fmt;
use std::str::FromStr;

use tch::nn::{self, ModuleT};

use crate::{Error, Result};

/// A model architecture known to this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// The design's CNN: three 3x3 conv blocks (32, 64, 128 channels, each
    /// ReLU + 2x2 max-pool), Linear 512→128, ReLU, Linear 128→10.
    /// 160,202 parameters.
    Cnn,
    /// The same conv trunk with a wide head: Linear 512→16384, ReLU,
    /// Linear 16384→1024, ReLU, Linear 1024→10. 25,286,730 parameters
    /// (101 MB in f32); used to exercise large-model transport.
    CnnWide,
}

impl ModelKind {
    /// Every architecture this build can construct.
    pub const ALL: [ModelKind; 2] = [ModelKind::Cnn, ModelKind::CnnWide];

    /// The configuration and wire name.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Cnn => "cnn",
            ModelKind::CnnWide => "cnn-wide",
        }
    }

    /// Names of every architecture, for messages.
    pub fn known_names() -> Vec<&'static str> {
        Self::ALL.iter().map(|m| m.name()).collect()
    }

    fn head(self) -> &'static [i64] {
        match self {
            ModelKind::Cnn => &[128],
            ModelKind::CnnWide => &[16384, 1024],
        }
    }

    /// Creates the model's variables under `path` and returns the module.
    pub fn build(self, path: &nn::Path) -> ConvNet {
        ConvNet::new(path, self.head())
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::UnknownModel {
                name: s.to_owned(),
                known: Self::known_names().join(", "),
            })
    }
}

/// Three conv blocks followed by a fully connected head.
#[derive(Debug)]
pub struct ConvNet {
    convs: Vec<nn::Conv2D>,
    head: Vec<nn::Linear>,
}

/// Number of classes every model predicts.
pub const NUM_CLASSES: i64 = 10;

impl ConvNet {
    fn new(p: &nn::Path, hidden: &[i64]) -> Self {
        let channels = [3, 32, 64, 128];
        let convs = channels
            .windows(2)
            .enumerate()
            .map(|(i, c)| {
                let init = torch_default_init(c[0] * 9);
                let cfg = nn::ConvConfig {
                    ws_init: init,
                    bs_init: init,
                    ..Default::default()
                };
                nn::conv2d(p / format!("conv{}", i + 1), c[0], c[1], 3, cfg)
            })
            .collect();
        // 32x32 -> conv 30 -> pool 15 -> conv 13 -> pool 6 -> conv 4 -> pool 2: 128 * 2 * 2.
        let mut widths = vec![512];
        widths.extend_from_slice(hidden);
        widths.push(NUM_CLASSES);
        let head = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let init = torch_default_init(w[0]);
                let cfg = nn::LinearConfig {
                    ws_init: init,
                    bs_init: Some(init),
                    bias: true,
                };
                nn::linear(p / format!("fc{}", i + 1), w[0], w[1], cfg)
            })
            .collect();
        Self { convs, head }
    }
}

/// PyTorch's default initialization of `Conv2d` and `Linear` (weights:
/// Kaiming-uniform with a = √5; biases: the same bound), i.e. U(±1/√fan_in),
/// so fedge trains from the same starting distribution as a PyTorch peer.
fn torch_default_init(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform { lo: -bound, up: bound }
}

impl ModuleT for ConvNet {
    fn forward_t(&self, xs: &tch::Tensor, _train: bool) -> tch::Tensor {
        let mut x = xs.shallow_clone();
        for conv in &self.convs {
            x = x.apply(conv).relu().max_pool2d_default(2);
        }
        x = x.flatten(1, -1);
        let last = self.head.len() - 1;
        for (i, fc) in self.head.iter().enumerate() {
            x = x.apply(fc);
            if i < last {
                x = x.relu();
            }
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(kind: ModelKind) -> i64 {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _ = kind.build(&vs.root());
        vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    #[test]
    fn parameter_counts_match_the_design() {
        assert_eq!(count(ModelKind::Cnn), 160_202);
        assert_eq!(count(ModelKind::CnnWide), 25_286_730);
    }

    #[test]
    fn forward_gives_logits_per_class() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let net = ModelKind::Cnn.build(&vs.root());
        let out = net.forward_t(
            &tch::Tensor::zeros([4, 3, 32, 32], (tch::Kind::Float, tch::Device::Cpu)),
            false,
        );
        assert_eq!(out.size(), vec![4, NUM_CLASSES]);
    }

    #[test]
    fn unknown_names_are_refused_with_the_known_ones() {
        let err = "resnet".parse::<ModelKind>().unwrap_err().to_string();
        assert_eq!(err, "unknown model `resnet` (this build knows: cnn, cnn-wide)");
        assert_eq!("cnn-wide".parse::<ModelKind>().unwrap(), ModelKind::CnnWide);
    }
}
