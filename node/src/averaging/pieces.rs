//! What an averaging session's pieces hold, and how they are checked: pure logic, no I/O.
//!
//! A run exchanges either full parameters in a wire dtype ([`PieceCodec::Params`]) or, with
//! outer steps ([`PieceCodec::PseudoGradients`]), the pseudo-gradient in a compressed encoding
//! (see [`p2p_models::compress`]) followed by the outer parameters in int8 (the gossip that
//! keeps nodes' outer parameters together: `training::outer`). Either way the exchanged vector
//! is cut into pieces that are encoded, sent and checked one at a time: a piece that does not
//! decode to its number of finite values ends the session ([`PieceError`]).

use std::ops::Range;

use p2p_models::compress::{self, Codec, Compression};
use p2p_models::params::{self as pm, WireDtype};
use p2p_models::spec::{Averaging, RunSpec};
use p2p_protocol::training::{DeltaEncoding, Exchange, ParamDtype};

/// The wire dtype of the models crate for a protocol dtype.
pub fn wire_dtype(dtype: ParamDtype) -> WireDtype {
    match dtype {
        ParamDtype::F32 => WireDtype::F32,
        ParamDtype::F16 => WireDtype::F16,
        ParamDtype::Bf16 => WireDtype::Bf16,
    }
}

/// The protocol dtype for a run's wire dtype.
pub fn param_dtype(dtype: WireDtype) -> ParamDtype {
    match dtype {
        WireDtype::F32 => ParamDtype::F32,
        WireDtype::F16 => ParamDtype::F16,
        WireDtype::Bf16 => ParamDtype::Bf16,
    }
}

/// How a run's vectors are cut into pieces and encoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PieceCodec {
    /// Parameters, in this wire dtype.
    Params(ParamDtype),
    /// Pseudo-gradients, in this encoding.
    PseudoGradients(Codec),
}

impl PieceCodec {
    /// The run's codec.
    pub fn of(spec: &RunSpec) -> Self {
        match spec.averaging {
            Averaging::Parameters => Self::Params(param_dtype(spec.wire_dtype)),
            Averaging::Outer => Self::PseudoGradients(spec.codec()),
        }
    }

    /// What `Open` announces.
    pub fn exchange(&self) -> Exchange {
        match self {
            Self::Params(dtype) => Exchange::Params(*dtype),
            Self::PseudoGradients(codec) => Exchange::PseudoGradients(match codec.compression {
                Compression::F32 => DeltaEncoding::F32,
                Compression::Int8 => DeltaEncoding::Int8,
                Compression::TopK => DeltaEncoding::TopK {
                    per_million: (codec.topk_fraction * 1e6).round() as u32,
                },
            }),
        }
    }

    /// Whether pseudo-gradients are exchanged (else parameters).
    pub fn is_outer(&self) -> bool {
        matches!(self, Self::PseudoGradients(_))
    }

    /// Whether piece `index` of an exchanged vector of `len` values is of the pseudo-gradient
    /// (not of the outer parameters that follow it, nor of parameters).
    pub fn is_pseudo_gradient_piece(&self, len: usize, index: u32) -> bool {
        self.is_outer() && index < compress::pieces(len / 2)
    }

    /// Length of the vector exchanged for a model of `params` parameters: the parameters, or
    /// the pseudo-gradient followed by the outer parameters.
    pub fn len(&self, params: usize) -> usize {
        match self {
            Self::Params(_) => params,
            Self::PseudoGradients(_) => params.saturating_mul(2),
        }
    }

    /// Pieces exchanged for a model of `params` parameters.
    pub fn pieces(&self, params: u64) -> u32 {
        match self {
            Self::Params(dtype) => dtype.pieces(params),
            Self::PseudoGradients(_) => compress::pieces(params as usize).saturating_mul(2),
        }
    }

    /// The values piece `index` of an exchanged vector of `len` covers.
    pub fn range(&self, len: usize, index: u32) -> Range<usize> {
        match self {
            Self::Params(dtype) => {
                let per = dtype.per_piece();
                let start = (index as usize).saturating_mul(per).min(len);
                start..start.saturating_add(per).min(len)
            }
            Self::PseudoGradients(_) => {
                let half = len / 2;
                let first = compress::pieces(half);
                if index < first {
                    compress::piece_range(half, index)
                } else {
                    let r = compress::piece_range(half, index - first);
                    half + r.start..half + r.end
                }
            }
        }
    }

    /// How piece `index` of an exchanged vector of `len` values is encoded.
    fn segment(&self, len: usize, index: u32) -> Segment {
        match self {
            Self::Params(dtype) => Segment::Dense(*dtype),
            Self::PseudoGradients(codec) if index < compress::pieces(len / 2) => {
                Segment::Compressed(*codec)
            }
            Self::PseudoGradients(_) => Segment::Compressed(OUTER_PARAMS_CODEC),
        }
    }

