//! Moving parameter payloads in chunks.
//!
//! A payload is a flat f32 buffer laid out by a [`Manifest`]. On the wire it
//! travels as a header carrying the manifest, raw byte chunks of at most
//! `chunk_bytes` each, and a trailer with the CRC-32 of all bytes, so no single
//! gRPC message ever has to hold a whole model. [`PayloadReader`] reassembles
//! and checks a payload as chunks arrive, refusing overlong, truncated and
//! corrupt ones.
//!
//! This is also the one place where wire types and domain types convert
//! (manifests, hyper-parameters, metrics).

use prost::bytes::Bytes;

use crate::codec::{Codec, Decoder};
use crate::params::{Manifest, TensorMeta};
use crate::task::{Algorithm, EvalMetrics, Hyperparameters, LocalOptimizer, TrainMetrics};
use crate::{Error, Result, pb};

/// Default size of one data chunk on the wire: 1 MiB.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// Largest chunk a receiver accepts (tonic's default message limit is 4 MiB).
pub const MAX_CHUNK_BYTES: usize = 3 << 20;

/// Encodes values as little-endian f32 bytes.
pub fn encode_f32(values: &[f32]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

#[cfg(target_endian = "big")]
compile_error!("fedge's wire format is little-endian f32; big-endian hosts are not supported");

/// The little-endian bytes of `values`, sharing the vector (no copy).
pub fn f32_payload(values: std::sync::Arc<Vec<f32>>) -> Bytes {
    struct LeView(std::sync::Arc<Vec<f32>>);
    impl AsRef<[u8]> for LeView {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(self.0.as_slice())
        }
    }
    Bytes::from_owner(LeView(values))
}

/// Splits `payload` into zero-copy chunks of at most `chunk_bytes`.
pub fn chunks(payload: &Bytes, chunk_bytes: usize) -> impl Iterator<Item = Bytes> + '_ {
    let step = chunk_bytes.max(1);
    (0..payload.len())
        .step_by(step)
        .map(move |start| payload.slice(start..(start + step).min(payload.len())))
}

/// CRC-32 (IEEE) of a payload.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// A payload being received: each chunk is held to [`MAX_CHUNK_BYTES`],
/// decoded with the payload's codec into a sink, and checksummed; the end
/// checks completeness and the CRC-32.
#[derive(Debug)]
pub struct PayloadStream {
    decoder: Decoder,
    hasher: crc32fast::Hasher,
}

impl PayloadStream {
    /// A stream of `values` values encoded with `codec` in exactly `payload_bytes`.
    pub fn new(codec: Codec, values: usize, payload_bytes: u64) -> Result<Self> {
        Ok(Self {
            decoder: Decoder::new(codec, values, payload_bytes)?,
            hasher: crc32fast::Hasher::new(),
        })
    }

    /// Bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.decoder.received_bytes()
    }

    /// Decodes one chunk into `sink` (as [`Decoder::push`]); refuses an
    /// oversized chunk and bytes past the announced size.
    pub fn push(&mut self, chunk: &[u8], sink: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
        if chunk.len() > MAX_CHUNK_BYTES {
            return Err(Error::Payload(format!(
                "chunk of {} bytes exceeds the limit of {MAX_CHUNK_BYTES}",
                chunk.len()
            )));
        }
        self.decoder.push(chunk, sink)?;
        self.hasher.update(chunk);
        Ok(())
    }

    /// Checks completeness and the checksum.
    pub fn finish(self, crc32: u32) -> Result<()> {
        self.decoder.finish()?;
        let actual = self.hasher.finalize();
        if actual != crc32 {
            return Err(Error::Checksum(format!(
                "checksum mismatch: payload has crc32 {actual:08x}, trailer says {crc32:08x}"
            )));
        }
        Ok(())
    }
}

/// Reassembles an f32 payload (a model) from chunks, checking its length
/// and checksum.
#[derive(Debug)]
pub struct PayloadReader {
    stream: PayloadStream,
    values: Vec<f32>,
}

