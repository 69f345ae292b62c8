//! Secure aggregation in the round: the coordinator's side of SecAgg+
//! ([`fedge_common::secagg`]) as steps of the round machine.
//!
//! A secure round goes through four steps after its tasks are sent, each
//! closing when every node it waits for has answered (or left), or at its
//! own deadline:
//!
//! 1. **Advertising**: the selected nodes send fresh public keys. The roster
//!    and each node's neighbours go out to those that did.
//! 2. **Sharing**: they send their secrets' shares, sealed for their
//!    neighbours; each then receives the shares sealed for it.
//! 3. **Masking**: they train and send their quantized, masked updates
//!    (`ENCODING_MASKED_U32`), which are added into one running sum in
//!    `Z_2^32`. This step ends as a plain round's training would (everyone
//!    delivered or left, or the round's deadline).
//! 4. **Unmasking**: the survivors are asked, once, for the shares that
//!    remove the survivors' self masks and the dropped nodes' pairwise
//!    masks; then the sum is unmasked and dequantized off the runtime.
//!
//! Too few nodes at any step (fewer than the Shamir threshold or
//! `sampling.min_nodes`) retries the round with a fresh sample and fresh keys.
//! The nodes multiply their update by a weight the coordinator gives them
//! (samples over the round's mean; 1 under differential privacy), so the
//! unmasked sum over the survivors' weights is FedAvg's weighted mean. One
//! extra value per node carries its differential-privacy clipping indicator,
//! so adaptive clipping counts unclipped updates without seeing any.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use fedge_common::secagg::{
    Advertise, NodeId, Quantizer, Reveal, SHARE_BYTES, SealedShares, SecAggError, Server, UnmaskRequest,
};
use serde::{Deserialize, Serialize};

use crate::core::strategy::aggregate::lock;

/// Secure aggregation settings of the round logic.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSettings {
    /// Neighbours per node; 0: every other node.
    pub neighbours: usize,
    /// Fraction of a node's share holders that may drop out.
    pub max_dropout: f64,
    /// Values are clamped to [−range, range] before quantization.
    pub range: f32,
    /// Deadline of the advertising, sharing and unmasking steps.
    pub step_timeout_ms: u64,
}

impl SecureSettings {
    /// Share holders of each node (its neighbours and itself) in a round of `n`.
    pub fn holders(&self, n: usize) -> usize {
        let k = self.neighbours;
        if k == 0 || k + 1 >= n {
            n
        } else {
            (2 * k.div_ceil(2) + 1).min(n)
        }
    }

    /// The Shamir threshold for a round of `n` nodes: enough holders that
    /// at most `max_dropout` of them may be missing, and at least 2.
    pub fn threshold(&self, n: usize) -> usize {
        let h = self.holders(n);
        (((1.0 - self.max_dropout) * h as f64).ceil() as usize).clamp(2, h.max(2))
    }
}

/// What a node's secure-aggregation task says (beside the training task).
#[derive(Debug, Clone, PartialEq)]
pub struct SecureTask {
    pub id: NodeId,
    pub threshold: usize,
    pub quantizer: Quantizer,
    /// The node multiplies its update by this.
    pub weight: f64,
}

/// A protocol message from a node.
#[derive(Debug, Clone, PartialEq)]
pub enum SecAggInput {
    Advertise(Advertise),
    Shares(Vec<SealedShares>),
    /// An unmasking answer (its `from` is set to the sender's number).
    Reveal(Reveal),
}

/// A protocol message for a node.
#[derive(Debug, Clone, PartialEq)]
pub enum SecAggOutput {
    /// Everyone who advertised keys, and this node's neighbours.
    Roster {
        round: u64,
        nodes: Vec<Advertise>,
        neighbours: Vec<NodeId>,
    },
    /// The shares sealed for this node.
    Shares { round: u64, shares: Vec<SealedShares> },
    /// Whose masks to remove.
    Unmask { round: u64, request: UnmaskRequest },
}

