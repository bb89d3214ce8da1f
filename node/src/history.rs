//! What the dashboard plots and lists (`GET /history`): this node's training progress over
//! time, the progress peers announce with their checkpoints, and notable events (penalties,
//! bans, new versions).
//!
//! Everything is bounded, the oldest going first: this node's own points have their own
//! budget ([`MAX_OWN_POINTS`]) that peers cannot touch; peers' points share [`MAX_POINTS`], at
//! most [`MAX_POINTS_PER_PEER`] each; events are kept per kind ([`MAX_EVENTS_PER_KIND`]), so
//! a flood of announcements cannot push penalties and bans out. A peer's point comes only from
//! an announcement whose signature and figures were checked (see
//! [`crate::models::Behaviour::on_gossip`]), once per version id (a replayed announcement adds
//! nothing), and, while this node trains, only for its run.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use std::collections::HashSet;

use libp2p::PeerId;
use p2p_protocol::manifest::VersionId;
use p2p_protocol::messages::Announcement;
use serde::Serialize;

use crate::training::TrainingStatus;

/// Most training points of this node kept.
pub const MAX_OWN_POINTS: usize = 4096;
/// Most training points of peers kept, over all peers.
pub const MAX_POINTS: usize = 8192;
/// Most training points kept of one peer.
pub const MAX_POINTS_PER_PEER: usize = 1024;
/// Most events kept of each kind.
pub const MAX_EVENTS_PER_KIND: usize = 128;
/// Most version ids remembered to ignore replayed announcements.
const MAX_SEEN_VERSIONS: usize = 16_384;

/// One point of a training curve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingPoint {
    /// When it was recorded (this node's clock), Unix milliseconds.
    pub unix_ms: u64,
    /// Whose progress: this node's peer id, or the publisher of a checkpoint.
    pub peer: String,
    /// Whether it is this node's own progress (else a peer's announced checkpoint).
    pub own: bool,
    /// The model trained (a run's model name).
    pub model: String,
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
    own: VecDeque<TrainingPoint>,
    points: VecDeque<TrainingPoint>,
    events: VecDeque<NodeEvent>,
    /// Version ids already recorded, oldest first.
    seen: VecDeque<VersionId>,
    seen_set: HashSet<VersionId>,
    /// The run this node trains, if any: peers' points of other runs are not kept.
    run: Option<VersionId>,
}

