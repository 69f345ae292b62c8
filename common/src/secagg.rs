//! Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation
//! for Privacy-Preserving Machine Learning"; SecAgg+, Bell et al. 2020):
//! the coordinator learns the sum of the surviving nodes' updates and
//! nothing else about any one of them. The protocol as two pure state
//! machines, [`Client`] (a node) and [`Server`] (the coordinator), that
//! exchange the messages below; transport and scheduling are the caller's.
//!
//! One round, for the nodes asked:
//!
//! 1. **Advertise**: each node makes two fresh X25519 key pairs (one to
//!    encrypt shares, one to agree masks) and sends the public keys.
//! 2. **Share keys**: the coordinator returns the roster and each node's
//!    neighbours (SecAgg+: a ring of `k` neighbours in a seeded random order;
//!    everybody when `k ≥ n − 1`). Each node draws a self-mask seed `b` and
//!    splits `b` and its mask secret key into Shamir shares (threshold `t`)
//!    for its neighbours and itself; each neighbour's pair of shares is
//!    sealed with ChaCha20-Poly1305 under a key agreed with that neighbour.
//! 3. **Masked input**: each node quantizes its update into the ring
//!    `Z_2^32` ([`Quantizer`], unbiased stochastic rounding) and adds
//!    `PRG(b)` and, for every neighbour `v` that shared keys, `±PRG(s_uv)`
//!    (`+` when `u < v`), `s_uv` agreed between the two. Pairwise masks
//!    cancel in the sum; what the coordinator receives is uniformly random.
//! 4. **Unmask**: the coordinator names the survivors (who sent a masked
//!    input) and the dropped (who shared keys but sent none). Each surviving
//!    node answers once: shares of `b` for survivors, shares of the mask key
//!    for dropped nodes, never both for the same node.
//! 5. The coordinator rebuilds the survivors' `b` and the dropped nodes'
//!    mask keys from `t` shares each, removes the self masks and the pairwise
//!    masks the survivors shared with dropped nodes, and dequantizes the sum.
//!
//! Any node may lie, so the coordinator checks what it can. Each node
//! commits to its seed `b` when it advertises (SHA-256, bound to the round
//! and the node), and a rebuilt mask key must match the public key on the
//! roster: a secret is only used once it checks out, from `t` of the
//! revealed shares that agree, and a revealer whose share does not fit is
//! named ([`Blame`]). A node whose sealed shares do not open for a
//! neighbour costs nothing but that neighbour's share: the neighbour still
//! adds their pairwise mask (it follows from the roster's public keys), and
//! when too few of the node's shares are left to rebuild its secrets, the
//! unmasking fails naming it. The unmasked sum must lie in what `n` inputs
//! within the quantizer's range can add up to ([`Quantizer::check_sum`]).
//! What no check here can see is a masked input that stays within that
//! range but is not the node's true update: bounding it needs
//! zero-knowledge range proofs, which this protocol does not have.
//!
//! Primitives come from well-kept crates: `x25519-dalek` (key agreement),
//! `hkdf` over SHA-256 (key derivation), `chacha20poly1305` (sealing
//! shares), `rand_chacha`'s ChaCha20 (the mask generator), `blahaj` (Shamir
//! over GF(256)). Keys are fresh every round, so each derived key seals or
//! seeds exactly one thing.

use std::collections::{BTreeMap, BTreeSet};

use blahaj::{Share, Sharks};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// A node's number in a round (its position in the coordinator's roster).
pub type NodeId = u32;

/// Bytes of one Shamir share of a 32-byte secret (its `x`, then 32 values).
pub const SHARE_BYTES: usize = 33;
/// Bytes of a sealed pair of shares (seed and key, plus the AEAD tag).
pub const SEALED_BYTES: usize = 2 * SHARE_BYTES + 16;

/// Shamir shares tried while looking for `t` that rebuild a secret that
/// checks out, before the secret is given up on.
const REBUILD_TRIES: usize = 4096;

/// What goes wrong in the protocol, for the side that sees it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    /// A message does not fit the round (wrong round, unknown node, wrong size).
    #[error("secure aggregation: {0}")]
    Protocol(String),
    /// A sealed share does not open: tampered with, or not for this node.
    #[error("secure aggregation: the shares from node {from} do not open ({reason})")]
    Sealed { from: NodeId, reason: String },
    /// An honest node refuses an unmasking request that would reveal an update.
    #[error("secure aggregation: unmasking refused: {0}")]
    Refused(String),
    /// Too few nodes are left to go on.
    #[error("secure aggregation: {0}")]
    TooFew(String),
}

type Result<T> = std::result::Result<T, SecAggError>;

fn protocol(m: impl Into<String>) -> SecAggError {
    SecAggError::Protocol(m.into())
}

/// Maps f32 values in `[-range, range]` to integers of `bits` bits, so that
/// the sum of `nodes` of them fits in `u32` without wrapping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantizer {
    pub range: f32,
    pub bits: u32,
}

impl Quantizer {
    /// The finest quantizer whose sum over `nodes` inputs cannot overflow.
    pub fn new(range: f32, nodes: usize) -> Self {
        let headroom = usize::BITS - nodes.max(1).leading_zeros();
        Self {
            range,
            bits: 32 - headroom,
        }
    }

    /// Checks that an unmasked sum of `n` inputs is one that `n` inputs
    /// within the range can add up to: honest inputs are at most
    /// `2^bits − 1` each, and `bits` leaves room for `n` of them below
    /// `2^32`, so a larger value means some input was out of range (or a
    /// secret was rebuilt wrong).
    pub fn check_sum(&self, sum: &[u32], n: usize) -> Result<()> {
        let top = n as u64 * ((1u64 << self.bits) - 1);
        let beyond = sum.iter().filter(|&&s| u64::from(s) > top).count();
        if beyond > 0 {
            return Err(protocol(format!(
                "{beyond} of {} values of the unmasked sum are beyond what {n} inputs within the range can add up to: a masked input was out of range",
                sum.len()
            )));
        }
        Ok(())
    }

    /// The value of one quantization step.
    pub fn step(&self) -> f64 {
        2.0 * f64::from(self.range) / ((1u64 << self.bits) - 1) as f64
    }

