//! Update codecs: how a node's update becomes payload bytes, and how the
//! coordinator turns them back into values chunk by chunk.
//!
//! | codec | bytes per value | error bound per value | notes |
//! |-------|-----------------|-----------------------|-------|
//! | `f32` | 4 | exact | reference |
//! | `f16` | 2 | relative 2⁻¹¹ (normal range) | IEEE binary16 |
//! | `bf16` | 2 | relative 2⁻⁸ | bfloat16, f32's range |
//! | `int8` | 1 + 4/block | `max|block| / 127`, unbiased | per-block scale, stochastic rounding, error feedback |
//! | `topk` | 8 per kept value | the dropped values | `⌈fraction·n⌉` largest magnitudes, error feedback |
//! | `sign` | 1/8 + 4/block | biased | sign bits times the block's mean magnitude, error feedback |
//! | `masked` | 4 | – | secure aggregation's masked ring elements (see [`crate::secagg`]) |
//!
//! Layouts (little-endian): `f32`/`f16`/`bf16` are the values in order.
//! `int8` is, per block of `block` values (the last may be shorter), an f32
//! scale `s` then one i8 `q` per value; a value decodes as `q·s`. `topk` is a
//! list of `(u32 index, f32 value)` pairs with strictly increasing indices;
//! absent indices are zero. `sign` is, per block, an f32 magnitude `s` then
//! one bit per value (LSB first, 1 = negative); a value decodes as `±s`.
//!
//! The lossy codecs beyond half precision (`int8`, `topk`, `sign`) are used
//! with error feedback ([`encode_with_feedback`]): what a payload did not
//! carry is added to the next round's update, so every coordinate's mass is
//! sent eventually and quantization errors do not accumulate.

use std::fmt;

use half::{bf16, f16};
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Default values per block of the `int8` and `sign` codecs.
pub const DEFAULT_BLOCK: u32 = 256;

/// Largest block the block codecs accept.
pub const MAX_BLOCK: u32 = 1 << 16;

/// How an update's values are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Codec {
    /// Little-endian f32, lossless.
    #[default]
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
    /// Linear 8-bit quantization with one scale per `block` values and
    /// stochastic (unbiased) rounding.
    Int8 { block: u32 },
    /// The `⌈fraction·n⌉` values of largest magnitude, as (index, value) pairs.
    TopK { fraction: f64 },
    /// Signs with one magnitude per `block` values.
    Sign { block: u32 },
    /// Secure aggregation's masked input: little-endian `u32` ring elements
    /// made by [`crate::secagg`], announced by the coordinator when the run
    /// uses it (not chosen by name). The decoder hands them on as `f32`s of
    /// the same bits; only [`crate::secagg`] gives them meaning.
    Masked,
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::Int8 { block } => write!(f, "int8(block={block})"),
            Codec::TopK { fraction } => write!(f, "topk(fraction={fraction})"),
            Codec::Sign { block } => write!(f, "sign(block={block})"),
            other => f.write_str(other.name()),
        }
    }
}

impl Codec {
    /// Names accepted by [`Codec::from_parts`].
    pub const NAMES: [&'static str; 6] = ["f32", "f16", "bf16", "int8", "topk", "sign"];

    /// The codec's short name.
    pub fn name(&self) -> &'static str {
        match self {
            Codec::F32 => "f32",
            Codec::F16 => "f16",
            Codec::Bf16 => "bf16",
            Codec::Int8 { .. } => "int8",
            Codec::TopK { .. } => "topk",
            Codec::Sign { .. } => "sign",
            Codec::Masked => "masked",
        }
    }

    /// Builds a codec from its name and parameters, checking their ranges.
    pub fn from_parts(name: &str, block: u32, fraction: f64) -> Result<Self> {
        let codec = match name {
            "f32" => Codec::F32,
            "f16" => Codec::F16,
            "bf16" => Codec::Bf16,
            "int8" => Codec::Int8 { block },
            "topk" => Codec::TopK { fraction },
            "sign" => Codec::Sign { block },
            other => {
                return Err(Error::Config(format!(
                    "unknown codec `{other}` (expected one of: {})",
                    Self::NAMES.join(", ")
                )));
            }
        };
        codec.validate()?;
        Ok(codec)
    }

