//! What the gateway does for a sidecar: list its tenant's tools and run one of them against
//! the connection's upstream with the tenant's credentials, within a timeout and the tenant's
//! concurrency limit, recording each call as a progress event of the calling session.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use jiff::Timestamp;
use nubabel_contract::{identity::SidecarIdentity, progress::MCP_TOOL_CALL, text::cut_chars};
use nubabel_store::{
    connections::{self, Connection, ConnectionError},
    events::EventPayload,
    sessions::{SessionRef, resolve_fleet_session},
};
use serde_json::{Map, Value, json};
use sqlx::Row;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::{
    protocol::{self, Tool},
    upstream::{UpstreamError, UpstreamSession},
};
use crate::{
    credentials::{Broker, CredentialError, UpstreamAuth},
    egress::Egress,
    event_log::EventLog,
    metrics::{McpCallLabels, Metrics},
};

/// Most `tools/list` pages read from one upstream.
const MAX_LIST_PAGES: usize = 10;

/// Longest error message recorded in a progress event, in characters.
const MAX_RECORDED_ERROR_CHARS: usize = 200;

/// Session states in which a session is working on a turn.
const WORKING_STATES: [&str; 2] = ["busy", "retry"];

/// The gateway's limits.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Longest an upstream call (or one connection's `tools/list`) may take.
    pub call_timeout: Duration,
    /// Tool calls one tenant may have running at once on this replica.
    pub tenant_concurrency: usize,
    /// Longest a call waits for a free slot before it fails.
    pub queue_timeout: Duration,
    /// How long a connection's tool list is reused.
    pub tools_cache_ttl: Duration,
}

/// What the gateway's calls use of the rest of the service.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Postgres: the tenant's connections and sessions.
    pub db: &'a sqlx::PgPool,
    /// Tool-call counts and durations.
    pub metrics: &'a Metrics,
    /// Upstream credentials of the connections.
    pub credentials: &'a Broker,
    /// The SSRF-safe outbound HTTP client.
    pub egress: &'a Egress,
    /// Where a tool call is recorded as a progress event.
    pub events: EventLog<'a>,
}

/// Who calls, as the MCP route or the REST form authenticated them.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The sidecar fleet, and through it the tenant.
    pub sidecar: SidecarIdentity,
    /// The pod, when the sidecar names it (`x-nubabel-pod`).
    pub pod: Option<String>,
    /// The Nubabel or OpenCode session id, when the caller names it.
    pub session: Option<String>,
    /// `mcp` or `rest`, recorded with the call.
    pub via: &'static str,
}

/// How a tool call ended, as recorded and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with a result.
    Success,
    /// The upstream answered with a result that has `isError: true`.
    ToolError,
    /// The upstream failed (HTTP, transport, protocol or JSON-RPC error).
    UpstreamError,
    /// No credentials could be had (re-authorization needed, vault or refresh failure).
    CredentialError,
    /// The call took longer than the timeout.
    Timeout,
    /// The tenant's concurrency limit stayed full for the whole queue timeout.
    Busy,
}

impl Outcome {
    /// The name recorded in progress events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ToolError => "tool_error",
            Self::UpstreamError => "upstream_error",
            Self::CredentialError => "credential_error",
            Self::Timeout => "timeout",
            Self::Busy => "busy",
        }
    }
}

/// A finished tool call: the MCP tool result to hand back, and how it ended.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    /// The tool result (`content`, `isError`, ...), the upstream's or an error result.
    pub result: Value,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took, waiting for a slot included.
    pub duration: Duration,
    /// The session the call was recorded against, if one was found.
    pub recorded_for: Option<String>,
}

/// Why a call did not reach an upstream at all.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No tool of that name for the caller's tenant (also for other tenants' tools).
    #[error("unknown tool: {0}")]
    UnknownTool(String),
    /// Reading the connections failed.
    #[error("reading the connections failed")]
    Store(#[source] ConnectionError),
}

#[derive(Debug)]
struct CachedTools {
    fetched: Instant,
    version: Timestamp,
    tools: Arc<Vec<Tool>>,
}

