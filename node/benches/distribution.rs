//! Distribution benchmarks; figures, not pass/fail. Run with `scripts/bench-distribution`
//! (or `cargo bench -p p2p-node --bench distribution`).
//!
//! 1. Loopback throughput of one fetch from one peer, against a minimal libp2p
//!    request-response transfer of 1 MiB messages over the same transport (TCP, noise, yamux),
//!    the same pipelining depth and the same CBOR codec, measured in the same run; and against
//!    the same minimal transfer that also writes each message into a file, since a fetch
//!    must store what it receives (on VMs that return free memory to the host, every new
//!    page-cache page costs a host fault, which the pure transfer never pays). The fetch
//!    runs in 1 MiB chunks (the default) and in 256 KiB chunks.
//! 2. The whole `p2p-node fetch --out` process (start, join, resolve, download, write the file,
//!    exit) pulling 1 GiB from one publisher on loopback, against the minimal request-response
//!    transfer of the same 1 GiB measured in the same run, with and without writing it to disk,
//!    and the time to write 1 GiB into a new file after the same warm-up (whether it worked)
//!    (`-- whole`).
//! 3. Eight local nodes receiving one 64 MiB version from one publisher: time until the last
//!    node holds it, and how many copies the publisher uploaded.

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, StreamProtocol, Swarm};
use p2p_node::models::ModelsConfig;
use p2p_protocol::codec::CborCodec;
use p2p_protocol::manifest::VersionId;
use serde_bytes::ByteBuf;

const MIB: usize = 1 << 20;

type RawBehaviour = request_response::Behaviour<CborCodec<u32, ByteBuf>>;

fn raw_swarm() -> Swarm<RawBehaviour> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                CborCodec::new(64, 2 * MIB as u64),
                [(StreamProtocol::new("/bench/raw/1"), ProtocolSupport::Full)],
                request_response::Config::default(),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// MiB/s of `total_mib` 1 MiB responses with `depth` requests in flight; with `to_disk`, each
/// response is also written at its offset into a new file by a writer thread.
async fn raw_throughput(total_mib: u32, depth: u32, to_disk: bool) -> f64 {
    let mut server = raw_swarm();
    server
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let addr: Multiaddr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
            break address;
        }
    };
    let server_id = *server.local_peer_id();
    let payload = ByteBuf::from(common::pseudo_random(MIB, 5));
    tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            }) = server.select_next_some().await
            {
                let _ = server
                    .behaviour_mut()
                    .send_response(channel, payload.clone());
            }
        }
    });
    let mut client = raw_swarm();
    client
        .dial(addr.with(libp2p::multiaddr::Protocol::P2p(server_id)))
        .unwrap();
    loop {
        if let SwarmEvent::ConnectionEstablished { .. } = client.select_next_some().await {
            break;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (writes, queue) = std::sync::mpsc::channel::<(u64, ByteBuf)>();
    let file = std::fs::File::create(dir.path().join("data")).unwrap();
    let writer = std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        for (offset, bytes) in queue {
            file.write_all_at(&bytes, offset).unwrap();
        }
    });
    let started = Instant::now();
    let (mut sent, mut received) = (0, 0);
    while sent < depth.min(total_mib) {
        client.behaviour_mut().send_request(&server_id, sent);
        sent += 1;
    }
    while received < total_mib {
        if let SwarmEvent::Behaviour(request_response::Event::Message {
            message: request_response::Message::Response { response, .. },
            ..
        }) = client.select_next_some().await
        {
            if to_disk {
                writes
                    .send((u64::from(received) * MIB as u64, response))
                    .unwrap();
            }
            received += 1;
            if sent < total_mib {
                client.behaviour_mut().send_request(&server_id, sent);
                sent += 1;
            }
        }
    }
    drop(writes);
    writer.join().unwrap();
    f64::from(total_mib) / started.elapsed().as_secs_f64()
}

