//! [`Behaviour`]: the `/p2p-ml/train` protocol as a libp2p `NetworkBehaviour`. It wraps a
//! request-response behaviour, tracks which peers are connected, runs its own timers, and
//! emits [`Event`]s; it sees neither the swarm nor the other protocols.
//!
//! The trainer thread publishes a [`Snapshot`] of its parameters every few steps into a
//! [`watch`] channel ([`Snapshots`]); the behaviour holds the receiving end and answers a
//! peer's `Open` itself, at once, with the latest snapshot (no thread or task is asked), and on
//! request opens a session with a random peer of the run ([`Behaviour::average`]). Pieces are decoded and checked for
//! length and finiteness as they arrive; a peer that sends a NaN is refused at once and
//! reported ([`Event::Misbehaved`]). A finished session yields [`PeerParams`]: the caller's for
//! sessions it opened, the subscriber's channel for sessions peers opened. Mixing them in
//! (after the distance check) is the trainer's job, so nothing here blocks on training and no
//! session holds more than one model's worth of parameters.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;

use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::{PeerId, StreamProtocol};
use p2p_models::params as pm;
use p2p_protocol::codec::CborCodec;
use p2p_protocol::manifest::{Hash32, VersionId};
use p2p_protocol::training::{
    self as wire, Exchange, RunAnnouncement, TrainRequest, TrainResponse, MAX_RUNS_LISTED,
};
use rand::seq::SliceRandom;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::attack::Attack;
use super::budget::MixBudget;
use super::pieces::{Incoming, PieceCodec, PieceError};
use crate::bounded::make_room;
use crate::wire_behaviour::WrapsRequestResponse;

/// Peers tried by one averaging round before it gives up.
const MAX_ATTEMPTS: usize = 3;

/// Pieces of one session in flight at once.
const PIECES_IN_FLIGHT: u32 = 4;

/// Sessions at once, opened here and by peers together; at most one per peer. Several, so
/// that a peer holding one (stalling) cannot stop this node from averaging with others.
pub const MAX_SESSIONS: usize = 4;

/// The longest a session (or an `Open`) may wait for the peer's next message.
const SESSION_IDLE: Duration = Duration::from_secs(30);

/// The shortest such wait, however fast pieces have been.
const MIN_IDLE: Duration = Duration::from_secs(3);

/// The wait before any piece time was measured.
const DEFAULT_IDLE: Duration = Duration::from_secs(10);

/// The wait is this many times the typical time between two pieces of a session.
const IDLE_FACTOR: f64 = 10.0;

/// Weight of the newest piece time in its moving average.
const PIECE_TIME_ALPHA: f64 = 0.2;

/// Requests of a stalling attacker left unanswered at most (fault injection only).
const MAX_HELD_CHANNELS: usize = 64;

/// A peer that said it is not in the run, or that stalled a session, is not asked again for
/// this long.
const AVOID_FOR: Duration = Duration::from_secs(60);

/// A peer that answered `UpToDate` is not asked again for this long: two of the pulls a
/// waiting boundary makes (`training::trainer`), by when it may have moved on.
const UP_TO_DATE_FOR: Duration = Duration::from_millis(200);

/// How often sessions and queries are checked for timeouts.
const TICK: Duration = Duration::from_millis(200);

/// How long one request of the protocol may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Streams of the protocol open at once on one connection.
const MAX_CONCURRENT_STREAMS: usize = 64;

/// How long a query for runs waits for answers.
const RUNS_QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Most run announcements remembered.
const MAX_RUNS_KNOWN: usize = 256;

/// Most runs remembered of one creator.
const MAX_RUNS_PER_CREATOR: usize = 4;

/// Most peers remembered as refused or avoided in a run (identities are cheap: beyond it, an
/// arbitrary one is forgotten; a peer forgotten and still lying is refused again at once).
const MAX_TRACKED_PEERS: usize = 4096;

/// Inserts `peer` into `set`, forgetting an arbitrary other one at [`MAX_TRACKED_PEERS`].
fn insert_bounded(set: &mut HashSet<PeerId>, peer: PeerId) {
    if set.len() >= MAX_TRACKED_PEERS && !set.contains(&peer) {
        if let Some(any) = set.iter().next().copied() {
            set.remove(&any);
        }
    }
    set.insert(peer);
}

/// Marks `peer` avoided since now, forgetting the longest-avoided at [`MAX_TRACKED_PEERS`].
fn avoid(avoided: &mut HashMap<PeerId, Instant>, peer: PeerId) {
    make_room(avoided, &peer, MAX_TRACKED_PEERS, |since| *since);
    avoided.insert(peer, Instant::now());
}

/// The trainer's parameters at one moment (or, with outer steps, its pseudo-gradient of one
/// outer step), as served to peers.
pub struct Snapshot {
    /// The flat parameter vector; with outer steps, the pseudo-gradient as peers decode it.
    pub params: Vec<f32>,
    /// Samples they have seen (the averaging weight).
    pub samples: u64,
    /// The local step they were taken at.
    pub step: u64,
    /// With outer steps: the outer step and the encoded pieces (sent as they are, so that
    /// every peer gets exactly what error feedback accounted for).
    pub outer: Option<OuterPayload>,
    /// The weight peers' parameters mixed against it may still get, and whose outer
    /// parameters it would still take (what sessions tell peers: `wants_outer`).
    pub budget: MixBudget,
}

/// A pseudo-gradient ready to send.
pub struct OuterPayload {
    /// The outer step it is of (1 for the first).
    pub round: u64,
    /// Its pieces, encoded.
    pub pieces: Vec<Vec<u8>>,
}

impl Snapshot {
    /// The outer step of its pseudo-gradient (0 for parameters).
    pub fn round(&self) -> u64 {
        self.outer.as_ref().map_or(0, |o| o.round)
    }
}

/// The trainer's latest snapshot, as the behaviour reads it: `None` until the first one.
/// The trainer holds the sender and replaces the value every few steps.
pub type Snapshots = watch::Receiver<Option<Arc<Snapshot>>>;

/// What the behaviour reports to the swarm's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer sent parameters that failed a check (NaN, Inf, a wrong length): it is refused
    /// for the rest of the run here; the node decides on penalties.
    Misbehaved {
        /// The peer.
        peer: PeerId,
        /// What it did.
        why: String,
    },
}

