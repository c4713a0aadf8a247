//! Prometheus metrics, with bounded labels only (method, matched route, status; never ids).

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    http::Method,
    middleware::Next,
    response::Response,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of an HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// HTTP method, as [`method_label`] names it.
    pub method: &'static str,
    /// The route template, e.g. `/api/sidecar/sessions/{session_id}/progress`.
    pub matched_path: String,
    /// Response status code.
    pub status: u16,
}

/// Labels of the request-duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// HTTP method, as [`method_label`] names it.
    pub method: &'static str,
    /// The route template.
    pub matched_path: String,
}

impl RouteLabels {
    /// The method and matched route of `request` (`unmatched` outside every route).
    pub fn of(request: &Request) -> Self {
        Self {
            method: method_label(request.method()),
            matched_path: request
                .extensions()
                .get::<MatchedPath>()
                .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned()),
        }
    }
}

/// The label of an HTTP method: one of the nine standard methods (RFC 9110 and PATCH), or
/// `other`, since a client may send any token as a method and each would be a new series.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// What happened to a callback.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    /// Committed for the first time.
    New,
    /// A retry of a committed event; nothing changed.
    Duplicate,
    /// An event id reused for another body; refused.
    IdReused,
}

/// Labels of the callback counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallbackLabels {
    /// `progress` or `state`.
    pub kind: &'static str,
    /// What happened.
    pub outcome: Outcome,
}

/// Labels of the status-mirror counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// `written`, `task_gone` or `failed`.
    pub result: &'static str,
}

/// Labels of the tenant-limit counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `callbacks`, `streams`, `replays` or `delegate_waits`.
    pub limit: &'static str,
}

/// Labels of the retention counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    /// `session_events`, `task_results` or `slack_threads`.
    pub table: &'static str,
}

/// Labels of the MCP tool-call counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct McpCallLabels {
    /// `mcp` (the gateway) or `rest` (`POST /api/sidecar/mcp/invoke`).
    pub via: &'static str,
    /// `success`, `tool_error`, `upstream_error`, `credential_error`, `timeout` or `busy`.
    pub outcome: &'static str,
}

