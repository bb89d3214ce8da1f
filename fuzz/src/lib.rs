//! Mutation fuzzing of every decoder of network input, on the stable toolchain with no
//! instrumentation: each [`Target`] starts from valid encodings (its seeds), mutates them
//! (bit flips, interesting bytes and integers, insertions, deletions, duplications,
//! truncations, splices between seeds) and feeds each input to the decoder under
//! `catch_unwind`. Inputs that decode are kept (a bounded corpus) and mutated further, so the
//! search reaches past the first field. A panic is a crash: the input is reported. Decoders
//! must return errors for whatever bytes a peer sends; they must never panic.
//!
//! The approach is that of AFL's havoc stage without coverage feedback; with no
//! instrumentation it runs at millions of inputs a minute on the small decoders.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use p2p_models::checkpoint::{self, CheckpointMeta};
use p2p_models::compress;
use p2p_models::params::{self, Layout, TensorShape, WireDtype};
use p2p_protocol::bitfield::Bitfield;
use p2p_protocol::codec;
use p2p_protocol::manifest::{Hash32, Manifest};
use p2p_protocol::messages::{Announcement, Request, Response};
use p2p_protocol::safetensors::{self as st, TensorEntry};
use p2p_protocol::training::{
    DeltaEncoding, Exchange, ParamDtype, RunAnnouncement, TrainRequest, TrainResponse, TrainingMeta,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Largest input tried.
const MAX_INPUT: usize = 1 << 16;

/// Inputs that decoded, kept to mutate further (per target).
const MAX_CORPUS: usize = 512;

/// One decoder under test.
pub struct Target {
    /// Its name (`scripts/fuzz --target NAME`).
    pub name: &'static str,
    /// Valid encodings to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Decodes one input; returns whether it was accepted. Must not panic.
    pub run: fn(&[u8]) -> bool,
}

/// What one target's run found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The target.
    pub name: &'static str,
    /// Inputs tried.
    pub inputs: u64,
    /// Inputs the decoder accepted.
    pub accepted: u64,
    /// Inputs that made it panic (at most 16 kept).
    pub crashes: Vec<Vec<u8>>,
    /// Crashes in all.
    pub crash_count: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// How long to fuzz one target.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// This many inputs.
    Inputs(u64),
    /// For this long.
    Time(Duration),
}

/// Fuzzes `target` within `budget`, drawing mutations from `seed`.
pub fn fuzz(target: &Target, budget: Budget, seed: u64) -> Report {
    let mut rng = StdRng::seed_from_u64(seed);
    let seeds = (target.seeds)();
    let mut corpus: Vec<Vec<u8>> = seeds.clone();
    let started = Instant::now();
    let mut report = Report {
        name: target.name,
        inputs: 0,
        accepted: 0,
        crashes: Vec::new(),
        crash_count: 0,
        elapsed: Duration::ZERO,
    };
    // Quiet panics while fuzzing: they are counted and reported, not printed.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut inputs = seeds.into_iter();
    loop {
        let done = match budget {
            Budget::Inputs(n) => report.inputs >= n,
            // Checking the clock every input would cost more than small decoders do.
            Budget::Time(t) => report.inputs.is_multiple_of(1024) && started.elapsed() >= t,
        };
        if done {
            break;
        }
        let input = inputs.next().unwrap_or_else(|| mutate(&corpus, &mut rng));
        report.inputs += 1;
        match catch_unwind(AssertUnwindSafe(|| (target.run)(&input))) {
            Ok(true) => {
                report.accepted += 1;
                if corpus.len() < MAX_CORPUS {
                    corpus.push(input);
                } else {
                    let slot = rng.gen_range(0..corpus.len());
                    corpus[slot] = input;
                }
            }
            Ok(false) => {}
            Err(_) => {
                report.crash_count += 1;
                if report.crashes.len() < 16 {
                    report.crashes.push(input);
                }
            }
        }
    }
    std::panic::set_hook(hook);
    report.elapsed = started.elapsed();
    report
}

/// A mutated copy of a corpus entry: one to four havoc steps.
fn mutate(corpus: &[Vec<u8>], rng: &mut StdRng) -> Vec<u8> {
    let mut data = corpus[rng.gen_range(0..corpus.len())].clone();
    for _ in 0..rng.gen_range(1..=4) {
        havoc(&mut data, corpus, rng);
    }
    data.truncate(MAX_INPUT);
    data
}

/// Bytes that often sit on a decoder's edges: CBOR major-type heads, lengths, signs.
const INTERESTING: [u8; 16] = [
    0x00, 0x01, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1f, 0x40, 0x7f, 0x80, 0x9f, 0xbf, 0xf6, 0xfe, 0xff,
];

