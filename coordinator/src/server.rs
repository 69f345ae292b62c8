//! Serving one run: [`run`] reads the credentials, assembles the run
//! ([`assemble`]: resume or start, the round machine, strategy, evaluator,
//! store and driver), serves gRPC and the HTTP side, and stops them when
//! the driver finishes or `shutdown` resolves. `coordinator simulate` uses
//! the same assembly with in-process nodes.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fedge_common::pb;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::api::security::Authenticator;
use crate::api::service::{FederationService, TransferLimits};
use crate::api::{http, security};
use crate::config::{self, CoordinatorConfig};
use crate::core::round::{RoundMachine, RoundSettings};
use crate::core::secure;
use crate::core::strategy::{ServerOptimizer, Strategy};
use crate::runtime::driver::{Driver, ModelSnapshot, RunSummary, Traffic, now_ms};
use crate::runtime::evaluator::Evaluator;
use crate::runtime::store::{RunHistory, RunStore};
use crate::runtime::{driver, metrics, status};
use crate::{Error, Result};
use fedge_common::task::Algorithm;

/// Runs a federated training job on `listener` until its last round is
/// saved (returns its summary) or `shutdown` resolves (returns `None`).
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<Option<RunSummary>> {
    config.validate()?;
    // Credentials are read first: a bad certificate or token file stops the
    // coordinator before it loads data or touches a checkpoint.
    let tls = security::server_tls(&config.security)?;
    let mut auth = Authenticator::from_config(&config.security)?;
    if let Some(path) = &config.http.operators {
        auth = auth.with_operators(security::load_operators(path)?.into_keys());
    }
    let Parts {
        driver,
        commands,
        snapshot,
        manifest,
        traffic,
        settings,
        codec,
        spool_dir,
        metrics,
        status: status_rx,
        ..
    } = match assemble(&config, false).await? {
        Assembled::Ready(parts) => *parts,
        Assembled::Finished(summary) => return Ok(Some(summary)),
    };
    let service = FederationService {
        driver: commands,
        snapshot,
        manifest,
        traffic,
        settings,
        codec,
        spool_dir,
        chunk_bytes: config.wire.chunk_bytes,
        auth: Arc::new(auth),
        limits: TransferLimits::new(&config.limits),
        spool_budget: crate::api::intake::SpoolBudget::new(config.limits.spool_memory_bytes),
    };

    // The HTTP side's listener, TLS configuration and operators, read
    // before anything is served so that a bad file stops the start.
    let http_listener = prepare_http(&config).await?;
    let addr = listener.local_addr().map_err(|e| Error::Io {
        context: "reading the listen address".into(),
        source: e,
    })?;
    let limits = &config.limits;
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .initial_stream_window_size(Some(limits.stream_window_bytes))
        .initial_connection_window_size(Some(limits.stream_window_bytes.saturating_mul(2)))
        .max_concurrent_streams(Some(limits.max_streams_per_connection));
    let sec = &config.security;
    match tls {
        Some(tls) => {
            builder = builder.tls_config(tls).map_err(|e| {
                Error::Config(format!(
                    "security: the TLS certificate, key or client CA is unusable: {}",
                    security::error_chain(&e)
                ))
            })?;
            tracing::info!(
                %addr,
                mutual_tls = sec.client_ca.is_some(),
                node_auth = sec.node_auth.name(),
                registered_tokens = service.auth.registered(),
                allow_list = sec.allow.len(),
                "coordinator listening (tls)"
            );
        }
        None => {
            tracing::warn!(
                %addr,
                node_auth = sec.node_auth.name(),
                "INSECURE: serving plaintext gRPC without TLS (security.insecure = true); model updates and \
                 credentials cross the network unencrypted and unauthenticated. Use this on one machine only."
            );
        }
    }
    if sec.node_auth == config::NodeAuth::None && !sec.insecure {
        tracing::warn!(
            "security.node_auth = \"none\": any client that trusts this certificate can join as any node name"
        );
    }
    let server_stop = CancellationToken::new();
    let driver_stop = CancellationToken::new();
    let server = {
        let stop = server_stop.clone();
        let svc =
            pb::federation_server::FederationServer::new(service).max_decoding_message_size(limits.max_message_bytes);
        builder
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move { stop.cancelled().await })
    };
    let mut server = tokio::spawn(server);
    if let Some(http_listener) = http_listener {
        spawn_http(http_listener, &config, status_rx, metrics, server_stop.clone())?;
    }
    let mut driver_task = tokio::spawn(driver.run(driver_stop.clone()));
    tokio::pin!(shutdown);
    let outcome = tokio::select! {
        res = &mut driver_task => driver_outcome(res)?,
        () = &mut shutdown => stop_driver(driver_task, &driver_stop).await?,
        res = &mut server => {
            res.map_err(|e| Error::Internal(format!("server task failed: {e}")))??;
            return Err(Error::Internal("grpc server stopped unexpectedly".into()));
        }
    };
    // Give nodes a moment to read their stop instruction, then stop serving.
    if matches!(outcome, Ok(Some(_))) {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    server_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(res) => res.map_err(|e| Error::Internal(format!("server task failed: {e}")))??,
        Err(_) => tracing::warn!("grpc server did not drain within 5s"),
    }
    outcome
}

