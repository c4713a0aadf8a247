//! The Nubabel operator: reconciles `OpencodeSidecar` fleets and `DelegatedTask` prompts.

pub mod config;
pub mod health;
pub mod telemetry;

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use tokio::net::TcpListener;

pub use config::Config;
use health::Readiness;

/// Names of the CRDs the operator needs on the API server.
pub const REQUIRED_CRDS: [&str; 2] = ["opencodesidecars.nubabel.io", "delegatedtasks.nubabel.io"];

/// Runs the operator until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("failed to build a Kubernetes client")?;
    let readiness = Readiness::default();

    let listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("failed to bind {}", config.http_addr))?;
    tracing::info!(addr = %config.http_addr, version = env!("CARGO_PKG_VERSION"), "operator starting");
    let server = axum::serve(listener, health::router(readiness.clone()))
        .with_graceful_shutdown(shutdown_signal());

    let crds_ready = wait_for_crds(client, readiness);
    tokio::select! {
        served = server => served.context("health server failed")?,
        checked = crds_ready => checked?,
    }
    Ok(())
}

/// Marks the operator ready once every required CRD is established, then waits for shutdown.
async fn wait_for_crds(client: Client, readiness: Readiness) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for name in REQUIRED_CRDS {
        let established = kube::runtime::wait::conditions::is_crd_established();
        kube::runtime::wait::await_condition(crds.clone(), name, established)
            .await
            .with_context(|| format!("failed to watch CRD {name}"))?;
        tracing::info!(crd = name, "CRD established");
    }
    readiness.set(true);
    shutdown_signal().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "failed to listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "failed to listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
