//! Parameters as one flat `f32` vector, in the order of a [`Layout`] (tensors sorted by name),
//! and the math that gossip averaging needs: weighted averages, mixing a peer's parameters
//! into ones that kept training, finite checks, norms and distances, and the `f16`/`bf16`
//! encodings that halve the bytes on the wire.
//!
//! Everything here is plain arithmetic on slices: no tensors, no I/O.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Name and shape of one tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorShape {
    /// Tensor name, e.g. `fc1.weight`.
    pub name: String,
    /// Its dimensions.
    pub shape: Vec<usize>,
}

impl TensorShape {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The tensors of a model, sorted by name: how a flat parameter vector is laid out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// The tensors, sorted by name.
    pub tensors: Vec<TensorShape>,
}

impl Layout {
    /// A layout of `tensors`, sorted by name.
    pub fn new(mut tensors: Vec<TensorShape>) -> Self {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Self { tensors }
    }

    /// Total number of parameters.
    pub fn len(&self) -> usize {
        self.tensors.iter().map(TensorShape::len).sum()
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each tensor with its range in the flat vector.
    pub fn ranges(&self) -> impl Iterator<Item = (&TensorShape, std::ops::Range<usize>)> {
        let mut start = 0;
        self.tensors.iter().map(move |t| {
            let range = start..start + t.len();
            start = range.end;
            (t, range)
        })
    }
}

/// Element type of parameters on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireDtype {
    /// 4 bytes, exact.
    #[default]
    F32,
    /// 2 bytes, 11-bit mantissa, range up to 65504.
    F16,
    /// 2 bytes, 8-bit mantissa, the range of f32.
    Bf16,
}

impl WireDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

impl fmt::Display for WireDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// Encodes `values` (little-endian) as `dtype`.
pub fn encode(values: &[f32], dtype: WireDtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        WireDtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        WireDtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        WireDtype::Bf16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
    }
    out
}

/// Decodes bytes written by [`encode`]; a length that is not a whole number of elements is an
/// error.
pub fn decode(bytes: &[u8], dtype: WireDtype) -> Result<Vec<f32>> {
    let size = dtype.size();
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::Params(format!(
            "{} bytes are not a whole number of {dtype} values",
            bytes.len()
        )));
    }
    Ok(match dtype {
        WireDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        WireDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        WireDtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    })
}

/// Index of the first NaN or infinite value, if any.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    values.iter().position(|v| !v.is_finite())
}

/// Whether every value is finite.
pub fn all_finite(values: &[f32]) -> bool {
    first_non_finite(values).is_none()
}

/// Dot product of two vectors, accumulated in f64 (over the shorter one's length).
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// Euclidean norm, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f64 {
    dot(values, values).sqrt()
}

/// Euclidean distance between two vectors of the same length.
pub fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

/// Distance from `reference` to `other`, relative to the norm of `reference` (at least 1e-12).
pub fn relative_distance(reference: &[f32], other: &[f32]) -> f64 {
    distance(reference, other) / l2_norm(reference).max(1e-12)
}

/// Scales `values` down so that their norm is at most `max_norm`; returns whether it did.
pub fn clip_norm(values: &mut [f32], max_norm: f64) -> bool {
    let norm = l2_norm(values);
    if norm <= max_norm || norm == 0.0 {
        return false;
    }
    let scale = (max_norm / norm) as f32;
    values.iter_mut().for_each(|v| *v *= scale);
    true
}

/// `(wa * a + wb * b) / (wa + wb)`, element by element. Weights must be finite, non-negative
/// and not both zero; the vectors must have the same length.
pub fn weighted_average(a: &[f32], wa: f64, b: &[f32], wb: f64) -> Result<Vec<f32>> {
    check_same_len(a.len(), b.len())?;
    let total = check_weights(wa, wb)?;
    let (fa, fb) = ((wa / total) as f32, (wb / total) as f32);
    Ok(a.iter().zip(b).map(|(x, y)| fa * x + fb * y).collect())
}

