//! `nubabel-callback-api`: configuration from flags and env, then serve until SIGTERM;
//! `nubabel-callback-api token ...` manages the tenant API tokens of `/api/delegate`.

use clap::Parser;
use nubabel_callback_api::{
    config::Config,
    startup::Application,
    telemetry,
    tokens::{self, TokenCli},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The status mirror's Kubernetes client needs a rustls crypto provider, and with two
    // compiled into the workspace's builds rustls cannot choose one by itself. An error means
    // one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if std::env::args_os().nth(1).is_some_and(|arg| arg == "token") {
        let cli = TokenCli::parse_from(std::env::args_os().skip(1));
        let output = tokens::run(cli).await?;
        print!("{output}");
        return Ok(());
    }
    let config = Config::parse();
    telemetry::init(config.log_format);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), addr = %config.http_addr, "starting");
    let application = Application::build(config).await?;
    application.run_until_stopped().await?;
    tracing::info!("stopped");
    Ok(())
}
