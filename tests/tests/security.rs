//! Transport security with real processes: `coordinator certs` makes a
//! development PKI; a coordinator serves over TLS and checks who joins,
//! by mutual-TLS certificate or by token, against an allow-list; real edge
//! nodes with the right credentials train, and every wrong credential gets
//! its own status.

use std::path::Path;
use std::time::Duration;

use fedge_common::config::toml_string;
use fedge_common::pb::{self, federation_client::FederationClient};
use fedge_common::security::TOKEN_METADATA;
use fedge_tests::{Daemon, free_port, run_history, run_to_end, sets};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn pki(dir: &Path, names: &str) -> anyhow::Result<std::path::PathBuf> {
    let out = dir.join("pki");
    let (status, err) = run_to_end(
        "coordinator",
        &["certs", "--out", out.to_str().unwrap(), "--names", names],
    )?;
    anyhow::ensure!(status.success(), "coordinator certs failed:\n{err}");
    Ok(out)
}

/// The coordinator's certificate and key from the PKI.
fn server_tls(pki: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("security.tls_cert", toml_string(pki.join("coordinator.pem").display())),
        ("security.tls_key", toml_string(pki.join("coordinator.key").display())),
    ]
}

fn small() -> Vec<(&'static str, String)> {
    vec![
        ("data.synthetic_train_samples", "600".into()),
        ("data.synthetic_test_samples", "200".into()),
    ]
}

fn start_coordinator(dir: &Path, port: u16, security: &[(&str, String)]) -> anyhow::Result<Daemon> {
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--out-dir".into(),
        dir.join("run").display().to_string(),
        "--rounds".into(),
        "1".into(),
    ];
    let mut settings = small();
    settings.extend(security.iter().cloned());
    args.extend(sets(&settings));
    Daemon::start("coordinator", "coordinator", &args, dir)
}

fn start_node(dir: &Path, port: u16, name: &str, index: usize, security: &[(&str, String)]) -> anyhow::Result<Daemon> {
    let mut args = vec![
        "--coordinator".to_string(),
        format!("https://localhost:{port}"),
        "--name".into(),
        name.into(),
        "--partition".into(),
        format!("{index}/2"),
        "--threads".into(),
        "1".into(),
    ];
    let mut settings = small();
    settings.push(("reconnect.max", "\"1s\"".into()));
    settings.extend(security.iter().cloned());
    args.extend(sets(&settings));
    Daemon::start("edge-node", name, &args, dir)
}

fn node_files(pki: &Path, name: &str, with_cert: bool) -> Vec<(&'static str, String)> {
    let d = pki.join("nodes").join(name);
    let mut v = vec![("security.ca", toml_string(d.join("ca.pem").display()))];
    if with_cert {
        v.push(("security.cert", toml_string(d.join("cert.pem").display())));
        v.push(("security.key", toml_string(d.join("key.pem").display())));
    }
    v
}

/// A TLS channel as `identity` (a node folder of the PKI), or without a client certificate.
async fn channel(pki: &Path, port: u16, identity: Option<&str>) -> anyhow::Result<Channel> {
    channel_as(pki, port, identity.map(|name| pki.join("nodes").join(name)).as_deref()).await
}

/// A TLS channel with the certificate in `folder` (`cert.pem`, `key.pem`), or none.
async fn channel_as(pki: &Path, port: u16, folder: Option<&Path>) -> anyhow::Result<Channel> {
    let ca = std::fs::read(pki.join("ca.pem"))?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(d) = folder {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(d.join("cert.pem"))?,
            std::fs::read(d.join("key.pem"))?,
        ));
    }
    let endpoint = Endpoint::from_shared(format!("https://localhost:{port}"))?.tls_config(tls)?;
    let mut last = None;
    for _ in 0..100 {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow::anyhow!("no TLS connection: {:?}", last))
}