    /// Clips to the range and rounds stochastically (the expected value of
    /// the result is the clipped input).
    pub fn quantize(&self, values: &[f32], rng: &mut impl Rng) -> Vec<u32> {
        let (range, step) = (f64::from(self.range), self.step());
        let top = ((1u64 << self.bits) - 1) as f64;
        values
            .iter()
            .map(|&v| {
                let x = (f64::from(v).clamp(-range, range) + range) / step;
                let floor = x.floor();
                let up = rng.random::<f64>() < x - floor;
                (floor + f64::from(u8::from(up))).min(top) as u32
            })
            .collect()
    }

    /// The sum of `n` values from the sum of their quantizations.
    pub fn dequantize_sum(&self, sum: &[u32], n: usize) -> Vec<f32> {
        let offset = n as f64 * f64::from(self.range);
        sum.iter()
            .map(|&s| (f64::from(s) * self.step() - offset) as f32)
            .collect()
    }
}

/// Each node's neighbours.
pub type Graph = BTreeMap<NodeId, Vec<NodeId>>;

/// SecAgg+'s neighbour graph: the nodes in a random order (from `seed`) on
/// a ring, each linked to the `k / 2` before and after it; every node when
/// `k ≥ n − 1`. Symmetric; no node is its own neighbour.
pub fn neighbours(ids: &[NodeId], k: usize, seed: u64) -> Graph {
    let n = ids.len();
    let mut order: Vec<NodeId> = ids.to_vec();
    order.sort_unstable();
    order.dedup();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut graph: BTreeMap<NodeId, BTreeSet<NodeId>> = order.iter().map(|&u| (u, BTreeSet::new())).collect();
    let half = if k + 1 >= n { n } else { k.div_ceil(2) };
    for (i, &u) in order.iter().enumerate() {
        for d in 1..=half.min(order.len().saturating_sub(1)) {
            let v = order[(i + d) % order.len()];
            if v != u {
                graph.entry(u).or_default().insert(v);
                graph.entry(v).or_default().insert(u);
            }
        }
    }
    graph.into_iter().map(|(u, vs)| (u, vs.into_iter().collect())).collect()
}

/// Step 1: a node's public keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Advertise {
    pub id: NodeId,
    pub cipher_key: [u8; 32],
    pub mask_key: [u8; 32],
    /// [`seed_commitment`] of the node's self-mask seed.
    pub seed_commitment: [u8; 32],
}

/// A node that misbehaved in the protocol, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Blame {
    pub node: NodeId,
    pub reason: String,
}

/// The commitment to a self-mask seed: SHA-256 over a label, the round,
/// the node and the seed.
pub fn seed_commitment(round: u64, id: NodeId, seed: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fedge secure aggregation v1 seed");
    h.update(round.to_le_bytes());
    h.update(id.to_le_bytes());
    h.update(seed);
    h.finalize().into()
}

/// Step 2: the pair of shares `from` made for `to`, sealed for `to`.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedShares {
    pub from: NodeId,
    pub to: NodeId,
    pub ciphertext: Vec<u8>,
}

/// Step 4: whose masks to reveal.
#[derive(Debug, Clone, PartialEq)]
pub struct UnmaskRequest {
    pub survivors: Vec<NodeId>,
    pub dropped: Vec<NodeId>,
}

/// Step 4: a node's answer: shares of the survivors' self-mask seeds and of
/// the dropped nodes' mask keys that it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Reveal {
    pub from: NodeId,
    pub seed_shares: Vec<(NodeId, Vec<u8>)>,
    pub key_shares: Vec<(NodeId, Vec<u8>)>,
}

/// HKDF-SHA256 of a Diffie-Hellman output, bound to the round, the purpose
/// and the two nodes.
fn derive(shared: &[u8; 32], round: u64, purpose: &str, a: NodeId, b: NodeId) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(b"fedge secure aggregation v1"), shared);
    let mut info = Vec::with_capacity(purpose.len() + 16);
    info.extend_from_slice(purpose.as_bytes());
    info.extend_from_slice(&round.to_le_bytes());
    info.extend_from_slice(&a.to_le_bytes());
    info.extend_from_slice(&b.to_le_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(&info, out.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// The pairwise mask seed of `u` and `v` (the same from either side).
fn pair_seed(secret: &StaticSecret, their: &[u8; 32], round: u64, u: NodeId, v: NodeId) -> Zeroizing<[u8; 32]> {
    let shared = secret.diffie_hellman(&PublicKey::from(*their));
    derive(shared.as_bytes(), round, "mask", u.min(v), u.max(v))
}

/// Adds `sign · PRG(seed)` to `acc`, value by value, in `Z_2^32`.
fn add_prg(acc: &mut [u32], seed: &[u8; 32], negate: bool) {
    let mut prg = ChaCha20Rng::from_seed(*seed);
    for a in acc.iter_mut() {
        let m = prg.next_u32();
        *a = if negate { a.wrapping_sub(m) } else { a.wrapping_add(m) };
    }
}

fn seal_key(secret: &StaticSecret, their: &[u8; 32], round: u64, from: NodeId, to: NodeId) -> ChaCha20Poly1305 {
    let shared = secret.diffie_hellman(&PublicKey::from(*their));
    let key = derive(shared.as_bytes(), round, "shares", from, to);
    ChaCha20Poly1305::new(Key::from_slice(key.as_ref()))
}

fn aad(round: u64, from: NodeId, to: NodeId) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&round.to_le_bytes());
    a[8..12].copy_from_slice(&from.to_le_bytes());
    a[12..].copy_from_slice(&to.to_le_bytes());
    a
}

fn random_secret(rng: &mut impl RngCore) -> Zeroizing<[u8; 32]> {
    let mut b = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(b.as_mut());
    b
}