/// A peer's parameters from a finished session, with the snapshot they are to be mixed with.
pub struct PeerParams {
    /// The peer.
    pub peer: PeerId,
    /// Its parameters (finite, the run's length).
    pub params: Vec<f32>,
    /// Samples they have seen.
    pub samples: u64,
    /// Its local step.
    pub step: u64,
    /// With outer steps: the outer step its pseudo-gradient is of.
    pub round: u64,
    /// Our snapshot it was exchanged with.
    pub base: Arc<Snapshot>,
    /// Whether this node opened the session.
    pub opened_here: bool,
    /// Bytes of parameters sent and received.
    pub bytes: (u64, u64),
    /// Seconds the session took.
    pub seconds: f64,
    /// This node held the peer's pseudo-gradient of `round` already, so the peer sent its
    /// outer parameters only: the first half of `params` (the pseudo-gradient) is zeros.
    pub already_held: bool,
    /// This node said it would not mix the peer's outer parameters, so the peer did not send
    /// them: the second half of `params` is zeros.
    pub outer_skipped: bool,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("params", &self.params.len())
            .field("samples", &self.samples)
            .field("step", &self.step)
            .field("round", &self.round())
            .finish()
    }
}

impl std::fmt::Debug for PeerParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerParams")
            .field("peer", &self.peer)
            .field("params", &self.params.len())
            .field("samples", &self.samples)
            .field("step", &self.step)
            .field("round", &self.round)
            .field("opened_here", &self.opened_here)
            .finish()
    }
}

/// The run this node trains, as the averager needs it.
#[derive(Debug, Clone)]
pub struct RunMembership {
    /// The run.
    pub announcement: RunAnnouncement,
    /// Hash of the model's tensor names and shapes.
    pub layout: Hash32,
    /// Number of parameters.
    pub params: u64,
    /// What sessions exchange, and how it is encoded.
    pub codec: PieceCodec,
    /// Fault injection for tests and testnets: lie in sessions this way.
    pub attack: Option<Attack>,
}

/// What the averager reports in `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AveragerStatus {
    /// Peers known to train the same run.
    pub run_peers: usize,
    /// Peers refused for sending bad parameters.
    pub refused_peers: Vec<PeerId>,
    /// Sessions running (opened here and by peers).
    pub sessions: usize,
    /// How long a session may wait for the peer's next piece now, in seconds (derived from
    /// measured piece times).
    pub idle_limit_secs: f64,
}

struct Joined {
    membership: RunMembership,
    snapshots: Snapshots,
    members: HashSet<PeerId>,
    /// Peers not to ask for a while (not in the run, or stalled a session), since when.
    avoided: HashMap<PeerId, Instant>,
    refused: HashSet<PeerId>,
    /// With outer steps: the outer step of each peer's latest pseudo-gradient the trainer took
    /// (named as `held` in sessions, so that it is not sent again); empty in other runs.
    held: HashMap<PeerId, u64>,
    /// Peers that answered `UpToDate`, and when: not asked again for [`UP_TO_DATE_FOR`]
    /// (older entries are dropped at each round).
    up_to_date: HashMap<PeerId, Instant>,
}

impl Joined {
    /// The outer step of `peer`'s pseudo-gradient held (0: none).
    fn held_from(&self, peer: &PeerId) -> u64 {
        self.held.get(peer).copied().unwrap_or(0)
    }

    /// Remembers that `peer`'s pseudo-gradient of `round` was taken, forgetting the peer with
    /// the oldest at [`MAX_TRACKED_PEERS`].
    fn note_held(&mut self, peer: PeerId, round: u64) {
        if round == 0 {
            return;
        }
        make_room(&mut self.held, &peer, MAX_TRACKED_PEERS, |round| *round);
        let latest = self.held.entry(peer).or_insert(0);
        *latest = (*latest).max(round);
    }
}

/// Which sides of a session send which half of their vector empty. A pseudo-gradient goes
/// empty when the other side holds it already: its outer step (not 0) is at most the one the
/// other named as held. Outer parameters go empty when the other side said it would not mix
/// them (`wants_outer`: its snapshot's weight is spent, or it mixed this peer's already).
/// In a session that opens, every outer parameter that would be mixed travels: mixing them
/// against each new snapshot is the gossip that keeps nodes' θ together (without it, 8
/// by-label digits hosts on the testnet ended 2-3 points lower). Two peers holding each
/// other's current pseudo-gradients answer `UpToDate` and exchange no outer parameters either
/// (as before `wants_outer` existed; the final averaging rounds, which republish the last
/// outer step, then move nothing between such peers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Skips {
    /// What of ours goes empty.
    ours: Empty,
    /// What of the peer's comes empty.
    theirs: Empty,
}

/// Which halves of one side's vector travel as empty pieces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Empty {
    /// The pseudo-gradient: the other side holds it.
    pseudo_gradient: bool,
    /// The outer parameters: the other side would not mix them.
    outer: bool,
}

impl Empty {
    /// Whether piece `index` of a vector of `len` values goes empty (outer parameters only in
    /// runs with outer steps, whatever a peer said).
    fn covers(&self, codec: &PieceCodec, len: usize, index: u32) -> bool {
        match codec.is_pseudo_gradient_piece(len, index) {
            true => self.pseudo_gradient,
            false => self.outer && codec.is_outer(),
        }
    }
}

impl Skips {
    /// For a session where our pseudo-gradient is of `ours` and the peer holds ours up to
    /// `peer_holds`, and theirs is of `theirs` and we hold theirs up to `we_hold`; `wants`:
    /// whether the peer would mix our outer parameters, and whether we would mix theirs
    /// (honest nodes say true outside runs with outer steps, and [`Empty::covers`] skips no
    /// outer parameters there whatever a peer says).
    fn of(ours: u64, peer_holds: u64, theirs: u64, we_hold: u64, wants: (bool, bool)) -> Self {
        Self {
            ours: Empty {
                pseudo_gradient: ours > 0 && ours <= peer_holds,
                outer: !wants.0,
            },
            theirs: Empty {
                pseudo_gradient: theirs > 0 && theirs <= we_hold,
                outer: !wants.1,
            },
        }
    }
}

/// One exchange of parameters with a peer, in either direction: our snapshot goes out piece
/// by piece, the peer's comes in and is checked as it arrives.
struct Session {
    peer: PeerId,
    /// The id the accepting side gave it.
    id: u64,
    /// What we send (and mix against).
    snapshot: Arc<Snapshot>,
    incoming: Incoming,
    peer_samples: u64,
    peer_step: u64,
    peer_round: u64,
    started: Instant,
    last_activity: Instant,
    /// Bytes of parameters sent and received.
    bytes: (u64, u64),
    /// The L2 norm of our snapshot, once an attack needed it.
    own_norm: Option<f64>,
    /// Which sides send their pieces empty.
    skips: Skips,
}

