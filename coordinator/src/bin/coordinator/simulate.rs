//! `coordinator simulate`: a fleet simulated in this process (virtual nodes trained by a pool of threads).

use clap::Args;

use crate::args::ConfigArgs;

/// The flags of `coordinator simulate`.
#[derive(Args)]
pub(crate) struct SimulateArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Number of virtual nodes (simulation.nodes).
    #[arg(long)]
    nodes: Option<u32>,
}

/// Runs `coordinator simulate` with `args`.
pub(crate) async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let SimulateArgs { config, nodes } = args;
    let defaults: Vec<(&str, String)> = nodes.map(|n| ("simulation.nodes", n.to_string())).into_iter().collect();
    let mut cfg = config.load_unchecked(None, &defaults)?;
    coordinator::tools::simulation::complete(&mut cfg);
    cfg.validate()?;
    fedge_common::telemetry::init(cfg.log_format, "info");
    coordinator::tools::simulation::simulate(cfg, fedge_common::shutdown::signal()).await?;
    Ok(())
}
