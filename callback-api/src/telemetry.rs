//! Logging setup, once per process: `RUST_LOG` filters, JSON in clusters, compact text locally.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global tracing subscriber; later calls (tests) leave the first one in place.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,nubabel_callback_api=debug,nubabel_store=debug"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => registry.with(fmt::layer().json()).try_init(),
        LogFormat::Text => registry.with(fmt::layer().compact()).try_init(),
    };
}