/// The weight of the peer's parameters when a node that has seen `local_samples` averages with
/// one that has seen `peer_samples`: `peer / (local + peer)` (one half when both are zero).
pub fn peer_weight(local_samples: u64, peer_samples: u64) -> f64 {
    let total = local_samples as f64 + peer_samples as f64;
    if total == 0.0 {
        0.5
    } else {
        peer_samples as f64 / total
    }
}

/// [`peer_weight`] with the peer's claim bounded: its samples count as at most `max_ratio`
/// times the local side's (so the weight is at most `max_ratio / (1 + max_ratio)`), whatever
/// it claims. A peer cannot take over a model by claiming 10^12 samples.
pub fn bounded_peer_weight(local_samples: u64, peer_samples: u64, max_ratio: f64) -> f64 {
    let cap = max_ratio / (1.0 + max_ratio);
    peer_weight(local_samples, peer_samples).min(cap)
}

/// Mixes a peer's parameters into `local`, which may have moved on from `base` (the snapshot
/// that was averaged): `local += weight * (peer - base)`. With `local == base` this is exactly
/// the weighted average of `base` and `peer`; otherwise the local progress since the snapshot is
/// kept on top of it.
pub fn mix_into(local: &mut [f32], base: &[f32], peer: &[f32], weight: f64) -> Result<()> {
    check_same_len(local.len(), base.len())?;
    check_same_len(local.len(), peer.len())?;
    if !(weight.is_finite() && (0.0..=1.0).contains(&weight)) {
        return Err(Error::Params(format!(
            "mixing weight {weight} is not in [0, 1]"
        )));
    }
    let w = weight as f32;
    for ((l, b), p) in local.iter_mut().zip(base).zip(peer) {
        *l += w * (p - b);
    }
    Ok(())
}

/// Why a peer's parameters were refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Not as many values as the run's model has.
    WrongLength {
        /// Values expected.
        expected: usize,
        /// Values received.
        got: usize,
    },
    /// A NaN or infinity at this index.
    NonFinite(usize),
    /// Pointing away from the local parameters (cosine similarity at most [`MIN_COSINE`]):
    /// models of one run start from the same initial weights and never get there honestly.
    Opposed {
        /// The cosine similarity measured.
        cosine: f64,
    },
    /// A norm more than [`MAX_NORM_RATIO`] times ours, or less than its inverse (scaled
    /// parameters).
    NormRatio {
        /// The peer's norm over ours.
        ratio: f64,
    },
    /// Farther from the local parameters than the run allows.
    TooFar {
        /// Relative distance measured.
        distance: f64,
        /// The run's bound.
        bound: f64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongLength { expected, got } => {
                write!(f, "{got} parameters where the run's model has {expected}")
            }
            Self::NonFinite(i) => write!(f, "a NaN or infinite value at parameter {i}"),
            Self::Opposed { cosine } => {
                write!(f, "parameters pointing away from ours (cosine {cosine:.3})")
            }
            Self::NormRatio { ratio } => {
                write!(f, "parameters {ratio:.3} times as large as ours")
            }
            Self::TooFar { distance, bound } => write!(
                f,
                "parameters at relative distance {distance:.3} from ours, not below the bound {bound:.3}"
            ),
        }
    }
}

/// Peer parameters whose cosine similarity with ours is at most this are refused.
pub const MIN_COSINE: f64 = 0.0;

/// Peer parameters whose norm is more than this many times ours (or less than its inverse)
/// are refused.
pub const MAX_NORM_RATIO: f64 = 2.0;

/// Checks a peer's parameters against the local ones before they are mixed in: same length,
/// all finite, not pointing away from ours ([`MIN_COSINE`]), of a comparable norm
/// ([`MAX_NORM_RATIO`]), and at a relative distance strictly below `max_distance` (the bound
/// itself is refused: exactly 2.0 is what negated parameters measure). The two shape checks
/// need no history, so they hold from a run's first round, when honest peers' distances are
/// still large and no adaptive bound is known. Returns the relative distance.
pub fn check_peer(
    local: &[f32],
    peer: &[f32],
    max_distance: f64,
) -> std::result::Result<f64, Refusal> {
    let m = Comparison::of(local, peer)?;
    if m.local_norm > 0.0 && m.peer_norm > 0.0 {
        let cosine = m.dot / (m.local_norm * m.peer_norm);
        if cosine <= MIN_COSINE {
            return Err(Refusal::Opposed { cosine });
        }
        let ratio = m.peer_norm / m.local_norm;
        if !(1.0 / MAX_NORM_RATIO..=MAX_NORM_RATIO).contains(&ratio) {
            return Err(Refusal::NormRatio { ratio });
        }
    }
    m.within(max_distance)
}