impl Session {
    fn new(
        peer: PeerId,
        id: u64,
        snapshot: Arc<Snapshot>,
        (pieces, skips): (u32, Skips),
        (peer_samples, peer_step, peer_round): (u64, u64, u64),
    ) -> Self {
        let now = Instant::now();
        Self {
            peer,
            id,
            incoming: Incoming::new(snapshot.params.len(), pieces),
            snapshot,
            peer_samples,
            peer_step,
            peer_round,
            started: now,
            last_activity: now,
            bytes: (0, 0),
            own_norm: None,
            skips,
        }
    }

    /// Stores the peer's piece `index` after checking it; `Ok` gives the time since the
    /// session's previous message.
    fn receive(
        &mut self,
        index: u32,
        data: &[u8],
        codec: &PieceCodec,
    ) -> Result<Duration, PieceError> {
        let now = Instant::now();
        let gap = now.duration_since(self.last_activity);
        self.last_activity = now;
        self.bytes.1 += data.len() as u64;
        if self
            .skips
            .theirs
            .covers(codec, self.incoming.values.len(), index)
        {
            return self.incoming.skip(index, data).map(|()| gap);
        }
        self.incoming.store(index, data, codec).map(|()| gap)
    }

    /// Our piece `index`, encoded for the wire (or what `attack` sends instead).
    fn piece(&mut self, index: u32, codec: &PieceCodec, attack: Option<Attack>) -> Vec<u8> {
        let params = &self.snapshot.params;
        if self.skips.ours.covers(codec, params.len(), index) {
            return Vec::new();
        }
        let range = codec.range(params.len(), index);
        // With outer steps the second half of what is exchanged is the outer parameters.
        let outer_half = self.snapshot.outer.is_some() && range.start >= params.len() / 2;
        let lie =
            attack.filter(|a| *a != Attack::Stall && !(outer_half && a.honest_outer_parameters()));
        let data = match (lie, &self.snapshot.outer) {
            (Some(attack), _) => {
                let norm = *self.own_norm.get_or_insert_with(|| pm::l2_norm(params));
                let partner = (!self.skips.theirs.pseudo_gradient
                    && self
                        .incoming
                        .got
                        .get(index as usize)
                        .is_some_and(|got| *got))
                .then(|| &self.incoming.values[range.clone()]);
                attack.piece(&params[range], partner, norm, params.len(), (codec, index))
            }
            (None, Some(outer)) => outer
                .pieces
                .get(index as usize)
                .cloned()
                .unwrap_or_default(),
            (None, None) => codec.encode(index, params.len(), &params[range]),
        };
        self.bytes.0 += data.len() as u64;
        data
    }

    /// The peer's parameters, once every piece is in.
    fn finish(self, opened_here: bool) -> PeerParams {
        PeerParams {
            peer: self.peer,
            params: self.incoming.values,
            samples: self.peer_samples,
            step: self.peer_step,
            round: self.peer_round,
            base: self.snapshot,
            opened_here,
            bytes: self.bytes,
            seconds: self.started.elapsed().as_secs_f64(),
            already_held: self.skips.theirs.pseudo_gradient,
            outer_skipped: self.skips.theirs.outer,
        }
    }
}

/// The session this node opened: pieces are sent as answers come back.
struct Opened {
    session: Session,
    /// Our next piece to send.
    next: u32,
    tried: Vec<PeerId>,
    reply: oneshot::Sender<Result<PeerParams, RoundError>>,
}

enum Purpose {
    Open,
    Piece,
    Runs(u64),
}

struct RunsQuery {
    outstanding: usize,
    deadline: Instant,
    /// Peers that answered they train each run.
    trainers: HashMap<VersionId, HashSet<PeerId>>,
    reply: oneshot::Sender<KnownRuns>,
}

/// The runs a node knows, and how many of the peers just asked train each.
#[derive(Debug, Clone, Default)]
pub struct KnownRuns {
    /// Known runs, newest first.
    pub runs: Vec<RunAnnouncement>,
    /// Connected peers that said they train each run (one answer per peer): the run's
    /// members as far as this node can tell.
    pub trainers: HashMap<VersionId, HashSet<PeerId>>,
}

/// Why an averaging round this node opened ended without a partner's parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoundError {
    /// No connected peer trains the run (or all are refused, or answered `UpToDate` within
    /// [`UP_TO_DATE_FOR`]): asking again at once is pointless.
    #[error("no peer of the run is connected")]
    NoPeers,
    /// There were peers, but none averaged this time (busy, gone mid-way, a protocol error).
    #[error("{0}")]
    Failed(String),
    /// The peer asked and this node held each other's current pseudo-gradients already.
    #[error("the peer and this node hold each other's pseudo-gradients already")]
    UpToDate,
}

impl From<&str> for RoundError {
    fn from(why: &str) -> Self {
        Self::Failed(why.to_string())
    }
}

impl From<String> for RoundError {
    fn from(why: String) -> Self {
        Self::Failed(why)
    }
}

/// Where a round's result goes once it ends.
type RoundReply = oneshot::Sender<Result<PeerParams, RoundError>>;

/// A session being opened.
struct Opening {
    /// The peer asked.
    peer: PeerId,
    /// When it was asked.
    since: Instant,
    /// The snapshot announced in the `Open` (its samples and step), to be sent once accepted.
    snapshot: Arc<Snapshot>,
    /// The outer step of the peer's pseudo-gradient named as held in the `Open`.
    held: u64,
    /// Whether the `Open` said we would mix the peer's outer parameters.
    wants_outer: bool,
    /// Peers already tried in this round.
    tried: Vec<PeerId>,
    reply: RoundReply,
}

