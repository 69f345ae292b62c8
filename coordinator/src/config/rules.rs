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
