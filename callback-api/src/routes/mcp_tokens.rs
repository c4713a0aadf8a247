//! The admin API of fleets' MCP tokens: retire the generations below one, once the fleet's
//! pods run a newer token.
//!
//! Rotation without downtime: raise the fleet's `spec.mcpTokenGeneration`; the operator writes
//! the new token into the fleet's Secret, and the changed pod template rolls the pods one by
//! one. The gateway accepts every generation at or above the fleet's floor, so pods not yet
//! replaced keep working with the old token. Once the rollout is done, retire the generations
//! below the new one here: from then on the old token is refused (401), on every replica.

use axum::{Json, body::Bytes, extract::State};
use nubabel_contract::identity::SidecarIdentity;
use nubabel_store::mcp_tokens;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    error::{ApiError, ErrorBody},
    extract::ApiPath,
    routes::{connections::Admin, sessions::parse_body},
    state::AppState,
};

/// The admin routes of MCP tokens.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(retire_mcp_tokens))
}

/// Which generations to retire.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetireMcpTokens {
    /// Every generation below this one is refused from now on.
    pub below: u32,
}

/// The floor now in force.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct McpTokensRetired {
    /// The fleet's organization.
    pub organization_id: String,
    /// The fleet's namespace.
    pub namespace: String,
    /// The fleet's name.
    pub name: String,
    /// The lowest generation still accepted (a later call never lowers it).
    pub lowest_accepted_generation: u32,
}

/// Retires a fleet's MCP token generations below `below`.
#[utoipa::path(
    post,
    path = "/api/admin/organizations/{organizationId}/fleets/{namespace}/{name}/mcp-token/retire",
    tag = "admin",
    params(
        ("organizationId" = String, Path, description = "The fleet's organization"),
        ("namespace" = String, Path, description = "The fleet's namespace"),
        ("name" = String, Path, description = "The OpencodeSidecar's name"),
    ),
    request_body = RetireMcpTokens,
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Retired; tokens of lower generations are refused by the gateway", body = McpTokensRetired),
        (status = 400, description = "Malformed JSON, or not a valid organization, namespace or name", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 422, description = "`below` is missing or not a generation", body = ErrorBody),
        (status = 503, description = "Admin API disabled (no NUBABEL_ADMIN_TOKEN) or Postgres unavailable", body = ErrorBody),
    )
)]
async fn retire_mcp_tokens(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath((organization_id, namespace, name)): ApiPath<(String, String, String)>,
    body: Bytes,
) -> Result<Json<McpTokensRetired>, ApiError> {
    let fleet = SidecarIdentity::new(&organization_id, &namespace, &name)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let request: RetireMcpTokens = parse_body(&body)?;
    let floor = mcp_tokens::retire_below(&state.db, &fleet, request.below).await?;
    tracing::info!(
        organization = %organization_id, %namespace, fleet = %name, lowest_accepted_generation = floor,
        "mcp token generations retired"
    );
    Ok(Json(McpTokensRetired {
        organization_id,
        namespace,
        name,
        lowest_accepted_generation: floor,
    }))
}