impl PayloadReader {
    /// A reader for a payload of exactly `expected_bytes` (a multiple of 4).
    pub fn new(expected_bytes: u64) -> Result<Self> {
        if !expected_bytes.is_multiple_of(4) {
            return Err(Error::Payload(format!(
                "announced size {expected_bytes} bytes is not a whole number of f32 values"
            )));
        }
        let n = (expected_bytes / 4) as usize;
        Ok(Self {
            stream: PayloadStream::new(Codec::F32, n, expected_bytes)?,
            values: Vec::with_capacity(n),
        })
    }

    /// Bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.stream.received_bytes()
    }

    /// Appends one chunk; refuses one that runs past the announced size.
    pub fn push(&mut self, chunk: &[u8]) -> Result<()> {
        let values = &mut self.values;
        self.stream.push(chunk, &mut |_, v| values.extend_from_slice(v))
    }

    /// Checks completeness and the checksum, and returns the values.
    pub fn finish(self, crc32: u32) -> Result<Vec<f32>> {
        self.stream.finish(crc32)?;
        Ok(self.values)
    }
}

impl From<&Hyperparameters> for pb::Hyperparameters {
    fn from(h: &Hyperparameters) -> Self {
        pb::Hyperparameters {
            epochs: h.epochs,
            batch_size: h.batch_size,
            learning_rate: h.learning_rate,
            momentum: h.momentum,
            weight_decay: h.weight_decay,
            max_steps: h.max_steps,
            seed: h.seed,
            crop_padding: h.crop_padding,
            horizontal_flip: h.horizontal_flip,
            algorithm: match h.algorithm {
                Algorithm::FedAvg => pb::Algorithm::Fedavg,
                Algorithm::FedSgd => pb::Algorithm::Fedsgd,
                Algorithm::FedProx => pb::Algorithm::Fedprox,
                Algorithm::Scaffold => pb::Algorithm::Scaffold,
            } as i32,
            proximal_mu: h.proximal_mu,
            optimizer: match h.optimizer {
                LocalOptimizer::Sgd => pb::LocalOptimizer::Sgd,
                LocalOptimizer::Adam => pb::LocalOptimizer::Adam,
            } as i32,
            evaluate: h.evaluate,
            privacy: h.privacy.map(|p| pb::PrivacyTask {
                clip_norm: p.clip_norm,
                noise_stddev: p.noise_stddev,
            }),
        }
    }
}

impl TryFrom<&pb::Hyperparameters> for Hyperparameters {
    type Error = Error;

    fn try_from(h: &pb::Hyperparameters) -> Result<Self> {
        let algorithm = match pb::Algorithm::try_from(h.algorithm) {
            Ok(pb::Algorithm::Fedavg) => Algorithm::FedAvg,
            Ok(pb::Algorithm::Fedsgd) => Algorithm::FedSgd,
            Ok(pb::Algorithm::Fedprox) => Algorithm::FedProx,
            Ok(pb::Algorithm::Scaffold) => Algorithm::Scaffold,
            _ => {
                return Err(Error::Payload(format!(
                    "task asks for unknown training algorithm {}",
                    h.algorithm
                )));
            }
        };
        let optimizer = match pb::LocalOptimizer::try_from(h.optimizer) {
            Ok(pb::LocalOptimizer::Sgd) => LocalOptimizer::Sgd,
            Ok(pb::LocalOptimizer::Adam) => LocalOptimizer::Adam,
            _ => {
                return Err(Error::Payload(format!(
                    "task asks for unknown local optimizer {}",
                    h.optimizer
                )));
            }
        };
        let privacy = match &h.privacy {
            Some(p) if p.clip_norm > 0.0 => {
                if !(p.clip_norm.is_finite() && p.noise_stddev.is_finite() && p.noise_stddev >= 0.0) {
                    return Err(Error::Payload(format!(
                        "task asks for clipping norm {} and noise {}: not usable",
                        p.clip_norm, p.noise_stddev
                    )));
                }
                Some(crate::task::PrivacyTask {
                    clip_norm: p.clip_norm,
                    noise_stddev: p.noise_stddev,
                })
            }
            _ => None,
        };
        Ok(Hyperparameters {
            epochs: h.epochs,
            batch_size: h.batch_size,
            learning_rate: h.learning_rate,
            momentum: h.momentum,
            weight_decay: h.weight_decay,
            max_steps: h.max_steps,
            seed: h.seed,
            crop_padding: h.crop_padding,
            horizontal_flip: h.horizontal_flip,
            algorithm,
            proximal_mu: h.proximal_mu,
            optimizer,
            evaluate: h.evaluate,
            privacy,
        })
    }
}

