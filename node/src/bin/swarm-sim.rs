//! `swarm-sim`: simulates one version spreading from a publisher to N fetchers that run the
//! node's own download and upload rules over modelled links (see `p2p_node::models::sim`),
//! and prints completion times against the fluid lower bound.
//!
//! ```text
//! cargo run --release -p p2p-node --features sim --bin swarm-sim -- --fetchers 1000 --peers 32
//! ```

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use p2p_node::models::sim::{self, LinkClass, SimConfig, SimReport};
use p2p_node::models::ModelsConfig;

/// Simulates a swarm download with the node's own picker and upload rules.
#[derive(Debug, Parser)]
#[command(name = "swarm-sim", version)]
struct Args {
    /// Fetchers (the publisher comes on top), 1 to 100000 (above 2000, set --peers).
    #[arg(long, default_value_t = 8)]
    fetchers: usize,
    /// Size of the version, MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Chunk size, KiB.
    #[arg(long, default_value_t = 1024)]
    chunk_kib: u32,
    /// The publisher's link: UP/DOWN Mbit/s, optionally @LATENCY ms one way (0 to 10000).
    #[arg(long, default_value = "100/100@0.5", value_parser = parse_class)]
    publisher: LinkClass,
    /// A fetchers' link class, as for --publisher; repeat it for a mix (fetcher i gets class
    /// i mod the number of classes).
    #[arg(long = "class", default_value = "100/100@0.5", value_parser = parse_class)]
    classes: Vec<LinkClass>,
    /// Fraction of the nominal rate one flow reaches.
    #[arg(long, default_value_t = 0.949)]
    goodput: f64,
    /// Peers each fetcher is connected to besides the publisher (0: all).
    #[arg(long, default_value_t = 0)]
    peers: usize,
    /// From a fetcher's start to its first request, ms (learning of the version).
    #[arg(long, default_value = "0", value_parser = parse_ms)]
    startup_ms: Duration,
    /// Fetchers start at random within this many ms.
    #[arg(long, default_value = "0", value_parser = parse_ms)]
    start_spread_ms: Duration,
    /// Chunk hashing and writing speed of one host, MB/s.
    #[arg(long, default_value_t = 1000.0)]
    verify_mbs: f64,
    /// Fraction of fetchers that leave at a random moment.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Seed of the first run; run k uses seed + k.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs (different seeds), 1 to 1000.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    runs: u64,
    /// Chunk requests in flight to one peer.
    #[arg(long, default_value_t = 4)]
    requests_per_peer: usize,
    /// Chunk requests in flight in all, per fetcher (0: no limit).
    #[arg(long, default_value_t = 4)]
    requests_in_flight: usize,
    /// Chunk requests that wait for an upload slot instead of being answered "busy".
    #[arg(long, default_value_t = 0)]
    upload_queue: usize,
    /// Upload slots per host.
    #[arg(long, default_value_t = 4)]
    upload_slots: usize,
    /// Peers asked for one chunk in the endgame.
    #[arg(long, default_value_t = 2)]
    endgame_copies: usize,
    /// Availability refresh interval, ms.
    #[arg(long, default_value_t = 200)]
    have_refresh_ms: u64,
    /// Longest a host holds an availability request until it has something new to say
    /// (long polling), ms; 0: requests are answered at once and peers are polled every
    /// `--have-refresh-ms`.
    #[arg(long, default_value_t = 2000)]
    availability_wait_ms: u64,
    /// Print one JSON object per run instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_class(s: &str) -> Result<LinkClass, String> {
    let bad = || {
        format!("'{s}': expected UP/DOWN Mbit/s with an optional @LATENCY ms (0 to 10000), e.g. 20/50@10")
    };
    let (rates, latency) = s.split_once('@').unwrap_or((s, "0"));
    let (up, down) = rates.split_once('/').ok_or_else(bad)?;
    let num = |x: &str| {
        x.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    match (num(up), num(down), num(latency)) {
        (Some(u), Some(d), Some(l)) if u > 0.0 && d > 0.0 && l <= 10_000.0 => {
            Ok(LinkClass::mbit(u, d, l))
        }
        _ => Err(bad()),
    }
}

/// Milliseconds, 0 to one day.
fn parse_ms(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(ms) if (0.0..=86_400_000.0).contains(&ms) => Ok(Duration::from_secs_f64(ms / 1e3)),
        _ => Err(format!("'{s}': expected milliseconds from 0 to 86400000")),
    }
}

