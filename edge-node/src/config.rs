//! The edge node's configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedge_common::config::{LogFormat, load_layered};
use fedge_learn::data::DataConfig;
pub use fedge_learn::job::{AdversaryConfig, AdversaryKind};
use fedge_learn::partition::{Scheme, SchemeParams};
use serde::{Deserialize, Serialize};

pub use crate::availability::AvailabilityConfig;
use crate::{Error, Result};

/// Environment prefix of node settings (`FEDGE_NODE_NAME=cam-7`, `FEDGE_NODE_DATA__PATH=/data`).
pub const ENV_PREFIX: &str = "FEDGE_NODE";

/// Everything an edge node reads at start-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The coordinator's gRPC endpoint.
    pub coordinator: String,
    /// This node's name, unique in the fleet (default: the host name).
    pub name: String,
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when available).
    pub device: String,
    /// libtorch intra-op threads (0: libtorch's default).
    pub threads: usize,
    /// Local training data.
    pub data: DataConfig,
    /// Fraction of the local data held out of training; the node evaluates
    /// each global model it receives on it (federated evaluation). 0: none.
    pub holdout: f64,
    /// Train on one partition of the data (for simulated fleets).
    pub partition: Option<PartitionConfig>,
    /// Reconnection backoff.
    pub reconnect: ReconnectConfig,
    /// When set, every update this node sends is also written here
    /// (`round-NNNN.safetensors`), an audit copy of what left the device.
    pub record_dir: Option<PathBuf>,
    /// Where the node keeps state across restarts (SCAFFOLD's client control
    /// variate). Unset: kept in memory only, lost when the node restarts.
    pub state_dir: Option<PathBuf>,
    /// TLS and this node's credentials.
    pub security: NodeSecurityConfig,
    /// Emulated uplink speed in bytes per second (0: unlimited), to simulate
    /// slow device links in local fleets.
    pub upload_bytes_per_sec: u64,
    /// How this node trains.
    pub train: NodeTrainConfig,
    /// When this node is reachable (an emulated cycle of online and offline windows).
    pub availability: AvailabilityConfig,
    /// Show a progress bar of local training when standard error is a
    /// terminal and logs are text (containers and `log_format = "json"` get
    /// log lines only).
    pub progress: bool,
    /// Local predictions over HTTP with the latest global model.
    pub serve: ServeConfig,
    /// Robustness experiments only: make this node send corrupted updates.
    pub adversary: AdversaryConfig,
    /// Log output format.
    pub log_format: LogFormat,
}

/// How the node reaches the coordinator securely and proves its name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSecurityConfig {
    /// Allow a plaintext `http://` coordinator URL (development only; the
    /// node says so loudly). Without it, the URL must be `https://`.
    pub insecure: bool,
    /// The CA that signed the coordinator's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// This node's client certificate and key (PEM), for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the coordinator's certificate must carry (default: the URL's host).
    pub server_name: Option<String>,
    /// This node's token, sent when it joins (`FEDGE_NODE_SECURITY__TOKEN`).
    pub token: Option<String>,
    /// A file holding this node's token (first line).
    pub token_file: Option<PathBuf>,
}

impl NodeSecurityConfig {
    /// The token to present, if one is configured.
    pub fn token(&self) -> Result<Option<String>> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Ok(Some(t.trim().to_owned())),
            (None, Some(path)) => Ok(Some(fedge_common::security::read_token_file(path)?)),
            (None, None) => Ok(None),
        }
    }

    fn validate(&self, url: &str) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("security: {m}")));
        let https = url.starts_with("https://");
        if !https && !self.insecure {
            return bad(format!(
                "the coordinator URL `{url}` is plaintext http://; use https:// with security.ca, \
                 or set security.insecure = true (development only)"
            ));
        }
        if https && self.ca.is_none() {
            return bad("an https:// coordinator needs security.ca, the CA that signed its certificate".into());
        }
        if self.cert.is_some() != self.key.is_some() {
            return bad("cert and key go together; set both or neither".into());
        }
        if self.token.is_some() && self.token_file.is_some() {
            return bad("set token or token_file, not both".into());
        }
        if self.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return bad("token must not be empty".into());
        }
        Ok(())
    }
}

/// Part `index` of `count` of the data, split by `scheme` with `seed`. Every
/// node of a simulated fleet computes the same split and keeps its own part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionConfig {
    pub index: usize,
    pub count: usize,
    #[serde(default)]
    pub seed: u64,
    /// `iid`, `dirichlet`, `shards` or `quantity`.
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// Dirichlet concentration α (scheme `dirichlet`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Fewest samples per node a Dirichlet draw must give (scheme `dirichlet`).
    #[serde(default = "default_min_size")]
    pub min_size: usize,
    /// Shards, so at most this many labels, per node (scheme `shards`).
    #[serde(default = "default_labels_per_node")]
    pub labels_per_node: usize,
    /// σ of the log-normal node sizes (scheme `quantity`).
    #[serde(default = "default_sigma")]
    pub sigma: f64,
}

fn default_scheme() -> String {
    "iid".into()
}
fn default_alpha() -> f64 {
    0.5
}
fn default_min_size() -> usize {
    10
}
fn default_labels_per_node() -> usize {
    2
}
fn default_sigma() -> f64 {
    1.0
}