/// Training metrics and the optional federated evaluation, as sent with an update.
pub fn metrics_to_wire(m: &TrainMetrics, eval: Option<&EvalMetrics>) -> pb::TrainMetrics {
    pb::TrainMetrics {
        loss: m.loss,
        accuracy: m.accuracy,
        steps: m.steps,
        examples: m.examples,
        train_seconds: m.train_seconds,
        eval_loss: eval.map_or(0.0, |e| e.loss),
        eval_accuracy: eval.map_or(0.0, |e| e.accuracy),
        eval_examples: eval.map_or(0, |e| e.examples),
        unclipped: m.unclipped,
        fetch_seconds: m.fetch_seconds,
        encode_seconds: m.encode_seconds,
    }
}

/// A duration a node reported, or 0 when it is not a finite, non-negative number.
fn finite_seconds(s: f64) -> f64 {
    if s.is_finite() && s >= 0.0 { s } else { 0.0 }
}

/// The inverse of [`metrics_to_wire`].
pub fn metrics_from_wire(m: &pb::TrainMetrics) -> (TrainMetrics, Option<EvalMetrics>) {
    let train = TrainMetrics {
        loss: m.loss,
        accuracy: m.accuracy,
        steps: m.steps,
        examples: m.examples,
        train_seconds: m.train_seconds,
        fetch_seconds: finite_seconds(m.fetch_seconds),
        encode_seconds: finite_seconds(m.encode_seconds),
        unclipped: m.unclipped,
    };
    let eval = (m.eval_examples > 0).then_some(EvalMetrics {
        loss: m.eval_loss,
        accuracy: m.eval_accuracy,
        examples: m.eval_examples,
    });
    (train, eval)
}

impl From<&Manifest> for pb::Manifest {
    fn from(m: &Manifest) -> Self {
        pb::Manifest {
            tensors: m
                .tensors
                .iter()
                .map(|t| pb::TensorSpec {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                })
                .collect(),
            encoding: pb::Encoding::F32Le as i32,
            payload_bytes: m.payload_bytes(),
            block_size: 0,
        }
    }
}

/// The wire name of an encoding number, for messages.
pub fn encoding_name(encoding: i32) -> String {
    pb::Encoding::try_from(encoding)
        .map(|e| e.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("#{encoding}"))
}

impl Codec {
    /// The wire encoding and block size of this codec.
    pub fn wire_encoding(&self) -> (pb::Encoding, u32) {
        match *self {
            Codec::F32 => (pb::Encoding::F32Le, 0),
            Codec::F16 => (pb::Encoding::F16Le, 0),
            Codec::Bf16 => (pb::Encoding::Bf16Le, 0),
            Codec::Int8 { block } => (pb::Encoding::Int8Block, block),
            Codec::TopK { .. } => (pb::Encoding::Topk, 0),
            Codec::Sign { block } => (pb::Encoding::SignBlock, block),
            Codec::Masked => (pb::Encoding::MaskedU32, 0),
        }
    }

    /// Checks that a wire manifest announces this codec; names both otherwise.
    pub fn check_wire(&self, m: &pb::Manifest) -> Result<()> {
        let (encoding, block) = self.wire_encoding();
        if m.encoding != encoding as i32 || m.block_size != block {
            return Err(Error::Payload(format!(
                "update is encoded as {} (block {}); this run's updates use {self} ({}, block {block})",
                encoding_name(m.encoding),
                m.block_size,
                encoding.as_str_name()
            )));
        }
        Ok(())
    }
}

impl From<&Codec> for pb::UpdateCodec {
    fn from(c: &Codec) -> Self {
        let (encoding, block_size) = c.wire_encoding();
        pb::UpdateCodec {
            encoding: encoding as i32,
            block_size,
            topk_fraction: match c {
                Codec::TopK { fraction } => *fraction,
                _ => 0.0,
            },
        }
    }
}

