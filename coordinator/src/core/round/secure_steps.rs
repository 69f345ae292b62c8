//! Secure aggregation's steps inside a round: advertising keys, sharing,
//! masked inputs, unmasking (see [`crate::core::secure`] for the protocol's
//! coordinator side and `fedge_common::secagg` for the protocol itself).

use std::collections::BTreeSet;

use fedge_common::task::Algorithm;

use crate::core::secure::{SecAggInput, SecureSettings, Step};

use super::{
    Contribution, FoldJob, FoldTarget, Output, Phase, Rejection, RoundMachine, Update, UpdateKind, describe, mix,
};

/// Secure aggregation's steps (see [`crate::core::secure`]).
impl RoundMachine {
    /// The factor that turns what a node sends into the model change it
    /// asks for: 1 for a delta, −η for a FedSGD gradient.
    pub(super) fn update_step(&self, round: u64) -> f64 {
        match self.settings.train.algorithm {
            Algorithm::FedSgd => -self.settings.train.learning_rate_at(round, self.settings.total_rounds),
            _ => 1.0,
        }
    }

    /// The secure round in progress: its step and Shamir threshold.
    pub fn secure_round(&self) -> Option<(Step, usize)> {
        match &self.phase {
            Phase::Training(r) => r.secure.as_ref().map(|s| (s.step, s.threshold)),
            _ => None,
        }
    }

    /// The run's secure aggregation settings, when it uses it.
    pub fn secure_settings(&self) -> Option<&SecureSettings> {
        self.settings.secure.as_ref()
    }

    /// A secure-aggregation message (`bytes` on the wire) from the node
    /// behind `session` for `round`.
    pub fn secure_message(
        &mut self,
        session: &str,
        round: u64,
        input: SecAggInput,
        bytes: u64,
        now_ms: u64,
    ) -> Result<Vec<Output>, Rejection> {
        let name = self.node_of(session).ok_or(Rejection::UnknownSession)?.to_owned();
        let current = self.current_round();
        let Phase::Training(r) = &mut self.phase else {
            return Err(Rejection::WrongRound { got: round, current });
        };
        if r.round != round {
            return Err(Rejection::WrongRound {
                got: round,
                current: Some(r.round),
            });
        }
        if !r.selected.contains(&name) {
            return Err(Rejection::NotSelected { node: name, round });
        }
        let Some(s) = &mut r.secure else {
            return Err(Rejection::SecAgg("this run does not use secure aggregation".into()));
        };
        s.receive(&name, input, bytes).map_err(|e| Rejection::SecAgg(e.0))?;
        if let Some(rec) = self.nodes.get_mut(&name) {
            rec.last_seen_ms = now_ms;
        }
        Ok(self.advance_secure(now_ms))
    }

    /// A masked input: checked for what can be checked (its size, its
    /// sender's part in the protocol), then added to the masked sum.
    pub(super) fn submit_masked(
        &mut self,
        name: String,
        update: Update,
        now_ms: u64,
    ) -> Result<(usize, Vec<Output>), Rejection> {
        self.check_samples(&name, update.num_samples)?;
        let numel = self.global.len();
        let expected_kind = match self.settings.train.algorithm {
            Algorithm::FedSgd => UpdateKind::Gradient,
            _ => UpdateKind::Delta,
        };
        let Phase::Training(r) = &mut self.phase else {
            unreachable!("admit checked the phase");
        };
        let s = r.secure.as_ref().expect("checked by the caller");
        if s.step != Step::Masking || !s.shared.contains(&name) {
            return Err(Rejection::SecAgg(format!(
                "node {name} did not share its keys in round {}, so its masked input could never be unmasked",
                r.round
            )));
        }
        let body = &update.body;
        if body.source.len() != numel + 1 || body.control {
            return Err(Rejection::WrongSize {
                got: body.source.len().saturating_sub(1),
                expected: numel,
            });
        }
        if update.kind != expected_kind {
            return Err(Rejection::WrongKind {
                expected: describe(expected_kind, false),
                got: describe(update.kind, false),
            });
        }
        r.folding.insert(name.clone());
        let out = vec![Output::Fold(Box::new(FoldJob {
            round: r.round,
            attempt: r.attempt,
            node: name.clone(),
            target: FoldTarget::Masked {
                server: s.server.clone(),
                id: s.ids[&name],
            },
            source: body.source.clone(),
            weight: 1.0,
            scale: 1.0,
            direction: None,
        }))];
        // Masked: neither the norm nor clipping is visible.
        let accepted = self.record(Contribution::new(name, &update, f64::NAN, false, f64::NAN), now_ms);
        Ok((accepted, out))
    }

