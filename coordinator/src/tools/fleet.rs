//! A local fleet: this coordinator plus N `edge-node` processes on loopback,
//! each training on its own IID partition of the same data. It is the quick
//! way to try a configuration on one machine; every node is a real process
//! talking gRPC over TCP, exactly as on devices, and over mutual TLS with
//! a development CA unless the configuration brings its own certificates
//! or asks for plaintext (`security.insecure`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use crate::config::NodeAuth;
use crate::tools::pki::Pki;
use crate::tools::speeds::{NodeProfile, Slowdowns};
use crate::{CoordinatorConfig, Error, Result, RunSummary};
use fedge_common::config::toml_string;

/// How to start the nodes.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Number of edge-node processes.
    pub nodes: usize,
    /// The `edge-node` binary; defaults to the one beside this executable.
    pub node_bin: Option<PathBuf>,
    /// libtorch threads per node (0: cores divided among nodes, at least 1).
    pub node_threads: usize,
    /// `RUST_LOG` of the nodes (their logs go to `out_dir/logs/`).
    pub node_log: String,
    /// Settings passed to every node as `--set key=value` (partition scheme, say).
    pub node_overrides: Vec<(String, String)>,
    /// Robustness experiments: the first this many nodes get `adversary_overrides` too.
    pub adversaries: usize,
    /// Settings of the adversarial nodes (`adversary.kind`, `adversary.scale`).
    pub adversary_overrides: Vec<(String, String)>,
    /// How much slower than the machine each node trains (none: all at its speed).
    pub slowdowns: Option<Slowdowns>,
}

/// Finds the `edge-node` binary beside the running executable.
pub fn default_node_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("edge-node"), dir.join("../edge-node")]
        .into_iter()
        .find(|p| p.is_file())
}

/// Runs `config` with a local fleet of `opts.nodes` edge nodes.
pub async fn run_fleet(
    mut config: CoordinatorConfig,
    opts: FleetOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Option<RunSummary>> {
    if opts.nodes == 0 {
        return Err(Error::Fleet("a fleet needs at least one node".into()));
    }
    let bin = opts.node_bin.clone().or_else(default_node_bin).ok_or_else(|| {
        Error::Fleet("edge-node binary not found beside the coordinator; build it (cargo build --release -p edge-node) or pass --node-bin".into())
    })?;
    if !bin.is_file() {
        return Err(Error::Fleet(format!(
            "edge-node binary {} does not exist",
            bin.display()
        )));
    }
    let profiles = match &opts.slowdowns {
        Some(s) => s.profiles(opts.nodes)?,
        None => vec![NodeProfile::default(); opts.nodes],
    };
    // A fleet smaller than the configured minimum could never start a round.
    config.sampling.min_nodes = config.sampling.min_nodes.min(opts.nodes as u32);
    config.sampling.min_available = config.sampling.min_available.min(opts.nodes as u32);
    let pki = secure_by_default(&mut config, opts.nodes)?;
    config.validate()?;

    let listener = TcpListener::bind(config.listen).await.map_err(|e| Error::Io {
        context: format!("binding {}", config.listen),
        source: e,
    })?;
    let addr = listener.local_addr().map_err(|e| Error::Io {
        context: "reading the listen address".into(),
        source: e,
    })?;
    let logs = config.out_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| Error::Io {
        context: format!("creating {}", logs.display()),
        source: e,
    })?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = if opts.node_threads > 0 {
        opts.node_threads
    } else {
        (cores / opts.nodes).max(1)
    };
    if opts.slowdowns.is_some() {
        let shown: Vec<String> = profiles.iter().map(|p| format!("{:.2}", p.slowdown)).collect();
        tracing::info!(slowdowns = %shown.join(" "), "nodes train this many times slower than the machine (node-1 first)");
        let cycling = profiles.iter().filter(|p| p.availability.is_some()).count();
        if cycling > 0 {
            tracing::info!(nodes = cycling, "nodes come and go as the trace's windows say");
        }
    }
    let mut children = Vec::with_capacity(opts.nodes);
    for (i, profile) in profiles.iter().enumerate() {
        children.push(spawn_node(
            &bin,
            &config,
            pki.as_ref(),
            addr.port(),
            i,
            opts.nodes,
            threads,
            profile,
            &opts,
            &logs,
        )?);
    }
    tracing::info!(
        nodes = opts.nodes,
        threads_per_node = threads,
        logs = %logs.display(),
        "local fleet started"
    );
    let outcome = crate::run(config, listener, shutdown).await;
    // Nodes stop on their own after the run's stop instruction; give them a moment.
    for (i, child) in children.iter_mut().enumerate() {
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => tracing::warn!(node = i + 1, %status, "edge node exited with an error; see its log"),
            _ => {
                let _ = child.kill().await;
            }
        }
    }
    outcome
}

