//! The admin API of stream tokens: revoke every token of a tenant, or every token reading one
//! of its sessions, issued up to now.
//!
//! Stream tokens are issued by Nubabel's backend and verified without a lookup, so a revoked
//! token is told by its `iat`: at or before the revocation's second. Every replica refuses such
//! a token when a stream opens, and ends the streams it already serves within
//! `NUBABEL_STREAM_REVOCATION_CHECK_SECONDS`. Tokens issued after the revocation's second are
//! valid again, so the backend waits a second before it issues replacements.

use axum::{Json, body::Bytes, extract::State};
use nubabel_contract::{
    identity::OrganizationId,
    stream_token::{CLOCK_SKEW_SECONDS, MAX_LIFETIME_SECONDS},
};
use nubabel_store::{
    sessions::{resolve_session, validate_session_id},
    stream_revocations,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::unix_now,
    error::{ApiError, ErrorBody},
    extract::ApiPath,
    routes::{connections::Admin, sessions::parse_body},
    state::AppState,
};

/// The admin routes of stream tokens.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(revoke_stream_tokens))
}

/// Which tokens to revoke.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevokeStreamTokens {
    /// Only the tokens reading this session (a Nubabel session id, or an OpenCode id mapped to
    /// one), scoped to it or not; without it, every token of the tenant.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// The revocation now in force.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamTokensRevoked {
    /// The tenant.
    pub organization_id: String,
    /// The session, when the revocation is for one session only.
    pub session_id: Option<String>,
    /// Tokens issued (`iat`) at or before this Unix second are refused; issue replacements
    /// with a later `iat`.
    pub revoked_through: i64,
}

/// Revokes a tenant's stream tokens issued up to now: new streams with them are refused (401)
/// and open ones end within the revocation check interval.
#[utoipa::path(
    post,
    path = "/api/admin/organizations/{organizationId}/stream-tokens/revoke",
    tag = "admin",
    params(("organizationId" = String, Path, description = "The tenant")),
    request_body(content = RevokeStreamTokens, description = "Optional: `{}` or no body revokes every token of the tenant"),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Revoked; tokens issued at or before `revokedThrough` no longer read the tenant's streams (or the session's)", body = StreamTokensRevoked),
        (status = 400, description = "Malformed JSON or organization id", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 422, description = "The session id is not a valid session id", body = ErrorBody),
        (status = 503, description = "Admin API disabled (no NUBABEL_ADMIN_TOKEN) or Postgres unavailable", body = ErrorBody),
    )
)]
async fn revoke_stream_tokens(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath(organization_id): ApiPath<String>,
    body: Bytes,
) -> Result<Json<StreamTokensRevoked>, ApiError> {
    let organization_id =
        OrganizationId::parse(&organization_id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let request: RevokeStreamTokens = if body.iter().all(u8::is_ascii_whitespace) {
        RevokeStreamTokens::default()
    } else {
        parse_body(&body)?
    };
    let session_id = match request.session_id {
        Some(session_id) => {
            validate_session_id("sessionId", &session_id)
                .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
            // Streams check the Nubabel id, whichever id the reader named.
            let known = resolve_session(&state.db, &organization_id, &session_id).await?;
            Some(known.map_or(session_id, |session| session.session_id))
        }
        None => None,
    };
    let now = unix_now();
    let revoked_through = stream_revocations::revoke(
        &state.db,
        organization_id.as_str(),
        session_id.as_deref(),
        now,
        now - MAX_LIFETIME_SECONDS - CLOCK_SKEW_SECONDS,
    )
    .await?;
    tracing::info!(organization = %organization_id, session = ?session_id, revoked_through, "stream tokens revoked");
    Ok(Json(StreamTokensRevoked {
        organization_id: organization_id.as_str().to_owned(),
        session_id,
        revoked_through,
    }))
}
