//! The model zoo: architectures a run names in its configuration.
//!
//! Every model takes a batch of normalized images `[N, C, H, W]` (f32) and
//! returns logits `[N, classes]`; input channels and size follow the data
//! set (CIFAR-10 is 3×32×32, MNIST 1×28×28). Parameter names follow the
//! `nn::Path` of each layer (`conv1.weight`, `fc2.bias`, ...), which is also
//! their name on the wire and in saved safetensors files. Layers start from
//! PyTorch's default initialization, so fedge and a PyTorch peer train from
//! the same distribution.

use std::fmt;
use std::str::FromStr;

use tch::Tensor;
use tch::nn::{self, ModuleT};

use crate::{Error, Result};

/// A model architecture known to this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// The design's CNN: three 3×3 conv blocks (32, 64, 128 channels, each
    /// ReLU + 2×2 max-pool), Linear →128, ReLU, Linear 128→classes.
    /// 160,202 parameters on CIFAR-10.
    Cnn,
    /// The same conv trunk with a wide head: Linear →16384, ReLU,
    /// Linear 16384→1024, ReLU, Linear 1024→classes. 25,286,730 parameters
    /// (101 MB in f32) on CIFAR-10; exercises large-model transport.
    CnnWide,
    /// The same conv trunk with a very wide head: Linear →65536, ReLU,
    /// Linear 65536→1024, ReLU, Linear 1024→classes. 100,833,354 parameters
    /// (403 MB in f32) on CIFAR-10: a stress test of moving and aggregating
    /// large models in bounded memory.
    CnnXl,
    /// The FedAvg paper's MNIST CNN (McMahan et al. 2017): 5×5 conv 32 and
    /// 5×5 conv 64 ("same" padding), each ReLU + 2×2 max-pool, Linear →512,
    /// ReLU, Linear 512→classes. 1,663,370 parameters on MNIST.
    MnistCnn,
    /// The FedAvg paper's 2NN: a perceptron with two hidden layers of 200
    /// units (ReLU). 199,210 parameters on MNIST.
    Mlp2nn,
    /// ResNet-20 for CIFAR-10 (He et al. 2016): a 3×3 conv of 16 channels,
    /// three stages of three basic blocks (16, 32, 64 channels, batch norm,
    /// parameter-free "option A" shortcuts as in the paper), global average
    /// pooling, Linear 64→classes. 269,722 trainable parameters on CIFAR-10.
    Resnet20,
}

impl ModelKind {
    /// Every architecture this build can construct.
    pub const ALL: [ModelKind; 6] = [
        ModelKind::Cnn,
        ModelKind::CnnWide,
        ModelKind::CnnXl,
        ModelKind::MnistCnn,
        ModelKind::Mlp2nn,
        ModelKind::Resnet20,
    ];

    /// The configuration and wire name.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Cnn => "cnn",
            ModelKind::CnnWide => "cnn-wide",
            ModelKind::CnnXl => "cnn-xl",
            ModelKind::MnistCnn => "mnist-cnn",
            ModelKind::Mlp2nn => "2nn",
            ModelKind::Resnet20 => "resnet20",
        }
    }

    /// The architecture in words (what a model card records).
    pub fn describe(self) -> &'static str {
        match self {
            ModelKind::Cnn => {
                "three blocks of 3x3 conv (32, 64, 128 channels, no padding) + ReLU + 2x2 max-pool, \
                 flatten, Linear ->128, ReLU, Linear 128->classes"
            }
            ModelKind::CnnWide => {
                "the cnn trunk, flatten, Linear ->16384, ReLU, Linear 16384->1024, ReLU, Linear 1024->classes"
            }
            ModelKind::CnnXl => {
                "the cnn trunk, flatten, Linear ->65536, ReLU, Linear 65536->1024, ReLU, Linear 1024->classes"
            }
            ModelKind::MnistCnn => {
                "5x5 conv 32 and 5x5 conv 64 (padding 2), each ReLU + 2x2 max-pool, flatten, Linear ->512, ReLU, \
                 Linear 512->classes"
            }
            ModelKind::Mlp2nn => "flatten, Linear ->200, ReLU, Linear 200->200, ReLU, Linear 200->classes",
            ModelKind::Resnet20 => {
                "ResNet-20: 3x3 conv 16 + batch norm + ReLU, three stages of three basic blocks (16, 32, 64 \
                 channels, option-A shortcuts), global average pooling, Linear 64->classes"
            }
        }
    }

    /// Names of every architecture, for messages.
    pub fn known_names() -> Vec<&'static str> {
        Self::ALL.iter().map(|m| m.name()).collect()
    }

    /// Creates the model's variables under `path` for inputs of shape
    /// `[channels, height, width]` and `classes` outputs.
    pub fn build(self, path: &nn::Path, input: [i64; 3], classes: i64) -> Net {
        match self {
            ModelKind::Cnn => Net::Conv(ConvNet::new(path, input, &[128], classes)),
            ModelKind::CnnWide => Net::Conv(ConvNet::new(path, input, &[16384, 1024], classes)),
            ModelKind::CnnXl => Net::Conv(ConvNet::new(path, input, &[65536, 1024], classes)),
            ModelKind::MnistCnn => Net::Mnist(MnistCnn::new(path, input, classes)),
            ModelKind::Mlp2nn => Net::Mlp(Mlp::new(path, input, &[200, 200], classes)),
            ModelKind::Resnet20 => Net::Resnet(ResNet::new(path, input[0], 3, classes)),
        }
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

/// A built model of any architecture in the zoo.
#[derive(Debug)]
pub enum Net {
    Conv(ConvNet),
    Mnist(MnistCnn),
    Mlp(Mlp),
    Resnet(ResNet),
}

impl ModuleT for Net {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Net::Conv(m) => m.forward_t(xs, train),
            Net::Mnist(m) => m.forward_t(xs, train),
            Net::Mlp(m) => m.forward_t(xs, train),
            Net::Resnet(m) => m.forward_t(xs, train),
        }
    }
}