    /// Encodes piece `index` of an exchanged vector of `len` values (`values`: the piece's).
    pub fn encode(&self, index: u32, len: usize, values: &[f32]) -> Vec<u8> {
        match self.segment(len, index) {
            Segment::Dense(dtype) => pm::encode(values, wire_dtype(dtype)),
            Segment::Compressed(codec) => codec.encode_piece(values).0,
        }
    }

    /// Decodes piece `index` of an exchanged vector of `len` values, which must hold `n`
    /// values (checked: length, encoding, finiteness).
    pub fn decode(
        &self,
        index: u32,
        len: usize,
        bytes: &[u8],
        n: usize,
    ) -> Result<Vec<f32>, String> {
        let values = match self.segment(len, index) {
            Segment::Dense(dtype) => {
                pm::decode(bytes, wire_dtype(dtype)).map_err(|e| e.to_string())?
            }
            Segment::Compressed(codec) => codec.decode_piece(bytes, n)?,
        };
        if values.len() != n {
            return Err(format!("{} values, expected {n}", values.len()));
        }
        match pm::first_non_finite(&values) {
            Some(i) => Err(format!("a NaN or infinity at value {i}")),
            None => Ok(values),
        }
    }
}

/// How the outer parameters travel with the pseudo-gradient: int8 (1.03 bytes a value).
pub const OUTER_PARAMS_CODEC: Codec = Codec {
    compression: Compression::Int8,
    topk_fraction: 1.0,
};

/// The encoding of one piece.
enum Segment {
    Dense(ParamDtype),
    Compressed(Codec),
}

/// A vector being received, piece by piece.
pub struct Incoming {
    /// The values (zeros where no piece came yet).
    pub values: Vec<f32>,
    /// Which pieces came.
    pub got: Vec<bool>,
    /// How many.
    pub count: u32,
}

impl Incoming {
    /// Nothing received yet of `len` values in `pieces` pieces.
    pub fn new(len: usize, pieces: u32) -> Self {
        Self {
            values: vec![0.0; len],
            got: vec![false; pieces as usize],
            count: 0,
        }
    }

    /// Whether every piece came.
    pub fn complete(&self) -> bool {
        self.count as usize == self.got.len()
    }

    /// Decodes piece `index` in, checking it.
    pub fn store(&mut self, index: u32, data: &[u8], codec: &PieceCodec) -> Result<(), PieceError> {
        self.check_new(index)?;
        let len = self.values.len();
        let range = codec.range(len, index);
        let values = codec
            .decode(index, len, data, range.len())
            .map_err(|reason| PieceError::Bad { index, reason })?;
        self.values[range].copy_from_slice(&values);
        self.mark(index);
        Ok(())
    }

    /// Counts piece `index` as come without values: the sender sent it empty because this
    /// side holds what it would hold already, or said it would not use it. Anything but an
    /// empty piece is refused.
    pub fn skip(&mut self, index: u32, data: &[u8]) -> Result<(), PieceError> {
        self.check_new(index)?;
        if !data.is_empty() {
            return Err(PieceError::Bad {
                index,
                reason: "values where the session said none would come".into(),
            });
        }
        self.mark(index);
        Ok(())
    }

    /// An error unless piece `index` exists and has not come yet.
    fn check_new(&self, index: u32) -> Result<(), PieceError> {
        match self.got.get(index as usize) {
            None => Err(PieceError::NoSuchPiece(index)),
            Some(true) => Err(PieceError::Twice(index)),
            Some(false) => Ok(()),
        }
    }

    fn mark(&mut self, index: u32) {
        if let Some(slot) = self.got.get_mut(index as usize) {
            *slot = true;
            self.count += 1;
        }
    }
}

