//! The bridge: the second container of every sidecar pod. It reads the pod's own OpenCode
//! event stream (`GET /global/event` on loopback: every conversation works in a directory of
//! its own, see [`workspace`]), turns the events that matter into signed callbacks
//! to the callback API (see [`mapping`]), buffers and retries them while the API is away (see
//! [`outbox`] and [`delivery`]), serves the pod's readiness probe (see [`health`]), and
//! prepares conversations' workspaces for the operator (see [`workspace`]).
//!
//! OpenCode does not replay events, so after every (re)connection the bridge reads
//! `GET /session/status` and posts what changed while it was not listening.

pub mod config;
pub mod delivery;
pub mod health;
pub mod liveness;
pub mod mapping;
pub mod metrics;
pub mod outbox;
mod random;
pub mod retry;
pub mod telemetry;
pub mod workspace;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use nubabel_contract::workspace::is_workspace_key;
use nubabel_opencode::{Event, OpencodeClient, SessionStatus};
use tokio::net::TcpListener;

use crate::config::Settings;
use crate::delivery::CallbackSender;
use crate::health::HealthState;
use crate::liveness::Liveness;
use crate::mapping::{IdOrigin, Mapper, MapperSettings};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::retry::Backoff;
use crate::workspace::Workspaces;
use crate::workspace::routes::WorkspaceState;

/// Why the bridge could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The OpenCode client could not be built.
    #[error("configuring the OpenCode client")]
    Opencode(#[from] nubabel_opencode::Error),
    /// The HTTP client for callbacks could not be built.
    #[error("configuring the callback client")]
    Callback(#[from] reqwest::Error),
    /// The probe port could not be bound.
    #[error("binding {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Serving the probes failed.
    #[error("serving the probes")]
    Serve(#[source] std::io::Error),
}

/// A bridge bound to its probe port, ready to run.
pub struct Bridge {
    settings: Settings,
    listener: TcpListener,
    opencode: OpencodeClient,
    sender: CallbackSender,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    liveness: Arc<Liveness>,
}

impl Bridge {
    /// Builds the clients and binds the probe port (port 0 picks a free one).
    pub async fn bind(settings: Settings) -> Result<Self, BridgeError> {
        let opencode = OpencodeClient::new(settings.opencode.clone())?;
        let sender = CallbackSender::new(
            &settings.callback_url,
            settings.signing_key.clone(),
            settings.identity.clone(),
            settings.callback_timeout,
        )?;
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| BridgeError::Bind {
                    address: settings.listen,
                    source,
                })?;
        let metrics = Arc::new(Metrics::new());
        Ok(Self {
            outbox: Arc::new(Outbox::new(settings.buffer_capacity, Arc::clone(&metrics))),
            settings,
            listener,
            opencode,
            sender,
            metrics,
            liveness: Arc::new(Liveness::default()),
        })
    }

    /// The probe address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The metrics (tests read them).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Runs until `shutdown` completes, then delivers what is buffered for up to the drain
    /// timeout and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BridgeError> {
        let Self {
            settings,
            listener,
            opencode,
            sender,
            outbox,
            metrics,
            liveness,
        } = self;
        let mut probes = health::router(HealthState {
            opencode: opencode.clone(),
            sender: sender.clone(),
            liveness: Arc::clone(&liveness),
            metrics: Arc::clone(&metrics),
        });
        let workspaces_root = settings.workspaces.as_ref().map(|(root, _)| root.clone());
        let mut sweeper = None;
        if let Some((root, state)) = settings.workspaces.clone() {
            let workspaces = Arc::new(Workspaces::new(root, state));
            probes = probes.merge(workspace::routes::router(WorkspaceState {
                workspaces: Arc::clone(&workspaces),
                key: settings.signing_key.clone(),
            }));
            sweeper = Some(tokio::spawn(sweep_workspaces(
                workspaces,
                opencode.clone(),
                settings.workspace_idle_ttl,
                settings.workspace_sweep_interval,
                Arc::clone(&metrics),
            )));
        }
        let (stop_probes, probes_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, probes)
                .with_graceful_shutdown(async {
                    let _ = probes_stopped.await;
                })
                .await
        });
        let delivery = tokio::spawn(delivery::deliver(
            Arc::clone(&outbox),
            sender,
            settings.delivery_backoff,
            Arc::clone(&metrics),
            Arc::clone(&liveness),
        ));
        let mapper = Mapper::new(
            MapperSettings {
                text_interval: settings.text_interval,
                pod_name: settings.pod_name.clone(),
                pod_ip: settings.pod_ip.clone(),
            },
            IdOrigin::new(unix_millis()),
        );
        tokio::select! {
            () = follow_events(opencode, workspaces_root, mapper, Arc::clone(&outbox), Arc::clone(&metrics), liveness, settings.reconnect_backoff) => {}
            () = shutdown => {}
        }
        tracing::info!(
            buffered = outbox.len(),
            "stopping; delivering what is buffered"
        );
        if tokio::time::timeout(settings.drain_timeout, outbox.drained())
            .await
            .is_err()
        {
            tracing::warn!(lost = outbox.len(), "stopped with callbacks still buffered");
        }
        delivery.abort();
        if let Some(sweeper) = sweeper {
            sweeper.abort();
        }
        let _ = stop_probes.send(());
        match server.await {
            Ok(result) => result.map_err(BridgeError::Serve),
            // The server task never panics; a join error means it was cancelled.
            Err(_) => Ok(()),
        }
    }
}

