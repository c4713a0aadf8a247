//! Runs the bridge until SIGTERM or Ctrl-C.

use anyhow::Context;
use clap::Parser;
use nubabel_bridge::{Bridge, config::Config, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(config.log_format);
    let settings = config.settings().context("invalid configuration")?;
    let bridge = Bridge::bind(settings).await?;
    tracing::info!(address = %bridge.local_addr()?, "serving /healthz, /readyz and /metrics");
    bridge.run(shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
}