impl PartitionConfig {
    /// The partitioning scheme this names.
    pub fn scheme(&self) -> Result<Scheme> {
        Ok(Scheme::from_params(&SchemeParams {
            name: &self.scheme,
            alpha: self.alpha,
            min_size: self.min_size,
            labels_per_node: self.labels_per_node,
            sigma: self.sigma,
        })?)
    }
}

/// `[serve]`: the node's prediction endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Listen address of `POST /predict` and `GET /model`, e.g.
    /// `127.0.0.1:8090`; unset: no server.
    pub listen: Option<std::net::SocketAddr>,
}

/// How this node trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeTrainConfig {
    /// Emulated device speed: each training step takes this many times its
    /// real time (the training thread sleeps the difference, leaving the CPU
    /// to other nodes on the machine). 1: the machine's own speed.
    pub slowdown: f64,
}

impl Default for NodeTrainConfig {
    fn default() -> Self {
        Self { slowdown: 1.0 }
    }
}

/// Exponential backoff with jitter between connection attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconnectConfig {
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:7070".into(),
            name: default_name(),
            device: "cpu".into(),
            threads: 0,
            data: DataConfig::default(),
            holdout: 0.0,
            partition: None,
            reconnect: ReconnectConfig::default(),
            record_dir: None,
            state_dir: None,
            security: NodeSecurityConfig::default(),
            upload_bytes_per_sec: 0,
            train: NodeTrainConfig::default(),
            availability: AvailabilityConfig::default(),
            progress: true,
            serve: ServeConfig::default(),
            adversary: AdversaryConfig::default(),
            log_format: LogFormat::Text,
        }
    }
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "edge-node".into())
}

impl NodeConfig {
    /// Reads defaults, then `file`, then `FEDGE_NODE_*` variables, then `overrides`, and validates.
    pub fn load(file: Option<&Path>, overrides: &[(String, String)]) -> Result<Self> {
        Self::load_with_env(file, std::env::vars(), overrides)
    }

    /// [`NodeConfig::load`] with the environment given explicitly.
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Self> {
        let cfg: Self = load_layered(file, env, ENV_PREFIX, &[], overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The libtorch device to train on.
    pub fn device(&self) -> Result<tch::Device> {
        match self.device.as_str() {
            "cpu" => Ok(tch::Device::Cpu),
            "auto" => Ok(tch::Device::cuda_if_available()),
            "cuda" => Ok(tch::Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(tch::Device::Cuda)
                .ok_or_else(|| Error::Config(format!("device must be cpu, cuda, cuda:N or auto, got `{other}`"))),
        }
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.coordinator.starts_with("http://") || self.coordinator.starts_with("https://")) {
            return Err(Error::Config(format!(
                "coordinator must be an http:// or https:// URL, got `{}`",
                self.coordinator
            )));
        }
        fedge_common::security::check_node_name(&self.name).map_err(|e| Error::Config(format!("name: {e}")))?;
        self.device()?;
        if let Some(p) = &self.partition {
            if p.count == 0 || p.index >= p.count {
                return Err(Error::Config(format!(
                    "partition index must be below the partition count, got {}/{}",
                    p.index, p.count
                )));
            }
            p.scheme()?;
        }
        if !(0.0..1.0).contains(&self.holdout) {
            return Err(Error::Config(format!(
                "holdout must be in [0, 1), got {}",
                self.holdout
            )));
        }
        if !(self.train.slowdown.is_finite() && (1.0..=1000.0).contains(&self.train.slowdown)) {
            return Err(Error::Config(format!(
                "train.slowdown must be between 1 (the machine's own speed) and 1000, got {}",
                self.train.slowdown
            )));
        }
        self.availability.validate()?;
        if !(self.adversary.scale.is_finite() && self.adversary.scale > 0.0) {
            return Err(Error::Config(format!(
                "adversary.scale must be a positive number, got {}",
                self.adversary.scale
            )));
        }
        if self.reconnect.initial.is_zero() || self.reconnect.max < self.reconnect.initial {
            return Err(Error::Config(
                "reconnect.initial must be positive and at most reconnect.max".into(),
            ));
        }
        self.security.validate(&self.coordinator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_lists_the_defaults() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("edge-node.example.toml");
        let mut insecure = NodeConfig::default();
        insecure.security.insecure = true;
        assert_eq!(
            NodeConfig::load_with_env(Some(&example), [], &[("security.insecure".into(), "true".into())]).unwrap(),
            insecure
        );
        let err = NodeConfig::default().validate().unwrap_err().to_string();
        assert!(err.contains("is plaintext http://"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = |k: &str, v: &str| {
            NodeConfig::load_with_env(None, [], &[(k.into(), v.into())])
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("coordinator", "\"localhost:1\""),
            "invalid configuration: coordinator must be an http:// or https:// URL, got `localhost:1`"
        );
        assert_eq!(
            err("device", "\"tpu\""),
            "invalid configuration: device must be cpu, cuda, cuda:N or auto, got `tpu`"
        );
        assert_eq!(
            NodeConfig::load(
                None,
                &[
                    ("partition.index".into(), "3".into()),
                    ("partition.count".into(), "3".into())
                ]
            )
            .unwrap_err()
            .to_string(),
            "invalid configuration: partition index must be below the partition count, got 3/3"
        );
    }
}
