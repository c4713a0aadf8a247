//! The admin API of tenants' MCP connections: register, list, read, update and delete the
//! upstream MCP servers a tenant's tools come from, with their credentials.
//!
//! Authenticated by `Authorization: Bearer <NUBABEL_ADMIN_TOKEN>` (compared in constant
//! time); without a configured token every admin route answers 503, so the routes (and the
//! OpenAPI document) are the same on every deployment. Secrets in requests are sealed by the
//! vault and never returned: responses name which secrets are set, the expiry and the state.

use axum::{
    Json,
    body::Bytes,
    extract::{FromRequestParts, State},
    http::{StatusCode, header, request::Parts},
};
use jiff::{SignedDuration, Timestamp};
use nubabel_contract::identity::OrganizationId;
use nubabel_store::{
    connections::{
        self, AuthKind, Connection, ConnectionError, ConnectionState, ConnectionUpdate,
        Credentials, NewConnection, Secrets,
    },
    vault::Keyring,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use url::Url;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    error::{ApiError, ErrorBody},
    extract::ApiPath,
    routes::sessions::parse_body,
    state::AppState,
};

/// The admin routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_connections, create_connection))
        .routes(routes!(
            get_connection,
            update_connection,
            delete_connection
        ))
        .routes(routes!(reencrypt))
}

/// A caller that presented the admin token.
#[derive(Debug)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = &state.keys.admin_token else {
            return Err(ApiError::Disabled(
                "the admin API is disabled: set NUBABEL_ADMIN_TOKEN".to_owned(),
            ));
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::Unauthorized("missing Authorization: Bearer <admin token>".to_owned())
            })?;
        // Digests first, so the comparison takes the same time whatever the lengths.
        let matches: bool = Sha256::digest(presented.trim().as_bytes())
            .ct_eq(&Sha256::digest(expected.expose_secret().as_bytes()))
            .into();
        if matches {
            Ok(Self)
        } else {
            Err(ApiError::Unauthorized("invalid admin token".to_owned()))
        }
    }
}

/// How the gateway authenticates to the upstream, with the secrets (request only).
#[derive(Deserialize, ToSchema)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
pub enum AuthInput {
    /// A static bearer token: `Authorization: Bearer <token>`.
    Bearer {
        /// The token.
        #[schema(value_type = String)]
        token: SecretString,
    },
    /// A static API key in a header of the upstream's choice.
    ApiKey {
        /// The header name, e.g. `x-api-key`.
        header: String,
        /// The key.
        #[schema(value_type = String)]
        key: SecretString,
    },
    /// OAuth 2: an access token used as a bearer token, refreshed at `tokenUrl` with the
    /// refresh token (grant `refresh_token`, client credentials in the form body).
    #[serde(rename = "oauth2")]
    OAuth2 {
        /// The token endpoint (the same SSRF rules as the upstream apply).
        token_url: String,
        /// The OAuth client id.
        client_id: String,
        /// The client secret, for confidential clients.
        #[serde(default)]
        #[schema(value_type = Option<String>)]
        client_secret: Option<SecretString>,
        /// The current access token.
        #[schema(value_type = String)]
        access_token: SecretString,
        /// The refresh token (without one, an expired token cannot be renewed).
        #[serde(default)]
        #[schema(value_type = Option<String>)]
        refresh_token: Option<SecretString>,
        /// When the access token expires (RFC 3339); or give `expiresIn`.
        #[serde(default)]
        expires_at: Option<String>,
        /// Seconds until the access token expires.
        #[serde(default)]
        expires_in: Option<u64>,
    },
}

/// Body of `POST /api/admin/organizations/{organizationId}/connections`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateConnection {
    /// `[a-z0-9-]{1,32}`, unique per tenant; tools are named `<provider>_<tool>`.
    #[schema(example = "linear")]
    pub provider: String,
    /// The upstream MCP server (streamable HTTP); https unless allowlisted.
    #[schema(example = "https://mcp.linear.app/mcp")]
    pub upstream_url: String,
    /// Authentication and secrets.
    pub auth: AuthInput,
}