/// Checks a peer's *outer* parameters (with outer steps) against ours: same length, all
/// finite, and at a relative distance strictly below `max_distance`, with none of
/// [`check_peer`]'s shape checks. Their premise, that honest models start from the same
/// weights and never point away or grow twice as large, fails for outer parameters at a high
/// outer learning rate: each node's are moved by the outer optimizer by a different set of
/// pseudo-gradients, several times a phase's movement, so early in a run they measured
/// cosines below 0 and norm ratios of 0.46 between honest nodes (8 by-label digits hosts,
/// outer lr 3, relative distances 0.015-1.8). Negated outer parameters still measure exactly
/// 2.0, refused at the default bound. Returns the relative distance.
pub fn check_outer_params(
    local: &[f32],
    peer: &[f32],
    max_distance: f64,
) -> std::result::Result<f64, Refusal> {
    Comparison::of(local, peer)?.within(max_distance)
}

/// Dot product, norms and distance of two parameter vectors of the same length, the peer's
/// all finite; accumulated in f64.
struct Comparison {
    dot: f64,
    local_norm: f64,
    peer_norm: f64,
    distance: f64,
}

impl Comparison {
    fn of(local: &[f32], peer: &[f32]) -> std::result::Result<Self, Refusal> {
        if local.len() != peer.len() {
            return Err(Refusal::WrongLength {
                expected: local.len(),
                got: peer.len(),
            });
        }
        if let Some(i) = first_non_finite(peer) {
            return Err(Refusal::NonFinite(i));
        }
        let (mut dot, mut local_sq, mut peer_sq, mut diff_sq) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (l, p) in local.iter().zip(peer) {
            let (l, p) = (f64::from(*l), f64::from(*p));
            dot += l * p;
            local_sq += l * l;
            peer_sq += p * p;
            diff_sq += (l - p) * (l - p);
        }
        Ok(Self {
            dot,
            local_norm: local_sq.sqrt(),
            peer_norm: peer_sq.sqrt(),
            distance: diff_sq.sqrt(),
        })
    }

    /// The relative distance, if strictly below `max_distance`.
    fn within(&self, max_distance: f64) -> std::result::Result<f64, Refusal> {
        let d = self.distance / self.local_norm.max(1e-12);
        if d.is_nan() || d >= max_distance {
            return Err(Refusal::TooFar {
                distance: d,
                bound: max_distance,
            });
        }
        Ok(d)
    }
}

fn check_same_len(a: usize, b: usize) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(Error::Params(format!(
            "parameter vectors differ in length ({a} and {b})"
        )))
    }
}

