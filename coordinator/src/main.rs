//! `coordinator`: serve a federated training run, or run one with a local fleet.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use coordinator::CoordinatorConfig;
use coordinator::tools::fleet::{FleetOptions, run_fleet};
use fedge_common::config::{LogFormat, parse_override, toml_string};
use fedge_learn::model::ModelKind;
use fedge_learn::partition::{Scheme, SchemeParams, write_partitions};

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "fedge coordinator: federated training over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a run: wait for edge nodes, train for the configured rounds, save the model.
    Serve(ConfigArgs),
    /// Run a local fleet: this coordinator plus N edge-node processes on loopback.
    Fleet {
        #[command(flatten)]
        config: ConfigArgs,
        /// Number of edge-node processes.
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        /// Path of the edge-node binary (default: beside this one).
        #[arg(long)]
        node_bin: Option<PathBuf>,
        /// libtorch threads per node (default: cores / nodes, at least 1).
        #[arg(long, default_value_t = 0)]
        node_threads: usize,
        /// Log filter of the nodes (their logs go to OUT_DIR/logs/).
        #[arg(long, default_value = "info")]
        node_log: String,
        /// A setting for every node, e.g. --node-set partition.scheme=dirichlet --node-set partition.alpha=0.1
        #[arg(long = "node-set", value_name = "KEY=VALUE", value_parser = parse_override)]
        node_overrides: Vec<(String, String)>,
        /// Robustness experiments: make the first K nodes adversarial.
        #[arg(long, value_name = "K", default_value_t = 0)]
        adversaries: usize,
        /// What the adversarial nodes send: sign-flip (−scale × their update) or noise.
        #[arg(long, default_value = "sign-flip")]
        adversary_kind: String,
        /// Scale of the adversarial updates.
        #[arg(long, default_value_t = 10.0)]
        adversary_scale: f64,
    },
    /// Simulate a fleet in this process: `simulation.nodes` virtual nodes, each with a share of
    /// data.path's training split, trained by a pool of threads with the edge node's code.
    Simulate {
        #[command(flatten)]
        config: ConfigArgs,
        /// Number of virtual nodes (simulation.nodes).
        #[arg(long)]
        nodes: Option<u32>,
    },
    /// Split a data set into per-node folders (for fleets whose nodes each mount only their own data).
    Partition {
        /// The data set: CIFAR-10 binary, MNIST IDX or an image folder.
        #[arg(long, required_unless_present = "synthetic")]
        data_path: Option<PathBuf>,
        /// Partition the built-in synthetic set instead (written in CIFAR-10's binary layout).
        #[arg(long, conflicts_with = "data_path")]
        synthetic: bool,
        /// Size of the synthetic training set (its test set is a sixth of it).
        #[arg(long, default_value_t = 6000, requires = "synthetic")]
        synthetic_samples: usize,
        /// Where node-1 … node-N, coordinator/ and partition.md go.
        #[arg(long)]
        out: PathBuf,
        /// Number of nodes.
        #[arg(long)]
        nodes: usize,
        /// iid, dirichlet, shards or quantity.
        #[arg(long, default_value = "iid")]
        scheme: String,
        /// Dirichlet concentration (smaller: more label skew).
        #[arg(long, default_value_t = 0.5)]
        alpha: f64,
        /// Dirichlet: fewest samples per node.
        #[arg(long, default_value_t = 10)]
        min_size: usize,
        /// Shards: labels per node.
        #[arg(long, default_value_t = 2)]
        labels_per_node: usize,
        /// Quantity skew: sigma of the log-normal sizes.
        #[arg(long, default_value_t = 1.0)]
        sigma: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Make a development CA, the coordinator's certificate, and a certificate and token per node.
    Certs {
        /// Folder to write into (must not hold a CA yet, unless --add).
        #[arg(long)]
        out: PathBuf,
        /// Add these nodes to the PKI already in --out (its CA signs them; their token hashes are appended).
        #[arg(long)]
        add: bool,
        /// Node names, comma-separated (or give --nodes N for node-1 … node-N).
        #[arg(long, value_delimiter = ',', conflicts_with = "nodes")]
        names: Vec<String>,
        /// Number of nodes, named node-1 … node-N.
        #[arg(long)]
        nodes: Option<usize>,
        /// Host names and IP addresses the coordinator's certificate is valid for.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        hosts: Vec<String>,
    },
    /// Check a running coordinator's HTTP health endpoint (exit status 0 when healthy).
    Health {
        /// The endpoint to ask.
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz", conflicts_with = "config")]
        url: String,
        /// Ask the coordinator this configuration describes (http.listen, http or https; FEDGE_*
        /// variables apply), on loopback when it listens on all addresses. Its certificate is not
        /// checked unless --ca is given: this checks that the local process answers.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
        /// How long to wait for an answer.
        #[arg(long, default_value = "3s", value_parser = humantime_serde::re::humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show a running coordinator's run: phase, rounds, nodes, accuracy (from its HTTP API).
    Status {
        /// The coordinator's HTTP address (`http.listen`): http://… or https://….
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[command(flatten)]
        client: ClientArgs,
        /// Print the JSON of /api/status instead of tables.
        #[arg(long)]
        json: bool,
        /// Refresh every this many seconds until the run finishes (0: once).
        #[arg(long, default_value_t = 0)]
        watch: u64,
    },
    /// Train the same model centrally in this process (the floor a federated run is compared with).
    Baseline {
        #[command(flatten)]
        config: ConfigArgs,
        /// Epochs over the whole training set.
        #[arg(long, default_value_t = 1)]
        epochs: u32,
        /// libtorch threads (0: libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

/// How `health` and `status` reach a coordinator whose HTTP side uses TLS
/// or wants an operator (`http.operators`).
#[derive(Args)]
struct ClientArgs {
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
    fn options(&self, timeout: Duration) -> anyhow::Result<coordinator::api::http::ClientOptions> {
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
struct ConfigArgs {
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
    fn load(&self, default_listen: Option<&str>, defaults: &[(&str, String)]) -> anyhow::Result<CoordinatorConfig> {
        let cfg = self.load_unchecked(default_listen, defaults)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`ConfigArgs::load`] without validation (the fleet completes and validates it).
    fn load_unchecked(
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

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads exist, so they share the capped arenas.
    coordinator::runtime::memory::tune_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run_cli())
}

async fn run_cli() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(args) => {
            let cfg = args.load(None, &[])?;
            fedge_common::telemetry::init(cfg.log_format, "info");
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("binding {}", cfg.listen))?;
            coordinator::run(cfg, listener, fedge_common::shutdown::signal()).await?;
        }
        Cmd::Fleet {
            config,
            nodes,
            node_bin,
            node_threads,
            node_log,
            node_overrides,
            adversaries,
            adversary_kind,
            adversary_scale,
        } => {
            if adversaries > nodes {
                anyhow::bail!("--adversaries ({adversaries}) must not exceed --nodes ({nodes})");
            }
            // Every node is asked each round; a round starts once all are connected.
            let cfg = config.load_unchecked(Some("127.0.0.1:0"), &[("sampling.min_available", nodes.to_string())])?;
            fedge_common::telemetry::init(cfg.log_format, "info");
            let opts = FleetOptions {
                nodes,
                node_bin,
                node_threads,
                node_log,
                node_overrides,
                adversaries,
                adversary_overrides: vec![
                    ("adversary.kind".into(), format!("\"{adversary_kind}\"")),
                    ("adversary.scale".into(), format!("{adversary_scale:?}")),
                ],
            };
            run_fleet(cfg, opts, fedge_common::shutdown::signal()).await?;
        }
        Cmd::Simulate { config, nodes } => {
            let defaults: Vec<(&str, String)> =
                nodes.map(|n| ("simulation.nodes", n.to_string())).into_iter().collect();
            let mut cfg = config.load_unchecked(None, &defaults)?;
            coordinator::tools::simulation::complete(&mut cfg);
            cfg.validate()?;
            fedge_common::telemetry::init(cfg.log_format, "info");
            coordinator::tools::simulation::simulate(cfg, fedge_common::shutdown::signal()).await?;
        }
        Cmd::Health {
            url,
            config,
            client,
            timeout,
        } => {
            let mut opts = client.options(timeout)?;
            let url = match config {
                Some(file) => {
                    let cfg = CoordinatorConfig::load_unchecked(Some(&file), std::env::vars(), &[])?;
                    let Some(mut addr) = cfg.http.listen else {
                        anyhow::bail!(
                            "{}: http.listen is not set; there is no HTTP side to ask",
                            file.display()
                        );
                    };
                    if addr.ip().is_unspecified() {
                        addr.set_ip(if addr.is_ipv4() {
                            std::net::Ipv4Addr::LOCALHOST.into()
                        } else {
                            std::net::Ipv6Addr::LOCALHOST.into()
                        });
                    }
                    let tls = cfg.http.tls(&cfg.security);
                    opts.skip_verify = tls && opts.ca.is_none();
                    format!("{}://{addr}/healthz", if tls { "https" } else { "http" })
                }
                None => url,
            };
            let answer = tokio::task::spawn_blocking(move || coordinator::api::http::check(&url, &opts)).await??;
            let mut out = std::io::stdout().lock();
            std::io::Write::write_all(&mut out, format!("{answer}\n").as_bytes())?;
        }
        Cmd::Status {
            url,
            client,
            json,
            watch,
        } => loop {
            let base = url.clone();
            let opts = client.options(Duration::from_secs(5))?;
            let status =
                tokio::task::spawn_blocking(move || coordinator::api::http::fetch_status(&base, &opts)).await??;
            let text = if json {
                serde_json::to_string_pretty(&status)? + "\n"
            } else {
                coordinator::api::http::render_status(&status, coordinator::runtime::driver::now_ms())
            };
            let mut out = std::io::stdout().lock();
            if watch > 0 {
                // Clear the terminal and redraw.
                std::io::Write::write_all(&mut out, b"\x1b[2J\x1b[H")?;
            }
            std::io::Write::write_all(&mut out, text.as_bytes())?;
            drop(out);
            if watch == 0 || status.phase == "finished" {
                break;
            }
            tokio::time::sleep(Duration::from_secs(watch)).await;
        },
        Cmd::Partition {
            data_path,
            synthetic,
            synthetic_samples,
            out,
            nodes,
            scheme,
            alpha,
            min_size,
            labels_per_node,
            sigma,
            seed,
        } => {
            fedge_common::telemetry::init(LogFormat::Text, "info");
            let scheme = Scheme::from_params(&SchemeParams {
                name: &scheme,
                alpha,
                min_size,
                labels_per_node,
                sigma,
            })?;
            let source = match data_path {
                Some(path) => fedge_learn::data::detect(&path)?,
                None if synthetic => fedge_learn::data::DataSource::Synthetic {
                    seed: fedge_learn::data::DataConfig::default().synthetic_seed,
                    train_samples: synthetic_samples,
                    test_samples: synthetic_samples.div_ceil(6),
                },
                None => anyhow::bail!("give --data-path or --synthetic"),
            };
            let report =
                tokio::task::spawn_blocking(move || write_partitions(&source, &scheme, nodes, seed, &out)).await??;
            tracing::info!(
                source = %report.source,
                scheme = %report.scheme,
                nodes = report.nodes.len(),
                load_s = format!("{:.2}", report.load_seconds),
                "partition written; per-node label counts in partition.md"
            );
        }
        Cmd::Certs {
            out,
            add,
            names,
            nodes,
            hosts,
        } => {
            fedge_common::telemetry::init(LogFormat::Text, "info");
            let names = match nodes {
                Some(n) => (1..=n).map(|i| format!("node-{i}")).collect(),
                None if names.is_empty() => anyhow::bail!("name the nodes: --names a,b,c or --nodes N"),
                None => names,
            };
            if add {
                let pki = coordinator::tools::pki::add_nodes(&out, &names)?;
                tracing::info!(
                    nodes = pki.nodes.len(),
                    tokens = %pki.tokens.display(),
                    "nodes added; each node's files are in {}/nodes/NAME",
                    out.display()
                );
                return Ok(());
            }
            let pki = coordinator::tools::pki::generate(&out, &hosts, &names)?;
            tracing::info!(
                ca = %pki.ca.display(),
                server_cert = %pki.server_cert.display(),
                tokens = %pki.tokens.display(),
                nodes = pki.nodes.len(),
                "development PKI written; each node's files are in {}/nodes/NAME (keep ca.key offline)",
                out.display()
            );
        }
        Cmd::Baseline {
            config,
            epochs,
            threads,
        } => {
            // The floor serves nothing: no certificate is needed.
            let cfg = config.load(None, &[("security.insecure", "true".into())])?;
            fedge_common::telemetry::init(cfg.log_format, "info");
            let report = tokio::task::spawn_blocking(move || {
                let report = coordinator::tools::baseline::run_baseline(&cfg, epochs, threads)?;
                let path = cfg.out_dir.join("baseline.json");
                let json = serde_json::to_vec_pretty(&report)?;
                fedge_common::fsutil::write_atomic(&path, &json)?;
                tracing::info!(path = %path.display(), "baseline report written");
                anyhow::Ok(report)
            })
            .await??;
            drop(report);
        }
    }
    Ok(())
}
