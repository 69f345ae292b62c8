//! What an operator sees of a real run (a coordinator and two edge-node
//! processes over TCP): the dashboard, loaded in headless Chromium while the
//! run trains, fills its accuracy chart and node table (a screenshot is
//! written to the target folder); `/metrics` counts rounds, bytes and update
//! latencies; `coordinator status` prints the run, its nodes and its rounds.
//! The HTTP side names an operator (`http.operators`): the page and the
//! command use its token (TLS on it is in `security.rs`).
//!
//! Chromium comes from Debian's `chromium` package (`.ci/run` installs it);
//! without it the dashboard test says so and passes.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedge_common::config::toml_string;
use fedge_tests::{Daemon, bin_dir, coordinator_args, daemon_command, free_port, node_args, run_fleet, start_nodes};
use serde_json::Value;

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A coordinator with its HTTP side on, and two nodes, for `rounds` rounds.
struct Run {
    _tmp: tempfile::TempDir,
    http: String,
    /// The operator's token file.
    token: PathBuf,
    coord: Daemon,
    nodes: Vec<Daemon>,
}

impl Run {
    fn start(rounds: u32, extra: &[(&'static str, String)]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let port = free_port();
        let http_port = free_port();
        let pki = coordinator::tools::pki::generate(&tmp.path().join("pki"), &["localhost".into()], &[])?;
        let small = || {
            vec![
                ("data.synthetic_train_samples", "1200".to_string()),
                ("data.synthetic_test_samples", "200".into()),
            ]
        };
        let mut settings = small();
        settings.extend([
            ("rounds", rounds.to_string()),
            ("http.listen", format!("\"127.0.0.1:{http_port}\"")),
            ("http.operators", toml_string(pki.operators.display())),
            ("eval.federated_every", "1".into()),
        ]);
        settings.extend(extra.iter().cloned());
        let coord = Daemon::start(
            "coordinator",
            "coordinator",
            &coordinator_args(port, &tmp.path().join("run"), &settings),
            tmp.path(),
        )?;
        let nodes = start_nodes(tmp.path(), port, 2, 2, |_| {
            let mut s = small();
            s.push(("holdout", "0.1".into()));
            s
        })?;
        Ok(Self {
            _tmp: tmp,
            http: format!("http://127.0.0.1:{http_port}"),
            token: pki.operator.join("token"),
            coord,
            nodes,
        })
    }

    fn get(&self, path: &str) -> Result<String> {
        let opts = coordinator::api::http::ClientOptions {
            token: Some(fedge_common::security::read_token_file(&self.token)?),
            ..coordinator::api::http::ClientOptions::plain(Duration::from_secs(5))
        };
        Ok(coordinator::api::http::check(&format!("{}{path}", self.http), &opts)?)
    }

    /// Waits until `/api/status` shows `rounds` completed rounds.
    fn wait_rounds(&self, rounds: u64) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(s) = self.get("/api/status")
                && let Ok(v) = serde_json::from_str::<Value>(&s)
                && v["completed_rounds"].as_u64() >= Some(rounds)
            {
                return Ok(v);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("no {rounds} completed rounds within 2 min:\n{}", self.coord.log_text())
    }

    fn finish(mut self) -> Result<()> {
        if !self.coord.wait(Duration::from_secs(120))?.success() {
            bail!("coordinator failed:\n{}", self.coord.log_text());
        }
        for n in &mut self.nodes {
            n.wait(Duration::from_secs(30))?;
        }
        Ok(())
    }
}

#[test]
fn the_dashboard_fills_during_a_real_run() -> Result<()> {
    if std::env::var("FEDGE_BROWSER").is_ok_and(|v| v == "0") {
        eprintln!("skipping the dashboard test: FEDGE_BROWSER=0");
        return Ok(());
    }
    let browser = chromium().context(
        "the dashboard test needs chromium (scripts/test.sh installs Debian's; FEDGE_BROWSER=0 skips the test)",
    )?;
    // With differential privacy (noise too small to matter here), the page shows ε.
    let run = Run::start(
        40,
        &[
            ("privacy.noise", "\"central\"".into()),
            ("privacy.noise_multiplier", "1e-6".into()),
            ("privacy.clip_norm", "100.0".into()),
        ],
    )?;
    run.wait_rounds(2)?;
    let token = fedge_common::security::read_token_file(&run.token)?;
    let headless = |extra: &[&str], fragment: &str| -> Result<String> {
        let out = Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1280,1100",
                "--virtual-time-budget=4000",
            ])
            .args(extra)
            .arg(format!("{}/{fragment}", run.http))
            .output()
            .context("running chromium")?;
        if !out.status.success() {
            bail!("chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Without the operator's token the page says what it needs.
    let refused = headless(&["--dump-dom"], "")?;
    assert!(
        refused.contains("not authorized (401)") && refused.contains("#token=&lt;operator token&gt;"),
        "the page without a token:\n{refused}"
    );
    let dom = headless(&["--dump-dom"], &format!("#token={token}"))?;
    let rows = dom.matches("<tr class=\"node\">").count();
    assert_eq!(rows, 2, "node table rows in the rendered page:\n{dom}");
    for node in ["node-1", "node-2"] {
        assert!(
            dom.contains(&format!("<td>{node}</td>")),
            "{node} missing from the node table"
        );
    }
    // Central and federated accuracy, central and federated loss, bytes up and down.
    let series = dom.matches("class=\"series\"").count();
    assert!(series >= 6, "{series} chart lines drawn:\n{dom}");
    assert!(dom.matches("class=\"point\"").count() >= 12, "chart points missing");
    assert!(
        dom.contains("<span id=\"error\"></span>"),
        "the page could not reach the API"
    );
    assert!(dom.contains("\"rounds\": 40"), "the run's configuration is not shown");
    assert!(
        dom.contains("ε spent (δ 0.00001, central noise z 0.000001"),
        "the privacy spent is not shown:\n{dom}"
    );

    let shot: PathBuf = bin_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    headless(
        &[&format!("--screenshot={}", shot.display())],
        &format!("#token={token}"),
    )?;
    let png = std::fs::read(&shot).context("no screenshot written")?;
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "screenshot of {} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    drop(run);
    Ok(())
}

#[test]
fn metrics_and_the_status_command_describe_the_run() -> Result<()> {
    // Enough rounds that the run is still going when the last command asks.
    let run = Run::start(12, &[])?;
    let status = run.wait_rounds(2)?;
    assert_eq!(status["total_rounds"], 12);
    assert_eq!(status["nodes"].as_array().map(Vec::len), Some(2));

    let metrics = run.get("/metrics")?;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert!(value("fedge_rounds_completed") >= 2.0);
    assert_eq!(value("fedge_total_rounds"), 12.0);
    assert!(
        value("fedge_received_bytes_total") > 1e6,
        "two rounds of two 640 kB updates"
    );
    assert!(value("fedge_updates_accepted_total") >= 4.0);
    assert!(value("fedge_update_latency_seconds_count") >= 4.0);
    assert!(value("fedge_round_duration_seconds_count") >= 2.0);
    assert!((0.0..=1.0).contains(&value("fedge_test_accuracy")));
    assert!(metrics.contains("# TYPE fedge_aggregation_duration_seconds histogram"));

    let token_file = run.token.display().to_string();
    let refused = daemon_command("coordinator")
        .args(["status", "--url", &run.http])
        .output()?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("401 Unauthorized"), "{err}");
    let out = daemon_command("coordinator")
        .args(["status", "--url", &run.http, "--token-file", &token_file])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("run run-"), "{text}");
    assert!(text.contains("round") && text.contains("/12"), "{text}");
    for node in ["node-1", "node-2"] {
        assert!(text.lines().any(|l| l.starts_with(node)), "{node} missing:\n{text}");
    }
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("1 ")),
        "round 1 missing:\n{text}"
    );
    let json = daemon_command("coordinator")
        .args(["status", "--json", "--url", &run.http])
        .env(
            "FEDGE_OPERATOR_TOKEN",
            fedge_common::security::read_token_file(&run.token)?,
        )
        .output()?;
    let parsed: Value = serde_json::from_slice(&json.stdout)
        .with_context(|| format!("status --json: {}", String::from_utf8_lossy(&json.stderr)))?;
    assert!(parsed["rounds"].as_array().is_some_and(|r| !r.is_empty()));

    // Nothing listens here: the command says so.
    let dead = daemon_command("coordinator")
        .args(["status", "--url", "http://127.0.0.1:1"])
        .output()?;
    assert!(!dead.status.success());
    let err = String::from_utf8_lossy(&dead.stderr);
    assert!(err.contains("connecting to 127.0.0.1:1"), "{err}");
    run.finish()
}

