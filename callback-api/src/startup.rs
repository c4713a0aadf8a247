//! Building the application from its configuration, and running it until a shutdown signal.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use futures::FutureExt;
use nubabel_contract::{
    signing::{Acceptance, MasterKey, Versions},
    stream_token::StreamTokenKey,
};
use nubabel_store::{
    connections,
    db::{self, PoolSettings},
    streams::{RedisSettings, RedisStore},
    vault::Keyring,
};
use secrecy::ExposeSecret;
use sqlx::postgres::PgConnectOptions;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    committer::{CommitSettings, Committer},
    config::Config,
    credentials::Broker,
    egress::{Allowlist, Egress},
    fanout::Fanout,
    limits::TenantLimits,
    mcp::{Gateway, GatewaySettings},
    metrics::Metrics,
    mirror::{KubeStatusWriter, StatusMirror},
    retention, routes,
    slack::{SlackBot, SlackSettings, notifier::Notifier},
    state::{AppState, Keys, KubeClient, Settings},
};

/// Plain requests taking longer than this are answered 408 (SSE streams are long-lived
/// responses, so the limit applies to producing their head only; a waiting
/// `POST /api/delegate` has its own bound, `--delegate-max-wait-seconds`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A built application, bound to its port and ready to serve.
pub struct Application {
    listener: TcpListener,
    admin_listener: TcpListener,
    port: u16,
    state: AppState,
    header_read_timeout: Duration,
    reencryption: Option<JoinHandle<()>>,
    retention: JoinHandle<()>,
}

impl Application {
    /// Connects to Postgres and Redis, applies migrations and binds the port (port 0 picks a
    /// free one; see [`Application::port`]).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let keys = Keys {
            master: MasterKey::new(config.signing_master_key.expose_secret().as_bytes())?,
            stream_token: StreamTokenKey::new(config.stream_token_key.expose_secret().as_bytes())?,
            admin_token: config.admin_token()?,
        };
        let keyring = config
            .vault_keys
            .as_ref()
            .map(|keys| Keyring::parse(keys.expose_secret()))
            .transpose()?
            .map(Arc::new);
        let egress = Egress::new(Allowlist::parse(&config.egress_allow)?)?;
        let options: PgConnectOptions = config
            .database_url
            .expose_secret()
            .parse()
            .context("parsing the database URL")?;
        let db = db::connect_lazy(
            options,
            &PoolSettings {
                max_connections: config.database_max_connections,
                ..PoolSettings::default()
            },
        );
        db::migrate(&db)
            .await
            .context("applying database migrations")?;
        let redis = RedisStore::new(
            config.redis_url.expose_secret(),
            RedisSettings {
                stream_max_len: config.stream_max_len,
                stream_max_bytes: config.stream_max_bytes,
                ..RedisSettings::default()
            },
        )
        .context("configuring redis")?;
        let metrics = Arc::new(Metrics::new());
        let slack = SlackBot::from_settings(&slack_settings(&config))?.map(Arc::new);
        let kube = if config.status_mirror || config.delegate_api || slack.is_some() {
            Some(kube::Client::try_default().await.context(
                "connecting to Kubernetes for the status mirror, the delegate API and the Slack bot \
                 (turn them off with --status-mirror=false --delegate-api=false and no Slack settings)",
            )?)
        } else {
            None
        };
        let mirror = match (&kube, config.status_mirror) {
            (Some(client), true) => Some(StatusMirror::start(
                db.clone(),
                KubeStatusWriter::new(client.clone()),
                Arc::clone(&metrics),
                config.status_mirror_interval(),
            )),
            _ => None,
        };
        let reencryption = keyring
            .as_ref()
            .map(|keyring| reencrypt_in_background(db.clone(), Arc::clone(keyring)));
        let (db_for_retention, metrics_for_retention) = (db.clone(), Arc::clone(&metrics));
        let state = AppState {
            credentials: Arc::new(Broker::new(
                db.clone(),
                keyring,
                egress.clone(),
                Duration::from_secs(config.oauth_refresh_skew_seconds),
            )),
            egress,
            mcp: Arc::new(Gateway::new(gateway_settings(&config))),
            limits: tenant_limits(&config, &metrics),
            committer: Committer::start(db.clone(), commit_settings(&config), Arc::clone(&metrics)),
            fanout: Fanout::start(db.clone(), redis.clone(), Arc::clone(&metrics)),
            db,
            redis,
            keys: Arc::new(keys),
            settings: Arc::new(Settings {
                max_body_bytes: config.max_body_bytes,
                signatures: Acceptance {
                    tolerance_seconds: config.signature_tolerance_seconds,
                    versions: if config.accept_body_only_signatures {
                        Versions::AllowBodyOnly
                    } else {
                        Versions::RequestBoundOnly
                    },
                },
                sse_keep_alive: config.sse_keep_alive(),
                stream_revocation_check: config.stream_revocation_check(),
                delegate_max_wait: Duration::from_secs(config.delegate_max_wait_seconds),
            }),
            mirror,
            metrics,
            sessions: Arc::default(),
            kube: if config.delegate_api || slack.is_some() {
                kube.map(KubeClient)
            } else {
                None
            },
            slack,
        };
        let listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding {}", config.http_addr))?;
        let port = listener.local_addr()?.port();
        let admin_listener = TcpListener::bind(config.admin_http_addr)
            .await
            .with_context(|| format!("binding the admin address {}", config.admin_http_addr))?;
        Ok(Self {
            listener,
            admin_listener,
            port,
            state,
            header_read_timeout: Duration::from_secs(config.header_read_timeout_seconds),
            retention: retention::start(
                db_for_retention,
                retention::policy(&config),
                Duration::from_secs(config.retention_interval_seconds),
                metrics_for_retention,
            ),
            reencryption,
        })
    }

    /// The startup re-encryption of connections sealed under older vault keys (present when a
    /// vault is configured). It runs whether or not anyone awaits it; awaiting it tells when
    /// the rows that were stale at startup are done.
    pub fn take_reencryption(&mut self) -> Option<JoinHandle<()>> {
        self.reencryption.take()
    }

    /// The port the application listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the application listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address the admin API listens on.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin_listener.local_addr()
    }

    /// The shared state (tests use its pool and stores).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // The Slack notifier runs while the application serves.
        let background = match (&self.state.slack, &self.state.kube) {
            (Some(bot), Some(client)) => Notifier::new(
                Arc::clone(bot),
                self.state.db.clone(),
                Arc::clone(&self.state.metrics),
                &client.0,
            )
            .start(&client.0),
            _ => Vec::new(),
        };
        let admin = routes::admin_router(self.state.clone(), REQUEST_TIMEOUT);
        let app = routes::router(self.state, REQUEST_TIMEOUT);
        let shutdown = shutdown.shared();
        let served = tokio::try_join!(
            serve(
                self.listener,
                app,
                self.header_read_timeout,
                shutdown.clone()
            ),
            serve(
                self.admin_listener,
                admin,
                self.header_read_timeout,
                shutdown
            ),
        )
        .map(|((), ())| ());
        for task in background {
            task.abort();
        }
        self.retention.abort();
        served
    }

    /// Serves until SIGTERM or Ctrl-C.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }
}

