//! Chaos tests across containers: the docker compose fleet of
//! `docker-compose.yml` (a coordinator and four edge nodes, each mounting only
//! its own partition and certificate, mutual TLS between them) trains on the
//! synthetic set while a node is SIGKILLed mid-round, a node is cut off the
//! network and reconnected, the coordinator is SIGKILLed (Docker restarts it
//! and it resumes from its checkpoint), and the fleet is stopped with SIGTERM
//! and started again. Each run must reach its last round with every completed
//! round in `run.json` exactly once, and end within noise of an undisturbed run.
//!
//! Needs Docker with docker-compose (or `docker compose`) and the fedge images
//! (`scripts/docker-build.sh`; `scripts/test.sh` builds them when Docker is
//! there). Where Docker is not reachable, or `FEDGE_CHAOS=0`, each test says
//! so and passes; where Docker is but the images are missing, the tests fail.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedge_tests::{free_port, participant, run_history};
use serde_json::Value;

const ROUNDS: u64 = 6;
/// The partition test's run: rounds close without a node that went quiet
/// (the straggler cutoff), so six of them can end before its connection
/// recovers; twelve leave it rounds to come back to.
const PARTITION_ROUNDS: u64 = 12;
const NODES: usize = 4;
/// Final accuracies of disturbed runs stay this close to the undisturbed one
/// (the synthetic set ends near 99%; runs differ by a few tenths).
const NOISE: f64 = 0.05;

/// One fleet at a time: each already fills both cores.
static ONE_FLEET: Mutex<()> = Mutex::new(());
static BASELINE: OnceLock<f64> = OnceLock::new();

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `docker compose` (v2) when present, else `docker-compose` (v1); `None`
/// (with the reason) when Docker is not usable here.
fn compose_command() -> std::result::Result<Vec<&'static str>, String> {
    static FOUND: OnceLock<std::result::Result<Vec<&'static str>, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let ok =
                |prog: &str, args: &[&str]| Command::new(prog).args(args).output().is_ok_and(|o| o.status.success());
            if !ok("docker", &["info", "--format", "{{.ServerVersion}}"]) {
                return Err("no reachable Docker engine (`docker info` failed)".into());
            }
            if ok("docker", &["compose", "version"]) {
                Ok(vec!["docker", "compose"])
            } else if ok("docker-compose", &["version"]) {
                Ok(vec!["docker-compose"])
            } else {
                Err("Docker is here but neither `docker compose` nor `docker-compose` is".into())
            }
        })
        .clone()
}

