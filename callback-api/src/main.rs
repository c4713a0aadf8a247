//! `nubabel-callback-api`: configuration from flags and env, then serve until SIGTERM.

use clap::Parser;
use nubabel_callback_api::{config::Config, startup::Application, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(config.log_format);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), addr = %config.http_addr, "starting");
    let application = Application::build(config).await?;
    application.run_until_stopped().await?;
    tracing::info!("stopped");
    Ok(())
}
