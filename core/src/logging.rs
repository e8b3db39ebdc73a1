//! Logging set-up shared by every binary: `tracing` to stderr, filtered by `RUST_LOG`
//! (default `info`, or the command's own default), as human-readable text (colours only when
//! stderr is a terminal) or as one JSON object per line for log collectors
//! (`--log-format json`, or `DISTILL_LOG_FORMAT=json` for the standalone role binaries).

use std::io::IsTerminal;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (the event's
    /// message and fields) and, inside a span, `span` and `spans` with their fields.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format `{other}`: expected `text` or `json`")),
        }
    }
}

/// The environment variable that picks the format where no flag does.
pub const FORMAT_ENV: &str = "DISTILL_LOG_FORMAT";

/// Installs the global subscriber at level `info` unless `RUST_LOG` says otherwise, in the
/// format `DISTILL_LOG_FORMAT` names (text when unset or unknown). A second call does nothing.
pub fn init() {
    let format = std::env::var(FORMAT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    init_with(format, "info");
}

/// [`init`] in `format`, with `default` as the filter when `RUST_LOG` is unset (`distill demo`
/// runs at `warn`: it shows progress bars and its table instead of log lines).
pub fn init_with(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_others_are_refused() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!(" Text ".parse(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().unwrap_err().contains("yaml"));
    }
}
