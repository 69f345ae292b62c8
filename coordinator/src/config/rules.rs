//! The rules that tie sections together, in one place: each section checks
//! its own ranges (`validate` beside it); what one section's value allows
//! of another's is checked here. [`CoordinatorConfig::validate`] runs both,
//! each rule after the sections it reads.

use fedge_common::task::{Algorithm, LocalOptimizer};

use crate::core::privacy::NoiseMode;
use crate::core::strategy::Aggregator;
use crate::{Error, Result};

use super::CoordinatorConfig;

impl CoordinatorConfig {
    /// The gRPC and HTTP sides listen on ports of their own.
    pub(super) fn check_ports(&self) -> Result<()> {
        if self.http.listen.is_some_and(|h| h == self.listen) {
            return Err(Error::Config(format!(
                "http.listen and listen are both {}; the HTTP server needs a port of its own",
                self.listen
            )));
        }
        Ok(())
    }

    /// What the aggregator and the algorithm need of sampling and local
    /// training.
    pub(super) fn check_training(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let st = &self.strategy;
        let agg = st.aggregator();
        let need = agg.min_updates();
        if (self.sampling.min_nodes as usize) < need {
            return bad(format!(
                "strategy {agg} needs at least {need} updates per round; set sampling.min_nodes to {need} or more (it is {})",
                self.sampling.min_nodes
            ));
        }
        if let Aggregator::MultiKrum { f, m } = agg
            && m > 0
            && m + f > self.sampling.min_nodes as usize
        {
            return bad(format!(
                "strategy.multi_krum_m ({m}) plus strategy.byzantine ({f}) must not exceed sampling.min_nodes ({})",
                self.sampling.min_nodes
            ));
        }
        if self.train.algorithm == Algorithm::Scaffold && agg != Aggregator::Mean {
            return bad(format!(
                "train.algorithm = \"scaffold\" averages control variates and needs strategy.aggregator = \"mean\", not {agg}"
            ));
        }
        if self.train.algorithm == Algorithm::Scaffold && self.train.optimizer != LocalOptimizer::Sgd {
            return bad("train.algorithm = \"scaffold\" estimates control variates from SGD steps and needs train.optimizer = \"sgd\"".into());
        }
        Ok(())
    }

    /// What asynchronous training composes with, and what a buffer needs.
    pub(super) fn check_async(&self) -> Result<()> {
        let a = &self.asynchronous;
        if !a.enabled {
            return Ok(());
        }
        let bad = |m: String| Err(Error::Config(format!("async.enabled: {m}")));
        let k = a.buffer_size as usize;
        let agg = self.strategy.aggregator();
        if agg.min_updates() > k {
            return bad(format!(
                "strategy {agg} needs at least {} updates per server step; set async.buffer_size to that or more (it is {k})",
                agg.min_updates()
            ));
        }
        if a.concurrency > 0 && (a.concurrency as usize) < k {
            return bad(format!(
                "async.concurrency ({}) is below async.buffer_size ({k}): fewer nodes would train at once than a step needs, so every step would wait for nodes to finish one after another",
                a.concurrency
            ));
        }
        match self.train.algorithm {
            Algorithm::Scaffold => {
                return bad(
                    "train.algorithm = \"scaffold\" corrects each node's steps with the server's control \
                     variate as of its round's start, and moves that control by the round's share of the fleet; \
                     with asynchronous steps the control moves while nodes train and no round has a share, so the \
                     correction would be stale. Use fedavg or fedprox, or synchronous rounds for scaffold"
                        .into(),
                );
            }
            Algorithm::FedSgd => {
                return bad(
                    "train.algorithm = \"fedsgd\" sends one gradient per round, taken at that round's \
                     learning rate; for the same one-step updates asynchronously use train.algorithm = \"fedavg\" \
                     with train.max_steps = 1"
                        .into(),
                );
            }
            _ => {}
        }
        if self.privacy.noise != NoiseMode::Off {
            return bad(
                "differential privacy with asynchronous training is not available: the accountant counts \
                 rounds that sample a cohort at a known rate, and an asynchronous step takes whichever nodes finish \
                 first. Turn privacy off, or train in synchronous rounds"
                    .into(),
            );
        }
        if self.secure_aggregation.enabled {
            return bad(
                "secure aggregation unmasks only the sum of a cohort that exchanged keys and delivers \
                 together, while an asynchronous buffer gathers updates from nodes that started from different \
                 versions at different times; train in synchronous rounds to use secure aggregation"
                    .into(),
            );
        }
        Ok(())
    }

