//! Structured logging on stderr: `RUST_LOG` sets levels, `--log-format` the line format.

use std::io::IsTerminal;

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
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
