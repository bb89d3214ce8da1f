//! Training: run announcements ([`RUNS_TOPIC`]) and the gossip-averaging protocol
//! ([`TRAINING_PROTOCOL`]).
//!
//! # Runs
//!
//! A run is identified by the id of its version 0 (the initial weights, an ordinary model
//! version). Its creator announces a [`RunAnnouncement`] (run id, model name, the spec as TOML,
//! creator, signed by the creator) on gossipsub; nodes that missed it ask connected peers with
//! [`TrainRequest::Runs`], and check the signature of each run listed. Checkpoints are further
//! versions of the run's model, signed by the member that published them, whose headers carry
//! [`TrainingMeta`] (step, samples seen, test loss and accuracy).
//!
//! # Averaging
//!
//! Every few local steps a node opens a session with a random peer of the same run:
//!
//! ```text
//! A -> B  Open { run, layout, exchange, params, samples, step, round, held, wants_outer }
//! B -> A  Accepted { session, samples, step, round, pieces, held, wants_outer }
//!         (or Busy / UpToDate / Refused)
//! A -> B  Piece { session, index: i, A's piece i }       for i in 0..pieces, a few in flight
//! B -> A  Piece { index: i, B's piece i }
//! ```
//!
//! Each side snapshots its parameters when the session opens, sends them in pieces of at most
//! [`MAX_PIECE_BYTES`] (a flat vector in the order of the model's tensors sorted by name, as
//! `dtype`), and once it holds all of the other's pieces mixes them in, weighted by samples
//! seen. A piece with a NaN or infinity, a wrong length, or parameters too far from the local
//! ones are refused and the sender penalized; a session that breaks off leaves both models as
//! they were. `layout` is the BLAKE3 hash of the tensor names and shapes, so peers whose models
//! differ never exchange a byte of parameters.
//!
//! What a session exchanges is the run's [`Exchange`]: full parameters as a `dtype`, or, in
//! runs with outer steps (DiLoCo), each side's pseudo-gradient of outer step `round`, encoded
//! (int8, top-k or f32) piece by piece. Outer steps are counted run-wide: a node farther
//! behind a count it saw than the run's pace bound plus [`MAX_ROUND_LAG`] takes it at its next
//! outer step, and a pseudo-gradient older than the receiver's by more than that is not used.
//! Each side names the outer step of the other's pseudo-gradient it holds already (`held`),
//! and a side whose current one the other holds sends its pseudo-gradient's pieces empty: a
//! node that pulls sessions while it waits for a round's pseudo-gradients does not move one
//! twice. Each side also says whether it would mix the other's outer parameters into its
//! snapshot (`wants_outer`: weight is left in its snapshot's budget, and none of that peer's
//! were mixed into it yet); a side told no sends the pieces of its outer parameters empty.
//! A snapshot takes about two peers' outer parameters, so in a node's third and later sessions
//! of a phase they no longer travel.

use libp2p::identity::Keypair;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::codec::GossipError;
use crate::manifest::{Hash32, VersionId};

/// Request-response protocol id of gossip averaging and run discovery.
pub const TRAINING_PROTOCOL: &str = "/p2p-ml/train/5.0.0";

/// The gossipsub topic of run announcements.
pub const RUNS_TOPIC: &str = "p2p-ml/runs/2";

/// Largest piece of parameters in one message.
pub const MAX_PIECE_BYTES: usize = 1 << 20;

/// Largest encoded training request or response: a piece plus framing.
pub const MAX_TRAINING_MESSAGE_BYTES: u64 = MAX_PIECE_BYTES as u64 + 64 * 1024;

/// Highest version number a run's checkpoint may have to be used: a run publishing 2^32
/// checkpoints is impossible, so a higher number is its publisher's lie (one that would use up
/// the numbering of whoever derives from it).
pub const MAX_PLAUSIBLE_CHECKPOINT_VERSION: u64 = 1 << 32;

/// Largest run spec carried in an announcement.
pub const MAX_SPEC_BYTES: usize = 32 * 1024;

/// Most runs listed in one [`TrainResponse::Runs`].
pub const MAX_RUNS_LISTED: usize = 16;

/// Element type of parameters on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamDtype {
    /// 4-byte IEEE floats.
    F32,
    /// 2-byte IEEE half floats.
    F16,
    /// 2-byte brain floats.
    Bf16,
}

impl ParamDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// Parameters per piece.
    pub fn per_piece(self) -> usize {
        MAX_PIECE_BYTES / self.size()
    }

    /// Number of pieces for `params` parameters.
    pub fn pieces(self, params: u64) -> u32 {
        params.div_ceil(self.per_piece() as u64) as u32
    }
}

