//! Test harness for fedge's integration tests: builds the real `coordinator`
//! and `edge-node` binaries, starts them as processes on loopback ports,
//! waits for them, and reads what they leave on disk.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod raw;

use anyhow::{Context, Result, bail};
use fedge_common::params::{LoadedParams, load_safetensors};
use fedge_common::pb::federation_client::FederationClient;

/// The folder holding the `coordinator` and `edge-node` binaries of this
/// build profile, built (or brought up to date) once per test process.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target profile dir")
            .to_path_buf();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", "coordinator", "-p", "edge-node", "--bins"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if let Some(target) = dir.parent() {
            cmd.arg("--target-dir").arg(target);
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building the daemons failed");
        dir
    })
}

/// A free loopback port (bound and released; the daemons bind it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A command for one of the daemons, with no `FEDGE_*` variables from the
/// caller's environment (tests configure the daemons explicitly; the
/// caller's may hold `FEDGE_CHAOS` and the like, meant for the tests).
pub fn daemon_command(bin: &str) -> Command {
    let mut cmd = Command::new(bin_dir().join(bin));
    for (k, _) in std::env::vars() {
        if k.starts_with("FEDGE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("NO_COLOR", "1").stdin(Stdio::null());
    cmd
}

/// A running daemon whose stderr goes to a log file.
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `bin` with `args`, logging to `dir/<name>.log`.
    pub fn start(bin: &str, name: &str, args: &[String], dir: &Path) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = daemon_command(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        Ok(Self {
            name: name.into(),
            child,
            log,
        })
    }

    /// Waits for exit, failing after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!(
                    "{} did not exit within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a binary to completion and returns (exit status, stderr).
pub fn run_to_end(bin: &str, args: &[&str]) -> Result<(ExitStatus, String)> {
    let out = daemon_command(bin).args(args).output()?;
    Ok((out.status, String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// Reads a safetensors file written by the daemons.
pub fn load_params(path: &Path) -> Result<LoadedParams> {
    load_safetensors(path).with_context(|| format!("reading {}", path.display()))
}

/// How far round `round`'s committed model (run folder `out`) is from the
/// model before it moved by the plain mean of the deltas the nodes in
/// `sent` (their `record_dir`s) recorded sending: the largest difference
/// over the values.
pub fn off_the_mean(out: &Path, round: u64, sent: &[PathBuf]) -> Result<f64> {
    let model = |r: u64| load_params(&out.join(format!("rounds/round-{r:04}.safetensors")));
    let (before, after) = (model(round - 1)?, model(round)?);
    let mut sum = vec![0f64; before.values.len()];
    for dir in sent {
        let delta = load_params(&dir.join(format!("round-{round:04}.safetensors")))?;
        for (s, v) in sum.iter_mut().zip(&delta.values) {
            *s += f64::from(*v);
        }
    }
    let n = sent.len() as f64;
    Ok(before
        .values
        .iter()
        .zip(&after.values)
        .zip(&sum)
        .map(|((b, a), s)| (f64::from(*a) - f64::from(*b) - s / n).abs())
        .fold(0.0, f64::max))
}

/// One quantization step of a secure round, from its `secure_aggregation`
/// record in `run.json`.
pub fn quantization_step(secure: &serde_json::Value) -> Result<f64> {
    let bits = secure["bits"].as_u64().context("the record has no bits")? as i32;
    let range = secure["range"].as_f64().context("the record has no range")?;
    Ok(2.0 * range / (2f64.powi(bits) - 1.0))
}

/// `run.json` of a run folder.
pub fn run_history(out_dir: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(out_dir.join("run.json"))?;
    Ok(serde_json::from_str(&text)?)
}

/// Metadata value of a loaded parameter file, parsed.
pub fn meta_u64(p: &LoadedParams, key: &str) -> u64 {
    p.metadata
        .get(key)
        .unwrap_or_else(|| panic!("metadata key {key} missing"))
        .parse()
        .unwrap()
}

/// `k=v` pairs as `--set` arguments.
pub fn sets(pairs: &[(&str, String)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(k, v)| ["--set".to_string(), format!("{k}={v}")])
        .collect()
}

/// Arguments of `coordinator serve` on loopback `port`, writing to `out`.
pub fn coordinator_args(port: u16, out: &Path, extra: &[(&str, String)]) -> Vec<String> {
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--out-dir".into(),
        out.display().to_string(),
        // Plaintext on loopback; tests/tests/security.rs runs TLS.
        "--set".into(),
        "security.insecure=true".into(),
    ];
    args.extend(sets(extra));
    args
}

/// Arguments of an edge node on loopback `port` training on `partition` ("i/n").
pub fn node_args(port: u16, name: &str, partition: &str, extra: &[(&str, String)]) -> Vec<String> {
    let mut args = vec![
        "--coordinator".to_string(),
        format!("http://127.0.0.1:{port}"),
        "--name".into(),
        name.into(),
        "--partition".into(),
        partition.into(),
        "--threads".into(),
        "1".into(),
        "--set".into(),
        "reconnect.max=\"1s\"".into(),
        "--set".into(),
        "security.insecure=true".into(),
    ];
    args.extend(sets(extra));
    args
}

/// Starts edge nodes `node-1` … `node-{count}` against the coordinator on
/// loopback `port`, node `i` (from 0) on partition `i/of` with `settings(i)`.
pub fn start_nodes<'a>(
    dir: &Path,
    port: u16,
    count: usize,
    of: usize,
    settings: impl Fn(usize) -> Vec<(&'a str, String)>,
) -> Result<Vec<Daemon>> {
    (0..count)
        .map(|i| {
            let name = format!("node-{}", i + 1);
            Daemon::start(
                "edge-node",
                &name,
                &node_args(port, &name, &format!("{i}/{of}"), &settings(i)),
                dir,
            )
        })
        .collect()
}

/// A coordinator and `nodes` edge nodes on loopback, run to the end.
/// `node_extra(i)` gives node `i`'s own settings (besides `shared`, which
/// both sides get). Returns the run's `run.json`.
pub fn run_fleet(
    dir: &Path,
    out: &Path,
    nodes: usize,
    shared: &[(&str, String)],
    coordinator_extra: &[(&str, String)],
    node_extra: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> Result<serde_json::Value> {
    let port = free_port();
    let mut extra = coordinator_extra.to_vec();
    extra.extend(shared.iter().cloned());
    let mut coord = Daemon::start("coordinator", "coordinator", &coordinator_args(port, out, &extra), dir)?;
    let mut daemons = start_nodes(dir, port, nodes, nodes, |i| {
        let mut settings = shared.to_vec();
        settings.extend(node_extra(i));
        settings
    })?;
    let status = coord.wait(Duration::from_secs(300))?;
    if !status.success() {
        bail!("coordinator failed:\n{}", coord.log_text());
    }
    for n in &mut daemons {
        if !n.wait(Duration::from_secs(30))?.success() {
            bail!("{} failed:\n{}", n.name, n.log_text());
        }
    }
    run_history(out)
}

/// `node`'s record in a round of a run history, when it took part.
pub fn participant<'a>(round: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    round["participants"].as_array()?.iter().find(|p| p["node"] == node)
}

/// Central test accuracy after each round of a run history.
pub fn accuracies(history: &serde_json::Value) -> Vec<f64> {
    history["rounds"]
        .as_array()
        .map(|rounds| rounds.iter().filter_map(|r| r["test_accuracy"].as_f64()).collect())
        .unwrap_or_default()
}

/// A gRPC client to a plaintext coordinator on loopback `port`, waiting up
/// to 30 s for it to come up.
pub async fn plaintext_client(port: u16) -> FederationClient<tonic::transport::Channel> {
    for _ in 0..300 {
        if let Ok(c) = FederationClient::connect(format!("http://127.0.0.1:{port}")).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("coordinator did not come up on port {port}");
}