    /// An update's sample count: at least one, and at most what its node
    /// declared when it joined (what its weight was planned from).
    pub(super) fn check_samples(&self, name: &str, claimed: u64) -> Result<(), Rejection> {
        if claimed == 0 {
            return Err(Rejection::NoSamples);
        }
        let declared = self.nodes.get(name).map_or(0, |n| n.num_samples);
        if claimed > declared {
            return Err(Rejection::TooManySamples { claimed, declared });
        }
        Ok(())
    }

    /// Records an accepted update in the round in progress, with its
    /// arrival after the round's start, and the node's activity; returns
    /// the number of updates the round has accepted.
    pub(super) fn record(&mut self, mut c: Contribution, now_ms: u64) -> usize {
        let Phase::Training(r) = &mut self.phase else {
            unreachable!("only a round in progress accepts updates");
        };
        c.arrived_seconds = now_ms.saturating_sub(r.started_ms) as f64 / 1000.0;
        let rec = self.nodes.get_mut(&c.node).expect("known node");
        rec.rounds_contributed += 1;
        rec.cuts = 0;
        rec.last_seen_ms = now_ms;
        r.accepted.push(c);
        let half = r.selected.len().div_ceil(2).max(self.settings.min_nodes);
        if r.half_ms.is_none() && r.accepted.len() >= half {
            r.half_ms = Some(now_ms);
        }
        r.accepted.len()
    }

    /// Moves a secure round on as far as its nodes' answers (or the step
    /// deadlines) allow.
    pub(super) fn advance_secure(&mut self, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        let settings = self.settings.secure.clone().expect("a secure round has settings");
        let timeout = settings.step_timeout_ms;
        loop {
            let Phase::Training(r) = &mut self.phase else {
                return out;
            };
            let Some(s) = &mut r.secure else {
                return out;
            };
            let nodes = &self.nodes;
            let live = |n: &String| !r.refused.contains(n) && nodes.get(n).is_some_and(|rec| rec.connected);
            let expired = now_ms >= s.step_deadline_ms;
            let needed = s.threshold.max(self.settings.min_nodes);
            let (round, attempt) = (r.round, r.attempt);
            let failed = match s.step {
                Step::Advertising => {
                    let pending = r
                        .selected
                        .iter()
                        .filter(|n| !s.advertised.contains(*n) && live(n))
                        .count();
                    if pending > 0 && !expired {
                        return out;
                    }
                    let seed = mix(self.settings.seed, round, u64::from(attempt) ^ 0x5ec);
                    match s.roster(round, seed, settings.neighbours, now_ms, timeout) {
                        Ok(msgs) => {
                            tracing::debug!(
                                round,
                                advertised = s.advertised.len(),
                                "secure aggregation: roster sent"
                            );
                            out.extend(msgs.into_iter().map(|(node, message)| Output::SecAgg { node, message }));
                            None
                        }
                        Err(e) => Some(e.0),
                    }
                }
                Step::Sharing => {
                    let pending = s
                        .advertised
                        .iter()
                        .filter(|n| !s.shared.contains(*n) && live(n))
                        .count();
                    if pending > 0 && !expired {
                        return out;
                    }
                    if s.shared.len() < needed {
                        Some(format!(
                            "{} nodes shared keys; the round needs {needed}",
                            s.shared.len()
                        ))
                    } else {
                        let msgs = s.forward_shares(round, r.deadline_ms, now_ms);
                        out.extend(msgs.into_iter().map(|(node, message)| Output::SecAgg { node, message }));
                        None
                    }
                }
                Step::Masking => {
                    if !r.folding.is_empty() {
                        return out;
                    }
                    let delivered: BTreeSet<String> = r.accepted.iter().map(|c| c.node.clone()).collect();
                    let pending = s.shared.iter().filter(|n| !delivered.contains(*n) && live(n)).count();
                    if pending > 0 && now_ms < r.deadline_ms {
                        return out;
                    }
                    if delivered.len() < needed {
                        Some(format!(
                            "{} masked inputs arrived; the round needs {needed}",
                            delivered.len()
                        ))
                    } else {
                        tracing::info!(
                            round,
                            survivors = delivered.len(),
                            dropped = s.shared.len() - delivered.len(),
                            "secure aggregation: asking the survivors to unmask"
                        );
                        let msgs = s.unmask(round, delivered, now_ms, timeout);
                        out.extend(msgs.into_iter().map(|(node, message)| Output::SecAgg { node, message }));
                        None
                    }
                }
                Step::Unmasking => {
                    let pending = s
                        .survivors
                        .iter()
                        .filter(|n| !s.reveals.contains_key(*n) && nodes.get(*n).is_some_and(|rec| rec.connected))
                        .count();
                    if pending > 0 && !expired {
                        return out;
                    }
                    out.extend(self.close(now_ms));
                    return out;
                }
            };
            if let Some(reason) = failed {
                tracing::warn!(
                    round,
                    attempt,
                    reason,
                    "secure aggregation: too few nodes; retrying the round"
                );
                out.extend(self.retry(now_ms));
                return out;
            }
        }
    }
}