    /// Where nodes authenticate, the HTTP side's operators must too.
    pub(super) fn check_access(&self) -> Result<()> {
        if self.http.listen.is_some() && self.http.authenticated(&self.security) && self.http.operators.is_none() {
            return Err(Error::Config(format!(
                "http: nodes must authenticate (security.node_auth = \"{}\"), so the HTTP side must too: set \
                 http.operators to a file of operator token hashes (`coordinator certs` writes operators.toml), \
                 or http.insecure = true to serve it to anyone (behind your own authenticating proxy)",
                self.security.node_auth.name()
            )));
        }
        Ok(())
    }

    /// A message must hold a whole chunk and its framing.
    pub(super) fn check_limits(&self) -> Result<()> {
        let chunk_bytes = self.wire.chunk_bytes;
        if self.limits.max_message_bytes < chunk_bytes + 1024 {
            return Err(Error::Config(format!(
                "limits: max_message_bytes ({}) must exceed wire.chunk_bytes ({chunk_bytes}) by at least 1 KiB of framing",
                self.limits.max_message_bytes
            )));
        }
        Ok(())
    }

    /// What differential privacy needs of the strategy and the algorithm.
    pub(super) fn check_privacy(&self) -> Result<()> {
        if !self.privacy.enabled() {
            return Ok(());
        }
        let bad = |m: String| Err(Error::Config(format!("privacy: {m}")));
        let agg = self.strategy.aggregator();
        if agg != Aggregator::Mean {
            return bad(format!(
                "differential privacy bounds what one node adds to a sum of clipped updates, so it needs \
                 strategy.aggregator = \"mean\"; {agg} looks at individual updates"
            ));
        }
        if self.strategy.clip_norm > 0.0 {
            return bad(
                "strategy.clip_norm and privacy.clip_norm both clip updates; set only privacy.clip_norm".into(),
            );
        }
        if self.train.algorithm == Algorithm::Scaffold {
            return bad(
                "train.algorithm = \"scaffold\" sends control variates that the clipping does not bound; \
                 use fedavg, fedprox or fedsgd"
                    .into(),
            );
        }
        Ok(())
    }

    /// What secure aggregation needs of sampling, strategy, algorithm,
    /// codec and privacy.
    pub(super) fn check_secure_aggregation(&self) -> Result<()> {
        if !self.secure_aggregation.enabled {
            return Ok(());
        }
        let bad = |m: String| Err(Error::Config(format!("secure_aggregation: {m}")));
        if self.sampling.min_nodes < 3 {
            return bad(format!(
                "sampling.min_nodes is {}; a sum of fewer than 3 updates would show one node's update to \
                 another who knows its own, so secure aggregation needs at least 3",
                self.sampling.min_nodes
            ));
        }
        let st = &self.strategy;
        let agg = st.aggregator();
        if agg != Aggregator::Mean {
            return bad(format!(
                "the coordinator sees only the sum of the updates, so it cannot run strategy.aggregator = \
                 \"{agg}\", which looks at individual updates; use \"mean\""
            ));
        }
        if st.clip_norm > 0.0 || st.max_update_norm > 0.0 {
            return bad(
                "strategy.clip_norm and strategy.max_update_norm need each update's norm, which the coordinator \
                 cannot see; clip on the nodes with privacy.clip_norm"
                    .into(),
            );
        }
        if self.train.algorithm == Algorithm::Scaffold {
            return bad(
                "train.algorithm = \"scaffold\" sends control variates beside the update; use fedavg, \
                 fedprox or fedsgd"
                    .into(),
            );
        }
        if self.codec.update != "f32" {
            return bad(format!(
                "masked updates are 32-bit ring elements, so codec.update must be \"f32\" (got \"{}\")",
                self.codec.update
            ));
        }
        if self.privacy.noise == NoiseMode::Central {
            return bad(
                "privacy.noise = \"central\" has the coordinator clip each update, which it cannot see; \
                 use \"distributed\" (the nodes clip and add the noise)"
                    .into(),
            );
        }
        Ok(())
    }
}
