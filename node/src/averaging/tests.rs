//! The averaging behaviour alone, on two in-memory swarms (`libp2p-swarm-test`) with tokio's
//! clock paused: no event loop, no trainer thread, no other protocol. Each side's snapshot is
//! set once in its `watch` and nobody plays the trainer: a peer's `Open` is answered by the
//! behaviour alone.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use libp2p::swarm::{Swarm, SwarmEvent};
use libp2p::PeerId;
use libp2p_swarm_test::SwarmExt;
use p2p_protocol::manifest::Hash32;
use p2p_protocol::training::{ParamDtype, RunAnnouncement};

use super::PieceCodec;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    Attack, Behaviour, Event, MixBudget, OuterPayload, PeerParams, RoundError, RunMembership,
    Snapshot,
};
use p2p_models::compress::{Codec, Compression};

const PARAMS: usize = 1000;

fn membership(attack: Option<Attack>) -> RunMembership {
    RunMembership {
        announcement: RunAnnouncement {
            run: Hash32::of(b"run"),
            model: "m".into(),
            spec: String::new(),
            creator: PeerId::random(),
            created_unix: 0,
            initial: p2p_protocol::messages::Announcement {
                model: "m".into(),
                version: 0,
                id: Hash32::of(b"v0"),
                size: 0,
                publisher: PeerId::random(),
                training: None,
                parent: None,
                body: Hash32::of(b"body"),
                signature: Vec::new(),
            },
            signature: Vec::new(),
        },
        layout: Hash32::of(b"layout"),
        params: PARAMS as u64,
        codec: PieceCodec::Params(ParamDtype::F32),
        attack,
    }
}

fn snapshot(value: f32, samples: u64) -> Arc<Snapshot> {
    Arc::new(Snapshot {
        params: vec![value; PARAMS],
        samples,
        step: samples / 32,
        outer: None,
        budget: MixBudget::default(),
    })
}

/// One side: its swarm, the trainer's end of its snapshot `watch`, and the channel where the
/// sessions peers opened with it end up.
struct Node {
    swarm: Swarm<Behaviour>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    served: mpsc::Receiver<PeerParams>,
}

/// A swarm whose averaging behaviour has joined the run, serving parameters all `value`
/// (none yet with `None`).
fn node(value: Option<f32>, poison: bool) -> Node {
    node_attacking(value, poison.then_some(Attack::Nan))
}

/// [`node`], lying in sessions as `attack` says.
fn node_attacking(value: Option<f32>, attack: Option<Attack>) -> Node {
    let mut swarm = Swarm::new_ephemeral_tokio(|key| Behaviour::new(key.public().to_peer_id()));
    let (tx, served) = mpsc::channel(8);
    let (snapshots, rx) = watch::channel(value.map(|v| snapshot(v, (v * 100.0) as u64)));
    swarm.behaviour_mut().join(membership(attack), rx, tx);
    Node {
        swarm,
        snapshots,
        served,
    }
}

/// What one round opened by `a` with `b` produced: the round's result, `a`'s events, and what
/// `b`'s subscriber got.
struct Round {
    result: Result<PeerParams, RoundError>,
    a_events: Vec<Event>,
    b_finished: Vec<PeerParams>,
}

/// `a` (parameters all 1.0) opens a round with `b`, which was just connected.
async fn round(b: Node) -> (Round, PeerId) {
    let a_node = node(Some(1.0), false);
    let (mut a, mut b, mut b_rx) = (a_node.swarm, b.swarm, b.served);
    a.listen().with_memory_addr_external().await;
    b.connect(&mut a).await;
    let b_id = *b.local_peer_id();
    (open_round(&mut a, &mut b, &mut b_rx).await, b_id)
}

/// `a` opens a round with `b` (connected) and both run until it ended.
async fn open_round(
    a: &mut Swarm<Behaviour>,
    b: &mut Swarm<Behaviour>,
    b_rx: &mut mpsc::Receiver<PeerParams>,
) -> Round {
    let (result, a_events) = drive_round(a, b, |_, _| {}).await;
    let mut b_finished = Vec::new();
    // Let `b` see the last piece it answered.
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            tokio::select! {
                _ = a.next_swarm_event() => {}
                _ = b.next_swarm_event() => {}
                Some(p) = b_rx.recv() => b_finished.push(p),
            }
        }
    })
    .await;
    Round {
        result,
        a_events,
        b_finished,
    }
}

