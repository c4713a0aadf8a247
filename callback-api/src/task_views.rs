//! A tenant's tasks as the read API and the web view show them: listed from the
//! `DelegatedTask` objects of the token's namespace (newest first, filtered, paged by cursor),
//! one task in full (the whole answer from Postgres, or only Postgres once the object is
//! gone), and cancelling one through `spec.cancel`.
//!
//! A task belongs to the tenant when it is in the token's namespace and its
//! `spec.organizationId` is the token's organization; any other task is "not found", so a
//! token never learns whether another tenant's task exists.

use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use nubabel_crds::v1alpha1::{DelegatedTask, TaskPhase};
use nubabel_store::{api_tokens::TokenGrant, results};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;

use crate::error::ApiError;

/// The field manager of cancellation writes.
pub const CANCEL_FIELD_MANAGER: &str = "nubabel-callback-api-cancel";
/// Most tasks in one page.
pub const MAX_PAGE: usize = 200;
/// Tasks in a page when the request does not say.
pub const DEFAULT_PAGE: usize = 50;
/// Characters of the prompt a list entry keeps.
const PROMPT_EXCERPT_CHARS: usize = 120;

/// One task in a list.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TaskSummary {
    /// The DelegatedTask's name.
    pub name: String,
    /// Its `metadata.uid`.
    pub uid: String,
    /// Pending, Queued, Running, Succeeded, Failed, Cancelled or TimedOut.
    pub phase: String,
    /// The Nubabel session (conversation).
    pub session_id: Option<String>,
    /// The Nubabel user who asked.
    pub user_id: Option<String>,
    /// The start of the prompt.
    pub prompt_excerpt: String,
    /// When the task was created (RFC 3339).
    pub created_at: Option<String>,
    /// When it finished, if it has.
    pub completed_at: Option<String>,
    /// Whether cancelling it was asked for.
    pub cancel_requested: bool,
}

/// Tool calls and messages so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ProgressView {
    /// Progress events received.
    pub events: i64,
    /// Tool calls started.
    pub tools_started: i64,
    /// Tool calls finished.
    pub tools_completed: i64,
    /// The most recent tool called.
    pub last_tool: Option<String>,
    /// The last line the agent wrote.
    pub last_message: Option<String>,
}

/// One subagent the task's turn started (oh-my-opencode's `task` tool), as the operator last
/// saw it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct SubagentView {
    /// Its OpenCode session.
    pub session_id: String,
    /// The session it was started from.
    pub parent_session_id: String,
    /// The agent that runs it, e.g. `Sisyphus-Junior`.
    pub agent: Option<String>,
    /// Its title (the delegated description).
    pub title: Option<String>,
    /// Running, Idle, Failed or Aborted.
    pub state: String,
    /// Tool calls it started.
    pub tools_started: i64,
    /// Tool calls it finished.
    pub tools_completed: i64,
}

/// What a task changed in one repository (the patch is at `/api/tasks/{name}/changes`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ChangeSummary {
    /// Where the repository is in the workspace.
    pub path: String,
    /// Files changed.
    pub files_changed: i64,
    /// Lines added.
    pub lines_added: i64,
    /// Lines removed.
    pub lines_removed: i64,
    /// The first files changed.
    pub files: Vec<String>,
}

/// Why a task did not succeed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TaskErrorView {
    /// A CamelCase reason, e.g. `DeadlineExceeded`.
    pub reason: String,
    /// In words.
    pub message: String,
}

/// One task in full.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TaskDetail {
    /// What a list shows of it.
    #[serde(flatten)]
    pub summary: TaskSummary,
    /// The whole prompt (absent once only the stored outcome is left).
    pub prompt: Option<String>,
    /// When OpenCode accepted the prompt.
    pub dispatched_at: Option<String>,
    /// The sidecar fleet it ran on.
    pub sidecar: Option<String>,
    /// Tool calls and messages so far.
    pub progress: ProgressView,
    /// The agent's whole final answer, once it has one.
    pub answer: Option<String>,
    /// Why it did not succeed.
    pub error: Option<TaskErrorView>,
    /// What it changed, per repository.
    pub changes: Vec<ChangeSummary>,
    /// The subagents its turn started, oldest first.
    pub subagents: Vec<SubagentView>,
    /// Whether the task object still exists (false: only its stored outcome is left).
    pub live: bool,
}

/// What a list keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    /// Only tasks in this phase.
    pub phase: Option<TaskPhase>,
    /// Only tasks of this session.
    pub session_id: Option<String>,
    /// Only tasks of this user.
    pub user_id: Option<String>,
}

/// Where a page starts: after the task created at `created` (Unix seconds) named `name`, in
/// newest-first order. Written `<seconds>:<name>` (names hold no `:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    created: i64,
    name: String,
}