/// Body of `PATCH /api/admin/organizations/{organizationId}/connections/{provider}`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateConnection {
    /// A new upstream URL.
    #[serde(default)]
    pub upstream_url: Option<String>,
    /// New authentication and secrets; replaces the old ones and makes the connection active
    /// again (how a connection needing re-authorization is fixed).
    #[serde(default)]
    pub auth: Option<AuthInput>,
}

/// How the gateway authenticates, without secrets.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthView {
    /// `bearer`, `apiKey` or `oauth2`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The API key's header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The OAuth token endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// The OAuth client id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Which secrets are stored (`token`, `apiKey`, `accessToken`, `refreshToken`,
    /// `clientSecret`); their values are never returned. Empty when the stored secrets
    /// cannot be decrypted with the configured keys.
    pub secrets: Vec<String>,
    /// When the OAuth access token expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// A connection as the admin API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionView {
    /// The connection's id.
    pub id: String,
    /// The tenant.
    pub organization_id: String,
    /// The provider name.
    pub provider: String,
    /// The upstream MCP server.
    pub upstream_url: String,
    /// Authentication, without secrets.
    pub auth: AuthView,
    /// `active`, or `needsReauthorization` after the OAuth grant was refused.
    pub state: String,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last changed (RFC 3339).
    pub updated_at: String,
}

/// The tenant's connections.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectionList {
    /// By provider name.
    pub connections: Vec<ConnectionView>,
}

/// The answer of a re-encryption run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Reencrypted {
    /// Connections re-encrypted under the current key.
    pub reencrypted: u64,
    /// The current key's id.
    #[serde(rename = "keyId")]
    pub key_id: String,
}

fn organization(value: &str) -> Result<OrganizationId, ApiError> {
    OrganizationId::parse(value).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn keyring(state: &AppState) -> Result<&Keyring, ApiError> {
    state
        .credentials
        .keyring()
        .map(AsRef::as_ref)
        .ok_or_else(|| {
            ApiError::Disabled(
                "the credential vault is not configured: set NUBABEL_VAULT_KEYS".to_owned(),
            )
        })
}

async fn checked_url(state: &AppState, field: &str, value: &str) -> Result<Url, ApiError> {
    let url = Url::parse(value)
        .map_err(|e| ApiError::Unprocessable(format!("{field}: not a valid URL ({e})")))?;
    state
        .egress
        .check_url_resolved(&url)
        .await
        .map_err(|e| ApiError::Unprocessable(format!("{field}: {e}")))?;
    Ok(url)
}

async fn credentials(state: &AppState, auth: AuthInput) -> Result<Credentials, ApiError> {
    Ok(match auth {
        AuthInput::Bearer { token } => {
            require_secret("auth.token", &token)?;
            Credentials {
                auth_kind: AuthKind::Bearer,
                secrets: Secrets::Bearer { token },
                token_expires_at: None,
            }
        }
        AuthInput::ApiKey { header, key } => {
            let header = header.trim().to_ascii_lowercase();
            if http::HeaderName::from_bytes(header.as_bytes()).is_err()
                || header == "host"
                || header.is_empty()
            {
                return Err(ApiError::Unprocessable(
                    "auth.header: must be a valid HTTP header name".to_owned(),
                ));
            }
            require_secret("auth.key", &key)?;
            if http::HeaderValue::from_str(key.expose_secret()).is_err() {
                return Err(ApiError::Unprocessable(
                    "auth.key: must be a valid header value".to_owned(),
                ));
            }
            Credentials {
                auth_kind: AuthKind::ApiKey { header },
                secrets: Secrets::ApiKey { key },
                token_expires_at: None,
            }
        }
        AuthInput::OAuth2 {
            token_url,
            client_id,
            client_secret,
            access_token,
            refresh_token,
            expires_at,
            expires_in,
        } => {
            let token_url = checked_url(state, "auth.tokenUrl", &token_url).await?;
            if client_id.trim().is_empty() || client_id.len() > 512 {
                return Err(ApiError::Unprocessable(
                    "auth.clientId: must be 1 to 512 characters".to_owned(),
                ));
            }
            require_secret("auth.accessToken", &access_token)?;
            let token_expires_at = match (expires_at, expires_in) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::Unprocessable(
                        "auth.expiresAt: give expiresAt or expiresIn, not both".to_owned(),
                    ));
                }
                (Some(at), None) => Some(at.parse::<Timestamp>().map_err(|_| {
                    ApiError::Unprocessable(
                        "auth.expiresAt: must be an RFC 3339 timestamp".to_owned(),
                    )
                })?),
                (None, Some(seconds)) => Some(
                    i64::try_from(seconds)
                        .ok()
                        .and_then(|s| {
                            Timestamp::now()
                                .checked_add(SignedDuration::from_secs(s))
                                .ok()
                        })
                        .ok_or_else(|| {
                            ApiError::Unprocessable("auth.expiresIn: too large".to_owned())
                        })?,
                ),
                (None, None) => None,
            };
            Credentials {
                auth_kind: AuthKind::OAuth2 {
                    token_url,
                    client_id: client_id.trim().to_owned(),
                },
                secrets: Secrets::OAuth2 {
                    access_token,
                    refresh_token,
                    client_secret,
                },
                token_expires_at,
            }
        }
    })
}