fn config(args: &Args, seed: u64) -> SimConfig {
    SimConfig {
        fetchers: args.fetchers,
        size: args.size_mib.saturating_mul(1 << 20),
        publisher: args.publisher,
        classes: args.classes.clone(),
        goodput: args.goodput,
        peers: args.peers,
        startup: args.startup_ms,
        start_spread: args.start_spread_ms,
        verify_rate: args.verify_mbs * 1e6,
        churn: args.churn,
        seed,
        models: ModelsConfig {
            chunk_size: args.chunk_kib.saturating_mul(1024),
            max_requests_per_peer: args.requests_per_peer,
            max_requests_in_flight: match args.requests_in_flight {
                0 => usize::MAX,
                n => n,
            },
            upload_queue: args.upload_queue,
            max_uploads: args.upload_slots,
            endgame_copies: args.endgame_copies,
            have_refresh: Duration::from_millis(args.have_refresh_ms),
            availability_wait: Duration::from_millis(args.availability_wait_ms),
            ..ModelsConfig::default()
        },
    }
}

/// `x` with `decimals` and a unit, or "-" where there is no figure (nobody finished).
fn figure(x: f64, decimals: usize, unit: &str) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}{unit}")
    } else {
        "-".to_string()
    }
}

fn print_row(out: &mut impl Write, seed: u64, r: &SimReport, wall: f64) -> io::Result<()> {
    let median = r.times.get(r.times.len() / 2).copied().unwrap_or(f64::NAN);
    let slowest = r.times.last().copied().unwrap_or(f64::NAN);
    writeln!(
        out,
        "{seed:>5} {:>8} {:>9} {:>9} {:>8.2}s {:>7} {:>8} {:>9.2} {:>9} {:>7.0}% {:>7.0}% {:>7} {:>6.1}% {:>7} {:>7} {:>7} {:>7}  {:>6} {wall:>7.1}s",
        r.times.len(),
        figure(median, 2, "s"),
        figure(slowest, 2, "s"),
        r.t_min,
        figure(r.median_ratio, 2, ""),
        figure(r.slowest_ratio, 2, ""),
        r.publisher_copies,
        figure(r.first_copy, 2, "s"),
        100.0 * r.publisher_utilization,
        100.0 * r.fetcher_utilization,
        r.left,
        100.0 * r.busy as f64 / r.requests.max(1) as f64,
        figure(r.spread_half, 2, "s"),
        figure(r.spread_all, 2, "s"),
        figure(r.last_chunk_half, 2, "s"),
        figure(r.download_idle, 2, "s"),
        r.unfinished,
    )
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = sim::validate(&config(&args, args.seed)) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match simulate(&args, &mut io::stdout().lock()) {
        Ok(code) => code,
        // The reader went away (`| head`): nothing more to say.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the results: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the simulations `args` asks for, one line of results each to `out`.
fn simulate(args: &Args, out: &mut impl Write) -> io::Result<ExitCode> {
    if !args.json {
        writeln!(
            out,
            "{} fetchers, {} MiB in {} KiB chunks, publisher {:.0}/{:.0} Mbit/s, {} link class(es), peers {}",
            args.fetchers,
            args.size_mib,
            args.chunk_kib,
            args.publisher.up * 8e-6,
            args.publisher.down * 8e-6,
            args.classes.len(),
            if args.peers == 0 { "all".to_string() } else { args.peers.to_string() },
        )?;
        writeln!(
            out,
            "{:>5} {:>8} {:>9} {:>9} {:>9} {:>7} {:>8} {:>9} {:>9} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}  {:>6} {:>8}",
            "seed", "finished", "median", "slowest", "T_min", "med/T", "slow/T", "pub.copies", "1st copy", "pub.use", "fet.use", "left", "busy", "half", "all", "last½", "idle", "unfin.", "wall"
        )?;
    }
    for k in 0..args.runs.max(1) {
        let seed = args.seed.wrapping_add(k);
        let started = Instant::now();
        match sim::run(&config(args, seed)) {
            Ok(report) => {
                let wall = started.elapsed().as_secs_f64();
                if report.cut_off {
                    eprintln!(
                        "note: seed {seed} stopped at the simulation's limit (50 x T_min + 600 s simulated, or 2e9 events) with {} fetcher(s) unfinished",
                        report.unfinished
                    );
                }
                if args.json {
                    match serde_json::to_string(&report) {
                        Ok(line) => writeln!(out, "{line}")?,
                        Err(e) => {
                            eprintln!("error: {e}");
                            return Ok(ExitCode::FAILURE);
                        }
                    }
                } else {
                    print_row(out, seed, &report, wall)?;
                }
                out.flush()?;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