/// The MCP gateway's shared state: tool lists per connection and slots per tenant.
#[derive(Debug)]
pub struct Gateway {
    settings: GatewaySettings,
    tools: Mutex<HashMap<Uuid, CachedTools>>,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Gateway {
    /// A gateway with these limits.
    pub fn new(settings: GatewaySettings) -> Self {
        Self {
            settings,
            tools: Mutex::default(),
            slots: Mutex::default(),
        }
    }

    /// The limits.
    pub fn settings(&self) -> &GatewaySettings {
        &self.settings
    }

    /// Every tool of the tenant's connections, named `<provider>_<tool>`. A connection whose
    /// upstream cannot be listed is left out (and logged); the others are still offered.
    pub async fn list_tools(
        &self,
        context: &Context<'_>,
        organization_id: &str,
    ) -> Result<Vec<Tool>, CallError> {
        let connections = connections::list(context.db, organization_id)
            .await
            .map_err(CallError::Store)?;
        let lists = futures::future::join_all(
            connections
                .iter()
                .map(|connection| self.tools_of(context, connection)),
        )
        .await;
        let mut tools = Vec::new();
        for (connection, list) in connections.iter().zip(lists) {
            match list {
                Ok(list) => tools.extend(list.iter().cloned()),
                Err(error) => tracing::warn!(
                    organization_id,
                    provider = %connection.provider,
                    %error,
                    "leaving out the tools of a connection that could not be listed"
                ),
            }
        }
        Ok(tools)
    }

    async fn tools_of(
        &self,
        context: &Context<'_>,
        connection: &Connection,
    ) -> Result<Arc<Vec<Tool>>, String> {
        if let Some(cached) = self.cached_tools(connection) {
            return Ok(cached);
        }
        let listed = tokio::time::timeout(
            self.settings.call_timeout,
            with_credentials(context, connection, |auth| {
                list_upstream(context, connection, auth)
            }),
        )
        .await
        .map_err(|_| "listing the tools timed out".to_owned())?
        .map_err(|error| error.to_string())?;
        let tools: Vec<Tool> = listed
            .into_iter()
            .filter_map(|mut tool| {
                let name = protocol::gateway_tool_name(&connection.provider, &tool.name);
                if !protocol::is_valid_tool_name(&tool.name) || !protocol::is_valid_tool_name(&name)
                {
                    tracing::warn!(provider = %connection.provider, "skipping an upstream tool with an invalid name");
                    return None;
                }
                tool.name = name;
                Some(tool)
            })
            .collect();
        let tools = Arc::new(tools);
        lock(&self.tools).insert(
            connection.id,
            CachedTools {
                fetched: Instant::now(),
                version: connection.updated_at,
                tools: Arc::clone(&tools),
            },
        );
        Ok(tools)
    }

    fn cached_tools(&self, connection: &Connection) -> Option<Arc<Vec<Tool>>> {
        let cache = lock(&self.tools);
        let cached = cache.get(&connection.id)?;
        // An edited connection (new URL or credentials) is listed again at once.
        (cached.version == connection.updated_at
            && cached.fetched.elapsed() < self.settings.tools_cache_ttl)
            .then(|| Arc::clone(&cached.tools))
    }

    /// Runs tool `name` (`<provider>_<tool>`) of the caller's tenant with `arguments`, and
    /// records the call as a progress event of the calling session when one is known.
    pub async fn call_tool(
        &self,
        context: &Context<'_>,
        caller: &Caller,
        name: &str,
        arguments: Map<String, Value>,
    ) -> Result<CallOutcome, CallError> {
        let organization_id = caller.sidecar.organization_id().as_str();
        let (provider, tool) = protocol::split_tool_name(name)
            // A provider no connection can have (a NUL in it, say) is unknown without a query.
            .filter(|(provider, _)| connections::validate_provider(provider).is_ok())
            .ok_or_else(|| CallError::UnknownTool(name.into()))?;
        let connection = connections::find(context.db, organization_id, provider)
            .await
            .map_err(CallError::Store)?
            .ok_or_else(|| CallError::UnknownTool(name.into()))?;

        let started = Instant::now();
        let (result, outcome) = match self.slot(organization_id).await {
            None => (
                protocol::error_result(&format!(
                    "too many tool calls of this organization are running (limit {}); try again later",
                    self.settings.tenant_concurrency
                )),
                Outcome::Busy,
            ),
            Some(_permit) => {
                let call = with_credentials(context, &connection, |auth| {
                    call_upstream(context, &connection, auth, tool, &arguments)
                });
                match tokio::time::timeout(self.settings.call_timeout, call).await {
                    Err(_) => (
                        protocol::error_result(&format!(
                            "the tool call timed out after {} ms",
                            self.settings.call_timeout.as_millis()
                        )),
                        Outcome::Timeout,
                    ),
                    Ok(Ok(result)) if result.is_object() => {
                        let outcome = if protocol::result_is_error(&result) {
                            Outcome::ToolError
                        } else {
                            Outcome::Success
                        };
                        (result, outcome)
                    }
                    Ok(Ok(_)) => (
                        protocol::error_result(
                            "the upstream MCP server sent an invalid answer: the result is not an object",
                        ),
                        Outcome::UpstreamError,
                    ),
                    Ok(Err(GatewayError::Credentials(error))) => (
                        protocol::error_result(&error.to_string()),
                        Outcome::CredentialError,
                    ),
                    Ok(Err(GatewayError::Upstream(error))) => (
                        protocol::error_result(&error.to_string()),
                        Outcome::UpstreamError,
                    ),
                }
            }
        };
        let duration = started.elapsed();
        let labels = McpCallLabels {
            via: caller.via,
            outcome: outcome.as_str(),
        };
        context.metrics.mcp_tool_calls.get_or_create(&labels).inc();
        context
            .metrics
            .mcp_tool_call_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
        tracing::info!(
            organization_id,
            provider,
            tool,
            via = caller.via,
            outcome = outcome.as_str(),
            duration_ms = duration.as_millis() as u64,
            "tool call"
        );
        let recorded_for = self
            .record(context, caller, name, provider, outcome, duration, &result)
            .await;
        Ok(CallOutcome {
            result,
            outcome,
            duration,
            recorded_for,
        })
    }

    /// A slot of the tenant's concurrency limit, waiting at most the queue timeout.
    async fn slot(&self, organization_id: &str) -> Option<OwnedSemaphorePermit> {
        let semaphore = Arc::clone(
            lock(&self.slots)
                .entry(organization_id.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.settings.tenant_concurrency))),
        );
        tokio::time::timeout(self.settings.queue_timeout, semaphore.acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Appends an `mcp_tool_call` progress event to the calling session, through the same
    /// path as the sidecars' progress callbacks (Postgres, SSE fan-out, status mirror).
    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        context: &Context<'_>,
        caller: &Caller,
        tool: &str,
        provider: &str,
        outcome: Outcome,
        duration: Duration,
        result: &Value,
    ) -> Option<String> {
        let session = match calling_session(context, caller).await {
            Ok(Some(session)) => session,
            Ok(None) => {
                tracing::debug!(
                    tool,
                    "no single working session to record the tool call against"
                );
                return None;
            }
            Err(error) => {
                tracing::warn!(%error, "finding the calling session failed");
                return None;
            }
        };
        let mut progress = json!({
            "type": MCP_TOOL_CALL,
            "tool": tool,
            "provider": provider,
            "outcome": outcome.as_str(),
            "durationMs": u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            "via": caller.via,
        });
        if outcome != Outcome::Success {
            progress["error"] = json!(cut_chars(
                &protocol::result_text(result),
                MAX_RECORDED_ERROR_CHARS
            ));
        }
        let raw = progress.to_string();
        let event_id = format!("mcp-{}", Uuid::new_v4().simple());
        let payload = EventPayload::Progress {
            event_type: MCP_TOOL_CALL,
            progress: &progress,
        };
        match context
            .events
            .append(
                caller.sidecar.organization_id(),
                &event_id,
                raw.as_bytes(),
                &session,
                payload,
            )
            .await
        {
            Ok(_) => Some(session.session_id),
            Err(error) => {
                tracing::warn!(%error, "recording the tool call as progress failed");
                None
            }
        }
    }
}