fn havoc(data: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut StdRng) {
    let len = data.len();
    match rng.gen_range(0..9) {
        0 if len > 0 => {
            let i = rng.gen_range(0..len);
            data[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.gen_range(0..len);
            data[i] = INTERESTING[rng.gen_range(0..INTERESTING.len())];
        }
        2 if len >= 8 => {
            let i = rng.gen_range(0..=len - 8);
            let value: u64 = match rng.gen_range(0..4) {
                0 => u64::MAX,
                1 => u64::from(u32::MAX),
                2 => 1 << rng.gen_range(0..64),
                _ => rng.gen(),
            };
            let width = [1, 2, 4, 8][rng.gen_range(0..4)];
            data[i..i + width].copy_from_slice(&value.to_be_bytes()[8 - width..]);
        }
        3 => {
            let i = rng.gen_range(0..=len);
            let n = rng.gen_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            data.splice(i..i, bytes);
        }
        4 if len > 0 => {
            let a = rng.gen_range(0..len);
            let b = rng.gen_range(a..=len.min(a + 64));
            data.drain(a..b);
        }
        5 if len > 0 => {
            let a = rng.gen_range(0..len);
            let b = rng.gen_range(a..=len.min(a + 64));
            let copy = data[a..b].to_vec();
            let at = rng.gen_range(0..=len);
            data.splice(at..at, copy);
        }
        6 if len > 0 => data.truncate(rng.gen_range(0..len)),
        7 => {
            let other = &corpus[rng.gen_range(0..corpus.len())];
            let cut = rng.gen_range(0..=len);
            let from = rng.gen_range(0..=other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        _ => {
            let n = rng.gen_range(0..64);
            *data = (0..n).map(|_| rng.gen()).collect();
        }
    }
}

// ----- the targets -----

/// Every decoder of network input.
pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "models-request",
            seeds: || requests().iter().map(cbor).collect(),
            run: |b| codec::decode::<Request>(b, "request").is_ok(),
        },
        Target {
            name: "models-response",
            seeds: || responses().iter().map(cbor).collect(),
            run: |b| codec::decode::<Response>(b, "response").is_ok_and(check_response),
        },
        Target {
            name: "train-request",
            seeds: || train_requests().iter().map(cbor).collect(),
            run: |b| codec::decode::<TrainRequest>(b, "request").is_ok(),
        },
        Target {
            name: "train-response",
            seeds: || train_responses().iter().map(cbor).collect(),
            run: |b| {
                codec::decode::<TrainResponse>(b, "response").is_ok_and(|r| match r {
                    TrainResponse::Runs { runs, .. } => runs.iter().all(|r| r.check().is_ok()),
                    _ => true,
                })
            },
        },
        Target {
            name: "announcement",
            seeds: || vec![announcement().encode()],
            run: |b| Announcement::decode(b).is_ok(),
        },
        Target {
            name: "run-announcement",
            seeds: || vec![run_announcement().encode()],
            run: |b| RunAnnouncement::decode(b).is_ok(),
        },
        Target {
            name: "manifest",
            seeds: || vec![manifest().encode()],
            run: |b| {
                let ok = Manifest::decode(b).is_ok_and(|m| {
                    // What the node does with a manifest it accepted.
                    let _ = m.chunk_count();
                    for t in &m.tensors {
                        let _ = m.chunks_of(t);
                    }
                    // Whatever decodes as a signed manifest announces as a verified version.
                    assert!(
                        m.announcement().verify().is_ok(),
                        "accepted manifest, bad announcement"
                    );
                    (0..m.chunk_count().min(64)).all(|i| {
                        let r = m.chunk_range(i);
                        r.start <= r.end && m.chunk_hash(i).is_some()
                    })
                });
                ok
            },
        },
        Target {
            name: "safetensors",
            seeds: || vec![safetensors_file()],
            run: |b| {
                let _ = st::header_len(b, b.len() as u64);
                st::parse_file(b).is_ok()
            },
        },
        Target {
            name: "bitfield",
            seeds: || {
                let mut full = Bitfield::full(77);
                full.clear(3);
                let mut seed = 77u32.to_le_bytes().to_vec();
                seed.extend_from_slice(full.as_bytes());
                vec![seed]
            },
            run: |b| {
                let Some((len, bits)) = b.split_first_chunk::<4>() else {
                    return false;
                };
                let len = u32::from_le_bytes(*len);
                match Bitfield::from_bytes(len, bits.to_vec()) {
                    Some(f) => {
                        let _ = (0..f.len().min(4096)).filter(|i| f.get(*i)).count();
                        let _ = f.get(len.wrapping_add(5));
                        true
                    }
                    None => false,
                }
            },
        },
        Target {
            name: "pseudo-gradient-piece",
            seeds: || {
                let values: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin() * 1e-3).collect();
                compressions()
                    .iter()
                    .map(|c| c.encode_piece(&values).0)
                    .collect()
            },
            run: |b| {
                let mut ok = false;
                for codec in compressions() {
                    // What a session does: the piece must hold its values, all finite.
                    if let Ok(values) = codec.decode_piece(b, 300) {
                        assert_eq!(values.len(), 300, "accepted piece, wrong length");
                        assert!(
                            values.iter().all(|v| v.is_finite()),
                            "accepted a non-finite value"
                        );
                        ok = true;
                    }
                }
                ok
            },
        },
        Target {
            name: "param-piece",
            seeds: || {
                let values: Vec<f32> = (0..300).map(|i| i as f32 * 0.01 - 1.0).collect();
                [WireDtype::F32, WireDtype::F16, WireDtype::Bf16]
                    .iter()
                    .map(|d| params::encode(&values, *d))
                    .collect()
            },
            run: |b| {
                let mut ok = false;
                for dtype in [WireDtype::F32, WireDtype::F16, WireDtype::Bf16] {
                    if let Ok(v) = params::decode(b, dtype) {
                        let _ = params::first_non_finite(&v);
                        let local = vec![1.0f32; v.len()];
                        let _ = params::check_peer(&local, &v, 2.0);
                        let _ = params::check_outer_params(&local, &v, 2.0);
                        ok = true;
                    }
                }
                ok
            },
        },
        Target {
            name: "checkpoint",
            seeds: || {
                let layout = small_layout();
                let values: Vec<f32> = (0..layout.len()).map(|i| i as f32).collect();
                let meta = CheckpointMeta {
                    run: "ab".repeat(32),
                    step: 300,
                    samples_seen: 9600,
                    loss: Some(0.5),
                    accuracy: Some(0.9),
                    bits_per_char: None,
                };
                vec![checkpoint::to_bytes(&layout, &values, &meta).unwrap_or_default()]
            },
            run: |b| checkpoint::from_bytes(b, &small_layout()).is_ok(),
        },
    ]
}

