//! The workspace routes on the bridge's port, for the operator only: every request is signed
//! with the fleet's key over its method, path and body (the same `v2` signature the bridge's
//! own callbacks carry), so neither the agent in the pod (which never sees the key) nor a peer
//! on the network can prepare a workspace or read its changes.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use nubabel_contract::signing::{
    Acceptance, DEFAULT_TOLERANCE_SECONDS, RequestTarget, SidecarKey, SignedHeaders, Versions,
    verify,
};
use nubabel_contract::workspace::{
    CHANGES_PATH, ChangesRequest, MAX_FILES, MAX_INLINE_BYTES, MAX_REPOSITORIES, PREPARE_PATH,
    PrepareFailure, PrepareRequest,
};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{Workspaces, reasons};

/// Largest request body accepted (inline files plus the rest).
const MAX_BODY_BYTES: usize = MAX_INLINE_BYTES + 256 * 1024;

/// What the workspace routes need.
#[derive(Clone)]
pub struct WorkspaceState {
    /// The workspaces.
    pub workspaces: Arc<Workspaces>,
    /// The fleet's key, which the operator signs with.
    pub key: SidecarKey,
}

/// The workspace routes.
pub fn router(state: WorkspaceState) -> Router {
    Router::new()
        .route(PREPARE_PATH, post(prepare))
        .route(CHANGES_PATH, post(changes))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn refusal(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Checks the signature and parses the body.
fn verified<T: DeserializeOwned>(
    key: &SidecarKey,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, (StatusCode, String)> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let signed = SignedHeaders {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
    };
    let target = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    verify(
        key,
        &signed,
        RequestTarget {
            method: method.as_str(),
            target,
        },
        body,
        unix_seconds(),
        Acceptance {
            tolerance_seconds: DEFAULT_TOLERANCE_SECONDS,
            versions: Versions::RequestBoundOnly,
        },
    )
    .map_err(|error| (StatusCode::UNAUTHORIZED, error.to_string()))?;
    serde_json::from_slice(body).map_err(|error| (StatusCode::BAD_REQUEST, error.to_string()))
}

fn failed(failure: PrepareFailure) -> Response {
    tracing::warn!(
        reason = failure.reason,
        message = failure.message,
        "workspace request failed"
    );
    (StatusCode::UNPROCESSABLE_ENTITY, Json(failure)).into_response()
}

async fn prepare(
    State(state): State<WorkspaceState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: PrepareRequest = match verified(&state.key, &method, &uri, &headers, &body) {
        Ok(request) => request,
        Err((status, message)) => return refusal(status, message),
    };
    if request.repositories.len() > MAX_REPOSITORIES || request.files.len() > MAX_FILES {
        return failed(PrepareFailure {
            reason: reasons::INVALID.to_owned(),
            message: format!(
                "a workspace holds at most {MAX_REPOSITORIES} repositories and {MAX_FILES} files"
            ),
        });
    }
    let prepared = state.workspaces.prepare(&request).await;
    state.workspaces.touch(&request.key);
    match prepared {
        Ok(prepared) => {
            tracing::info!(
                key = request.key,
                created = prepared.created,
                bytes = prepared.bytes,
                "workspace prepared"
            );
            Json(prepared).into_response()
        }
        Err(failure) => failed(failure),
    }
}

async fn changes(
    State(state): State<WorkspaceState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: ChangesRequest = match verified(&state.key, &method, &uri, &headers, &body) {
        Ok(request) => request,
        Err((status, message)) => return refusal(status, message),
    };
    state.workspaces.touch(&request.key);
    match state.workspaces.changes(&request).await {
        Ok(changes) => Json(changes).into_response(),
        Err(failure) => failed(failure),
    }
}