/// A node's side of one round.
pub struct Client {
    id: NodeId,
    round: u64,
    cipher_secret: StaticSecret,
    mask_secret: StaticSecret,
    seed: Zeroizing<[u8; 32]>,
    roster: BTreeMap<NodeId, Advertise>,
    /// Neighbours, and itself: who holds this node's shares.
    holders: Vec<NodeId>,
    threshold: usize,
    /// Decrypted shares held for others: node → (seed share, key share).
    held: BTreeMap<NodeId, (Vec<u8>, Vec<u8>)>,
    /// Neighbours that shared keys (their sealed shares were forwarded,
    /// whether or not they opened): this node masks with each of them.
    sharers: BTreeSet<NodeId>,
    answered: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("round", &self.round)
            .field("holders", &self.holders)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Step 1: fresh keys for `round` (from the operating system-seeded CSPRNG `rng`).
    pub fn new(id: NodeId, round: u64, rng: &mut impl RngCore) -> (Self, Advertise) {
        let cipher_secret = StaticSecret::from(*random_secret(rng));
        let mask_secret = StaticSecret::from(*random_secret(rng));
        let seed = random_secret(rng);
        let advertise = Advertise {
            id,
            cipher_key: PublicKey::from(&cipher_secret).to_bytes(),
            mask_key: PublicKey::from(&mask_secret).to_bytes(),
            seed_commitment: seed_commitment(round, id, &seed),
        };
        let client = Self {
            id,
            round,
            cipher_secret,
            mask_secret,
            seed,
            roster: BTreeMap::new(),
            holders: Vec::new(),
            threshold: 0,
            held: BTreeMap::new(),
            sharers: BTreeSet::new(),
            answered: false,
        };
        (client, advertise)
    }

    /// Step 2: splits the self-mask seed and the mask key among `neighbours`
    /// and this node (threshold `threshold`) and seals each pair of shares
    /// for its holder.
    pub fn share_keys(
        &mut self,
        roster: &[Advertise],
        neighbours: &[NodeId],
        threshold: usize,
    ) -> Result<Vec<SealedShares>> {
        self.roster = roster.iter().map(|a| (a.id, a.clone())).collect();
        let mut holders: Vec<NodeId> = neighbours.iter().copied().chain([self.id]).collect();
        holders.sort_unstable();
        holders.dedup();
        if let Some(v) = holders.iter().find(|v| !self.roster.contains_key(v)) {
            return Err(protocol(format!("neighbour {v} is not on the roster")));
        }
        if threshold < 2 || threshold > holders.len() || holders.len() > 255 {
            return Err(protocol(format!(
                "a threshold of {threshold} among {} holders cannot protect the shares (2 ≤ t ≤ holders ≤ 255)",
                holders.len()
            )));
        }
        let t = threshold as u8;
        let seed_shares: Vec<Share> = Sharks(t).dealer(self.seed.as_ref()).take(holders.len()).collect();
        let key_bytes = Zeroizing::new(self.mask_secret.to_bytes());
        let key_shares: Vec<Share> = Sharks(t).dealer(key_bytes.as_ref()).take(holders.len()).collect();
        let mut sealed = Vec::with_capacity(holders.len());
        for ((&v, s), k) in holders.iter().zip(&seed_shares).zip(&key_shares) {
            let mut plain = Zeroizing::new(Vec::from(s));
            plain.extend_from_slice(&Vec::from(k));
            let cipher = seal_key(&self.cipher_secret, &self.roster[&v].cipher_key, self.round, self.id, v);
            let ciphertext = cipher
                .encrypt(
                    Nonce::from_slice(&[0u8; 12]),
                    Payload {
                        msg: plain.as_ref(),
                        aad: &aad(self.round, self.id, v),
                    },
                )
                .map_err(|e| protocol(format!("sealing shares: {e}")))?;
            sealed.push(SealedShares {
                from: self.id,
                to: v,
                ciphertext,
            });
        }
        self.holders = holders;
        self.threshold = threshold;
        Ok(sealed)
    }

    /// Step 3a: opens the shares other nodes sealed for this one (the
    /// coordinator forwards those of the nodes that shared keys). Shares
    /// that do not open are the sender's fault, not the round's: they are
    /// returned (the sender cannot be unmasked through this node), and
    /// this node still masks with the sender. Shares the coordinator
    /// misroutes are an error.
    pub fn receive_shares(&mut self, shares: &[SealedShares]) -> Result<Vec<SecAggError>> {
        let mut unopened = Vec::new();
        for s in shares {
            if s.to != self.id {
                return Err(protocol(format!("shares from {} are for node {}", s.from, s.to)));
            }
            if !self.holders.contains(&s.from) {
                return Err(protocol(format!(
                    "node {} is not a neighbour of node {}",
                    s.from, self.id
                )));
            }
            let their = self
                .roster
                .get(&s.from)
                .ok_or_else(|| protocol(format!("node {} is not on the roster", s.from)))?;
            let cipher = seal_key(&self.cipher_secret, &their.cipher_key, self.round, s.from, self.id);
            self.sharers.insert(s.from);
            let opened = cipher.decrypt(
                Nonce::from_slice(&[0u8; 12]),
                Payload {
                    msg: &s.ciphertext,
                    aad: &aad(self.round, s.from, self.id),
                },
            );
            match opened.map(Zeroizing::new) {
                Ok(plain) if plain.len() == 2 * SHARE_BYTES => {
                    self.held
                        .insert(s.from, (plain[..SHARE_BYTES].to_vec(), plain[SHARE_BYTES..].to_vec()));
                }
                Ok(plain) => unopened.push(SecAggError::Sealed {
                    from: s.from,
                    reason: format!("{} bytes inside, expected {}", plain.len(), 2 * SHARE_BYTES),
                }),
                Err(e) => unopened.push(SecAggError::Sealed {
                    from: s.from,
                    reason: e.to_string(),
                }),
            }
        }
        Ok(unopened)
    }

    /// Step 3b: the masked input: `quantized + PRG(b) ± PRG(s_uv)` for every
    /// neighbour `v` whose shares the coordinator forwarded.
    pub fn mask(&self, quantized: &[u32]) -> Vec<u32> {
        let mut y = quantized.to_vec();
        add_prg(&mut y, &self.seed, false);
        for &v in self.sharers.iter().filter(|&&v| v != self.id) {
            let seed = pair_seed(&self.mask_secret, &self.roster[&v].mask_key, self.round, self.id, v);
            add_prg(&mut y, &seed, self.id > v);
        }
        y
    }