/// The Slack bot's settings.
fn slack_settings(config: &Config) -> SlackSettings {
    SlackSettings {
        bot_token: config.slack_bot_token.clone(),
        signing_secret: config.slack_signing_secret.clone(),
        api_url: config.slack_api_url.clone(),
        teams: config.slack_teams.clone(),
        progress_interval: Duration::from_millis(config.slack_progress_interval_ms),
        final_sweep_interval: Duration::from_secs(config.slack_final_sweep_seconds),
    }
}

/// The MCP gateway's limits.
fn gateway_settings(config: &Config) -> GatewaySettings {
    GatewaySettings {
        call_timeout: Duration::from_millis(config.mcp_call_timeout_ms),
        tenant_concurrency: usize::try_from(config.mcp_tenant_concurrency).unwrap_or(usize::MAX),
        queue_timeout: Duration::from_millis(config.mcp_queue_timeout_ms),
        tools_cache_ttl: Duration::from_secs(config.mcp_tools_cache_seconds),
    }
}

/// The per-tenant limits, counting refusals in `metrics`.
fn tenant_limits(config: &Config, metrics: &Metrics) -> TenantLimits {
    TenantLimits::new(
        usize::try_from(config.callback_tenant_concurrency).unwrap_or(usize::MAX),
        usize::try_from(config.sse_tenant_streams).unwrap_or(usize::MAX),
        usize::try_from(config.sse_tenant_replays).unwrap_or(usize::MAX),
        usize::try_from(config.delegate_tenant_waits).unwrap_or(usize::MAX),
        &metrics.tenant_limited,
    )
}

/// How callbacks are batched into commits.
fn commit_settings(config: &Config) -> CommitSettings {
    CommitSettings {
        max_batch: usize::try_from(config.commit_max_batch).unwrap_or(64),
        concurrency: usize::try_from(config.commit_concurrency).unwrap_or(4),
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown` completes, then waits for open connections to
/// finish. A client that has not sent a request's whole head within `header_read_timeout` is
/// disconnected, so connections trickling headers (slowloris) cannot pile up; bodies are bounded
/// by the request timeout of the router.
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors or a connection reset before it was accepted: the
                // listener itself is fine.
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

/// Re-encrypts connections sealed under older vault keys, so the old keys can be dropped
/// after a rotation. Replicas starting together do not collide: rows are taken with
/// `for update skip locked`.
fn reencrypt_in_background(db: sqlx::PgPool, keyring: Arc<Keyring>) -> JoinHandle<()> {
    tokio::spawn(async move {
        match connections::reencrypt_stale(&db, &keyring).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(
                count,
                key_id = keyring.current_key_id(),
                "re-encrypted connections under the current vault key"
            ),
            Err(error) => tracing::error!(%error, "re-encrypting connections failed"),
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
