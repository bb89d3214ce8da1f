//! mDNS discovery with no bootstrap at all, between two hosts that are network namespaces this
//! test creates and joins with a veth pair. Multicast never reaches the machine's real
//! interfaces. Where namespaces cannot be created (not root, no `ip`), the test says so and
//! skips.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::netns::TwoHosts;
use common::process::{Running, Stream};

#[test]
fn two_nodes_without_bootstrap_find_each_other_by_mdns() {
    let hosts = match TwoHosts::create() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("SKIPPED two_nodes_without_bootstrap_find_each_other_by_mdns: cannot create network namespaces ({e}); run as root with iproute2");
            return;
        }
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = hosts.node(0, dir_a.path(), &[]);
    let mut b = hosts.node(1, dir_b.path(), &[]);
    let timeout = Duration::from_secs(60);
    let id_of = |n: &mut Running| {
        n.wait_line(Stream::Stdout, timeout, |l| l.starts_with("peer id: "))[9..].to_string()
    };
    let (id_a, id_b) = (id_of(&mut a), id_of(&mut b));

    for (node, other) in [(&mut a, &id_b), (&mut b, &id_a)] {
        node.wait_line(Stream::Stderr, timeout, |l| {
            l.contains("peer discovered via mDNS") && l.contains(other.as_str())
        });
        node.wait_line(Stream::Stderr, timeout, |l| {
            l.contains(&format!("connected peer={other}"))
        });
    }
    let (code_a, _) = a.terminate(timeout);
    let (code_b, _) = b.terminate(timeout);
    assert_eq!((code_a, code_b), (0, 0));
    // Each saved the other, found by mDNS, in its peer cache.
    let cache = std::fs::read_to_string(dir_a.path().join("peers.json")).unwrap();
    assert!(
        cache.contains(&id_b) && cache.contains(&hosts.addrs[1]),
        "{cache}"
    );
}

/// Two nodes that dial each other at the same instant connect on those first dials. Both
/// hosts drop their outgoing TCP SYNs until each node has found the other by mDNS (and so
/// dialled it); the retransmitted SYNs then cross. Were both dials to come from the nodes'
/// listen ports, TCP would make one connection on which both ends act as dialer (a TCP
/// simultaneous open) and Noise would fail on both: CI once saw two nodes started together
/// fail that way at every redial for a minute.
#[test]
fn two_nodes_that_dial_each_other_at_the_same_instant_connect_at_once() {
    let hosts = match TwoHosts::create() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("SKIPPED two_nodes_that_dial_each_other_at_the_same_instant_connect_at_once: cannot create network namespaces ({e}); run as root with iproute2");
            return;
        }
    };
    let drop_syns = [
        "iptables", "-A", "OUTPUT", "-p", "tcp", "--syn", "-j", "DROP",
    ];
    if let Err(e) = hosts.exec(0, &drop_syns).and(hosts.exec(1, &drop_syns)) {
        eprintln!("SKIPPED two_nodes_that_dial_each_other_at_the_same_instant_connect_at_once: cannot filter packets in the namespaces ({e}); needs iptables");
        return;
    }
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = hosts.node(0, dir_a.path(), &[]);
    let mut b = hosts.node(1, dir_b.path(), &[]);
    let timeout = Duration::from_secs(60);
    let id_of = |n: &mut Running| {
        n.wait_line(Stream::Stdout, timeout, |l| l.starts_with("peer id: "))[9..].to_string()
    };
    let (id_a, id_b) = (id_of(&mut a), id_of(&mut b));
    for (node, other) in [(&mut a, &id_b), (&mut b, &id_a)] {
        node.wait_line(Stream::Stderr, timeout, |l| {
            l.contains("peer discovered via mDNS") && l.contains(other.as_str())
        });
    }
    for host in 0..2 {
        hosts.exec(host, &["iptables", "-F", "OUTPUT"]).unwrap();
    }

    for (node, other) in [(&mut a, &id_b), (&mut b, &id_a)] {
        node.wait_line(Stream::Stderr, timeout, |l| {
            l.contains(&format!("connected peer={other}"))
        });
        let failed: Vec<&String> = node
            .seen
            .iter()
            .map(|(_, l)| l)
            .filter(|l| l.contains("dial failed"))
            .collect();
        assert!(failed.is_empty(), "dials failed: {failed:#?}");
    }
    let (code_a, _) = a.terminate(timeout);
    let (code_b, _) = b.terminate(timeout);
    assert_eq!((code_a, code_b), (0, 0));
}
