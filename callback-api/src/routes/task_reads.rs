//! The tenant's read API, with its API token: list tasks, read one, cancel one, and read a
//! session's turns and events. The token fixes the organization and the namespace, so another
//! tenant's task or session is not found (404). Served with the delegate API (it reads the
//! same `DelegatedTask` objects).

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use nubabel_contract::identity::OrganizationId;
use nubabel_store::{
    api_tokens::TokenGrant,
    events::{self, StoredEvent},
    sessions::resolve_session,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::delegate::authenticate;
use crate::{
    error::{ApiError, ErrorBody},
    extract::{ApiPath, ApiQuery},
    state::AppState,
    task_views::{self, CancelOutcome, Cursor, TaskDetail, TaskFilter, TaskSummary, TenantTasks},
};

/// Most events in one page of `GET /api/sessions/{sessionId}/events`.
const MAX_EVENTS_PAGE: i64 = 500;

/// The read API's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tasks))
        .routes(routes!(get_task))
        .routes(routes!(cancel_task))
        .routes(routes!(session_turns))
        .routes(routes!(session_events))
}

/// The Kubernetes client the task reads go through.
pub(crate) fn kube_client(state: &AppState) -> Result<kube::Client, ApiError> {
    state
        .kube
        .clone()
        .map(|k| k.0)
        .ok_or(ApiError::NotConfigured(
            "the task API is turned off on this server (NUBABEL_DELEGATE_API)",
        ))
}

/// Query of `GET /api/tasks`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only tasks in this phase (Pending, Queued, Running, Succeeded, Failed, Cancelled,
    /// TimedOut).
    pub phase: Option<String>,
    /// Only tasks of this Nubabel session.
    pub session: Option<String>,
    /// Only tasks of this Nubabel user.
    pub user: Option<String>,
    /// Tasks per page, 1 to 200 (default 50).
    pub limit: Option<usize>,
    /// Where to continue: a `next_cursor` of an earlier page.
    pub cursor: Option<String>,
}

impl ListQuery {
    /// The filter, page size and cursor it asks for.
    pub(crate) fn parse(&self) -> Result<(TaskFilter, usize, Option<Cursor>), ApiError> {
        let filter = TaskFilter {
            phase: self
                .phase
                .as_deref()
                .filter(|p| !p.is_empty())
                .map(task_views::parse_phase)
                .transpose()?,
            session_id: self.session.clone().filter(|s| !s.is_empty()),
            user_id: self.user.clone().filter(|u| !u.is_empty()),
        };
        let cursor = self.cursor.as_deref().map(Cursor::parse).transpose()?;
        Ok((filter, task_views::page_size(self.limit)?, cursor))
    }
}

