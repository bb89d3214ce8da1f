//! A discrete-event simulator of one version spreading through a swarm: a publisher and `N`
//! fetchers on modelled links, each fetcher running the node's own download state machine
//! ([`Download`], with its [`Picker`]) and every host the node's own serving rules
//! ([`Uploads`]: upload slots, "busy", initial seeding). Only the network is modelled; what
//! is asked of whom, and how it is answered, is the node's code. Run it with the `swarm-sim`
//! binary (`cargo run --release -p p2p-node --features sim --bin swarm-sim -- --help`).
//!
//! The network model:
//! * each host has an upload and a download rate (goodput, bytes/s) and a one-way access
//!   latency; a message from `a` to `b` takes `latency(a) + latency(b)`;
//! * a chunk is a fluid flow from the moment its request reaches the uploader; a flow's rate is
//!   the smaller of its uploader's upload rate shared equally among the uploader's flows and
//!   its downloader's download rate shared equally among the downloader's flows (so a flow
//!   slowed at one end leaves no capacity to the others at the other end: slightly
//!   pessimistic where links differ a lot); its last byte arrives one latency after it ends;
//! * small messages (manifest, availability, "busy", "not found") cost only their latency;
//! * each host verifies arrived chunks one after another at `verify_rate` bytes/s;
//! * churn: a fraction of fetchers leave at random moments; their flows end, their peers see
//!   the connection close.
//!
//! The fluid lower bound is `T_min = max(S/u_pub, S/d_min, N*S/(u_pub + sum u_i))` (Kumar and
//! Ross, "Peer-assisted file distribution: the minimum distribution time", 2006).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use libp2p::PeerId;
use p2p_protocol::bitfield::Bitfield;
use p2p_protocol::manifest::{chunk_count, chunk_range, Hash32, VersionId};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::download::{Ask, Download, OnDisk, Step};
use super::have_wait::{HaveWaits, Standing};
use super::picker::Picker;
use super::upload::{Decision, Holding, Uploads};
use super::{ModelsConfig, Stage};

/// The scheduling tick of the node's models behaviour (availability refresh, new requests).
const TICK: Duration = Duration::from_millis(200);

/// Most fetchers a simulation takes.
pub const MAX_FETCHERS: usize = 100_000;

/// Most chunks a simulated version may have (the picker's work per step grows with them).
pub const MAX_CHUNKS: u64 = 16_384;

/// Most fetchers a full mesh (`peers` 0) may have: its availability polling grows with the
/// square of the fetchers.
pub const MAX_FULL_MESH: usize = 2_000;

/// Most bytes the availability bitfields of all fetchers may take together.
const MAX_BITFIELD_BYTES: u128 = 1 << 30;

/// Most events one simulation processes.
const MAX_EVENTS: u64 = 2_000_000_000;

/// Slowest link rate, bytes/s, and slowest hashing rate.
const MIN_RATE: f64 = 1_000.0;

/// Fastest link rate, bytes/s (1 Tbit/s), and fastest hashing rate: the clock counts
/// nanoseconds.
const MAX_RATE: f64 = 125e9;

/// One kind of host link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkClass {
    /// Upload rate, bytes/s.
    pub up: f64,
    /// Download rate, bytes/s.
    pub down: f64,
    /// One-way access latency.
    pub latency: Duration,
}

impl LinkClass {
    /// A link of `up_mbit` up and `down_mbit` down (Mbit/s) with `latency_ms` one way.
    pub fn mbit(up_mbit: f64, down_mbit: f64, latency_ms: f64) -> Self {
        Self {
            up: up_mbit * 1e6 / 8.0,
            down: down_mbit * 1e6 / 8.0,
            latency: Duration::from_secs_f64(latency_ms.max(0.0) / 1e3),
        }
    }
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Fetchers (the publisher comes on top).
    pub fetchers: usize,
    /// Size of the version, bytes.
    pub size: u64,
    /// The publisher's link.
    pub publisher: LinkClass,
    /// Fetchers' links: fetcher `i` gets `classes[i % classes.len()]`, so a list of three
    /// classes gives a third of the fetchers each.
    pub classes: Vec<LinkClass>,
    /// Fraction of the nominal rates a flow reaches (a TCP stream through a shaped 100 Mbit/s
    /// netns link reached 0.949 in `testnet/RESULTS.md`).
    pub goodput: f64,
    /// Peers each fetcher is connected to besides the publisher (0: all of them). Connections
    /// are symmetric: the graph has about `fetchers * peers / 2` edges.
    pub peers: usize,
    /// From a fetcher's start to its first request (learning of the version: announcement,
    /// resolving, process start-up).
    pub startup: Duration,
    /// Fetchers start uniformly at random within this long after the first one.
    pub start_spread: Duration,
    /// Hashing and writing speed of one host, bytes/s.
    pub verify_rate: f64,
    /// Fraction of fetchers that leave at a random moment before they finish.
    pub churn: f64,
    /// Seed of every random choice.
    pub seed: u64,
    /// The node's models settings (chunk size, requests per peer, upload slots, endgame,
    /// availability refresh).
    pub models: ModelsConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        let dc = LinkClass::mbit(100.0, 100.0, 0.5);
        Self {
            fetchers: 8,
            size: 64 << 20,
            publisher: dc,
            classes: vec![dc],
            goodput: 0.949,
            peers: 0,
            startup: Duration::ZERO,
            start_spread: Duration::ZERO,
            verify_rate: 1e9,
            churn: 0.0,
            seed: 1,
            models: ModelsConfig::default(),
        }
    }
}