fn require_secret(field: &str, value: &SecretString) -> Result<(), ApiError> {
    if value.expose_secret().trim().is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "{field}: must not be empty"
        )));
    }
    Ok(())
}

fn store_error(error: ConnectionError) -> ApiError {
    match error {
        ConnectionError::Exists(provider) => ApiError::Conflict(format!(
            "a connection for provider {provider:?} already exists"
        )),
        ConnectionError::Invalid { field, reason } => {
            ApiError::Unprocessable(format!("{field}: {reason}"))
        }
        ConnectionError::KindMismatch { .. } => ApiError::Unprocessable(error.to_string()),
        ConnectionError::Store(store) => store.into(),
        ConnectionError::Vault(vault) => ApiError::Internal(vault.into()),
    }
}

fn not_found(provider: &str) -> ApiError {
    ApiError::NotFound(format!("no connection for provider {provider:?}"))
}

/// The `{provider}` of a path: a name no connection can have (a NUL or a slash in it, say) is
/// answered 404 before any query.
fn named_provider(provider: &str) -> Result<&str, ApiError> {
    connections::validate_provider(provider)
        .map(|()| provider)
        .map_err(|_| not_found(provider))
}

async fn view(
    state: &AppState,
    keyring: Option<&Keyring>,
    connection: Connection,
) -> ConnectionView {
    let secrets = match keyring {
        Some(keyring) => match connections::load(&state.db, keyring, &connection).await {
            Ok(Some(unsealed)) => unsealed
                .secrets
                .names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            Ok(None) => Vec::new(),
            Err(error) => {
                tracing::warn!(
                    organization_id = %connection.organization_id,
                    provider = %connection.provider,
                    %error,
                    "a connection's secrets cannot be opened"
                );
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let (kind, header, token_url, client_id) = match &connection.auth_kind {
        AuthKind::Bearer => ("bearer", None, None, None),
        AuthKind::ApiKey { header } => ("apiKey", Some(header.clone()), None, None),
        AuthKind::OAuth2 {
            token_url,
            client_id,
        } => (
            "oauth2",
            None,
            Some(token_url.to_string()),
            Some(client_id.clone()),
        ),
    };
    ConnectionView {
        id: connection.id.to_string(),
        organization_id: connection.organization_id,
        provider: connection.provider,
        upstream_url: connection.upstream_url.to_string(),
        auth: AuthView {
            kind: kind.to_owned(),
            header,
            token_url,
            client_id,
            secrets,
            expires_at: connection.token_expires_at.map(|t| t.to_string()),
        },
        state: match connection.state {
            ConnectionState::Active => "active",
            ConnectionState::NeedsReauthorization => "needsReauthorization",
        }
        .to_owned(),
        created_at: connection.created_at.to_string(),
        updated_at: connection.updated_at.to_string(),
    }
}

/// Lists a tenant's connections.
#[utoipa::path(
    get,
    path = "/api/admin/organizations/{organizationId}/connections",
    tag = "admin",
    params(("organizationId" = String, Path, description = "The tenant")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The tenant's connections, without secrets", body = ConnectionList),
        (status = 400, description = "Malformed organization id", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 503, description = "Admin API disabled (no NUBABEL_ADMIN_TOKEN) or Postgres unavailable", body = ErrorBody),
    )
)]
async fn list_connections(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath(organization_id): ApiPath<String>,
) -> Result<Json<ConnectionList>, ApiError> {
    let organization_id = organization(&organization_id)?;
    let keyring = state.credentials.keyring().cloned();
    let found = connections::list(&state.db, organization_id.as_str())
        .await
        .map_err(store_error)?;
    let mut views = Vec::with_capacity(found.len());
    for connection in found {
        views.push(view(&state, keyring.as_deref(), connection).await);
    }
    Ok(Json(ConnectionList { connections: views }))
}

/// Registers a connection.
#[utoipa::path(
    post,
    path = "/api/admin/organizations/{organizationId}/connections",
    tag = "admin",
    params(("organizationId" = String, Path, description = "The tenant")),
    request_body = CreateConnection,
    security(("admin_token" = [])),
    responses(
        (status = 201, description = "Registered; secrets sealed, never returned", body = ConnectionView),
        (status = 400, description = "Malformed JSON or organization id", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 409, description = "The tenant already has a connection for this provider", body = ErrorBody),
        (status = 422, description = "A field is missing or invalid (a refused upstream URL among them)", body = ErrorBody),
        (status = 503, description = "Admin API or vault not configured, or Postgres unavailable", body = ErrorBody),
    )
)]
async fn create_connection(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath(organization_id): ApiPath<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<ConnectionView>), ApiError> {
    let organization_id = organization(&organization_id)?;
    let keyring = keyring(&state)?;
    let request: CreateConnection = parse_body(&body)?;
    connections::validate_provider(&request.provider).map_err(store_error)?;
    let upstream_url = checked_url(&state, "upstreamUrl", &request.upstream_url).await?;
    let credentials = credentials(&state, request.auth).await?;
    let created = connections::create(
        &state.db,
        keyring,
        &NewConnection {
            organization_id: &organization_id,
            provider: &request.provider,
            upstream_url: &upstream_url,
            credentials: &credentials,
        },
    )
    .await
    .map_err(store_error)?;
    tracing::info!(
        organization_id = %created.organization_id,
        provider = %created.provider,
        auth = created.auth_kind.as_str(),
        "registered an MCP connection"
    );
    Ok((
        StatusCode::CREATED,
        Json(view(&state, Some(keyring), created).await),
    ))
}

