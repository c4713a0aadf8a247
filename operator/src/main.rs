//! The operator binary: parses its config, sets up telemetry and runs until a signal.

use clap::Parser;
use nubabel_operator::{Config, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(&config.log_format);
    nubabel_operator::run(config).await
}