    /// Step 4: answers the coordinator's request, once. Refuses a request
    /// that names a node both surviving and dropped, names this node as
    /// dropped, names fewer than the threshold of survivors, or comes a
    /// second time: any of these would let the coordinator remove both
    /// masks of a node whose masked input it holds.
    pub fn unmask(&mut self, req: &UnmaskRequest) -> Result<Reveal> {
        if self.answered {
            return Err(SecAggError::Refused(format!(
                "node {} already answered an unmasking request in round {}",
                self.id, self.round
            )));
        }
        let survivors: BTreeSet<NodeId> = req.survivors.iter().copied().collect();
        let dropped: BTreeSet<NodeId> = req.dropped.iter().copied().collect();
        if let Some(both) = survivors.intersection(&dropped).next() {
            return Err(SecAggError::Refused(format!(
                "node {both} is named both surviving and dropped"
            )));
        }
        if !survivors.contains(&self.id) || dropped.contains(&self.id) {
            return Err(SecAggError::Refused(format!(
                "node {} is alive and sent its masked input",
                self.id
            )));
        }
        if survivors.len() < self.threshold {
            return Err(SecAggError::Refused(format!(
                "{} survivors are fewer than the threshold {}",
                survivors.len(),
                self.threshold
            )));
        }
        self.answered = true;
        let pick = |set: &BTreeSet<NodeId>, second: bool| {
            set.iter()
                .filter_map(|v| {
                    self.held
                        .get(v)
                        .map(|(s, k)| (*v, if second { k.clone() } else { s.clone() }))
                })
                .collect()
        };
        Ok(Reveal {
            from: self.id,
            seed_shares: pick(&survivors, false),
            key_shares: pick(&dropped, true),
        })
    }
}

/// The coordinator's side of one round. Masked inputs are added into one
/// running sum as they arrive: memory is one model's worth of `u32`,
/// whatever the number of nodes.
#[derive(Debug)]
pub struct Server {
    round: u64,
    threshold: usize,
    roster: BTreeMap<NodeId, Advertise>,
    graph: Graph,
    /// Nodes that shared keys (U2), with the shares they sealed.
    sealed: BTreeMap<NodeId, Vec<SealedShares>>,
    /// Nodes whose masked input is in the sum (U3).
    inputs: BTreeSet<NodeId>,
    sum: Vec<u32>,
}

impl Server {
    /// A round over `dim` values; Shamir threshold `threshold`.
    pub fn new(round: u64, dim: usize, threshold: usize) -> Self {
        Self {
            round,
            threshold,
            roster: BTreeMap::new(),
            graph: BTreeMap::new(),
            sealed: BTreeMap::new(),
            inputs: BTreeSet::new(),
            sum: vec![0; dim],
        }
    }

    /// Step 1: a node's public keys.
    pub fn advertise(&mut self, a: Advertise) -> Result<()> {
        if self.roster.contains_key(&a.id) {
            return Err(protocol(format!("node {} advertised twice", a.id)));
        }
        self.roster.insert(a.id, a);
        Ok(())
    }

    /// Closes step 1: the roster and each node's `k` neighbours (from `seed`).
    pub fn roster(&mut self, k: usize, seed: u64) -> Result<(Vec<Advertise>, Graph)> {
        if self.roster.len() < self.threshold {
            return Err(SecAggError::TooFew(format!(
                "{} nodes advertised keys; the threshold is {}",
                self.roster.len(),
                self.threshold
            )));
        }
        let ids: Vec<NodeId> = self.roster.keys().copied().collect();
        self.graph = neighbours(&ids, k, seed);
        Ok((self.roster.values().cloned().collect(), self.graph.clone()))
    }

    /// Step 2: the sealed shares node `from` made.
    pub fn share_keys(&mut self, from: NodeId, shares: Vec<SealedShares>) -> Result<()> {
        let expected: BTreeSet<NodeId> = self
            .graph
            .get(&from)
            .ok_or_else(|| protocol(format!("node {from} is not on the roster")))?
            .iter()
            .copied()
            .chain([from])
            .collect();
        let got: BTreeSet<NodeId> = shares.iter().map(|s| s.to).collect();
        if got != expected || shares.len() != expected.len() || shares.iter().any(|s| s.from != from) {
            return Err(protocol(format!(
                "node {from} sealed shares for {got:?}; its holders are {expected:?}"
            )));
        }
        if let Some(s) = shares.iter().find(|s| s.ciphertext.len() != SEALED_BYTES) {
            return Err(protocol(format!(
                "node {from} sealed {} bytes for node {}; a sealed pair of shares is {SEALED_BYTES}",
                s.ciphertext.len(),
                s.to
            )));
        }
        self.sealed.insert(from, shares);
        Ok(())
    }

    /// What node `to` receives in step 3: the shares sealed for it by the
    /// nodes that shared keys.
    pub fn shares_for(&self, to: NodeId) -> Vec<SealedShares> {
        self.sealed
            .values()
            .flat_map(|v| v.iter().filter(|s| s.to == to).cloned())
            .collect()
    }

    /// Step 3: adds node `from`'s masked input to the sum.
    pub fn add_masked(&mut self, from: NodeId, masked: &[u32]) -> Result<()> {
        if !self.sealed.contains_key(&from) {
            return Err(protocol(format!(
                "node {from} sent a masked input without sharing keys"
            )));
        }
        if masked.len() != self.sum.len() {
            return Err(protocol(format!(
                "node {from} sent {} values; the model has {}",
                masked.len(),
                self.sum.len()
            )));
        }
        if !self.inputs.insert(from) {
            return Err(protocol(format!("node {from} sent its masked input twice")));
        }
        for (s, &y) in self.sum.iter_mut().zip(masked) {
            *s = s.wrapping_add(y);
        }
        Ok(())
    }

    /// Step 4: survivors sent a masked input; dropped shared keys but did not.
    pub fn unmask_request(&self) -> UnmaskRequest {
        UnmaskRequest {
            survivors: self.inputs.iter().copied().collect(),
            dropped: self
                .sealed
                .keys()
                .filter(|v| !self.inputs.contains(v))
                .copied()
                .collect(),
        }
    }

    /// Nodes whose masked input is in the sum.
    pub fn survivors(&self) -> usize {
        self.inputs.len()
    }