/// Reads one connection.
#[utoipa::path(
    get,
    path = "/api/admin/organizations/{organizationId}/connections/{provider}",
    tag = "admin",
    params(
        ("organizationId" = String, Path, description = "The tenant"),
        ("provider" = String, Path, description = "The provider name"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The connection, without secrets", body = ConnectionView),
        (status = 400, description = "Malformed organization id", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such connection for this tenant", body = ErrorBody),
        (status = 503, description = "Admin API disabled or Postgres unavailable", body = ErrorBody),
    )
)]
async fn get_connection(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath((organization_id, provider)): ApiPath<(String, String)>,
) -> Result<Json<ConnectionView>, ApiError> {
    let organization_id = organization(&organization_id)?;
    let provider = named_provider(&provider)?;
    let connection = connections::find(&state.db, organization_id.as_str(), provider)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(provider))?;
    let keyring = state.credentials.keyring().cloned();
    Ok(Json(view(&state, keyring.as_deref(), connection).await))
}

/// Changes a connection's upstream URL or credentials.
#[utoipa::path(
    patch,
    path = "/api/admin/organizations/{organizationId}/connections/{provider}",
    tag = "admin",
    params(
        ("organizationId" = String, Path, description = "The tenant"),
        ("provider" = String, Path, description = "The provider name"),
    ),
    request_body = UpdateConnection,
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Updated", body = ConnectionView),
        (status = 400, description = "Malformed JSON or organization id", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such connection for this tenant", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
        (status = 503, description = "Admin API or vault not configured, or Postgres unavailable", body = ErrorBody),
    )
)]
async fn update_connection(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath((organization_id, provider)): ApiPath<(String, String)>,
    body: Bytes,
) -> Result<Json<ConnectionView>, ApiError> {
    let organization_id = organization(&organization_id)?;
    let provider = named_provider(&provider)?;
    let keyring = keyring(&state)?;
    let request: UpdateConnection = parse_body(&body)?;
    let upstream_url = match &request.upstream_url {
        Some(url) => Some(checked_url(&state, "upstreamUrl", url).await?),
        None => None,
    };
    let credentials = match request.auth {
        Some(auth) => Some(credentials(&state, auth).await?),
        None => None,
    };
    let updated = connections::update(
        &state.db,
        keyring,
        organization_id.as_str(),
        provider,
        &ConnectionUpdate {
            upstream_url: upstream_url.as_ref(),
            credentials: credentials.as_ref(),
        },
    )
    .await
    .map_err(store_error)?
    .ok_or_else(|| not_found(provider))?;
    tracing::info!(
        organization_id = %updated.organization_id,
        provider = %updated.provider,
        credentials_replaced = credentials.is_some(),
        "updated an MCP connection"
    );
    Ok(Json(view(&state, Some(keyring), updated).await))
}

