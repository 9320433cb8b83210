//! Logging set-up shared by the binaries.
//!
//! `LOG_FORMAT=json` writes one JSON object per line, for a cluster's log pipeline; `text` (the
//! default) writes readable lines. `RUST_LOG` filters as usual and defaults to `info`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Environment variable that selects the log format: `text` or `json`.
pub const ENV_LOG_FORMAT: &str = "LOG_FORMAT";

/// Installs the global logger. Calling it again has no effect, so tests may call it freely.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var(ENV_LOG_FORMAT).is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = if json {
        builder.json().flatten_event(true).with_current_span(false).try_init()
    } else {
        builder.with_ansi(std::io::stdout().is_terminal()).try_init()
    };
    // An error here means a logger is already installed, which is what a second call wants.
    drop(result);
}
