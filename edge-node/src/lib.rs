//! The fedge edge node: joins a coordinator, trains on data that never
//! leaves the device, and sends back only model updates.
//!
//! # Layout
//!
//! - [`config`]: [`NodeConfig`], loaded from defaults, a TOML file,
//!   `FEDGE_NODE_*` variables and flags.
//! - [`connect`]: the channel to the coordinator (TLS, keepalives).
//! - [`session`]: one connection's life: join, instructions, fetch, train, submit.
//! - [`trainer`]: the training thread that owns the data and the `VarStore`.
//! - [`backoff`]: reconnect delays with jitter.
//! - [`availability`]: the emulated cycle of online and offline windows.
//! - [`health`]: the heartbeat file behind `edge-node health`.
//! - [`serve`]: local predictions over HTTP with the latest global model.
//! - [`run`]: the entry point the binary and the tests call: load data, then
//!   run sessions, reconnecting with backoff, until the run stops.

pub mod availability;
pub mod backoff;
pub mod config;
pub mod connect;
mod error;
pub mod health;
pub mod serve;
pub mod session;
pub mod trainer;

use std::future::Future;

pub use config::NodeConfig;
pub use error::{Error, Result};
use fedge_learn::data::{Dataset, Split};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::availability::Window;
use crate::backoff::Backoff;
use crate::session::{ModelCache, NodeStats, SessionCtx, SessionEnd, run_session};
use crate::trainer::{Trainer, TrainerSettings};

