//! Operator configuration, from flags and environment variables.

use std::net::SocketAddr;

use clap::{Parser, ValueEnum};

/// How log lines are written.
#[derive(Clone, Debug, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Compact human-readable text.
    Text,
}

/// The operator's configuration.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "nubabel-operator",
    version,
    about = "Runs OpenCode sidecar fleets and delegated tasks on Kubernetes"
)]
pub struct Config {
    /// Address of the health and metrics server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(
        long,
        env = "NUBABEL_OPERATOR_HTTP_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub http_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "NUBABEL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}