/// Where a secure round stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Advertising,
    Sharing,
    Masking,
    Unmasking,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Advertising => "advertising",
            Step::Sharing => "sharing",
            Step::Masking => "masking",
            Step::Unmasking => "unmasking",
        }
    }
}

/// A secure round's record in `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureRecord {
    /// Shamir threshold and share holders per node.
    pub threshold: usize,
    pub holders: usize,
    /// Bits per value of the quantized updates, and the clamping range.
    pub bits: u32,
    pub range: f32,
    /// Nodes asked, that advertised keys, that shared them, whose masked
    /// input is in the sum (survivors), that shared keys but sent no input
    /// (dropped), and survivors that answered the unmasking request.
    pub selected: usize,
    pub advertised: usize,
    pub shared: usize,
    pub survivors: usize,
    pub dropped: usize,
    pub revealed: usize,
    /// Bytes of protocol messages (keys, sealed shares, reveals) both ways.
    pub protocol_bytes: u64,
    /// Seconds from the round's start to the end of key sharing, and
    /// spent unmasking (waiting for reveals; the unmasking arithmetic is in
    /// the round's aggregation time).
    pub setup_seconds: f64,
    pub unmask_seconds: f64,
}

/// One secure round's protocol state.
#[derive(Debug)]
pub struct SecureRound {
    pub ids: BTreeMap<String, NodeId>,
    pub weights: BTreeMap<String, f64>,
    pub threshold: usize,
    pub holders: usize,
    pub quantizer: Quantizer,
    pub step: Step,
    /// Deadline of the current step (the round's own deadline while masking).
    pub step_deadline_ms: u64,
    pub server: Arc<Mutex<Server>>,
    pub advertised: BTreeSet<String>,
    pub shared: BTreeSet<String>,
    pub survivors: BTreeSet<String>,
    pub reveals: BTreeMap<String, Reveal>,
    pub protocol_bytes: u64,
    pub started_ms: u64,
    pub shared_ms: u64,
    pub unmask_started_ms: u64,
}

/// Why a protocol message was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal(pub String);

impl From<SecAggError> for Refusal {
    fn from(e: SecAggError) -> Self {
        Refusal(e.to_string())
    }
}

impl SecureRound {
    /// A round over `selected` nodes (name → samples) and a model of `dim`
    /// values (plus the clipping indicator). `equal_weights` under
    /// differential privacy.
    pub fn new(
        settings: &SecureSettings,
        round: u64,
        selected: &BTreeMap<String, u64>,
        dim: usize,
        equal_weights: bool,
        now_ms: u64,
    ) -> Self {
        let n = selected.len();
        let ids: BTreeMap<String, NodeId> = selected
            .keys()
            .enumerate()
            .map(|(i, k)| (k.clone(), i as NodeId))
            .collect();
        let mean = selected.values().map(|&s| s as f64).sum::<f64>() / n.max(1) as f64;
        let weights = selected
            .iter()
            .map(|(k, &s)| {
                let w = if equal_weights || mean <= 0.0 {
                    1.0
                } else {
                    s as f64 / mean
                };
                (k.clone(), w)
            })
            .collect();
        let threshold = settings.threshold(n);
        Self {
            ids,
            weights,
            threshold,
            holders: settings.holders(n),
            quantizer: Quantizer::new(settings.range, n),
            step: Step::Advertising,
            step_deadline_ms: now_ms + settings.step_timeout_ms,
            server: Arc::new(Mutex::new(Server::new(round, dim + 1, threshold))),
            advertised: BTreeSet::new(),
            shared: BTreeSet::new(),
            survivors: BTreeSet::new(),
            reveals: BTreeMap::new(),
            protocol_bytes: 0,
            started_ms: now_ms,
            shared_ms: now_ms,
            unmask_started_ms: now_ms,
        }
    }

    /// The task part for `node`.
    pub fn task(&self, node: &str) -> Option<SecureTask> {
        Some(SecureTask {
            id: *self.ids.get(node)?,
            threshold: self.threshold,
            quantizer: self.quantizer,
            weight: self.weights.get(node).copied().unwrap_or(1.0),
        })
    }