    /// Checks the codec's parameters.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Codec::Int8 { block } | Codec::Sign { block } if block == 0 || block > MAX_BLOCK => Err(Error::Config(
                format!("codec block size must be between 1 and {MAX_BLOCK}, got {block}"),
            )),
            Codec::TopK { fraction } if !(fraction > 0.0 && fraction <= 1.0) => Err(Error::Config(format!(
                "topk fraction must be in (0, 1], got {fraction}"
            ))),
            _ => Ok(()),
        }
    }

    /// Whether nodes run the codec with error feedback: the biased codecs
    /// need it to converge, and `int8`'s quantization error (unbiased, but
    /// up to a step per value) is carried over rather than left to add up
    /// over rounds.
    pub fn uses_error_feedback(&self) -> bool {
        matches!(self, Codec::Int8 { .. } | Codec::TopK { .. } | Codec::Sign { .. })
    }

    /// Values the `topk` codec keeps out of `n`.
    pub fn kept(fraction: f64, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            ((fraction * n as f64).ceil() as usize).clamp(1, n)
        }
    }

    /// Payload size in bytes of `n` values.
    pub fn encoded_len(&self, n: usize) -> u64 {
        let n64 = n as u64;
        match *self {
            Codec::F32 | Codec::Masked => 4 * n64,
            Codec::F16 | Codec::Bf16 => 2 * n64,
            Codec::Int8 { block } => n64 + 4 * n64.div_ceil(u64::from(block)),
            Codec::TopK { fraction } => 8 * Self::kept(fraction, n) as u64,
            Codec::Sign { block } => {
                let b = u64::from(block);
                let full = n64 / b;
                let rest = n64 % b;
                full * (4 + b.div_ceil(8)) + if rest > 0 { 4 + rest.div_ceil(8) } else { 0 }
            }
        }
    }

    /// Bytes of the decodable unit that starts at value `pos` of `n`.
    fn unit_len(&self, pos: usize, n: usize) -> usize {
        match *self {
            Codec::F32 | Codec::Masked => 4,
            Codec::TopK { .. } => 8,
            Codec::F16 | Codec::Bf16 => 2,
            Codec::Int8 { block } => 4 + (block as usize).min(n - pos),
            Codec::Sign { block } => 4 + (block as usize).min(n - pos).div_ceil(8),
        }
    }

    /// Encodes `values`. `seed` drives the `int8` codec's stochastic rounding.
    /// `masked` writes the values' bits (masked inputs come from [`crate::secagg`]).
    pub fn encode(&self, values: &[f32], seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len(values.len()) as usize);
        match *self {
            Codec::F32 | Codec::Masked => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            Codec::F16 => out.extend(values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes())),
            Codec::Bf16 => out.extend(values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes())),
            Codec::Int8 { block } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                for chunk in values.chunks(block as usize) {
                    let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = max / 127.0;
                    out.extend_from_slice(&scale.to_le_bytes());
                    for &v in chunk {
                        let q = if scale > 0.0 && scale.is_finite() {
                            let x = f64::from(v) / f64::from(scale);
                            let lo = x.floor();
                            let up = rng.random::<f64>() < x - lo;
                            (lo + f64::from(u8::from(up))).clamp(-127.0, 127.0) as i8
                        } else {
                            0
                        };
                        out.push(q as u8);
                    }
                }
            }
            Codec::TopK { fraction } => {
                let k = Self::kept(fraction, values.len());
                let mut order: Vec<u32> = (0..values.len() as u32).collect();
                let by_magnitude = |a: &u32, b: &u32| {
                    values[*b as usize]
                        .abs()
                        .total_cmp(&values[*a as usize].abs())
                        .then(a.cmp(b))
                };
                if k < order.len() {
                    order.select_nth_unstable_by(k, by_magnitude);
                }
                let mut kept = order[..k].to_vec();
                kept.sort_unstable();
                for i in kept {
                    out.extend_from_slice(&i.to_le_bytes());
                    out.extend_from_slice(&values[i as usize].to_le_bytes());
                }
            }
            Codec::Sign { block } => {
                for chunk in values.chunks(block as usize) {
                    let mean = chunk.iter().map(|v| f64::from(v.abs())).sum::<f64>() / chunk.len() as f64;
                    out.extend_from_slice(&(mean as f32).to_le_bytes());
                    for bits in chunk.chunks(8) {
                        let byte = bits
                            .iter()
                            .enumerate()
                            .fold(0u8, |b, (i, v)| b | (u8::from(v.is_sign_negative()) << i));
                        out.push(byte);
                    }
                }
            }
        }
        out
    }
}