#[test]
fn the_final_model_exports_with_its_card_and_classifies_image_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let small = vec![
        ("data.synthetic_train_samples", "1200".to_string()),
        ("data.synthetic_test_samples", "200".into()),
    ];
    run_fleet(tmp.path(), &out, 2, &small, &[("rounds", "3".into())], |_| Vec::new())?;

    let card: Value = serde_json::from_slice(&std::fs::read(out.join("model.json"))?)?;
    assert_eq!(card["format"], "fedge-model/1");
    assert_eq!(card["model"], "cnn");
    assert_eq!(card["input_shape"], serde_json::json!([3, 32, 32]));
    assert_eq!(card["classes"].as_array().map(Vec::len), Some(10));
    assert_eq!(card["parameters"], 160_202);
    assert_eq!(card["weights"], "model.safetensors");
    assert!((card["normalization"]["scale"].as_f64().unwrap() - 1.0 / 255.0).abs() < 1e-9);

    // Twenty test images as PNG files; two of them at another size (resized).
    let test = fedge_learn::data::synthetic(17, 2, 200);
    let labels = test.label_vec();
    let pixels = Vec::<u8>::try_from(test.images.view([-1]))?;
    let mut files = Vec::new();
    for i in 0..20usize {
        let chw = &pixels[i * 3072..(i + 1) * 3072];
        let hwc: Vec<u8> = (0..1024).flat_map(|p| (0..3).map(move |c| chw[c * 1024 + p])).collect();
        let img = image::RgbImage::from_raw(32, 32, hwc).unwrap();
        let img = if i < 2 {
            image::imageops::resize(&img, 64, 64, image::imageops::FilterType::Nearest)
        } else {
            img
        };
        let path = tmp.path().join(format!("img-{i:02}.png"));
        img.save(&path)?;
        files.push(path);
    }
    let out_cmd = daemon_command("edge-node")
        .arg("predict")
        .arg("--model")
        .arg(&out)
        .arg("--top")
        .arg("2")
        .args(&files)
        .output()?;
    assert!(out_cmd.status.success(), "{}", String::from_utf8_lossy(&out_cmd.stderr));
    let text = String::from_utf8(out_cmd.stdout)?;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 20, "{text}");
    let classes: Vec<String> = card["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let mut correct = 0;
    for (i, line) in lines.iter().enumerate() {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 5, "file, class, probability and a runner-up: {line}");
        assert_eq!(cols[0], files[i].display().to_string());
        let p: f64 = cols[2].parse()?;
        assert!((0.0..=1.0).contains(&p), "{line}");
        if cols[1] == classes[labels[i] as usize] {
            correct += 1;
        }
    }
    // run.json's last accuracy is on these same test images.
    let history = fedge_tests::run_history(&out)?;
    let acc = history["rounds"][2]["test_accuracy"].as_f64().unwrap();
    eprintln!("predict: {correct}/20 correct; the run's test accuracy {acc:.3}");
    assert!(
        correct as f64 >= (acc * 20.0 - 5.0).max(0.0),
        "{correct}/20 vs test accuracy {acc}"
    );

    check_with_pytorch(&out, &files[2..], &pixels[2 * 3072..20 * 3072], tmp.path())?;

    // A broken card is refused with its path and the reason.
    std::fs::write(out.join("model.json"), "{\"format\": \"fedge-model/9\"}")?;
    let bad = daemon_command("edge-node")
        .arg("predict")
        .arg("--model")
        .arg(&out)
        .arg(&files[0])
        .output()?;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("model.json") && err.contains("not a fedge model card"),
        "{err}"
    );
    Ok(())
}