/// Unless the configuration says otherwise (its own certificates, or
/// `security.insecure`), a local fleet runs with mutual TLS: a development
/// CA and per-node certificates under `out_dir/pki` (kept for a resumed run),
/// and an allow-list of the fleet's node names; with `http.listen`, the
/// PKI's operator opens the HTTP side.
fn secure_by_default(config: &mut CoordinatorConfig, nodes: usize) -> Result<Option<Pki>> {
    let sec = &mut config.security;
    if sec.insecure || sec.tls_cert.is_some() {
        return Ok(None);
    }
    let names: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
    let dir = config.out_dir.join("pki");
    let existing = Pki::at(&dir, &names);
    let complete = existing.ca.is_file()
        && existing.server_key.is_file()
        && existing.operators.is_file()
        && existing.nodes.iter().all(|(_, d)| d.join("key.pem").is_file());
    let pki = if complete {
        existing
    } else {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::Io {
                context: format!("removing {}", dir.display()),
                source: e,
            })?;
        }
        crate::tools::pki::generate(&dir, &["localhost".into(), "127.0.0.1".into()], &names)?
    };
    sec.tls_cert = Some(pki.server_cert.clone());
    sec.tls_key = Some(pki.server_key.clone());
    sec.client_ca = Some(pki.ca.clone());
    sec.node_auth = NodeAuth::Certificate;
    sec.allow = names;
    tracing::info!(pki = %dir.display(), "local fleet secured with mutual TLS (development CA)");
    if let Some(addr) = config.http.listen
        && config.http.operators.is_none()
        && !config.http.insecure
    {
        config.http.operators = Some(pki.operators.clone());
        tracing::info!(
            token = %pki.operator.join("token").display(),
            ca = %pki.ca.display(),
            "dashboard at https://localhost:{}/#token=<operator token> (the token file, signed by the ca)",
            addr.port()
        );
    }
    Ok(Some(pki))
}

#[allow(clippy::too_many_arguments)]
fn spawn_node(
    bin: &Path,
    config: &CoordinatorConfig,
    pki: Option<&Pki>,
    port: u16,
    index: usize,
    count: usize,
    threads: usize,
    profile: &NodeProfile,
    opts: &FleetOptions,
    logs: &Path,
) -> Result<Child> {
    let name = format!("node-{}", index + 1);
    let log_path = logs.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).map_err(|e| Error::Io {
        context: format!("creating {}", log_path.display()),
        source: e,
    })?;
    let mut cmd = Command::new(bin);
    if config.security.insecure {
        cmd.arg("--coordinator")
            .arg(format!("http://127.0.0.1:{port}"))
            .args(["--set", "security.insecure=true"]);
    } else {
        cmd.arg("--coordinator").arg(format!("https://localhost:{port}"));
    }
    if let Some(folder) = pki.and_then(|p| p.nodes.get(index)).map(|(_, f)| f) {
        for (key, file) in [("ca", "ca.pem"), ("cert", "cert.pem"), ("key", "key.pem")] {
            cmd.arg("--set")
                .arg(format!("security.{key}={}", toml_string(folder.join(file).display())));
        }
    }
    cmd.arg("--name")
        .arg(&name)
        .arg("--partition")
        .arg(format!("{index}/{count}"))
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--set")
        .arg(format!("partition.seed={}", config.seed))
        .arg("--set")
        .arg(format!("data.synthetic_seed={}", config.data.synthetic_seed))
        .arg("--set")
        .arg(format!(
            "data.synthetic_train_samples={}",
            config.data.synthetic_train_samples
        ));
    if let Some(p) = config.data.path.as_deref().filter(|p| !p.as_os_str().is_empty()) {
        cmd.arg("--data-path").arg(p);
    }
    // Each node keeps its algorithm state (SCAFFOLD's control variate) beside the run.
    let state = config.out_dir.join("nodes").join(&name);
    cmd.arg("--set")
        .arg(format!("state_dir={}", toml_string(state.display())));
    for (k, v) in profile.settings() {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    for (k, v) in &opts.node_overrides {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    if index < opts.adversaries {
        for (k, v) in &opts.adversary_overrides {
            cmd.arg("--set").arg(format!("{k}={v}"));
        }
    }
    cmd.env("RUST_LOG", &opts.node_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    cmd.spawn().map_err(|e| Error::Io {
        context: format!("starting {}", bin.display()),
        source: e,
    })
}
