//! The coordinator's HTTP side (`http.listen`): the dashboard (`/`);
//! `/healthz` for container and orchestrator health checks; `/api/status`, a
//! JSON view of the run (round, phase, nodes, per-round accuracy and bytes)
//! that `coordinator status` and the dashboard read; `/api/config`;
//! `/metrics` for Prometheus ([`crate::runtime::metrics`]). The driver publishes a
//! [`Status`] after every event; the server reads the latest one.
//!
//! It is as safe as the gRPC API ([`crate::config::HttpConfig`]): HTTPS with
//! the coordinator's certificate when that uses TLS ([`listen`]), and, when
//! nodes authenticate, only operators ([`Operators`]) read the run. The
//! client side of `coordinator health` and `status` is in [`client`].

pub mod client;
pub mod listen;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
pub use client::{Answer, ClientOptions, check, fetch_status, request};
use fedge_common::security::token_matches;
pub use listen::{HttpListener, Peer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::runtime::metrics::Metrics;
use crate::runtime::status::Status;
use crate::{Error, Result};

/// Binds `addr` for the HTTP server (so a taken port fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Io {
        context: format!("binding the HTTP listener (http.listen) to {addr}"),
        source: e,
    })
}

/// Who may read the run over HTTP: `None` lets anyone in; otherwise the
/// operators of `http.operators` (name → token hash), by bearer token or
/// by a verified client certificate issued to their name.
#[derive(Debug, Clone, Default)]
pub struct Operators(pub Option<HashMap<String, String>>);

impl Operators {
    /// The operator a request comes from, or the reason it is refused.
    fn check(&self, bearer: Option<&str>, peer: Option<&Peer>) -> std::result::Result<String, (StatusCode, String)> {
        let Some(operators) = &self.0 else {
            return Ok(String::new());
        };
        if let Some(token) = bearer {
            return operators
                .iter()
                .find(|(_, hash)| token_matches(token.trim(), hash))
                .map(|(name, _)| name.clone())
                .ok_or_else(|| {
                    (
                        StatusCode::UNAUTHORIZED,
                        "the bearer token matches no operator's in http.operators".to_string(),
                    )
                });
        }
        match peer.and_then(|p| p.certificate.as_deref()) {
            Some(cn) if peer.is_some_and(|p| p.node_certificate) => Err((
                StatusCode::FORBIDDEN,
                format!(
                    "the client certificate is issued to {cn}, a node (OU=fedge node); node credentials do not open \
                     the operators' side"
                ),
            )),
            Some(cn) if operators.contains_key(cn) => Ok(cn.to_owned()),
            Some(cn) => Err((
                StatusCode::FORBIDDEN,
                format!("the client certificate is issued to {cn}, who is not an operator in http.operators"),
            )),
            None => Err((
                StatusCode::UNAUTHORIZED,
                "this coordinator's HTTP API is for operators: send `Authorization: Bearer <operator token>` \
                 or an operator's client certificate"
                    .to_string(),
            )),
        }
    }
}

/// Lets a request through only if it comes from an operator.
async fn require_operator(State(operators): State<Arc<Operators>>, request: Request, next: Next) -> Response {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let peer = request.extensions().get::<ConnectInfo<Peer>>().map(|c| &c.0);
    match operators.check(bearer, peer) {
        Ok(_) => next.run(request).await,
        Err((code, reason)) => {
            tracing::debug!(peer = ?peer.map(|p| p.addr), path = %request.uri().path(), %reason, "http request refused");
            (
                code,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"fedge\"")],
                reason + "\n",
            )
                .into_response()
        }
    }
}

/// What the handlers read.
#[derive(Clone)]
struct Shared {
    status: watch::Receiver<Status>,
    metrics: Arc<Metrics>,
    config: Arc<serde_json::Value>,
}

