//! The web view, under `/ui`: sign in with a tenant API token, the tenant's tasks refreshed
//! live, a task's progress, answer and changes, and a cancel button. Server-rendered HTML
//! (`pages`) with one small embedded script that refreshes the live parts; docs/web.md argues
//! the choice.
//!
//! Who is signed in: an `Authorization: Bearer nbt_...` header (what an authenticating proxy in
//! front would send), else the `nubabel_token` cookie the sign-in form sets (HttpOnly,
//! SameSite=Strict, path `/ui`). Every request checks the token again, so a revoked token is
//! signed out at once. Every response carries a strict Content-Security-Policy: scripts only
//! from `/ui/assets`, no inline script, so nothing in an answer could run even if it slipped
//! through escaping.

pub mod markdown;
pub mod pages;

use std::time::Duration;

use axum::{
    Form, Router,
    extract::{Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware,
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use nubabel_store::{api_tokens, api_tokens::TokenGrant, events::StoredEvent};
use serde::Deserialize;
use tower_http::timeout::TimeoutLayer;

use crate::{
    error::ApiError,
    extract::ApiPath,
    routes::task_reads::{ListQuery, cancel_outcome, kube_client, session_events_after},
    state::AppState,
    task_views::{TaskDetail, TenantTasks},
};
use pages::BASE;

/// The cookie holding the signed-in tenant's token.
pub const TOKEN_COOKIE: &str = "nubabel_token";
/// How long a sign-in lasts in the browser (the token itself may be revoked sooner).
const COOKIE_MAX_AGE_SECONDS: u64 = 12 * 3600;
/// The policy every page is served with.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";
/// Seconds after a task's recorded end whose events still count as its own.
const END_GRACE_SECONDS: i64 = 3;
/// Most events of a session the task page reads.
const PAGE_EVENTS: i64 = 500;

const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The web view's routes; plain requests taking longer than `request_timeout` get 408.
pub fn router(request_timeout: Duration) -> Router<AppState> {
    Router::new()
        .route(
            BASE,
            get(|| async { Redirect::to(&format!("{BASE}/tasks")) }),
        )
        .route(&format!("{BASE}/sign-in"), get(sign_in_page).post(sign_in))
        .route(&format!("{BASE}/sign-out"), post(sign_out))
        .route(&format!("{BASE}/tasks"), get(task_list))
        .route(&format!("{BASE}/tasks/rows"), get(task_rows))
        .route(&format!("{BASE}/tasks/{{name}}"), get(task_page))
        .route(&format!("{BASE}/tasks/{{name}}/live"), get(task_live))
        .route(&format!("{BASE}/tasks/{{name}}/cancel"), post(cancel))
        .route(&format!("{BASE}/assets/app.js"), get(script))
        .route(&format!("{BASE}/assets/app.css"), get(stylesheet))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(middleware::map_response(secure_headers))
}

async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = |headers: &mut HeaderMap, name, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        CONTENT_SECURITY_POLICY,
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    if !headers.contains_key(header::CACHE_CONTROL) {
        set(headers, header::CACHE_CONTROL, "no-store");
    }
    response
}

/// What a web request failed with: a page for people, a status for the refresh script.
enum WebError {
    /// No valid sign-in: the sign-in page (pages) or 401 (live parts).
    SignedOut,
    /// A problem page with this status.
    Problem(StatusCode, String, String),
}

impl From<ApiError> for WebError {
    fn from(error: ApiError) -> Self {
        let message = error.to_string();
        let detail = format!("{error:?}");
        let status = error.into_response().status();
        if status.is_server_error() {
            tracing::warn!(error = %detail, "web view request failed");
        }
        let title = match status {
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::BAD_REQUEST => "Bad request",
            StatusCode::CONFLICT => "Conflict",
            _ => "Unavailable",
        };
        let message = if status.is_server_error() {
            "The service cannot answer right now; try again shortly.".to_owned()
        } else {
            message
        };
        Self::Problem(status, title.to_owned(), message)
    }
}

/// A response of a page route.
type PageResult = Result<Response, WebError>;

fn page_error(error: WebError, organization: &str) -> Response {
    match error {
        WebError::SignedOut => Redirect::to(&format!("{BASE}/sign-in")).into_response(),
        WebError::Problem(status, title, message) => {
            (status, Html(pages::problem(organization, &title, &message))).into_response()
        }
    }
}

fn fragment_error(error: WebError) -> Response {
    match error {
        WebError::SignedOut => StatusCode::UNAUTHORIZED.into_response(),
        WebError::Problem(status, _, message) => (status, message).into_response(),
    }
}

/// The token a request presents: a proxy's Authorization header, else the cookie.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(bearer.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value.to_owned())
}

async fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<TokenGrant, WebError> {
    let token = presented_token(headers).ok_or(WebError::SignedOut)?;
    api_tokens::authenticate(&state.db, &token)
        .await
        .map_err(|e| WebError::from(ApiError::from(e)))?
        .ok_or(WebError::SignedOut)
}

/// Whether a state-changing request comes from this site's own pages: browsers name the
/// requesting site in `Sec-Fetch-Site` (or at least `Origin`); the cookie is SameSite=Strict
/// as well.
fn is_same_origin(headers: &HeaderMap) -> bool {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = value("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    match (value("origin"), value("host")) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, origin_host)| origin_host == host),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

async fn sign_in_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match signed_in(&state, &headers).await {
        Ok(_) => Redirect::to(&format!("{BASE}/tasks")).into_response(),
        Err(_) => Html(pages::sign_in(None)).into_response(),
    }
}

/// The sign-in form.
#[derive(Debug, Deserialize)]
struct SignIn {
    token: String,
}

async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Response {
    if !is_same_origin(&headers) {
        return (
            StatusCode::FORBIDDEN,
            Html(pages::sign_in(Some("Sign in from this site's own page."))),
        )
            .into_response();
    }
    let token = form.token.trim();
    let valid_chars = !token.is_empty()
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let grant = if valid_chars {
        api_tokens::authenticate(&state.db, token).await
    } else {
        Ok(None)
    };
    match grant {
        Ok(Some(grant)) => {
            tracing::info!(organization = %grant.organization_id, "web sign-in");
            let secure = headers
                .get("x-forwarded-proto")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
            let cookie = format!(
                "{TOKEN_COOKIE}={token}; Path={BASE}; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE_SECONDS}{}",
                if secure { "; Secure" } else { "" }
            );
            match HeaderValue::from_str(&cookie) {
                Ok(cookie) => (
                    [(header::SET_COOKIE, cookie)],
                    Redirect::to(&format!("{BASE}/tasks")),
                )
                    .into_response(),
                Err(_) => bad_token(),
            }
        }
        Ok(None) => bad_token(),
        Err(error) => page_error(WebError::from(ApiError::from(error)), ""),
    }
}

fn bad_token() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Html(pages::sign_in(Some(
            "That token is unknown, revoked or malformed.",
        ))),
    )
        .into_response()
}

async fn sign_out(headers: HeaderMap) -> Response {
    if !is_same_origin(&headers) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let cookie =
        HeaderValue::from_static("nubabel_token=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0");
    (
        [(header::SET_COOKIE, cookie)],
        Redirect::to(&format!("{BASE}/sign-in")),
    )
        .into_response()
}

async fn task_list(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    let grant = match signed_in(&state, &headers).await {
        Ok(grant) => grant,
        Err(error) => return page_error(error, ""),
    };
    let result: PageResult = async {
        let (filter, limit, cursor) = query.parse()?;
        let page = TenantTasks::new(kube_client(&state)?, &grant, &state.db)
            .list(&filter, cursor.as_ref(), limit)
            .await?;
        Ok(Html(pages::task_list(
            &grant.organization_id,
            &filter,
            &page,
            cursor.is_some(),
        ))
        .into_response())
    }
    .await;
    result.unwrap_or_else(|e| page_error(e, &grant.organization_id))
}

async fn task_rows(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    let result: PageResult = async {
        let grant = signed_in(&state, &headers).await?;
        let (filter, limit, cursor) = query.parse()?;
        let page = TenantTasks::new(kube_client(&state)?, &grant, &state.db)
            .list(&filter, cursor.as_ref(), limit)
            .await?;
        Ok(Html(pages::task_rows(&page.tasks)).into_response())
    }
    .await;
    result.unwrap_or_else(fragment_error)
}

/// Task `name` and the events of its session during its turn.
async fn task_and_events(
    state: &AppState,
    grant: &TokenGrant,
    name: &str,
) -> Result<(TaskDetail, Vec<StoredEvent>), WebError> {
    let task = TenantTasks::new(kube_client(state)?, grant, &state.db)
        .get(name)
        .await?;
    let events = match &task.summary.session_id {
        Some(session) => match session_events_after(state, grant, session, 0, PAGE_EVENTS).await {
            Ok(events) => during_turn(&task, events),
            Err(ApiError::SessionNotFound) => Vec::new(),
            Err(other) => return Err(other.into()),
        },
        None => Vec::new(),
    };
    Ok((task, events))
}