/// Encodes `values + residual` and leaves in `residual` what the payload
/// does not carry (error feedback, Seide et al. 2014; Stich et al. 2018).
pub fn encode_with_feedback(codec: &Codec, values: &[f32], residual: &mut Vec<f32>, seed: u64) -> Vec<u8> {
    if residual.len() != values.len() {
        residual.clear();
        residual.resize(values.len(), 0.0);
    }
    for (r, &v) in residual.iter_mut().zip(values) {
        *r += v;
    }
    let bytes = codec.encode(residual, seed);
    let mut decoder = Decoder::new(*codec, residual.len(), bytes.len() as u64).expect("own payload size");
    decoder
        .push(&bytes, &mut |offset, sent| {
            for (r, s) in residual[offset..offset + sent.len()].iter_mut().zip(sent) {
                *r -= s;
            }
        })
        .expect("own payload decodes");
    decoder.finish().expect("own payload is complete");
    bytes
}

/// Decodes a whole payload of `n` values.
pub fn decode(codec: &Codec, n: usize, bytes: &[u8]) -> Result<Vec<f32>> {
    let mut out = vec![0f32; n];
    let mut decoder = Decoder::new(*codec, n, bytes.len() as u64)?;
    decoder.push(bytes, &mut |offset, values| {
        out[offset..offset + values.len()].copy_from_slice(values);
    })?;
    decoder.finish()?;
    Ok(out)
}

/// Decodes a payload as its chunks arrive, handing runs of values to a sink
/// as `(offset, values)`: contiguous for the dense codecs, one value per
/// entry for `topk`. Holds at most one unit (a value or a block) across chunks.
#[derive(Debug)]
pub struct Decoder {
    codec: Codec,
    numel: usize,
    expected: u64,
    received: u64,
    /// Dense codecs: the next value's index. `topk`: entries decoded.
    pos: usize,
    /// `topk`: entries the payload holds.
    entries: usize,
    last_index: Option<u32>,
    carry: Vec<u8>,
    scratch: Vec<f32>,
}