/// A simulation that cannot run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SimError {
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// What a simulation found. Times are seconds from each fetcher's own start.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimReport {
    /// Fetchers simulated.
    pub fetchers: usize,
    /// Fetchers that left (churn).
    pub left: usize,
    /// Completion times of the fetchers that stayed, ascending.
    pub times: Vec<f64>,
    /// Fetchers that stayed but did not complete before the simulation stopped.
    pub unfinished: usize,
    /// The simulation stopped at its limit (50 x T_min + 600 s of simulated time, or 2e9
    /// events) before every fetcher that stayed completed.
    pub cut_off: bool,
    /// The fluid lower bound of the fetchers that stayed, seconds.
    pub t_min: f64,
    /// Median completion time over `t_min`.
    pub median_ratio: f64,
    /// Slowest completion time over `t_min`.
    pub slowest_ratio: f64,
    /// Bytes the publisher uploaded, in copies of the version.
    pub publisher_copies: f64,
    /// Seconds until every chunk had left the publisher at least once.
    pub first_copy: f64,
    /// The publisher's upload used, as a fraction of its goodput until the slowest fetcher
    /// finished.
    pub publisher_utilization: f64,
    /// The fetchers' uploads used, as a fraction of their goodput until the slowest
    /// finished.
    pub fetcher_utilization: f64,
    /// Chunk requests sent, and how many were answered "busy" or "not found".
    pub requests: u64,
    /// Chunk requests answered "busy".
    pub busy: u64,
    /// Chunk requests answered "not found".
    pub not_found: u64,
    /// How fast the swarm passes a chunk on: the median over chunks of the seconds from a
    /// chunk's first leaving the publisher until half of the fetchers (those that left
    /// included) had verified it. Chunks that never reached half are left out; NaN if none did.
    pub spread_half: f64,
    /// The same until the last fetcher that verified a chunk did (every fetcher, unless some
    /// left or the simulation was cut off).
    pub spread_all: f64,
    /// The same as `spread_half` for the chunk whose first copy left the publisher last: how
    /// long the end of a download waits on the swarm once every chunk has left the publisher.
    pub last_chunk_half: f64,
    /// The median over the fetchers that completed of the seconds their download link carried
    /// no chunk, from their first request (start plus `startup`) to their last chunk's
    /// arrival.
    pub download_idle: f64,
    /// Chunks received twice (endgame duplicates that were not cancelled in time).
    pub duplicates: u64,
    /// Events processed.
    pub events: u64,
}

/// The fluid lower bound of distributing `size` bytes from a publisher uploading at
/// `publisher_up` to fetchers with `ups` upload and `downs` download rates (bytes/s), seconds.
pub fn fluid_bound(size: u64, publisher_up: f64, ups: &[f64], downs: &[f64]) -> f64 {
    let s = size as f64;
    let d_min = downs.iter().copied().fold(f64::INFINITY, f64::min);
    let total_up = publisher_up + ups.iter().sum::<f64>();
    (s / publisher_up)
        .max(if d_min.is_finite() { s / d_min } else { 0.0 })
        .max(ups.len() as f64 * s / total_up)
}

/// Runs the simulation `config` describes.
pub fn run(config: &SimConfig) -> Result<SimReport, SimError> {
    validate(config)?;
    let mut sim = Sim::new(config);
    sim.run();
    Ok(sim.report())
}

/// Checks `c` as [`run`] does, without running it.
pub fn validate(c: &SimConfig) -> Result<(), SimError> {
    let invalid = |s: &str| Err(SimError::Invalid(s.to_string()));
    if c.fetchers == 0 || c.fetchers > MAX_FETCHERS {
        return invalid(&format!("fetchers must be 1 to {MAX_FETCHERS}"));
    }
    if c.size == 0 || c.models.chunk_size == 0 {
        return invalid("size and chunk size must be positive");
    }
    if chunk_count(c.size, c.models.chunk_size) > MAX_CHUNKS {
        return invalid(&format!("at most {MAX_CHUNKS} chunks"));
    }
    if c.classes.is_empty() {
        return invalid("at least one link class");
    }
    let in_range = |r: f64| (MIN_RATE..=MAX_RATE).contains(&r);
    let rate_ok = |l: &LinkClass| in_range(l.up) && in_range(l.down);
    if !rate_ok(&c.publisher) || !c.classes.iter().all(rate_ok) {
        return invalid("link rates must be from 8 kbit/s to 1 Tbit/s");
    }
    if !(c.goodput >= 0.01 && c.goodput <= 1.0) {
        return invalid("goodput must be from 0.01 to 1");
    }
    if !(c.churn >= 0.0 && c.churn < 1.0) {
        return invalid("churn must be from 0 up to (not including) 1");
    }
    if !in_range(c.verify_rate) {
        return invalid("the verify rate must be from 1 kB/s to 125 GB/s");
    }
    if c.models.have_refresh < Duration::from_millis(1) {
        return invalid("the availability refresh must be at least 1 ms");
    }
    let wait = c.models.availability_wait;
    if !wait.is_zero() && wait < Duration::from_millis(1) {
        return invalid("the availability wait must be 0 (off) or at least 1 ms");
    }
    if c.peers > c.fetchers {
        return invalid("peers cannot exceed fetchers");
    }
    let mesh = c.peers == 0 || c.peers + 1 >= c.fetchers; // as `connect` decides
    if mesh && c.fetchers > MAX_FULL_MESH {
        return invalid(&format!(
            "a full mesh (peers 0) takes at most {MAX_FULL_MESH} fetchers; set --peers"
        ));
    }
    let degree = if mesh { c.fetchers } else { c.peers + 1 } as u128;
    let bitfields =
        c.fetchers as u128 * degree * u128::from(chunk_count(c.size, c.models.chunk_size)) / 8;
    if bitfields > MAX_BITFIELD_BYTES {
        return invalid(&format!(
            "too large: the fetchers' availability maps would take about {} MiB (at most {} MiB); fewer fetchers, peers or chunks",
            bitfields >> 20,
            MAX_BITFIELD_BYTES >> 20
        ));
    }
    Ok(())
}

