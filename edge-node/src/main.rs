//! `edge-node`: the fedge daemon that trains on local data for a coordinator.

use std::path::PathBuf;

use clap::Parser;
use edge_node::NodeConfig;
use fedge_common::config::{LogFormat, parse_override, toml_string};

#[derive(Parser)]
#[command(
    name = "edge-node",
    version,
    about = "fedge edge node: federated training on local data"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Coordinator endpoint, e.g. http://10.0.0.5:7070.
    #[arg(long)]
    coordinator: Option<String>,
    /// This node's name, unique in the fleet.
    #[arg(long)]
    name: Option<String>,
    /// Data set folder: CIFAR-10 binary, MNIST IDX or an image folder
    /// (detected from its files); without it the synthetic set is used.
    #[arg(long)]
    data_path: Option<PathBuf>,
    /// Train on part INDEX of COUNT of the data, e.g. 0/4 (the split is
    /// `partition.scheme`, IID by default).
    #[arg(long, value_name = "INDEX/COUNT")]
    partition: Option<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    device: Option<String>,
    /// libtorch threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Keep a copy of every update sent in this folder.
    #[arg(long)]
    record_dir: Option<PathBuf>,
    /// Any other setting, as a dotted key: --set reconnect.max=30s
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_override)]
    overrides: Vec<(String, String)>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Classify image files with a saved model (model.json and model.safetensors, e.g. a run's out_dir).
    Predict {
        /// model.json, or the folder holding it and its weights.
        #[arg(long)]
        model: PathBuf,
        /// Image files (PNG, JPEG); resized to the model's input when their size differs.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Classes to list per image.
        #[arg(long, default_value_t = 1)]
        top: usize,
        /// Images per forward pass.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Measure instead: classify the images (already decoded) this many
        /// times, one forward pass of all of them each, and print latency
        /// percentiles.
        #[arg(long, value_name = "N")]
        repeat: Option<usize>,
        /// libtorch threads (0: libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Check that a node running with this state_dir is alive (exit status 0 when its heartbeat is fresh).
    Health {
        /// The node's state_dir.
        #[arg(long, default_value = "/var/lib/fedge")]
        state_dir: PathBuf,
        /// Oldest acceptable heartbeat.
        #[arg(long, default_value = "30s", value_parser = humantime_serde::re::humantime::parse_duration)]
        max_age: std::time::Duration,
    },
}

impl Cli {
    fn overrides(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut o = Vec::new();
        if let Some(c) = &self.coordinator {
            o.push(("coordinator".into(), toml_string(c)));
        }
        if let Some(n) = &self.name {
            o.push(("name".into(), toml_string(n)));
        }
        if let Some(p) = &self.data_path {
            o.push(("data.path".into(), toml_string(p.display())));
        }
        if let Some(p) = &self.partition {
            let (i, n) = p
                .split_once('/')
                .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("--partition takes INDEX/COUNT, e.g. 0/4; got `{p}`"))?;
            o.push(("partition.index".into(), i.to_string()));
            o.push(("partition.count".into(), n.to_string()));
        }
        if let Some(d) = &self.device {
            o.push(("device".into(), toml_string(d)));
        }
        if let Some(t) = self.threads {
            o.push(("threads".into(), t.to_string()));
        }
        if let Some(r) = &self.record_dir {
            o.push(("record_dir".into(), toml_string(r.display())));
        }
        o.extend(self.overrides.iter().cloned());
        Ok(o)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Sub::Predict {
        model,
        images,
        top,
        batch,
        json,
        repeat,
        threads,
    }) = &cli.command
    {
        if *threads > 0 {
            tch::set_num_threads(*threads as i32);
        }
        let classifier = fedge_learn::export::Classifier::load(model)?;
        if let Some(n) = repeat {
            let report = edge_node::latency(&classifier, images, *n)?;
            std::io::Write::write_all(&mut std::io::stdout().lock(), report.as_bytes())?;
            return Ok(());
        }
        let predictions = classifier.classify_files(images, *batch, *top)?;
        let mut text = String::new();
        for p in &predictions {
            if *json {
                text += &serde_json::to_string(p)?;
            } else {
                text += &format!("{}\t{}\t{:.4}", p.file.display(), p.class, p.probability);
                for (class, prob) in p.top.iter().skip(1) {
                    text += &format!("\t{class}\t{prob:.4}");
                }
            }
            text.push('\n');
        }
        std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?;
        return Ok(());
    }
    if let Some(Sub::Health { state_dir, max_age }) = &cli.command {
        let age = edge_node::health::check(state_dir, *max_age)?;
        let mut out = std::io::stdout().lock();
        std::io::Write::write_all(
            &mut out,
            format!("ok: heartbeat {:.1}s old\n", age.as_secs_f64()).as_bytes(),
        )?;
        return Ok(());
    }
    let mut cfg = NodeConfig::load(cli.config.as_deref(), &cli.overrides()?)?;
    if let Some(f) = cli.log_format {
        cfg.log_format = f;
    }
    fedge_common::telemetry::init(cfg.log_format, "info");
    edge_node::run(cfg, fedge_common::shutdown::signal()).await?;
    Ok(())
}
