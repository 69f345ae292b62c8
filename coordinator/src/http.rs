//! The coordinator's HTTP side (`http.listen`): `/healthz` for container and
//! orchestrator health checks, and `/api/status`, a JSON view of the run
//! (round, phase, connected nodes, last accuracy) that `coordinator health`
//! and scripts read. The driver publishes a [`Status`] after every event; the
//! server only reads the latest one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::round::PhaseKind;
use crate::{Error, Result};

/// What `/api/status` returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub run_id: String,
    /// `waiting`, `training`, `aggregating`, `closing` or `finished`.
    pub phase: String,
    /// The round in progress, if any.
    pub round: Option<u64>,
    pub total_rounds: u64,
    /// Rounds aggregated and saved (the global model's version).
    pub completed_rounds: u64,
    pub connected_nodes: usize,
    /// Central test accuracy after the last evaluated round (0..1).
    pub last_test_accuracy: Option<f64>,
    pub last_test_loss: Option<f64>,
}

/// The label of a phase in [`Status::phase`].
pub fn phase_label(p: PhaseKind) -> &'static str {
    match p {
        PhaseKind::Waiting => "waiting",
        PhaseKind::Training => "training",
        PhaseKind::Aggregating => "aggregating",
        PhaseKind::Closing => "closing",
        PhaseKind::Finished => "finished",
    }
}

/// Binds `addr` for the HTTP server (so a taken port fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Io {
        context: format!("binding the HTTP listener (http.listen) to {addr}"),
        source: e,
    })
}

/// Serves `/healthz` and `/api/status` on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, status: watch::Receiver<Status>, stop: CancellationToken) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/api/status", get(api_status))
        .with_state(status);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(|e| Error::Io {
            context: "serving HTTP".into(),
            source: e,
        })
}

async fn healthz(State(status): State<watch::Receiver<Status>>) -> impl IntoResponse {
    let phase = status.borrow().phase.clone();
    (StatusCode::OK, format!("ok {phase}\n"))
}

async fn api_status(State(status): State<watch::Receiver<Status>>) -> Json<Status> {
    Json(status.borrow().clone())
}

/// `coordinator health`: GETs `url` (`http://host:port/path`) and succeeds on
/// a 200 answer within `timeout`. Used as the container health check, where
/// no HTTP client is installed.
pub fn check(url: &str, timeout: Duration) -> Result<String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| Error::Config(format!("health: expected an http:// URL, got `{url}`")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let io = |context: String| move |e: std::io::Error| Error::Io { context, source: e };
    let addr = authority
        .to_socket_addrs()
        .map_err(io(format!("resolving {authority}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("health: {authority} resolves to no address")))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io(format!("connecting to {addr}")))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io("setting a timeout".into()))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(io("setting a timeout".into()))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io(format!("writing to {addr}")))?;
    let mut answer = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut answer)
        .map_err(io(format!("reading from {addr}")))?;
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or_default();
    if code == "200" {
        Ok(body.to_string())
    } else {
        Err(Error::Internal(format!("health: {url} answered `{status_line}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_health_and_status() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(Status {
            run_id: "run-1".into(),
            phase: "waiting".into(),
            total_rounds: 3,
            ..Status::default()
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, rx, stop.clone()));
        tx.send_modify(|s| {
            s.phase = "training".into();
            s.round = Some(2);
            s.completed_rounds = 1;
        });
        let url = format!("http://{addr}");
        let (health, status) = tokio::task::spawn_blocking(move || {
            (
                check(&format!("{url}/healthz"), Duration::from_secs(5)),
                check(&format!("{url}/api/status"), Duration::from_secs(5)),
            )
        })
        .await
        .unwrap();
        assert_eq!(health.unwrap(), "ok training");
        let status: Status = serde_json::from_str(&status.unwrap()).unwrap();
        assert_eq!(status.round, Some(2));
        assert_eq!(status.completed_rounds, 1);
        assert_eq!(status.run_id, "run-1");
        let missing =
            tokio::task::spawn_blocking(move || check(&format!("http://{addr}/nope"), Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap_err()
                .to_string();
        assert!(missing.contains("404"), "{missing}");
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn health_names_what_failed() {
        let e = check("https://x/healthz", Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected an http:// URL"), "{e}");
        // Nothing listens on port 1.
        let e = check("http://127.0.0.1:1/healthz", Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("connecting to 127.0.0.1:1"), "{e}");
    }
}