fn cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = ciborium::into_writer(value, &mut out);
    out
}

fn check_response(r: Response) -> bool {
    match r {
        Response::Versions { versions, .. } => versions
            .iter()
            .all(|a| p2p_protocol::manifest::validate_model_name(&a.model).is_ok()),
        Response::Have { bitfield, .. } => bitfield.is_well_formed(),
        _ => true,
    }
}

fn id(n: u8) -> Hash32 {
    Hash32::of(&[n])
}

fn requests() -> Vec<Request> {
    vec![
        Request::Manifest { id: id(1) },
        Request::Have {
            id: id(2),
            known: None,
        },
        Request::Have {
            id: id(2),
            known: Some(5),
        },
        Request::Chunk {
            id: id(3),
            index: 7,
        },
        Request::Versions {
            model: "digits-mlp".into(),
            publisher: None,
        },
        Request::Versions {
            model: "digits-mlp".into(),
            publisher: Some(peer()),
        },
    ]
}

fn responses() -> Vec<Response> {
    vec![
        Response::Manifest {
            bytes: manifest().encode(),
        },
        Response::Have {
            bitfield: Bitfield::full(13),
            publisher: true,
            holds: true,
        },
        Response::Chunk {
            index: 2,
            data: vec![7; 100],
        },
        Response::Versions {
            versions: vec![announcement()],
            addrs: vec![],
        },
        Response::NotFound,
        Response::Busy,
    ]
}

/// The pseudo-gradient encodings sessions decode.
fn compressions() -> Vec<compress::Codec> {
    [
        compress::Compression::F32,
        compress::Compression::Int8,
        compress::Compression::TopK,
    ]
    .into_iter()
    .map(|compression| compress::Codec {
        compression,
        topk_fraction: 0.03,
    })
    .collect()
}

fn train_requests() -> Vec<TrainRequest> {
    vec![
        TrainRequest::Runs,
        TrainRequest::Open {
            run: id(1),
            layout: id(2),
            exchange: Exchange::Params(ParamDtype::F16),
            params: 1000,
            samples: 3200,
            step: 100,
            round: 0,
            held: 0,
            wants_outer: false,
        },
        TrainRequest::Open {
            run: id(1),
            layout: id(2),
            exchange: Exchange::PseudoGradients(DeltaEncoding::TopK {
                per_million: 30_000,
            }),
            params: 1000,
            samples: 3200,
            step: 100,
            round: 7,
            held: 6,
            wants_outer: true,
        },
        TrainRequest::Piece {
            session: 42,
            index: 0,
            data: params::encode(&[0.5; 64], WireDtype::F32),
        },
    ]
}