impl Decoder {
    /// A decoder for `numel` values in a payload of exactly `payload_bytes`.
    pub fn new(codec: Codec, numel: usize, payload_bytes: u64) -> Result<Self> {
        codec.validate()?;
        let entries = match codec {
            Codec::TopK { .. } => {
                if !payload_bytes.is_multiple_of(8) || payload_bytes / 8 > numel as u64 {
                    return Err(Error::Payload(format!(
                        "a topk payload of {payload_bytes} bytes does not hold whole (index, value) pairs for at most {numel} values"
                    )));
                }
                if numel > u32::MAX as usize {
                    return Err(Error::Payload(format!(
                        "topk indexes at most {} values; the update has {numel}",
                        u32::MAX
                    )));
                }
                (payload_bytes / 8) as usize
            }
            _ => {
                let want = codec.encoded_len(numel);
                if payload_bytes != want {
                    return Err(Error::Payload(format!(
                        "a {codec} payload of {numel} values takes {want} bytes; {payload_bytes} announced"
                    )));
                }
                0
            }
        };
        Ok(Self {
            codec,
            numel,
            expected: payload_bytes,
            received: 0,
            pos: 0,
            entries,
            last_index: None,
            carry: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Bytes consumed so far.
    pub fn received_bytes(&self) -> u64 {
        self.received
    }

    fn done(&self) -> bool {
        match self.codec {
            Codec::TopK { .. } => self.pos >= self.entries,
            _ => self.pos >= self.numel,
        }
    }

    /// Decodes what `chunk` completes; refuses bytes past the announced size
    /// and malformed `topk` indices.
    pub fn push(&mut self, chunk: &[u8], sink: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
        let total = self.received + chunk.len() as u64;
        if total > self.expected {
            return Err(Error::Payload(format!(
                "payload overruns its announced size: {total} bytes received, {} announced",
                self.expected
            )));
        }
        self.received = total;
        let mut input = chunk;
        if !self.carry.is_empty() {
            let need = self.codec.unit_len(self.pos, self.numel) - self.carry.len();
            let take = need.min(input.len());
            self.carry.extend_from_slice(&input[..take]);
            input = &input[take..];
            if take < need {
                return Ok(());
            }
            let unit = std::mem::take(&mut self.carry);
            self.decode_units(&unit, sink)?;
            self.carry = unit;
            self.carry.clear();
        }
        while !input.is_empty() && !self.done() {
            let unit = self.codec.unit_len(self.pos, self.numel);
            if input.len() < unit {
                break;
            }
            let whole = match self.codec {
                Codec::Int8 { .. } | Codec::Sign { .. } => unit,
                _ => input.len() / unit * unit,
            };
            let (now, rest) = input.split_at(whole);
            self.decode_units(now, sink)?;
            input = rest;
        }
        self.carry.extend_from_slice(input);
        Ok(())
    }

    /// Decodes whole units: one block, or any number of elementwise values.
    fn decode_units(&mut self, bytes: &[u8], sink: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
        let pos = self.pos;
        self.scratch.clear();
        match self.codec {
            Codec::F32 | Codec::Masked => self.scratch.extend(crate::params::decode_f32(bytes)),
            Codec::F16 => self
                .scratch
                .extend(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
            Codec::Bf16 => self.scratch.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            Codec::Int8 { .. } => {
                let scale = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                self.scratch
                    .extend(bytes[4..].iter().map(|&q| f32::from(q as i8) * scale));
            }
            Codec::Sign { block } => {
                let s = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                let len = (block as usize).min(self.numel - pos);
                self.scratch
                    .extend((0..len).map(|i| if bytes[4 + i / 8] >> (i % 8) & 1 == 1 { -s } else { s }));
            }
            Codec::TopK { .. } => {
                for pair in bytes.chunks_exact(8) {
                    let index = u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]);
                    let value = f32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]);
                    if index as usize >= self.numel {
                        return Err(Error::Payload(format!(
                            "topk index {index} is out of range for {} values",
                            self.numel
                        )));
                    }
                    if let Some(prev) = self.last_index
                        && index <= prev
                    {
                        return Err(Error::Payload(format!(
                            "topk indices must increase: {index} follows {prev}"
                        )));
                    }
                    self.last_index = Some(index);
                    sink(index as usize, &[value]);
                    self.pos += 1;
                }
                return Ok(());
            }
        }
        self.pos += self.scratch.len();
        sink(pos, &self.scratch);
        Ok(())
    }