/// Why an upstream exchange produced no result.
#[derive(Debug, thiserror::Error)]
enum GatewayError {
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// Runs `exchange` with the connection's credentials; after a 401, once more with
/// re-authorized ones.
async fn with_credentials<T, F, Fut>(
    context: &Context<'_>,
    connection: &Connection,
    exchange: F,
) -> Result<T, GatewayError>
where
    F: Fn(UpstreamAuth) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let auth = context.credentials.authorize(connection).await?;
    match exchange(auth.clone()).await {
        Err(UpstreamError::Unauthorized) => {
            let renewed = context.credentials.reauthorize(connection, &auth).await?;
            Ok(exchange(renewed).await?)
        }
        other => Ok(other?),
    }
}

async fn list_upstream(
    context: &Context<'_>,
    connection: &Connection,
    auth: UpstreamAuth,
) -> Result<Vec<Tool>, UpstreamError> {
    let mut session =
        UpstreamSession::open(context.egress, &connection.upstream_url, &auth).await?;
    let mut tools = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_LIST_PAGES {
        let params = match &cursor {
            Some(cursor) => json!({ "cursor": cursor }),
            None => json!({}),
        };
        let page = session.request("tools/list", params).await?;
        let listed: Vec<Tool> = serde_json::from_value(
            page.get("tools").cloned().unwrap_or_default(),
        )
        .map_err(|_| UpstreamError::Protocol("tools/list without a valid tools array".into()))?;
        tools.extend(listed);
        cursor = page
            .get("nextCursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    session.close().await;
    Ok(tools)
}

async fn call_upstream(
    context: &Context<'_>,
    connection: &Connection,
    auth: UpstreamAuth,
    tool: &str,
    arguments: &Map<String, Value>,
) -> Result<Value, UpstreamError> {
    let mut session =
        UpstreamSession::open(context.egress, &connection.upstream_url, &auth).await?;
    let result = session
        .request("tools/call", json!({"name": tool, "arguments": arguments}))
        .await;
    session.close().await;
    result
}

/// The session a call belongs to: the one the caller names, else the only session of the
/// caller's fleet (and pod, when named) that is working on a turn. OpenCode sends nothing
/// that identifies its session to an MCP server, so with several working sessions the call
/// is not attributed rather than attributed to the wrong one.
async fn calling_session(
    context: &Context<'_>,
    caller: &Caller,
) -> Result<Option<SessionRef>, nubabel_store::Error> {
    let organization_id = caller.sidecar.organization_id();
    if let Some(id) = &caller.session {
        return resolve_fleet_session(context.db, &caller.sidecar, id).await;
    }
    let rows = sqlx::query(
        "select s.id, s.session_id
         from sessions s
         join lateral (
             select m.sidecar_namespace, m.sidecar_name, m.pod_name
             from session_mappings m
             where m.session_pk = s.id
             order by m.updated_at desc, m.id desc
             limit 1
         ) current on true
         where s.organization_id = $1
           and current.sidecar_namespace = $2
           and current.sidecar_name = $3
           and ($4::text is null or current.pod_name = $4)
           and s.state = any($5)
         limit 2",
    )
    .bind(organization_id.as_str())
    .bind(caller.sidecar.namespace())
    .bind(caller.sidecar.name())
    .bind(caller.pod.as_deref())
    .bind(&WORKING_STATES[..])
    .fetch_all(context.db)
    .await
    .map_err(nubabel_store::Error::from)?;
    let [row] = rows.as_slice() else {
        return Ok(None);
    };
    Ok(Some(SessionRef {
        pk: row.try_get("id").map_err(nubabel_store::Error::from)?,
        session_id: row
            .try_get("session_id")
            .map_err(nubabel_store::Error::from)?,
    }))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is a single map operation, so a poisoned map is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_have_stable_names() {
        let names: Vec<&str> = [
            Outcome::Success,
            Outcome::ToolError,
            Outcome::UpstreamError,
            Outcome::CredentialError,
            Outcome::Timeout,
            Outcome::Busy,
        ]
        .iter()
        .map(|o| o.as_str())
        .collect();
        assert_eq!(
            names,
            [
                "success",
                "tool_error",
                "upstream_error",
                "credential_error",
                "timeout",
                "busy"
            ]
        );
    }
}
