//! Structured logging on stderr: `RUST_LOG` sets levels, `--log-format` the line format.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::ProgressBar;

use tracing_subscriber::EnvFilter;

/// Log line format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The names `FromStr` accepts.
    pub const NAMES: [&'static str; 2] = ["text", "json"];
}

impl std::str::FromStr for LogFormat {
    type Err = crate::names::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::names::parse("log format", &Self::NAMES, &[Self::Text, Self::Json], s)
    }
}

/// Used when `RUST_LOG` is unset: our crates at info, libp2p's internals at warn. Kademlia is
/// at error: it warns on every periodic bootstrap of a lone first node, which is normal.
pub const DEFAULT_FILTER: &str =
    "warn,libp2p_kad=error,p2p_node=info,p2p_protocol=info,p2p_models=info";

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| AboveTheBar)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The progress bar drawn on the terminal now, if any: log lines go above it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Makes log lines go above `bar` (hidden while a line is written, then drawn again) until
/// it is cleared with `None`.
pub fn show_bar(bar: Option<ProgressBar>) {
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

/// Stderr, with the progress bar (if any) out of the way of each log line.
struct AboveTheBar;

impl Write for AboveTheBar {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