    /// Step 5: removes every mask with the revealed shares and returns the
    /// sum of the survivors' quantized inputs, with the nodes that
    /// misbehaved: revealers whose shares do not fit, and nodes whose
    /// secrets could not be rebuilt (then the sum is an error: it cannot be
    /// unmasked). Each secret is rebuilt from `t` agreeing shares and
    /// checked (a seed against its commitment, a mask key against its
    /// public key) before it is used.
    pub fn finish(mut self, reveals: &[Reveal]) -> (Result<Vec<u32>>, Vec<Blame>) {
        let req = self.unmask_request();
        let mut blamed = Vec::new();
        let mut failed = Vec::new();
        let mut seeds = Vec::new();
        for &u in &req.survivors {
            let shares = reveals
                .iter()
                .flat_map(|r| r.seed_shares.iter().filter(|(v, _)| *v == u).map(|(_, s)| (r.from, s)))
                .collect();
            let commitment = self.roster[&u].seed_commitment;
            let round = self.round;
            let checks = |seed: &[u8; 32]| seed_commitment(round, u, seed) == commitment;
            match self.rebuild(u, "self-mask seed", shares, checks, &mut blamed) {
                Ok(seed) => seeds.push(seed),
                Err(e) => failed.push(e),
            }
        }
        let mut keys = Vec::new();
        for &v in &req.dropped {
            let shares = reveals
                .iter()
                .flat_map(|r| r.key_shares.iter().filter(|(w, _)| *w == v).map(|(_, s)| (r.from, s)))
                .collect();
            let public = self.roster[&v].mask_key;
            let checks = |key: &[u8; 32]| PublicKey::from(&StaticSecret::from(*key)).to_bytes() == public;
            match self.rebuild(v, "mask key", shares, checks, &mut blamed) {
                Ok(key) => keys.push((v, key)),
                Err(e) => failed.push(e),
            }
        }
        if let Some(first) = failed.into_iter().next() {
            return (Err(first), blamed);
        }
        for seed in &seeds {
            add_prg(&mut self.sum, seed, true);
        }
        for (v, key) in keys {
            let key = StaticSecret::from(*key);
            for &u in self.graph.get(&v).into_iter().flatten() {
                if !self.inputs.contains(&u) {
                    continue;
                }
                // u added +PRG(s_uv) when u < v, −PRG(s_uv) otherwise: undo it.
                let seed = pair_seed(&key, &self.roster[&u].mask_key, self.round, v, u);
                add_prg(&mut self.sum, &seed, u < v);
            }
        }
        (Ok(self.sum), blamed)
    }

    /// Who holds shares of `node`'s secrets, in the order its shares were
    /// dealt (share `x` = position + 1).
    fn holders(&self, node: NodeId) -> Vec<NodeId> {
        let mut h: Vec<NodeId> = self.graph.get(&node).into_iter().flatten().copied().collect();
        h.push(node);
        h.sort_unstable();
        h.dedup();
        h
    }

    /// Rebuilds `node`'s `what` from the shares revealed for it (revealer,
    /// bytes): the first `t` of them that agree on a secret `checks`
    /// accepts. Shares a revealer does not hold, malformed ones and ones
    /// that do not fit the rebuilt secret are blamed on their revealer; a
    /// secret that cannot be rebuilt is blamed on its node.
    fn rebuild(
        &self,
        node: NodeId,
        what: &str,
        shares: Vec<(NodeId, &Vec<u8>)>,
        checks: impl Fn(&[u8; 32]) -> bool,
        blamed: &mut Vec<Blame>,
    ) -> Result<Zeroizing<[u8; 32]>> {
        let holders = self.holders(node);
        let t = self.threshold;
        let mut valid: Vec<(NodeId, Share)> = Vec::new();
        for (from, bytes) in shares {
            let position = holders.iter().position(|&h| h == from);
            match (position, Share::try_from(bytes.as_slice())) {
                (None, _) => blamed.push(Blame {
                    node: from,
                    reason: format!("revealed a share of node {node}'s {what}, which it does not hold"),
                }),
                (Some(i), Ok(share)) if bytes.len() == SHARE_BYTES && usize::from(share.x.0) == i + 1 => {
                    if valid.iter().all(|(v, _)| *v != from) {
                        valid.push((from, share));
                    }
                }
                (Some(_), _) => blamed.push(Blame {
                    node: from,
                    reason: format!("revealed a malformed share of node {node}'s {what}"),
                }),
            }
        }
        let give_up = |reason: String, blamed: &mut Vec<Blame>| {
            blamed.push(Blame {
                node,
                reason: reason.clone(),
            });
            SecAggError::TooFew(reason)
        };
        if valid.len() < t {
            return Err(give_up(
                format!(
                    "{} usable shares of node {node}'s {what} arrived, the threshold is {t}",
                    valid.len()
                ),
                blamed,
            ));
        }
        let secret_of = |picked: &mut dyn Iterator<Item = &Share>| -> Option<Zeroizing<[u8; 32]>> {
            let shares: Vec<&Share> = picked.collect();
            let bytes = Zeroizing::new(Sharks(t as u8).recover(shares).ok()?);
            <[u8; 32]>::try_from(bytes.as_slice()).ok().map(Zeroizing::new)
        };
        // The first t shares; then without one share at a time (one liar
        // costs at most as many tries as there are shares, wherever its
        // share sits); then every combination, up to the budget.
        let r = valid.len();
        let without_one = (0..r).map(|skip| (0..r).filter(|&i| i != skip).take(t).collect::<Vec<usize>>());
        let mut every = Some((0..t).collect::<Vec<usize>>());
        let combinations = std::iter::from_fn(|| {
            let this = every.take()?;
            let mut next = this.clone();
            if next_combination(&mut next, r) {
                every = Some(next);
            }
            Some(this)
        });
        let picks = std::iter::once((0..t).collect())
            .chain(without_one.filter(|p: &Vec<usize>| p.len() == t))
            .chain(combinations)
            .take(REBUILD_TRIES);
        let mut found = None;
        for pick in picks {
            if let Some(secret) = secret_of(&mut pick.iter().map(|&i| &valid[i].1))
                && checks(&secret)
            {
                found = Some((pick, secret));
                break;
            }
        }
        let Some((pick, secret)) = found else {
            return Err(give_up(
                format!(
                    "no {t} of the {} shares of node {node}'s {what} rebuild it: they were dealt or revealed wrong",
                    valid.len()
                ),
                blamed,
            ));
        };
        // The shares off the polynomial through the secret and t − 1 of the
        // picked ones. Those are the liars when they are few enough that
        // no other polynomial through the secret fits as many shares (at
        // most ⌊(r − t + 1) / 2⌋ of them); more, and colluding liars could
        // have made the honest look like liars, so nobody is named.
        let off: Vec<NodeId> = valid
            .iter()
            .enumerate()
            .filter(|(i, _)| !pick.contains(i))
            .filter(|(_, (_, share))| {
                let mut with = pick[..t - 1].iter().map(|&j| &valid[j].1).chain([share]);
                secret_of(&mut with).as_deref() != Some(&*secret)
            })
            .map(|(_, (from, _))| *from)
            .collect();
        if off.len() <= (r + 1 - t) / 2 {
            blamed.extend(off.into_iter().map(|from| Blame {
                node: from,
                reason: format!("revealed a share of node {node}'s {what} that does not fit the others"),
            }));
        }
        Ok(secret)
    }
}

