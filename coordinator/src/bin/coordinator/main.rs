//! `coordinator`: serve a federated training run, or run one with a local
//! fleet, a simulation or the centralized baseline; make certificates,
//! split data, ask a running coordinator. One module per subcommand.

mod args;
mod baseline;
mod certs;
mod fleet;
mod health;
mod partition;
mod serve;
mod simulate;
mod slowdowns;
mod status;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::args::ConfigArgs;

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
    Fleet(fleet::FleetArgs),
    /// Simulate a fleet in this process: `simulation.nodes` virtual nodes, each with a share of
    /// data.path's training split, trained by a pool of threads with the edge node's code.
    Simulate(simulate::SimulateArgs),
    /// Split a data set into per-node folders (for fleets whose nodes each mount only their own data).
    Partition(partition::PartitionArgs),
    /// Make a development CA, the coordinator's certificate, and a certificate and token per node.
    Certs(certs::CertsArgs),
    /// Print how much slower than the machine each node of a fleet trains, as a node,slowdown trace.
    Slowdowns(slowdowns::SlowdownsArgs),
    /// Check a running coordinator's HTTP health endpoint (exit status 0 when healthy).
    Health(health::HealthArgs),
    /// Show a running coordinator's run: phase, rounds, nodes, accuracy (from its HTTP API).
    Status(status::StatusArgs),
    /// Train the same model centrally in this process (the floor a federated run is compared with).
    Baseline(baseline::BaselineArgs),
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
    match Cli::parse().command {
        Cmd::Serve(args) => serve::run(args).await,
        Cmd::Fleet(args) => fleet::run(args).await,
        Cmd::Simulate(args) => simulate::run(args).await,
        Cmd::Partition(args) => partition::run(args).await,
        Cmd::Certs(args) => certs::run(args).await,
        Cmd::Slowdowns(args) => slowdowns::run(args).await,
        Cmd::Health(args) => health::run(args).await,
        Cmd::Status(args) => status::run(args).await,
        Cmd::Baseline(args) => baseline::run(args).await,
    }
}
