//! `coordinator partition`: a data set split into per-node folders.

use std::path::PathBuf;

use clap::Args;
use fedge_common::config::LogFormat;
use fedge_learn::partition::{Scheme, SchemeParams, write_partitions};

/// The flags of `coordinator partition`.
#[derive(Args)]
pub(crate) struct PartitionArgs {
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
}

/// Runs `coordinator partition` with `args`.
pub(crate) async fn run(args: PartitionArgs) -> anyhow::Result<()> {
    let PartitionArgs {
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
    } = args;
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
    let report = tokio::task::spawn_blocking(move || write_partitions(&source, &scheme, nodes, seed, &out)).await??;
    tracing::info!(
        source = %report.source,
        scheme = %report.scheme,
        nodes = report.nodes.len(),
        load_s = format!("{:.2}", report.load_seconds),
        "partition written; per-node label counts in partition.md"
    );
    Ok(())
}