/// A run's parts before anything is served: the driver (round machine,
/// evaluator, store, status) and what a front end (the gRPC service, or
/// the in-process simulation) needs to talk to it.
pub(crate) struct Parts {
    pub driver: Driver,
    pub commands: mpsc::UnboundedSender<driver::Command>,
    pub snapshot: watch::Receiver<Arc<ModelSnapshot>>,
    pub manifest: Arc<fedge_common::params::Manifest>,
    pub traffic: Arc<Traffic>,
    pub settings: pb::RunSettings,
    pub kind: fedge_learn::model::ModelKind,
    pub codec: fedge_common::codec::Codec,
    pub spool_dir: std::path::PathBuf,
    pub metrics: Arc<metrics::Metrics>,
    pub status: watch::Receiver<status::Status>,
}

/// What [`assemble`] found.
pub(crate) enum Assembled {
    /// Ready to run.
    Ready(Box<Parts>),
    /// The run in `out_dir` had already completed every round.
    Finished(RunSummary),
}

/// Loads the evaluation data, builds the model and strategy, creates or
/// resumes the run's store, and builds the driver: for a served run, or
/// (with `in_process_nodes`) a simulation's, whose virtual nodes read the
/// global model from memory.
pub(crate) async fn assemble(config: &CoordinatorConfig, in_process_nodes: bool) -> Result<Assembled> {
    let kind = config.model_kind()?;
    let source = config.data.source()?;
    tracing::info!(data = %source.describe(), "central evaluation data");
    if matches!(source, fedge_learn::data::DataSource::Synthetic { .. }) {
        tracing::info!("no data set configured (data.path or FEDGE_DATA__PATH): using the synthetic data set");
    }
    let spool_dir = crate::api::intake::prepare_spool(&config.out_dir)?;
    let (evaluator, initial) = Evaluator::spawn(
        kind,
        source.clone(),
        config.seed,
        config.eval.batch_size,
        config.eval.threads,
        spool_dir.clone(),
        config.limits.resident_model_bytes,
    )
    .await?;
    let manifest = Arc::new(initial.manifest);
    let numel = manifest.numel();
    let (mut strategy, codec) = build_strategy(config, numel)?;
    let st = &config.strategy;
    let (store, version, global) = open_store(config, kind, &source, &manifest, initial.params, &mut strategy)?;
    if version >= u64::from(config.rounds) {
        // The last round was saved but the run not yet marked finished.
        let mut store = store;
        store.finish()?;
        let last = store.history.rounds.last();
        tracing::info!(
            rounds = version,
            "every round was already complete; run marked finished"
        );
        return Ok(Assembled::Finished(RunSummary {
            rounds_completed: version,
            final_test_accuracy: last.and_then(|r| r.test_accuracy),
            final_test_loss: last.and_then(|r| r.test_loss),
            out_dir: store.dir().to_path_buf(),
        }));
    }
    let run_id = store.history.run_id.clone();
    tracing::info!(
        model = %kind,
        parameters = numel,
        test_samples = initial.test_samples,
        rounds = config.rounds,
        run_id = %run_id,
        "model initialized"
    );
    fedge_learn::export::ModelCard::new(kind, initial.input_shape, initial.classes.clone(), &manifest)
        .write(&config.out_dir)?;

    // Under differential privacy clipping bounds every update's influence,
    // and a loss computed on a noised model never released would be one
    // more release to account for: no check there.
    let model_check = (st.max_loss_ratio > 0.0 && strategy.privacy.is_none()).then_some(st.max_loss_ratio);
    let control = strategy.control.clone();
    let global = Arc::new(global);
    let mut machine = RoundMachine::resume(
        round_settings(
            config,
            in_process_nodes,
            model_check.is_some(),
            // Each start of the coordinator numbers its tasks in a range of
            // its own: a resumed run never reuses an earlier task's number.
            (u64::from(store.history.resumed) << 32) + 1,
            applied_tasks(&store.history.rounds, config.asynchronous.max_staleness),
        ),
        version,
        global.clone(),
        strategy,
    );
    // A resumed run bounds its next updates by its last round's, as if it
    // had never stopped.
    if let Some(median) = store
        .history
        .rounds
        .last()
        .and_then(|r| crate::core::round::positive_median(r.participants.iter().filter_map(|p| p.update_norm)))
    {
        machine.set_norm_reference(median);
    }
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(
        ModelSnapshot::new(version, manifest.clone(), global, control.map(Arc::new)).mark_durable(),
    ));
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let traffic = Arc::new(Traffic::default());
    let settings = pb::RunSettings {
        run_id: run_id.clone(),
        model: kind.name().into(),
        total_rounds: config.rounds,
        encoding: pb::Encoding::F32Le as i32,
        input_shape: initial.input_shape.to_vec(),
        classes: initial.classes.clone(),
        update_codec: Some(pb::UpdateCodec::from(&codec)),
        asynchronous: config.asynchronous.enabled,
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let (status_tx, status_rx) = watch::channel(status::Status {
        run_id,
        phase: status::phase_label(machine.phase()).into(),
        total_rounds: u64::from(config.rounds),
        completed_rounds: machine.version(),
        ..status::Status::default()
    });
    let driver = Driver::new(
        machine,
        cmd_rx,
        snapshot_tx,
        manifest.clone(),
        evaluator,
        store,
        traffic.clone(),
        config.eval.every,
        u64::from(config.rounds),
    )
    .with_status(status_tx, metrics.clone());
    let driver = match model_check {
        Some(ratio) => driver.with_model_check(ratio).await?,
        None => driver,
    };
    let driver = driver
        .with_resident_model_bytes(if in_process_nodes {
            u64::MAX
        } else {
            config.limits.resident_model_bytes
        })
        .await?;
    Ok(Assembled::Ready(Box::new(Parts {
        driver,
        commands: cmd_tx,
        snapshot: snapshot_rx,
        manifest,
        traffic,
        settings,
        kind,
        codec,
        spool_dir,
        metrics,
        status: status_rx,
    })))
}

