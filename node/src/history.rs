//! What the dashboard plots and lists (`GET /history`): this node's training progress over
//! time, the progress peers announce with their checkpoints, and notable events (penalties,
//! bans, new versions).
//!
//! Everything is bounded: at most [`MAX_POINTS`] training points (at most
//! [`MAX_POINTS_PER_PEER`] of any one peer, so a peer that announces a flood cannot push the
//! others out) and [`MAX_EVENTS`] events; the oldest go first. A peer's points come only from
//! announcements whose signature and figures were checked (see
//! [`crate::models::Behaviour::on_gossip`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use p2p_protocol::messages::Announcement;
use serde::Serialize;

use crate::training::TrainingStatus;

/// Most training points kept, over all peers.
pub const MAX_POINTS: usize = 8192;
/// Most training points kept of one peer (this node included).
pub const MAX_POINTS_PER_PEER: usize = 2048;
/// Most events kept.
pub const MAX_EVENTS: usize = 256;

/// One point of a training curve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingPoint {
    /// When it was recorded (this node's clock), Unix milliseconds.
    pub unix_ms: u64,
    /// Whose progress: this node's peer id, or the publisher of a checkpoint.
    pub peer: String,
    /// Whether it is this node's own progress (else a peer's announced checkpoint).
    pub own: bool,
    /// Local step of that node.
    pub step: u64,
    /// Samples its parameters have seen.
    pub samples_seen: u64,
    /// Test loss, when evaluated at this point (nats per sample or per character).
    pub loss: Option<f64>,
    /// Test accuracy (0-1), for a classifier.
    pub accuracy: Option<f64>,
    /// Loss of the last training batch (own points only).
    pub batch_loss: Option<f64>,
}

/// A notable event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeEvent {
    /// When, Unix milliseconds.
    pub unix_ms: u64,
    /// `penalty`, `ban`, `version` (a new version announced or published).
    pub kind: &'static str,
    /// The peer concerned.
    pub peer: Option<String>,
    /// What happened, one line.
    pub text: String,
}

/// `GET /history` body.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HistoryBody {
    /// Training points, oldest first.
    pub points: Vec<TrainingPoint>,
    /// Events, oldest first.
    pub events: Vec<NodeEvent>,
}

/// The bounded record itself (pure data; [`SharedHistory`] shares it).
#[derive(Debug, Default)]
pub struct History {
    points: VecDeque<TrainingPoint>,
    events: VecDeque<NodeEvent>,
}

impl History {
    /// Adds a point, dropping the peer's oldest beyond [`MAX_POINTS_PER_PEER`] and the
    /// oldest of all beyond [`MAX_POINTS`].
    pub fn push_point(&mut self, point: TrainingPoint) {
        let of_peer = self.points.iter().filter(|p| p.peer == point.peer).count();
        if of_peer >= MAX_POINTS_PER_PEER {
            if let Some(i) = self.points.iter().position(|p| p.peer == point.peer) {
                self.points.remove(i);
            }
        }
        self.points.push_back(point);
        while self.points.len() > MAX_POINTS {
            self.points.pop_front();
        }
    }

    /// Adds an event, dropping the oldest beyond [`MAX_EVENTS`].
    pub fn push_event(&mut self, event: NodeEvent) {
        self.events.push_back(event);
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// A copy for the API.
    pub fn body(&self) -> HistoryBody {
        HistoryBody {
            points: self.points.iter().cloned().collect(),
            events: self.events.iter().cloned().collect(),
        }
    }
}

/// The history shared by the event loop (peers' points, events), the training watcher (own
/// points) and the API (readers).
#[derive(Debug, Clone, Default)]
pub struct SharedHistory(Arc<Mutex<History>>);

impl SharedHistory {
    fn lock(&self) -> MutexGuard<'_, History> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an event.
    pub fn event(&self, kind: &'static str, peer: Option<PeerId>, text: String) {
        self.lock().push_event(NodeEvent {
            unix_ms: now_ms(),
            kind,
            peer: peer.map(|p| p.to_string()),
            text,
        });
    }

    /// Records a verified announcement: a `version` event, and a training point for a
    /// checkpoint.
    pub fn announced(&self, a: &Announcement) {
        let mut history = self.lock();
        history.push_event(NodeEvent {
            unix_ms: now_ms(),
            kind: "version",
            peer: Some(a.publisher.to_string()),
            text: format!("{} version {} ({} bytes)", a.model, a.version, a.size),
        });
        if let Some(t) = &a.training {
            history.push_point(TrainingPoint {
                unix_ms: now_ms(),
                peer: a.publisher.to_string(),
                own: false,
                step: t.step,
                samples_seen: t.samples_seen,
                loss: t.loss,
                accuracy: t.accuracy,
                batch_loss: None,
            });
        }
    }

    /// Records this node's progress from a training status, if it moved since `last` (the
    /// step and evaluation recorded before); returns what to pass as `last` next time.
    pub fn own_progress(
        &self,
        peer: &str,
        status: &TrainingStatus,
        last: (u64, Option<u64>),
    ) -> (u64, Option<u64>) {
        let now = (status.step, status.evaluated_at_step);
        if now == last || status.step == 0 && status.evaluated_at_step.is_none() {
            return last;
        }
        let evaluated = status.evaluated_at_step != last.1;
        self.lock().push_point(TrainingPoint {
            unix_ms: now_ms(),
            peer: peer.to_string(),
            own: true,
            step: status.step,
            samples_seen: status.samples_seen,
            loss: status.loss.filter(|_| evaluated),
            accuracy: status.accuracy.filter(|_| evaluated),
            batch_loss: status.batch_loss.map(f64::from),
        });
        now
    }

    /// A copy for the API.
    pub fn body(&self) -> HistoryBody {
        self.lock().body()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(peer: &str, step: u64) -> TrainingPoint {
        TrainingPoint {
            unix_ms: step,
            peer: peer.to_string(),
            own: false,
            step,
            samples_seen: 0,
            loss: Some(1.0),
            accuracy: None,
            batch_loss: None,
        }
    }

    #[test]
    fn one_peer_cannot_push_the_others_out() {
        let mut h = History::default();
        h.push_point(point("honest", 1));
        for step in 0..(MAX_POINTS_PER_PEER as u64 * 3) {
            h.push_point(point("flood", step));
        }
        let body = h.body();
        assert_eq!(body.points.iter().filter(|p| p.peer == "honest").count(), 1);
        assert_eq!(
            body.points.iter().filter(|p| p.peer == "flood").count(),
            MAX_POINTS_PER_PEER
        );
        // The flooder's newest points are the ones kept.
        assert_eq!(
            body.points.last().map(|p| p.step),
            Some(MAX_POINTS_PER_PEER as u64 * 3 - 1)
        );
    }

    #[test]
    fn points_and_events_are_bounded_overall() {
        let mut h = History::default();
        for peer in 0..(MAX_POINTS / MAX_POINTS_PER_PEER + 2) {
            for step in 0..MAX_POINTS_PER_PEER as u64 {
                h.push_point(point(&peer.to_string(), step));
            }
        }
        for i in 0..MAX_EVENTS * 2 {
            h.push_event(NodeEvent {
                unix_ms: i as u64,
                kind: "penalty",
                peer: None,
                text: String::new(),
            });
        }
        let body = h.body();
        assert_eq!(body.points.len(), MAX_POINTS);
        assert_eq!(body.events.len(), MAX_EVENTS);
        assert_eq!(body.events[0].unix_ms, MAX_EVENTS as u64);
    }
}