/// Reads the event stream forever, reconnecting with backoff, and buffers the callbacks.
async fn follow_events(
    opencode: OpencodeClient,
    workspaces_root: Option<PathBuf>,
    mut mapper: Mapper,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    liveness: Arc<Liveness>,
    backoff: Backoff,
) {
    let mut pause = backoff.initial;
    let mut connected_before = false;
    loop {
        match opencode.global_events().await {
            Ok(mut events) => {
                if connected_before {
                    metrics.reconnects.inc();
                }
                connected_before = true;
                tracing::info!(
                    url = opencode.base_url(),
                    "following the OpenCode event stream"
                );
                // Subscribed first, then read the status: nothing that happens in between is
                // missed, and events already queued are applied on top of it.
                match session_statuses(&opencode, workspaces_root.as_deref()).await {
                    Ok(statuses) => {
                        for callback in mapper.resync(&statuses, unix_millis()) {
                            outbox.push(callback);
                        }
                    }
                    Err(error) => {
                        tracing::warn!("reading session status after connecting: {error}")
                    }
                }
                while let Some(item) = events.next().await {
                    match item {
                        Ok(envelope) => {
                            metrics.events.inc();
                            if envelope.event == Event::ServerConnected {
                                pause = backoff.initial;
                                liveness.following_events(true);
                            }
                            for callback in mapper.handle(&envelope, Instant::now()) {
                                outbox.push(callback);
                            }
                        }
                        Err(error) => {
                            tracing::warn!("the OpenCode event stream broke: {error}");
                            break;
                        }
                    }
                }
                liveness.following_events(false);
            }
            Err(error) => tracing::warn!("connecting to the OpenCode event stream: {error}"),
        }
        tokio::time::sleep(pause).await;
        pause = backoff.reconnect(pause, connected_before);
    }
}

/// Removes idle workspaces every `interval` and publishes how many there are and their size.
/// A workspace whose sessions OpenCode reports busy, or whose status cannot be read, stays.
async fn sweep_workspaces(
    workspaces: Arc<Workspaces>,
    opencode: OpencodeClient,
    idle_ttl: std::time::Duration,
    interval: std::time::Duration,
    metrics: Arc<Metrics>,
) {
    loop {
        let sweep = workspaces
            .sweep(idle_ttl, |directory| {
                let opencode = opencode.in_directory(directory.to_string_lossy().into_owned());
                async move {
                    opencode
                        .session_status()
                        .await
                        .map_or(true, |busy| !busy.is_empty())
                }
            })
            .await;
        metrics
            .workspaces
            .set(i64::try_from(sweep.kept).unwrap_or(i64::MAX));
        metrics
            .workspace_bytes
            .set(i64::try_from(sweep.bytes).unwrap_or(i64::MAX));
        metrics.workspaces_removed.inc_by(sweep.removed);
        tokio::time::sleep(interval).await;
    }
}

/// The busy sessions of OpenCode's default directory and of every workspace: OpenCode reports
/// status per project directory.
async fn session_statuses(
    opencode: &OpencodeClient,
    workspaces_root: Option<&Path>,
) -> Result<HashMap<String, SessionStatus>, nubabel_opencode::Error> {
    let mut statuses = opencode.session_status().await?;
    let directories = workspaces_root
        .and_then(|root| std::fs::read_dir(root).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|entry| is_workspace_key(&entry.file_name().to_string_lossy()))
        .map(|entry| entry.path().to_string_lossy().into_owned());
    for directory in directories {
        statuses.extend(opencode.in_directory(directory).session_status().await?);
    }
    Ok(statuses)
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