/// PyTorch's default initialization of `Conv2d` and `Linear` (weights:
/// Kaiming-uniform with a = √5; biases: the same bound), i.e. U(±1/√fan_in).
fn torch_default_init(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform { lo: -bound, up: bound }
}

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64, bias: bool) -> nn::Conv2D {
    let init = torch_default_init(c_in * k * k);
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias,
        ws_init: init,
        bs_init: init,
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, k, cfg)
}

fn linear(p: nn::Path, n_in: i64, n_out: i64) -> nn::Linear {
    let init = torch_default_init(n_in);
    let cfg = nn::LinearConfig {
        ws_init: init,
        bs_init: Some(init),
        bias: true,
    };
    nn::linear(p, n_in, n_out, cfg)
}

/// Linear layers `fc1..`, ReLU between them.
#[derive(Debug)]
struct Head(Vec<nn::Linear>);

impl Head {
    fn new(p: &nn::Path, input: i64, hidden: &[i64], classes: i64, first: usize) -> Self {
        let mut widths = vec![input];
        widths.extend_from_slice(hidden);
        widths.push(classes);
        Head(
            widths
                .windows(2)
                .enumerate()
                .map(|(i, w)| linear(p / format!("fc{}", first + i), w[0], w[1]))
                .collect(),
        )
    }

    fn forward(&self, mut x: Tensor) -> Tensor {
        let last = self.0.len() - 1;
        for (i, fc) in self.0.iter().enumerate() {
            x = x.apply(fc);
            if i < last {
                x = x.relu();
            }
        }
        x
    }
}

/// Three 3×3 conv blocks followed by a fully connected head.
#[derive(Debug)]
pub struct ConvNet {
    convs: Vec<nn::Conv2D>,
    head: Head,
}

impl ConvNet {
    fn new(p: &nn::Path, input: [i64; 3], hidden: &[i64], classes: i64) -> Self {
        let channels = [input[0], 32, 64, 128];
        let convs = channels
            .windows(2)
            .enumerate()
            .map(|(i, c)| conv(p / format!("conv{}", i + 1), c[0], c[1], 3, 1, 0, true))
            .collect();
        // Each block: 3×3 conv without padding (-2), then 2×2 pool (/2).
        // 32 -> 15 -> 6 -> 2, so 128 * 2 * 2 = 512 features on CIFAR-10.
        let side = |s: i64| (0..3).fold(s, |s, _| (s - 2) / 2);
        let features = 128 * side(input[1]) * side(input[2]);
        Self {
            convs,
            head: Head::new(p, features, hidden, classes, 1),
        }
    }
}

impl ModuleT for ConvNet {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        let mut x = xs.shallow_clone();
        for c in &self.convs {
            x = x.apply(c).relu().max_pool2d_default(2);
        }
        self.head.forward(x.flatten(1, -1))
    }
}

/// The FedAvg paper's MNIST CNN.
#[derive(Debug)]
pub struct MnistCnn {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    head: Head,
}

impl MnistCnn {
    fn new(p: &nn::Path, input: [i64; 3], classes: i64) -> Self {
        let features = 64 * (input[1] / 4) * (input[2] / 4);
        Self {
            conv1: conv(p / "conv1", input[0], 32, 5, 1, 2, true),
            conv2: conv(p / "conv2", 32, 64, 5, 1, 2, true),
            head: Head::new(p, features, &[512], classes, 1),
        }
    }
}

impl ModuleT for MnistCnn {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        let x = xs.apply(&self.conv1).relu().max_pool2d_default(2);
        let x = x.apply(&self.conv2).relu().max_pool2d_default(2);
        self.head.forward(x.flatten(1, -1))
    }
}