/// How pseudo-gradients are encoded in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeltaEncoding {
    /// 4-byte floats.
    F32,
    /// Blockwise absmax int8.
    Int8,
    /// The largest values by magnitude, 2 bits each; `per_million` of each piece's values.
    TopK {
        /// Values kept, per million.
        per_million: u32,
    },
}

/// What the two sides of an averaging session exchange; both must use the run's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exchange {
    /// Their parameters, as this element type.
    Params(ParamDtype),
    /// Their pseudo-gradients of one outer step, in this encoding.
    PseudoGradients(DeltaEncoding),
}

/// How many outer steps older than the receiver's a pseudo-gradient may be and still be used,
/// beyond the run's pace bound (`max_lead_steps / inner_steps`).
pub const MAX_ROUND_LAG: u64 = 2;

/// A training run, announced by its creator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunAnnouncement {
    /// The run's id: the id of version 0, its initial weights.
    pub run: VersionId,
    /// The model name under which the run's versions are published.
    pub model: String,
    /// The run spec, TOML.
    pub spec: String,
    /// The creator (on the wire: its multihash bytes; in JSON: base58): the publisher of
    /// version 0, who signs the run.
    pub creator: PeerId,
    /// When the run was created (Unix seconds), to tell the newest run.
    pub created_unix: u64,
    /// Version 0's own signed announcement: it proves that `creator` published the run's
    /// initial weights, so nobody else can sign run `run` as theirs.
    pub initial: crate::messages::Announcement,
    /// The creator's signature of the fields above ([`crate::signing::RUN_DOMAIN`]).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// The signed fields of a run.
#[derive(Serialize)]
struct RunFields<'a> {
    run: &'a VersionId,
    model: &'a str,
    spec: &'a str,
    creator: &'a PeerId,
    created_unix: u64,
}

impl RunAnnouncement {
    /// Encodes for gossipsub.
    pub fn encode(&self) -> Vec<u8> {
        crate::codec::encode_gossip(self)
    }

    /// Decodes and checks a gossip message.
    pub fn decode(bytes: &[u8]) -> Result<Self, GossipError> {
        let a: Self = crate::codec::decode_gossip(bytes, "run announcement")?;
        a.check()?;
        Ok(a)
    }

    /// Hash of the signed fields.
    fn digest(&self) -> Hash32 {
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &RunFields {
                run: &self.run,
                model: &self.model,
                spec: &self.spec,
                creator: &self.creator,
                created_unix: self.created_unix,
            },
            &mut bytes,
        )
        .expect("writing CBOR to a Vec cannot fail");
        Hash32::of(&bytes)
    }

    /// Makes `key` the creator and signs the run.
    pub fn sign(&mut self, key: &Keypair) {
        self.creator = key.public().to_peer_id();
        self.signature = crate::signing::sign(key, crate::signing::RUN_DOMAIN, &self.digest());
    }

    /// Checks the model name, the spec's size, that `initial` is version 0 of the run's model
    /// with the run's id, published by the creator, and the creator's signature.
    pub fn check(&self) -> Result<(), GossipError> {
        let invalid = |reason: String| GossipError::Invalid {
            what: "run announcement",
            reason,
        };
        crate::manifest::validate_model_name(&self.model).map_err(|e| invalid(e.to_string()))?;
        if self.spec.len() > MAX_SPEC_BYTES {
            return Err(invalid(format!(
                "run spec of {} bytes, more than {MAX_SPEC_BYTES}",
                self.spec.len()
            )));
        }
        let v0 = &self.initial;
        v0.verify()?;
        if v0.id != self.run
            || v0.publisher != self.creator
            || v0.model != self.model
            || v0.version != 0
            || v0.training.is_some()
        {
            return Err(invalid(format!(
                "its version 0 is not run {} of model {} published by {}",
                self.run.short(),
                self.model,
                self.creator
            )));
        }
        if !crate::signing::verify(
            &self.creator,
            crate::signing::RUN_DOMAIN,
            &self.digest(),
            &self.signature,
        ) {
            return Err(invalid(format!(
                "not signed by its creator {}",
                self.creator
            )));
        }
        Ok(())
    }
}

/// Training state carried by a checkpoint's announcement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingMeta {
    /// The run.
    pub run: VersionId,
    /// Local steps of the publisher.
    pub step: u64,
    /// Samples the weights have been trained on.
    pub samples_seen: u64,
    /// Test loss, if evaluated.
    pub loss: Option<f64>,
    /// Test accuracy, if evaluated.
    pub accuracy: Option<f64>,
    /// For a character model: the test loss in bits per character (the loss over ln 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_char: Option<f64>,
}

