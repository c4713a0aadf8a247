//! `/healthz` (the process answers), `/readyz` (Postgres answers) and `/metrics` (Prometheus).
//!
//! Readiness follows Postgres alone: it is the record, and without it nothing can be
//! acknowledged. Redis only carries the hot state and the fan-out, and the API keeps accepting
//! and streaming events without it (from Postgres), so a replica whose Redis is down stays in
//! its Service and reports `degraded` rather than being taken out of rotation with the others.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{metrics::Metrics, state::AppState};

/// How long a readiness check waits for each dependency.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The health routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// Result of a health check.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`; `degraded` (ready, but Redis is unreachable and streams run from Postgres); or
    /// `unavailable` (Postgres is unreachable).
    pub status: &'static str,
    /// Postgres reachable (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<bool>,
    /// Redis reachable (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<bool>,
}

/// Liveness: the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        postgres: None,
        redis: None,
    })
}

/// Readiness: Postgres answers. Redis is reported, and its absence only degrades.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready (`ok`, or `degraded` while Redis is unreachable)", body = Health),
        (status = 503, description = "Postgres unreachable", body = Health),
    )
)]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let (postgres, redis) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, nubabel_store::db::ping(&state.db)),
        tokio::time::timeout(CHECK_TIMEOUT, state.redis.ping()),
    );
    let postgres = matches!(postgres, Ok(Ok(())));
    let redis = matches!(redis, Ok(Ok(())));
    let (code, status) = match (postgres, redis) {
        (true, true) => (StatusCode::OK, "ok"),
        (true, false) => (StatusCode::OK, "degraded"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    (
        code,
        Json(Health {
            status,
            postgres: Some(postgres),
            redis: Some(redis),
        }),
    )
}

/// `GET /metrics`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "The metrics in the OpenMetrics text format", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"))
)]
pub async fn get_metrics(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