/// A multi-layer perceptron over flattened images.
#[derive(Debug)]
pub struct Mlp {
    head: Head,
}

impl Mlp {
    fn new(p: &nn::Path, input: [i64; 3], hidden: &[i64], classes: i64) -> Self {
        Self {
            head: Head::new(p, input.iter().product(), hidden, classes, 1),
        }
    }
}

impl ModuleT for Mlp {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        self.head.forward(xs.flatten(1, -1))
    }
}

/// A ResNet basic block: two 3×3 convs with batch norm; a parameter-free
/// shortcut (stride-2 subsampling, zero-padded channels) when the shape changes.
#[derive(Debug)]
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    stride: i64,
    pad_channels: i64,
}

impl BasicBlock {
    fn new(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        Self {
            conv1: conv(&p / "conv1", c_in, c_out, 3, stride, 1, false),
            bn1: nn::batch_norm2d(&p / "bn1", c_out, Default::default()),
            conv2: conv(&p / "conv2", c_out, c_out, 3, 1, 1, false),
            bn2: nn::batch_norm2d(&p / "bn2", c_out, Default::default()),
            stride,
            pad_channels: c_out - c_in,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let y = xs.apply(&self.conv1).apply_t(&self.bn1, train).relu();
        let y = y.apply(&self.conv2).apply_t(&self.bn2, train);
        let shortcut = if self.stride == 1 && self.pad_channels == 0 {
            xs.shallow_clone()
        } else {
            let sub = xs.slice(2, 0, None, self.stride).slice(3, 0, None, self.stride);
            let half = self.pad_channels / 2;
            sub.constant_pad_nd([0, 0, 0, 0, half, self.pad_channels - half])
        };
        (y + shortcut).relu()
    }
}

/// ResNet for CIFAR-sized inputs: 6n+2 layers (n = 3 gives ResNet-20).
#[derive(Debug)]
pub struct ResNet {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    blocks: Vec<BasicBlock>,
    fc: nn::Linear,
}

impl ResNet {
    fn new(p: &nn::Path, channels: i64, n: usize, classes: i64) -> Self {
        let mut blocks = Vec::new();
        let mut c_in = 16;
        for (stage, c_out) in [16, 32, 64].into_iter().enumerate() {
            for b in 0..n {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(
                    p / format!("layer{}", stage + 1) / b,
                    c_in,
                    c_out,
                    stride,
                ));
                c_in = c_out;
            }
        }
        Self {
            conv: conv(p / "conv1", channels, 16, 3, 1, 1, false),
            bn: nn::batch_norm2d(p / "bn1", 16, Default::default()),
            blocks,
            fc: linear(p / "fc", 64, classes),
        }
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = xs.apply(&self.conv).apply_t(&self.bn, train).relu();
        for b in &self.blocks {
            x = b.forward_t(&x, train);
        }
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.fc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CIFAR: [i64; 3] = [3, 32, 32];
    const MNIST: [i64; 3] = [1, 28, 28];

    fn count(kind: ModelKind, input: [i64; 3]) -> i64 {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _ = kind.build(&vs.root(), input, 10);
        vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    #[test]
    fn parameter_counts_match_the_papers() {
        assert_eq!(count(ModelKind::Cnn, CIFAR), 160_202);
        assert_eq!(count(ModelKind::CnnWide, CIFAR), 25_286_730);
        assert_eq!(count(ModelKind::CnnXl, CIFAR), 100_833_354);
        assert_eq!(count(ModelKind::MnistCnn, MNIST), 1_663_370);
        assert_eq!(count(ModelKind::Mlp2nn, MNIST), 199_210);
        assert_eq!(count(ModelKind::Resnet20, CIFAR), 269_722);
    }

    #[test]
    fn every_model_gives_logits_per_class_for_its_input() {
        for kind in ModelKind::ALL {
            for input in [CIFAR, MNIST] {
                let vs = nn::VarStore::new(tch::Device::Cpu);
                let net = kind.build(&vs.root(), input, 10);
                let x = Tensor::zeros([2, input[0], input[1], input[2]], (tch::Kind::Float, tch::Device::Cpu));
                assert_eq!(net.forward_t(&x, true).size(), vec![2, 10], "{kind} on {input:?}");
            }
        }
    }

    #[test]
    fn unknown_names_are_refused_with_the_known_ones() {
        let err = "vgg".parse::<ModelKind>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown model `vgg` (this build knows: cnn, cnn-wide, cnn-xl, mnist-cnn, 2nn, resnet20)"
        );
        for kind in ModelKind::ALL {
            assert_eq!(kind.name().parse::<ModelKind>().unwrap(), kind);
        }
    }
}