fn train_responses() -> Vec<TrainResponse> {
    vec![
        TrainResponse::Runs {
            runs: vec![run_announcement()],
            training: Some(id(1)),
        },
        TrainResponse::Accepted {
            session: 1,
            samples: 3200,
            step: 100,
            round: 3,
            pieces: 2,
            held: 2,
            wants_outer: false,
        },
        TrainResponse::Piece {
            index: 1,
            data: params::encode(&[0.25; 64], WireDtype::Bf16),
        },
        TrainResponse::Busy,
        TrainResponse::UpToDate,
        TrainResponse::Refused {
            reason: "no".into(),
        },
    ]
}

fn key() -> libp2p::identity::Keypair {
    // A fixed key, so runs are reproducible from their seed.
    libp2p::identity::Keypair::ed25519_from_bytes([7u8; 32])
        .unwrap_or_else(|_| libp2p::identity::Keypair::generate_ed25519())
}

fn peer() -> PeerId {
    key().public().to_peer_id()
}

/// A signed announcement: the manifest seed's, with training metadata.
fn announcement() -> Announcement {
    let mut m = manifest();
    m.training = Some(TrainingMeta {
        run: id(1),
        step: 300,
        samples_seen: 9600,
        loss: Some(0.3),
        accuracy: Some(0.91),
        bits_per_char: None,
    });
    m.sign(&key());
    m.announcement()
}

fn run_announcement() -> RunAnnouncement {
    let mut v0 = manifest();
    v0.model = "digits-mlp-1a2b3c".into();
    v0.version = 0;
    v0.parent = None;
    v0.sign(&key());
    let initial = v0.announcement();
    let mut run = RunAnnouncement {
        run: initial.id,
        model: "digits-mlp-1a2b3c".into(),
        spec: "model = \"digits-mlp\"\ndataset = \"digits\"\n".into(),
        creator: peer(),
        created_unix: 1_800_000_000,
        initial,
        signature: Vec::new(),
    };
    run.sign(&key());
    run
}

fn safetensors_file() -> Vec<u8> {
    let header = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]},"__metadata__":{"k":"v"}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&[0u8; 22]);
    file
}

fn manifest() -> Manifest {
    let file = safetensors_file();
    let header = st::parse_file(&file).map(|h| h.tensors).unwrap_or_default();
    let chunk_size = p2p_protocol::manifest::MIN_CHUNK_SIZE;
    let hashes: Vec<u8> = file
        .chunks(chunk_size as usize)
        .flat_map(|c| Hash32::of(c).0)
        .collect();
    let mut m = Manifest {
        format: p2p_protocol::manifest::MANIFEST_FORMAT,
        model: "digits-mlp".into(),
        version: 2,
        parent: Some(id(4)),
        total_size: file.len() as u64,
        chunk_size,
        chunk_hashes: hashes,
        tensors: header
            .into_iter()
            .map(|t: TensorEntry| TensorEntry { ..t })
            .collect(),
        publisher: peer(),
        training: None,
        signature: Vec::new(),
    };
    m.sign(&key());
    m
}

fn small_layout() -> Layout {
    Layout::new(vec![
        TensorShape {
            name: "fc.weight".into(),
            shape: vec![3, 4],
        },
        TensorShape {
            name: "fc.bias".into(),
            shape: vec![3],
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The suite's short pass: every target, a few thousand inputs, no crash; and every
    /// target's seeds are accepted (else it fuzzes only the first byte's error path). One test
    /// for both, since the fuzzer silences the process-wide panic hook while it runs.
    #[test]
    fn a_short_pass_of_every_target_finds_no_crash_and_a_crash_is_caught() {
        for target in targets() {
            for seed in (target.seeds)() {
                assert!((target.run)(&seed), "{}: a seed is refused", target.name);
            }
            let report = fuzz(&target, Budget::Inputs(20_000), 1);
            assert_eq!(
                report.crash_count, 0,
                "{}: {:?}",
                target.name, report.crashes
            );
            assert!(report.accepted > 0, "{}", target.name);
        }
        // A decoder that panics is caught, and its input kept.
        let target = Target {
            name: "panics-on-0xff",
            seeds: || vec![vec![1, 2, 3]],
            run: |b| {
                assert!(!b.contains(&0xff), "0xff");
                true
            },
        };
        let report = fuzz(&target, Budget::Inputs(5_000), 3);
        assert!(report.crash_count > 0);
        assert!(report.crashes.iter().all(|c| c.contains(&0xff)));
    }
}