/// The dashboard: one page that polls `/api/status` and draws the run.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Serves the dashboard (`/`), `/healthz`, `/api/status`, `/api/config`
/// (the run's configuration, `config`) and `/metrics` on `listener` until
/// `stop` fires. All but `/` and `/healthz` need an operator when
/// `operators` names some.
pub async fn serve(
    listener: HttpListener,
    status: watch::Receiver<Status>,
    metrics: Arc<Metrics>,
    config: serde_json::Value,
    operators: Operators,
    stop: CancellationToken,
) -> Result<()> {
    let data = Router::new()
        .route("/api/status", get(api_status))
        .route("/api/config", get(api_config))
        .route("/metrics", get(prometheus))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::new(operators),
            require_operator,
        ));
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .merge(data)
        .with_state(Shared {
            status,
            metrics,
            config: Arc::new(config),
        });
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(|e| Error::Io {
            context: "serving HTTP".into(),
            source: e,
        })
}

async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    let phase = s.status.borrow().phase.clone();
    (StatusCode::OK, format!("ok {phase}\n"))
}

async fn api_status(State(s): State<Shared>) -> Json<Status> {
    Json(s.status.borrow().clone())
}

async fn api_config(State(s): State<Shared>) -> Json<serde_json::Value> {
    Json((*s.config).clone())
}

async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(DASHBOARD)
}

