//! Compressed pseudo-gradients, with error feedback.
//!
//! A pseudo-gradient (see [`crate::outer`]) is a flat `f32` vector in the order of the model's
//! tensors sorted by name, cut into pieces of [`VALUES_PER_PIECE`] values; each piece is
//! encoded on its own, so pieces travel (and are checked) independently. Three encodings:
//!
//! * [`Compression::F32`]: 4 bytes a value, exact (for comparison).
//! * [`Compression::Int8`]: blockwise absmax int8 in blocks of [`INT8_BLOCK`] values: one `f32`
//!   scale (`absmax / 127`) per block, then one `i8` per value: 1.03 bytes a value, each value
//!   within half a scale step (`absmax / 254`) of the original. The blockwise scheme is the one
//!   of Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022);
//!   INTELLECT-1 sends its pseudo-gradients as int8 the same way.
//! * [`Compression::TopK`]: the `fraction` largest values by magnitude, each sent as 2 bits
//!   (its sign, and which of two magnitudes it takes: the mean magnitude of the smaller and of
//!   the larger half of the kept values), their positions as LEB128 gaps: about
//!   `fraction × (2 + 8)` bits a value (0.3 bits at 3%). SparseLoCo (Sarfi et al., 2025) and
//!   Covenant-72B send top-k 1-3% with 2-bit values the same way.
//!
//! Both lossy encodings need **error feedback** ([`ErrorFeedback`]): what rounding or
//! sparsification left out of one delta is added to the next, so the sum of what was sent
//! follows the sum of the true deltas (Seide et al., "1-bit SGD", 2014; Karimireddy et al.,
//! "Error Feedback Fixes SignSGD", ICML 2019).
//!
//! Decoding is strict: a piece whose length, positions or scales do not add up, or that holds a
//! NaN or an infinity, is an error naming what is wrong; no input makes it panic or allocate
//! more than the piece's values.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Values in one piece (the last piece holds the rest).
pub const VALUES_PER_PIECE: usize = 1 << 18;

/// Values sharing one int8 scale.
pub const INT8_BLOCK: usize = 128;

/// How pseudo-gradients are encoded for peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// 4-byte floats, exact.
    F32,
    /// Blockwise absmax int8.
    #[default]
    Int8,
    /// The largest values by magnitude, 2 bits each.
    TopK,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Int8 => "int8",
            Self::TopK => "top-k",
        })
    }
}

/// An encoding with its parameters: what both sides of an exchange must agree on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Codec {
    /// The encoding.
    pub compression: Compression,
    /// For top-k: the fraction of each piece's values kept, in (0, 1].
    pub topk_fraction: f64,
}

/// A vector encoded piece by piece, with what the receiver will decode.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The pieces, in order.
    pub pieces: Vec<Vec<u8>>,
    /// What decoding the pieces gives (the sent values, after rounding and sparsification).
    pub values: Vec<f32>,
}

impl Encoded {
    /// Bytes of all pieces.
    pub fn bytes(&self) -> usize {
        self.pieces.iter().map(Vec::len).sum()
    }
}

/// Number of pieces of a vector of `len` values.
pub fn pieces(len: usize) -> u32 {
    u32::try_from(len.div_ceil(VALUES_PER_PIECE)).unwrap_or(u32::MAX)
}

/// The values piece `index` of a vector of `len` values covers (empty past the end).
pub fn piece_range(len: usize, index: u32) -> Range<usize> {
    let start = (index as usize).saturating_mul(VALUES_PER_PIECE).min(len);
    start..start.saturating_add(VALUES_PER_PIECE).min(len)
}

impl Codec {
    /// Values top-k keeps of a piece of `n` values: `ceil(fraction × n)`, at least 1.
    pub fn kept(&self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        ((self.topk_fraction * n as f64).ceil() as usize).clamp(1, n)
    }

    /// Encodes every piece of `values`.
    pub fn encode(&self, values: &[f32]) -> Encoded {
        let count = pieces(values.len());
        let mut encoded = Vec::with_capacity(count as usize);
        let mut sent = Vec::with_capacity(values.len());
        for index in 0..count {
            let (bytes, decoded) = self.encode_piece(&values[piece_range(values.len(), index)]);
            encoded.push(bytes);
            sent.extend_from_slice(&decoded);
        }
        Encoded {
            pieces: encoded,
            values: sent,
        }
    }

