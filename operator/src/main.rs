//! The operator binary: parses its config, sets up telemetry and runs until a signal.

use clap::Parser;
use nubabel_operator::{Config, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Two rustls crypto providers are compiled in (kube's ring, reqwest's aws-lc-rs), so
    // rustls cannot choose one by itself. An error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Config::parse();
    telemetry::init(&config.log_format);
    nubabel_operator::run(config).await
}