impl TryFrom<&pb::UpdateCodec> for Codec {
    type Error = Error;

    fn try_from(c: &pb::UpdateCodec) -> Result<Self> {
        let codec = match pb::Encoding::try_from(c.encoding) {
            Ok(pb::Encoding::F32Le) => Codec::F32,
            Ok(pb::Encoding::F16Le) => Codec::F16,
            Ok(pb::Encoding::Bf16Le) => Codec::Bf16,
            Ok(pb::Encoding::Int8Block) => Codec::Int8 { block: c.block_size },
            Ok(pb::Encoding::Topk) => Codec::TopK {
                fraction: c.topk_fraction,
            },
            Ok(pb::Encoding::SignBlock) => Codec::Sign { block: c.block_size },
            Ok(pb::Encoding::MaskedU32) => Codec::Masked,
            _ => {
                return Err(Error::Payload(format!(
                    "the coordinator asks for update encoding {}, which this node does not know",
                    encoding_name(c.encoding)
                )));
            }
        };
        codec
            .validate()
            .map_err(|e| Error::Payload(format!("the coordinator's update codec is invalid: {e}")))?;
        Ok(codec)
    }
}

/// The wire manifest of an update: the model's tensors, the codec, and the
/// encoded payload's exact length.
pub fn update_manifest(m: &Manifest, codec: &Codec, payload_bytes: u64) -> pb::Manifest {
    let (encoding, block_size) = codec.wire_encoding();
    pb::Manifest {
        encoding: encoding as i32,
        payload_bytes,
        block_size,
        ..pb::Manifest::from(m)
    }
}

/// Most values a manifest may list (2^40: 4 TiB of f32), so that sizes
/// computed from shapes never overflow.
pub const MAX_MANIFEST_VALUES: u64 = 1 << 40;

/// The tensors a wire manifest lists, checked for negative dimensions and
/// for sizes that would overflow.
pub fn tensors_from_wire(m: &pb::Manifest) -> Result<Manifest> {
    let mut tensors = Vec::with_capacity(m.tensors.len());
    let mut total: u64 = 0;
    for t in &m.tensors {
        if t.shape.iter().any(|&d| d < 0) {
            return Err(Error::Payload(format!(
                "tensor `{}` has a negative dimension {:?}",
                t.name, t.shape
            )));
        }
        total = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|n| total.checked_add(n))
            .filter(|&n| n <= MAX_MANIFEST_VALUES)
            .ok_or_else(|| {
                Error::Payload(format!(
                    "tensor `{}` of shape {:?} takes the manifest past {MAX_MANIFEST_VALUES} values",
                    t.name, t.shape
                ))
            })?;
        tensors.push(TensorMeta {
            name: t.name.clone(),
            shape: t.shape.clone(),
        });
    }
    Ok(Manifest { tensors })
}

impl TryFrom<&pb::Manifest> for Manifest {
    type Error = Error;

