//! `/mcp`: the MCP gateway as an MCP server over the streamable HTTP transport.
//!
//! Stateless, as the transport allows: no `Mcp-Session-Id` is assigned, so any replica answers
//! any request. Every POST carries one JSON-RPC message; requests are answered with one JSON
//! body, notifications and responses with 202. There is no server-to-client stream, so GET
//! (and DELETE, there being no session to end) answer 405.
//!
//! Sidecars authenticate with their fleet's MCP token (`Authorization: Bearer nmcp_...`,
//! derived from the master key and the fleet's identity) and name the fleet in
//! `x-nubabel-organization` and `x-nubabel-sidecar`; the token is checked against those
//! headers, so a fleet sees exactly its own tenant's tools. A token's generation below the
//! fleet's floor (see `routes::mcp_tokens`) is refused like a wrong token.

use axum::{
    body::Bytes,
    extract::{FromRequestParts, State},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use nubabel_contract::{
    identity::{SidecarIdentity, validate_object_name},
    signing::verify_mcp_token,
};
use nubabel_store::{mcp_tokens, sessions::validate_session_id};
use serde_json::{Map, Value, json};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::{ORGANIZATION_HEADER, SIDECAR_HEADER},
    error::{ApiError, ErrorBody},
    mcp::{
        CallError, Caller,
        protocol::{
            self, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND,
            PROTOCOL_VERSION_HEADER, Readable,
        },
    },
    state::AppState,
};

/// Header naming the calling pod (OpenCode fills it from the pod's `NUBABEL_POD_NAME`).
pub const POD_HEADER: &str = "x-nubabel-pod";
/// Header naming the calling session, for clients that know it.
pub const SESSION_HEADER: &str = "x-nubabel-session";
/// `_meta` key of `tools/call` naming the calling session, for clients that know it.
pub const SESSION_META_KEY: &str = "nubabel.io/sessionId";

/// The `/mcp` routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(post_mcp, get_mcp))
}

/// A sidecar fleet authenticated by its MCP token.
#[derive(Debug)]
pub struct McpCaller {
    /// The fleet.
    pub sidecar: SidecarIdentity,
    /// The pod, if named.
    pub pod: Option<String>,
    /// The session, if named.
    pub session: Option<String>,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

impl FromRequestParts<AppState> for McpCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        let token = header(headers, header::AUTHORIZATION.as_str())
            .ok_or_else(|| ApiError::Unauthorized("missing authorization header".into()))?
            .strip_prefix("Bearer ")
            .map(str::trim)
            .ok_or_else(|| ApiError::Unauthorized("authorization must be a Bearer token".into()))?;
        let organization = header(headers, ORGANIZATION_HEADER).ok_or_else(|| {
            ApiError::Unauthorized(format!("missing {ORGANIZATION_HEADER} header"))
        })?;
        let sidecar = header(headers, SIDECAR_HEADER)
            .ok_or_else(|| ApiError::Unauthorized(format!("missing {SIDECAR_HEADER} header")))?;
        let sidecar = SidecarIdentity::from_headers(organization, sidecar)
            .map_err(|e| ApiError::Unauthorized(format!("invalid caller identity: {e}")))?;
        let Some(generation) = verify_mcp_token(&state.keys.master, &sidecar, token) else {
            return Err(ApiError::Unauthorized(
                "the bearer token is not this sidecar's MCP token".into(),
            ));
        };
        if generation < mcp_tokens::lowest_accepted(&state.db, &sidecar).await? {
            return Err(ApiError::Unauthorized(format!(
                "generation {generation} of this sidecar's MCP token was retired"
            )));
        }
        let pod = header(headers, POD_HEADER)
            .filter(|pod| !pod.is_empty())
            .map(|pod| {
                validate_object_name(POD_HEADER, pod)
                    .map(|()| pod.to_owned())
                    .map_err(|e| ApiError::BadRequest(e.to_string()))
            })
            .transpose()?;
        let session = header(headers, SESSION_HEADER)
            .filter(|session| !session.is_empty())
            .map(|session| {
                validate_session_id(SESSION_HEADER, session)
                    .map(|()| session.to_owned())
                    .map_err(|e| ApiError::BadRequest(e.to_string()))
            })
            .transpose()?;
        Ok(Self {
            sidecar,
            pod,
            session,
        })
    }
}