impl History {
    /// Adds a point: an own one beyond [`MAX_OWN_POINTS`] drops the oldest own one; a peer's
    /// drops that peer's oldest beyond [`MAX_POINTS_PER_PEER`] and the oldest of all peers'
    /// beyond [`MAX_POINTS`].
    pub fn push_point(&mut self, point: TrainingPoint) {
        if point.own {
            self.own.push_back(point);
            while self.own.len() > MAX_OWN_POINTS {
                self.own.pop_front();
            }
            return;
        }
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

    /// Adds an event, dropping the oldest of its kind beyond [`MAX_EVENTS_PER_KIND`].
    pub fn push_event(&mut self, event: NodeEvent) {
        let kind = event.kind;
        if self.events.iter().filter(|e| e.kind == kind).count() >= MAX_EVENTS_PER_KIND {
            if let Some(i) = self.events.iter().position(|e| e.kind == kind) {
                self.events.remove(i);
            }
        }
        self.events.push_back(event);
    }

    /// Whether `id` is recorded for the first time (then it is remembered).
    fn first_sight(&mut self, id: VersionId) -> bool {
        if !self.seen_set.insert(id) {
            return false;
        }
        self.seen.push_back(id);
        if self.seen.len() > MAX_SEEN_VERSIONS {
            if let Some(old) = self.seen.pop_front() {
                self.seen_set.remove(&old);
            }
        }
        true
    }

    /// Records a verified announcement (once per version id): a `version` event, and a
    /// training point for a checkpoint (of this node's run, while it trains one).
    pub fn announced(&mut self, a: &Announcement, unix_ms: u64) {
        if !self.first_sight(a.id) {
            return;
        }
        self.push_event(NodeEvent {
            unix_ms,
            kind: "version",
            peer: Some(a.publisher.to_string()),
            text: format!("{} version {} ({} bytes)", a.model, a.version, a.size),
        });
        let Some(t) = &a.training else {
            return;
        };
        if self.run.is_some_and(|run| run != t.run) {
            return;
        }
        self.push_point(TrainingPoint {
            unix_ms,
            peer: a.publisher.to_string(),
            own: false,
            model: a.model.clone(),
            step: t.step,
            samples_seen: t.samples_seen,
            loss: t.loss,
            accuracy: t.accuracy,
            batch_loss: None,
        });
    }

    /// A copy for the API: own points, then peers', each oldest first.
    pub fn body(&self) -> HistoryBody {
        let mut events: Vec<NodeEvent> = self.events.iter().cloned().collect();
        events.sort_by_key(|e| e.unix_ms);
        HistoryBody {
            points: self.own.iter().chain(&self.points).cloned().collect(),
            events,
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

    /// Records a verified announcement ([`History::announced`]).
    pub fn announced(&self, a: &Announcement) {
        self.lock().announced(a, now_ms());
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
        let mut history = self.lock();
        if let Ok(run) = status.run_id.parse() {
            history.run = Some(run);
        }
        history.push_point(TrainingPoint {
            unix_ms: now_ms(),
            peer: peer.to_string(),
            own: true,
            model: status.model.clone(),
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
            model: "m".to_string(),
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
    fn points_and_events_are_bounded_overall_and_peers_cannot_touch_own_points() {
        let mut h = History::default();
        h.push_point(TrainingPoint {
            own: true,
            ..point("me", 0)
        });
        for peer in 0..(MAX_POINTS / MAX_POINTS_PER_PEER + 2) {
            for step in 0..MAX_POINTS_PER_PEER as u64 {
                h.push_point(point(&peer.to_string(), step));
            }
        }
        for i in 0..MAX_EVENTS_PER_KIND * 2 {
            h.push_event(NodeEvent {
                unix_ms: i as u64,
                kind: "version",
                peer: None,
                text: String::new(),
            });
        }
        h.push_event(NodeEvent {
            unix_ms: 0,
            kind: "ban",
            peer: None,
            text: String::new(),
        });
        let body = h.body();
        assert_eq!(body.points.len(), MAX_POINTS + 1);
        assert!(body.points[0].own, "the own point survives the flood");
        assert_eq!(body.events.len(), MAX_EVENTS_PER_KIND + 1);
        assert!(
            body.events.iter().any(|e| e.kind == "ban"),
            "a flood of versions does not push a ban out"
        );
    }

    fn checkpoint(publisher: PeerId, run: VersionId, version: u64) -> Announcement {
        Announcement {
            model: "m".to_string(),
            version,
            id: VersionId::of(&version.to_le_bytes()),
            size: 10,
            publisher,
            training: Some(p2p_protocol::training::TrainingMeta {
                run,
                step: version * 10,
                samples_seen: 0,
                loss: Some(1.0),
                accuracy: None,
                bits_per_char: None,
            }),
            parent: None,
            body: VersionId::of(b"body"),
            signature: vec![],
        }
    }

    #[test]
    fn a_replayed_announcement_adds_nothing_and_other_runs_are_left_out_while_training() {
        let key = PeerId::random();
        let (run, other) = (VersionId::of(b"run"), VersionId::of(b"other"));
        let mut h = History::default();
        let a = checkpoint(key, run, 1);
        h.announced(&a, 1);
        h.announced(&a, 2);
        assert_eq!(h.body().points.len(), 1);
        assert_eq!(h.body().events.len(), 1);
        h.run = Some(run);
        h.announced(&checkpoint(key, other, 2), 3);
        h.announced(&checkpoint(key, run, 3), 4);
        let steps: Vec<u64> = h.body().points.iter().map(|p| p.step).collect();
        assert_eq!(
            steps,
            vec![10, 30],
            "the other run's checkpoint is not plotted"
        );
    }
}