    /// Takes a protocol message from `node`.
    pub fn receive(&mut self, node: &str, input: SecAggInput, bytes: u64) -> Result<(), Refusal> {
        let id = *self
            .ids
            .get(node)
            .ok_or_else(|| Refusal(format!("node {node} was not selected for this round")))?;
        let late = |what: &str, step: Step| Refusal(format!("{what} came while the round is {}", step.name()));
        match input {
            SecAggInput::Advertise(a) => {
                if self.step != Step::Advertising {
                    return Err(late("keys", self.step));
                }
                if a.id != id {
                    return Err(Refusal(format!(
                        "node {node} is number {id} in this round, not {}",
                        a.id
                    )));
                }
                lock(&self.server).advertise(a)?;
                self.advertised.insert(node.to_owned());
            }
            SecAggInput::Shares(shares) => {
                if self.step != Step::Sharing {
                    return Err(late("shares", self.step));
                }
                lock(&self.server).share_keys(id, shares)?;
                self.shared.insert(node.to_owned());
            }
            SecAggInput::Reveal(mut r) => {
                if self.step != Step::Unmasking {
                    return Err(late("an unmasking answer", self.step));
                }
                if !self.survivors.contains(node) {
                    return Err(Refusal(format!("node {node} is not a survivor of this round")));
                }
                // The answer is the sender's, whatever number it claims.
                r.from = id;
                if self.reveals.contains_key(node) {
                    return Err(Refusal(format!("node {node} already answered")));
                }
                self.check_reveal(node, &r)?;
                self.reveals.insert(node.to_owned(), r);
            }
        }
        self.protocol_bytes += bytes;
        Ok(())
    }