/// Loads local data, then serves the coordinator until it ends the run
/// (returns the reason) or `shutdown` resolves (returns `None`).
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<Option<String>> {
    config.validate()?;
    let _heartbeat = config.state_dir.as_deref().map(health::spawn).transpose()?;
    let device = config.device()?;
    let source = config.data.source()?;
    let partition = config.partition.clone();
    let holdout = config.holdout;
    let describe = source.describe();
    let data = tokio::task::spawn_blocking(move || -> Result<_> {
        // A partitioned node keeps only its own samples (CIFAR-10 never holds the whole set).
        let (mine, seed) = match partition {
            Some(p) => {
                let scheme = p.scheme()?;
                let mine = source.load_part(Split::Train, |labels| {
                    Ok(scheme.split(labels, p.count, p.seed)?.swap_remove(p.index))
                })?;
                (mine, p.seed ^ p.index as u64)
            }
            None => (source.load(Split::Train)?, 0),
        };
        Ok(split_holdout(mine, holdout, seed))
    })
    .await
    .map_err(|e| Error::Trainer(format!("data loading task failed: {e}")))??;
    let (data, held_out) = data;
    let num_samples = data.len() as u64;
    let data_shape = data.shape();
    if num_samples == 0 {
        return Err(Error::Config("this node has no training samples".into()));
    }
    tracing::info!(
        node = %config.name,
        data = %describe,
        partition = ?config.partition.as_ref().map(|p| format!("{}/{} {}", p.index, p.count, p.scheme)),
        samples = num_samples,
        held_out = held_out.as_ref().map_or(0, |h| h.len()),
        ?device,
        "local data loaded"
    );
    if config.coordinator.starts_with("http://") {
        tracing::warn!(
            coordinator = %config.coordinator,
            "INSECURE: plaintext connection to the coordinator (security.insecure = true); this node's updates \
             and credentials cross the network unencrypted. Use this on one machine only."
        );
    }
    if config.adversary.kind != crate::config::AdversaryKind::None {
        tracing::warn!(
            kind = ?config.adversary.kind,
            scale = config.adversary.scale,
            "adversary mode: this node sends corrupted updates (robustness experiments only)"
        );
    }
    if config.train.slowdown > 1.0 {
        tracing::info!(
            slowdown = config.train.slowdown,
            "emulating a slower device: each training step takes this many times its real time"
        );
    }
    let settings = TrainerSettings {
        device,
        threads: config.threads,
        state_dir: config.state_dir.clone(),
        adversary: config.adversary.clone(),
        progress: config.progress && config.log_format == fedge_common::config::LogFormat::Text && {
            use std::io::IsTerminal;
            std::io::stderr().is_terminal()
        },
        pace: fedge_learn::train::Pace::slowdown(config.train.slowdown),
    };
    let trainer = Trainer::spawn(data, held_out, settings)?;
    let feed = match config.serve.listen {
        Some(addr) => Some(serve::start(addr).await?),
        None => None,
    };
    let mut cache = ModelCache::default();
    let mut stats = NodeStats::default();
    let mut backoff = Backoff::new(config.reconnect.initial, config.reconnect.max);
    tokio::pin!(shutdown);
    let started = tokio::time::Instant::now();
    let availability = &config.availability;
    if availability.cycles() {
        tracing::info!(
            online = ?availability.online,
            offline = ?availability.offline,
            offset = ?availability.offset,
            "emulating a device that comes and goes"
        );
    }
    loop {
        if let Some(Window::Offline(away)) = availability.window(started.elapsed()) {
            tracing::info!(
                back_in_ms = away.as_millis() as u64,
                "offline (availability); holding no session"
            );
            tokio::select! {
                () = &mut shutdown => return Ok(None),
                () = tokio::time::sleep(away) => {}
            }
        }
        // The online window's end, when the node has one.
        let online_until = match availability.window(started.elapsed()) {
            Some(Window::Online(left)) => Some(tokio::time::Instant::now() + left),
            _ => None,
        };
        let joins_before = stats.joins;
        let session = run_session(SessionCtx {
            config: &config,
            trainer: &trainer,
            num_samples,
            data_shape,
            cache: &mut cache,
            stats: &mut stats,
            feed: feed.as_ref(),
        });
        let outcome = tokio::select! {
            () = &mut shutdown => {
                tracing::info!("shutdown requested");
                return Ok(None);
            }
            outcome = session => outcome,
            () = sleep_until(online_until) => {
                trainer.interrupt();
                tracing::info!(
                    away_ms = availability.offline.as_millis() as u64,
                    "going offline (availability): the session and any training in progress are dropped"
                );
                continue;
            }
        };
        if stats.joins != joins_before {
            backoff.reset();
        }
        match outcome {
            Ok(SessionEnd::Stopped { reason }) => {
                tracing::info!(
                    reason = %reason,
                    rounds_trained = stats.rounds_trained,
                    bytes_up = stats.bytes_up,
                    bytes_down = stats.bytes_down,
                    peak_rss_mb = fedge_common::fsutil::peak_rss_bytes().map(|b| b / (1 << 20)),
                    "run over; stopping"
                );
                return Ok(Some(reason));
            }
            Ok(SessionEnd::StreamClosed) => tracing::warn!("instruction stream closed"),
            Err(Error::Refused(reason)) => return Err(Error::Refused(reason)),
            Err(e) => tracing::warn!(error = %e, "session ended"),
        }
        let delay = backoff.next_delay();
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::select! {
            () = &mut shutdown => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Sleeps until `deadline`; never returns without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// `edge-node predict --repeat N`: classifies `images` (decoded once) `n`
/// times as one batch and reports the latency percentiles of a pass, with
/// `threads` libtorch threads as configured by the caller.
pub fn latency(
    classifier: &fedge_learn::export::Classifier,
    images: &[std::path::PathBuf],
    n: usize,
) -> Result<String> {
    let pixels = classifier.read_images(images)?;
    classifier.classify_pixels(&pixels, 1)?; // warm-up
    let mut ms: Vec<f64> = (0..n.max(1))
        .map(|_| {
            let t = std::time::Instant::now();
            classifier
                .classify_pixels(&pixels, 1)
                .map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<std::result::Result<_, _>>()?;
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    Ok(format!(
        "batch {} x {}: p50 {:.3} ms  p99 {:.3} ms  ({:.3} ms per image at p50, {} passes, {} libtorch threads)\n",
        images.len(),
        classifier.card.model,
        pct(0.5),
        pct(0.99),
        pct(0.5) / images.len() as f64,
        ms.len(),
        tch::get_num_threads()
    ))
}

/// Splits `fraction` of `data` off for federated evaluation (seeded shuffle).
fn split_holdout(data: Dataset, fraction: f64, seed: u64) -> (Dataset, Option<Dataset>) {
    let n = data.len();
    let k = ((n as f64) * fraction).round() as usize;
    if k == 0 || k >= n {
        return (data, None);
    }
    let mut idx: Vec<i64> = (0..n as i64).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x686f_6c64));
    let (held, train) = idx.split_at(k);
    (data.subset(train), Some(data.subset(held)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdout_is_a_disjoint_seeded_fraction() {
        let data = fedge_learn::data::synthetic(1, 1, 200);
        let (train, held) = split_holdout(data, 0.1, 3);
        let held = held.unwrap();
        assert_eq!((train.len(), held.len()), (180, 20));
        let (none_train, none) = split_holdout(fedge_learn::data::synthetic(1, 1, 10), 0.0, 3);
        assert!(none.is_none() && none_train.len() == 10);
    }
}