    /// Checks that the whole announced payload arrived and was decoded.
    pub fn finish(self) -> Result<()> {
        if self.received != self.expected || !self.carry.is_empty() || !self.done() {
            return Err(Error::Payload(format!(
                "payload truncated: {} bytes received, {} announced",
                self.received, self.expected
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-4..2)))
            .collect()
    }

    fn chunked(codec: Codec, n: usize, bytes: &[u8], chunk: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        let mut d = Decoder::new(codec, n, bytes.len() as u64)?;
        for c in bytes.chunks(chunk.max(1)) {
            d.push(c, &mut |o, v| out[o..o + v.len()].copy_from_slice(v))?;
        }
        d.finish()?;
        Ok(out)
    }

    fn all_codecs(block: u32, fraction: f64) -> [Codec; 6] {
        [
            Codec::F32,
            Codec::F16,
            Codec::Bf16,
            Codec::Int8 { block },
            Codec::TopK { fraction },
            Codec::Sign { block },
        ]
    }

    proptest! {
        #[test]
        fn every_codec_decodes_the_same_whatever_the_chunking(
            n in 0usize..700, block in 1u32..300, fraction in 0.001f64..1.0, chunk in 1usize..100, seed in any::<u64>()
        ) {
            let v = values(n, seed);
            for codec in all_codecs(block, fraction) {
                let bytes = codec.encode(&v, seed);
                prop_assert_eq!(bytes.len() as u64, codec.encoded_len(n), "{}", codec);
                let whole = decode(&codec, n, &bytes).unwrap();
                let pieces = chunked(codec, n, &bytes, chunk).unwrap();
                prop_assert_eq!(whole, pieces);
            }
        }

        #[test]
        fn lossy_codecs_stay_within_their_error_bounds(n in 1usize..700, block in 1u32..300, seed in any::<u64>()) {
            let v = values(n, seed);
            prop_assert_eq!(decode(&Codec::F32, n, &Codec::F32.encode(&v, 0)).unwrap(), v.clone());
            let f16s = decode(&Codec::F16, n, &Codec::F16.encode(&v, 0)).unwrap();
            let bf16s = decode(&Codec::Bf16, n, &Codec::Bf16.encode(&v, 0)).unwrap();
            for ((&x, &h), &b) in v.iter().zip(&f16s).zip(&bf16s) {
                // f16's subnormals below 2^-14 have an absolute step of 2^-24.
                prop_assert!((h - x).abs() <= x.abs() * 2f32.powi(-11) + 2f32.powi(-24), "f16 {x} -> {h}");
                prop_assert!((b - x).abs() <= x.abs() * 2f32.powi(-8), "bf16 {x} -> {b}");
            }
            let int8 = Codec::Int8 { block };
            let q = decode(&int8, n, &int8.encode(&v, seed)).unwrap();
            for (xs, qs) in v.chunks(block as usize).zip(q.chunks(block as usize)) {
                let step = xs.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                for (&x, &y) in xs.iter().zip(qs) {
                    prop_assert!((y - x).abs() <= step * 1.0001, "int8 {x} -> {y}, step {step}");
                }
            }
        }

        #[test]
        fn topk_keeps_the_largest_values_exactly(n in 1usize..700, fraction in 0.001f64..1.0, seed in any::<u64>()) {
            let v = values(n, seed);
            let codec = Codec::TopK { fraction };
            let d = decode(&codec, n, &codec.encode(&v, 0)).unwrap();
            let k = Codec::kept(fraction, n);
            prop_assert_eq!(d.iter().filter(|x| **x != 0.0).count(), v.iter().zip(&d).filter(|(x, y)| **y != 0.0 && x == y).count());
            let smallest_kept = v.iter().zip(&d).filter(|(_, y)| **y != 0.0).map(|(x, _)| x.abs()).fold(f32::INFINITY, f32::min);
            let largest_dropped = v.iter().zip(&d).filter(|(_, y)| **y == 0.0).map(|(x, _)| x.abs()).fold(0.0, f32::max);
            prop_assert!(k == n || smallest_kept >= largest_dropped);
        }
    }

    #[test]
    fn int8_stochastic_rounding_is_unbiased() {
        // A block whose values sit between quantization steps: the mean of
        // many independently rounded encodings converges to the true values.
        let block = 64u32;
        let v: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 0.01).collect();
        let codec = Codec::Int8 { block };
        let draws = 4000;
        let mut mean = vec![0f64; v.len()];
        for seed in 0..draws {
            for (m, y) in mean
                .iter_mut()
                .zip(decode(&codec, v.len(), &codec.encode(&v, seed)).unwrap())
            {
                *m += f64::from(y) / draws as f64;
            }
        }
        let step = 0.01 / 127.0;
        for (x, m) in v.iter().zip(&mean) {
            // Standard error of a mean of 4000 draws of a step-sized Bernoulli is ≤ step/126.
            assert!((m - f64::from(*x)).abs() < step / 20.0, "{x} vs mean {m}");
        }
        // Deterministic rounding would be biased on these values.
        let avg_bias: f64 = v.iter().zip(&mean).map(|(x, m)| m - f64::from(*x)).sum::<f64>() / v.len() as f64;
        assert!(avg_bias.abs() < step / 100.0, "average bias {avg_bias}");
    }