/// `a` opens a round; `a` and `other` run until it ended (`serve` handles each of `other`'s
/// events), giving the round's result and `a`'s events.
async fn drive_round<S>(
    a: &mut Swarm<Behaviour>,
    other: &mut Swarm<S>,
    mut serve: impl FnMut(&mut Swarm<S>, SwarmEvent<S::ToSwarm>),
) -> (Result<PeerParams, RoundError>, Vec<Event>)
where
    S: libp2p::swarm::NetworkBehaviour + Send,
    S::ToSwarm: std::fmt::Debug,
{
    let (tx, mut rx) = oneshot::channel();
    a.behaviour_mut().average(tx);
    let mut a_events = Vec::new();
    let result = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tokio::select! {
                result = &mut rx => return result.unwrap(),
                event = a.next_swarm_event() => {
                    if let SwarmEvent::Behaviour(e) = event {
                        a_events.push(e);
                    }
                }
                event = other.next_swarm_event() => serve(other, event),
            }
        }
    })
    .await
    .expect("the round ended in time");
    (result, a_events)
}

#[tokio::test(start_paused = true)]
async fn a_session_gives_each_side_the_others_parameters() {
    let (round, b_id) = round(node(Some(3.0), false)).await;
    let got = round.result.unwrap();
    assert_eq!(got.peer, b_id);
    assert!(got.opened_here);
    assert_eq!(got.params, vec![3.0; PARAMS]);
    assert_eq!(got.samples, 300);
    assert_eq!(
        got.base.params,
        vec![1.0; PARAMS],
        "mixed against our own snapshot"
    );
    assert!(round.a_events.is_empty(), "{:?}", round.a_events);
    let theirs = round
        .b_finished
        .first()
        .expect("the other side finished too");
    assert_eq!(theirs.params, vec![1.0; PARAMS]);
    assert!(!theirs.opened_here);
}

/// The trainer replaced its snapshot after joining and is never asked again: the `Open` is
/// answered with the newest value of the `watch`, samples and step included.
#[tokio::test(start_paused = true)]
async fn an_open_is_answered_from_the_latest_snapshot_without_the_trainer() {
    let b = node(Some(3.0), false);
    b.snapshots.send_replace(Some(snapshot(5.0, 700)));
    let (round, _) = round(b).await;
    let got = round.result.unwrap();
    assert_eq!(got.params, vec![5.0; PARAMS]);
    assert_eq!((got.samples, got.step), (700, 700 / 32));
}

