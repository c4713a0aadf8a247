//! `POST /api/sidecar/mcp/invoke`: the seed's REST form of a tool call, for seed-style
//! plugins. Signed like every sidecar callback; it runs the same gateway call as `/mcp`.
//! Unlike a progress callback, a tool call is not idempotent, so each `webhook-id` runs once:
//! a replayed request is answered 409 and runs nothing.

use axum::{Json, extract::State};
use nubabel_store::{connections::validate_provider, sessions::validate_session_id};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::SignedCallback,
    error::{ApiError, ErrorBody},
    mcp::{CallError, Caller, protocol},
    routes::sessions::parse_body,
    state::AppState,
};

/// The REST form's route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(invoke))
}

/// Body of `POST /api/sidecar/mcp/invoke`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InvokeRequest {
    /// The caller's own organization (any other is refused with 403).
    #[schema(example = "org-a")]
    pub organization_id: String,
    /// The connection's provider name, `[a-z0-9-]{1,32}`.
    #[schema(example = "linear")]
    pub provider: String,
    /// The upstream tool's name (without the provider prefix).
    #[schema(example = "create_issue")]
    pub tool_name: String,
    /// The tool's arguments (an object; absent means none).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub args: Option<Map<String, Value>>,
    /// The Nubabel or OpenCode session the call belongs to; the call is recorded as one of
    /// its progress events.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// The outcome of a tool call.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InvokeResponse {
    /// True when the upstream ran the tool and its result is not an error.
    pub success: bool,
    /// The MCP tool result (`content`, `structuredContent`, `isError`), when the upstream
    /// answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub result: Option<Value>,
    /// What went wrong, when `success` is false (never a credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How it ended: `success`, `tool_error`, `upstream_error`, `credential_error`,
    /// `timeout` or `busy`.
    pub outcome: String,
    /// How long the call took, in milliseconds.
    pub duration_ms: u64,
}

/// Runs a tool of the caller's tenant.
#[utoipa::path(
    post,
    path = "/api/sidecar/mcp/invoke",
    tag = "mcp",
    request_body = InvokeRequest,
    security(("sidecar_signature" = [])),
    responses(
        (status = 200, description = "The call ran; `success` says whether the tool succeeded", body = InvokeResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing, stale or invalid signature", body = ErrorBody),
        (status = 403, description = "organizationId is not the caller's organization", body = ErrorBody),
        (status = 404, description = "The organization has no such provider", body = ErrorBody),
        (status = 409, description = "This webhook-id was used before: a call runs at most once per id", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing or invalid", body = ErrorBody),
        (status = 503, description = "Postgres unavailable; retry after Retry-After seconds", body = ErrorBody),
    )
)]
async fn invoke(
    State(state): State<AppState>,
    callback: SignedCallback,
) -> Result<Json<InvokeResponse>, ApiError> {
    let request: InvokeRequest = parse_body(&callback.body)?;
    if request.organization_id != callback.sidecar.organization_id().as_str() {
        return Err(ApiError::Forbidden(
            "organizationId: a sidecar may only call its own organization's tools".into(),
        ));
    }
    validate_provider(&request.provider)
        .map_err(|_| ApiError::Unprocessable("provider: must be 1 to 32 of [a-z0-9-]".into()))?;
    if !protocol::is_valid_tool_name(&request.tool_name) {
        return Err(ApiError::Unprocessable(
            "toolName: must be 1 to 128 of [A-Za-z0-9_.-]".into(),
        ));
    }
    if let Some(session) = &request.session_id {
        validate_session_id("sessionId", session)
            .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    }
    callback.claim_once(&state).await?;
    let caller = Caller {
        sidecar: callback.sidecar,
        pod: None,
        session: request.session_id,
        via: "rest",
    };
    let name = protocol::gateway_tool_name(&request.provider, &request.tool_name);
    let outcome = state
        .mcp
        .call_tool(
            &state.mcp_context(),
            &caller,
            &name,
            request.args.unwrap_or_default(),
        )
        .await
        .map_err(|error| match error {
            CallError::UnknownTool(_) => ApiError::NotFound(format!(
                "provider: this organization has no connection named {:?}",
                request.provider
            )),
            CallError::Store(error) => ApiError::Internal(error.into()),
        })?;
    let success = outcome.outcome == crate::mcp::Outcome::Success;
    let upstream_answered = matches!(
        outcome.outcome,
        crate::mcp::Outcome::Success | crate::mcp::Outcome::ToolError
    );
    Ok(Json(InvokeResponse {
        success,
        error: (!success).then(|| protocol::result_text(&outcome.result)),
        result: upstream_answered.then_some(outcome.result),
        outcome: outcome.outcome.as_str().to_owned(),
        duration_ms: u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
    }))
}
