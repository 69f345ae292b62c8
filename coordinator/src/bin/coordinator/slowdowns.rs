//! `coordinator slowdowns`: each node's slowdown (and, from a trace, its
//! online and offline windows) as a trace, the one `coordinator fleet
//! --node-slowdowns` and the compose fleet read.

use std::io::Write;

use clap::Args;
use coordinator::tools::speeds::Slowdowns;

/// The flags of `coordinator slowdowns`.
#[derive(Args)]
pub(crate) struct SlowdownsArgs {
    /// `lognormal:MAX` (spread log-normally from 1x to MAX x) or a trace to check and complete.
    spec: String,
    /// Number of nodes, named node-1 … node-N.
    #[arg(long)]
    nodes: usize,
    /// Seed of the log-normal draws (a fleet uses its run's `seed`, 42 by default).
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// Runs `coordinator slowdowns` with `args`: the trace on standard output.
pub(crate) async fn run(args: SlowdownsArgs) -> anyhow::Result<()> {
    if args.nodes == 0 {
        anyhow::bail!("--nodes must be at least 1");
    }
    let profiles = Slowdowns::parse(&args.spec, args.seed)?.profiles(args.nodes)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "node,slowdown,online,offline,offset")?;
    for (i, p) in profiles.iter().enumerate() {
        writeln!(out, "{}", p.row(i + 1))?;
    }
    Ok(())
}