/// One unit of a gauge, held from creation to drop: every way the holder ends (returning, an
/// error, a panic unwinding, a client going away and its response body being dropped) gives it
/// back.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Increments `gauge` until the guard is dropped.
    pub fn hold(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every metric the API exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by method, route and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// Time to the response head, by method and route.
    pub http_request_duration: Family<RouteLabels, Histogram>,
    /// Callbacks by kind and outcome.
    pub callbacks: Family<CallbackLabels, Counter>,
    /// Committed events whose Redis append failed (they replay from Postgres).
    pub redis_append_failures: Counter,
    /// Open SSE streams on this replica (each held by a [`GaugeGuard`] in its response body).
    pub sse_streams: Gauge,
    /// 1 while the fan-out reads Postgres because Redis is unreachable.
    pub fanout_degraded: Gauge,
    /// Status-mirror writes by result.
    pub status_writes: Family<MirrorLabels, Counter>,
    /// Events per group commit.
    pub append_batch_size: Histogram,
    /// Requests refused with 429 by a per-tenant limit.
    pub tenant_limited: Family<LimitLabels, Counter>,
    /// MCP tool calls by path and outcome.
    pub mcp_tool_calls: Family<McpCallLabels, Counter>,
    /// Time of MCP tool calls (waiting for a slot included), by path and outcome.
    pub mcp_tool_call_duration: Family<McpCallLabels, Histogram>,
    /// Callbacks accepted with a body-only (`v1`) signature, under the upgrade setting.
    pub body_only_signatures: Counter,
    /// Rows deleted by retention, by table.
    pub retention_deleted: Family<TableLabels, Counter>,
    /// Slack notifications refused because the task's tenant was never seen in its channel.
    pub slack_channels_refused: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `nubabel_callback_api` prefix.
    pub fn new() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("nubabel_callback_api");
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_request_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        });
        let callbacks = Family::<CallbackLabels, Counter>::default();
        let redis_append_failures = Counter::default();
        let sse_streams = Gauge::default();
        let fanout_degraded = Gauge::default();
        let status_writes = Family::<MirrorLabels, Counter>::default();
        let append_batch_size =
            Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]);
        registry.register("http_requests", "HTTP requests", http_requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response head",
            http_request_duration.clone(),
        );
        registry.register(
            "callbacks",
            "Sidecar callbacks by outcome",
            callbacks.clone(),
        );
        registry.register(
            "redis_append_failures",
            "Committed events not appended to Redis (replayed from Postgres)",
            redis_append_failures.clone(),
        );
        registry.register("sse_streams", "Open SSE streams", sse_streams.clone());
        registry.register(
            "fanout_degraded",
            "1 while fan-out polls Postgres because Redis is unreachable",
            fanout_degraded.clone(),
        );
        registry.register(
            "status_writes",
            "DelegatedTask status writes",
            status_writes.clone(),
        );
        let mcp_tool_calls = Family::<McpCallLabels, Counter>::default();
        let mcp_tool_call_duration =
            Family::<McpCallLabels, Histogram>::new_with_constructor(|| {
                Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0])
            });
        registry.register(
            "mcp_tool_calls",
            "MCP tool calls by path and outcome",
            mcp_tool_calls.clone(),
        );
        registry.register(
            "mcp_tool_call_duration_seconds",
            "Time of MCP tool calls, waiting for a slot included",
            mcp_tool_call_duration.clone(),
        );
        let retention_deleted = Family::<TableLabels, Counter>::default();
        registry.register(
            "retention_deleted",
            "Rows deleted because they were older than their retention",
            retention_deleted.clone(),
        );
        let body_only_signatures = Counter::default();
        registry.register(
            "body_only_signatures",
            "Callbacks accepted with a signature that does not cover the request",
            body_only_signatures.clone(),
        );
        let slack_channels_refused = Counter::default();
        registry.register(
            "slack_channels_refused",
            "Tasks whose Slack channel was refused: their tenant was never seen in it",
            slack_channels_refused.clone(),
        );
        let tenant_limited = Family::<LimitLabels, Counter>::default();
        registry.register(
            "tenant_limited",
            "Requests refused with 429 by a per-tenant limit (and live streams that waited for a replay share)",
            tenant_limited.clone(),
        );
        registry.register(
            "append_batch_size",
            "Events committed together in one transaction",
            append_batch_size.clone(),
        );
        Self {
            registry: root,
            http_requests,
            http_request_duration,
            callbacks,
            redis_append_failures,
            sse_streams,
            fanout_degraded,
            status_writes,
            append_batch_size,
            tenant_limited,
            mcp_tool_calls,
            mcp_tool_call_duration,
            body_only_signatures,
            retention_deleted,
            slack_channels_refused,
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Middleware: counts and times every matched request.
pub async fn track_requests(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let RouteLabels {
        method,
        matched_path,
    } = RouteLabels::of(&request);
    let response = next.run(request).await;
    let status = response.status();
    metrics
        .http_request_duration
        .get_or_create(&RouteLabels {
            method,
            matched_path: matched_path.clone(),
        })
        .observe(start.elapsed().as_secs_f64());
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            matched_path,
            status: status.as_u16(),
        })
        .inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_methods_keep_their_name_and_invented_ones_are_other() {
        for name in [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ] {
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(method_label(&method), name);
        }
        for name in ["PURGE", "FOOBAR", "get", "PROPFIND", "X-1"] {
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(method_label(&method), "other", "{name}");
        }
    }

    #[test]
    fn a_gauge_guard_gives_its_unit_back_even_when_its_holder_panics() {
        let gauge = Gauge::default();
        let held = GaugeGuard::hold(&gauge);
        assert_eq!(gauge.get(), 1);
        drop(held);
        assert_eq!(gauge.get(), 0);
        let unwound = std::panic::catch_unwind(|| {
            let _held = GaugeGuard::hold(&gauge);
            panic!("the holder fails");
        });
        assert!(unwound.is_err());
        assert_eq!(gauge.get(), 0);
    }
}