/// A Python that imports torch: `FEDGE_TORCH_PYTHONPATH` (a `pip install
/// --target` folder), `$FEDGE_CACHE/torch-py` or `~/.cache/fedge/torch-py`
/// (`scripts/install-torch-python.sh`) when present, else the plain
/// interpreter's packages.
fn python_with_torch() -> Option<Command> {
    let home = std::env::var("HOME").unwrap_or_default();
    let candidates = [
        std::env::var("FEDGE_TORCH_PYTHONPATH").ok(),
        std::env::var("FEDGE_CACHE").ok().map(|c| format!("{c}/torch-py")),
        Some(format!("{home}/.cache/fedge/torch-py")),
        None,
    ];
    for path in candidates.into_iter() {
        let mut cmd = Command::new("python3");
        if let Some(p) = &path {
            if !std::path::Path::new(p).is_dir() {
                continue;
            }
            cmd.env("PYTHONPATH", p);
        }
        let ok = Command::new("python3")
            .envs(path.iter().map(|p| ("PYTHONPATH", p.as_str())))
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(cmd);
        }
    }
    None
}

/// PyTorch loads the exported model into the same architecture and gives
/// the classes and probabilities `edge-node predict` gave for `files`
/// (whose pixels are `pixels`).
fn check_with_pytorch(model: &std::path::Path, files: &[PathBuf], pixels: &[u8], dir: &std::path::Path) -> Result<()> {
    if std::env::var("FEDGE_PYTORCH").is_ok_and(|v| v == "0") {
        eprintln!("skipping the PyTorch check of the exported model: FEDGE_PYTORCH=0");
        return Ok(());
    }
    let mut python = python_with_torch().context(
        "the PyTorch check needs a python3 that imports torch (scripts/test.sh installs it; FEDGE_PYTORCH=0 \
         skips the check)",
    )?;
    let out = daemon_command("edge-node")
        .args(["predict", "--json", "--top", "10", "--model"])
        .arg(model)
        .args(files)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("predictions.jsonl"), &out.stdout)?;
    std::fs::write(dir.join("images.bin"), pixels)?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/check_export.py");
    let check = python
        .arg(script)
        .arg(model)
        .arg(dir.join("images.bin"))
        .arg(dir.join("predictions.jsonl"))
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    eprintln!("pytorch: {said}");
    assert!(check.status.success(), "PyTorch disagrees with fedge:\n{said}");
    Ok(())
}

