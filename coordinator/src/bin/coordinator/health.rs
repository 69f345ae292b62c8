//! `coordinator health`: asks a running coordinator's HTTP health endpoint.

use std::path::PathBuf;

use clap::Args;
use coordinator::CoordinatorConfig;

use crate::args::ClientArgs;

/// The flags of `coordinator health`.
#[derive(Args)]
pub(crate) struct HealthArgs {
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
}

/// Runs `coordinator health` with `args`.
pub(crate) async fn run(args: HealthArgs) -> anyhow::Result<()> {
    let HealthArgs {
        url,
        config,
        client,
        timeout,
    } = args;
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
    Ok(())
}
