//! The bridge's metrics (`GET /metrics`, Prometheus text format); no labels with object names.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters and gauges of one bridge.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// OpenCode events read.
    pub events: Counter,
    /// Callbacks the API accepted (2xx).
    pub delivered: Counter,
    /// Callbacks the API refused for good (4xx other than 408 and 429), and dropped.
    pub rejected: Counter,
    /// Delivery attempts that failed and will be retried.
    pub failed_attempts: Counter,
    /// Callbacks dropped because the buffer was full (the oldest go first).
    pub dropped: Counter,
    /// Callbacks waiting in the buffer.
    pub buffered: Gauge,
    /// Times the event stream was opened again after it broke.
    pub reconnects: Counter,
    /// Conversations' workspaces on the pod, at the last sweep.
    pub workspaces: Gauge,
    /// Bytes the workspaces hold, at the last sweep.
    pub workspace_bytes: Gauge,
    /// Workspaces removed after their idle time.
    pub workspaces_removed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `nubabel_bridge_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nubabel_bridge");
        let metrics = Self {
            events: Counter::default(),
            delivered: Counter::default(),
            rejected: Counter::default(),
            failed_attempts: Counter::default(),
            dropped: Counter::default(),
            buffered: Gauge::default(),
            reconnects: Counter::default(),
            workspaces: Gauge::default(),
            workspace_bytes: Gauge::default(),
            workspaces_removed: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "opencode_events",
            "OpenCode events read",
            metrics.events.clone(),
        );
        registry.register(
            "callbacks_delivered",
            "Callbacks the callback API accepted",
            metrics.delivered.clone(),
        );
        registry.register(
            "callbacks_rejected",
            "Callbacks the callback API refused for good",
            metrics.rejected.clone(),
        );
        registry.register(
            "callback_attempts_failed",
            "Delivery attempts that will be retried",
            metrics.failed_attempts.clone(),
        );
        registry.register(
            "callbacks_dropped",
            "Callbacks dropped because the buffer was full",
            metrics.dropped.clone(),
        );
        registry.register(
            "callbacks_buffered",
            "Callbacks waiting to be delivered",
            metrics.buffered.clone(),
        );
        registry.register(
            "event_stream_reconnects",
            "Reconnections to the OpenCode event stream",
            metrics.reconnects.clone(),
        );
        registry.register(
            "workspaces",
            "Conversations' workspaces on the pod",
            metrics.workspaces.clone(),
        );
        registry.register(
            "workspace_bytes",
            "Bytes the conversations' workspaces hold",
            metrics.workspace_bytes.clone(),
        );
        registry.register(
            "workspaces_removed",
            "Workspaces removed after their idle time",
            metrics.workspaces_removed.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
