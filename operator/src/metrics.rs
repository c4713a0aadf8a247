//! Prometheus metrics of the operator, served on `/metrics` of the health port.
//!
//! Labels stay bounded: the controller's name and an error category, never object names.
//! Each controller gets a [`ControllerMetrics`] handle from [`Metrics::controller`], so a
//! second controller adds no new metric families.

use std::sync::Arc;
use std::time::Instant;

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// The controller (`opencodesidecar`, `delegatedtask`).
    pub controller: &'static str,
}

/// Labels of the failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The controller.
    pub controller: &'static str,
    /// The error's stable category (`InvalidSpec`, `Apply`, ...).
    pub category: &'static str,
}

type HistogramFamily = Family<ControllerLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 5 ms to about 20 s: a reconcile is a handful of API calls.
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

/// Every metric of the operator and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    runs: Family<ControllerLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: HistogramFamily,
    /// 1 while this replica holds the leader Lease (or runs without election), else 0.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nubabel_operator");
        let runs = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let leader = Gauge::default();
        registry.register("reconcile_runs", "Reconciles started", runs.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error category",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles took",
            duration.clone(),
        );
        registry.register(
            "leader",
            "Whether this replica is the active one",
            leader.clone(),
        );
        Self {
            registry,
            runs,
            failures,
            duration,
            leader,
        }
    }
}

impl Metrics {
    /// The handle one controller records through.
    pub fn controller(&self, controller: &'static str) -> ControllerMetrics {
        ControllerMetrics {
            labels: ControllerLabels { controller },
            runs: self.runs.clone(),
            failures: self.failures.clone(),
            duration: self.duration.clone(),
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// One controller's view of the reconcile metrics.
#[derive(Clone)]
pub struct ControllerMetrics {
    labels: ControllerLabels,
    runs: Family<ControllerLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: HistogramFamily,
}

impl ControllerMetrics {
    /// Counts a reconcile and returns a timer that records its duration when dropped.
    pub fn reconcile_started(&self) -> ReconcileTimer {
        self.runs.get_or_create(&self.labels).inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.get_or_create(&self.labels).clone(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, category: &'static str) {
        self.failures
            .get_or_create(&FailureLabels {
                controller: self.labels.controller,
                category,
            })
            .inc();
    }

    /// Reconciles started so far.
    pub fn runs(&self) -> u64 {
        self.runs.get_or_create(&self.labels).get()
    }

    /// Failures of `category` so far.
    pub fn failures(&self, category: &'static str) -> u64 {
        self.failures
            .get_or_create(&FailureLabels {
                controller: self.labels.controller,
                category,
            })
            .get()
    }
}

/// Records a reconcile's duration when dropped, whichever way the reconcile ends.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

/// The `/metrics` route.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .with_state(metrics)
}

async fn serve_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.encode() {
        Ok(body) => (
            axum::http::StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "failed to encode metrics".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_per_controller_and_category() {
        let metrics = Metrics::default();
        let sidecar = metrics.controller("opencodesidecar");
        drop(sidecar.reconcile_started());
        sidecar.reconcile_failed("InvalidSpec");
        sidecar.reconcile_failed("InvalidSpec");
        let text = metrics.encode().unwrap();
        assert!(text.contains(
            r#"nubabel_operator_reconcile_failures_total{controller="opencodesidecar",category="InvalidSpec"} 2"#
        ));
        assert!(
            text.contains(
                r#"nubabel_operator_reconcile_runs_total{controller="opencodesidecar"} 1"#
            )
        );
        assert!(text.contains(
            r#"nubabel_operator_reconcile_duration_seconds_count{controller="opencodesidecar"} 1"#
        ));
    }
}