/// Deletes a connection and its secrets.
#[utoipa::path(
    delete,
    path = "/api/admin/organizations/{organizationId}/connections/{provider}",
    tag = "admin",
    params(
        ("organizationId" = String, Path, description = "The tenant"),
        ("provider" = String, Path, description = "The provider name"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed organization id", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such connection for this tenant", body = ErrorBody),
        (status = 503, description = "Admin API disabled or Postgres unavailable", body = ErrorBody),
    )
)]
async fn delete_connection(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath((organization_id, provider)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let organization_id = organization(&organization_id)?;
    let provider = named_provider(&provider)?;
    if connections::delete(&state.db, organization_id.as_str(), provider)
        .await
        .map_err(store_error)?
    {
        tracing::info!(%organization_id, %provider, "deleted an MCP connection");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(provider))
    }
}

/// Re-encrypts every connection sealed under an older vault key with the current key (also
/// done at startup); run it after a rotation before dropping the old key.
#[utoipa::path(
    post,
    path = "/api/admin/vault/reencrypt",
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every connection is now sealed with the current key", body = Reencrypted),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 500, description = "Some connections cannot be decrypted with any configured key", body = ErrorBody),
        (status = 503, description = "Admin API or vault not configured, or Postgres unavailable", body = ErrorBody),
    )
)]
async fn reencrypt(
    _admin: Admin,
    State(state): State<AppState>,
) -> Result<Json<Reencrypted>, ApiError> {
    let keyring = keyring(&state)?;
    let count = connections::reencrypt_stale(&state.db, keyring)
        .await
        .map_err(|error| match error {
            ConnectionError::Store(store) => store.into(),
            other => ApiError::Internal(other.into()),
        })?;
    Ok(Json(Reencrypted {
        reencrypted: count,
        key_id: keyring.current_key_id().to_owned(),
    }))
}