    /// Encodes one piece; gives its bytes and what they decode to.
    pub fn encode_piece(&self, values: &[f32]) -> (Vec<u8>, Vec<f32>) {
        match self.compression {
            Compression::F32 => {
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (bytes, values.to_vec())
            }
            Compression::Int8 => encode_int8(values),
            Compression::TopK => encode_topk(values, self.kept(values.len())),
        }
    }

    /// Decodes one piece that must hold `n` values.
    pub fn decode_piece(&self, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
        let values = match self.compression {
            Compression::F32 => {
                if bytes.len() != n.saturating_mul(4) {
                    return Err(format!(
                        "{} bytes for {n} f32 values (expected {})",
                        bytes.len(),
                        n.saturating_mul(4)
                    ));
                }
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            Compression::Int8 => decode_int8(bytes, n)?,
            Compression::TopK => decode_topk(bytes, n, self.kept(n))?,
        };
        match values.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(format!("value {i} is not finite")),
            None => Ok(values),
        }
    }

    /// Bytes one piece of `n` values takes at most.
    pub fn max_piece_bytes(&self, n: usize) -> usize {
        match self.compression {
            Compression::F32 => 4 * n,
            Compression::Int8 => n + 4 * n.div_ceil(INT8_BLOCK),
            Compression::TopK => {
                let k = self.kept(n);
                12 + k.div_ceil(4) + 5 * k
            }
        }
    }
}

/// Int8 piece: the block scales (`f32`, little-endian), then one `i8` per value.
fn encode_int8(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let blocks = values.len().div_ceil(INT8_BLOCK);
    let mut bytes = Vec::with_capacity(4 * blocks + values.len());
    let mut codes = Vec::with_capacity(values.len());
    let mut decoded = Vec::with_capacity(values.len());
    for block in values.chunks(INT8_BLOCK) {
        let absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if absmax.is_finite() {
            absmax / 127.0
        } else {
            0.0
        };
        bytes.extend_from_slice(&scale.to_le_bytes());
        for v in block {
            let q = if scale > 0.0 {
                (v / scale).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            };
            codes.push(q as u8);
            decoded.push(f32::from(q) * scale);
        }
    }
    bytes.extend_from_slice(&codes);
    (bytes, decoded)
}

fn decode_int8(bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let blocks = n.div_ceil(INT8_BLOCK);
    let expected = 4 * blocks + n;
    if bytes.len() != expected {
        return Err(format!(
            "{} bytes for {n} int8 values (expected {expected})",
            bytes.len()
        ));
    }
    let (scales, codes) = bytes.split_at(4 * blocks);
    let mut values = Vec::with_capacity(n);
    for (block, scale) in codes.chunks(INT8_BLOCK).zip(scales.chunks_exact(4)) {
        let scale = f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]]);
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(format!(
                "int8 block scale {scale} is not a finite figure >= 0"
            ));
        }
        values.extend(block.iter().map(|c| f32::from(*c as i8) * scale));
    }
    Ok(values)
}