/// Gossip averaging and run discovery of one node.
pub struct Behaviour {
    inner: request_response::Behaviour<CborCodec<TrainRequest, TrainResponse>>,
    /// Peers with at least one direct connection (relayed ones do not carry this protocol).
    connected: HashSet<PeerId>,
    events: VecDeque<Event>,
    tick: tokio::time::Interval,
    local_peer: PeerId,
    runs: HashMap<VersionId, RunAnnouncement>,
    joined: Option<Joined>,
    /// An averaging round in progress: the session once accepted, or `None` while opening.
    outbound: Option<Opened>,
    opening: Option<Opening>,
    inbound: HashMap<u64, Session>,
    next_session: u64,
    requests: HashMap<OutboundRequestId, Purpose>,
    runs_queries: HashMap<u64, RunsQuery>,
    next_query: u64,
    /// Where sessions peers opened deliver their parameters.
    served: Option<mpsc::Sender<PeerParams>>,
    /// Moving average of the time between two pieces of a session, in seconds.
    piece_secs: Option<f64>,
    /// Requests a stalling attacker holds unanswered (fault injection only).
    held: VecDeque<ResponseChannel<TrainResponse>>,
}

impl Behaviour {
    /// The protocol for the node `local_peer`. Must be created inside a tokio runtime (it runs
    /// a timer).
    pub fn new(local_peer: PeerId) -> Self {
        let inner = request_response::Behaviour::with_codec(
            CborCodec::new(
                wire::MAX_TRAINING_MESSAGE_BYTES,
                wire::MAX_TRAINING_MESSAGE_BYTES,
            ),
            [(
                StreamProtocol::new(wire::TRAINING_PROTOCOL),
                request_response::ProtocolSupport::Full,
            )],
            request_response::Config::default()
                .with_request_timeout(REQUEST_TIMEOUT)
                .with_max_concurrent_streams(MAX_CONCURRENT_STREAMS),
        );
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            inner,
            connected: HashSet::new(),
            events: VecDeque::new(),
            tick,
            local_peer,
            runs: HashMap::new(),
            joined: None,
            outbound: None,
            opening: None,
            inbound: HashMap::new(),
            next_session: rand::random(),
            requests: HashMap::new(),
            runs_queries: HashMap::new(),
            next_query: 0,
            served: None,
            piece_secs: None,
            held: VecDeque::new(),
        }
    }

    /// Starts training `membership`'s run: peers' sessions for it are accepted from now on,
    /// each on the latest value of `snapshots`; `served` gets the parameters of every session
    /// a peer opened once it is complete (dropped if the channel is full).
    pub fn join(
        &mut self,
        membership: RunMembership,
        snapshots: Snapshots,
        served: mpsc::Sender<PeerParams>,
    ) {
        let creator = membership.announcement.creator;
        self.remember_run(membership.announcement.clone());
        let mut members = HashSet::new();
        members.extend(Some(creator).filter(|c| *c != self.local_peer));
        self.joined = Some(Joined {
            membership,
            snapshots,
            members,
            avoided: HashMap::new(),
            refused: HashSet::new(),
            held: HashMap::new(),
            up_to_date: HashMap::new(),
        });
        self.served = Some(served);
    }

    /// Leaves the run joined (training stopped): its sessions are dropped, and peers that ask
    /// hear that this node trains no run.
    pub fn leave(&mut self) {
        if let Some(j) = self.joined.take() {
            tracing::info!(run = %j.membership.announcement.run.short(), "left the run's averaging");
        }
        self.served = None;
        self.inbound.clear();
        self.outbound = None;
        self.opening = None;
    }

    /// Excludes `peer` from averaging in this run (its parameters failed a check).
    pub fn refuse(&mut self, peer: PeerId) {
        if let Some(j) = self.joined.as_mut() {
            insert_bounded(&mut j.refused, peer);
            j.members.remove(&peer);
        }
    }

    /// Records that `peer` trains `run` (it published a checkpoint of it).
    pub fn note_member(&mut self, run: &VersionId, peer: PeerId) {
        if let Some(j) = self.joined.as_mut() {
            if j.membership.announcement.run == *run
                && peer != self.local_peer
                && !j.refused.contains(&peer)
            {
                j.members.insert(peer);
            }
        }
    }

    /// Sessions running or being opened, either way.
    fn sessions(&self) -> usize {
        self.inbound.len()
            + usize::from(self.outbound.is_some())
            + usize::from(self.opening.is_some())
    }

    /// Whether a session with `peer` is running or being opened, either way.
    fn in_session_with(&self, peer: &PeerId) -> bool {
        self.inbound.values().any(|s| s.peer == *peer)
            || self
                .outbound
                .as_ref()
                .is_some_and(|o| o.session.peer == *peer)
            || self.opening.as_ref().is_some_and(|o| o.peer == *peer)
    }

    /// Whether a new session with `peer` must wait: [`MAX_SESSIONS`] run already, or one with
    /// this peer does. Sessions at once all exchange the same snapshot; the trainer bounds the
    /// weight they add up to. A peer that finds this node busy tries another.
    fn busy_for(&self, peer: &PeerId) -> bool {
        self.sessions() >= MAX_SESSIONS || self.in_session_with(peer)
    }

    /// How long a session may wait for the peer's next message: [`IDLE_FACTOR`] times the
    /// typical time between pieces, within [`MIN_IDLE`]..[`SESSION_IDLE`].
    fn idle_limit(&self) -> Duration {
        match self.piece_secs {
            None => DEFAULT_IDLE,
            Some(secs) => Duration::from_secs_f64(secs * IDLE_FACTOR).clamp(MIN_IDLE, SESSION_IDLE),
        }
    }

    fn note_piece_time(&mut self, gap: Duration) {
        let secs = gap.as_secs_f64();
        self.piece_secs = Some(match self.piece_secs {
            Some(avg) => (1.0 - PIECE_TIME_ALPHA) * avg + PIECE_TIME_ALPHA * secs,
            None => secs,
        });
    }

    fn attack(&self) -> Option<Attack> {
        self.joined.as_ref().and_then(|j| j.membership.attack)
    }

    /// Whether the run joined exchanges pseudo-gradients (outer steps).
    fn is_outer(&self) -> bool {
        self.joined
            .as_ref()
            .is_some_and(|j| j.membership.codec.is_outer())
    }

    /// `peer` let a session (or an `Open`) wait past its idle limit: it is not asked again for
    /// a while, and reported when it had sent nothing at all (a staller; a peer that sent
    /// pieces and then went quiet may be slow or gone, and is not punished for it).
    fn stalled(&mut self, peer: PeerId, sent_nothing: bool) {
        if sent_nothing {
            self.events.push_back(Event::Misbehaved {
                peer,
                why: "stalled an averaging session".into(),
            });
        }
        if let Some(j) = self.joined.as_mut() {
            j.members.remove(&peer);
            avoid(&mut j.avoided, peer);
        }
    }

    /// Connected peers known to train the run this node trains (none while it trains none).
    pub fn run_members(&self) -> Vec<PeerId> {
        self.joined
            .as_ref()
            .map(|j| j.members.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Status for `/status`.
    pub fn status(&self) -> AveragerStatus {
        let sessions = self.sessions();
        let idle_limit_secs = self.idle_limit().as_secs_f64();
        match &self.joined {
            Some(j) => AveragerStatus {
                run_peers: j.members.len(),
                refused_peers: j.refused.iter().copied().collect(),
                sessions,
                idle_limit_secs,
            },
            None => AveragerStatus {
                sessions,
                idle_limit_secs,
                ..AveragerStatus::default()
            },
        }
    }

    // ----- run discovery -----

    /// Remembers a run this node announces; returns the bytes to publish on the runs topic
    /// ([`wire::RUNS_TOPIC`]).
    pub fn announce_run(&mut self, announcement: RunAnnouncement) -> Vec<u8> {
        let bytes = announcement.encode();
        self.remember_run(announcement);
        bytes
    }

    /// A run announcement from gossip, signed by `source`.
    pub fn on_gossip(&mut self, source: Option<PeerId>, data: &[u8]) {
        match RunAnnouncement::decode(data) {
            // Signed by its creator (checked by `decode`), whoever relayed it.
            Ok(a) => {
                tracing::info!(run = %a.run.short(), model = %a.model, creator = %a.creator, "training run announced");
                self.remember_run(a);
            }
            Err(e) => tracing::debug!(?source, error = %e, "ignoring a malformed run announcement"),
        }
    }

    /// Asks every connected peer for the runs it knows and which it trains; `reply` gets them
    /// merged with ours, newest first, with the count of peers training each.
    pub fn query_runs(&mut self, reply: oneshot::Sender<KnownRuns>) {
        let qid = self.next_query;
        self.next_query += 1;
        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
        for peer in &peers {
            let rid = self.inner.send_request(peer, TrainRequest::Runs);
            self.requests.insert(rid, Purpose::Runs(qid));
        }
        self.runs_queries.insert(
            qid,
            RunsQuery {
                outstanding: peers.len(),
                deadline: Instant::now() + RUNS_QUERY_TIMEOUT,
                trainers: HashMap::new(),
                reply,
            },
        );
        self.finish_runs_query(qid, false);
    }

    fn known_runs(&self) -> Vec<RunAnnouncement> {
        let mut runs: Vec<RunAnnouncement> = self.runs.values().cloned().collect();
        runs.sort_by_key(|r| std::cmp::Reverse((r.created_unix, r.run)));
        runs.truncate(MAX_RUNS_LISTED);
        runs
    }

    /// Keeps a verified run: at most [`MAX_RUNS_PER_CREATOR`] of one creator (its oldest goes)
    /// and [`MAX_RUNS_KNOWN`] in all (beyond it, a random one not joined goes, so a flood of
    /// runs cannot keep a new real one out for good).
    fn remember_run(&mut self, a: RunAnnouncement) {
        if !self.runs.contains_key(&a.run) {
            let joined = self.joined.as_ref().map(|j| j.membership.announcement.run);
            let of_creator: Vec<(u64, VersionId)> = self
                .runs
                .values()
                .filter(|r| r.creator == a.creator && Some(r.run) != joined)
                .map(|r| (r.created_unix, r.run))
                .collect();
            let evict = if of_creator.len() >= MAX_RUNS_PER_CREATOR {
                of_creator.into_iter().min().map(|(_, run)| run)
            } else if self.runs.len() >= MAX_RUNS_KNOWN {
                let others: Vec<VersionId> = self
                    .runs
                    .keys()
                    .filter(|r| Some(**r) != joined)
                    .copied()
                    .collect();
                others.choose(&mut rand::thread_rng()).copied()
            } else {
                None
            };
            if let Some(run) = evict {
                self.runs.remove(&run);
            }
            if self.runs.len() >= MAX_RUNS_KNOWN {
                return;
            }
        }
        self.runs.insert(a.run, a);
    }

    fn finish_runs_query(&mut self, qid: u64, force: bool) {
        let done = self
            .runs_queries
            .get(&qid)
            .is_some_and(|q| force || q.outstanding == 0);
        if done {
            if let Some(q) = self.runs_queries.remove(&qid) {
                let _ = q.reply.send(KnownRuns {
                    runs: self.known_runs(),
                    trainers: q.trainers,
                });
            }
        }
    }

    fn answered_runs_query(&mut self, qid: u64) {
        if let Some(q) = self.runs_queries.get_mut(&qid) {
            q.outstanding = q.outstanding.saturating_sub(1);
        }
        self.finish_runs_query(qid, false);
    }

    // ----- averaging rounds opened here -----

    /// Opens an averaging round with a random peer of the run (trying others if it is busy or
    /// gone); `reply` gets the peer's parameters or why none could be had.
    pub fn average(&mut self, reply: oneshot::Sender<Result<PeerParams, RoundError>>) {
        if self.outbound.is_some() || self.opening.is_some() {
            let _ = reply.send(Err("a round opened here is running".into()));
            return;
        }
        if self.sessions() >= MAX_SESSIONS {
            let _ = reply.send(Err("as many sessions as allowed are running".into()));
            return;
        }
        self.try_next_peer(Vec::new(), reply);
    }

    fn try_next_peer(
        &mut self,
        tried: Vec<PeerId>,
        reply: oneshot::Sender<Result<PeerParams, RoundError>>,
    ) {
        let busy: HashSet<PeerId> = self.inbound.values().map(|s| s.peer).collect();
        let Some(j) = self.joined.as_mut() else {
            let _ = reply.send(Err("not training any run".into()));
            return;
        };
        let Some(snapshot) = j.snapshots.borrow().clone() else {
            let _ = reply.send(Err("no parameters to average yet".into()));
            return;
        };
        if tried.len() >= MAX_ATTEMPTS {
            let _ = reply.send(Err(format!(
                "{} peers tried, none could average",
                tried.len()
            )
            .into()));
            return;
        }
        let now = Instant::now();
        j.avoided
            .retain(|_, since| now.duration_since(*since) < AVOID_FOR);
        j.up_to_date
            .retain(|_, since| now.duration_since(*since) < UP_TO_DATE_FOR);
        let connected: Vec<PeerId> = self
            .connected
            .iter()
            .copied()
            .filter(|p| !tried.contains(p) && !j.refused.contains(p) && !busy.contains(p))
            .filter(|p| !j.up_to_date.contains_key(p))
            .collect();
        let mut candidates: Vec<PeerId> = connected
            .iter()
            .filter(|p| j.members.contains(p))
            .copied()
            .collect();
        if candidates.is_empty() {
            // No known member connected: ask peers whose membership is unknown.
            candidates = connected
                .iter()
                .filter(|p| !j.avoided.contains_key(p))
                .copied()
                .collect();
        }
        candidates.sort();
        let Some(peer) = candidates.choose(&mut rand::thread_rng()).copied() else {
            let _ = reply.send(Err(if tried.is_empty() {
                RoundError::NoPeers
            } else {
                RoundError::Failed(format!("{} peers tried, none could average", tried.len()))
            }));
            return;
        };
        let m = &j.membership;
        // 0 outside runs with outer steps: nothing is recorded as held there.
        let held = j.held_from(&peer);
        let wants_outer = !m.codec.is_outer() || snapshot.budget.wants_outer(&peer);
        let request = TrainRequest::Open {
            run: m.announcement.run,
            layout: m.layout,
            exchange: m.codec.exchange(),
            params: m.params,
            samples: m
                .attack
                .map_or(snapshot.samples, |a| a.claimed_samples(snapshot.samples)),
            step: snapshot.step,
            round: snapshot.round(),
            held,
            wants_outer,
        };
        let rid = self.inner.send_request(&peer, request);
        self.requests.insert(rid, Purpose::Open);
        self.opening = Some(Opening {
            peer,
            since: Instant::now(),
            snapshot,
            held,
            wants_outer,
            tried,
            reply,
        });
        tracing::debug!(%peer, "averaging round: opening a session");
    }

    /// `peer` answered that it and this node hold each other's current pseudo-gradients.
    /// Plausible only with outer steps, when our `Open` named one of its as held and ours is
    /// of an outer step: otherwise the peer lied (reported, and another is tried). When
    /// plausible the round ends with [`RoundError::UpToDate`], and the peer is not asked
    /// again for [`UP_TO_DATE_FOR`] (so the next pull goes elsewhere). A plausible answer
    /// cannot be checked: an identity that says so falsely costs one of our rounds per
    /// [`UP_TO_DATE_FOR`], for as long as it keeps doing so. Trying others
    /// at once instead made rounds fill faster, but in the runs with churn and attackers on
    /// the testnet hosts ended lower (`testnet/RESULTS.md`).
    fn up_to_date(&mut self, peer: PeerId) {
        let Some(o) = self.opening.as_ref().filter(|o| o.peer == peer) else {
            return;
        };
        if !self.is_outer() || o.held == 0 || o.snapshot.round() == 0 {
            self.events.push_back(Event::Misbehaved {
                peer,
                why: "answered up to date where it cannot be".into(),
            });
            self.retry(peer, "a false up-to-date answer");
            return;
        }
        if let Some(o) = self.opening.take() {
            if let Some(j) = self.joined.as_mut() {
                j.up_to_date.insert(peer, Instant::now());
            }
            let _ = o.reply.send(Err(RoundError::UpToDate));
        }
    }

    /// The opened session failed with `peer`: try another peer, or report.
    fn retry(&mut self, peer: PeerId, why: &str) {
        let (mut tried, reply) = match (self.opening.take(), self.outbound.take()) {
            (Some(o), _) if o.peer == peer => (o.tried, o.reply),
            (opening, Some(o)) if o.session.peer == peer => {
                self.opening = opening;
                (o.tried, o.reply)
            }
            (opening, outbound) => {
                self.opening = opening;
                self.outbound = outbound;
                return;
            }
        };
        tracing::debug!(%peer, why, "averaging with this peer failed; trying another");
        tried.push(peer);
        self.try_next_peer(tried, reply);
    }

    /// The peer accepted our `Open`: at `peer_at` (samples, step, outer step), in `pieces`
    /// pieces, holding our pseudo-gradient up to outer step `peer_holds`, and saying whether
    /// it would mix our outer parameters (`peer_wants_outer`).
    fn on_accepted(
        &mut self,
        peer: PeerId,
        session: u64,
        peer_at: (u64, u64, u64),
        pieces: u32,
        (peer_holds, peer_wants_outer): (u64, bool),
    ) {
        let Some(opening) = self.opening.take() else {
            return;
        };
        let Some(j) = self.joined.as_mut() else {
            let _ = opening.reply.send(Err("left the run".into()));
            return;
        };
        let expected = j.membership.codec.pieces(j.membership.params);
        if opening.peer != peer || pieces != expected {
            self.opening = Some(opening);
            self.retry(peer, "peer answered with another piece count");
            return;
        }
        let Opening {
            snapshot,
            held,
            wants_outer,
            tried,
            reply,
            ..
        } = opening;
        let wants = (peer_wants_outer, wants_outer);
        let skips = Skips::of(snapshot.round(), peer_holds, peer_at.2, held, wants);
        j.members.insert(peer);
        if j.membership.attack == Some(Attack::Stall) {
            // The peer waits for pieces that never come.
            let _ = reply.send(Err("stalling (fault injection)".into()));
            return;
        }
        self.outbound = Some(Opened {
            session: Session::new(peer, session, snapshot, (pieces, skips), peer_at),
            next: 0,
            tried,
            reply,
        });
        self.send_pieces();
    }

    /// Sends our next pieces, keeping [`PIECES_IN_FLIGHT`] outstanding.
    fn send_pieces(&mut self) {
        let Some(j) = self.joined.as_ref() else {
            return;
        };
        let (codec, attack) = (j.membership.codec, j.membership.attack);
        let Some(o) = self.outbound.as_mut() else {
            return;
        };
        let in_flight = o.next - o.session.incoming.count;
        for _ in in_flight..PIECES_IN_FLIGHT {
            if o.next as usize >= o.session.incoming.got.len() {
                break;
            }
            let request = TrainRequest::Piece {
                session: o.session.id,
                index: o.next,
                data: o.session.piece(o.next, &codec, attack),
            };
            let rid = self.inner.send_request(&o.session.peer, request);
            self.requests.insert(rid, Purpose::Piece);
            o.next += 1;
        }
    }

    fn on_piece_back(&mut self, peer: PeerId, index: u32, data: &[u8]) {
        let Some(codec) = self.joined.as_ref().map(|j| j.membership.codec) else {
            return;
        };
        let Some(o) = self.outbound.as_mut().filter(|o| o.session.peer == peer) else {
            return;
        };
        let received = o.session.receive(index, data, &codec);
        let complete = o.session.incoming.complete();
        match received {
            // Empty pieces (held pseudo-gradients, unwanted outer parameters) come back at
            // once: timing them would shrink the idle limit below what a real piece takes.
            Ok(_) if data.is_empty() => {}
            Ok(gap) => self.note_piece_time(gap),
            Err(why) => {
                self.events.push_back(Event::Misbehaved {
                    peer,
                    why: format!("sent bad parameters: {why}"),
                });
                self.refuse(peer);
                self.retry(peer, "bad parameters");
                return;
            }
        }
        if !complete {
            self.send_pieces();
            return;
        }
        let Some(o) = self.outbound.take() else {
            return;
        };
        let _ = o.reply.send(Ok(o.session.finish(true)));
    }

    /// Records that the trainer took `peer`'s pseudo-gradient of outer step `round` (after
    /// the coordinator's checks, not on arrival: one refused or dropped is sent again by the
    /// next session, and the outer parameters of a held one are known to come with a
    /// pseudo-gradient that passed).
    pub fn note_held(&mut self, peer: PeerId, round: u64) {
        if let Some(j) = self.joined.as_mut() {
            if j.membership.codec.is_outer() {
                j.note_held(peer, round);
            }
        }
    }

    // ----- events -----

    /// An inbound training request.
    fn on_request(
        &mut self,
        peer: PeerId,
        request: TrainRequest,
        channel: ResponseChannel<TrainResponse>,
    ) {
        if self.attack() == Some(Attack::Stall) && matches!(request, TrainRequest::Piece { .. }) {
            if self.held.len() == MAX_HELD_CHANNELS {
                self.held.pop_front();
            }
            self.held.push_back(channel);
            return;
        }
        let response = match request {
            TrainRequest::Runs => TrainResponse::Runs {
                runs: self.known_runs(),
                training: self.joined.as_ref().map(|j| j.membership.announcement.run),
            },
            TrainRequest::Open {
                run,
                layout,
                exchange,
                params,
                samples,
                step,
                round,
                held,
                wants_outer,
            } => match self.on_open(peer, run, layout, exchange, params) {
                Err(refusal) => refusal,
                Ok((snapshot, pieces, we_hold)) => {
                    let we_want = !self.is_outer() || snapshot.budget.wants_outer(&peer);
                    let wants = (wants_outer, we_want);
                    let skips = Skips::of(snapshot.round(), held, round, we_hold, wants);
                    if skips.ours.pseudo_gradient && skips.theirs.pseudo_gradient {
                        TrainResponse::UpToDate
                    } else {
                        self.accept(
                            peer,
                            &snapshot,
                            (samples, step, round),
                            (pieces, skips, we_hold),
                        )
                    }
                }
            },
            TrainRequest::Piece {
                session,
                index,
                data,
            } => self.on_piece(peer, session, index, &data),
        };
        let _ = self.inner.send_response(channel, response);
    }

    /// Checks a peer's request to open a session: `Ok` gives the snapshot to exchange (the
    /// trainer's latest), the piece count and the outer step of the peer's pseudo-gradient
    /// held here, `Err` the answer that refuses it.
    fn on_open(
        &mut self,
        peer: PeerId,
        run: VersionId,
        layout: Hash32,
        exchange: Exchange,
        params: u64,
    ) -> Result<(Arc<Snapshot>, u32, u64), TrainResponse> {
        let refused = |reason: &str| {
            Err(TrainResponse::Refused {
                reason: reason.to_string(),
            })
        };
        let Some(j) = self.joined.as_mut() else {
            return refused("not training any run");
        };
        let m = &j.membership;
        if m.announcement.run != run {
            return refused("training another run");
        }
        if j.refused.contains(&peer) {
            return refused("your parameters were refused before");
        }
        if m.layout != layout || m.params != params || m.codec.exchange() != exchange {
            return refused("different model layout or exchange");
        }
        j.members.insert(peer);
        let pieces = m.codec.pieces(m.params);
        let we_hold = j.held_from(&peer);
        let snapshot = j.snapshots.borrow().clone();
        match snapshot {
            // Not trained far enough to have parameters yet: like busy, try later.
            None => Err(TrainResponse::Busy),
            Some(_) if self.busy_for(&peer) => Err(TrainResponse::Busy),
            Some(snapshot) => Ok((snapshot, pieces, we_hold)),
        }
    }

    /// Opens a session with `peer` on `snapshot`, in `pieces` pieces, sending what `skips`
    /// says, holding the peer's pseudo-gradient up to outer step `we_hold`.
    fn accept(
        &mut self,
        peer: PeerId,
        snapshot: &Arc<Snapshot>,
        peer_at: (u64, u64, u64),
        (pieces, skips, we_hold): (u32, Skips, u64),
    ) -> TrainResponse {
        let session = self.next_session;
        self.next_session = self.next_session.wrapping_add(1);
        self.inbound.insert(
            session,
            Session::new(
                peer,
                session,
                Arc::clone(snapshot),
                (pieces, skips),
                peer_at,
            ),
        );
        let samples = self
            .attack()
            .map_or(snapshot.samples, |a| a.claimed_samples(snapshot.samples));
        TrainResponse::Accepted {
            session,
            samples,
            step: snapshot.step,
            round: snapshot.round(),
            pieces,
            held: we_hold,
            wants_outer: !skips.theirs.outer,
        }
    }

    fn on_piece(&mut self, peer: PeerId, session: u64, index: u32, data: &[u8]) -> TrainResponse {
        let Some(j) = self.joined.as_ref() else {
            return TrainResponse::Refused {
                reason: "not training any run".into(),
            };
        };
        let (codec, attack) = (j.membership.codec, j.membership.attack);
        let Some(s) = self.inbound.get_mut(&session).filter(|s| s.peer == peer) else {
            return TrainResponse::Refused {
                reason: "unknown session".into(),
            };
        };
        let received = s.receive(index, data, &codec);
        // Empty pieces are not timed (see `on_piece_back`).
        if let (Ok(gap), false) = (&received, data.is_empty()) {
            self.note_piece_time(*gap);
        }
        let Some(s) = self.inbound.get_mut(&session) else {
            return TrainResponse::Refused {
                reason: "unknown session".into(),
            };
        };
        if let Err(why) = received {
            self.inbound.remove(&session);
            self.events.push_back(Event::Misbehaved {
                peer,
                why: format!("sent bad parameters: {why}"),
            });
            self.refuse(peer);
            return TrainResponse::Refused {
                reason: format!("bad parameters: {why}"),
            };
        }
        let reply = s.piece(index, &codec, attack);
        if s.incoming.complete() {
            if let Some(s) = self.inbound.remove(&session) {
                let done = s.finish(false);
                match self.served.as_ref().map(|tx| tx.try_send(done).is_ok()) {
                    Some(true) => {}
                    _ => {
                        tracing::debug!(%peer, "trainer busy; dropping a finished averaging session")
                    }
                }
            }
        }
        TrainResponse::Piece { index, data: reply }
    }

    /// A response to one of our requests.
    fn on_response(
        &mut self,
        peer: PeerId,
        request_id: OutboundRequestId,
        response: TrainResponse,
    ) {
        let Some(purpose) = self.requests.remove(&request_id) else {
            return;
        };
        match (purpose, response) {
            (Purpose::Runs(qid), TrainResponse::Runs { runs, training }) => {
                for run in runs.into_iter().take(MAX_RUNS_LISTED) {
                    match run.check() {
                        Ok(()) => self.remember_run(run),
                        Err(e) => {
                            // A node lists only runs it verified: this one forged or lied.
                            self.events.push_back(Event::Misbehaved {
                                peer,
                                why: format!("listed a run that does not verify: {e}"),
                            });
                            break;
                        }
                    }
                }
                if let Some(run) = training {
                    self.note_member(&run, peer);
                    if let Some(q) = self.runs_queries.get_mut(&qid) {
                        if q.trainers.len() < MAX_RUNS_KNOWN || q.trainers.contains_key(&run) {
                            q.trainers.entry(run).or_default().insert(peer);
                        }
                    }
                }
                self.answered_runs_query(qid);
            }
            (Purpose::Runs(qid), _) => self.answered_runs_query(qid),
            (
                Purpose::Open,
                TrainResponse::Accepted {
                    session,
                    samples,
                    step,
                    round,
                    pieces,
                    held,
                    wants_outer,
                },
            ) => self.on_accepted(
                peer,
                session,
                (samples, step, round),
                pieces,
                (held, wants_outer),
            ),
            (Purpose::Open, TrainResponse::UpToDate) => self.up_to_date(peer),
            (Purpose::Open, TrainResponse::Refused { reason }) => {
                if let Some(j) = self.joined.as_mut() {
                    j.members.remove(&peer);
                    avoid(&mut j.avoided, peer);
                }
                self.retry(peer, &reason);
            }
            (Purpose::Open, _) => self.retry(peer, "busy"),
            (Purpose::Piece, TrainResponse::Piece { index, data }) => {
                self.on_piece_back(peer, index, &data)
            }
            (Purpose::Piece, _) => self.retry(peer, "session refused mid-way"),
        }
    }

    /// A request of ours failed (timeout, connection lost, protocol not supported).
    fn on_failure(&mut self, peer: PeerId, request_id: OutboundRequestId) {
        match self.requests.remove(&request_id) {
            Some(Purpose::Runs(qid)) => self.answered_runs_query(qid),
            Some(Purpose::Open | Purpose::Piece) => self.retry(peer, "request failed"),
            None => {}
        }
    }

    /// The last connection to `peer` closed: its inbound sessions end without effect.
    fn peer_gone(&mut self, peer: PeerId) {
        self.inbound.retain(|_, s| s.peer != peer);
        self.retry(peer, "disconnected");
    }

    /// Periodic work: idle sessions, expired queries.
    fn tick(&mut self) {
        let now = Instant::now();
        let limit = self.idle_limit();
        // A session whose peer already sent pieces waits the longest: it is slow (a far-off
        // volunteer on a thin link), not stalling.
        let limit_for = |s: &Session| {
            if s.incoming.count > 0 {
                SESSION_IDLE
            } else {
                limit
            }
        };
        let idle: Vec<u64> = self
            .inbound
            .iter()
            .filter(|(_, s)| now.duration_since(s.last_activity) >= limit_for(s))
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some(s) = self.inbound.remove(&id) {
                tracing::debug!(peer = %s.peer, ?limit, "an averaging session the peer opened went idle");
                self.stalled(s.peer, s.incoming.count == 0);
            }
        }
        let stalled_out = self
            .outbound
            .as_ref()
            .filter(|o| now.duration_since(o.session.last_activity) >= limit_for(&o.session))
            .map(|o| (o.session.peer, o.session.incoming.count == 0));
        let stalled_open = self
            .opening
            .as_ref()
            .filter(|o| now.duration_since(o.since) >= limit)
            .map(|o| (o.peer, true));
        for (peer, sent_nothing) in stalled_out.into_iter().chain(stalled_open) {
            tracing::debug!(%peer, ?limit, "an averaging session opened here went idle");
            self.stalled(peer, sent_nothing);
            self.retry(peer, "session idle");
        }
        let expired: Vec<u64> = self
            .runs_queries
            .iter()
            .filter(|(_, q)| q.deadline <= now)
            .map(|(qid, _)| *qid)
            .collect();
        for qid in expired {
            self.finish_runs_query(qid, true);
        }
    }
}

impl WrapsRequestResponse for Behaviour {
    type Codec = CborCodec<TrainRequest, TrainResponse>;
    type Event = Event;

    fn inner(&mut self) -> &mut request_response::Behaviour<Self::Codec> {
        &mut self.inner
    }

    fn on_peer_connected(&mut self, peer: PeerId) {
        self.connected.insert(peer);
    }

    fn on_peer_disconnected(&mut self, peer: PeerId) {
        self.connected.remove(&peer);
        self.peer_gone(peer);
    }

    /// An event of the wrapped request-response behaviour.
    fn on_inner_event(&mut self, event: request_response::Event<TrainRequest, TrainResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_request(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.on_response(peer, request_id, response),
            },
            request_response::Event::OutboundFailure {
                peer, request_id, ..
            } => self.on_failure(peer, request_id),
            request_response::Event::InboundFailure { .. }
            | request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn poll_due(&mut self, cx: &mut Context<'_>) {
        while self.tick.poll_tick(cx).is_ready() {
            self.tick();
        }
    }

    fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

crate::impl_wire_behaviour!(Behaviour);