/// The strategy the configuration asks for (aggregator, server optimizer,
/// bounds, privacy), and the update codec the nodes use.
fn build_strategy(config: &CoordinatorConfig, numel: usize) -> Result<(Strategy, fedge_common::codec::Codec)> {
    let st = &config.strategy;
    let mut strategy = Strategy::new(
        st.aggregator(),
        ServerOptimizer::new(st.server_opt(), st.server_lr, numel),
        st.clip(),
        config.train.algorithm == Algorithm::Scaffold,
        numel,
    );
    strategy.max_norm = st.max_norm();
    strategy.max_norm_factor = st.max_norm_factor();
    strategy.weighting = st.weighting();
    strategy.precision = st.precision(numel);
    strategy.privacy = config.privacy.privacy();
    if let Some(p) = &strategy.privacy {
        let c = &config.privacy;
        tracing::info!(
            noise = p.mode.name(),
            noise_multiplier = p.noise_multiplier,
            clip_norm = p.clip,
            adaptive_clip = c.adaptive_clip,
            delta = p.delta,
            epsilon_budget = ?p.budget,
            "differential privacy (DP-FedAvg): updates clipped, averaged with equal weights, noised"
        );
    }
    let sa = &config.secure_aggregation;
    let codec = if sa.enabled {
        tracing::info!(
            neighbours = sa.neighbours,
            max_dropout = sa.max_dropout,
            range = sa.range,
            "secure aggregation (SecAgg+): the coordinator sees only the sum of each round's updates"
        );
        fedge_common::codec::Codec::Masked
    } else {
        config.codec.codec()?
    };
    tracing::info!(
        algorithm = config.train.algorithm.name(),
        aggregator = %strategy.aggregator,
        server_optimizer = strategy.server.kind().name(),
        server_lr = st.server_lr,
        clip_norm = st.clip(),
        accumulator = ?strategy.precision,
        update_codec = %codec,
        "strategy"
    );
    Ok((strategy, codec))
}

