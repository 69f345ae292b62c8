//! What a round asks of a node and what it reports back, as plain types:
//! the algorithm, the local hyperparameters, the node's share of
//! differential privacy, and training and evaluation metrics. The wire
//! ([`crate::wire`]) converts them to and from protobuf; `fedge-learn`
//! trains with them.

/// What a node computes in a round and sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Train locally; send `w_local − w_global` (McMahan et al. 2017).
    #[default]
    FedAvg,
    /// One gradient over the local data at `w_global`, sent as the gradient.
    FedSgd,
    /// FedAvg with the proximal term `μ/2·‖w − w_global‖²` (Li et al. 2020).
    FedProx,
    /// FedAvg with client and server control variates (Karimireddy et al.
    /// 2020, option II); the update also carries the control delta.
    Scaffold,
}

impl Algorithm {
    /// Name as written in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::FedAvg => "fedavg",
            Algorithm::FedSgd => "fedsgd",
            Algorithm::FedProx => "fedprox",
            Algorithm::Scaffold => "scaffold",
        }
    }
}

/// The local optimizer; its state is fresh every round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalOptimizer {
    /// SGD with momentum and weight decay.
    #[default]
    Sgd,
    /// Adam (β₁ 0.9, β₂ 0.999, ε 1e-8) with L2 weight decay.
    Adam,
}

/// Hyper-parameters of one round of local training.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hyperparameters {
    pub epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Upper bound on optimizer steps; 0 means only the epochs bound.
    pub max_steps: u64,
    /// Seed of this round's shuffling and augmentation.
    pub seed: u64,
    /// Augmentation: random crops after zero padding by this many pixels (0: off).
    pub crop_padding: u32,
    /// Augmentation: random horizontal flips.
    pub horizontal_flip: bool,
    pub algorithm: Algorithm,
    /// FedProx's μ (ignored by the other algorithms).
    pub proximal_mu: f64,
    pub optimizer: LocalOptimizer,
    /// Evaluate the received model on held-out data this round.
    pub evaluate: bool,
    /// Differential privacy: what the node does to its update before sending it.
    #[serde(default)]
    pub privacy: Option<PrivacyTask>,
}

/// A round's differential-privacy instructions for a node.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrivacyTask {
    /// Clip the model change the update makes to this L2 norm.
    pub clip_norm: f64,
    /// Then add Gaussian noise of this standard deviation to every value (0: none).
    pub noise_stddev: f64,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.05,
            momentum: 0.9,
            weight_decay: 0.0,
            max_steps: 0,
            seed: 0,
            crop_padding: 0,
            horizontal_flip: false,
            algorithm: Algorithm::FedAvg,
            proximal_mu: 0.0,
            optimizer: LocalOptimizer::Sgd,
            evaluate: true,
            privacy: None,
        }
    }
}

/// What a round of local training did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainMetrics {
    /// Mean training loss over the steps.
    pub loss: f64,
    /// Training accuracy over the examples seen.
    pub accuracy: f64,
    pub steps: u64,
    pub examples: u64,
    pub train_seconds: f64,
    /// Seconds the node spent fetching the round's global model (0 when cached).
    #[serde(default)]
    pub fetch_seconds: f64,
    /// Seconds the node spent encoding (or masking) the update.
    #[serde(default)]
    pub encode_seconds: f64,
    /// Differential privacy: whether the update needed no clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unclipped: Option<bool>,
}

/// Loss and accuracy of a model on a data set.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub accuracy: f64,
    pub examples: u64,
}