/// Touches, then frees, `mib` MiB of memory (at most half of what the system has available),
/// so that the next transfer's new page-cache pages are ones the host backs already. On VMs
/// that return free memory to the host (virtio balloon free page reporting), a page the guest
/// has not used for a while costs a host fault on first touch: on the development VM, writing
/// 1 GiB into new page-cache pages took 1.7-2.7 s of CPU instead of 0.1-0.3 s. A fetch's setup
/// (the publisher's file and store copy, the expected bytes) uses up the recently freed pages,
/// so without this its download, and not the raw transfer's, would pay that cost (ours: 274-302
/// MiB/s without, 321-357 with, in one session). Bare-metal hosts have no such cost. Without
/// `/proc/meminfo` nothing is touched.
fn back_free_memory(mib: usize) {
    let available_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(0, |kib| kib / 1024);
    let touched = vec![1u8; mib.min(available_mib / 2) * MIB];
    std::hint::black_box(&touched);
}

/// Seconds to write `mib` MiB in 1 MiB pieces into a new file, without syncing. Measured right
/// after [`back_free_memory`], it shows whether the warm-up worked: 0.2-0.3 s per GiB on the
/// development VM when it did, 1.7-2.7 s when the pages were new to the host.
fn new_file_write_seconds(mib: usize) -> f64 {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("data")).unwrap();
    let piece = common::pseudo_random(MIB, 7);
    let started = Instant::now();
    for i in 0..mib {
        file.write_all_at(&piece, (i * MIB) as u64).unwrap();
    }
    started.elapsed().as_secs_f64()
}

/// A publisher holding a fresh `mib` MiB version (from `seed`) in chunks of `chunk` bytes
/// (`None`: the default): the temp dir holding its file, the file's bytes, the
/// node and the version's id.
async fn publisher_of(
    mib: usize,
    seed: u64,
    chunk: Option<u32>,
) -> (tempfile::TempDir, Vec<u8>, common::TestNode, VersionId) {
    let files = tempfile::tempdir().unwrap();
    let (path, bytes) = common::model_file(files.path(), "m.safetensors", mib, seed);
    let publisher = common::start_node_with(vec![], |c| {
        if let Some(chunk) = chunk {
            c.models.chunk_size = chunk;
        }
    })
    .await;
    let id = publisher
        .handle
        .client
        .publish(&path, "bench")
        .await
        .unwrap()
        .id;
    (files, bytes, publisher, id)
}

/// MiB/s of one node fetching a `mib` MiB version in chunks of `chunk` bytes (`None`: the
/// default) from one publisher.
async fn single_fetch_throughput(mib: usize, chunk: Option<u32>) -> f64 {
    let (_files, bytes, publisher, id) = publisher_of(mib, 1, chunk).await;
    let fetcher = common::start_node(vec![publisher.bootstrap_addr()]).await;
    common::wait_fully_discovered("2 nodes", &[&publisher, &fetcher]).await;
    let started = Instant::now();
    fetcher.handle.client.fetch(id).await.unwrap();
    bytes.len() as f64 / MIB as f64 / started.elapsed().as_secs_f64()
}

/// MiB/s of a whole `p2p-node fetch <id> --out <file>` process pulling a `mib` MiB version
/// from one publisher, timed from the process's start to its exit; the file is checked.
async fn whole_process_fetch(mib: usize) -> f64 {
    let (files, bytes, publisher, id) = publisher_of(mib, 3, None).await;
    back_free_memory(4 * mib);
    let data = tempfile::tempdir().unwrap();
    let out = files.path().join("out.safetensors");
    let started = Instant::now();
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_p2p-node"))
        .arg("fetch")
        .arg(id.to_hex())
        .arg("--out")
        .arg(&out)
        .arg("--bootstrap")
        .arg(publisher.bootstrap_addr().to_string())
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--no-progress",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(status.success(), "p2p-node fetch failed: {status}");
    assert!(
        std::fs::read(&out).unwrap() == bytes,
        "the fetched file differs"
    );
    bytes.len() as f64 / MIB as f64 / seconds
}