/// The run's store and where the run starts: an unfinished run in
/// `out_dir` resumes from its checkpoint (the strategy's state and the
/// privacy accountant restored into `strategy`), or a new run starts from
/// `initial`, written as round 0.
fn open_store(
    config: &CoordinatorConfig,
    kind: fedge_learn::model::ModelKind,
    source: &fedge_learn::data::DataSource,
    manifest: &fedge_common::params::Manifest,
    initial: Vec<f32>,
    strategy: &mut Strategy,
) -> Result<(RunStore, u64, Vec<f32>)> {
    let numel = manifest.numel();
    let keep = config.checkpoint.keep_round_models;
    let unfinished = if config.checkpoint.resume {
        RunStore::unfinished(&config.out_dir, keep, (*manifest).clone())?
    } else {
        None
    };
    let (store, version, global) = match unfinished {
        Some(mut store) => {
            // The checkpoint's model replaces the initial one: free it
            // before reading, so resuming holds one model besides the file.
            drop(initial);
            let cp = store.read_checkpoint()?;
            strategy
                .restore(cp.strategy, cp.server_steps)
                .map_err(|e| Error::Checkpoint(format!("{e} (was the strategy changed since the run started?)")))?;
            if let Some(p) = &mut strategy.privacy {
                p.replay(
                    store
                        .history
                        .rounds
                        .iter()
                        .take(cp.round as usize)
                        .map(|r| r.privacy.as_ref()),
                )?;
                tracing::info!(epsilon = p.epsilon(), clip_norm = p.clip, "privacy accountant restored");
            }
            store.history.resumed += 1;
            store.history.config = config.clone();
            store.write_history()?;
            tracing::info!(
                run_id = %store.history.run_id,
                rounds_completed = cp.round,
                of = config.rounds,
                out_dir = %config.out_dir.display(),
                "resuming an unfinished run from its checkpoint"
            );
            (store, cp.round, cp.global)
        }
        None => {
            let history = RunHistory {
                run_id: format!("run-{}", now_ms()),
                model: kind.name().into(),
                parameters: numel,
                data: source.describe(),
                protocol_version: pb::PROTOCOL_VERSION,
                fedge_version: env!("CARGO_PKG_VERSION").into(),
                config: config.clone(),
                started_unix_ms: now_ms(),
                finished: false,
                resumed: 0,
                peak_rss_bytes: None,
                stop_reason: None,
                rounds: Vec::new(),
            };
            // A new run: checkpoints of an earlier run in this folder are stale.
            let stale = config.out_dir.join("checkpoint");
            if stale.exists() {
                std::fs::remove_dir_all(&stale).map_err(|e| Error::Io {
                    context: format!("removing {}", stale.display()),
                    source: e,
                })?;
            }
            let store = RunStore::create(&config.out_dir, keep, (*manifest).clone(), history)?;
            let (named, _) = strategy.state();
            store.persist_initial(&initial, &named)?;
            (store, 0, initial)
        }
    };
    Ok((store, version, global))
}

/// The round machine's settings. A simulation's virtual nodes queue on a
/// few trainer threads, so late arrivals there are no stragglers.
/// The (node, task) pairs of the asynchronous updates the last
/// `max_staleness + 1` saved steps applied: an update kept over a restart
/// that is not too stale to take would be one of those if it were applied.
fn applied_tasks(rounds: &[crate::runtime::store::RoundRecord], max_staleness: u32) -> BTreeSet<(String, u64)> {
    rounds
        .iter()
        .rev()
        .take(max_staleness as usize + 1)
        .flat_map(|r| &r.participants)
        .filter_map(|p| p.task.map(|t| (p.node.clone(), t)))
        .collect()
}

