//! `coordinator baseline`: the same model trained centrally in this process (the floor).

use clap::Args;

use crate::args::ConfigArgs;

/// The flags of `coordinator baseline`.
#[derive(Args)]
pub(crate) struct BaselineArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Epochs over the whole training set.
    #[arg(long, default_value_t = 1)]
    epochs: u32,
    /// libtorch threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// Runs `coordinator baseline` with `args`.
pub(crate) async fn run(args: BaselineArgs) -> anyhow::Result<()> {
    let BaselineArgs {
        config,
        epochs,
        threads,
    } = args;
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
    Ok(())
}
