//! The routes, and the OpenAPI document built from the same registrations.
//!
//! Every route is registered through `utoipa_axum::routes!`, which takes the path and method
//! from the handler's `#[utoipa::path]`, so the document cannot list a route the router does
//! not serve or miss one it does. `docs/openapi.json` is a committed copy, checked by a test.

pub mod connections;
pub mod delegate;
pub mod health;
pub mod invoke;
pub mod mcp;
pub mod mcp_tokens;
pub mod sessions;
pub mod slack;
pub mod stream;
pub mod stream_tokens;
pub mod task_reads;
pub mod tasks;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, MatchedPath, Request},
    middleware,
};
use std::time::Duration;

use tower_http::{timeout::TimeoutLayer, trace::TraceLayer};
use utoipa::{
    Modify, OpenApi,
    openapi::{
        self,
        security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{error, metrics, state::AppState};

/// The document's fixed parts; paths come from the routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Nubabel callback API",
        description = "Signed sidecar callbacks, session event streams and operations endpoints.",
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "callbacks", description = "Sidecar callbacks, signed in the Standard Webhooks style"),
        (name = "stream", description = "Session events over Server-Sent Events"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
        (name = "delegate", description = "Delegating a task, as Nubabel's delegate_task does"),
        (name = "tasks", description = "A tenant's tasks and sessions, read and cancelled with its API token (the web view at /ui uses the same reads)"),
        (name = "slack", description = "The Slack bot's Events API endpoint"),
        (name = "mcp", description = "The MCP gateway: tenant tools over MCP (streamable HTTP) and the REST form"),
        (name = "admin", description = "Tenants' MCP connections and the credential vault, for platform administrators; served only on the admin listener (NUBABEL_ADMIN_HTTP_ADDR, loopback by default), not on the API's port"),
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "sidecar_signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "webhook-signature",
                "`v1,<base64> v2,<base64>`: v2 is HMAC-SHA256(key, \"nubabel-request/v2\\0\" + \
                 webhook-id + \"\\0\" + webhook-timestamp + \"\\0\" + method + \"\\0\" + \
                 path-and-query + \"\\0\" + body), required unless the server accepts body-only \
                 v1 signatures during an upgrade; with headers `webhook-id`, `webhook-timestamp`, \
                 `x-nubabel-organization` and `x-nubabel-sidecar: <namespace>/<name>`; the key is \
                 derived from the master key and the sidecar's identity (docs/callback-api.md).",
            ))),
        );
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin token (`NUBABEL_ADMIN_TOKEN`); without one configured the \
                         admin routes answer 503.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "mcp_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The sidecar fleet's MCP token (`nmcp_...`, derived from the master key and \
                         the fleet's identity), with headers `x-nubabel-organization` and \
                         `x-nubabel-sidecar: <namespace>/<name>`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "stream_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "HS256 JWT with `aud: nubabel-session-stream`, `org`, optional `sid`, \
                         `exp` at most one hour ahead.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A tenant API token (`nbt_...`) from `nubabel-callback-api token create`; \
                         it fixes the organization and the namespace of the tasks.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "slack_signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-slack-signature",
                "Slack's `v0=<hex HMAC-SHA256(signing secret, v0:{timestamp}:{body})>` with \
                 `x-slack-request-timestamp` within five minutes.",
            ))),
        );
    }
}

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "This document", content_type = "application/json")))]
async fn get_openapi() -> Json<openapi::OpenApi> {
    Json(openapi())
}

/// Every route but the admin API's.
fn api_router(max_body_bytes: usize, request_timeout: Duration) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(sessions::router().layer(DefaultBodyLimit::max(max_body_bytes)))
        .merge(mcp::router().layer(DefaultBodyLimit::max(max_body_bytes)))
        .merge(invoke::router().layer(DefaultBodyLimit::max(max_body_bytes)))
        .merge(stream::router())
        .merge(health::router())
        .merge(slack::router())
        .merge(tasks::router())
        .merge(task_reads::router())
        .routes(routes!(health::get_metrics))
        .routes(routes!(get_openapi))
        // Applies to the routes above; a waiting delegate request has its own bound.
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .merge(delegate::router().layer(DefaultBodyLimit::max(
            max_body_bytes.max(DELEGATE_MAX_BODY_BYTES),
        )))
}

/// The admin API, served on its own listener.
fn admin_api_router(max_body_bytes: usize, request_timeout: Duration) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(connections::router().layer(DefaultBodyLimit::max(max_body_bytes)))
        .merge(stream_tokens::router().layer(DefaultBodyLimit::max(max_body_bytes)))
        .merge(mcp_tokens::router().layer(DefaultBodyLimit::max(max_body_bytes)))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
}

/// Largest `POST /api/delegate` body: a prompt may be up to 256 KiB.
const DELEGATE_MAX_BODY_BYTES: usize = 512 * 1024;

/// The OpenAPI document of every route, the admin listener's included.
pub fn openapi() -> openapi::OpenApi {
    api_router(0, Duration::ZERO)
        .merge(admin_api_router(0, Duration::ZERO))
        .into_openapi()
}

/// The application but the admin API; plain requests taking longer than `request_timeout`
/// are answered 408.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let (router, _) = api_router(state.settings.max_body_bytes, request_timeout).split_for_parts();
    serve_with(router.merge(crate::web::router(request_timeout)), state)
}

/// The admin API alone, for its own listener.
pub fn admin_router(state: AppState, request_timeout: Duration) -> Router {
    let (router, _) =
        admin_api_router(state.settings.max_body_bytes, request_timeout).split_for_parts();
    serve_with(router, state)
}

/// `router` with the layers every listener has: failure logs, metrics and trace spans.
fn serve_with(router: Router<AppState>, state: AppState) -> Router {
    router
        .route_layer(middleware::from_fn(error::log_failures))
        .route_layer(middleware::from_fn_with_state(
            std::sync::Arc::clone(&state.metrics),
            metrics::track_requests,
        ))
        // Spans name the route template, never the URI: a stream token may sit in the query.
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let matched_path = request
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or("unmatched", MatchedPath::as_str);
                tracing::info_span!("http", method = %request.method(), matched_path)
            }),
        )
        .with_state(state)
}