/// Seconds until 7 fetchers hold a `mib` MiB version, and the publisher's upload in copies.
async fn swarm_of_eight(mib: usize) -> (f64, f64) {
    let (_files, bytes, publisher, id) = publisher_of(mib, 2, None).await;
    let mut fetchers = Vec::new();
    for _ in 0..7 {
        fetchers.push(common::start_node(vec![publisher.bootstrap_addr()]).await);
    }
    let mut all: Vec<&common::TestNode> = fetchers.iter().collect();
    all.push(&publisher);
    common::wait_fully_discovered("8 nodes", &all).await;
    let started = Instant::now();
    futures::future::join_all(fetchers.iter().map(|n| n.handle.client.fetch(id))).await;
    let seconds = started.elapsed().as_secs_f64();
    let hex = id.to_hex();
    let uploaded = publisher
        .handle
        .client
        .models()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.id == hex)
        .unwrap()
        .bytes_uploaded;
    (seconds, uploaded as f64 / bytes.len() as f64)
}

fn main() {
    // `-- single`, `-- whole` or `-- swarm` runs one case only.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |case: &str| only.is_empty() || only.iter().any(|o| o == case);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        if wants("single") {
            let depth = ModelsConfig::default().max_requests_per_peer as u32;
            let mib = 256;
            // Warm up every path once, then alternate.
            let _ = raw_throughput(32, depth, false).await;
            let _ = single_fetch_throughput(32, None).await;
            let (mut raw, mut raw_disk) = (Vec::new(), Vec::new());
            let (mut ours, mut ours_small) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                raw.push(raw_throughput(mib as u32, depth, false).await);
                raw_disk.push(raw_throughput(mib as u32, depth, true).await);
                ours.push(single_fetch_throughput(mib, None).await);
                ours_small.push(single_fetch_throughput(mib, Some(256 << 10)).await);
            }
            let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
            println!(
                "single fetch, loopback, {mib} MiB, depth {depth}: p2p-node {:.0} MiB/s in 1 MiB chunks (default), {:.0} MiB/s in 256 KiB chunks; raw request-response (1 MiB messages) {:.0} MiB/s (ratios {:.2} and {:.2}); raw request-response writing to disk {:.0} MiB/s (ratios {:.2} and {:.2}); runs: ours {ours:.0?}, ours in 256 KiB {ours_small:.0?}, raw {raw:.0?}, raw+disk {raw_disk:.0?}",
                best(&ours),
                best(&ours_small),
                best(&raw),
                best(&ours) / best(&raw),
                best(&ours_small) / best(&raw),
                best(&raw_disk),
                best(&ours) / best(&raw_disk),
                best(&ours_small) / best(&raw_disk),
            );
        }
        if wants("whole") {
            let depth = ModelsConfig::default().max_requests_per_peer as u32;
            let mib = 1024;
            let _ = raw_throughput(64, depth, false).await;
            let (mut raw, mut raw_disk, mut ours, mut page_cache) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..2 {
                raw.push(raw_throughput(mib as u32, depth, false).await);
                back_free_memory(4 * mib);
                raw_disk.push(raw_throughput(mib as u32, depth, true).await);
                ours.push(whole_process_fetch(mib).await);
                back_free_memory(4 * mib);
                page_cache.push(new_file_write_seconds(mib));
            }
            let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
            println!(
                "whole fetch process, loopback, {mib} MiB (start, join, download, --out, exit): p2p-node fetch {:.0} MiB/s; raw request-response {:.0} MiB/s (ratio {:.2}); raw request-response writing to disk {:.0} MiB/s (ratio {:.2}); writing {mib} MiB into a new file took {page_cache:.2?} s; runs: ours {ours:.0?}, raw {raw:.0?}, raw+disk {raw_disk:.0?}",
                best(&ours),
                best(&raw),
                best(&ours) / best(&raw),
                best(&raw_disk),
                best(&ours) / best(&raw_disk),
            );
        }
        if wants("swarm") {
        let (seconds, copies) = swarm_of_eight(64).await;
        println!(
            "8 nodes, 64 MiB: last node done after {seconds:.2} s; publisher uploaded {copies:.2} copies (7 fetchers)"
        );
        }
    });
}
