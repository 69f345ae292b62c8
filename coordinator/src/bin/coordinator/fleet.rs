//! `coordinator fleet`: a local fleet: this coordinator plus N `edge-node` processes on loopback.

use std::path::PathBuf;

use clap::Args;
use coordinator::tools::fleet::{FleetOptions, run_fleet};
use coordinator::tools::speeds::Slowdowns;
use fedge_common::config::parse_override;

use crate::args::ConfigArgs;

/// The flags of `coordinator fleet`.
#[derive(Args)]
pub(crate) struct FleetArgs {
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
    /// How much slower than this machine each node trains: `lognormal:MAX`
    /// (spread log-normally from 1x to MAX x, seeded by the run's seed), or a
    /// CSV file of `node,slowdown` rows.
    #[arg(long, value_name = "lognormal:MAX|FILE")]
    node_slowdowns: Option<String>,
}

/// Runs `coordinator fleet` with `args`.
pub(crate) async fn run(args: FleetArgs) -> anyhow::Result<()> {
    let FleetArgs {
        config,
        nodes,
        node_bin,
        node_threads,
        node_log,
        node_overrides,
        adversaries,
        adversary_kind,
        adversary_scale,
        node_slowdowns,
    } = args;
    if adversaries > nodes {
        anyhow::bail!("--adversaries ({adversaries}) must not exceed --nodes ({nodes})");
    }
    // Every node is asked each round; a round starts once all are connected.
    let cfg = config.load_unchecked(Some("127.0.0.1:0"), &[("sampling.min_available", nodes.to_string())])?;
    fedge_common::telemetry::init(cfg.log_format, "info");
    let slowdowns = node_slowdowns
        .map(|spec| Slowdowns::parse(&spec, cfg.seed))
        .transpose()?;
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
        slowdowns,
    };
    run_fleet(cfg, opts, fedge_common::shutdown::signal()).await?;
    Ok(())
}