/// Moves `pick` (ascending indexes below `n`) to the next combination in
/// lexicographic order; false after the last.
fn next_combination(pick: &mut [usize], n: usize) -> bool {
    let k = pick.len();
    let Some(i) = (0..k).rev().find(|&i| pick[i] < n - k + i) else {
        return false;
    };
    pick[i] += 1;
    for j in i + 1..k {
        pick[j] = pick[j - 1] + 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a round of `n` nodes with neighbourhoods of `k` and threshold
    /// `t`; nodes in `drop_before_input` share keys but send no masked
    /// input; nodes in `silent_at_unmask` send it but do not answer step 4.
    fn round(
        updates: &[Vec<f32>],
        k: usize,
        t: usize,
        drop_before_input: &[NodeId],
        silent_at_unmask: &[NodeId],
    ) -> Result<(Vec<f32>, Vec<Vec<u32>>)> {
        let n = updates.len();
        let dim = updates[0].len();
        let q = Quantizer::new(1.0, n);
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut server = Server::new(3, dim, t);
        let mut clients = Vec::new();
        for id in 0..n as NodeId {
            let (c, a) = Client::new(id, 3, &mut rng);
            server.advertise(a)?;
            clients.push(c);
        }
        let (roster, graph) = server.roster(k, 77)?;
        for c in &mut clients {
            let sealed = c.share_keys(&roster, &graph[&c.id], t)?;
            server.share_keys(c.id, sealed)?;
        }
        let mut masked_seen = Vec::new();
        for (c, u) in clients.iter_mut().zip(updates) {
            c.receive_shares(&server.shares_for(c.id))?;
            if drop_before_input.contains(&c.id) {
                continue;
            }
            let y = c.mask(&q.quantize(u, &mut rng));
            server.add_masked(c.id, &y)?;
            masked_seen.push(y);
        }
        let req = server.unmask_request();
        let mut reveals = Vec::new();
        for c in clients.iter_mut() {
            if req.survivors.contains(&c.id) && !silent_at_unmask.contains(&c.id) {
                reveals.push(c.unmask(&req)?);
            }
        }
        let survivors = server.survivors();
        let (sum, blamed) = server.finish(&reveals);
        let sum = sum?;
        assert!(blamed.is_empty(), "{blamed:?}");
        q.check_sum(&sum, survivors)?;
        Ok((q.dequantize_sum(&sum, survivors), masked_seen))
    }

    fn updates(n: usize, dim: usize) -> Vec<Vec<f32>> {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        (0..n)
            .map(|_| (0..dim).map(|_| rng.random_range(-0.5f32..0.5)).collect())
            .collect()
    }

    fn plain_sum(u: &[Vec<f32>], skip: &[NodeId]) -> Vec<f64> {
        let mut s = vec![0f64; u[0].len()];
        for (i, v) in u.iter().enumerate() {
            if skip.contains(&(i as NodeId)) {
                continue;
            }
            for (a, &b) in s.iter_mut().zip(v) {
                *a += f64::from(b);
            }
        }
        s
    }

    #[test]
    fn the_unmasked_sum_is_the_plain_sum_within_the_quantization_bound() {
        let u = updates(6, 1000);
        let (sum, _) = round(&u, 5, 3, &[], &[]).unwrap();
        let step = Quantizer::new(1.0, 6).step();
        for (a, b) in sum.iter().zip(plain_sum(&u, &[])) {
            // Each of 6 values is off by less than one step.
            assert!((f64::from(*a) - b).abs() <= 6.0 * step + 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn rounds_complete_when_nodes_drop_out_after_sharing_keys_or_stay_silent() {
        // 10 nodes, SecAgg+ neighbourhoods of 6, threshold 3: two drop
        // before their masked input, two survivors do not answer step 4.
        let u = updates(10, 500);
        let dropped = [2, 7];
        let (sum, _) = round(&u, 6, 3, &dropped, &[4, 9]).unwrap();
        let step = Quantizer::new(1.0, 10).step();
        for (a, b) in sum.iter().zip(plain_sum(&u, &dropped)) {
            assert!((f64::from(*a) - b).abs() <= 8.0 * step + 1e-6, "{a} vs {b}");
        }
        // Too many silent holders: the coordinator cannot unmask, and says so.
        let e = round(&u, 2, 3, &[], &[0, 1, 2, 3, 4, 5, 6]).unwrap_err().to_string();
        assert!(e.contains("the threshold is 3"), "{e}");
    }

    #[test]
    fn masked_inputs_look_uniformly_random() {
        // Identical, all-zero updates: any structure would show.
        let dim = 65_536;
        let u = vec![vec![0f32; dim]; 4];
        let (_, masked) = round(&u, 3, 2, &[], &[]).unwrap();
        let chi2 = |v: &[u32]| {
            let mut bins = [0f64; 256];
            for &x in v {
                bins[(x >> 24) as usize] += 1.0;
            }
            let e = v.len() as f64 / 256.0;
            bins.iter().map(|o| (o - e).powi(2) / e).sum::<f64>()
        };
        // χ² with 255 degrees of freedom: 330.5 is its 0.999 quantile.
        for y in &masked {
            assert!(chi2(y) < 330.5, "a masked input fails the uniformity test: {}", chi2(y));
        }
        // The test can fail: the unmasked quantized values do not pass it.
        let q = Quantizer::new(1.0, 4);
        let plain = q.quantize(&updates(1, dim)[0], &mut ChaCha20Rng::seed_from_u64(2));
        assert!(chi2(&plain) > 330.5);
        // And no two nodes' masked inputs agree more than chance would have it.
        let same = masked[0].iter().zip(&masked[1]).filter(|(a, b)| a == b).count();
        assert!(same < 3, "{same}");
    }

    /// A round's protocol state once its nodes have shared their keys.
    struct Shared {
        server: Server,
        clients: Vec<Client>,
        roster: Vec<Advertise>,
        graph: Graph,
        /// What each node sealed.
        sealed: Vec<Vec<SealedShares>>,
    }

    /// `n` nodes of `round`, each a neighbour of every other, threshold
    /// `t`, `dim` values, keys from `seed`, that have shared their keys;
    /// `spoil(from, sealed)` may tamper with what a node sealed.
    fn after_sharing(
        (n, round, dim, t): (NodeId, u64, usize, usize),
        seed: u64,
        spoil: impl Fn(NodeId, &mut Vec<SealedShares>),
    ) -> Shared {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut server = Server::new(round, dim, t);
        let mut clients = Vec::new();
        for id in 0..n {
            let (c, a) = Client::new(id, round, &mut rng);
            server.advertise(a).unwrap();
            clients.push(c);
        }
        let (roster, graph) = server.roster(n as usize - 1, round).unwrap();
        let mut all = Vec::new();
        for c in &mut clients {
            let mut sealed = c.share_keys(&roster, &graph[&c.id], t).unwrap();
            spoil(c.id, &mut sealed);
            all.push(sealed.clone());
            server.share_keys(c.id, sealed).unwrap();
        }
        Shared {
            server,
            clients,
            roster,
            graph,
            sealed: all,
        }
    }

    /// Three nodes (threshold 2, four values) that have shared their keys.
    fn three_after_sharing(seed: u64) -> Shared {
        after_sharing((3, 1, 4, 2), seed, |_, _| {})
    }

    #[test]
    fn honest_nodes_refuse_to_unmask_a_node_that_did_not_drop() {
        let Shared {
            mut server,
            mut clients,
            ..
        } = three_after_sharing(5);
        for c in &mut clients {
            c.receive_shares(&server.shares_for(c.id)).unwrap();
            server.add_masked(c.id, &c.mask(&[1, 2, 3, 4])).unwrap();
        }
        // Node 2 sent its input; the coordinator claims it dropped, to get its mask key too.
        let greedy = UnmaskRequest {
            survivors: vec![0, 1, 2],
            dropped: vec![2],
        };
        let e = clients[0].unmask(&greedy).unwrap_err();
        assert!(matches!(e, SecAggError::Refused(_)));
        assert!(
            e.to_string().contains("node 2 is named both surviving and dropped"),
            "{e}"
        );
        // Asking node 1 to reveal its own key as if it had dropped.
        let e = clients[1]
            .unmask(&UnmaskRequest {
                survivors: vec![0, 2],
                dropped: vec![1],
            })
            .unwrap_err();
        assert!(e.to_string().contains("node 1 is alive"), "{e}");
        // An honest request is answered once; asking again (now naming 2 dropped) is refused.
        let honest = server.unmask_request();
        assert_eq!(honest.dropped, Vec::<NodeId>::new());
        clients[0].unmask(&honest).unwrap();
        let second = UnmaskRequest {
            survivors: vec![0, 1],
            dropped: vec![2],
        };
        let e = clients[0].unmask(&second).unwrap_err();
        assert!(e.to_string().contains("already answered"), "{e}");
    }

    #[test]
    fn tampered_or_misrouted_shares_and_bad_inputs_are_named() {
        let Shared {
            mut server,
            mut clients,
            roster,
            graph,
            sealed: all,
        } = three_after_sharing(6);
        let mut forged = server.shares_for(0);
        forged[0].ciphertext[3] ^= 1;
        let unopened = clients[0].receive_shares(&forged).unwrap();
        assert!(matches!(unopened[..], [SecAggError::Sealed { .. }]), "{unopened:?}");
        let e = clients[0].receive_shares(&server.shares_for(1)).unwrap_err();
        assert!(e.to_string().contains("are for node 1"), "{e}");
        let e = server.add_masked(0, &[1, 2]).unwrap_err();
        assert!(e.to_string().contains("sent 2 values; the model has 4"), "{e}");
        let e = server.share_keys(1, all[0].clone()).unwrap_err();
        assert!(e.to_string().contains("node 1 sealed shares for"), "{e}");
        let mut short = all[1].clone();
        short[0].ciphertext.pop();
        let e = server.share_keys(1, short).unwrap_err();
        assert!(e.to_string().contains("node 1 sealed 81 bytes for node"), "{e}");
        let e = clients[1].share_keys(&roster, &graph[&1], 9).unwrap_err();
        assert!(e.to_string().contains("cannot protect the shares"), "{e}");
    }

    /// Five nodes (threshold 3, three values) that have shared their keys;
    /// `spoil(from, sealed)` may tamper with what a node sealed.
    fn five_after_sharing(spoil: impl Fn(NodeId, &mut Vec<SealedShares>)) -> Shared {
        after_sharing((5, 4, 3, 3), 11, spoil)
    }

    #[test]
    fn lying_revealers_are_named_and_the_sum_still_unmasks() {
        let Shared {
            mut server,
            mut clients,
            ..
        } = five_after_sharing(|_, _| {});
        for c in &mut clients {
            assert!(c.receive_shares(&server.shares_for(c.id)).unwrap().is_empty());
            server.add_masked(c.id, &c.mask(&[10, 20, 30])).unwrap();
        }
        let req = server.unmask_request();
        let mut reveals: Vec<Reveal> = clients.iter_mut().map(|c| c.unmask(&req).unwrap()).collect();
        // Node 4 changes its share of node 0's seed, and gives a share of
        // node 1's seed the x of 0 (which would make it the secret itself).
        let lie = &mut reveals[4];
        lie.seed_shares.iter_mut().find(|(v, _)| *v == 0).unwrap().1[7] ^= 0x5a;
        lie.seed_shares.iter_mut().find(|(v, _)| *v == 1).unwrap().1[0] = 0;
        // Node 3 hands in the first share it holds of node 2 as its own.
        let first = reveals[0].seed_shares.iter().find(|(v, _)| *v == 2).unwrap().1.clone();
        reveals[3].seed_shares.iter_mut().find(|(v, _)| *v == 2).unwrap().1 = first;
        // Node 0, whose shares come first, changes its share of node 3's
        // seed; nodes 0 and 1 both change theirs of node 4's the same way:
        // node 4's seed still checks out, but two liars among five shares
        // (threshold 3) could as well be the honest ones, so nobody is named.
        reveals[0].seed_shares.iter_mut().find(|(v, _)| *v == 3).unwrap().1[20] ^= 1;
        for liar in [0, 1] {
            reveals[liar].seed_shares.iter_mut().find(|(v, _)| *v == 4).unwrap().1[9] ^= 2;
        }
        let (sum, blamed) = server.finish(&reveals);
        assert_eq!(
            sum.unwrap(),
            vec![50, 100, 150],
            "the seeds checked out without the liars"
        );
        let named: Vec<(NodeId, &str)> = blamed.iter().map(|b| (b.node, b.reason.as_str())).collect();
        assert_eq!(
            named,
            [
                (
                    4,
                    "revealed a share of node 0's self-mask seed that does not fit the others"
                ),
                (4, "revealed a malformed share of node 1's self-mask seed"),
                (3, "revealed a malformed share of node 2's self-mask seed"),
                (
                    0,
                    "revealed a share of node 3's self-mask seed that does not fit the others"
                ),
            ]
        );
    }

    #[test]
    fn shares_that_do_not_open_cost_only_the_sender() {
        // Node 4 seals garbage for node 0: node 0 still masks with it, and
        // the four other holders rebuild node 4's seed.
        let Shared {
            mut server,
            mut clients,
            ..
        } = five_after_sharing(|from, sealed| {
            if from == 4 {
                sealed.iter_mut().find(|s| s.to == 0).unwrap().ciphertext[5] ^= 1;
            }
        });
        for c in &mut clients {
            let unopened = c.receive_shares(&server.shares_for(c.id)).unwrap();
            assert_eq!(unopened.len(), usize::from(c.id == 0), "node {}", c.id);
            server.add_masked(c.id, &c.mask(&[1, 2, 3])).unwrap();
        }
        let req = server.unmask_request();
        let reveals: Vec<Reveal> = clients.iter_mut().map(|c| c.unmask(&req).unwrap()).collect();
        let (sum, blamed) = server.finish(&reveals);
        assert_eq!((sum.unwrap(), blamed), (vec![5, 10, 15], Vec::new()));

        // Node 4 seals garbage for everyone else: only its own share of its
        // seed is left, so the sum cannot be unmasked, and node 4 is named.
        let Shared {
            mut server,
            mut clients,
            ..
        } = five_after_sharing(|from, sealed| {
            if from == 4 {
                for s in sealed.iter_mut().filter(|s| s.to != 4) {
                    s.ciphertext[0] ^= 1;
                }
            }
        });
        for c in &mut clients {
            c.receive_shares(&server.shares_for(c.id)).unwrap();
            server.add_masked(c.id, &c.mask(&[1, 2, 3])).unwrap();
        }
        let req = server.unmask_request();
        let reveals: Vec<Reveal> = clients.iter_mut().map(|c| c.unmask(&req).unwrap()).collect();
        let (sum, blamed) = server.finish(&reveals);
        let e = sum.unwrap_err().to_string();
        assert!(
            e.contains("1 usable shares of node 4's self-mask seed arrived, the threshold is 3"),
            "{e}"
        );
        assert_eq!(blamed.iter().map(|b| b.node).collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn an_input_out_of_range_shows_in_the_sum() {
        let Shared {
            mut server,
            mut clients,
            ..
        } = five_after_sharing(|_, _| {});
        let q = Quantizer::new(1.0, 5);
        let top = (1u32 << q.bits) - 1;
        for c in &mut clients {
            c.receive_shares(&server.shares_for(c.id)).unwrap();
            // Node 2 adds 2^31 to its quantized input (no honest node can).
            let x = if c.id == 2 { [top, 1 << 31, 0] } else { [top, top, 0] };
            server.add_masked(c.id, &c.mask(&x)).unwrap();
        }
        let req = server.unmask_request();
        let reveals: Vec<Reveal> = clients.iter_mut().map(|c| c.unmask(&req).unwrap()).collect();
        let sum = server.finish(&reveals).0.unwrap();
        assert_eq!(sum[0], 5 * top, "five maxima are in range");
        let e = q.check_sum(&sum, 5).unwrap_err().to_string();
        assert!(
            e.contains("1 of 3 values of the unmasked sum are beyond what 5 inputs"),
            "{e}"
        );
    }

    #[test]
    fn the_neighbour_graph_is_symmetric_and_has_k_neighbours() {
        let ids: Vec<NodeId> = (0..50).collect();
        let g = neighbours(&ids, 8, 3);
        for (u, vs) in &g {
            assert_eq!(vs.len(), 8, "node {u}");
            assert!(!vs.contains(u));
            for v in vs {
                assert!(g[v].contains(u));
            }
        }
        let full = neighbours(&ids[..5], 8, 3);
        assert!(full.values().all(|v| v.len() == 4));
    }

    #[test]
    fn quantization_is_unbiased_and_sums_do_not_overflow() {
        let q = Quantizer::new(1.0, 100);
        assert_eq!(q.bits, 25);
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let v = vec![0.123_456_7f32; 100_000];
        let mean = q.quantize(&v, &mut rng).iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let back = mean * q.step() - 1.0;
        // Within a tenth of a step (the mean's standard error is about step / 600).
        assert!((back - f64::from(v[0])).abs() < q.step() / 10.0, "{back}");
        // 100 maxima sum below 2^32.
        let top = q.quantize(&[5.0], &mut rng)[0];
        assert!(u64::from(top) * 100 < 1 << 32);
    }
}