/// One JSON-RPC message to the MCP gateway (`initialize`, `ping`, `tools/list`, `tools/call`,
/// or a notification).
#[utoipa::path(
    post,
    path = "/mcp",
    tag = "mcp",
    request_body(content = Object, content_type = "application/json", description = "One JSON-RPC 2.0 message"),
    params(
        ("x-nubabel-organization" = String, Header, description = "The sidecar's organization"),
        ("x-nubabel-sidecar" = String, Header, description = "The sidecar fleet, `<namespace>/<name>`"),
        ("x-nubabel-pod" = Option<String>, Header, description = "The calling pod; lets tool calls be recorded against the pod's working session"),
        ("MCP-Protocol-Version" = Option<String>, Header, description = "The negotiated revision (2025-11-25, 2025-06-18 or 2025-03-26)"),
    ),
    security(("mcp_token" = [])),
    responses(
        (status = 200, description = "The JSON-RPC response to a request", content_type = "application/json"),
        (status = 202, description = "A notification or response was accepted"),
        (status = 400, description = "Not JSON, not a JSON-RPC message, a batch, or an unsupported MCP-Protocol-Version", content_type = "application/json"),
        (status = 401, description = "Missing, wrong or retired MCP token, or wrong identity headers", body = ErrorBody),
        (status = 403, description = "The request carries an Origin header (browsers are not served)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 503, description = "Postgres unavailable (the token's generation cannot be checked)", body = ErrorBody),
    )
)]
async fn post_mcp(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Result<McpCaller, ApiError>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    // Origin first: a browser page must not reach this, whatever it carries (DNS rebinding).
    if headers.contains_key(header::ORIGIN) {
        return ApiError::Forbidden("requests with an Origin header are not accepted".into())
            .into_response();
    }
    let caller = match caller {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    if let Some(version) = header(&headers, PROTOCOL_VERSION_HEADER)
        && !protocol::is_supported(version)
    {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            None,
            INVALID_REQUEST,
            &format!(
                "unsupported MCP-Protocol-Version {version:?}; supported: {}",
                protocol::SUPPORTED_PROTOCOL_VERSIONS.join(", ")
            ),
        );
    }
    let is_json = header(&headers, header::CONTENT_TYPE.as_str())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return ApiError::UnsupportedMediaType.into_response();
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return ApiError::PayloadTooLarge(state.settings.max_body_bytes).into_response();
        }
        Err(_) => {
            return ApiError::BadRequest("failed to read the request body".into()).into_response();
        }
    };
    let (id, method, params) = match protocol::read_message(&body) {
        Ok(Readable::Request { id, method, params }) => (id, method, params),
        // Notifications (initialized, cancelled, ...) and responses need no answer.
        Ok(Readable::NoAnswer) => return StatusCode::ACCEPTED.into_response(),
        Err(unreadable) => {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                unreadable.id.as_ref(),
                unreadable.code,
                unreadable.message,
            );
        }
    };
    let params = match params {
        Ok(params) => params,
        Err(error) => {
            return rpc_ok(protocol::failure(
                Some(&id),
                INVALID_PARAMS,
                &error.to_string(),
            ));
        }
    };
    let answer = match method.as_str() {
        "initialize" => Ok(initialize(&params)),
        "ping" => Ok(json!({})),
        "tools/list" => list_tools(&state, &caller).await,
        "tools/call" => call_tool(&state, caller, &params).await,
        other => Err((METHOD_NOT_FOUND, format!("method not found: {other}"))),
    };
    rpc_ok(match answer {
        Ok(result) => protocol::success(&id, result),
        Err((code, message)) => protocol::failure(Some(&id), code, &message),
    })
}

/// The GET stream of the transport, which this stateless gateway does not offer.
#[utoipa::path(
    get,
    path = "/mcp",
    tag = "mcp",
    responses((status = 405, description = "No server-to-client stream: use POST")),
)]
async fn get_mcp() -> Response {
    let mut response = StatusCode::METHOD_NOT_ALLOWED.into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

fn initialize(params: &Map<String, Value>) -> Value {
    let requested = params.get("protocolVersion").and_then(Value::as_str);
    json!({
        "protocolVersion": protocol::negotiate(requested),
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": {
            "name": "nubabel-mcp-gateway",
            "title": "Nubabel MCP gateway",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "instructions": "The tools of your organization's connected services, named <provider>_<tool>. \
                         They run with the organization's credentials, which stay on the server.",
    })
}

type RpcResult = Result<Value, (i64, String)>;

async fn list_tools(state: &AppState, caller: &McpCaller) -> RpcResult {
    let organization_id = caller.sidecar.organization_id().as_str();
    match state
        .mcp
        .list_tools(&state.mcp_context(), organization_id)
        .await
    {
        Ok(tools) => Ok(json!({ "tools": tools })),
        Err(error) => Err(internal(&error)),
    }
}

async fn call_tool(state: &AppState, caller: McpCaller, params: &Map<String, Value>) -> RpcResult {
    let Some(name) = params.get("name").and_then(Value::as_str) else {
        return Err((INVALID_PARAMS, "params.name must be a string".into()));
    };
    let arguments = match params.get("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(arguments)) => arguments.clone(),
        Some(_) => return Err((INVALID_PARAMS, "params.arguments must be an object".into())),
    };
    let named_session = params
        .get("_meta")
        .and_then(|meta| meta.get(SESSION_META_KEY))
        .and_then(Value::as_str)
        .filter(|id| validate_session_id(SESSION_META_KEY, id).is_ok())
        .map(str::to_owned);
    let caller = Caller {
        sidecar: caller.sidecar,
        pod: caller.pod,
        session: named_session.or(caller.session),
        via: "mcp",
    };
    match state
        .mcp
        .call_tool(&state.mcp_context(), &caller, name, arguments)
        .await
    {
        Ok(outcome) => Ok(outcome.result),
        Err(CallError::UnknownTool(name)) => Err((INVALID_PARAMS, format!("unknown tool: {name}"))),
        Err(error) => Err(internal(&error)),
    }
}

fn internal(error: &CallError) -> (i64, String) {
    tracing::error!(error = ?error, "MCP request failed");
    (INTERNAL_ERROR, "internal error".into())
}

fn rpc_ok(body: Value) -> Response {
    (StatusCode::OK, axum::Json(body)).into_response()
}

fn rpc_error(status: StatusCode, id: Option<&Value>, code: i64, message: &str) -> Response {
    (status, axum::Json(protocol::failure(id, code, message))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initialize_negotiates_and_offers_tools_only() {
        let mut params = Map::new();
        params.insert("protocolVersion".into(), json!("2025-06-18"));
        let result = initialize(&params);
        assert_eq!(result["protocolVersion"], "2025-06-18");
        assert_eq!(
            result["capabilities"],
            json!({"tools": {"listChanged": false}})
        );
        let result = initialize(&Map::new());
        assert_eq!(result["protocolVersion"], protocol::LATEST_PROTOCOL_VERSION);
    }
}