type Host = usize;
type RequestId = u64;
type FlowId = u64;

/// Nanoseconds of simulated time.
type Nanos = u64;

fn nanos(d: Duration) -> Nanos {
    d.as_nanos().min(u128::from(u64::MAX / 4)) as Nanos
}

/// Nanoseconds of `seconds` (saturating; 0 for what is not a positive number).
fn seconds(seconds: f64) -> Nanos {
    nanos(
        Duration::try_from_secs_f64(seconds).unwrap_or(if seconds > 0.0 {
            Duration::MAX
        } else {
            Duration::ZERO
        }),
    )
}

#[derive(Debug, Clone)]
enum Event {
    /// A fetcher starts downloading.
    Start(Host),
    /// The models behaviour's periodic tick.
    Tick(Host),
    /// A request reaches its uploader.
    Request(RequestId),
    /// An answer without data reaches the requester.
    Answer(RequestId, Answer),
    /// A flow may have ended (stale if its generation moved on).
    FlowEnd(FlowId, u32),
    /// A chunk's last byte reaches its requester.
    ChunkArrived(RequestId),
    /// A host finished verifying a chunk.
    Verified { host: Host, index: u32, from: Host },
    /// A fetcher leaves (churn).
    Leave(Host),
    /// A host's held availability requests may have waited their longest.
    HaveWaitOver(Host),
}

#[derive(Debug, Clone)]
enum Answer {
    Manifest,
    /// Chunks held, published, holds availability requests.
    Have(Bitfield, bool, bool),
    NotFound,
    Busy,
    Failed,
}

struct Scheduled {
    at: Nanos,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Request {
    from: Host,
    to: Host,
    ask: Ask,
    cancelled: bool,
}

struct Flow {
    src: Host,
    dst: Host,
    request: RequestId,
    /// Bytes of the chunk, and those not yet sent (as of `since`).
    bytes: f64,
    remaining: f64,
    rate: f64,
    since: Nanos,
    generation: u32,
}

struct HostState {
    peer: PeerId,
    link: LinkClass,
    have: Bitfield,
    published: bool,
    uploads: Uploads<RequestId>,
    /// Availability requests held (long polling).
    waits: HaveWaits<RequestId>,
    download: Option<Download>,
    /// Whether the manifest is held (the publisher, or a fetcher that got it).
    manifest: bool,
    neighbours: Vec<Host>,
    up: Vec<FlowId>,
    down: Vec<FlowId>,
    verify_free: Nanos,
    started: Option<Nanos>,
    finished: Option<Nanos>,
    alive: bool,
    /// Since when the download link has carried no chunk (its last flow in ended, or its
    /// first request went out), and the total time it carried none before that.
    idle_since: Nanos,
    idle: Nanos,
}

struct Sim<'a> {
    config: &'a SimConfig,
    id: VersionId,
    chunks: u32,
    base: Instant,
    now: Nanos,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    hosts: Vec<HostState>,
    by_peer: HashMap<PeerId, Host>,
    requests: HashMap<RequestId, Request>,
    next_request: RequestId,
    flows: HashMap<FlowId, Flow>,
    next_flow: FlowId,
    rng: StdRng,
    publisher_bytes: f64,
    fetcher_bytes: f64,
    /// Per chunk: when its first copy left the publisher (the latest of these is when every
    /// chunk had), how many fetchers verified it, and when the last of them and when half of
    /// the fetchers did.
    first_left: Vec<Option<Nanos>>,
    verified_by: Vec<u32>,
    last_verified: Vec<Option<Nanos>>,
    half_verified: Vec<Option<Nanos>>,
    requests_sent: u64,
    busy: u64,
    not_found: u64,
    duplicates: u64,
    events: u64,
    left: usize,
    /// Fetchers neither finished nor gone.
    remaining: usize,
    /// Stopped at the time or event limit.
    cut_off: bool,
    /// Chunk requests in flight by (requester, uploader, chunk), to cancel endgame losers.
    chunk_requests: HashMap<(Host, Host, u32), RequestId>,
}

impl<'a> Sim<'a> {
    fn new(config: &'a SimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let chunks = chunk_count(config.size, config.models.chunk_size) as u32;
        let total = config.fetchers + 1;
        let mut hosts: Vec<HostState> = (0..total)
            .map(|h| {
                let link = if h == 0 {
                    config.publisher
                } else {
                    config.classes[(h - 1) % config.classes.len()]
                };
                HostState {
                    peer: seeded_peer_id(&mut rng),
                    link,
                    have: if h == 0 {
                        Bitfield::full(chunks)
                    } else {
                        Bitfield::new(chunks)
                    },
                    published: h == 0,
                    uploads: Uploads::new(&config.models),
                    waits: HaveWaits::new(config.models.availability_wait),
                    download: None,
                    manifest: h == 0,
                    neighbours: Vec::new(),
                    up: Vec::new(),
                    down: Vec::new(),
                    verify_free: 0,
                    started: None,
                    finished: None,
                    alive: true,
                    idle_since: 0,
                    idle: 0,
                }
            })
            .collect();
        connect(&mut hosts, config.peers, &mut rng);
        let by_peer = hosts.iter().enumerate().map(|(h, s)| (s.peer, h)).collect();
        let mut sim = Self {
            config,
            id: Hash32([7; 32]),
            chunks,
            base: Instant::now(),
            now: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            hosts,
            by_peer,
            requests: HashMap::new(),
            next_request: 0,
            flows: HashMap::new(),
            next_flow: 0,
            rng,
            publisher_bytes: 0.0,
            fetcher_bytes: 0.0,
            first_left: vec![None; chunks as usize],
            verified_by: vec![0; chunks as usize],
            last_verified: vec![None; chunks as usize],
            half_verified: vec![None; chunks as usize],
            requests_sent: 0,
            busy: 0,
            not_found: 0,
            duplicates: 0,
            events: 0,
            left: 0,
            remaining: config.fetchers,
            cut_off: false,
            chunk_requests: HashMap::new(),
        };
        let spread = nanos(config.start_spread);
        let mut leaving: Vec<Host> = (1..total).collect();
        leaving.shuffle(&mut sim.rng);
        leaving.truncate((config.churn * config.fetchers as f64).round() as usize);
        // Leavers go at a random moment within the fluid bound (most are mid-download then).
        let bound = seconds(sim.t_min());
        for h in 1..total {
            let at = if spread > 0 {
                sim.rng.gen_range(0..=spread)
            } else {
                0
            };
            sim.schedule(at, Event::Start(h));
        }
        for h in leaving {
            let at = sim.rng.gen_range(0..=bound.max(1));
            sim.schedule(at, Event::Leave(h));
        }
        sim
    }