/// A peer that has no parameters yet answers `Busy`: the round fails as "tried, none could",
/// not as "no peers", so the opener retries later.
#[tokio::test(start_paused = true)]
async fn a_peer_without_a_snapshot_yet_is_busy() {
    let (round, _) = round(node(None, false)).await;
    assert!(
        matches!(round.result, Err(RoundError::Failed(_))),
        "{:?}",
        round.result.as_ref().err()
    );
    assert!(round.b_finished.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_nan_piece_is_refused_and_reported_as_misbehaviour() {
    let (round, b_id) = round(node(Some(3.0), true)).await;
    assert!(round.result.is_err(), "NaN parameters were accepted");
    assert!(
        round
            .a_events
            .iter()
            .any(|e| matches!(e, Event::Misbehaved { peer, why } if *peer == b_id && why.contains("bad parameters"))),
        "{:?}",
        round.a_events
    );
}

#[tokio::test(start_paused = true)]
async fn a_round_with_no_connected_peer_ends_at_once() {
    let mut a = node(Some(1.0), false);
    let (tx, rx) = oneshot::channel();
    a.swarm.behaviour_mut().average(tx);
    assert_eq!(rx.await.unwrap().unwrap_err(), RoundError::NoPeers);
}

/// A peer that accepts a session and never answers its pieces is reported once the idle limit
/// (10 s before any piece time was measured) passed, and the round ends instead of hanging for
/// the 30 s request timeout.
#[tokio::test(start_paused = true)]
async fn a_peer_that_stalls_a_session_is_reported_after_the_idle_limit() {
    let started = tokio::time::Instant::now();
    let (round, b_id) = round(node_attacking(Some(3.0), Some(Attack::Stall))).await;
    assert!(round.result.is_err());
    assert!(
        round.a_events.iter().any(
            |e| matches!(e, Event::Misbehaved { peer, why } if *peer == b_id && why.contains("stalled"))
        ),
        "{:?}",
        round.a_events
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(12),
        "{waited:?}"
    );
}

/// A peer that opens a session and never sends a piece holds one of a node's session slots,
/// not all of them: another peer averages with the node meanwhile, and the staller is
/// reported once the idle limit passed.
#[tokio::test(start_paused = true)]
async fn while_one_peer_stalls_a_session_another_averages() {
    let b_node = node(Some(3.0), false);
    let (mut b, mut b_served) = (b_node.swarm, b_node.served);
    let mut staller = node_attacking(Some(1.0), Some(Attack::Stall)).swarm;
    let mut c = node(Some(1.0), false).swarm;
    b.listen().with_memory_addr_external().await;
    staller.connect(&mut b).await;
    c.connect(&mut b).await;
    let staller_id = *staller.local_peer_id();

    // The staller opens a session with `b` and stops there.
    let (tx, mut stalled_round) = oneshot::channel();
    staller.behaviour_mut().average(tx);
    let (honest_tx, honest_round) = oneshot::channel();
    let mut honest_tx = Some(honest_tx);
    let mut asked = false;
    let mut b_events = Vec::new();
    let got = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            tokio::select! {
                r = &mut stalled_round, if !asked => {
                    assert!(r.unwrap().is_err());
                    assert_eq!(b.behaviour().status().sessions, 1, "b holds the stalled session");
                    // Now an honest peer opens a round with `b`.
                    c.behaviour_mut().average(honest_tx.take().unwrap());
                    asked = true;
                }
                _ = b.next_swarm_event() => {}
                _ = staller.next_swarm_event() => {}
                _ = c.next_swarm_event() => {}
                Some(p) = b_served.recv() => return p,
            }
        }
    })
    .await
    .expect("the honest peer averaged with b while the staller held a session");
    drop(honest_round);
    assert_eq!(got.params, vec![1.0; PARAMS]);

    // The staller is reported once its session idled past the limit.
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            tokio::select! {
                event = b.next_swarm_event() => {
                    if let SwarmEvent::Behaviour(e) = event {
                        b_events.push(e);
                        if b_events.iter().any(|e| matches!(e, Event::Misbehaved { peer, .. } if *peer == staller_id)) {
                            return;
                        }
                    }
                }
                _ = staller.next_swarm_event() => {}
                _ = c.next_swarm_event() => {}
            }
        }
    })
    .await
    .expect("the staller was reported");
}

/// A swarm of a run with outer steps (f32 pseudo-gradients) serving `value` as its
/// pseudo-gradient and outer parameters of outer step `round`.
fn outer_node(value: f32, round: u64) -> Node {
    let mut swarm = Swarm::new_ephemeral_tokio(|key| Behaviour::new(key.public().to_peer_id()));
    let (tx, served) = mpsc::channel(8);
    let (snapshots, rx) = watch::channel(Some(outer_snapshot(value, round)));
    let mut m = membership(None);
    m.codec = PieceCodec::PseudoGradients(Codec {
        compression: Compression::F32,
        topk_fraction: 1.0,
    });
    swarm.behaviour_mut().join(m, rx, tx);
    Node {
        swarm,
        snapshots,
        served,
    }
}

fn outer_snapshot(value: f32, round: u64) -> Arc<Snapshot> {
    let codec = PieceCodec::PseudoGradients(Codec {
        compression: Compression::F32,
        topk_fraction: 1.0,
    });
    let params = vec![value; 2 * PARAMS];
    let pieces = (0..codec.pieces(PARAMS as u64))
        .map(|i| codec.encode(i, params.len(), &params[codec.range(params.len(), i)]))
        .collect();
    Arc::new(Snapshot {
        params,
        samples: 320 * round,
        step: 10 * round,
        outer: Some(OuterPayload { round, pieces }),
        budget: MixBudget::default(),
    })
}

