//! `coordinator serve`: serves a run: waits for edge nodes, trains for the configured rounds, saves the model.

use anyhow::Context;

use crate::args::ConfigArgs;

/// Serves a run with `args`' configuration until it ends or the process is stopped.
pub(crate) async fn run(args: ConfigArgs) -> anyhow::Result<()> {
    let cfg = args.load(None, &[])?;
    fedge_common::telemetry::init(cfg.log_format, "info");
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    coordinator::run(cfg, listener, fedge_common::shutdown::signal()).await?;
    Ok(())
}