    /// A model manifest: f32 values, exactly as many bytes as the tensors need.
    fn try_from(m: &pb::Manifest) -> Result<Self> {
        if m.encoding != pb::Encoding::F32Le as i32 {
            return Err(Error::Payload(format!(
                "unsupported encoding {}",
                encoding_name(m.encoding)
            )));
        }
        let manifest = tensors_from_wire(m)?;
        if manifest.payload_bytes() != m.payload_bytes {
            return Err(Error::Payload(format!(
                "manifest announces {} bytes but its tensors need {}",
                m.payload_bytes,
                manifest.payload_bytes()
            )));
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn manifests_whose_sizes_would_overflow_are_refused() {
        let m = pb::Manifest {
            tensors: vec![pb::TensorSpec {
                name: "w".into(),
                shape: vec![i64::MAX, 16],
            }],
            ..Default::default()
        };
        let err = tensors_from_wire(&m).unwrap_err().to_string();
        assert!(err.contains("takes the manifest past"), "{err}");
        let m = pb::Manifest {
            tensors: vec![pb::TensorSpec {
                name: "w".into(),
                shape: vec![3, 4],
            }],
            ..Default::default()
        };
        assert_eq!(tensors_from_wire(&m).unwrap().numel(), 12);
    }

    fn read_back(payload: &Bytes, chunk: usize, crc: u32) -> Result<Vec<f32>> {
        let mut r = PayloadReader::new(payload.len() as u64)?;
        for c in chunks(payload, chunk) {
            r.push(&c)?;
        }
        r.finish(crc)
    }

    proptest! {
        #[test]
        fn any_chunking_reassembles_the_payload(values in proptest::collection::vec(any::<f32>(), 0..500), chunk in 1usize..64) {
            let payload = encode_f32(&values);
            let back = read_back(&payload, chunk, crc32(&payload)).unwrap();
            prop_assert_eq!(back.len(), values.len());
            for (a, b) in back.iter().zip(&values) {
                prop_assert_eq!(a.to_bits(), b.to_bits());
            }
        }
    }

    #[test]
    fn truncated_overlong_and_corrupt_payloads_are_refused() {
        let payload = encode_f32(&[1.0, 2.0, 3.0]);
        let crc = crc32(&payload);

        let mut r = PayloadReader::new(12).unwrap();
        r.push(&payload[..8]).unwrap();
        assert_eq!(
            r.finish(crc).unwrap_err().to_string(),
            "payload: payload truncated: 8 bytes received, 12 announced"
        );

        let mut r = PayloadReader::new(8).unwrap();
        assert_eq!(
            r.push(&payload).unwrap_err().to_string(),
            "payload: payload overruns its announced size: 12 bytes received, 8 announced"
        );

        let err = read_back(&payload, 5, crc ^ 1).unwrap_err().to_string();
        assert!(err.starts_with("payload: checksum mismatch"), "{err}");

        assert!(PayloadReader::new(7).is_err());
    }

    #[test]
    fn manifest_conversion_checks_sizes_and_encoding() {
        let m = Manifest {
            tensors: vec![TensorMeta {
                name: "w".into(),
                shape: vec![3, 2],
            }],
        };
        let mut wire = pb::Manifest::from(&m);
        assert_eq!(wire.payload_bytes, 24);
        assert_eq!(Manifest::try_from(&wire).unwrap(), m);
        wire.payload_bytes = 20;
        assert_eq!(
            Manifest::try_from(&wire).unwrap_err().to_string(),
            "payload: manifest announces 20 bytes but its tensors need 24"
        );
        wire.payload_bytes = 24;
        wire.encoding = 0;
        assert_eq!(
            Manifest::try_from(&wire).unwrap_err().to_string(),
            "payload: unsupported encoding ENCODING_UNSPECIFIED"
        );
    }

    #[test]
    fn codecs_cross_the_wire_and_a_mismatch_names_both() {
        for codec in [
            Codec::F32,
            Codec::F16,
            Codec::Bf16,
            Codec::Int8 { block: 64 },
            Codec::TopK { fraction: 0.05 },
            Codec::Sign { block: 128 },
        ] {
            assert_eq!(Codec::try_from(&pb::UpdateCodec::from(&codec)).unwrap(), codec);
            let m = update_manifest(&Manifest::default(), &codec, 0);
            codec.check_wire(&m).unwrap();
        }
        let sent = update_manifest(&Manifest::default(), &Codec::F16, 0);
        assert_eq!(
            Codec::Int8 { block: 256 }.check_wire(&sent).unwrap_err().to_string(),
            "payload: update is encoded as ENCODING_F16_LE (block 0); this run's updates use int8(block=256) \
             (ENCODING_INT8_BLOCK, block 256)"
        );
        let unknown = pb::UpdateCodec {
            encoding: 99,
            ..Default::default()
        };
        assert_eq!(
            Codec::try_from(&unknown).unwrap_err().to_string(),
            "payload: the coordinator asks for update encoding #99, which this node does not know"
        );
    }

    #[test]
    fn hyperparameters_cross_the_wire_and_unknown_algorithms_are_named() {
        let h = Hyperparameters {
            algorithm: Algorithm::Scaffold,
            optimizer: LocalOptimizer::Adam,
            proximal_mu: 0.3,
            evaluate: false,
            seed: 9,
            ..Default::default()
        };
        let wire = pb::Hyperparameters::from(&h);
        assert_eq!(Hyperparameters::try_from(&wire).unwrap(), h);
        let bad = pb::Hyperparameters { algorithm: 42, ..wire };
        assert_eq!(
            Hyperparameters::try_from(&bad).unwrap_err().to_string(),
            "payload: task asks for unknown training algorithm 42"
        );
    }
}

/// Secure aggregation's messages on the wire (`fedge_common::secagg` types
/// on both sides; these convert at the edges).
pub mod secagg {
    use crate::pb;
    use crate::secagg::{Advertise, NodeId, Reveal, SealedShares, UnmaskRequest};
    use crate::{Error, Result};

    fn key(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
        <[u8; 32]>::try_from(bytes)
            .map_err(|_| Error::Payload(format!("a {what} key has {} bytes; X25519 keys have 32", bytes.len())))
    }

    impl From<&Advertise> for pb::SecAggKeys {
        fn from(a: &Advertise) -> Self {
            pb::SecAggKeys {
                id: a.id,
                cipher_key: a.cipher_key.to_vec().into(),
                mask_key: a.mask_key.to_vec().into(),
                seed_commitment: a.seed_commitment.to_vec().into(),
            }
        }
    }

    impl TryFrom<&pb::SecAggKeys> for Advertise {
        type Error = Error;

        fn try_from(k: &pb::SecAggKeys) -> Result<Self> {
            Ok(Advertise {
                id: k.id,
                cipher_key: key(&k.cipher_key, "cipher")?,
                mask_key: key(&k.mask_key, "mask")?,
                seed_commitment: <[u8; 32]>::try_from(&k.seed_commitment[..]).map_err(|_| {
                    Error::Payload(format!(
                        "a self-mask seed commitment has {} bytes; it is a SHA-256 digest of 32",
                        k.seed_commitment.len()
                    ))
                })?,
            })
        }
    }

    impl From<&SealedShares> for pb::SealedShare {
        fn from(s: &SealedShares) -> Self {
            pb::SealedShare {
                from: s.from,
                to: s.to,
                ciphertext: s.ciphertext.clone().into(),
            }
        }
    }

    impl From<&pb::SealedShare> for SealedShares {
        fn from(s: &pb::SealedShare) -> Self {
            SealedShares {
                from: s.from,
                to: s.to,
                ciphertext: s.ciphertext.to_vec(),
            }
        }
    }

    fn shares_to_wire(v: &[(NodeId, Vec<u8>)]) -> Vec<pb::SecretShare> {
        v.iter()
            .map(|(node, share)| pb::SecretShare {
                node: *node,
                share: share.clone().into(),
            })
            .collect()
    }

    fn shares_from_wire(v: &[pb::SecretShare]) -> Vec<(NodeId, Vec<u8>)> {
        v.iter().map(|s| (s.node, s.share.to_vec())).collect()
    }

    /// A node's answer to an unmasking request.
    pub fn reveal_to_wire(r: &Reveal) -> pb::SecAggReveal {
        pb::SecAggReveal {
            seed_shares: shares_to_wire(&r.seed_shares),
            key_shares: shares_to_wire(&r.key_shares),
        }
    }

    /// An answer as the coordinator takes it; `from` is the sender's number.
    pub fn reveal_from_wire(from: NodeId, r: &pb::SecAggReveal) -> Reveal {
        Reveal {
            from,
            seed_shares: shares_from_wire(&r.seed_shares),
            key_shares: shares_from_wire(&r.key_shares),
        }
    }

    impl From<&UnmaskRequest> for pb::SecAggUnmask {
        fn from(u: &UnmaskRequest) -> Self {
            pb::SecAggUnmask {
                round: 0,
                survivors: u.survivors.clone(),
                dropped: u.dropped.clone(),
            }
        }
    }

    impl From<&pb::SecAggUnmask> for UnmaskRequest {
        fn from(u: &pb::SecAggUnmask) -> Self {
            UnmaskRequest {
                survivors: u.survivors.clone(),
                dropped: u.dropped.clone(),
            }
        }
    }
}