/// POSTs `body` to `http://addr/path` and returns (status code, body).
fn post(addr: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let a = coordinator::api::http::request(
        "POST",
        &format!("http://{addr}{path}"),
        body,
        &coordinator::api::http::ClientOptions::plain(Duration::from_secs(30)),
    )?;
    Ok((a.code, a.body))
}

#[test]
fn a_node_serves_local_predictions_with_each_newer_global_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let port = free_port();
    let serve = format!("127.0.0.1:{}", free_port());
    let small = || {
        vec![
            ("data.synthetic_train_samples", "1200".to_string()),
            ("data.synthetic_test_samples", "200".into()),
        ]
    };
    let mut settings = small();
    settings.push(("rounds", "4".into()));
    let mut coord = Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &tmp.path().join("run"), &settings),
        tmp.path(),
    )?;
    let mut served = small();
    served.push(("serve.listen", format!("\"{serve}\"")));
    let mut nodes = vec![
        Daemon::start(
            "edge-node",
            "node-1",
            &node_args(port, "node-1", "0/2", &served),
            tmp.path(),
        )?,
        Daemon::start(
            "edge-node",
            "node-2",
            &node_args(port, "node-2", "1/2", &small()),
            tmp.path(),
        )?,
    ];

    // A test image as PNG.
    let test = fedge_learn::data::synthetic(17, 2, 1);
    let chw = Vec::<u8>::try_from(test.images.view([-1]))?;
    let chw = &chw;
    let hwc: Vec<u8> = (0..1024).flat_map(|p| (0..3).map(move |c| chw[c * 1024 + p])).collect();
    let mut png = Vec::new();
    image::RgbImage::from_raw(32, 32, hwc)
        .unwrap()
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;

    // Answers name the global model they came from; versions only grow.
    let mut versions = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && !coord.log_text().contains("run complete") {
        match post(&serve, "/predict?top=2", &png) {
            Ok((200, body)) => {
                let a: Value = serde_json::from_str(&body)?;
                assert_eq!(a["top"].as_array().map(Vec::len), Some(2), "{body}");
                assert!(a["run_id"].as_str().is_some_and(|r| r.starts_with("run-")));
                let p = a["probability"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&p), "{body}");
                versions.push(a["model_version"].as_u64().unwrap());
                if versions.len() == 1 {
                    let model = coordinator::api::http::check(
                        &format!("http://{serve}/model"),
                        &coordinator::api::http::ClientOptions::plain(Duration::from_secs(5)),
                    )?;
                    let info: Value = serde_json::from_str(&model)?;
                    assert_eq!(info["model"], "cnn");
                    assert_eq!(info["classes"].as_array().map(Vec::len), Some(10));
                    let (code, body) = post(&serve, "/predict", b"not an image")?;
                    assert_eq!(code, 400, "{body}");
                    assert!(body.contains("cannot decode image"), "{body}");
                }
            }
            Ok((503, body)) => assert!(body.contains("no global model yet"), "{body}"),
            Ok((code, body)) => bail!("POST /predict answered {code}: {body}"),
            Err(_) => {} // not listening yet
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(
        versions.windows(2).all(|w| w[0] <= w[1]),
        "versions went back: {versions:?}"
    );
    let distinct: std::collections::BTreeSet<u64> = versions.iter().copied().collect();
    assert!(
        distinct.len() >= 3,
        "served versions {distinct:?}: expected each new global model in turn"
    );

    assert!(coord.wait(Duration::from_secs(60))?.success(), "{}", coord.log_text());
    for n in &mut nodes {
        n.wait(Duration::from_secs(30))?;
    }
    Ok(())
}
