//! Asking the network until it answers: the one waiting loop behind `fetch MODEL`, finding a
//! training run, finding a run's newest version and waiting for a run's peers.
//!
//! It awaits events rather than polling: it asks once peers are connected, asks again each
//! time the node's [`Connectivity`] changes (a peer came or left, a dial failed), and between
//! changes at most every `retry` (peers learn of new versions and runs from gossip). It ends
//! at once when every way to join the network has failed, unless told to wait for peers to
//! come to this node (a run's creator waiting for its first peers).

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Result};
use tokio::time::Instant;

use super::client::{Client, Connectivity};

/// How a lookup ended.
#[derive(Debug)]
pub enum Lookup<T> {
    /// The answer.
    Found(T),
    /// Every way to join failed: why.
    Unreachable(String),
    /// The deadline passed without an answer.
    TimedOut {
        /// The most peers connected at once meanwhile.
        most_connected: usize,
        /// The connectivity at the end.
        last: Connectivity,
    },
}

/// What to do when every way to join has failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfUnreachable {
    /// End with [`Lookup::Unreachable`].
    GiveUp,
    /// Wait on: peers may dial this node.
    Wait,
}

/// Calls `ask` until it returns `Some`, as described in the module docs, or until `deadline`.
/// Errors only when `ask` does or the node stops.
pub async fn ask_until<T, Fut>(
    client: &Client,
    deadline: Instant,
    retry: Duration,
    if_unreachable: IfUnreachable,
    mut ask: impl FnMut() -> Fut,
) -> Result<Lookup<T>>
where
    Fut: Future<Output = Result<Option<T>>>,
{
    let mut connectivity = client.connectivity();
    let mut most_connected = 0;
    loop {
        let now = connectivity.borrow_and_update().clone();
        if let Some(why) = now
            .failure()
            .filter(|_| if_unreachable == IfUnreachable::GiveUp)
        {
            return Ok(Lookup::Unreachable(why));
        }
        most_connected = most_connected.max(now.connected_peers);
        if now.connected_peers > 0 {
            if let Some(found) = ask().await? {
                return Ok(Lookup::Found(found));
            }
        }
        if Instant::now() >= deadline {
            return Ok(Lookup::TimedOut {
                most_connected,
                last: now,
            });
        }
        let next_try = if now.connected_peers > 0 {
            (Instant::now() + retry).min(deadline)
        } else {
            deadline
        };
        tokio::select! {
            changed = connectivity.changed() => {
                changed.map_err(|_| anyhow!("the node has stopped"))?;
            }
            () = tokio::time::sleep_until(next_try) => {}
        }
    }
}