fn join_request(name: &str, token: Option<&str>) -> tonic::Request<pb::JoinRequest> {
    let mut r = tonic::Request::new(pb::JoinRequest {
        protocol_version: pb::PROTOCOL_VERSION,
        node_name: name.into(),
        num_samples: 10,
        models: vec!["cnn".into()],
        ..Default::default()
    });
    if let Some(t) = token {
        r.metadata_mut()
            .insert(TOKEN_METADATA, format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn wait_ok(d: &mut Daemon) -> anyhow::Result<()> {
    let status = d.wait(Duration::from_secs(240))?;
    anyhow::ensure!(status.success(), "{} failed:\n{}", d.name, d.log_text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_certified_allowed_nodes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = pki(tmp.path(), "node-1,node-2,node-3")?;
    let port = free_port();
    let mut settings = server_tls(&pki);
    settings.extend([
        ("security.client_ca", toml_string(pki.join("ca.pem").display())),
        ("security.node_auth", "\"certificate\"".into()),
        ("security.allow", "[\"node-1\", \"node-2\"]".into()),
    ]);
    let mut coord = start_coordinator(tmp.path(), port, &settings)?;

    // Certified, but joining under another node's name.
    let mut as_node1 = FederationClient::new(channel(&pki, port, Some("node-1")).await?);
    let s = as_node1.join(join_request("node-2", None)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert_eq!(s.message(), "node node-2 presented a certificate issued to node-1");
    // Certified by the CA but not on the allow-list.
    let mut as_node3 = FederationClient::new(channel(&pki, port, Some("node-3")).await?);
    let s = as_node3.join(join_request("node-3", None)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert_eq!(s.message(), "node node-3 is not on this coordinator's allow-list");
    // The operator's certificate (same CA) opens the HTTP side, never a node's calls.
    let mut as_operator = FederationClient::new(channel_as(&pki, port, Some(&pki.join("operator"))).await?);
    for name in ["operator", "node-1"] {
        let s = as_operator.join(join_request(name, None)).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            s.message(),
            "the client certificate is an operator's (OU=fedge operator); operators cannot act as nodes"
        );
    }
    // A session token taken to another certified client is useless there.
    let session = as_node1.join(join_request("node-1", None)).await?.into_inner().node_id;
    let s = as_node3
        .fetch_model(pb::FetchModelRequest {
            node_id: session,
            version: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        s.message(),
        "this session belongs to node node-1; the connection's certificate was issued to node-3"
    );
    // No client certificate: the TLS handshake itself is refused.
    let bare = channel(&pki, port, None).await;
    if let Ok(ch) = bare {
        let s = FederationClient::new(ch)
            .join(join_request("node-1", None))
            .await
            .unwrap_err();
        assert_ne!(s.code(), tonic::Code::Ok);
    }
    // Plaintext against the TLS port gets nowhere.
    let plain = async {
        let mut c = FederationClient::connect(format!("http://127.0.0.1:{port}")).await?;
        c.join(join_request("node-1", None)).await.map_err(anyhow::Error::from)
    };
    assert!(plain.await.is_err(), "plaintext must not be served on a TLS port");

    // A node whose certificate is for another name is refused for good.
    let mut impostor = start_node(tmp.path(), port, "node-2", 1, &{
        let mut v = node_files(&pki, "node-1", true);
        v.push(("security.server_name", "\"localhost\"".into()));
        v
    })?;
    let status = impostor.wait(Duration::from_secs(120))?;
    assert!(!status.success());
    let log = impostor.log_text();
    assert!(
        log.contains("refused by the coordinator: node node-2 presented a certificate issued to node-1"),
        "{log}"
    );
    drop(impostor);

    let mut nodes = Vec::new();
    for (i, name) in ["node-1", "node-2"].iter().enumerate() {
        nodes.push(start_node(tmp.path(), port, name, i, &node_files(&pki, name, true))?);
    }
    wait_ok(&mut coord)?;
    for n in &mut nodes {
        wait_ok(n)?;
    }
    let history = run_history(&tmp.path().join("run"))?;
    let round = &history["rounds"][0];
    assert_eq!(round["participants"].as_array().unwrap().len(), 2);
    let refusals = &round["refusals"];
    assert!(refusals["not_allowed"].as_u64().unwrap() >= 3, "{refusals}");
    assert!(coord.log_text().contains("coordinator listening (tls)"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_against_their_stored_hashes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = pki(tmp.path(), "node-1,node-2")?;
    let tokens = std::fs::read_to_string(pki.join("tokens.toml"))?;
    let token1 = std::fs::read_to_string(pki.join("nodes/node-1/token"))?
        .trim()
        .to_owned();
    let token2 = std::fs::read_to_string(pki.join("nodes/node-2/token"))?
        .trim()
        .to_owned();
    assert!(
        !tokens.contains(&token1) && tokens.contains("sha256:"),
        "the coordinator's file must hold hashes only"
    );
    let port = free_port();
    let mut settings = server_tls(&pki);
    settings.extend([
        ("security.node_auth", "\"token\"".into()),
        ("security.tokens", toml_string(pki.join("tokens.toml").display())),
    ]);
    let mut coord = start_coordinator(tmp.path(), port, &settings)?;
    let mut c = FederationClient::new(channel(&pki, port, None).await?);
    let s = c.join(join_request("node-1", None)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    assert!(s.message().starts_with("node node-1 sent no token"), "{}", s.message());
    let s = c.join(join_request("node-1", Some(&token2))).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        s.message(),
        "node node-1 presented a token that does not match the one registered for it"
    );
    let s = c.join(join_request("node-9", Some(&token1))).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert_eq!(s.message(), "unknown node node-9: no token is registered for it");
    // A name that would forge a log line is refused before it is logged.
    let s = c
        .join(join_request("node-1\nINFO round complete round=99", Some(&token1)))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(s.message().contains("not allowed at byte 6"), "{}", s.message());

    // A real node with a wrong token stops with the coordinator's reason.
    let mut wrong = start_node(tmp.path(), port, "node-1", 0, &{
        let mut v = node_files(&pki, "node-1", false);
        v.push(("security.token", format!("{token2:?}")));
        v
    })?;
    assert!(!wrong.wait(Duration::from_secs(120))?.success());
    assert!(
        wrong
            .log_text()
            .contains("node node-1 presented a token that does not match"),
        "{}",
        wrong.log_text()
    );
    drop(wrong);

    let mut nodes = Vec::new();
    for (i, name) in ["node-1", "node-2"].iter().enumerate() {
        let mut v = node_files(&pki, name, false);
        v.push((
            "security.token_file",
            toml_string(pki.join("nodes").join(name).join("token").display()),
        ));
        nodes.push(start_node(tmp.path(), port, name, i, &v)?);
    }
    wait_ok(&mut coord)?;
    for n in &mut nodes {
        wait_ok(n)?;
    }
    let history = run_history(&tmp.path().join("run"))?;
    assert_eq!(history["rounds"][0]["participants"].as_array().unwrap().len(), 2);
    let refusals = &history["rounds"][0]["refusals"];
    assert!(refusals["unauthenticated"].as_u64().unwrap() >= 3, "{refusals}");
    assert!(!coord.log_text().contains("round=99"), "a node name forged a log line");
    Ok(())
}

#[test]
fn plaintext_must_be_asked_for_and_is_announced() -> anyhow::Result<()> {
    let (status, err) = run_to_end("coordinator", &["serve", "--rounds", "1"])?;
    assert!(!status.success());
    assert!(
        err.contains("no TLS certificate configured") && err.contains("security.insecure = true"),
        "{err}"
    );
    let (status, err) = run_to_end("edge-node", &["--coordinator", "http://127.0.0.1:1"])?;
    assert!(!status.success());
    assert!(err.contains("is plaintext http://"), "{err}");
    let (status, err) = run_to_end(
        "edge-node",
        &[
            "--coordinator",
            "https://127.0.0.1:1",
            "--set",
            "security.token=\"a\"",
            "--set",
            "security.token_file=\"/x\"",
        ],
    )?;
    assert!(!status.success());
    assert!(err.contains("security.ca"), "{err}");
    Ok(())
}

/// `coordinator ARGS…`, run to its end: (success, stdout, stderr).
fn coordinator_cli(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = fedge_tests::daemon_command("coordinator").args(args).output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn the_http_side_is_https_for_operators_only_when_nodes_authenticate() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = pki(tmp.path(), "node-1")?;
    let (port, http_port) = (free_port(), free_port());
    let mut settings = server_tls(&pki);
    settings.extend([
        ("security.client_ca", toml_string(pki.join("ca.pem").display())),
        ("security.node_auth", "\"certificate\"".into()),
        ("http.listen", format!("\"127.0.0.1:{http_port}\"")),
        ("http.operators", toml_string(pki.join("operators.toml").display())),
    ]);
    let coord = start_coordinator(tmp.path(), port, &settings)?;
    let base = format!("https://localhost:{http_port}");
    let ca = pki.join("ca.pem").display().to_string();
    let p = |f: &str| pki.join(f).display().to_string();

    // Health is open (orchestrators' probes carry no credentials), over TLS.
    let health = format!("{base}/healthz");
    let mut answered = None;
    for _ in 0..100 {
        let r = coordinator_cli(&["health", "--url", &health, "--ca", &ca])?;
        if r.0 {
            answered = Some(r.1);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let answered = answered.ok_or_else(|| anyhow::anyhow!("no health answer:\n{}", coord.log_text()))?;
    assert_eq!(answered.trim(), "ok waiting");
    // The health check of the images reads the configuration (here written as a file).
    let config = tmp.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"0.0.0.0:{http_port}\"\noperators = {}\n[security]\ntls_cert = {}\n",
            toml_string(p("operators.toml")),
            toml_string(p("coordinator.pem"))
        ),
    )?;
    let (ok, out, err) = coordinator_cli(&["health", "--config", config.to_str().unwrap()])?;
    assert!(ok && out.trim() == "ok waiting", "{out}{err}");

    // The run's data wants an operator: none, a wrong token, a node's certificate are refused.
    let (ok, _, err) = coordinator_cli(&["status", "--url", &base, "--ca", &ca])?;
    assert!(!ok);
    assert!(
        err.contains("401 Unauthorized") && err.contains("this coordinator's HTTP API is for operators"),
        "{err}"
    );
    assert!(err.contains("--token-file FILE or FEDGE_OPERATOR_TOKEN"), "{err}");
    let (ok, _, err) = coordinator_cli(&["status", "--url", &base, "--ca", &ca, "--token", "guess"])?;
    assert!(!ok && err.contains("the bearer token matches no operator's"), "{err}");
    let (ok, _, err) = coordinator_cli(&[
        "status",
        "--url",
        &base,
        "--ca",
        &ca,
        "--cert",
        &p("nodes/node-1/cert.pem"),
        "--key",
        &p("nodes/node-1/key.pem"),
    ])?;
    assert!(
        !ok && err.contains("403 Forbidden") && err.contains("issued to node-1, a node (OU=fedge node)"),
        "{err}"
    );
    // The operator's token, or its certificate, opens it.
    let (ok, out, err) = coordinator_cli(&[
        "status",
        "--url",
        &base,
        "--ca",
        &ca,
        "--token-file",
        &p("operator/token"),
    ])?;
    assert!(
        ok && out.starts_with("run run-") && out.contains("phase waiting"),
        "{out}{err}"
    );
    let (ok, out, err) = coordinator_cli(&[
        "status",
        "--json",
        "--url",
        &base,
        "--ca",
        &ca,
        "--cert",
        &p("operator/cert.pem"),
        "--key",
        &p("operator/key.pem"),
    ])?;
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(status["phase"], "waiting");

    // What the client says when TLS goes wrong: no CA, the wrong CA, plaintext against TLS.
    let (ok, _, err) = coordinator_cli(&["status", "--url", &base])?;
    assert!(!ok && err.contains("an https:// URL needs --ca FILE"), "{err}");
    let other = tempfile::tempdir()?;
    let other_pki = self::pki(other.path(), "x")?;
    let (ok, _, err) = coordinator_cli(&[
        "status",
        "--url",
        &base,
        "--ca",
        other_pki.join("ca.pem").to_str().unwrap(),
    ])?;
    assert!(
        !ok && err.contains("the coordinator's certificate is not trusted"),
        "{err}"
    );
    let (ok, _, err) = coordinator_cli(&["health", "--url", &format!("http://127.0.0.1:{http_port}/healthz")])?;
    assert!(
        !ok && (err.contains("does it serve https://?") || err.contains("use https://")),
        "{err}"
    );

    drop(coord);
    Ok(())
}
