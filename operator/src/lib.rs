//! The Nubabel operator: reconciles `OpencodeSidecar` fleets and `DelegatedTask` prompts.
//!
//! [`run`] is the whole process: the health and metrics server, the wait for the CRDs, leader
//! election, and the controllers, all stopped together by SIGINT or SIGTERM. [`run_with`]
//! takes the client and the stop signal from the caller, so tests run operators in-process.

pub mod config;
pub mod controller;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod quantity;
pub mod telemetry;

#[cfg(test)]
mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use secrecy::ExposeSecret as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
use controller::{Capabilities, Shared, sidecar};
use health::Readiness;
use leader::LeaderElector;
use metrics::Metrics;

/// Names of the CRDs the operator needs on the API server.
pub const REQUIRED_CRDS: [&str; 2] = ["opencodesidecars.nubabel.io", "delegatedtasks.nubabel.io"];

/// How long in-flight reconciles may take to finish once the operator stops leading.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the operator until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("failed to build a Kubernetes client")?;
    run_with(config, client, shutdown_signal()).await
}

/// Runs the operator on `client` until `shutdown` resolves. Fails when the configuration is
/// unusable, when the health port cannot be bound, or when leadership is lost (the process
/// should then exit and come back as a standby, as client-go's controllers do).
pub async fn run_with(
    config: Config,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let settings = sidecar::Settings::from_config(&config).context("invalid configuration")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = Stopped(stop_rx);

    let readiness = Readiness::default();
    let metrics = Arc::new(Metrics::default());
    let listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("failed to bind {}", config.http_addr))?;
    tracing::info!(
        addr = %listener.local_addr().unwrap_or(config.http_addr),
        version = env!("CARGO_PKG_VERSION"),
        identity = %config.identity(),
        "operator starting"
    );
    let app = health::router(readiness.clone()).merge(metrics::router(metrics.clone()));
    let server_stopped = stopped.clone();
    let server = async {
        axum::serve(listener, app)
            .with_graceful_shutdown(server_stopped.wait())
            .await
            .context("health server failed")
    };
    let operator = operate(config, client, settings, readiness, metrics, stopped);
    tokio::try_join!(server, operator)?;
    Ok(())
}

/// Resolves once the operator is asked to stop; cheap to clone.
#[derive(Clone)]
struct Stopped(watch::Receiver<bool>);

impl Stopped {
    async fn wait(mut self) {
        // An error means the sender is gone, which only happens once it sent.
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }
}

async fn operate(
    config: Config,
    client: Client,
    settings: sidecar::Settings,
    readiness: Readiness,
    metrics: Arc<Metrics>,
    stopped: Stopped,
) -> anyhow::Result<()> {
    let bridges = controller::task::workspace::Bridges::new(settings.master_key.clone())
        .context("building the HTTP client of the sidecars' bridges")?;
    tokio::select! {
        crds = wait_for_crds(&client) => crds?,
        () = stopped.clone().wait() => return Ok(()),
    }
    let capabilities = Capabilities::discover(&client)
        .await
        .context("failed to discover the API server's capabilities")?;
    tracing::info!(?capabilities, "API server capabilities");
    readiness.set(true);

    let identity = config.identity();
    let shared = Shared::new(client.clone(), &identity, metrics.clone(), capabilities)
        .watching(config.watch_namespace.clone());
    let concurrency = config.reconcile_concurrency;
    let database = match &config.database_url {
        Some(url) => {
            let options: sqlx::postgres::PgConnectOptions = url
                .expose_secret()
                .parse()
                .context("NUBABEL_DATABASE_URL is not a valid Postgres URL")?;
            let settings = nubabel_store::db::PoolSettings {
                max_connections: config.database_max_connections,
                ..nubabel_store::db::PoolSettings::default()
            };
            Some(nubabel_store::db::connect_lazy(options, &settings))
        }
        None => None,
    };
    if !config.leader_elect {
        metrics.leader.set(1);
        controller::run(
            shared,
            settings,
            database,
            bridges,
            concurrency,
            stopped.wait(),
        )
        .await;
        return Ok(());
    }

    let lease_namespace = config
        .lease_namespace
        .clone()
        .unwrap_or_else(|| config.operator_namespace.clone());
    let mut elector = LeaderElector::new(
        client,
        &lease_namespace,
        &config.lease_name,
        &identity,
        config.lease_timings(),
    )?;
    tokio::select! {
        () = elector.acquire() => {},
        () = stopped.clone().wait() => return Ok(()),
    }
    metrics.leader.set(1);

    let (halt_tx, halt_rx) = watch::channel(false);
    let controllers = controller::run(
        shared,
        settings,
        database,
        bridges,
        concurrency,
        Stopped(halt_rx).wait(),
    );
    tokio::pin!(controllers);
    let mut drained = false;
    let outcome = tokio::select! {
        lost = elector.hold() => Err(lost),
        () = stopped.wait() => Ok(()),
        () = &mut controllers => {
            drained = true;
            Ok(())
        }
    };
    let _ = halt_tx.send(true);
    if !drained
        && tokio::time::timeout(DRAIN_TIMEOUT, &mut controllers)
            .await
            .is_err()
    {
        tracing::warn!("reconciles still running after {DRAIN_TIMEOUT:?}; stopping anyway");
    }
    metrics.leader.set(0);
    match outcome {
        Ok(()) => {
            if let Err(error) = elector.release().await {
                tracing::warn!(%error, "failed to release the lease; a standby takes over when it expires");
            }
            Ok(())
        }
        Err(lost) => Err(anyhow::Error::new(lost).context("stopped leading")),
    }
}

/// Waits until every required CRD is established.
async fn wait_for_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in REQUIRED_CRDS {
        let established = kube::runtime::wait::conditions::is_crd_established();
        kube::runtime::wait::await_condition(crds.clone(), name, established)
            .await
            .with_context(|| format!("failed to watch CRD {name}"))?;
        tracing::info!(crd = name, "CRD established");
    }
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