/// Top-k piece: `k` (`u32`), the two magnitudes (`f32`), `k` 2-bit codes (bit 0: negative,
/// bit 1: the larger magnitude; four to a byte, low bits first), then the positions as LEB128
/// gaps (the first is the position, each next one the distance minus one).
fn encode_topk(values: &[f32], k: usize) -> (Vec<u8>, Vec<f32>) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    let magnitude = |i: &usize| {
        let v = values[*i].abs();
        if v.is_finite() {
            v
        } else {
            0.0
        }
    };
    if k < order.len() {
        order.select_nth_unstable_by(k, |a, b| magnitude(b).total_cmp(&magnitude(a)));
        order.truncate(k);
    }
    // The larger half of the kept values takes their mean magnitude, the smaller half theirs.
    let mut kept: Vec<(usize, f32)> = order.iter().map(|i| (*i, magnitude(i))).collect();
    kept.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    let big = kept.len().div_ceil(2);
    let mean = |part: &[(usize, f32)]| {
        let sum: f64 = part.iter().map(|(_, m)| f64::from(*m)).sum();
        (sum / part.len().max(1) as f64) as f32
    };
    let (hi, lo) = (mean(&kept[..big]), mean(&kept[big..]));
    let mut entries: Vec<(usize, bool)> = kept
        .iter()
        .enumerate()
        .map(|(rank, (i, _))| (*i, rank < big))
        .collect();
    entries.sort_unstable_by_key(|(i, _)| *i);
    let mut bytes = Vec::with_capacity(12 + k.div_ceil(4) + 2 * k);
    bytes.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&lo.to_le_bytes());
    bytes.extend_from_slice(&hi.to_le_bytes());
    let mut decoded = vec![0.0f32; values.len()];
    let mut codes = vec![0u8; entries.len().div_ceil(4)];
    for (j, &(i, big)) in entries.iter().enumerate() {
        let negative = values[i] < 0.0;
        let code = u8::from(negative) | (u8::from(big) << 1);
        codes[j / 4] |= code << (2 * (j % 4));
        let m = if big { hi } else { lo };
        decoded[i] = if negative { -m } else { m };
    }
    bytes.extend_from_slice(&codes);
    let mut previous: Option<usize> = None;
    for &(i, _) in &entries {
        let gap = match previous {
            None => i,
            Some(p) => i - p - 1,
        };
        write_leb128(&mut bytes, gap as u64);
        previous = Some(i);
    }
    (bytes, decoded)
}

fn decode_topk(bytes: &[u8], n: usize, max_kept: usize) -> Result<Vec<f32>, String> {
    let header = bytes.get(..12).ok_or_else(|| {
        format!(
            "top-k piece of {} bytes is shorter than its header",
            bytes.len()
        )
    })?;
    let word = |i: usize| [header[i], header[i + 1], header[i + 2], header[i + 3]];
    let k = u32::from_le_bytes(word(0)) as usize;
    let lo = f32::from_le_bytes(word(4));
    let hi = f32::from_le_bytes(word(8));
    if k > max_kept {
        return Err(format!(
            "top-k piece keeps {k} values, at most {max_kept} allowed"
        ));
    }
    for m in [lo, hi] {
        if !(m.is_finite() && m >= 0.0) {
            return Err(format!("top-k magnitude {m} is not a finite figure >= 0"));
        }
    }
    let codes = bytes
        .get(12..12 + k.div_ceil(4))
        .ok_or_else(|| format!("top-k piece too short for {k} codes"))?;
    let mut rest = &bytes[12 + k.div_ceil(4)..];
    let mut values = vec![0.0f32; n];
    let mut next = 0usize;
    for j in 0..k {
        let gap = read_leb128(&mut rest).ok_or("top-k positions are cut short or malformed")?;
        let position = usize::try_from(gap)
            .ok()
            .and_then(|g| next.checked_add(g))
            .filter(|p| *p < n)
            .ok_or_else(|| format!("top-k position past the piece's {n} values"))?;
        let code = (codes[j / 4] >> (2 * (j % 4))) & 0b11;
        let m = if code & 0b10 != 0 { hi } else { lo };
        values[position] = if code & 0b01 != 0 { -m } else { m };
        next = position + 1;
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the top-k positions", rest.len()));
    }
    Ok(values)
}

fn write_leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Reads one LEB128 value of at most 32 bits (positions within a piece), advancing `input`.
fn read_leb128(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, byte) in input.iter().enumerate().take(5) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *input = &input[i + 1..];
            return Some(value);
        }
    }
    None
}

