//! `/healthz` (the process answers), `/readyz` (OpenCode answers, its event stream is followed,
//! and the callback API is
//! reachable) and `/metrics`, on the bridge's port; `/readyz` is the pod's readiness probe.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use nubabel_opencode::OpencodeClient;

use crate::delivery::CallbackSender;
use crate::liveness::Liveness;
use crate::metrics::Metrics;

/// Bound on each check `/readyz` makes.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the probes need.
#[derive(Clone)]
pub struct HealthState {
    /// The pod's OpenCode.
    pub opencode: OpencodeClient,
    /// The callback API.
    pub sender: CallbackSender,
    /// When the API last answered.
    pub liveness: Arc<Liveness>,
    /// The metrics to expose.
    pub metrics: Arc<Metrics>,
}

/// The probe and metrics routes.
pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<HealthState>) -> (StatusCode, String) {
    let opencode = tokio::time::timeout(CHECK_TIMEOUT, state.opencode.health()).await;
    match opencode {
        Ok(Ok(health)) if health.healthy => {}
        Ok(Ok(_)) => return unready("OpenCode reports itself unhealthy"),
        Ok(Err(error)) => return unready(&format!("OpenCode does not answer: {error}")),
        Err(_) => return unready("OpenCode did not answer within 2 s"),
    }
    if !state.liveness.is_following_events() {
        return unready("not following OpenCode's event stream yet");
    }
    if state.liveness.api_recent() {
        return (StatusCode::OK, "ready".to_owned());
    }
    match tokio::time::timeout(CHECK_TIMEOUT, state.sender.api_healthy()).await {
        Ok(true) => (StatusCode::OK, "ready".to_owned()),
        _ => unready("the callback API does not answer"),
    }
}

fn unready(reason: &str) -> (StatusCode, String) {
    (StatusCode::SERVICE_UNAVAILABLE, reason.to_owned())
}

async fn metrics(State(state): State<HealthState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