impl Cursor {
    /// Reads a cursor as [`Cursor::to_string`] writes it.
    pub fn parse(value: &str) -> Result<Self, ApiError> {
        value
            .split_once(':')
            .and_then(|(created, name)| {
                Some(Self {
                    created: created.parse().ok()?,
                    name: name.to_owned(),
                })
            })
            .filter(|c| !c.name.is_empty())
            .ok_or_else(|| ApiError::BadRequest("cursor: not a cursor this API returned".into()))
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.created, self.name)
    }
}

/// One page of tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Newest first.
    pub tasks: Vec<TaskSummary>,
    /// Where the next page starts, if there is one.
    pub next: Option<Cursor>,
}

/// Reads a phase name.
pub fn parse_phase(value: &str) -> Result<TaskPhase, ApiError> {
    TaskPhase::ALL
        .into_iter()
        .find(|p| p.as_str().eq_ignore_ascii_case(value))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "phase: one of {}",
                TaskPhase::ALL.map(TaskPhase::as_str).join(", ")
            ))
        })
}

/// The page size a request asks for, bounded.
pub fn page_size(requested: Option<usize>) -> Result<usize, ApiError> {
    match requested {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::BadRequest(format!("limit: from 1 to {MAX_PAGE}"))),
    }
}

fn created_seconds(task: &DelegatedTask) -> i64 {
    task.metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second())
}

/// Whether `task` is the tenant's.
fn belongs_to(task: &DelegatedTask, organization_id: &str) -> bool {
    task.spec.organization_id == organization_id
}

/// The page of `tasks` (all of a namespace) that `organization_id` sees under `filter`,
/// starting after `after`, newest first.
pub fn page(
    tasks: Vec<DelegatedTask>,
    organization_id: &str,
    filter: &TaskFilter,
    after: Option<&Cursor>,
    limit: usize,
) -> Page {
    let mut kept: Vec<DelegatedTask> = tasks
        .into_iter()
        .filter(|t| belongs_to(t, organization_id))
        .filter(|t| filter.phase.is_none_or(|p| t.phase() == p))
        .filter(|t| {
            filter
                .session_id
                .as_ref()
                .is_none_or(|s| t.spec.session_id.as_ref() == Some(s))
        })
        .filter(|t| {
            filter
                .user_id
                .as_ref()
                .is_none_or(|u| t.spec.user_id.as_ref() == Some(u))
        })
        .collect();
    let key = |t: &DelegatedTask| (created_seconds(t), t.name_any());
    kept.sort_by_key(|t| std::cmp::Reverse(key(t)));
    let start = after.map_or(0, |c| {
        let bound = (c.created, c.name.clone());
        kept.partition_point(|t| key(t) >= bound)
    });
    let rest = kept.get(start..).unwrap_or_default();
    let next = (rest.len() > limit).then(|| {
        let last = &rest[limit - 1];
        Cursor {
            created: created_seconds(last),
            name: last.name_any(),
        }
    });
    Page {
        tasks: rest.iter().take(limit).map(summary).collect(),
        next,
    }
}