/// A page of tasks.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    /// Newest first.
    pub tasks: Vec<TaskSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /api/tasks`: the tenant's tasks, newest first.
#[utoipa::path(
    get,
    path = "/api/tasks",
    tag = "tasks",
    params(ListQuery),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "A page of tasks", body = TaskList),
        (status = 400, description = "A bad phase, limit or cursor (the message names it)", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API token", body = ErrorBody),
        (status = 404, description = "The task API is turned off on this server", body = ErrorBody),
        (status = 503, description = "Postgres or Kubernetes unavailable", body = ErrorBody),
    )
)]
async fn list_tasks(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
    headers: HeaderMap,
) -> Result<Json<TaskList>, ApiError> {
    let grant = authenticate(&state, &headers).await?;
    let (filter, limit, cursor) = query.parse()?;
    let page = TenantTasks::new(kube_client(&state)?, &grant, &state.db)
        .list(&filter, cursor.as_ref(), limit)
        .await?;
    Ok(Json(TaskList {
        tasks: page.tasks,
        next_cursor: page.next.map(|c| c.to_string()),
    }))
}

/// `GET /api/tasks/{name}`: one task, with its whole answer once it has one.
#[utoipa::path(
    get,
    path = "/api/tasks/{name}",
    tag = "tasks",
    params(("name" = String, Path, description = "The task's name, in the token's namespace")),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "The task; `live: false` when only its stored outcome is left", body = TaskDetail),
        (status = 401, description = "Missing, unknown or revoked API token", body = ErrorBody),
        (status = 404, description = "No task of that name for the token's tenant", body = ErrorBody),
        (status = 503, description = "Postgres or Kubernetes unavailable", body = ErrorBody),
    )
)]
async fn get_task(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<TaskDetail>, ApiError> {
    let grant = authenticate(&state, &headers).await?;
    let tasks = TenantTasks::new(kube_client(&state)?, &grant, &state.db);
    Ok(Json(tasks.get(&name).await?))
}

/// The answer of a cancel that was accepted.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CancelAccepted {
    /// The task, with `cancel_requested: true`; the operator ends it `Cancelled`.
    pub task: TaskSummary,
}

/// `POST /api/tasks/{name}/cancel`: asks the operator to stop the task (`spec.cancel`).
#[utoipa::path(
    post,
    path = "/api/tasks/{name}/cancel",
    tag = "tasks",
    params(("name" = String, Path, description = "The task's name, in the token's namespace")),
    security(("api_token" = [])),
    responses(
        (status = 202, description = "Cancelling; the task ends Cancelled shortly", body = CancelAccepted),
        (status = 401, description = "Missing, unknown or revoked API token", body = ErrorBody),
        (status = 404, description = "No task of that name for the token's tenant", body = ErrorBody),
        (status = 409, description = "The task had ended already; the message names its phase", body = ErrorBody),
        (status = 503, description = "Postgres or Kubernetes unavailable", body = ErrorBody),
    )
)]
async fn cancel_task(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let grant = authenticate(&state, &headers).await?;
    let tasks = TenantTasks::new(kube_client(&state)?, &grant, &state.db);
    let task = cancel_outcome(&name, tasks.cancel(&name).await?)?;
    tracing::info!(namespace = %grant.namespace, task = %name, organization = %grant.organization_id, "task cancel requested");
    Ok((StatusCode::ACCEPTED, Json(CancelAccepted { task })).into_response())
}

/// The cancelled task, or the 409 of a task that had ended.
pub(crate) fn cancel_outcome(name: &str, outcome: CancelOutcome) -> Result<TaskSummary, ApiError> {
    match outcome {
        CancelOutcome::Requested(task) => Ok(task),
        CancelOutcome::AlreadyEnded(phase) => Err(ApiError::Conflict(format!(
            "task {name} already ended: {phase}"
        ))),
    }
}

/// Query of `GET /api/sessions/{sessionId}/turns`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TurnsQuery {
    /// Turns per page, 1 to 200 (default 50).
    pub limit: Option<usize>,
    /// Where to continue: a `next_cursor` of an earlier page.
    pub cursor: Option<String>,
}

/// `GET /api/sessions/{sessionId}/turns`: the tasks of one conversation, newest first.
#[utoipa::path(
    get,
    path = "/api/sessions/{sessionId}/turns",
    tag = "tasks",
    params(("sessionId" = String, Path, description = "The Nubabel session id"), TurnsQuery),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "A page of the session's tasks (empty for a session without any)", body = TaskList),
        (status = 400, description = "A bad limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API token", body = ErrorBody),
        (status = 503, description = "Postgres or Kubernetes unavailable", body = ErrorBody),
    )
)]
async fn session_turns(
    State(state): State<AppState>,
    ApiPath(session_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<TurnsQuery>,
    headers: HeaderMap,
) -> Result<Json<TaskList>, ApiError> {
    let list = ListQuery {
        phase: None,
        session: Some(session_id),
        user: None,
        limit: query.limit,
        cursor: query.cursor,
    };
    list_tasks(State(state), ApiQuery(list), headers).await
}

/// Query of `GET /api/sessions/{sessionId}/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events after this sequence number (default 0: from the first); pass the last
    /// page's `next_after` to resume.
    pub after: Option<i64>,
    /// Events per page, 1 to 500 (default 100).
    pub limit: Option<i64>,
}

/// A page of a session's events.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    /// Oldest first, each with its sequence number (`seq`), kind, type, body and time.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<StoredEvent>,
    /// The last sequence number of this page (or `after` when it is empty): pass it as
    /// `after` to read on.
    pub next_after: i64,
}

/// `GET /api/sessions/{sessionId}/events`: a session's committed events, paged by sequence
/// number (the same numbers as the SSE stream's `id`).
#[utoipa::path(
    get,
    path = "/api/sessions/{sessionId}/events",
    tag = "tasks",
    params(("sessionId" = String, Path, description = "The Nubabel session id, or an OpenCode session id (`ses_...`) it is mapped to"), EventsQuery),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 400, description = "A bad after or limit", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API token", body = ErrorBody),
        (status = 404, description = "No such session for the token's tenant", body = ErrorBody),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    )
)]
async fn session_events(
    State(state): State<AppState>,
    ApiPath(session_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Json<EventPage>, ApiError> {
    let grant = authenticate(&state, &headers).await?;
    let after = query.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::BadRequest("after: must not be negative".into()));
    }
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_EVENTS_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit: from 1 to {MAX_EVENTS_PAGE}"
        )));
    }
    let events = session_events_after(&state, &grant, &session_id, after, limit).await?;
    let next_after = events.last().map_or(after, |e| e.seq);
    Ok(Json(EventPage { events, next_after }))
}

/// Events of the tenant's session `session_id` after `after`, oldest first.
pub(crate) async fn session_events_after(
    state: &AppState,
    grant: &TokenGrant,
    session_id: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, ApiError> {
    let organization = OrganizationId::parse(&grant.organization_id)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored token organization: {e}")))?;
    if session_id.contains('\0') {
        return Err(ApiError::SessionNotFound);
    }
    let session = resolve_session(&state.db, &organization, session_id)
        .await?
        .ok_or(ApiError::SessionNotFound)?;
    Ok(events::list_after(&state.db, session.pk, after, limit).await?)
}