/// Error feedback: what compression left out of the deltas sent so far, added to the next.
#[derive(Debug, Clone, Default)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Encodes `delta` plus the residual, and keeps what the encoding lost as the new residual.
    pub fn compress(&mut self, codec: &Codec, delta: &[f32]) -> Encoded {
        if self.residual.len() != delta.len() {
            self.residual = vec![0.0; delta.len()];
        }
        let corrected: Vec<f32> = delta
            .iter()
            .zip(&self.residual)
            .map(|(d, r)| d + r)
            .collect();
        let encoded = codec.encode(&corrected);
        for ((r, c), s) in self
            .residual
            .iter_mut()
            .zip(&corrected)
            .zip(&encoded.values)
        {
            *r = c - s;
        }
        encoded
    }

    /// What was left out so far (zeros before the first delta).
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::l2_norm;

    fn codec(compression: Compression) -> Codec {
        Codec {
            compression,
            topk_fraction: 0.03,
        }
    }

    /// A fixed, varied vector: smooth values with a few large ones.
    fn fixed(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = i as f32;
                (x * 0.37).sin() * 1e-3 + if i % 97 == 0 { 0.02 } else { 0.0 }
            })
            .collect()
    }

    /// Blockwise absmax int8 as written in the paper, value by value.
    fn reference_int8(values: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        for block in values.chunks(INT8_BLOCK) {
            let absmax = block.iter().map(|v| v.abs()).fold(0.0, f32::max);
            for v in block {
                let q = if absmax == 0.0 {
                    0.0
                } else {
                    (v * 127.0 / absmax).round()
                };
                out.push(q * absmax / 127.0);
            }
        }
        out
    }

    #[test]
    fn int8_round_trips_within_half_a_step_and_matches_the_reference() {
        let values = fixed(1000);
        let c = codec(Compression::Int8);
        let (bytes, sent) = c.encode_piece(&values);
        assert_eq!(bytes.len(), 1000 + 4 * 8);
        assert_eq!(c.decode_piece(&bytes, 1000).unwrap(), sent);
        for (got, want) in sent.iter().zip(reference_int8(&values)) {
            assert!(
                (got - want).abs() <= want.abs() * 1e-6,
                "{got} vs reference {want}"
            );
        }
        for (block, sent) in values.chunks(INT8_BLOCK).zip(sent.chunks(INT8_BLOCK)) {
            let absmax = block.iter().map(|v| v.abs()).fold(0.0, f32::max);
            for (x, got) in block.iter().zip(sent) {
                assert!((x - got).abs() <= absmax / 254.0 * 1.0001, "{x} -> {got}");
            }
        }
    }

    #[test]
    fn top_k_keeps_the_largest_values_with_their_signs() {
        let mut values = vec![0.001f32; 200];
        values[3] = -0.5;
        values[150] = 0.4;
        values[199] = 0.3;
        let c = Codec {
            compression: Compression::TopK,
            topk_fraction: 0.015,
        };
        assert_eq!(c.kept(200), 3);
        let (bytes, sent) = c.encode_piece(&values);
        assert_eq!(c.decode_piece(&bytes, 200).unwrap(), sent);
        let kept: Vec<usize> = (0..200).filter(|i| sent[*i] != 0.0).collect();
        assert_eq!(kept, vec![3, 150, 199]);
        assert!(sent[3] < 0.0 && sent[150] > 0.0 && sent[199] > 0.0);
        // Two magnitudes: the larger half's mean (0.45) and the smaller half's (0.3).
        assert!((sent[3] + 0.45).abs() < 1e-6 && (sent[150] - 0.45).abs() < 1e-6);
        assert!((sent[199] - 0.3).abs() < 1e-6, "{}", sent[199]);
        assert!(bytes.len() <= c.max_piece_bytes(200));
    }

    #[test]
    fn error_feedback_makes_the_sum_sent_follow_the_sum_of_true_deltas() {
        for compression in [Compression::Int8, Compression::TopK] {
            let c = codec(compression);
            let mut feedback = ErrorFeedback::default();
            let n = 5000;
            let mut true_sum = vec![0.0f64; n];
            let mut sent_sum = vec![0.0f64; n];
            let mut gaps = Vec::new();
            for round in 0..200 {
                // Deltas that keep a direction, with a changing part.
                let delta: Vec<f32> = fixed(n)
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + 1e-4 * ((i + round) as f32 * 0.11).cos())
                    .collect();
                let encoded = feedback.compress(&c, &delta);
                for i in 0..n {
                    true_sum[i] += f64::from(delta[i]);
                    sent_sum[i] += f64::from(encoded.values[i]);
                }
                let gap: f64 = true_sum
                    .iter()
                    .zip(&sent_sum)
                    .map(|(t, s)| (t - s) * (t - s))
                    .sum::<f64>()
                    .sqrt();
                let norm = true_sum.iter().map(|t| t * t).sum::<f64>().sqrt();
                gaps.push(gap / norm);
                // The gap is exactly the residual still to send.
                assert!((gap - l2_norm(feedback.residual())).abs() <= 1e-3 * gap.max(1e-9) + 1e-6);
            }
            // The relative gap shrinks as the sums grow: nothing is lost for good.
            assert!(
                gaps[199] < gaps[9] / 5.0,
                "{compression}: {:?}",
                (gaps[9], gaps[199])
            );
            assert!(gaps[199] < 0.05, "{compression}: {}", gaps[199]);
        }
        // Without feedback, top-k loses the small values for good.
        let c = codec(Compression::TopK);
        let delta = fixed(5000);
        let once = c.encode(&delta).values;
        let lost = l2_norm(
            &delta
                .iter()
                .zip(&once)
                .map(|(d, s)| d - s)
                .collect::<Vec<_>>(),
        );
        assert!(lost / l2_norm(&delta) > 0.2);
    }

    #[test]
    fn vectors_split_into_pieces_that_encode_alone() {
        let n = VALUES_PER_PIECE + 10;
        let values = fixed(n);
        for compression in [Compression::F32, Compression::Int8, Compression::TopK] {
            let c = codec(compression);
            let encoded = c.encode(&values);
            assert_eq!(encoded.pieces.len(), 2);
            assert_eq!(pieces(n), 2);
            let mut back = Vec::new();
            for (i, piece) in encoded.pieces.iter().enumerate() {
                let range = piece_range(n, i as u32);
                assert!(piece.len() <= c.max_piece_bytes(range.len()));
                back.extend(c.decode_piece(piece, range.len()).unwrap());
            }
            assert_eq!(back, encoded.values);
        }
        let f32_bytes = codec(Compression::F32).encode(&values).bytes();
        let int8_bytes = codec(Compression::Int8).encode(&values).bytes();
        let topk_bytes = codec(Compression::TopK).encode(&values).bytes();
        assert!(
            int8_bytes * 3 < f32_bytes && topk_bytes * 20 < int8_bytes,
            "{f32_bytes} {int8_bytes} {topk_bytes}"
        );
    }

    #[test]
    fn malformed_pieces_are_errors_not_panics() {
        let values = fixed(300);
        for compression in [Compression::F32, Compression::Int8, Compression::TopK] {
            let c = codec(compression);
            let (bytes, _) = c.encode_piece(&values);
            // Wrong length for the values announced, truncated, extended.
            assert!(c.decode_piece(&bytes, 301).is_err() || compression == Compression::TopK);
            assert!(c.decode_piece(&bytes[..bytes.len() - 1], 300).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(c.decode_piece(&longer, 300).is_err());
            assert!(c.decode_piece(&[], 300).is_err());
        }
        // A NaN scale, a NaN magnitude, too many kept values, a position past the end.
        let int8 = codec(Compression::Int8);
        let (mut bytes, _) = int8.encode_piece(&values);
        bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(int8
            .decode_piece(&bytes, 300)
            .unwrap_err()
            .contains("scale"));
        let topk = codec(Compression::TopK);
        let (bytes, _) = topk.encode_piece(&values);
        let mut nan = bytes.clone();
        nan[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(topk
            .decode_piece(&nan, 300)
            .unwrap_err()
            .contains("magnitude"));
        let mut many = bytes.clone();
        many[..4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(topk
            .decode_piece(&many, 300)
            .unwrap_err()
            .contains("at most"));
        let mut far = bytes[..12 + topk.kept(300).div_ceil(4)].to_vec();
        for _ in 0..topk.kept(300) {
            write_leb128(&mut far, 1 << 30);
        }
        assert!(topk.decode_piece(&far, 300).unwrap_err().contains("past"));
        // Huge finite scales that overflow to infinity are refused too.
        let (mut big, _) = int8.encode_piece(&values);
        big[..4].copy_from_slice(&f32::MAX.to_le_bytes());
        big[4 * 3] = 127;
        assert!(int8.decode_piece(&big, 300).unwrap_err().contains("finite"));
    }
}