/// The events of a session that arrived while `task` ran (events name no task, a task's turn
/// is the time from its creation to its end).
fn during_turn(task: &TaskDetail, events: Vec<StoredEvent>) -> Vec<StoredEvent> {
    let parse = |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok());
    let start = parse(&task.summary.created_at);
    // Completion times are whole seconds and the last events commit just after the end.
    let end = parse(&task.summary.completed_at).and_then(|end| {
        end.checked_add(jiff::SignedDuration::from_secs(END_GRACE_SECONDS))
            .ok()
    });
    events
        .into_iter()
        .filter(|e| start.is_none_or(|s| e.received_at >= s))
        .filter(|e| end.is_none_or(|end| e.received_at <= end))
        .collect()
}

#[derive(Debug, Deserialize)]
struct Notice {
    notice: Option<String>,
}

async fn task_page(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    Query(notice): Query<Notice>,
    headers: HeaderMap,
) -> Response {
    let grant = match signed_in(&state, &headers).await {
        Ok(grant) => grant,
        Err(error) => return page_error(error, ""),
    };
    match task_and_events(&state, &grant, &name).await {
        Ok((task, events)) => Html(pages::task_page(
            &grant.organization_id,
            &task,
            &events,
            notice.notice.as_deref(),
        ))
        .into_response(),
        Err(error) => page_error(error, &grant.organization_id),
    }
}

async fn task_live(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    let result: PageResult = async {
        let grant = signed_in(&state, &headers).await?;
        let (task, events) = task_and_events(&state, &grant, &name).await?;
        Ok(Html(pages::task_live(&task, &events, None)).into_response())
    }
    .await;
    result.unwrap_or_else(fragment_error)
}

async fn cancel(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    let grant = match signed_in(&state, &headers).await {
        Ok(grant) => grant,
        Err(error) => return page_error(error, ""),
    };
    if !is_same_origin(&headers) {
        return page_error(
            WebError::Problem(
                StatusCode::FORBIDDEN,
                "Forbidden".into(),
                "Cancel from this site's own task page.".into(),
            ),
            &grant.organization_id,
        );
    }
    let result = async {
        let tasks = TenantTasks::new(kube_client(&state)?, &grant, &state.db);
        cancel_outcome(&name, tasks.cancel(&name).await?)
    }
    .await;
    let task_url = format!(
        "{BASE}/tasks/{}",
        url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
    );
    match result {
        Ok(_) => {
            tracing::info!(namespace = %grant.namespace, task = %name, organization = %grant.organization_id, "task cancel requested from the web view");
            Redirect::to(&task_url).into_response()
        }
        // A task that had ended: its page, saying so, with 409.
        Err(ApiError::Conflict(message)) => match task_and_events(&state, &grant, &name).await {
            Ok((task, events)) => (
                StatusCode::CONFLICT,
                Html(pages::task_page(
                    &grant.organization_id,
                    &task,
                    &events,
                    Some(&message),
                )),
            )
                .into_response(),
            Err(error) => page_error(error, &grant.organization_id),
        },
        Err(error) => page_error(error.into(), &grant.organization_id),
    }
}

async fn script() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

async fn stylesheet() -> Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    header::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn a_proxy_header_wins_over_the_cookie() {
        assert_eq!(
            presented_token(&headers(&[("cookie", "a=b; nubabel_token=nbt_c")])).as_deref(),
            Some("nbt_c")
        );
        assert_eq!(
            presented_token(&headers(&[
                ("cookie", "nubabel_token=nbt_c"),
                ("authorization", "Bearer nbt_p")
            ]))
            .as_deref(),
            Some("nbt_p")
        );
        assert_eq!(presented_token(&headers(&[("cookie", "other=1")])), None);
    }

    #[test]
    fn only_requests_from_the_sites_own_pages_change_anything() {
        assert!(is_same_origin(&headers(&[(
            "sec-fetch-site",
            "same-origin"
        )])));
        assert!(!is_same_origin(&headers(&[(
            "sec-fetch-site",
            "cross-site"
        )])));
        assert!(is_same_origin(&headers(&[
            ("origin", "http://h:1"),
            ("host", "h:1")
        ])));
        assert!(!is_same_origin(&headers(&[
            ("origin", "http://evil"),
            ("host", "h:1")
        ])));
        assert!(is_same_origin(&headers(&[])));
    }
}
