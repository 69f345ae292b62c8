//! Local predictions over HTTP (`serve.listen`): the node classifies images
//! on the device with the latest global model it holds. The session
//! publishes each global model it fetches into a [`ModelFeed`]; one
//! inference thread owns the libtorch model and swaps in a newer version
//! between requests, so every answer comes whole from one version (named in
//! the answer).
//!
//! - `POST /predict?top=K` with an encoded image (PNG, JPEG) as the body:
//!   `{"class", "probability", "top", "run_id", "model_version"}`;
//! - `GET /model`: the run, version, architecture and classes being served;
//! - `GET /healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use fedge_common::params::Manifest;
use fedge_common::worker::Worker;
use fedge_learn::export::{Classifier, ModelCard};
use fedge_learn::model::ModelKind;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::{Error, Result};

/// A global model as the node holds it.
#[derive(Debug)]
pub struct ServedModel {
    pub run_id: String,
    pub version: u64,
    pub kind: ModelKind,
    pub input_shape: [i64; 3],
    pub classes: Vec<String>,
    pub manifest: Arc<Manifest>,
    pub params: Arc<Vec<f32>>,
}

/// Where the session publishes the global models it fetches.
pub type ModelFeed = watch::Sender<Option<Arc<ServedModel>>>;

/// One answer of `POST /predict`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub class: String,
    pub probability: f32,
    pub top: Vec<(String, f32)>,
    pub run_id: String,
    pub model_version: u64,
}

/// What `GET /model` says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub run_id: String,
    pub model_version: u64,
    pub model: String,
    pub input_shape: [i64; 3],
    pub classes: Vec<String>,
}

struct Request {
    image: Bytes,
    top: usize,
    reply: oneshot::Sender<std::result::Result<Answer, (StatusCode, String)>>,
}

#[derive(Clone)]
struct Shared {
    /// The inference thread, joined when the server (and so this) is dropped.
    jobs: Arc<Worker<Request>>,
    feed: watch::Receiver<Option<Arc<ServedModel>>>,
}

/// Binds `addr`, starts the inference thread and the server (until the
/// process ends), and returns the feed to publish global models into.
pub async fn start(addr: SocketAddr) -> Result<ModelFeed> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("serve.listen: cannot bind {addr}: {e}")))?;
    let (feed, feed_rx) = watch::channel(None);
    let thread_feed = feed_rx.clone();
    let jobs = Worker::spawn("inference", move |rx| inference(rx, thread_feed))
        .map_err(|e| Error::Trainer(format!("cannot start the inference thread: {e}")))?;
    let app = Router::new()
        .route("/predict", post(predict))
        .route("/model", get(model))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(16 << 20))
        .with_state(Shared {
            jobs: Arc::new(jobs),
            feed: feed_rx,
        });
    tracing::info!(%addr, "serving local predictions (POST /predict, GET /model)");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "prediction server stopped");
        }
    });
    Ok(feed)
}

/// The inference thread: answers requests with the newest model published.
fn inference(rx: mpsc::Receiver<Request>, feed: watch::Receiver<Option<Arc<ServedModel>>>) {
    let mut loaded: Option<(String, u64, Classifier)> = None;
    for req in rx {
        let answer = (|| {
            let latest = feed.borrow().clone().ok_or((
                StatusCode::SERVICE_UNAVAILABLE,
                "no global model yet: this node has not been given one".to_string(),
            ))?;
            if loaded
                .as_ref()
                .is_none_or(|(run, v, _)| *run != latest.run_id || *v != latest.version)
            {
                let card = ModelCard::new(
                    latest.kind,
                    latest.input_shape,
                    latest.classes.clone(),
                    &latest.manifest,
                );
                let c = Classifier::from_parts(card, latest.kind, &latest.manifest, &latest.params)
                    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                tracing::info!(version = latest.version, "serving global model");
                loaded = Some((latest.run_id.clone(), latest.version, c));
            }
            let (run_id, version, classifier) = loaded.as_ref().expect("loaded above");
            let pixels = fedge_learn::data::folder::image_bytes_pixels(
                &req.image,
                classifier.card.input_shape,
                "the request body",
            )
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
            let (class, probability, top) = classifier
                .classify_pixels(&pixels, req.top)
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                .remove(0);
            Ok(Answer {
                class,
                probability,
                top,
                run_id: run_id.clone(),
                model_version: *version,
            })
        })();
        let _ = req.reply.send(answer);
    }
}

#[derive(Deserialize)]
struct PredictParams {
    top: Option<usize>,
}

async fn predict(State(s): State<Shared>, Query(q): Query<PredictParams>, image: Bytes) -> Response {
    let (reply, rx) = oneshot::channel();
    let sent = s.jobs.send(Request {
        image,
        top: q.top.unwrap_or(3),
        reply,
    });
    if sent.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the inference thread stopped").into_response();
    }
    match rx.await {
        Ok(Ok(answer)) => Json(answer).into_response(),
        Ok(Err((code, msg))) => (code, msg).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the inference thread stopped").into_response(),
    }
}

async fn model(State(s): State<Shared>) -> Response {
    match s.feed.borrow().as_ref() {
        Some(m) => Json(ModelInfo {
            run_id: m.run_id.clone(),
            model_version: m.version,
            model: m.kind.name().into(),
            input_shape: m.input_shape,
            classes: m.classes.clone(),
        })
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no global model yet: this node has not been given one",
        )
            .into_response(),
    }
}
