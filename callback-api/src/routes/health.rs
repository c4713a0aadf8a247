//! `/healthz` (the process answers) and `/readyz` (Postgres and Redis answer).

use axum::{Json, extract::State, http::StatusCode};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::state::AppState;

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
    /// `ok` or `unavailable`.
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

/// Readiness: Postgres and Redis both answer.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Postgres or Redis unreachable", body = Health),
    )
)]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let (postgres, redis) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, nubabel_data::db::ping(&state.db)),
        tokio::time::timeout(CHECK_TIMEOUT, state.redis.ping()),
    );
    let postgres = matches!(postgres, Ok(Ok(())));
    let redis = matches!(redis, Ok(Ok(())));
    let ready = postgres && redis;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: if ready { "ok" } else { "unavailable" },
            postgres: Some(postgres),
            redis: Some(redis),
        }),
    )
}
