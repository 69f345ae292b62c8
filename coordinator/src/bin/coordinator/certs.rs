//! `coordinator certs`: a development CA, the coordinator's certificate, and a certificate and token per node.

use std::path::PathBuf;

use clap::Args;
use fedge_common::config::LogFormat;

/// The flags of `coordinator certs`.
#[derive(Args)]
pub(crate) struct CertsArgs {
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
}

/// Runs `coordinator certs` with `args`.
pub(crate) async fn run(args: CertsArgs) -> anyhow::Result<()> {
    let CertsArgs {
        out,
        add,
        names,
        nodes,
        hosts,
    } = args;
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
    Ok(())
}
