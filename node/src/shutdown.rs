//! The process's stop request: SIGINT (Ctrl-C) or SIGTERM.
//!
//! The handlers are installed once, before the node starts, so a signal that arrives right
//! after the banner (a service manager stopping a node that just came up, a test that sends
//! SIGTERM as soon as it read the join address) is caught and leads to a graceful stop, never
//! to the default action that kills the process mid-write. Tokio keeps a handler installed for
//! the life of the process, and a signal that arrives while nobody waits is remembered until
//! the next [`ShutdownSignal::recv`].

use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGINT and SIGTERM, caught from [`ShutdownSignal::install`] on.
pub struct ShutdownSignal {
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
}

impl ShutdownSignal {
    /// Installs the handlers. Must be called inside the Tokio runtime. A handler that cannot
    /// be installed is logged and that signal keeps its default action.
    pub fn install() -> Self {
        let install = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(signal = name, error = %e, "cannot install the signal handler");
                None
            }
        };
        Self {
            interrupt: install(SignalKind::interrupt(), "SIGINT"),
            terminate: install(SignalKind::terminate(), "SIGTERM"),
        }
    }

    /// Resolves at the next SIGINT or SIGTERM (at once if one arrived since the last call).
    pub async fn recv(&mut self) {
        async fn next(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = next(&mut self.interrupt) => {}
            () = next(&mut self.terminate) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A SIGTERM sent before anyone waits is neither fatal nor lost: the next `recv` returns.
    #[tokio::test]
    async fn a_signal_before_recv_is_remembered() {
        let mut shutdown = ShutdownSignal::install();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(10), shutdown.recv())
            .await
            .expect("the SIGTERM sent before recv is delivered");
    }
}
