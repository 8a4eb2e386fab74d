//! Tracing set up once. `RUST_LOG` filters (default `info`); output goes to stderr.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber. Safe to call more than once (later calls are no-ops),
/// which lets every test ask for logs with `TEST_LOG=1`.
pub fn init() {
    init_with("text");
}

/// Installs the global subscriber writing `text` or `json` lines.
pub fn init_with(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).try_init()
    };
}
