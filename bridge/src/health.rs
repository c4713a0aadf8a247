//! `/healthz` (the process answers), `/readyz` (OpenCode answers, its event stream is followed,
//! and the callback API is
//! reachable) and `/metrics`, on the bridge's port; `/readyz` is the pod's readiness probe.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use nubabel_opencode::OpencodeClient;

use crate::delivery::CallbackSender;
use crate::metrics::Metrics;

/// How long a callback API answer counts as "reachable" without asking its `/healthz`.
pub const API_RECENT: Duration = Duration::from_secs(60);
/// Bound on each check `/readyz` makes.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// When the callback API last answered a callback.
#[derive(Debug, Default)]
pub struct Liveness {
    api_answered: Mutex<Option<Instant>>,
    // NB: a pod must not take work before its events are followed, or a fast turn finishes
    // unseen while the stream is still reconnecting.
    following_events: std::sync::atomic::AtomicBool,
}

impl Liveness {
    /// Records whether the OpenCode event stream is connected.
    pub fn following_events(&self, connected: bool) {
        self.following_events
            .store(connected, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the OpenCode event stream is connected.
    pub fn is_following_events(&self) -> bool {
        self.following_events
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records an answer from the API (accepted or refused: either way it is up).
    pub fn api_answered(&self) {
        *self
            .api_answered
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// Whether the API answered within `API_RECENT`.
    pub fn api_recent(&self) -> bool {
        self.api_answered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < API_RECENT)
    }
}

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