/// Why a piece is refused (the session ends and the peer is reported).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PieceError {
    /// An index past the session's piece count.
    #[error("piece {0} does not exist")]
    NoSuchPiece(u32),
    /// The same piece again.
    #[error("piece {0} sent twice")]
    Twice(u32),
    /// Bytes that are not the piece's values (length, encoding, a NaN or infinity).
    #[error("piece {index}: {reason}")]
    Bad {
        /// The piece.
        index: u32,
        /// What is wrong.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::averaging::Attack;

    /// Every piece of `values`, a whole exchanged vector.
    fn encode_all(codec: &PieceCodec, values: &[f32]) -> Vec<Vec<u8>> {
        let params = match codec {
            PieceCodec::Params(_) => values.len(),
            PieceCodec::PseudoGradients(_) => values.len() / 2,
        };
        (0..codec.pieces(params as u64))
            .map(|i| codec.encode(i, values.len(), &values[codec.range(values.len(), i)]))
            .collect()
    }

    #[test]
    fn pieces_round_trip_and_bad_ones_are_refused() {
        let params: Vec<f32> = (0..300_000).map(|i| i as f32 * 1e-3).collect();
        let codec = PieceCodec::Params(ParamDtype::F32);
        let pieces = codec.pieces(params.len() as u64);
        assert_eq!(pieces, 2);
        let mut incoming = Incoming::new(params.len(), pieces);
        for (i, piece) in encode_all(&codec, &params).iter().enumerate() {
            incoming.store(i as u32, piece, &codec).unwrap();
        }
        assert!(incoming.complete());
        assert_eq!(incoming.values, params);

        let mut fresh = Incoming::new(params.len(), pieces);
        let first = &params[codec.range(params.len(), 0)];
        let nan = Attack::Nan.piece(first, None, 1.0, params.len(), (&codec, 0));
        let err = fresh.store(0, &nan, &codec).unwrap_err().to_string();
        assert!(err.contains("NaN"), "{err}");
        let short = codec.encode(0, params.len(), &params[..10]);
        let err = fresh.store(0, &short, &codec).unwrap_err().to_string();
        assert!(err.contains("10 values"), "{err}");
        assert_eq!(
            fresh.store(7, &short, &codec),
            Err(PieceError::NoSuchPiece(7))
        );
        let good = codec.encode(1, params.len(), &params[codec.range(params.len(), 1)]);
        fresh.store(1, &good, &codec).unwrap();
        assert_eq!(fresh.store(1, &good, &codec), Err(PieceError::Twice(1)));
    }

    #[test]
    fn half_precision_pieces_halve_the_bytes() {
        let params = vec![0.5f32; 1000];
        let f32_bytes = PieceCodec::Params(ParamDtype::F32)
            .encode(0, 1000, &params)
            .len();
        let f16_bytes = PieceCodec::Params(ParamDtype::F16)
            .encode(0, 1000, &params)
            .len();
        assert_eq!(f32_bytes, 2 * f16_bytes);
    }

    #[test]
    fn compressed_pseudo_gradients_and_outer_parameters_travel_in_fewer_bytes_and_are_checked() {
        let delta: Vec<f32> = (0..600_000)
            .map(|i| ((i as f32) * 0.01).sin() * 1e-3)
            .collect();
        let dense = PieceCodec::Params(ParamDtype::F32);
        let bytes = |c: &PieceCodec| encode_all(c, &delta).iter().map(Vec::len).sum::<usize>();
        let dense_bytes = bytes(&dense);
        // 300,000 parameters: the pseudo-gradient (small values), then the outer parameters.
        let params = 300_000;
        let mut exchanged: Vec<f32> = delta[..params].to_vec();
        exchanged.extend((0..params).map(|i| ((i as f32) * 0.003).cos() * 0.1));
        let topk = PieceCodec::PseudoGradients(Codec {
            compression: Compression::TopK,
            topk_fraction: 0.03,
        });
        assert_eq!(topk.len(params), 2 * params);
        assert_eq!(topk.pieces(params as u64), 4);
        let pieces = encode_all(&topk, &exchanged);
        let (delta_bytes, outer_bytes): (usize, usize) = (
            pieces[..2].iter().map(Vec::len).sum(),
            pieces[2..].iter().map(Vec::len).sum(),
        );
        // Top-k for the pseudo-gradient, int8 for the outer parameters.
        assert!(delta_bytes * 20 < 4 * params, "{delta_bytes}");
        assert!(
            outer_bytes < params * 11 / 10 && outer_bytes > params,
            "{outer_bytes}"
        );
        assert!(delta_bytes + outer_bytes < dense_bytes / 3);
        let mut incoming = Incoming::new(exchanged.len(), topk.pieces(params as u64));
        for (i, piece) in pieces.iter().enumerate() {
            incoming.store(i as u32, piece, &topk).unwrap();
        }
        let outer = &exchanged[params..];
        let error = pm::distance(&incoming.values[params..], outer) / pm::l2_norm(outer);
        assert!(error < 0.01, "{error}");
        // A piece encoded another way does not decode.
        let wrong = dense.encode(0, params, &exchanged[topk.range(exchanged.len(), 2)]);
        let mut fresh = Incoming::new(exchanged.len(), topk.pieces(params as u64));
        assert!(fresh.store(2, &wrong, &topk).is_err());
        let int8 = PieceCodec::PseudoGradients(Codec {
            compression: Compression::Int8,
            topk_fraction: 0.03,
        });
        assert_eq!(
            int8.exchange(),
            Exchange::PseudoGradients(DeltaEncoding::Int8)
        );
    }
}
