//! Flags several subcommands share: the run's configuration (file, `FEDGE_*`
//! variables, flags) and how a client reaches a coordinator's HTTP side.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use coordinator::CoordinatorConfig;
use fedge_common::config::{LogFormat, parse_override, toml_string};
use fedge_learn::model::ModelKind;

/// How `health` and `status` reach a coordinator whose HTTP side uses TLS
/// or wants an operator (`http.operators`).
#[derive(Args)]
pub(crate) struct ClientArgs {
    /// The CA certificate (PEM) that signed the coordinator's certificate, for https:// URLs.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// An operator's token, in a file (`coordinator certs` writes operator/token).
    #[arg(
        long,
        value_name = "FILE",
        env = "FEDGE_OPERATOR_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// An operator's token (prefer the variable or --token-file to keep it off the command line).
    #[arg(long, env = "FEDGE_OPERATOR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// An operator's client certificate (PEM), signed by the coordinator's security.client_ca.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
}

impl ClientArgs {
    pub(crate) fn options(&self, timeout: Duration) -> anyhow::Result<coordinator::api::http::ClientOptions> {
        let token = match (&self.token_file, &self.token) {
            (Some(f), _) => Some(fedge_common::security::read_token_file(f)?),
            (None, t) => t.clone(),
        };
        Ok(coordinator::api::http::ClientOptions {
            timeout,
            ca: self.ca.clone(),
            skip_verify: false,
            token,
            cert: self.cert.clone(),
            key: self.key.clone(),
        })
    }
}

#[derive(Args)]
pub(crate) struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// gRPC listen address (fleet default: a free loopback port).
    #[arg(long)]
    listen: Option<String>,
    /// Number of rounds.
    #[arg(long)]
    rounds: Option<u32>,
    /// Output folder for the model, checkpoints and run history.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Data set folder for central evaluation and, in a fleet, the nodes:
    /// CIFAR-10 binary, MNIST IDX or an image folder (detected from its
    /// files); without it the synthetic set is used.
    #[arg(long)]
    data_path: Option<PathBuf>,
    /// Model architecture.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(ModelKind::known_names()))]
    model: Option<String>,
    /// Any other setting, as a dotted key: --set train.learning_rate=0.1
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_override)]
    overrides: Vec<(String, String)>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

impl ConfigArgs {
    /// Loads and validates the configuration; `defaults` apply before every flag.
    pub(crate) fn load(
        &self,
        default_listen: Option<&str>,
        defaults: &[(&str, String)],
    ) -> anyhow::Result<CoordinatorConfig> {
        let cfg = self.load_unchecked(default_listen, defaults)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`ConfigArgs::load`] without validation (the fleet completes and validates it).
    pub(crate) fn load_unchecked(
        &self,
        default_listen: Option<&str>,
        defaults: &[(&str, String)],
    ) -> anyhow::Result<CoordinatorConfig> {
        let mut o: Vec<(String, String)> = defaults.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        if let Some(l) = self.listen.as_deref().or(default_listen) {
            o.push(("listen".to_string(), format!("\"{l}\"")));
        }
        if let Some(r) = self.rounds {
            o.push(("rounds".into(), r.to_string()));
        }
        if let Some(d) = &self.out_dir {
            o.push(("out_dir".into(), toml_string(d.display())));
        }
        if let Some(d) = &self.data_path {
            o.push(("data.path".into(), toml_string(d.display())));
        }
        if let Some(m) = &self.model {
            o.push(("model".into(), format!("\"{m}\"")));
        }
        o.extend(self.overrides.iter().cloned());
        let mut cfg = CoordinatorConfig::load_unchecked(self.config.as_deref(), std::env::vars(), &o)?;
        if let Some(f) = self.log_format {
            cfg.log_format = f;
        }
        Ok(cfg)
    }
}