    fn t_min(&self) -> f64 {
        // The bound is of nominal rates (flows reach `goodput` of them).
        let fetchers = &self.hosts[1..];
        let ups: Vec<f64> = fetchers.iter().map(|h| h.link.up).collect();
        let downs: Vec<f64> = fetchers.iter().map(|h| h.link.down).collect();
        fluid_bound(self.config.size, self.hosts[0].link.up, &ups, &downs)
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    fn schedule(&mut self, at: Nanos, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    fn after(&mut self, delay: Nanos, event: Event) {
        self.schedule(self.now + delay, event);
    }

    fn latency(&self, a: Host, b: Host) -> Nanos {
        nanos(self.hosts[a].link.latency + self.hosts[b].link.latency)
    }

    fn run(&mut self) {
        // Simulated time is bounded: far beyond any sensible download.
        let limit = seconds(self.t_min() * 50.0 + 600.0);
        while let Some(Reverse(s)) = self.queue.pop() {
            if s.at > limit || self.events >= MAX_EVENTS {
                self.cut_off = true;
                break;
            }
            self.now = s.at;
            self.events += 1;
            self.handle(s.event);
            if self.remaining == 0 {
                break;
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Start(h) => self.start(h),
            Event::Tick(h) => {
                if self.hosts[h].alive && self.hosts[h].download.is_some() {
                    self.drive(h);
                    self.after(nanos(TICK), Event::Tick(h));
                }
            }
            Event::Request(r) => self.on_request(r),
            Event::Answer(r, answer) => self.on_answer(r, answer),
            Event::FlowEnd(f, generation) => self.on_flow_end(f, generation),
            Event::ChunkArrived(r) => self.on_chunk_arrived(r),
            Event::Verified { host, index, from } => self.on_verified(host, index, from),
            Event::Leave(h) => self.leave(h),
            Event::HaveWaitOver(h) => {
                let now = self.instant();
                let over = self.hosts[h].waits.expired(now);
                for (_, r) in over {
                    self.answer_have(h, r);
                }
            }
        }
    }

    fn start(&mut self, h: Host) {
        if !self.hosts[h].alive {
            return;
        }
        let startup = nanos(self.config.startup);
        self.hosts[h].started = Some(self.now);
        self.hosts[h].idle_since = self.now.saturating_add(startup);
        let publisher = self.hosts[0].peer;
        let mut d = Download::new(Some(publisher), self.instant());
        d.add_holder(publisher);
        for n in self.hosts[h].neighbours.clone() {
            if self.hosts[n].alive {
                d.add_candidate(self.hosts[n].peer);
            }
        }
        self.hosts[h].download = Some(d);
        // The first drive (and the ticks after it) come once the version is known.
        self.after(startup, Event::Tick(h));
    }

    /// The models behaviour's `drive`: carries out what the download asks for.
    fn drive(&mut self, h: Host) {
        let Some(mut d) = self.hosts[h].download.take() else {
            return;
        };
        let disk = OnDisk {
            complete: self.hosts[h].have.is_complete(),
            durable: true,
        };
        let now = self.instant();
        let steps = d.poll(now, &self.config.models, disk, &mut self.rng);
        let mut complete = false;
        for step in steps {
            match step {
                // The publisher is every fetcher's known holder already.
                Step::FindProviders | Step::Sync => {}
                Step::Ask(peer, ask) => {
                    if let Some(&to) = self.by_peer.get(&peer) {
                        self.send(h, to, ask);
                    }
                }
                Step::Complete => complete = true,
            }
        }
        if complete {
            self.hosts[h].finished = Some(self.now);
            self.remaining -= 1;
        } else {
            self.hosts[h].download = Some(d);
        }
    }

    fn send(&mut self, from: Host, to: Host, ask: Ask) {
        let r = self.next_request;
        self.next_request += 1;
        if let Ask::Chunk(index) = ask {
            self.requests_sent += 1;
            self.chunk_requests.insert((from, to, index), r);
        }
        self.requests.insert(
            r,
            Request {
                from,
                to,
                ask,
                cancelled: false,
            },
        );
        let lat = self.latency(from, to);
        self.after(lat, Event::Request(r));
    }

    /// Removes request `r`, answered or arrived.
    fn take_request(&mut self, r: RequestId) -> Option<Request> {
        let req = self.requests.remove(&r)?;
        if let Ask::Chunk(index) = req.ask {
            let key = (req.from, req.to, index);
            if self.chunk_requests.get(&key) == Some(&r) {
                self.chunk_requests.remove(&key);
            }
        }
        Some(req)
    }

    fn answer(&mut self, r: RequestId, answer: Answer) {
        let Some(req) = self.requests.get(&r) else {
            return;
        };
        let lat = self.latency(req.from, req.to);
        self.after(lat, Event::Answer(r, answer));
    }

    /// The models behaviour's `on_request`, for the uploader.
    fn on_request(&mut self, r: RequestId) {
        let Some(req) = self.requests.get(&r) else {
            return;
        };
        let (from, to, ask) = (req.from, req.to, req.ask);
        if !self.hosts[from].alive {
            // Its connections closed: the request never arrives.
            self.take_request(r);
            return;
        }
        if !self.hosts[to].alive {
            return self.answer(r, Answer::Failed);
        }
        let now = self.instant();
        let id = self.id;
        let chunk_size = self.config.models.chunk_size;
        let size = self.config.size;
        let requester = self.hosts[from].peer;
        let host = &mut self.hosts[to];
        if !matches!(ask, Ask::Manifest) && host.manifest {
            host.uploads.note_asked(id, now);
        }
        let answer = match ask {
            Ask::Manifest if host.manifest => Answer::Manifest,
            Ask::Have { known }
                if host.manifest
                    && host.uploads.serves(host.published, host.have.is_complete()) =>
            {
                let standing = Standing {
                    chunks: host.have.count(),
                    free_slots: host.uploads.free_slots(),
                };
                let now_out = host.waits.arrive(requester, id, known, r, standing, now);
                if !now_out.contains(&r) {
                    let wait = nanos(self.config.models.availability_wait);
                    self.after(wait, Event::HaveWaitOver(to));
                }
                for a in now_out {
                    self.answer_have(to, a);
                }
                return;
            }
            Ask::Chunk(index) if host.manifest => {
                let holding = Holding {
                    published: host.published,
                    have: &host.have,
                    chunk_size,
                    total_size: size,
                };
                match host
                    .uploads
                    .decide(requester, &id, Some(holding), index, now)
                {
                    Decision::Serve => {
                        host.uploads.reserve(id, index, r);
                        let range = chunk_range(size, chunk_size, index);
                        self.start_flow(to, from, r, (range.end - range.start) as f64);
                        return;
                    }
                    Decision::Queue => {
                        host.uploads.enqueue(r, requester);
                        return;
                    }
                    Decision::Busy => {
                        let free = host.uploads.free_slots();
                        let retry = self.config.models.have_refresh;
                        host.waits.refused_busy(requester, free, retry, now);
                        if free > 0 {
                            // Refused by a rate cap: its held requests go at the retry.
                            self.after(nanos(retry), Event::HaveWaitOver(to));
                        }
                        Answer::Busy
                    }
                    Decision::NotFound => Answer::NotFound,
                }
            }
            _ => Answer::NotFound,
        };
        self.answer(r, answer);
    }

    /// `host` answers availability request `r` with what it holds now.
    fn answer_have(&mut self, host: Host, r: RequestId) {
        let h = &self.hosts[host];
        let answer = Answer::Have(h.have.clone(), h.published, h.waits.accepting());
        self.answer(r, answer);
    }

    /// The models behaviour's `on_response` and `on_outbound_failure`, for the requester.
    fn on_answer(&mut self, r: RequestId, answer: Answer) {
        let Some(req) = self.take_request(r) else {
            return;
        };
        let (h, peer_host) = (req.from, req.to);
        if !self.hosts[h].alive {
            return;
        }
        let peer = self.hosts[peer_host].peer;
        let chunks = self.chunks;
        let models = &self.config.models;
        let (max_per_peer, endgame, max_total) = (
            models.max_requests_per_peer,
            models.endgame_copies,
            models.max_requests_in_flight,
        );
        let swarm = self.config.models.stage == Stage::Swarm;
        let mut manifest_arrived = false;
        let Some(d) = self.hosts[h].download.as_mut() else {
            return;
        };
        if req.ask == Ask::Manifest {
            d.manifest_request_ended(&peer);
        }
        if req.cancelled {
            return;
        }
        let drive = match (req.ask, answer) {
            (Ask::Manifest, Answer::Manifest) => {
                if !d.has_manifest() {
                    let picker = Picker::new(Bitfield::new(chunks), max_per_peer, endgame)
                        .with_max_in_flight(max_total);
                    d.start(picker, 0, 0);
                    manifest_arrived = true;
                }
                true
            }
            (Ask::Have { .. }, Answer::Have(bits, published, holds)) => {
                if published {
                    d.on_publisher(peer, swarm);
                }
                d.on_have(peer, Some(bits), holds, None);
                true
            }
            (Ask::Have { .. }, _) => {
                d.on_have(peer, None, false, None);
                false
            }
            (Ask::Chunk(index), Answer::NotFound) => {
                self.not_found += 1;
                d.chunk_not_found(&peer, index);
                true
            }
            (Ask::Chunk(index), Answer::Busy) => {
                self.busy += 1;
                d.chunk_busy(peer, index);
                true
            }
            (Ask::Chunk(index), _) => {
                if let Some(p) = d.picker_mut() {
                    p.request_failed(&peer, index);
                }
                true
            }
            (Ask::Manifest, _) => true,
        };
        if manifest_arrived {
            self.hosts[h].manifest = true;
        }
        if drive {
            self.drive(h);
        }
    }

    fn start_flow(&mut self, src: Host, dst: Host, request: RequestId, bytes: f64) {
        let f = self.next_flow;
        self.next_flow += 1;
        self.flows.insert(
            f,
            Flow {
                src,
                dst,
                request,
                bytes,
                remaining: bytes,
                rate: 0.0,
                since: self.now,
                generation: 0,
            },
        );
        self.hosts[src].up.push(f);
        let now = self.now;
        let d = &mut self.hosts[dst];
        // Counted only until the download completes (a late endgame copy may still arrive).
        if d.down.is_empty() && d.finished.is_none() {
            d.idle += now.saturating_sub(d.idle_since);
        }
        d.down.push(f);
        self.rebalance(&[src, dst]);
    }

    /// Settles the progress of every flow touching `hosts` and gives each its new rate.
    fn rebalance(&mut self, hosts: &[Host]) {
        let mut touched: Vec<FlowId> = hosts
            .iter()
            .flat_map(|h| {
                self.hosts[*h]
                    .up
                    .iter()
                    .chain(&self.hosts[*h].down)
                    .copied()
            })
            .collect();
        touched.sort_unstable();
        touched.dedup();
        let g = self.config.goodput;
        for f in touched {
            let Some(flow) = self.flows.get(&f) else {
                continue;
            };
            let (src, dst) = (&self.hosts[flow.src], &self.hosts[flow.dst]);
            let rate = (g * src.link.up / src.up.len() as f64)
                .min(g * dst.link.down / dst.down.len() as f64);
            let now = self.now;
            let Some(flow) = self.flows.get_mut(&f) else {
                continue;
            };
            let elapsed = (now - flow.since) as f64 / 1e9;
            flow.remaining = (flow.remaining - flow.rate * elapsed).max(0.0);
            flow.since = now;
            flow.rate = rate;
            flow.generation += 1;
            let generation = flow.generation;
            let left = seconds(flow.remaining / rate);
            self.after(left, Event::FlowEnd(f, generation));
        }
    }

    fn remove_flow(&mut self, f: FlowId) -> Option<Flow> {
        let flow = self.flows.remove(&f)?;
        self.hosts[flow.src].up.retain(|x| *x != f);
        self.hosts[flow.dst].down.retain(|x| *x != f);
        if self.hosts[flow.dst].down.is_empty() {
            self.hosts[flow.dst].idle_since = self.now;
        }
        let elapsed = (self.now - flow.since) as f64 / 1e9;
        let sent = flow.bytes - (flow.remaining - flow.rate * elapsed).max(0.0);
        if flow.src == 0 {
            self.publisher_bytes += sent;
        } else {
            self.fetcher_bytes += sent;
        }
        self.rebalance(&[flow.src, flow.dst]);
        Some(flow)
    }

    fn on_flow_end(&mut self, f: FlowId, generation: u32) {
        if self
            .flows
            .get(&f)
            .is_none_or(|fl| fl.generation != generation)
        {
            return;
        }
        let Some(flow) = self.remove_flow(f) else {
            return;
        };
        // The response is sent: the upload slot is free.
        self.slot_freed(flow.src, flow.request);
        if let Some(sent) = self.requests.get(&flow.request).map(|r| r.ask) {
            if let Ask::Chunk(index) = sent {
                if flow.src == 0 {
                    self.first_left[index as usize].get_or_insert(self.now);
                }
                let range = chunk_range(self.config.size, self.config.models.chunk_size, index);
                let id = self.id;
                self.hosts[flow.src]
                    .uploads
                    .sent(id, range.end - range.start);
            }
            let lat = self.latency(flow.src, flow.dst);
            self.after(lat, Event::ChunkArrived(flow.request));
        }
    }

    /// The answer to `request` is sent or dropped: `host` serves the requests that waited
    /// for its slot.
    fn slot_freed(&mut self, host: Host, request: RequestId) {
        let was_upload = self.hosts[host].uploads.is_uploading(&request);
        let mut next = self.hosts[host].uploads.finished(request);
        if next.is_none() && was_upload {
            let woken = self.hosts[host].waits.slot_freed();
            for (_, r) in woken {
                self.answer_have(host, r);
            }
        }
        while let Some(r) = next {
            let waiting = self.requests.get(&r).map(|q| (q.from, q.ask));
            match waiting {
                Some((from, Ask::Chunk(index)))
                    if self.hosts[from].alive && self.hosts[host].alive =>
                {
                    let id = self.id;
                    self.hosts[host].uploads.reserve(id, index, r);
                    let range = chunk_range(self.config.size, self.config.models.chunk_size, index);
                    self.start_flow(host, from, r, (range.end - range.start) as f64);
                    return;
                }
                _ => next = self.hosts[host].uploads.finished(r),
            }
        }
    }

    /// The models behaviour's `on_chunk`.
    fn on_chunk_arrived(&mut self, r: RequestId) {
        let Some(req) = self.take_request(r) else {
            return;
        };
        let Ask::Chunk(index) = req.ask else {
            return;
        };
        let (h, from) = (req.from, req.to);
        if !self.hosts[h].alive {
            return;
        }
        if req.cancelled {
            self.duplicates += 1;
            return;
        }
        let peer = self.hosts[from].peer;
        let held = self.hosts[h].have.get(index);
        let Some(d) = self.hosts[h].download.as_mut() else {
            self.duplicates += 1;
            return;
        };
        if held || d.has_chunk(index) {
            self.duplicates += 1;
            if let Some(p) = d.picker_mut() {
                p.chunk_received(&peer, index);
            }
            return;
        }
        let losers = d.chunk_arrived(peer, index);
        for loser in losers {
            let Some(&lh) = self.by_peer.get(&loser) else {
                continue;
            };
            let pending = self.chunk_requests.get(&(h, lh, index));
            if let Some(pending) = pending.and_then(|r| self.requests.get_mut(r)) {
                pending.cancelled = true;
            }
        }
        // Verified one after another, off the event loop.
        let range = chunk_range(self.config.size, self.config.models.chunk_size, index);
        let cost = seconds((range.end - range.start) as f64 / self.config.verify_rate);
        let host = &mut self.hosts[h];
        let done = host.verify_free.max(self.now).saturating_add(cost);
        host.verify_free = done;
        self.schedule(
            done,
            Event::Verified {
                host: h,
                index,
                from,
            },
        );
        self.drive(h);
    }

    fn on_verified(&mut self, h: Host, index: u32, from: Host) {
        if !self.hosts[h].alive {
            return;
        }
        self.hosts[h].have.set(index);
        let i = index as usize;
        self.verified_by[i] += 1;
        self.last_verified[i] = Some(self.now);
        if self.verified_by[i] as usize * 2 >= self.config.fetchers {
            self.half_verified[i].get_or_insert(self.now);
        }
        let (id, count) = (self.id, self.hosts[h].have.count());
        let told = self.hosts[h].waits.chunks_changed(&id, count);
        for r in told {
            self.answer_have(h, r);
        }
        let peer = self.hosts[from].peer;
        let now = self.instant();
        if let Some(d) = self.hosts[h].download.as_mut() {
            d.chunk_written(index, peer, true, now);
        }
        self.drive(h);
    }

    fn leave(&mut self, h: Host) {
        if !self.hosts[h].alive || self.hosts[h].finished.is_some() {
            return;
        }
        self.hosts[h].alive = false;
        self.left += 1;
        self.remaining -= 1;
        let flows: Vec<FlowId> = self.hosts[h]
            .up
            .iter()
            .chain(&self.hosts[h].down)
            .copied()
            .collect();
        for f in flows {
            if let Some(flow) = self.remove_flow(f) {
                self.slot_freed(flow.src, flow.request);
                if flow.src == h {
                    self.answer(flow.request, Answer::Failed);
                }
            }
        }
        // Its requests waiting at uploaders go with its connections.
        let waiting: Vec<(RequestId, Host)> = self
            .requests
            .iter()
            .filter(|(_, q)| q.from == h)
            .map(|(r, q)| (*r, q.to))
            .collect();
        for (r, to) in waiting {
            self.take_request(r);
            self.slot_freed(to, r);
        }
        // The requests it held fail with its connections.
        for r in self.hosts[h].waits.drain() {
            self.answer(r, Answer::Failed);
        }
        // Its peers see the connection close.
        let peer = self.hosts[h].peer;
        for n in self.hosts[h].neighbours.clone() {
            self.hosts[n].waits.peer_gone(&peer);
            if let Some(d) = self.hosts[n].download.as_mut() {
                d.peer_gone(&peer);
            }
        }
    }

    fn report(&self) -> SimReport {
        // The bound of the fetchers that stayed (those that left are not timed).
        let stayed: Vec<&HostState> = self.hosts[1..].iter().filter(|h| h.alive).collect();
        let ups: Vec<f64> = stayed.iter().map(|h| h.link.up).collect();
        let downs: Vec<f64> = stayed.iter().map(|h| h.link.down).collect();
        let t_min = fluid_bound(self.config.size, self.hosts[0].link.up, &ups, &downs);
        let mut times: Vec<f64> = self.hosts[1..]
            .iter()
            .filter(|h| h.alive)
            .filter_map(|h| Some((h.finished? - h.started?) as f64 / 1e9))
            .collect();
        times.sort_by(f64::total_cmp);
        let stayed = stayed.len();
        let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        let slowest = times.last().copied().unwrap_or(f64::NAN);
        let g = self.config.goodput;
        let end = (self.now as f64 / 1e9).max(1e-9);
        let fetcher_up: f64 = self.hosts[1..].iter().map(|h| h.link.up).sum();
        // Seconds from chunk i's first leaving the publisher until `at[i]`.
        let spread = |at: &[Option<Nanos>], i: usize| {
            Some(at[i]?.saturating_sub(self.first_left[i]?) as f64 / 1e9)
        };
        let median_spread = |at: &[Option<Nanos>]| {
            let mut s: Vec<f64> = (0..at.len()).filter_map(|i| spread(at, i)).collect();
            s.sort_by(f64::total_cmp);
            s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let last_out = (0..self.first_left.len()).max_by_key(|i| self.first_left[*i]);
        // When every chunk had left the publisher once (None while one had not).
        let first_copy = self
            .first_left
            .iter()
            .copied()
            .collect::<Option<Vec<Nanos>>>()
            .and_then(|left| left.into_iter().max());
        let mut idle: Vec<f64> = self.hosts[1..]
            .iter()
            .filter(|h| h.alive && h.finished.is_some())
            .map(|h| h.idle as f64 / 1e9)
            .collect();
        idle.sort_by(f64::total_cmp);
        SimReport {
            spread_half: median_spread(&self.half_verified),
            spread_all: median_spread(&self.last_verified),
            download_idle: idle.get(idle.len() / 2).copied().unwrap_or(f64::NAN),
            last_chunk_half: last_out
                .and_then(|i| spread(&self.half_verified, i))
                .unwrap_or(f64::NAN),
            first_copy: first_copy.map_or(f64::NAN, |t| t as f64 / 1e9),
            publisher_utilization: self.publisher_bytes / (g * self.hosts[0].link.up * end),
            fetcher_utilization: self.fetcher_bytes / (g * fetcher_up * end),
            fetchers: self.config.fetchers,
            left: self.left,
            unfinished: stayed - times.len(),
            cut_off: self.cut_off,
            t_min,
            median_ratio: median / t_min,
            slowest_ratio: slowest / t_min,
            publisher_copies: self.publisher_bytes / self.config.size as f64,
            requests: self.requests_sent,
            busy: self.busy,
            not_found: self.not_found,
            duplicates: self.duplicates,
            events: self.events,
            times,
        }
    }
}

/// A peer id drawn from `rng`, so that a seed gives the same peers, in the same order.
fn seeded_peer_id(rng: &mut StdRng) -> PeerId {
    let secret: [u8; 32] = rng.gen();
    libp2p::identity::Keypair::ed25519_from_bytes(secret)
        .map(|k| k.public().to_peer_id())
        .unwrap_or_else(|_| PeerId::random())
}

/// Connects the hosts: every fetcher to the publisher and to about `peers` random others
/// (symmetric), or to every other fetcher when `peers` is 0 or covers them all.
fn connect(hosts: &mut [HostState], peers: usize, rng: &mut StdRng) {
    let n = hosts.len();
    for h in 1..n {
        hosts[h].neighbours.push(0);
        hosts[0].neighbours.push(h);
    }
    if peers == 0 || peers >= n.saturating_sub(2) {
        for (a, host) in hosts.iter_mut().enumerate().skip(1) {
            host.neighbours.extend((1..n).filter(|b| *b != a));
        }
        return;
    }
    // Each fetcher dials `peers / 2` random others; with the dials it receives, it ends up
    // with about `peers` connections.
    for a in 1..n {
        for _ in 0..peers.div_ceil(2) {
            let b = rng.gen_range(1..n);
            if b != a && !hosts[a].neighbours.contains(&b) {
                hosts[a].neighbours.push(b);
                hosts[b].neighbours.push(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(fetchers: usize) -> SimConfig {
        SimConfig {
            fetchers,
            size: 8 << 20,
            models: ModelsConfig {
                chunk_size: 256 << 10,
                ..ModelsConfig::default()
            },
            ..SimConfig::default()
        }
    }

    #[test]
    fn the_fluid_bound_takes_the_tightest_of_its_three_terms() {
        // Publisher-bound: one fetcher with a fast link.
        assert_eq!(fluid_bound(100, 10.0, &[1000.0], &[1000.0]), 10.0);
        // Download-bound.
        assert_eq!(fluid_bound(100, 1000.0, &[1000.0], &[5.0]), 20.0);
        // Capacity-bound: 4 fetchers, total upload 40 -> 4*100/40.
        assert_eq!(fluid_bound(100, 10.0, &[10.0; 3], &[1e9; 3]), 10.0);
        assert_eq!(fluid_bound(100, 10.0, &[2.0; 4], &[1e9; 4]), 400.0 / 18.0);
    }

    #[test]
    fn every_fetcher_completes_and_no_one_beats_the_fluid_bound() {
        let report = run(&small(8)).unwrap();
        assert_eq!(report.times.len(), 8, "{report:?}");
        assert_eq!(report.unfinished, 0);
        assert!(report.times[0] >= report.t_min * 0.999, "{report:?}");
        assert!(report.publisher_copies >= 0.999, "{report:?}");
        assert!(report.slowest_ratio < 3.0, "{report:?}");
    }

    #[test]
    fn chunks_reach_half_the_fetchers_no_sooner_than_one_more_transfer_and_all_of_them_later() {
        let config = small(8);
        let report = run(&config).unwrap();
        // One chunk at the full goodput of a fetcher's uplink. Reaching half of the fetchers
        // takes another transfer after the publisher's first copy: with equal links and this
        // seed the publisher sends no chunk twice before every chunk has left it once.
        let chunk_time = config.models.chunk_size as f64 / (config.goodput * config.classes[0].up);
        assert!(report.spread_half >= chunk_time, "{report:?}");
        assert!(report.last_chunk_half >= chunk_time, "{report:?}");
        // The last of 8 fetchers gets a chunk strictly after the fourth.
        assert!(report.spread_all > report.spread_half, "{report:?}");
    }

    /// One fetcher with one request in flight over a 40 ms round trip: its downlink carries no
    /// chunk for one round trip between chunks (the next request goes out as a chunk arrives),
    /// so it idles for about (chunks - 1) round trips, plus the start (manifest, availability).
    #[test]
    fn a_downlink_that_waits_a_round_trip_per_chunk_is_idle_for_those_round_trips() {
        let config = SimConfig {
            publisher: LinkClass::mbit(100.0, 100.0, 10.0),
            classes: vec![LinkClass::mbit(100.0, 100.0, 10.0)],
            models: ModelsConfig {
                chunk_size: 256 << 10,
                max_requests_per_peer: 1,
                max_requests_in_flight: 1,
                ..ModelsConfig::default()
            },
            ..small(1)
        };
        let report = run(&config).unwrap();
        let round_trip = 0.040;
        let gaps = (config.size / u64::from(config.models.chunk_size)) as f64 - 1.0;
        assert!(
            report.download_idle >= gaps * round_trip * 0.999,
            "{report:?}"
        );
        assert!(
            report.download_idle <= (gaps + 4.0) * round_trip,
            "{report:?}"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_result() {
        let a = run(&small(6)).unwrap();
        let b = run(&small(6)).unwrap();
        assert_eq!(a.times, b.times);
        assert_eq!(a.events, b.events);
    }

    #[test]
    fn fetchers_that_stay_complete_when_others_leave_midway() {
        let config = SimConfig {
            churn: 0.3,
            seed: 3,
            ..small(10)
        };
        let report = run(&config).unwrap();
        assert_eq!(report.left, 3);
        assert_eq!(report.times.len(), 7, "{report:?}");
        assert_eq!(report.unfinished, 0);
        assert!(!report.cut_off);
        assert!(report.publisher_utilization <= 1.0 + 1e-9, "{report:?}");
        assert!(report.fetcher_utilization <= 1.0 + 1e-9, "{report:?}");
    }

    #[test]
    fn slow_fetchers_with_a_sparse_peer_graph_still_complete() {
        let config = SimConfig {
            peers: 4,
            classes: vec![
                LinkClass::mbit(20.0, 50.0, 10.0),
                LinkClass::mbit(100.0, 100.0, 1.0),
            ],
            ..small(30)
        };
        let report = run(&config).unwrap();
        assert_eq!(report.times.len(), 30, "{report:?}");
        assert!(report.times[0] >= report.t_min * 0.999, "{report:?}");
    }

    #[test]
    fn bad_settings_are_refused() {
        let zero = SimConfig {
            fetchers: 0,
            ..SimConfig::default()
        };
        assert!(run(&zero).is_err());
        let rate = SimConfig {
            publisher: LinkClass::mbit(0.0, 1.0, 0.0),
            ..SimConfig::default()
        };
        assert!(run(&rate).is_err());
    }
}