fn time(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> Option<String> {
    t.map(|t| t.0.to_string())
}

fn excerpt(prompt: &str) -> String {
    let mut chars = prompt.chars();
    let cut: String = chars.by_ref().take(PROMPT_EXCERPT_CHARS).collect();
    if chars.next().is_some() {
        format!("{cut}…")
    } else {
        cut
    }
}

/// What a list shows of `task`.
pub fn summary(task: &DelegatedTask) -> TaskSummary {
    let status = task.status.as_ref();
    TaskSummary {
        name: task.name_any(),
        uid: task.uid().unwrap_or_default(),
        phase: task.phase().as_str().to_owned(),
        session_id: task.spec.session_id.clone(),
        user_id: task.spec.user_id.clone(),
        prompt_excerpt: excerpt(&task.spec.prompt),
        created_at: time(task.metadata.creation_timestamp.as_ref()),
        completed_at: time(status.and_then(|s| s.completion_time.as_ref())),
        cancel_requested: task.spec.cancel,
    }
}

/// `task` in full; `stored_answer` is the whole answer from Postgres, if recorded.
pub fn detail(task: &DelegatedTask, stored_answer: Option<String>) -> TaskDetail {
    let status = task.status.clone().unwrap_or_default();
    let progress = status.progress.unwrap_or_default();
    TaskDetail {
        summary: summary(task),
        prompt: Some(task.spec.prompt.clone()),
        dispatched_at: time(status.dispatch_time.as_ref()),
        sidecar: status.sidecar,
        progress: ProgressView {
            events: progress.events,
            tools_started: progress.tools_started,
            tools_completed: progress.tools_completed,
            last_tool: progress.last_tool,
            last_message: progress.last_message,
        },
        answer: stored_answer.or(status.output),
        error: status.error.map(|e| TaskErrorView {
            reason: e.reason,
            message: e.message,
        }),
        changes: status
            .workspace
            .map(|w| w.changes)
            .unwrap_or_default()
            .into_iter()
            .map(|c| ChangeSummary {
                path: c.path,
                files_changed: c.files_changed,
                lines_added: c.lines_added,
                lines_removed: c.lines_removed,
                files: c.files,
            })
            .collect(),
        subagents: status
            .subagents
            .into_iter()
            .map(|a| SubagentView {
                session_id: a.session_id,
                parent_session_id: a.parent_session_id,
                agent: a.agent,
                title: a.title,
                state: a.state,
                tools_started: a.tools_started,
                tools_completed: a.tools_completed,
            })
            .collect(),
        live: true,
    }
}

/// A task whose object is gone, from its stored outcome.
fn detail_from_stored(name: &str, stored: results::StoredResult) -> TaskDetail {
    TaskDetail {
        summary: TaskSummary {
            name: name.to_owned(),
            uid: stored.task_uid.to_string(),
            phase: stored.phase,
            session_id: stored.session_id,
            user_id: None,
            prompt_excerpt: String::new(),
            created_at: None,
            completed_at: Some(stored.recorded_at.to_string()),
            cancel_requested: false,
        },
        prompt: None,
        dispatched_at: None,
        sidecar: None,
        progress: ProgressView::default(),
        answer: stored.output,
        error: stored.error_reason.map(|reason| TaskErrorView {
            reason,
            message: stored.error_message.unwrap_or_default(),
        }),
        changes: Vec::new(),
        subagents: Vec::new(),
        live: false,
    }
}

/// The tenant's tasks in its namespace, through `client`.
pub struct TenantTasks<'a> {
    api: Api<DelegatedTask>,
    grant: &'a TokenGrant,
    db: &'a PgPool,
}

/// What cancelling did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// `spec.cancel` is set (now or before); the operator stops the task.
    Requested(TaskSummary),
    /// The task had ended already, in this phase.
    AlreadyEnded(TaskPhase),
}

impl<'a> TenantTasks<'a> {
    /// The tasks `grant` may see.
    pub fn new(client: Client, grant: &'a TokenGrant, db: &'a PgPool) -> Self {
        Self {
            api: Api::namespaced(client, &grant.namespace),
            grant,
            db,
        }
    }