/// With outer steps, each side names the outer step of the other's pseudo-gradient it holds:
/// a second session on the same rounds exchanges nothing (`UpToDate`), and once one side
/// moved to a new round only its pseudo-gradient travels, the other's pieces going empty.
#[tokio::test(start_paused = true)]
async fn a_session_moves_only_the_pseudo_gradients_the_other_side_lacks() {
    let (a_node, b_node) = (outer_node(1.0, 1), outer_node(3.0, 1));
    let (mut a, mut b, mut b_rx) = (a_node.swarm, b_node.swarm, b_node.served);
    a.listen().with_memory_addr_external().await;
    b.connect(&mut a).await;
    let (a_id, b_id) = (*a.local_peer_id(), *b.local_peer_id());

    // Round 1, nothing held: both pseudo-gradients travel.
    let first = open_round(&mut a, &mut b, &mut b_rx).await;
    let got = first.result.unwrap();
    assert_eq!((got.round, got.already_held), (1, false));
    assert_eq!(got.params, vec![3.0; 2 * PARAMS]);
    let full = got.bytes.0;
    // f32 pseudo-gradient, int8 outer parameters.
    assert!(full > 5 * PARAMS as u64, "{:?}", got.bytes);
    assert_eq!(got.bytes.1, full);
    assert_eq!(first.b_finished.len(), 1);
    // Each trainer took the other's (the coordinator reports it after its checks).
    a.behaviour_mut().note_held(b_id, 1);
    b.behaviour_mut().note_held(a_id, 1);

    // The same rounds again: each holds the other's, so no session opens, and the round ends
    // as up to date, not as a failure.
    let (again, _) = drive_round(&mut a, &mut b, |_, _| {}).await;
    assert_eq!(again.unwrap_err(), RoundError::UpToDate);
    assert!(b_rx.try_recv().is_err(), "b finished no session");
    // `a` does not ask `b` again for 200 ms.
    let (too_soon, _) = drive_round(&mut a, &mut b, |_, _| {}).await;
    assert_eq!(too_soon.unwrap_err(), RoundError::NoPeers);

    // `b` moves to round 2: its pseudo-gradient travels, `a`'s goes empty; both sides' outer
    // parameters travel (int8, about a fifth of the whole), once 200 ms passed.
    b_node.snapshots.send_replace(Some(outer_snapshot(5.0, 2)));
    tokio::time::advance(Duration::from_millis(250)).await;
    let pulled = open_round(&mut a, &mut b, &mut b_rx).await;
    let got = pulled.result.unwrap();
    assert_eq!((got.round, got.already_held), (2, false));
    assert_eq!(got.params, vec![5.0; 2 * PARAMS]);
    let outer_only = got.bytes.0;
    assert!(outer_only > 0 && outer_only < full / 4, "{:?}", got.bytes);
    assert_eq!(got.bytes.1, full, "a received b's round 2 whole");
    let theirs = pulled.b_finished.first().expect("b finished too");
    assert!(theirs.already_held);
    assert_eq!((theirs.round, theirs.bytes), (1, (full, outer_only)));
    assert_eq!(
        theirs.params[..PARAMS],
        vec![0.0; PARAMS],
        "no pseudo-gradient"
    );
    assert_eq!(
        theirs.params[PARAMS..],
        vec![1.0; PARAMS],
        "a's outer parameters"
    );
}

