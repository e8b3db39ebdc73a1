//! Logging set-up shared by every binary: `tracing` to stderr, filtered by `RUST_LOG`
//! (default `info`, or the command's own default), with colours only when stderr is a terminal.

use std::io::IsTerminal;

/// Installs the global subscriber at level `info` unless `RUST_LOG` says otherwise (a second
/// call does nothing).
pub fn init() {
    init_with_default("info");
}

/// [`init`] with another default filter when `RUST_LOG` is unset (`distill demo` runs at
/// `warn`: it shows progress bars and its table instead of log lines).
pub fn init_with_default(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