    #[test]
    fn topk_with_error_feedback_sends_every_coordinate_eventually() {
        let n = 1000;
        let codec = Codec::TopK { fraction: 0.01 };
        let update: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.1).collect();
        let mut residual = Vec::new();
        let mut sent_total = vec![0f64; n];
        let rounds = 200;
        for r in 0..rounds {
            let bytes = encode_with_feedback(&codec, &update, &mut residual, r);
            assert_eq!(bytes.len(), 8 * 10);
            for (s, y) in sent_total.iter_mut().zip(decode(&codec, n, &bytes).unwrap()) {
                *s += f64::from(y);
            }
        }
        assert!(sent_total.iter().all(|&s| s > 0.0), "some coordinate was never sent");
        // What was sent plus what is still owed equals everything the rounds produced.
        for ((s, u), r) in sent_total.iter().zip(&update).zip(&residual) {
            let produced = f64::from(*u) * rounds as f64;
            assert!(
                (s + f64::from(*r) - produced).abs() < 1e-3 * produced,
                "{s} + {r} vs {produced}"
            );
        }
    }

    #[test]
    fn sign_with_error_feedback_tracks_the_sum() {
        let n = 300;
        let codec = Codec::Sign { block: 32 };
        let update = values(n, 7);
        let mut residual = Vec::new();
        let mut sent = vec![0f64; n];
        for r in 0..50 {
            let bytes = encode_with_feedback(&codec, &update, &mut residual, r);
            for (s, y) in sent.iter_mut().zip(decode(&codec, n, &bytes).unwrap()) {
                *s += f64::from(y);
            }
        }
        for ((s, u), r) in sent.iter().zip(&update).zip(&residual) {
            assert!((s + f64::from(*r) - 50.0 * f64::from(*u)).abs() < 1e-3, "{s} {u} {r}");
        }
    }

    #[test]
    fn malformed_payloads_are_refused_with_clear_errors() {
        let v = values(100, 1);
        let int8 = Codec::Int8 { block: 32 };
        let bytes = int8.encode(&v, 3);
        assert_eq!(
            Decoder::new(int8, 100, bytes.len() as u64 + 1).unwrap_err().to_string(),
            "payload: a int8(block=32) payload of 100 values takes 116 bytes; 117 announced"
        );
        assert_eq!(
            decode(&int8, 101, &bytes).unwrap_err().to_string(),
            "payload: a int8(block=32) payload of 101 values takes 117 bytes; 116 announced"
        );
        let mut d = Decoder::new(int8, 100, bytes.len() as u64).unwrap();
        d.push(&bytes[..50], &mut |_, _| {}).unwrap();
        assert_eq!(
            d.finish().unwrap_err().to_string(),
            "payload: payload truncated: 50 bytes received, 116 announced"
        );
        let err = Decoder::new(int8, 100, 10).unwrap_err().to_string();
        assert!(err.contains("takes 116 bytes; 10 announced"), "{err}");

        let mut d = Decoder::new(Codec::F16, 100, 200).unwrap();
        let long = vec![0u8; 201];
        assert_eq!(
            d.push(&long, &mut |_, _| {}).unwrap_err().to_string(),
            "payload: payload overruns its announced size: 201 bytes received, 200 announced"
        );

        let topk = Codec::TopK { fraction: 0.1 };
        assert!(
            Decoder::new(topk, 100, 12)
                .unwrap_err()
                .to_string()
                .contains("whole (index, value) pairs")
        );
        assert!(Decoder::new(topk, 10, 88).is_err());
        let pair = |i: u32, v: f32| [i.to_le_bytes(), v.to_le_bytes()].concat();
        let out_of_range = pair(100, 1.0);
        assert_eq!(
            decode(&topk, 100, &out_of_range).unwrap_err().to_string(),
            "payload: topk index 100 is out of range for 100 values"
        );
        let unordered = [pair(5, 1.0), pair(5, 2.0)].concat();
        assert_eq!(
            decode(&topk, 100, &unordered).unwrap_err().to_string(),
            "payload: topk indices must increase: 5 follows 5"
        );
        assert_eq!(
            Codec::from_parts("zstd", 256, 0.1).unwrap_err().to_string(),
            "invalid configuration: unknown codec `zstd` (expected one of: f32, f16, bf16, int8, topk, sign)"
        );
        assert!(Codec::from_parts("topk", 256, 0.0).is_err());
        assert!(Codec::from_parts("int8", 0, 0.1).is_err());
    }
}