impl TrainingMeta {
    /// Checks that the figures are finite and in range (a loss and bits per character are at
    /// least 0, an accuracy in [0, 1]).
    pub fn check(&self) -> Result<(), String> {
        if self
            .bits_per_char
            .is_some_and(|b| !b.is_finite() || b < 0.0)
        {
            return Err(format!(
                "bits per character {:?} is not a finite figure >= 0",
                self.bits_per_char
            ));
        }
        if self.loss.is_some_and(|l| !l.is_finite() || l < 0.0) {
            return Err(format!(
                "training loss {:?} is not a finite figure >= 0",
                self.loss
            ));
        }
        if self
            .accuracy
            .is_some_and(|a| !a.is_finite() || !(0.0..=1.0).contains(&a))
        {
            return Err(format!(
                "training accuracy {:?} is not in [0, 1]",
                self.accuracy
            ));
        }
        Ok(())
    }
}

/// What one peer asks another about training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrainRequest {
    /// The runs the peer knows of.
    Runs,
    /// Opens an averaging session.
    Open {
        /// The run.
        run: VersionId,
        /// BLAKE3 of the model's tensor names and shapes.
        layout: Hash32,
        /// What is exchanged, and how it is encoded.
        exchange: Exchange,
        /// Number of parameters.
        params: u64,
        /// Samples the opener's parameters have seen (its averaging weight).
        samples: u64,
        /// The opener's local step.
        step: u64,
        /// With pseudo-gradients: the outer step the opener's is of (else 0).
        round: u64,
        /// With pseudo-gradients: the outer step of the peer's pseudo-gradient the opener
        /// holds already (0: none). A peer whose current one is of at most that step sends its
        /// pseudo-gradient's pieces empty (see [`TrainResponse::Accepted`]).
        held: u64,
        /// With pseudo-gradients: whether the opener would mix the peer's outer parameters
        /// (else the peer sends their pieces empty). True in runs averaging parameters, where
        /// nothing is sent empty whatever it says.
        wants_outer: bool,
    },
    /// Piece `index` of the opener's parameters; answered with the same piece of the peer's.
    Piece {
        /// The session, as accepted.
        session: u64,
        /// Which piece.
        index: u32,
        /// The values, little-endian `dtype`.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

/// The answer to a [`TrainRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrainResponse {
    /// Runs known, newest first.
    Runs {
        /// The announcements.
        runs: Vec<RunAnnouncement>,
        /// The run the answering peer trains, if any.
        training: Option<VersionId>,
    },
    /// The session is open.
    Accepted {
        /// Its id, to quote in pieces.
        session: u64,
        /// Samples the peer's parameters have seen.
        samples: u64,
        /// The peer's local step.
        step: u64,
        /// With pseudo-gradients: the outer step the peer's is of (else 0).
        round: u64,
        /// Number of pieces each side sends.
        pieces: u32,
        /// With pseudo-gradients: the outer step of the opener's pseudo-gradient the peer
        /// holds already (0: none). A side whose pseudo-gradient the other holds (its `round`
        /// is at most the other's `held`, and is not 0) sends the pieces of its pseudo-gradient
        /// with empty `data` (its outer parameters as `wants_outer` says), and the other uses
        /// nothing of them: a pulled session does not move a pseudo-gradient twice.
        held: u64,
        /// With pseudo-gradients: whether the peer would mix the opener's outer parameters.
        /// A side told no sends the pieces of its outer parameters with empty `data`, and the
        /// other uses nothing of them.
        wants_outer: bool,
    },
    /// Piece `index` of the peer's parameters.
    Piece {
        /// Which piece.
        index: u32,
        /// The values, little-endian in the session's dtype.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The peer is averaging with someone else or has no parameters yet; try another.
    Busy,
    /// Each side holds the other's current pseudo-gradient already (the opener's `held` is at
    /// least the peer's round, and the peer holds the opener's `round`): nothing to exchange.
    /// Only an answer to an `Open` that named a `held` round in a run with outer steps; any
    /// other is a lie.
    UpToDate,
    /// The request does not fit (another run or model, unknown session, bad piece).
    Refused {
        /// Why, in a few words.
        reason: String,
    },
}

/// The layout hash of tensors given as `(name, shape)` in name order.
pub fn layout_hash<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Hash32 {
    let mut text = String::new();
    for (name, shape) in tensors {
        text.push_str(name);
        text.push(':');
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        text.push_str(&dims.join("x"));
        text.push(';');
    }
    Hash32::of(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CborCodec;
    use futures::executor::block_on;
    use libp2p::request_response::Codec;
    use libp2p::StreamProtocol;

    #[test]
    fn pieces_cover_every_parameter() {
        assert_eq!(ParamDtype::F32.pieces(0), 0);
        assert_eq!(ParamDtype::F32.pieces(1), 1);
        assert_eq!(ParamDtype::F32.pieces(262_144), 1);
        assert_eq!(ParamDtype::F32.pieces(262_145), 2);
        assert_eq!(ParamDtype::F16.pieces(524_288), 1);
    }

    #[test]
    fn a_full_piece_fits_the_message_limit() {
        let mut codec = CborCodec::<TrainRequest, TrainResponse>::new(
            MAX_TRAINING_MESSAGE_BYTES,
            MAX_TRAINING_MESSAGE_BYTES,
        );
        let protocol = StreamProtocol::new(TRAINING_PROTOCOL);
        let piece = TrainRequest::Piece {
            session: u64::MAX,
            index: u32::MAX,
            data: vec![7; MAX_PIECE_BYTES],
        };
        let mut wire = Vec::new();
        block_on(codec.write_request(&protocol, &mut wire, piece.clone())).unwrap();
        let back = block_on(codec.read_request(&protocol, &mut wire.as_slice())).unwrap();
        assert_eq!(back, piece);
    }

    #[test]
    fn run_announcements_round_trip_and_are_checked() {
        let key = Keypair::generate_ed25519();
        let mut a = signed_run(&key, "digits-mlp-3fa2");
        assert_eq!(RunAnnouncement::decode(&a.encode()).unwrap(), a);
        a.spec = "x".repeat(MAX_SPEC_BYTES + 1);
        a.sign(&key);
        assert!(RunAnnouncement::decode(&a.encode()).is_err());
        assert!(RunAnnouncement::decode(&signed_run(&key, "a b").encode()).is_err());
        // The fake newest run: a real run made newer, or credited to another creator.
        let real = signed_run(&key, "digits-mlp-3fa2");
        let newer = RunAnnouncement {
            created_unix: u64::MAX,
            ..real.clone()
        };
        let err = RunAnnouncement::decode(&newer.encode()).unwrap_err();
        assert!(err.to_string().contains("not signed"), "{err}");
        let credited = RunAnnouncement {
            creator: Keypair::generate_ed25519().public().to_peer_id(),
            ..real.clone()
        };
        assert!(RunAnnouncement::decode(&credited.encode()).is_err());
    }

    /// A liar re-signs someone's run as its own (its spec, its name as creator): refused,
    /// because the run's version 0 says who published the initial weights.
    #[test]
    fn a_run_re_signed_by_someone_else_is_refused() {
        let real = signed_run(&Keypair::generate_ed25519(), "digits-mlp-3fa2");
        let liar = Keypair::generate_ed25519();
        let mut stolen = real.clone();
        stolen.spec = "model = \"digits-mlp\"\nlearning_rate = 100.0".into();
        stolen.sign(&liar);
        let err = RunAnnouncement::decode(&stolen.encode()).unwrap_err();
        assert!(err.to_string().contains("version 0"), "{err}");
        // With its own version 0, it is the liar's own run: another id.
        let own = signed_run(&liar, "digits-mlp-3fa2");
        RunAnnouncement::decode(&own.encode()).unwrap();
        assert_ne!(own.run, real.run);
    }

    /// A run of `model` by `key`, with a signed version 0.
    fn signed_run(key: &Keypair, model: &str) -> RunAnnouncement {
        let v0 = crate::manifest::signed_for_tests(key, model, 0);
        let initial = v0.announcement();
        let mut run = RunAnnouncement {
            run: initial.id,
            model: model.into(),
            spec: "model = \"digits-mlp\"".into(),
            creator: PeerId::random(),
            created_unix: 1,
            initial,
            signature: vec![],
        };
        run.sign(key);
        run
    }

    #[test]
    fn layouts_that_differ_hash_differently() {
        let a = layout_hash([("fc1.weight", &[2usize, 3][..])]);
        let b = layout_hash([("fc1.weight", &[3usize, 2][..])]);
        let c = layout_hash([("fc2.weight", &[2usize, 3][..])]);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, layout_hash([("fc1.weight", &[2usize, 3][..])]));
    }
}
