//! The controllers and what they share: the field manager, error backoff, the cluster's
//! capabilities and the event recorder.
//!
//! Each controller lives in its own module with a `Context`, a `reconcile_*` function, an
//! `error_policy` and an `Error` with a stable `category()`. [`run`] starts them all on one
//! client and stops them together, so leader election wraps every controller at once.

pub mod fleet;
pub mod report;
pub mod sidecar;
pub mod task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client, Resource};

use crate::metrics::Metrics;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "nubabel-operator";

/// Name the operator reports events under.
pub const REPORTING_CONTROLLER: &str = "nubabel.io/operator";

/// How long a healthy object waits before its next resync: state outside the watches (a
/// deleted Secret, the callback API's view) is checked at least this often.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Longest note of a Kubernetes event the controllers publish (the API allows 1 KiB).
pub const MAX_EVENT_NOTE_BYTES: usize = 1024;

/// Cuts `text` to at most `max` bytes at a character boundary, marking the cut with `...`.
pub fn truncate(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    nubabel_contract::text::cut_marked(&text, max, "...")
}

/// Per-object exponential backoff for reconcile errors: 5 s, doubling, at most 5 min, reset
/// by the next successful reconcile. kube-runtime has no per-key backoff of its own.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// The first delay.
    pub const BASE: Duration = Duration::from_secs(5);
    /// The longest delay.
    pub const MAX: Duration = Duration::from_secs(5 * 60);

    /// Counts a failure of `key` and returns how long to wait before retrying it.
    pub fn next_delay(&self, key: &str) -> Duration {
        let mut failures = match self.failures.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let count = failures.entry(key.to_owned()).or_insert(0);
        let delay = Self::BASE.saturating_mul(2_u32.saturating_pow(*count));
        *count = count.saturating_add(1);
        delay.min(Self::MAX)
    }

    /// Forgets the failures of `key`.
    pub fn reset(&self, key: &str) {
        let mut failures = match self.failures.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        failures.remove(key);
    }
}

/// What the API server serves, discovered once at startup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `policy/v1` PodDisruptionBudgets (Kubernetes 1.21 and later).
    pub pod_disruption_budget_v1: bool,
}

impl Capabilities {
    /// Asks the API server which optional APIs it serves.
    pub async fn discover(client: &Client) -> Result<Self, kube::Error> {
        let pod_disruption_budget_v1 = match client.list_api_group_resources("policy/v1").await {
            Ok(list) => list
                .resources
                .iter()
                .any(|r| r.name == "poddisruptionbudgets"),
            Err(kube::Error::Api(status)) if status.code == 404 => false,
            Err(error) => return Err(error),
        };
        Ok(Self {
            pod_disruption_budget_v1,
        })
    }
}

/// What every controller gets from the operator.
#[derive(Clone)]
pub struct Shared {
    /// The Kubernetes client.
    pub client: Client,
    /// One event recorder for the process, so event series are aggregated across reconciles.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// What the API server serves.
    pub capabilities: Capabilities,
    /// The one namespace watched, or all when `None`.
    pub watch_namespace: Option<String>,
}

impl Shared {
    /// Shared state for controllers running as `instance` (the pod name).
    pub fn new(
        client: Client,
        instance: &str,
        metrics: Arc<Metrics>,
        capabilities: Capabilities,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTING_CONTROLLER.to_owned(),
                instance: Some(instance.to_owned()),
            },
        );
        Self {
            client,
            recorder,
            metrics,
            capabilities,
            watch_namespace: None,
        }
    }

    /// Restricts the controllers to one namespace.
    pub fn watching(mut self, namespace: Option<String>) -> Self {
        self.watch_namespace = namespace;
        self
    }

    /// An `Api` over the watched namespace, or all namespaces.
    pub fn watched<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.watch_namespace {
            Some(namespace) => Api::namespaced(self.client.clone(), namespace),
            None => Api::all(self.client.clone()),
        }
    }
}

/// Runs every controller until `stop` resolves, then lets in-flight reconciles finish.
pub async fn run(
    shared: Shared,
    sidecar_settings: sidecar::Settings,
    database: Option<sqlx::PgPool>,
    bridges: task::workspace::Bridges,
    concurrency: u16,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let stop = futures::FutureExt::shared(Box::pin(stop) as BoxFuture<'static, ()>);
    let sidecars = sidecar::run(
        sidecar::Context::new(shared.clone(), sidecar_settings),
        concurrency,
        stop.clone(),
    );
    match database {
        Some(pool) => {
            let tasks = task::run(shared, pool, bridges, concurrency, stop);
            futures::future::join(sidecars, tasks).await;
        }
        None => {
            tracing::warn!("no database configured: DelegatedTasks are not reconciled");
            sidecars.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_object_caps_and_resets() {
        let backoff = Backoff::default();
        assert_eq!(backoff.next_delay("a"), Duration::from_secs(5));
        assert_eq!(backoff.next_delay("a"), Duration::from_secs(10));
        assert_eq!(backoff.next_delay("a"), Duration::from_secs(20));
        assert_eq!(backoff.next_delay("b"), Duration::from_secs(5));
        for _ in 0..20 {
            backoff.next_delay("a");
        }
        assert_eq!(backoff.next_delay("a"), Backoff::MAX);
        backoff.reset("a");
        assert_eq!(backoff.next_delay("a"), Duration::from_secs(5));
    }
}