fn check_weights(wa: f64, wb: f64) -> Result<f64> {
    let ok = |w: f64| w.is_finite() && w >= 0.0;
    if !(ok(wa) && ok(wb)) || wa + wb <= 0.0 {
        return Err(Error::Params(format!(
            "averaging weights {wa} and {wb} must be finite, non-negative and not both zero"
        )));
    }
    Ok(wa + wb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn weighted_average_follows_the_weights() {
        let avg = weighted_average(&[0.0, 10.0], 3.0, &[4.0, 2.0], 1.0).unwrap();
        assert_eq!(avg, vec![1.0, 8.0]);
        assert!(weighted_average(&[1.0], 0.0, &[2.0], 0.0).is_err());
        assert!(weighted_average(&[1.0], f64::NAN, &[2.0], 1.0).is_err());
        assert!(weighted_average(&[1.0], 1.0, &[2.0, 3.0], 1.0).is_err());
    }

    #[test]
    fn mixing_an_unchanged_copy_is_the_weighted_average() {
        let base = vec![1.0, 2.0, 3.0];
        let peer = vec![3.0, 2.0, -1.0];
        let mut local = base.clone();
        mix_into(&mut local, &base, &peer, 0.25).unwrap();
        assert_eq!(local, weighted_average(&base, 3.0, &peer, 1.0).unwrap());
    }

    #[test]
    fn mixing_keeps_local_progress_made_since_the_snapshot() {
        let base = vec![0.0, 0.0];
        let peer = vec![2.0, 2.0];
        let mut local = vec![1.0, -1.0]; // trained on after the snapshot was sent
        mix_into(&mut local, &base, &peer, 0.5).unwrap();
        assert_eq!(local, vec![2.0, 0.0]);
        assert!(mix_into(&mut local, &base, &peer, 1.5).is_err());
    }

    #[test]
    fn finite_checks_find_nan_and_infinity() {
        assert!(all_finite(&[0.0, -1.0, f32::MAX]));
        assert_eq!(first_non_finite(&[0.0, f32::NAN]), Some(1));
        assert_eq!(first_non_finite(&[f32::NEG_INFINITY]), Some(0));
    }

    #[test]
    fn norms_distances_and_clipping() {
        assert!((l2_norm(&[3.0, 4.0]) - 5.0).abs() < 1e-12);
        assert!((distance(&[1.0, 1.0], &[4.0, 5.0]) - 5.0).abs() < 1e-12);
        assert!((relative_distance(&[3.0, 4.0], &[3.0, 4.5]) - 0.1).abs() < 1e-9);
        let mut v = vec![3.0, 4.0];
        assert!(clip_norm(&mut v, 1.0));
        assert!((l2_norm(&v) - 1.0).abs() < 1e-6);
        assert!(!clip_norm(&mut v, 2.0));
    }

    #[test]
    fn peer_checks_refuse_what_must_not_be_mixed() {
        let local = vec![1.0, 1.0, 1.0, 1.0];
        assert!(check_peer(&local, &[1.1, 1.0, 0.9, 1.0], 0.5).is_ok());
        assert!(matches!(
            check_peer(&local, &[1.0, 1.0], 0.5),
            Err(Refusal::WrongLength {
                expected: 4,
                got: 2
            })
        ));
        assert!(matches!(
            check_peer(&local, &[1.0, f32::NAN, 1.0, 1.0], 0.5),
            Err(Refusal::NonFinite(1))
        ));
        assert!(matches!(
            check_peer(&local, &[1.0, 1.0, 1.6, 1.0], 0.2),
            Err(Refusal::TooFar { .. })
        ));
        // Negated parameters point away; scaled ones are too large or too small.
        assert!(matches!(
            check_peer(&local, &[-1.0, -1.0, -1.0, -1.0], 2.5),
            Err(Refusal::Opposed { cosine }) if cosine == -1.0
        ));
        assert!(matches!(
            check_peer(&local, &[3.0, 3.0, 3.0, 3.0], 2.5),
            Err(Refusal::NormRatio { ratio }) if ratio == 3.0
        ));
        assert!(matches!(
            check_peer(&local, &[0.4, 0.4, 0.4, 0.4], 2.5),
            Err(Refusal::NormRatio { .. })
        ));
        // The distance bound itself is refused.
        assert!(matches!(
            check_peer(&local, &[1.5, 1.5, 1.5, 1.5], 0.5),
            Err(Refusal::TooFar { distance, .. }) if distance == 0.5
        ));
    }

    #[test]
    fn outer_parameter_checks_judge_by_distance_alone() {
        let local = vec![1.0, 1.0, 1.0, 1.0];
        // What check_peer refuses by shape passes here when it is within the bound: outer
        // parameters that point partly away, or half as large, as honest ones can early on.
        let away = [1.0, -1.0, 1.0, -1.0];
        assert!(matches!(
            check_peer(&local, &away, 2.0),
            Err(Refusal::Opposed { .. })
        ));
        let d = check_outer_params(&local, &away, 2.0).unwrap();
        assert!((d - 2f64.sqrt()).abs() < 1e-6, "{d}");
        let smaller = [0.46, 0.46, 0.46, 0.46];
        assert!(matches!(
            check_peer(&local, &smaller, 2.0),
            Err(Refusal::NormRatio { .. })
        ));
        assert!((check_outer_params(&local, &smaller, 2.0).unwrap() - 0.54).abs() < 1e-6);
        // Negated ones measure exactly 2.0, which the default bound refuses; broken ones are
        // refused as by check_peer.
        assert!(matches!(
            check_outer_params(&local, &[-1.0, -1.0, -1.0, -1.0], 2.0),
            Err(Refusal::TooFar { distance, .. }) if distance == 2.0
        ));
        assert!(matches!(
            check_outer_params(&local, &[1.0, f32::INFINITY, 1.0, 1.0], 2.0),
            Err(Refusal::NonFinite(1))
        ));
        assert!(matches!(
            check_outer_params(&local, &[1.0; 5], 2.0),
            Err(Refusal::WrongLength {
                expected: 4,
                got: 5
            })
        ));
    }

    #[test]
    fn a_claimed_sample_count_cannot_raise_the_weight_past_the_cap() {
        assert_eq!(bounded_peer_weight(100, 100, 2.0), 0.5);
        assert_eq!(bounded_peer_weight(100, 1_000_000_000_000, 2.0), 2.0 / 3.0);
        assert_eq!(bounded_peer_weight(0, 7, 2.0), 2.0 / 3.0);
        assert_eq!(bounded_peer_weight(300, 100, 2.0), 0.25);
    }

    #[test]
    fn peer_weight_is_the_peer_share_of_samples() {
        assert_eq!(peer_weight(0, 0), 0.5);
        assert_eq!(peer_weight(300, 100), 0.25);
        assert_eq!(peer_weight(0, 7), 1.0);
    }

    #[test]
    fn truncated_wire_bytes_are_an_error() {
        assert!(decode(&[0, 0, 0], WireDtype::F32).is_err());
        assert!(decode(&[0], WireDtype::F16).is_err());
    }

    proptest! {
        #[test]
        fn f32_round_trip_is_exact(values in proptest::collection::vec(any::<f32>(), 0..64)) {
            let back = decode(&encode(&values, WireDtype::F32), WireDtype::F32).unwrap();
            prop_assert_eq!(back.len(), values.len());
            for (a, b) in values.iter().zip(&back) {
                prop_assert!(a.to_bits() == b.to_bits());
            }
        }

        /// Half precision keeps 11 significant bits (relative error at most 2^-11) in its
        /// normal range; bf16 keeps 8 (2^-8) over the whole f32 range.
        #[test]
        fn half_precision_round_trips_within_bounds(
            values in proptest::collection::vec(-60000.0f32..60000.0, 0..64),
            tiny in proptest::collection::vec(-1e-4f32..1e-4, 0..16),
        ) {
            for v in values.iter().filter(|v| v.abs() >= 6.2e-5) {
                let h = decode(&encode(&[*v], WireDtype::F16), WireDtype::F16).unwrap()[0];
                prop_assert!(((h - v) / v).abs() <= 1.0 / 2048.0, "f16 {v} -> {h}");
                let b = decode(&encode(&[*v], WireDtype::Bf16), WireDtype::Bf16).unwrap()[0];
                prop_assert!(((b - v) / v).abs() <= 1.0 / 256.0, "bf16 {v} -> {b}");
            }
            // Below f16's normal range the absolute error is at most half its subnormal step.
            for v in &tiny {
                let h = decode(&encode(&[*v], WireDtype::F16), WireDtype::F16).unwrap()[0];
                prop_assert!((h - v).abs() <= 2.0f32.powi(-25), "f16 {v} -> {h}");
            }
        }

        #[test]
        fn average_lies_between_its_inputs(
            pairs in proptest::collection::vec((-1e6f32..1e6, -1e6f32..1e6), 1..32),
            wa in 0.0f64..1e9, wb in 1e-3f64..1e9,
        ) {
            let (a, b): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let avg = weighted_average(&a, wa, &b, wb).unwrap();
            for ((x, y), m) in a.iter().zip(&b).zip(&avg) {
                let (lo, hi) = (x.min(*y), x.max(*y));
                let slack = 1e-3 * (lo.abs().max(hi.abs()) + 1.0);
                prop_assert!(*m >= lo - slack && *m <= hi + slack);
            }
        }
    }
}