    /// An unmasking answer may hold shares of the survivors' seeds and of
    /// the dropped nodes' mask keys, one per node, and nothing else: a
    /// share of a survivor's mask key (or a dropped node's seed) would help
    /// unmask one node's update, and is refused unused.
    fn check_reveal(&self, node: &str, r: &Reveal) -> Result<(), Refusal> {
        let by_id: BTreeMap<NodeId, &String> = self.ids.iter().map(|(n, &id)| (id, n)).collect();
        let named = |id: NodeId| by_id.get(&id).map_or_else(|| format!("number {id}"), |n| (*n).clone());
        let survivor = |id: NodeId| by_id.get(&id).is_some_and(|n| self.survivors.contains(*n));
        let dropped = |id: NodeId| {
            by_id
                .get(&id)
                .is_some_and(|n| self.shared.contains(*n) && !self.survivors.contains(*n))
        };
        for (shares, what, allowed, whose) in [
            (
                &r.seed_shares,
                "self-mask seed",
                &survivor as &dyn Fn(NodeId) -> bool,
                "survivor",
            ),
            (
                &r.key_shares,
                "mask key",
                &dropped as &dyn Fn(NodeId) -> bool,
                "dropped node",
            ),
        ] {
            let mut seen = BTreeSet::new();
            for (id, share) in shares {
                if !allowed(*id) {
                    return Err(Refusal(format!(
                        "node {node} revealed a share of the {what} of {}, which is no {whose} of this round: that could unmask one node's update",
                        named(*id)
                    )));
                }
                if !seen.insert(*id) {
                    return Err(Refusal(format!(
                        "node {node} revealed two shares of the {what} of {}",
                        named(*id)
                    )));
                }
                if share.len() != SHARE_BYTES {
                    return Err(Refusal(format!(
                        "node {node} revealed a {}-byte share of the {what} of {}; a share is {SHARE_BYTES} bytes",
                        share.len(),
                        named(*id)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Closes advertising: the roster for every node that advertised.
    pub fn roster(
        &mut self,
        round: u64,
        seed: u64,
        neighbours: usize,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Result<Vec<(String, SecAggOutput)>, Refusal> {
        let k = if neighbours == 0 { usize::MAX / 2 } else { neighbours };
        let (nodes, graph) = lock(&self.server).roster(k, seed)?;
        self.step = Step::Sharing;
        self.step_deadline_ms = now_ms + timeout_ms;
        let out = self
            .advertised
            .iter()
            .map(|name| {
                let id = self.ids[name];
                let msg = SecAggOutput::Roster {
                    round,
                    nodes: nodes.clone(),
                    neighbours: graph.get(&id).cloned().unwrap_or_default(),
                };
                self.protocol_bytes += roster_bytes(nodes.len(), graph.get(&id).map_or(0, Vec::len));
                (name.clone(), msg)
            })
            .collect();
        Ok(out)
    }

    /// Closes sharing: each sharer receives the shares sealed for it.
    pub fn forward_shares(&mut self, round: u64, deadline_ms: u64, now_ms: u64) -> Vec<(String, SecAggOutput)> {
        self.step = Step::Masking;
        self.step_deadline_ms = deadline_ms;
        self.shared_ms = now_ms;
        let server = lock(&self.server);
        let out: Vec<(String, SecAggOutput)> = self
            .shared
            .iter()
            .map(|name| {
                let shares = server.shares_for(self.ids[name]);
                (name.clone(), SecAggOutput::Shares { round, shares })
            })
            .collect();
        drop(server);
        for (_, msg) in &out {
            if let SecAggOutput::Shares { shares, .. } = msg {
                self.protocol_bytes += shares.iter().map(|s| s.ciphertext.len() as u64 + 8).sum::<u64>();
            }
        }
        out
    }

    /// Closes masking with `survivors` (whose masked input is in the sum):
    /// the unmasking request for each of them.
    pub fn unmask(
        &mut self,
        round: u64,
        survivors: BTreeSet<String>,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Vec<(String, SecAggOutput)> {
        self.step = Step::Unmasking;
        self.step_deadline_ms = now_ms + timeout_ms;
        self.unmask_started_ms = now_ms;
        self.survivors = survivors;
        let request = lock(&self.server).unmask_request();
        let out: Vec<(String, SecAggOutput)> = self
            .survivors
            .iter()
            .map(|name| {
                (
                    name.clone(),
                    SecAggOutput::Unmask {
                        round,
                        request: request.clone(),
                    },
                )
            })
            .collect();
        self.protocol_bytes += (out.len() * 4 * (request.survivors.len() + request.dropped.len())) as u64;
        out
    }

    /// Nodes that shared keys but sent no masked input.
    pub fn dropped(&self) -> usize {
        self.shared.difference(&self.survivors).count()
    }

    /// The round's record, at close.
    pub fn record(&self, selected: usize, now_ms: u64) -> SecureRecord {
        SecureRecord {
            threshold: self.threshold,
            holders: self.holders,
            bits: self.quantizer.bits,
            range: self.quantizer.range,
            selected,
            advertised: self.advertised.len(),
            shared: self.shared.len(),
            survivors: self.survivors.len(),
            dropped: self.dropped(),
            revealed: self.reveals.len(),
            protocol_bytes: self.protocol_bytes,
            setup_seconds: self.shared_ms.saturating_sub(self.started_ms) as f64 / 1000.0,
            unmask_seconds: now_ms.saturating_sub(self.unmask_started_ms) as f64 / 1000.0,
        }
    }

    /// The unmasking work, for the aggregation job.
    /// `step` turns the mean into the model change (−η for FedSGD gradients);
    /// `norm_bound` (the most, and what it is) bounds the mean's L2 norm.
    pub fn into_job(self, step: f64, norm_bound: Option<(f64, String)>) -> UnmaskJob {
        let weight_sum = self
            .survivors
            .iter()
            .map(|n| self.weights.get(n).copied().unwrap_or(1.0))
            .sum();
        let server = std::mem::replace(&mut *lock(&self.server), Server::new(0, 0, 2));
        UnmaskJob {
            names: self.ids.into_iter().map(|(name, id)| (id, name)).collect(),
            server,
            reveals: self.reveals.into_values().collect(),
            quantizer: self.quantizer,
            survivors: self.survivors.len(),
            weight_sum,
            step,
            norm_bound,
        }
    }
}

/// Bytes of a roster message: 68 per node's keys, 4 per neighbour.
fn roster_bytes(nodes: usize, neighbours: usize) -> u64 {
    (nodes * 68 + neighbours * 4) as u64
}

/// Removing the masks of a secure round and turning the sum into a mean.
#[derive(Debug)]
pub struct UnmaskJob {
    /// Node names by their number in the round.
    names: BTreeMap<NodeId, String>,
    server: Server,
    reveals: Vec<Reveal>,
    quantizer: Quantizer,
    survivors: usize,
    weight_sum: f64,
    step: f64,
    norm_bound: Option<(f64, String)>,
}

/// What unmasking yields.
#[derive(Debug)]
pub struct Unmasked {
    /// Σ wᵢ·updateᵢ / Σ wᵢ over the survivors.
    pub mean: Vec<f32>,
    /// Survivors whose update needed no clipping (the extra value's sum).
    pub unclipped: usize,
    pub survivors: usize,
}

impl UnmaskJob {
    /// Rebuilds the secrets, removes the masks, checks the sum's range and
    /// dequantizes (blocking, CPU-bound); with the nodes that misbehaved
    /// (name, what they did), whether or not the sum could be unmasked.
    pub fn run(mut self) -> (Result<Unmasked, String>, Vec<(String, String)>) {
        let server = std::mem::replace(&mut self.server, Server::new(0, 0, 2));
        let (sum, blamed) = server.finish(&self.reveals);
        let blamed = blamed
            .into_iter()
            .map(|b| {
                let name = self
                    .names
                    .get(&b.node)
                    .cloned()
                    .unwrap_or_else(|| format!("number {}", b.node));
                (name, b.reason)
            })
            .collect();
        let unmasked = sum.and_then(|sum| {
            self.quantizer.check_sum(&sum, self.survivors)?;
            Ok(sum)
        });
        let result = unmasked
            .map_err(|e| e.to_string())
            .map(|sum| self.dequantize(&sum))
            .and_then(|u| self.check_norm(u));
        (result, blamed)
    }

    /// The mean within the norm bound: one node cannot be told apart in the
    /// sum, but a sum that moves the model further than the bound lets a
    /// single update move it is no training step.
    fn check_norm(&self, u: Unmasked) -> Result<Unmasked, String> {
        let Some((bound, what)) = &self.norm_bound else {
            return Ok(u);
        };
        let norm = crate::core::strategy::l2_norm(&u.mean);
        if norm > *bound {
            return Err(format!(
                "the unmasked mean's norm {norm:.4e} exceeds {bound:.4e}, {what} (strategy.max_norm_factor): a masked input was not a training step"
            ));
        }
        Ok(u)
    }

    fn dequantize(&self, sum: &[u32]) -> Unmasked {
        let mut values = self.quantizer.dequantize_sum(sum, self.survivors);
        let indicator = values.pop().unwrap_or(0.0);
        let unclipped = (f64::from(indicator).round().max(0.0) as usize).min(self.survivors);
        let scale = if self.weight_sum > 0.0 {
            self.step / self.weight_sum
        } else {
            0.0
        };
        for v in &mut values {
            *v = (f64::from(*v) * scale) as f32;
        }
        Unmasked {
            mean: values,
            unclipped,
            survivors: self.survivors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_follow_the_neighbourhood_and_the_dropout_allowance() {
        let s = SecureSettings {
            neighbours: 0,
            max_dropout: 0.3,
            range: 1.0,
            step_timeout_ms: 1000,
        };
        assert_eq!((s.holders(10), s.threshold(10)), (10, 7));
        assert_eq!(s.threshold(3), 3);
        let plus = SecureSettings {
            neighbours: 4,
            ..s.clone()
        };
        assert_eq!((plus.holders(50), plus.threshold(50)), (5, 4));
        assert_eq!(plus.holders(4), 4, "a neighbourhood as large as the round is the round");
        let loose = SecureSettings { max_dropout: 0.49, ..s };
        assert_eq!(loose.threshold(3), 2);
    }
}