    /// A page of tasks, newest first.
    pub async fn list(
        &self,
        filter: &TaskFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page, ApiError> {
        // No label selector: tasks applied by hand carry no labels, and `page` keeps only the
        // tenant's by `spec.organizationId`.
        let tasks = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(kube_read_error)?;
        Ok(page(
            tasks.items,
            &self.grant.organization_id,
            filter,
            after,
            limit,
        ))
    }

    /// The tenant's task object named `name`, if it exists.
    async fn object(&self, name: &str) -> Result<Option<DelegatedTask>, ApiError> {
        if nubabel_contract::identity::validate_object_name("name", name).is_err() {
            return Ok(None);
        }
        Ok(self
            .api
            .get_opt(name)
            .await
            .map_err(kube_read_error)?
            .filter(|t| belongs_to(t, &self.grant.organization_id)))
    }

    /// Task `name` in full: from its object, or from its stored outcome once the object is
    /// gone.
    pub async fn get(&self, name: &str) -> Result<TaskDetail, ApiError> {
        let not_found = || ApiError::NotFound(format!("no task {name}"));
        if let Some(task) = self.object(name).await? {
            let stored = match task.uid().and_then(|uid| uid.parse().ok()) {
                Some(uid) => results::output(self.db, uid).await?,
                None => None,
            };
            return Ok(detail(&task, stored));
        }
        if name.contains('\0') {
            return Err(not_found());
        }
        let stored = results::newest(
            self.db,
            &self.grant.organization_id,
            &self.grant.namespace,
            name,
        )
        .await?
        .ok_or_else(not_found)?;
        Ok(detail_from_stored(name, stored))
    }

    /// Asks the operator to stop task `name` (`spec.cancel: true`).
    pub async fn cancel(&self, name: &str) -> Result<CancelOutcome, ApiError> {
        let task = self
            .object(name)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no task {name}")))?;
        if task.phase().is_finished() {
            return Ok(CancelOutcome::AlreadyEnded(task.phase()));
        }
        let patch = serde_json::json!({
            "apiVersion": "nubabel.io/v1alpha1",
            "kind": "DelegatedTask",
            "spec": {"cancel": true},
        });
        let patched = self
            .api
            .patch(
                name,
                &PatchParams::apply(CANCEL_FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(kube_read_error)?;
        Ok(CancelOutcome::Requested(summary(&patched)))
    }
}

fn kube_read_error(error: kube::Error) -> ApiError {
    match error {
        kube::Error::Api(status) if status.code == 404 => ApiError::NotFound("no such task".into()),
        kube::Error::Api(status) if status.code == 409 => {
            ApiError::Conflict(format!("the task changed meanwhile: {}", status.message))
        }
        other => ApiError::Unavailable(anyhow::anyhow!("calling kubernetes: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use nubabel_crds::v1alpha1::DelegatedTaskStatus;

    fn task(name: &str, org: &str, created: i64, phase: TaskPhase) -> DelegatedTask {
        let mut task = DelegatedTask::new(
            name,
            serde_json::from_value(serde_json::json!({
                "organizationId": org, "prompt": format!("prompt of {name}"),
                "sessionId": format!("s-{}", created % 2), "userId": format!("u-{}", created % 3),
            }))
            .unwrap(),
        );
        task.metadata.creation_timestamp =
            Some(Time(jiff::Timestamp::from_second(created).unwrap()));
        task.status = Some(DelegatedTaskStatus {
            phase: Some(phase),
            ..DelegatedTaskStatus::default()
        });
        task
    }

    fn names(page: &Page) -> Vec<&str> {
        page.tasks.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn a_tasks_detail_carries_the_subagents_its_status_lists() {
        let mut task = task("t", "acme", 1, TaskPhase::Running);
        task.status.as_mut().unwrap().subagents = vec![nubabel_crds::v1alpha1::SubagentStatus {
            session_id: "ses_c".into(),
            parent_session_id: "ses_p".into(),
            agent: Some("oracle".into()),
            state: "Idle".into(),
            tools_started: 3,
            tools_completed: 3,
            ..Default::default()
        }];
        let subagents = detail(&task, None).subagents;
        assert_eq!(subagents.len(), 1);
        assert_eq!(
            (subagents[0].agent.as_deref(), subagents[0].state.as_str()),
            (Some("oracle"), "Idle")
        );
        assert_eq!(subagents[0].parent_session_id, "ses_p");
    }

    #[test]
    fn pages_run_newest_first_and_a_cursor_continues_where_the_last_page_ended() {
        let tasks: Vec<_> = (1..=5)
            .map(|i| task(&format!("t{i}"), "acme", i, TaskPhase::Running))
            .chain([task("other", "globex", 9, TaskPhase::Running)])
            .collect();
        let first = page(tasks.clone(), "acme", &TaskFilter::default(), None, 2);
        assert_eq!(names(&first), ["t5", "t4"]);
        let cursor = Cursor::parse(&first.next.clone().unwrap().to_string()).unwrap();
        let second = page(
            tasks.clone(),
            "acme",
            &TaskFilter::default(),
            Some(&cursor),
            2,
        );
        assert_eq!(names(&second), ["t3", "t2"]);
        let third = page(
            tasks,
            "acme",
            &TaskFilter::default(),
            second.next.as_ref(),
            2,
        );
        assert_eq!(names(&third), ["t1"]);
        assert_eq!(third.next, None);
    }

    #[test]
    fn filters_keep_only_the_phase_session_and_user_asked_for() {
        let tasks: Vec<_> = (1..=6)
            .map(|i| {
                let phase = if i % 2 == 0 {
                    TaskPhase::Succeeded
                } else {
                    TaskPhase::Running
                };
                task(&format!("t{i}"), "acme", i, phase)
            })
            .collect();
        let only = |filter: TaskFilter| {
            names(&page(tasks.clone(), "acme", &filter, None, 50))
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let phase = TaskFilter {
            phase: Some(TaskPhase::Succeeded),
            ..TaskFilter::default()
        };
        assert_eq!(only(phase), ["t6", "t4", "t2"]);
        let session = TaskFilter {
            session_id: Some("s-1".into()),
            ..TaskFilter::default()
        };
        assert_eq!(only(session), ["t5", "t3", "t1"]);
        let user = TaskFilter {
            user_id: Some("u-0".into()),
            ..TaskFilter::default()
        };
        assert_eq!(only(user), ["t6", "t3"]);
    }

    #[test]
    fn bad_cursors_phases_and_limits_are_refused_by_name() {
        assert!(Cursor::parse("nope").is_err());
        assert!(Cursor::parse("12:").is_err());
        assert!(parse_phase("running").is_ok());
        assert!(
            parse_phase("Done")
                .unwrap_err()
                .to_string()
                .starts_with("phase:")
        );
        assert!(page_size(Some(0)).is_err());
        assert_eq!(page_size(None).unwrap(), DEFAULT_PAGE);
    }
}
