//! `GET /api/tasks/{name}/changes`: what a finished task changed in its conversation's
//! workspace, per repository, with the whole patch, for the tenant whose API token asks. The
//! token fixes the organization and the namespace, so another tenant's task is not found.

use axum::{Json, extract::State, http::HeaderMap};
use nubabel_store::{changes, results};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::delegate::authenticate;
use crate::{
    error::{ApiError, ErrorBody},
    extract::ApiPath,
    state::AppState,
};

/// The task routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(task_changes))
}

/// Lines added and removed in one file.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChangedFile {
    /// The file, relative to its repository.
    pub path: String,
    /// Lines added (0 for a binary file).
    pub added: u64,
    /// Lines removed (0 for a binary file).
    pub removed: u64,
}

/// What the task changed in one repository.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RepositoryChange {
    /// Where the repository is in the workspace (`.` for the workspace itself).
    pub path: String,
    /// The commit checked out when the turn started.
    pub commit_before: String,
    /// The commit checked out when it ended.
    pub commit_after: String,
    /// Files changed, committed or not, in path order.
    pub files: Vec<ChangedFile>,
    /// The whole change as a unified diff (binary files named, not included; cut at 4 MiB).
    pub patch: String,
}

/// The answer of `GET /api/tasks/{name}/changes`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskChanges {
    /// The task.
    pub name: String,
    /// Its `metadata.uid`.
    pub uid: String,
    /// Per repository of its workspace; empty when it changed nothing or has no repository.
    pub repositories: Vec<RepositoryChange>,
}

/// `GET /api/tasks/{name}/changes`.
#[utoipa::path(
    get,
    path = "/api/tasks/{name}/changes",
    tag = "delegate",
    params(("name" = String, Path, description = "The task's name, in the token's namespace (the newest finished task of that name)")),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "What the task changed", body = TaskChanges),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, description = "Missing, unknown or revoked API token", body = ErrorBody),
        (status = 404, description = "No finished task of that name for the token's tenant", body = ErrorBody),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    )
)]
async fn task_changes(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<TaskChanges>, ApiError> {
    let grant = authenticate(&state, &headers).await?;
    let not_found = || ApiError::NotFound(format!("no finished task {name}"));
    if name.contains('\0') {
        return Err(not_found());
    }
    let uid = results::newest_uid(&state.db, &grant.organization_id, &grant.namespace, &name)
        .await?
        .ok_or_else(not_found)?;
    let repositories = changes::for_task(&state.db, uid)
        .await?
        .into_iter()
        .map(|change| RepositoryChange {
            path: change.repository_path,
            commit_before: change.commit_before,
            commit_after: change.commit_after,
            files: change
                .files
                .into_iter()
                .map(|f| ChangedFile {
                    path: f.path,
                    added: f.added,
                    removed: f.removed,
                })
                .collect(),
            patch: change.patch,
        })
        .collect();
    Ok(Json(TaskChanges {
        name,
        uid: uid.to_string(),
        repositories,
    }))
}
