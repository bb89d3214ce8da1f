//! The averaging behaviour alone, on two in-memory swarms (`libp2p-swarm-test`): no event
//! loop, no trainer thread, no other protocol. The test plays the trainer by handing out a
//! snapshot when the behaviour asks for one.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use libp2p::swarm::{Swarm, SwarmEvent};
use libp2p::PeerId;
use libp2p_swarm_test::SwarmExt;
use p2p_protocol::manifest::Hash32;
use p2p_protocol::training::{ParamDtype, RunAnnouncement};
use tokio::sync::{mpsc, oneshot};

use super::{AveragerEvent, Behaviour, Event, PeerParams, RoundError, RunMembership, Snapshot};

const PARAMS: usize = 1000;

fn membership(poison: bool) -> RunMembership {
    RunMembership {
        announcement: RunAnnouncement {
            run: Hash32::of(b"run"),
            model: "m".into(),
            spec: String::new(),
            creator: PeerId::random().to_string(),
            created_unix: 0,
        },
        layout: Hash32::of(b"layout"),
        params: PARAMS as u64,
        dtype: ParamDtype::F32,
        poison,
    }
}

fn snapshot(value: f32, samples: u64) -> Arc<Snapshot> {
    Arc::new(Snapshot {
        params: vec![value; PARAMS],
        samples,
        step: samples / 32,
    })
}

/// A swarm whose averaging behaviour has joined the run with parameters all `value`; returns
/// it with the channel its finished sessions and snapshot requests go to.
async fn node(value: f32, poison: bool) -> (Swarm<Behaviour>, mpsc::Receiver<AveragerEvent>) {
    let mut swarm = Swarm::new_ephemeral_tokio(|key| Behaviour::new(key.public().to_peer_id()));
    let (tx, rx) = mpsc::channel(8);
    swarm.behaviour_mut().join(membership(poison), tx);
    swarm
        .behaviour_mut()
        .set_snapshot(snapshot(value, (value * 100.0) as u64));
    (swarm, rx)
}

/// What one round opened by `a` with `b` produced: the round's result, `a`'s events, and what
/// `b`'s subscriber got.
struct Round {
    result: Result<PeerParams, RoundError>,
    a_events: Vec<Event>,
    b_finished: Vec<PeerParams>,
}

async fn round(b_value: f32, b_poison: bool) -> (Round, PeerId) {
    let (mut a, _a_rx) = node(1.0, false).await;
    let (mut b, mut b_rx) = node(b_value, b_poison).await;
    a.listen().with_memory_addr_external().await;
    b.connect(&mut a).await;
    let b_id = *b.local_peer_id();

    let (tx, mut rx) = oneshot::channel();
    a.behaviour_mut().average(tx);
    let mut a_events = Vec::new();
    let mut b_finished = Vec::new();
    let result = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tokio::select! {
                result = &mut rx => return result.unwrap(),
                event = a.next_swarm_event() => {
                    if let SwarmEvent::Behaviour(e) = event {
                        a_events.push(e);
                    }
                }
                _ = b.next_swarm_event() => {}
                Some(event) = b_rx.recv() => match event {
                    // Played by the trainer: a fresh snapshot when a peer wants to average.
                    AveragerEvent::SnapshotWanted => b
                        .behaviour_mut()
                        .set_snapshot(snapshot(b_value, (b_value * 100.0) as u64)),
                    AveragerEvent::Finished(p) => b_finished.push(p),
                },
            }
        }
    })
    .await
    .expect("the round ended in time");
    // Let `b` see the last piece it answered.
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            tokio::select! {
                _ = a.next_swarm_event() => {}
                _ = b.next_swarm_event() => {}
                Some(AveragerEvent::Finished(p)) = b_rx.recv() => b_finished.push(p),
            }
        }
    })
    .await;
    (
        Round {
            result,
            a_events,
            b_finished,
        },
        b_id,
    )
}

#[tokio::test]
async fn a_session_gives_each_side_the_others_parameters() {
    let (round, b_id) = round(3.0, false).await;
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

#[tokio::test]
async fn a_nan_piece_is_refused_and_reported_as_misbehaviour() {
    let (round, b_id) = round(3.0, true).await;
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

#[tokio::test]
async fn a_round_with_no_connected_peer_ends_at_once() {
    let (mut a, _rx) = node(1.0, false).await;
    let (tx, rx) = oneshot::channel();
    a.behaviour_mut().average(tx);
    assert_eq!(rx.await.unwrap().unwrap_err(), RoundError::NoPeers);
}