async fn prometheus(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// `coordinator status`: the run, its nodes and its rounds as text tables.
/// `now_ms` dates the nodes' last contact.
pub fn render_status(s: &Status, now_ms: u64) -> String {
    let pct = |a: Option<f64>| a.map_or("-".to_string(), |a| format!("{:.2}%", a * 100.0));
    let num = |l: Option<f64>| l.map_or("-".to_string(), |l| format!("{l:.4}"));
    let mut out = format!(
        "run {}  phase {}  round {}/{}  completed {}  nodes connected {}\n",
        s.run_id,
        s.phase,
        s.round.map_or("-".into(), |r| r.to_string()),
        s.total_rounds,
        s.completed_rounds,
        s.connected_nodes,
    );
    out += &format!(
        "test accuracy {}  loss {}  (after the last evaluated round)\n",
        pct(s.last_test_accuracy),
        num(s.last_test_loss)
    );
    if let Some(p) = &s.privacy {
        out += &format!(
            "privacy {} noise  epsilon {:.3} (delta {:e}){}  noise multiplier {}  clip norm {:.4}\n",
            p.noise,
            p.epsilon,
            p.delta,
            p.epsilon_budget.map_or(String::new(), |b| format!(" of budget {b}")),
            p.noise_multiplier,
            p.clip_norm
        );
    }
    if let Some(a) = &s.asynchronous {
        out += &format!(
            "asynchronous  training {}  buffer {}/{}  steps waiting {}  saved version {}\n",
            a.in_flight, a.buffered, a.buffer_size, a.waiting_steps, a.durable_version
        );
    }
    if let Some(sa) = &s.secure_aggregation {
        let neighbours = match sa.neighbours {
            0 => "every node".to_string(),
            k => format!("{k} neighbours"),
        };
        out += &format!(
            "secure aggregation  {neighbours}  threshold {}  max dropout {}{}\n",
            sa.threshold.map_or("-".into(), |t| t.to_string()),
            sa.max_dropout,
            sa.step.as_ref().map_or(String::new(), |st| format!("  step {st}"))
        );
    }
    out += &format!(
        "\n{:<16} {:<10} {:>8} {:>7} {:>8} {:>8} {:>11} {:>11} {:>9}\n",
        "node", "state", "seen", "rounds", "samples", "train_s", "bytes_up", "bytes_down", "rejected"
    );
    for n in &s.nodes {
        let seen = if n.last_seen_ms == 0 {
            "-".to_string()
        } else {
            format!("{}s ago", now_ms.saturating_sub(n.last_seen_ms) / 1000)
        };
        out += &format!(
            "{:<16} {:<10} {:>8} {:>7} {:>8} {:>8} {:>11} {:>11} {:>9}\n",
            n.name,
            n.state,
            seen,
            n.rounds_contributed,
            n.num_samples,
            n.last_train_seconds.map_or("-".into(), |t| format!("{t:.2}")),
            n.bytes_up,
            n.bytes_down,
            n.rejected_updates
        );
    }
    out += &format!(
        "\n{:>5} {:>12} {:>9} {:>8} {:>9} {:>8} {:>11} {:>11} {:>8}{}\n",
        "round",
        "participants",
        "accuracy",
        "loss",
        "fed_acc",
        "seconds",
        "bytes_up",
        "bytes_down",
        "rejected",
        if s.asynchronous.is_some() { "  staleness" } else { "" }
    );
    for r in &s.rounds {
        let staleness = r.staleness.as_ref().map_or(String::new(), |h| {
            let parts: Vec<String> = h.iter().map(|(s, n)| format!("{s}:{n}")).collect();
            format!("  {}", parts.join(" "))
        });
        out += &format!(
            "{:>5} {:>12} {:>9} {:>8} {:>9} {:>8.2} {:>11} {:>11} {:>8}{staleness}\n",
            r.round,
            r.participants,
            pct(r.test_accuracy),
            num(r.test_loss),
            pct(r.federated_accuracy),
            r.round_seconds,
            r.bytes_up,
            r.bytes_down,
            r.rejected_updates
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::runtime::status::{NodeStatus, PrivacyStatus, RoundPoint, SecureStatus};

    fn plain() -> ClientOptions {
        ClientOptions::plain(Duration::from_secs(5))
    }

    #[tokio::test]
    async fn serves_health_and_status() {
        let tcp = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let stop = CancellationToken::new();
        let listener = HttpListener::new(tcp, None, stop.clone()).unwrap();
        let (tx, rx) = watch::channel(Status {
            run_id: "run-1".into(),
            phase: "waiting".into(),
            total_rounds: 3,
            ..Status::default()
        });
        let metrics = Arc::new(Metrics::new());
        metrics.rounds_completed.set(1);
        let config = serde_json::json!({"rounds": 3});
        let server = tokio::spawn(serve(listener, rx, metrics, config, Operators::default(), stop.clone()));
        tx.send_modify(|s| {
            s.phase = "training".into();
            s.round = Some(2);
            s.completed_rounds = 1;
        });
        let url = format!("http://{addr}");
        let (health, status) = tokio::task::spawn_blocking(move || {
            (
                check(&format!("{url}/healthz"), &plain()),
                check(&format!("{url}/api/status"), &plain()),
            )
        })
        .await
        .unwrap();
        assert_eq!(health.unwrap(), "ok training");
        let status: Status = serde_json::from_str(&status.unwrap()).unwrap();
        assert_eq!(status.round, Some(2));
        assert_eq!(status.completed_rounds, 1);
        assert_eq!(status.run_id, "run-1");
        let url = format!("http://{addr}/metrics");
        let metrics = tokio::task::spawn_blocking(move || check(&url, &plain()))
            .await
            .unwrap()
            .unwrap();
        assert!(metrics.lines().any(|l| l == "fedge_rounds_completed 1"), "{metrics}");
        let base = format!("http://{addr}");
        let (page, config) = tokio::task::spawn_blocking(move || {
            (
                check(&format!("{base}/"), &plain()).unwrap(),
                check(&format!("{base}/api/config"), &plain()).unwrap(),
            )
        })
        .await
        .unwrap();
        assert!(
            page.contains("<title>fedge</title>") && page.contains("api/status"),
            "{page}"
        );
        assert_eq!(config, r#"{"rounds":3}"#);
        let missing = tokio::task::spawn_blocking(move || check(&format!("http://{addr}/nope"), &plain()))
            .await
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(missing.contains("404"), "{missing}");
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn only_operators_pass_when_operators_are_named() {
        use fedge_common::security::hash_token;
        let open = Operators(None);
        assert!(open.check(None, None).is_ok());
        let ops = Operators(Some(HashMap::from([("alice".to_string(), hash_token("s3cret"))])));
        let peer = |cn: Option<&str>| Peer {
            addr: "127.0.0.1:9".parse().unwrap(),
            certificate: cn.map(str::to_owned),
            node_certificate: false,
        };
        assert_eq!(ops.check(Some("s3cret"), None).unwrap(), "alice");
        assert_eq!(ops.check(None, Some(&peer(Some("alice")))).unwrap(), "alice");
        let (code, why) = ops.check(Some("guess"), Some(&peer(Some("alice")))).unwrap_err();
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert!(why.contains("matches no operator's"), "{why}");
        let (code, why) = ops.check(None, Some(&peer(Some("node-1")))).unwrap_err();
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert!(why.contains("issued to node-1, who is not an operator"), "{why}");
        // A node's certificate, even under an operator's name.
        let node = Peer {
            node_certificate: true,
            ..peer(Some("alice"))
        };
        let (code, why) = ops.check(None, Some(&node)).unwrap_err();
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert!(why.contains("issued to alice, a node (OU=fedge node)"), "{why}");
        let (code, why) = ops.check(None, Some(&peer(None))).unwrap_err();
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert!(why.contains("Authorization: Bearer <operator token>"), "{why}");
    }

    #[test]
    fn status_renders_as_tables() {
        let s = Status {
            run_id: "run-7".into(),
            phase: "training".into(),
            round: Some(3),
            total_rounds: 5,
            completed_rounds: 2,
            connected_nodes: 1,
            last_test_accuracy: Some(0.8321),
            last_test_loss: Some(0.5),
            nodes: vec![NodeStatus {
                name: "node-1".into(),
                state: "delivered".into(),
                connected: true,
                last_seen_ms: 7_000,
                rounds_contributed: 3,
                num_samples: 1500,
                last_train_seconds: Some(2.5),
                bytes_up: 1234,
                bytes_down: 5678,
                rejected_updates: 1,
            }],
            rounds: vec![RoundPoint {
                round: 1,
                participants: 4,
                test_accuracy: Some(0.161),
                test_loss: Some(2.2303),
                round_seconds: 16.06,
                ..RoundPoint::default()
            }],
            privacy: Some(PrivacyStatus {
                noise: "central".into(),
                noise_multiplier: 1.1,
                clip_norm: 0.5,
                epsilon: 2.3456,
                delta: 1e-5,
                epsilon_budget: Some(8.0),
            }),
            secure_aggregation: Some(SecureStatus {
                neighbours: 4,
                max_dropout: 0.3,
                threshold: Some(4),
                step: Some("masking".into()),
            }),
            asynchronous: None,
        };
        let text = render_status(&s, 10_000);
        assert!(
            text.contains("secure aggregation  4 neighbours  threshold 4  max dropout 0.3  step masking\n"),
            "{text}"
        );
        assert!(
            text.starts_with("run run-7  phase training  round 3/5  completed 2  nodes connected 1\n"),
            "{text}"
        );
        assert!(text.contains("test accuracy 83.21%  loss 0.5000"), "{text}");
        assert!(
            text.contains("privacy central noise  epsilon 2.346 (delta 1e-5) of budget 8  noise multiplier 1.1"),
            "{text}"
        );
        let node = text.lines().find(|l| l.starts_with("node-1")).unwrap();
        let cols: Vec<&str> = node.split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "node-1",
                "delivered",
                "3s",
                "ago",
                "3",
                "1500",
                "2.50",
                "1234",
                "5678",
                "1"
            ]
        );
        let round = text.lines().find(|l| l.trim_start().starts_with("1 ")).unwrap();
        assert_eq!(
            round.split_whitespace().collect::<Vec<_>>(),
            ["1", "4", "16.10%", "2.2303", "-", "16.06", "0", "0", "0"]
        );
    }

    #[test]
    fn health_names_what_failed() {
        let quick = ClientOptions::plain(Duration::from_secs(1));
        let e = check("ftp://x/healthz", &quick).unwrap_err().to_string();
        assert!(e.contains("expected an http:// or https:// URL"), "{e}");
        let e = check("https://127.0.0.1:1/healthz", &quick).unwrap_err().to_string();
        assert!(e.contains("connecting to 127.0.0.1:1"), "{e}");
        // Nothing listens on port 1.
        let e = check("http://127.0.0.1:1/healthz", &quick).unwrap_err().to_string();
        assert!(e.contains("connecting to 127.0.0.1:1"), "{e}");
    }
}