/// Runs `f` with a fleet lock held, or explains why the test is skipped.
fn with_docker(test: &str, f: impl FnOnce() -> Result<()>) {
    if std::env::var("FEDGE_CHAOS").is_ok_and(|v| v == "0") {
        eprintln!("skipping chaos test {test}: FEDGE_CHAOS=0");
        return;
    }
    if let Err(why) = compose_command() {
        eprintln!("skipping chaos test {test}: {why}");
        return;
    }
    for image in ["fedge/coordinator:latest", "fedge/edge-node:latest"] {
        let present = Command::new("docker")
            .args(["image", "inspect", image])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(present, "image {image} is missing: run scripts/docker-build.sh first");
    }
    let _one = ONE_FLEET.lock().unwrap_or_else(|e| e.into_inner());
    f().unwrap_or_else(|e| panic!("{test}: {e:#}"));
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One compose project in a temporary folder of its own.
struct Fleet {
    project: String,
    dir: tempfile::TempDir,
    http_port: u16,
    rounds: u64,
}

impl Fleet {
    /// Prepares data, certificates and settings with `scripts/compose-prepare.sh`.
    fn prepare(name: &str) -> Result<Self> {
        Self::with_rounds(name, ROUNDS)
    }

    /// [`Fleet::prepare`] for a run of `rounds` rounds.
    fn with_rounds(name: &str, rounds: u64) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fedge-chaos-").tempdir()?;
        let http_port = free_port();
        let grpc_port = free_port();
        run(Command::new("bash")
            .arg(repo().join("scripts/compose-prepare.sh"))
            .env("FEDGE_FLEET_DIR", dir.path().join("fleet"))
            .env("FEDGE_ENV_FILE", dir.path().join(".env"))
            .env("FEDGE_OVERRIDE_FILE", dir.path().join("override.yml"))
            .env("FEDGE_NODES", NODES.to_string())
            .env("FEDGE_ROUNDS", rounds.to_string())
            .env("FEDGE_GRPC_PORT", grpc_port.to_string())
            .env("FEDGE_HTTP_PORT", http_port.to_string()))?;
        // Rounds wait at most 20 s for a node that went quiet.
        std::fs::write(
            dir.path().join("chaos.yml"),
            "services:\n  coordinator:\n    environment:\n      FEDGE_SAMPLING__ROUND_DEADLINE: 20s\n",
        )?;
        Ok(Self {
            project: format!("fedge-chaos-{name}-{}", std::process::id()),
            dir,
            http_port,
            rounds,
        })
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("fleet/run")
    }

    fn compose(&self, args: &[&str]) -> Result<Output> {
        let prog = compose_command().map_err(anyhow::Error::msg)?;
        let mut cmd = Command::new(prog[0]);
        cmd.args(&prog[1..])
            .arg("--project-name")
            .arg(&self.project)
            .arg("--env-file")
            .arg(self.dir.path().join(".env"))
            .arg("--file")
            .arg(repo().join("docker-compose.yml"))
            .arg("--file")
            .arg(self.dir.path().join("chaos.yml"))
            .args(args)
            .current_dir(repo());
        run(&mut cmd)
    }

    fn up(&self) -> Result<()> {
        self.compose(&["up", "--detach"]).map(drop)
    }

    fn container(&self, service: &str) -> Result<String> {
        let id = text(
            &self
                .compose(&["ps", "--all", "-q", service])
                .or_else(|_| self.compose(&["ps", "-q", service]))?,
        );
        if id.is_empty() {
            bail!("no container for service {service}");
        }
        Ok(id)
    }

    fn inspect(&self, service: &str, format: &str) -> Result<String> {
        let id = self.container(service)?;
        Ok(text(&run(Command::new("docker").args(["inspect", "-f", format, &id]))?))
    }

    /// SIGKILLs the service's main process from the host, as a crash would:
    /// Docker sees it die (not a `docker stop`) and applies the restart policy.
    fn crash(&self, service: &str) -> Result<()> {
        let pid = self.inspect(service, "{{.State.Pid}}")?;
        if pid == "0" {
            bail!("{service} is not running");
        }
        run(Command::new("kill").args(["-KILL", &pid])).map(drop)
    }

    fn network_and_id(&self, service: &str) -> Result<(String, String)> {
        let nets = self.inspect(service, "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}")?;
        let net = nets
            .split_whitespace()
            .next()
            .context("container on no network")?
            .to_string();
        Ok((net, self.container(service)?))
    }

    /// `/api/status` of the coordinator, when it answers.
    fn status(&self) -> Option<Value> {
        // The HTTP side is as safe as gRPC: HTTPS, for operators only.
        let pki = self.dir.path().join("fleet/pki");
        let opts = coordinator::api::http::ClientOptions {
            ca: Some(pki.join("ca.pem")),
            token: fedge_common::security::read_token_file(&pki.join("operator/token")).ok(),
            ..coordinator::api::http::ClientOptions::plain(Duration::from_secs(2))
        };
        let url = format!("https://127.0.0.1:{}/api/status", self.http_port);
        let body = coordinator::api::http::check(&url, &opts).ok()?;
        serde_json::from_str(&body).ok()
    }

    fn wait_status(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(s) = self.status().filter(|s| pred(s)) {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("waited {timeout:?} for {what}; last status {:?}", self.status())
    }

    /// Waits until the coordinator's container exits, then returns `run.json`.
    fn wait_finished(&self, timeout: Duration) -> Result<Value> {
        let start = Instant::now();
        loop {
            let state = self.inspect("coordinator", "{{.State.Status}} {{.State.ExitCode}}")?;
            if state == "exited 0" {
                break;
            }
            if start.elapsed() > timeout {
                bail!("the coordinator did not finish within {timeout:?} (state {state})");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        run_history(&self.run_dir())
    }

    fn logs(&self, service: &str) -> String {
        self.compose(&["logs", "--no-color", service])
            .map(|o| text(&o))
            .unwrap_or_default()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.compose(&["logs", "--no-color", "--tail", "40"]).map(|o| text(&o));
            eprintln!("--- logs of {} ---\n{}", self.project, logs.unwrap_or_default());
        }
        let _ = self.compose(&["down", "--volumes", "--remove-orphans", "--timeout", "5"]);
    }
}

/// Rounds `1..=total` each exactly once, the run finished; returns the final accuracy.
fn check_complete(history: &Value, total: u64) -> Result<f64> {
    let rounds: Vec<u64> = history["rounds"]
        .as_array()
        .context("run.json without rounds")?
        .iter()
        .filter_map(|r| r["round"].as_u64())
        .collect();
    if rounds != (1..=total).collect::<Vec<_>>() {
        bail!("run.json lists rounds {rounds:?}, expected each of 1..={total} once");
    }
    if history["finished"] != Value::Bool(true) {
        bail!("run.json does not say the run finished");
    }
    history["rounds"][total as usize - 1]["test_accuracy"]
        .as_f64()
        .context("last round without test accuracy")
}

/// Rounds after `after` in which `node` took part.
fn rounds_with(history: &Value, node: &str, after: u64) -> BTreeSet<u64> {
    history["rounds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["round"].as_u64().is_some_and(|n| n > after))
        .filter(|r| participant(r, node).is_some())
        .filter_map(|r| r["round"].as_u64())
        .collect()
}

/// Final accuracy of an undisturbed run, measured once per test process.
fn baseline() -> Result<f64> {
    if let Some(a) = BASELINE.get() {
        return Ok(*a);
    }
    let fleet = Fleet::prepare("baseline")?;
    fleet.up()?;
    // While it trains, the commands behind the images' health checks pass.
    fleet.wait_status("round 1", Duration::from_secs(120), |s| s["round"].as_u64() >= Some(1))?;
    for (service, check) in [
        (
            "coordinator",
            vec!["coordinator", "health", "--config", "/etc/fedge/coordinator.toml"],
        ),
        ("node-1", vec!["edge-node", "health"]),
    ] {
        let id = fleet.container(service)?;
        let out = run(Command::new("docker").arg("exec").arg(&id).args(&check))?;
        assert!(text(&out).starts_with("ok"), "{service} health: {}", text(&out));
    }
    let history = fleet.wait_finished(Duration::from_secs(300))?;
    let acc = check_complete(&history, fleet.rounds)?;
    let nodes: BTreeSet<String> = history["rounds"][0]["participants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["node"].as_str().map(str::to_string))
        .collect();
    assert_eq!(nodes.len(), NODES, "round 1 participants {nodes:?}");
    for i in 1..=NODES {
        let state = fleet.inspect(&format!("node-{i}"), "{{.State.Status}} {{.State.ExitCode}}")?;
        assert_eq!(state, "exited 0", "node-{i} after the run");
    }
    assert!(
        fleet.run_dir().join("model.safetensors").is_file(),
        "no final model in the host folder"
    );
    eprintln!("undisturbed compose run: final accuracy {acc:.4}");
    Ok(*BASELINE.get_or_init(|| acc))
}

fn assert_within_noise(acc: f64) -> Result<()> {
    let base = baseline()?;
    if (acc - base).abs() > NOISE {
        bail!("final accuracy {acc:.4} is not within {NOISE} of the undisturbed run's {base:.4}");
    }
    Ok(())
}

#[test]
fn undisturbed_compose_run_trains_to_the_end() {
    with_docker("undisturbed", || baseline().map(drop));
}

#[test]
fn node_killed_mid_round() {
    with_docker("node_killed_mid_round", || {
        let fleet = Fleet::prepare("node-kill")?;
        fleet.up()?;
        let s = fleet.wait_status("round 2 training", Duration::from_secs(180), |s| {
            s["round"].as_u64() == Some(2) && s["phase"] == "training"
        })?;
        eprintln!("killing node-3 during {s}");
        fleet.crash("node-3")?;
        let history = fleet.wait_finished(Duration::from_secs(300))?;
        let acc = check_complete(&history, fleet.rounds)?;
        let restarts: u64 = fleet.inspect("node-3", "{{.RestartCount}}")?.parse()?;
        assert!(restarts >= 1, "docker did not restart node-3");
        let later = rounds_with(&history, "node-3", 2);
        assert!(!later.is_empty(), "node-3 took part in no round after its restart");
        eprintln!("node-3 restarted {restarts}x, back in rounds {later:?}; accuracy {acc:.4}");
        assert_within_noise(acc)
    });
}

#[test]
fn node_cut_off_the_network_and_reconnected() {
    with_docker("node_cut_off_the_network", || {
        let fleet = Fleet::with_rounds("partition", PARTITION_ROUNDS)?;
        fleet.up()?;
        fleet.wait_status("round 2 training", Duration::from_secs(180), |s| {
            s["round"].as_u64() == Some(2) && s["phase"] == "training"
        })?;
        let (net, id) = fleet.network_and_id("node-2")?;
        run(Command::new("docker").args(["network", "disconnect", &net, &id]))?;
        eprintln!("node-2 disconnected from {net}");
        std::thread::sleep(Duration::from_secs(15));
        run(Command::new("docker").args(["network", "connect", &net, &id]))?;
        let reconnected = fleet.status().and_then(|s| s["completed_rounds"].as_u64()).unwrap_or(0);
        eprintln!("node-2 reconnected after round {reconnected}");
        let history = fleet.wait_finished(Duration::from_secs(300))?;
        let acc = check_complete(&history, fleet.rounds)?;
        let later = rounds_with(&history, "node-2", reconnected);
        assert!(
            !later.is_empty(),
            "node-2 took part in no round after reconnecting:\n{}",
            fleet.logs("node-2")
        );
        eprintln!("node-2 back in rounds {later:?}; accuracy {acc:.4}");
        assert_within_noise(acc)
    });
}

#[test]
fn coordinator_killed_and_restarted() {
    with_docker("coordinator_killed", || {
        let fleet = Fleet::prepare("coordinator-kill")?;
        fleet.up()?;
        let s = fleet.wait_status("round 3 training", Duration::from_secs(180), |s| {
            s["completed_rounds"].as_u64() >= Some(2) && s["phase"] == "training"
        })?;
        let done_before = s["completed_rounds"].as_u64().unwrap();
        eprintln!("killing the coordinator during {s}");
        fleet.crash("coordinator")?;
        let history = fleet.wait_finished(Duration::from_secs(300))?;
        let acc = check_complete(&history, fleet.rounds)?;
        let restarts: u64 = fleet.inspect("coordinator", "{{.RestartCount}}")?.parse()?;
        assert!(restarts >= 1, "docker did not restart the coordinator");
        assert!(
            history["resumed"].as_u64() >= Some(1),
            "run.json does not record a resume"
        );
        let logs = fleet.logs("coordinator");
        assert!(
            logs.contains("resum"),
            "the restarted coordinator does not say it resumed:\n{logs}"
        );
        eprintln!("coordinator restarted {restarts}x after round {done_before}; accuracy {acc:.4}");
        assert_within_noise(acc)
    });
}

#[test]
fn fleet_stopped_with_sigterm_and_started_again() {
    with_docker("stop_and_start", || {
        let fleet = Fleet::prepare("stop-start")?;
        fleet.up()?;
        fleet.wait_status("round 3", Duration::from_secs(180), |s| {
            s["completed_rounds"].as_u64() >= Some(2)
        })?;
        let started = Instant::now();
        fleet.compose(&["stop", "--timeout", "30"])?;
        let took = started.elapsed();
        // SIGTERM, not the SIGKILL after the grace period: every container exits 0.
        for service in ["coordinator", "node-1", "node-2", "node-3", "node-4"] {
            let state = fleet.inspect(service, "{{.State.Status}} {{.State.ExitCode}}")?;
            assert_eq!(state, "exited 0", "{service} after docker stop ({took:?})");
        }
        let logs = fleet.logs("coordinator");
        assert!(logs.contains("shutdown requested"), "{logs}");
        let kept = run_history(&fleet.run_dir())?["rounds"].as_array().map_or(0, Vec::len);
        assert!(kept >= 2, "run.json kept {kept} rounds");
        fleet.compose(&["start"])?;
        let history = fleet.wait_finished(Duration::from_secs(300))?;
        let acc = check_complete(&history, fleet.rounds)?;
        eprintln!("stopped in {took:?} after {kept} rounds, resumed; accuracy {acc:.4}");
        assert_within_noise(acc)
    });
}

/// The configuration compose reads from `docker-compose.yml` with the
/// `.env` and `override.yml` that compose-prepare.sh wrote into `dir`.
fn compose_config(dir: &std::path::Path) -> Result<String> {
    let prog = compose_command().map_err(anyhow::Error::msg)?;
    let config = run(Command::new(prog[0])
        .args(&prog[1..])
        .arg("--env-file")
        .arg(dir.join(".env"))
        .arg("--file")
        .arg(repo().join("docker-compose.yml"))
        .arg("--file")
        .arg(dir.join("override.yml"))
        .arg("config")
        .current_dir(repo()))?;
    Ok(text(&config))
}

#[test]
fn compose_prepare_carries_a_traces_availability_and_the_asynchronous_mode() {
    with_docker("compose_availability", || {
        let dir = tempfile::Builder::new().prefix("fedge-chaos-").tempdir()?;
        let trace = dir.path().join("speeds.csv");
        std::fs::write(
            &trace,
            "node,slowdown,online,offline,offset\nnode-2,3,30s,1m\nnode-3,8,20s,20s,5s\n",
        )?;
        run(Command::new("bash")
            .arg(repo().join("scripts/compose-prepare.sh"))
            .env("FEDGE_FLEET_DIR", dir.path().join("fleet"))
            .env("FEDGE_ENV_FILE", dir.path().join(".env"))
            .env("FEDGE_OVERRIDE_FILE", dir.path().join("override.yml"))
            .env("FEDGE_NODES", "4")
            .env("FEDGE_MIN_AVAILABLE", "2")
            .env("FEDGE_ASYNC", "1")
            .env("FEDGE_SLOWDOWNS", &trace))?;
        let env = std::fs::read_to_string(dir.path().join(".env"))?;
        assert!(
            env.contains("FEDGE_ASYNC=true\n") && env.contains("FEDGE_MIN_AVAILABLE=2\n"),
            "{env}"
        );
        let config = compose_config(dir.path())?;
        // Compose hands the coordinator the mode and each node its windows.
        for (key, count) in [
            ("FEDGE_ASYNC__ENABLED: 'true'", 1),
            ("FEDGE_SAMPLING__MIN_AVAILABLE: '2'", 1),
            ("FEDGE_NODE_TRAIN__SLOWDOWN", 2),
            ("FEDGE_NODE_AVAILABILITY__ONLINE", 2),
            ("FEDGE_NODE_AVAILABILITY__OFFSET: 5s", 1),
        ] {
            // Compose quotes values with either quote.
            let other = key.replace('\'', "\"");
            let found = config.matches(key).count()
                + if other == key {
                    0
                } else {
                    config.matches(&other).count()
                };
            assert_eq!(found, count, "{key} in\n{config}");
        }
        Ok(())
    });
}

#[test]
fn compose_prepare_gives_each_node_its_slowdown() {
    with_docker("compose_slowdowns", || {
        let dir = tempfile::Builder::new().prefix("fedge-chaos-").tempdir()?;
        let out = run(Command::new("bash")
            .arg(repo().join("scripts/compose-prepare.sh"))
            .env("FEDGE_FLEET_DIR", dir.path().join("fleet"))
            .env("FEDGE_ENV_FILE", dir.path().join(".env"))
            .env("FEDGE_OVERRIDE_FILE", dir.path().join("override.yml"))
            .env("FEDGE_NODES", "4")
            .env("FEDGE_SLOWDOWNS", "lognormal:8"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("node slowdowns: "), "{log}");
        let override_file = std::fs::read_to_string(dir.path().join("override.yml"))?;
        let slowdowns: Vec<f64> = override_file
            .lines()
            .filter_map(|l| l.trim().strip_prefix("FEDGE_NODE_TRAIN__SLOWDOWN: "))
            .map(|v| v.trim_matches('"').parse().unwrap())
            .collect();
        // Four nodes from 1x to 8x: the fastest needs no setting.
        assert_eq!(slowdowns.len(), 3, "{override_file}");
        assert!(slowdowns.contains(&8.0), "{override_file}");
        assert!(slowdowns.iter().all(|s| (1.0..=8.0).contains(s)), "{override_file}");
        // Compose reads the files and hands each slowed node its setting.
        let config = compose_config(dir.path())?;
        assert_eq!(config.matches("FEDGE_NODE_TRAIN__SLOWDOWN").count(), 3, "{config}");
        Ok(())
    });
}