fn round_settings(
    config: &CoordinatorConfig,
    in_process_nodes: bool,
    track_direction: bool,
    first_task: u64,
    applied: BTreeSet<(String, u64)>,
) -> RoundSettings {
    let sa = &config.secure_aggregation;
    RoundSettings {
        total_rounds: u64::from(config.rounds),
        fraction: config.sampling.fraction,
        min_nodes: config.sampling.min_nodes as usize,
        min_available: config.sampling.min_available as usize,
        deadline_ms: config.sampling.round_deadline.as_millis() as u64,
        seed: config.seed,
        max_attempts: config.sampling.max_attempts,
        failure_cooldown_rounds: u64::from(config.sampling.failure_cooldown_rounds),
        // A simulation's virtual nodes queue on a few trainer threads:
        // late arrivals there are no stragglers.
        track_direction,
        straggler_factor: if in_process_nodes {
            0.0
        } else {
            config.sampling.straggler_factor
        },
        federated_every: u64::from(config.eval.federated_every),
        train: config.train.clone(),
        secure: sa.enabled.then_some(secure::SecureSettings {
            neighbours: sa.neighbours as usize,
            max_dropout: sa.max_dropout,
            range: sa.range as f32,
            step_timeout_ms: sa.step_timeout.as_millis() as u64,
        }),
        asynchronous: config.asynchronous.settings(first_task, applied),
    }
}

/// What the driver task ended with.
pub(crate) fn driver_outcome(
    joined: std::result::Result<Result<Option<RunSummary>>, tokio::task::JoinError>,
) -> Result<Result<Option<RunSummary>>> {
    joined.map_err(|e| Error::Internal(format!("driver task failed: {e}")))
}

/// Asks the driver to stop (every completed round is on disk) and waits for it.
pub(crate) async fn stop_driver(
    task: tokio::task::JoinHandle<Result<Option<RunSummary>>>,
    stop: &CancellationToken,
) -> Result<Result<Option<RunSummary>>> {
    tracing::info!("shutdown requested");
    stop.cancel();
    driver_outcome(task.await)
}

/// The HTTP side's listener, TLS configuration and operators.
type HttpParts = (TcpListener, Option<Arc<rustls::ServerConfig>>, http::Operators);

/// Binds the HTTP side (when `http.listen` is set) and reads its TLS
/// settings and operators, so that a bad file stops the start.
pub(crate) async fn prepare_http(config: &CoordinatorConfig) -> Result<Option<HttpParts>> {
    Ok(match config.http.listen {
        Some(addr) => {
            let (http, sec) = (&config.http, &config.security);
            let tls = if http.tls(sec) {
                http::listen::server_config(sec)?
            } else {
                None
            };
            let operators = match &http.operators {
                Some(path) if http.authenticated(sec) => http::Operators(Some(security::load_operators(path)?)),
                _ => http::Operators(None),
            };
            Some((http::bind(addr).await?, tls, operators))
        }
        None => None,
    })
}

/// Serves the dashboard, `/api/status`, `/metrics` and `/healthz` until `stop`.
pub(crate) fn spawn_http(
    (tcp, tls, operators): HttpParts,
    config: &CoordinatorConfig,
    status_rx: watch::Receiver<status::Status>,
    metrics: Arc<metrics::Metrics>,
    stop: CancellationToken,
) -> Result<()> {
    let sec = &config.security;
    let config_json = serde_json::to_value(config).unwrap_or_default();
    let addr = tcp.local_addr().ok();
    tracing::info!(
        addr = ?addr,
        tls = tls.is_some(),
        operators = operators.0.as_ref().map_or(0, |o| o.len()),
        client_certificates = tls.is_some() && sec.client_ca.is_some(),
        "http listening (dashboard /, /api/status, /metrics, /healthz)"
    );
    if addr.is_some_and(|a| !a.ip().is_loopback()) && (tls.is_none() || operators.0.is_none()) {
        tracing::warn!(
            addr = ?addr,
            tls = tls.is_some(),
            authenticated = operators.0.is_some(),
            "the HTTP side (dashboard, status, metrics) is served beyond loopback without TLS or without \
             operator authentication; expose it only on a private network"
        );
    }
    let listener = http::HttpListener::new(tcp, tls, stop.clone())?;
    tokio::spawn(async move {
        if let Err(e) = http::serve(listener, status_rx, metrics, config_json, operators, stop).await {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    Ok(())
}
