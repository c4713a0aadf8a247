//! What every handler shares.

use std::{sync::Arc, time::Duration};

use axum::extract::FromRef;
use nubabel_contract::{
    signing::{Acceptance, MasterKey},
    stream_token::StreamTokenKey,
};
use nubabel_store::streams::RedisStore;
use sqlx::PgPool;

use crate::{
    committer::Committer,
    event_log::EventLog,
    fanout::Fanout,
    metrics::Metrics,
    mirror::{KubeStatusWriter, StatusMirror},
    session_cache::SessionCache,
};

/// Key material, never logged.
#[derive(Debug)]
pub struct Keys {
    /// Sidecar signing keys are derived from this.
    pub master: MasterKey,
    /// Stream tokens are signed with this.
    pub stream_token: StreamTokenKey,
    /// The admin API's bearer token; without it the admin API is disabled.
    pub admin_token: Option<secrecy::SecretString>,
}

/// Limits and intervals handlers apply.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest callback body, in bytes.
    pub max_body_bytes: usize,
    /// Accepted clock difference for `webhook-timestamp` and accepted signature versions.
    pub signatures: Acceptance,
    /// Interval of SSE keep-alive comments.
    pub sse_keep_alive: Duration,
    /// Interval of an open stream's checks for a revoked token.
    pub stream_revocation_check: Duration,
    /// Longest a waiting `POST /api/delegate` holds the request.
    pub delegate_max_wait: Duration,
}

/// A Kubernetes client (kube's own has no `Debug`).
#[derive(Clone)]
pub struct KubeClient(pub kube::Client);

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeClient")
    }
}

/// The application state, cloned into every request.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Postgres, the record.
    pub db: PgPool,
    /// Redis, hot state and streams.
    pub redis: RedisStore,
    /// Signing and token keys.
    pub keys: Arc<Keys>,
    /// Limits and intervals.
    pub settings: Arc<Settings>,
    /// Group commit of callbacks.
    pub committer: Committer,
    /// Per-tenant limits of callbacks in flight and open streams.
    pub limits: crate::limits::TenantLimits,
    /// Fan-out to SSE streams across replicas.
    pub fanout: Fanout,
    /// The status mirror, when enabled.
    pub mirror: Option<StatusMirror<KubeStatusWriter>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Sessions resolved before.
    pub sessions: Arc<SessionCache>,
    /// Kubernetes, for creating and watching DelegatedTasks (`None`: the delegate API is off).
    pub kube: Option<KubeClient>,
    /// The Slack bot, when configured.
    pub slack: Option<Arc<crate::slack::SlackBot>>,
    /// Upstream credentials of tenants' MCP connections.
    pub credentials: Arc<crate::credentials::Broker>,
    /// The SSRF-safe outbound HTTP client.
    pub egress: crate::egress::Egress,
    /// The MCP gateway: tool lists and per-tenant call slots.
    pub mcp: Arc<crate::mcp::Gateway>,
}

impl AppState {
    /// The path every event of a session is appended through.
    pub fn event_log(&self) -> EventLog<'_> {
        EventLog {
            committer: &self.committer,
            sessions: &self.sessions,
            fanout: &self.fanout,
            mirror: self.mirror.as_ref(),
            metrics: &self.metrics,
        }
    }

    /// What the MCP gateway's calls use.
    pub fn mcp_context(&self) -> crate::mcp::Context<'_> {
        crate::mcp::Context {
            db: &self.db,
            metrics: &self.metrics,
            credentials: &self.credentials,
            egress: &self.egress,
            events: self.event_log(),
        }
    }
}

impl FromRef<AppState> for Arc<Metrics> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.metrics)
    }
}

impl FromRef<AppState> for PgPool {
    fn from_ref(state: &AppState) -> Self {
        state.db.clone()
    }
}