/// Each side says whether its snapshot would still mix the other's outer parameters; a side
/// told no sends their pieces empty, and its pseudo-gradient still travels. First the
/// accepting side's snapshot has its weight spent, then the opening side's mixed the other's
/// outer parameters already.
#[tokio::test(start_paused = true)]
async fn outer_parameters_travel_only_to_a_side_that_would_mix_them() {
    let (a_node, b_node) = (outer_node(1.0, 1), outer_node(3.0, 1));
    let (mut a, mut b, mut b_rx) = (a_node.swarm, b_node.swarm, b_node.served);
    a.listen().with_memory_addr_external().await;
    b.connect(&mut a).await;
    let (a_id, b_id) = (*a.local_peer_id(), *b.local_peer_id());
    let b_snapshot = b_node.snapshots.borrow().clone().unwrap();
    assert_eq!(b_snapshot.budget.take(1.0), Some(2.0 / 3.0));

    let first = open_round(&mut a, &mut b, &mut b_rx).await;
    let got = first.result.unwrap();
    assert!(!got.outer_skipped && !got.already_held);
    assert_eq!(got.params, vec![3.0; 2 * PARAMS], "a got all of b's");
    let theirs = first.b_finished.first().expect("b finished too");
    assert!(theirs.outer_skipped && !theirs.already_held);
    assert_eq!(
        theirs.params[..PARAMS],
        vec![1.0; PARAMS],
        "a's pseudo-gradient"
    );
    assert_eq!(
        theirs.params[PARAMS..],
        vec![0.0; PARAMS],
        "no outer parameters"
    );
    // f32 pseudo-gradients; int8 outer parameters only from b.
    let (sent, received) = got.bytes;
    assert!(
        sent >= 4 * PARAMS as u64 && sent < received,
        "{:?}",
        got.bytes
    );
    assert!(received - sent >= PARAMS as u64, "{:?}", got.bytes);
    a.behaviour_mut().note_held(b_id, 1);
    b.behaviour_mut().note_held(a_id, 1);

    // b moves to round 2 (a fresh budget); a's snapshot mixed b's outer parameters already.
    let a_snapshot = a_node.snapshots.borrow().clone().unwrap();
    assert!(a_snapshot.budget.first_outer_mix(b_id));
    b_node.snapshots.send_replace(Some(outer_snapshot(5.0, 2)));
    let second = open_round(&mut a, &mut b, &mut b_rx).await;
    let got = second.result.unwrap();
    assert!(got.outer_skipped && !got.already_held);
    assert_eq!(
        got.params[..PARAMS],
        vec![5.0; PARAMS],
        "b's new pseudo-gradient"
    );
    assert_eq!(got.params[PARAMS..], vec![0.0; PARAMS]);
    let theirs = second.b_finished.first().expect("b finished too");
    assert!(theirs.already_held && !theirs.outer_skipped);
    assert_eq!(
        theirs.params[PARAMS..],
        vec![1.0; PARAMS],
        "a's outer parameters"
    );
}

/// `UpToDate` answers an `Open` that named a held pseudo-gradient in a run with outer steps;
/// a peer that answers it to a run averaging parameters lies: it is reported, and the round
/// does not end as if nothing were new.
#[tokio::test(start_paused = true)]
async fn a_false_up_to_date_answer_is_reported() {
    use libp2p::request_response::{self, ProtocolSupport};
    use p2p_protocol::codec::CborCodec;
    use p2p_protocol::training::{
        TrainRequest, TrainResponse, MAX_TRAINING_MESSAGE_BYTES, TRAINING_PROTOCOL,
    };

    let mut a = node(Some(1.0), false).swarm;
    let mut liar = Swarm::new_ephemeral_tokio(|_| {
        request_response::Behaviour::<CborCodec<TrainRequest, TrainResponse>>::with_codec(
            CborCodec::new(MAX_TRAINING_MESSAGE_BYTES, MAX_TRAINING_MESSAGE_BYTES),
            [(
                libp2p::StreamProtocol::new(TRAINING_PROTOCOL),
                ProtocolSupport::Full,
            )],
            request_response::Config::default(),
        )
    });
    a.listen().with_memory_addr_external().await;
    liar.connect(&mut a).await;
    let liar_id = *liar.local_peer_id();

    let (result, a_events) = drive_round(&mut a, &mut liar, |liar, event| {
        if let SwarmEvent::Behaviour(request_response::Event::Message {
            message: request_response::Message::Request { channel, .. },
            ..
        }) = event
        {
            let _ = liar
                .behaviour_mut()
                .send_response(channel, TrainResponse::UpToDate);
        }
    })
    .await;
    assert!(
        matches!(result, Err(RoundError::Failed(_))),
        "{:?}",
        result.as_ref().err()
    );
    assert!(
        a_events.iter().any(
            |e| matches!(e, Event::Misbehaved { peer, why } if *peer == liar_id && why.contains("up to date"))
        ),
        "{a_events:?}"
    );
}
