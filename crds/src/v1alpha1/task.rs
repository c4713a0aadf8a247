//! `DelegatedTask`: one prompt for one tenant, optionally continuing an earlier conversation.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema;

/// Largest `spec.prompt` the API server accepts, in bytes. Larger inputs belong in the
/// workspace the agent reads, not in etcd.
pub const MAX_PROMPT_BYTES: u32 = 256 * 1024;

/// Bytes of the final answer kept in `status.output`; the whole text stays in Postgres.
pub const MAX_OUTPUT_BYTES: usize = 4 * 1024;

/// Default of `spec.timeoutSeconds`.
pub const DEFAULT_TIMEOUT_SECONDS: i64 = 600;

/// The desired state of a delegated task: what to ask, for whom, in which conversation.
// NB: the printcolumn(...) lists repeat keys by design, which clippy reads as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "nubabel.io",
    version = "v1alpha1",
    kind = "DelegatedTask",
    plural = "delegatedtasks",
    singular = "delegatedtask",
    shortname = "dtask",
    category = "nubabel",
    namespaced,
    status = "DelegatedTaskStatus",
    doc = "One prompt for one tenant's OpenCode sidecars. Tasks with the same sessionId continue one OpenCode conversation.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the task is in its life"
    ),
    printcolumn(
        name = "Sidecar",
        type_ = "string",
        json_path = ".status.sidecar",
        description = "The OpencodeSidecar the task runs on"
    ),
    printcolumn(
        name = "Session",
        type_ = "string",
        json_path = ".spec.sessionId",
        description = "The Nubabel session (conversation) of the task"
    ),
    printcolumn(
        name = "Tools",
        type_ = "integer",
        json_path = ".status.progress.toolsCompleted",
        description = "Tool calls completed so far"
    ),
    printcolumn(
        name = "Pod",
        type_ = "string",
        json_path = ".status.sidecarPod",
        priority = "1",
        description = "The sidecar pod that runs the task"
    ),
    printcolumn(
        name = "OpenCode-Session",
        type_ = "string",
        json_path = ".status.opencodeSessionId",
        priority = "1",
        description = "The OpenCode session id on that pod"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DelegatedTaskSpec {
    /// The OpencodeSidecar (in this namespace) to run on. Without it, the operator picks the
    /// sidecar of `organizationId` in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_ref: Option<SidecarRef>,

    /// The Nubabel organization (tenant) the task belongs to. It must match the sidecar's.
    #[schemars(length(min = 1, max = 253))]
    pub organization_id: String,

    /// The Nubabel user who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,

    /// The Nubabel session (conversation). Tasks with the same sessionId continue the same
    /// OpenCode session on the same pod while that pod lives; without it, the task starts a
    /// new conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub session_id: Option<String>,

    /// What to ask the agent.
    #[schemars(length(min = 1, max = MAX_PROMPT_BYTES))]
    pub prompt: String,

    /// The kind of work, as Nubabel's delegate_task names it (e.g. `quick`, `deep`,
    /// `visual-engineering`): the turn runs on the model the fleet's `categories` map gives it.
    /// A category the fleet does not list fails the task `UnknownCategory` before anything is
    /// sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,

    /// Skills to load for this task's turn, by name: their instructions, from the fleet's
    /// `skillsConfigMapRef`, reach the agent as extra system instructions. A skill the fleet
    /// does not have fails the task `UnknownSkill` before anything is sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_skills: Vec<String>,

    /// The OpenCode agent to run the prompt with (e.g. `build`, `plan`). Defaults to the
    /// server's default agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,

    /// Free-form context from the caller: it reaches the agent after the prompt, in the same
    /// message, as `Context from the requester (JSON):` and the JSON in a fenced block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::free_form_object")]
    pub context: Option<serde_json::Value>,

    /// Seconds the task may run after it is dispatched; then it is aborted and ends TimedOut.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: i64,

    /// Seconds the task may wait for capacity (phases Pending and Queued) before it ends
    /// TimedOut. Without it, the task waits until it runs or is cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub pending_timeout_seconds: Option<i64>,

    /// Set to true to stop the task: a running task is aborted and ends Cancelled.
    #[serde(default)]
    pub cancel: bool,

    /// Seconds after the task finished before it is deleted. Without it, finished tasks stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Where to tell people about the task's progress and result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySpec>,

    /// What the conversation works on. Every conversation (sessionId) gets a directory of its
    /// own on its pod, which no other conversation sees; the first turn fills it with these
    /// repositories and files, and later turns of the same sessionId continue in it as the
    /// earlier ones left it (this field is not read again). A source that cannot be fetched
    /// fails the task `WorkspaceUnavailable` before anything is sent to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceSpec>,
}

/// The repositories and files a conversation's workspace starts with.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceSpec {
    /// Git repositories, cloned over HTTP(S) in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub repositories: Vec<GitRepository>,
    /// Files written after the repositories (instructions, `AGENTS.md`, fixtures).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub files: Vec<WorkspaceFile>,
}

/// One Git repository of a workspace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitRepository {
    /// `https://` (or `http://`) clone URL, without credentials.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Branch, tag or commit to check out (detached); the remote's default branch when absent.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub git_ref: Option<String>,
    /// Where in the workspace the checkout goes, relative, without `..`; the workspace itself
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub path: Option<String>,
    /// Commits of history to fetch; all of it when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub depth: Option<u32>,
    /// A Secret in the task's namespace with keys `username` and `password` (a token works as
    /// the password). They are sent to the pod's bridge for the fetch only: never in a pod spec,
    /// the workspace's `.git/config`, the agent's environment, a status, an event or a log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

/// A Secret in the task's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// One file of a workspace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceFile {
    /// Where the file goes, relative to the workspace, without `..` or `.git`.
    #[schemars(length(min = 1, max = 512))]
    pub path: String,
    /// Its content.
    #[schemars(length(max = 262144))]
    pub content: String,
}

fn default_timeout_seconds() -> i64 {
    DEFAULT_TIMEOUT_SECONDS
}

/// A reference to an OpencodeSidecar in the task's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarRef {
    /// Name of the OpencodeSidecar.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Notification targets of a task.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotifySpec {
    /// A Slack thread that shows the task's progress and answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<SlackTarget>,
}

/// A Slack channel, and optionally a thread in it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlackTarget {
    /// Slack channel id, e.g. `C0123456789`.
    #[schemars(length(min = 1))]
    pub channel: String,
    /// Timestamp of the thread's first message; without it, a new thread is started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<String>,
}

/// Where a task is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TaskPhase {
    /// Accepted, not yet looked at by the operator.
    Pending,
    /// Waiting for a ready sidecar pod with free capacity.
    Queued,
    /// The prompt was sent; the agent is working.
    Running,
    /// The agent finished; the answer is in `status.output`.
    Succeeded,
    /// The task cannot run or the agent reported an error; see `status.error`.
    Failed,
    /// Stopped by `spec.cancel` or by deleting the task.
    Cancelled,
    /// The deadline passed; the agent was aborted.
    TimedOut,
}

impl TaskPhase {
    /// Every phase, in the order a task can pass through them.
    pub const ALL: [Self; 7] = [
        Self::Pending,
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
    ];

    /// The phase's name as the API writes it (`status.phase`), for storing and printing.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Queued => "Queued",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
            Self::TimedOut => "TimedOut",
        }
    }

    /// Whether the task has ended and will not change phase again.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::TimedOut
        )
    }
}

impl std::fmt::Display for TaskPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DelegatedTask {
    /// The phase the task's status reports, if the operator has written one.
    pub fn reported_phase(&self) -> Option<TaskPhase> {
        self.status.as_ref().and_then(|s| s.phase)
    }

    /// Where the task is in its life: the reported phase, `Pending` before there is one.
    pub fn phase(&self) -> TaskPhase {
        self.reported_phase().unwrap_or(TaskPhase::Pending)
    }
}

/// The observed state of a delegated task.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DelegatedTaskStatus {
    /// Pending, Queued, Running, Succeeded, Failed, Cancelled or TimedOut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TaskPhase>,

    /// Dispatched and Succeeded (and others), each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,

    /// The OpencodeSidecar the task was resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<String>,

    /// The sidecar pod the task runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_pod: Option<String>,

    /// The OpenCode session on that pod (`ses_...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opencode_session_id: Option<String>,

    /// The OpenCode message id of the task's prompt, once OpenCode has it: the agent's answer
    /// is what follows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_message_id: Option<String>,

    /// How many times the operator tried to dispatch the prompt.
    #[serde(default)]
    pub attempts: i32,

    /// When OpenCode accepted the prompt; `timeoutSeconds` counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_time: Option<Time>,

    /// When the task finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// A bounded summary of what the agent has done so far, kept up to date by the
    /// callback API about once a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TaskProgress>,

    /// The subagents the task's turn started (oh-my-opencode's `task` tool), at most
    /// [`MAX_SUBAGENTS`], oldest first, as the operator last saw them in OpenCode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subagents: Vec<SubagentStatus>,

    /// The agent's final answer, truncated to a few KiB; the whole text is kept in the
    /// database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,

    /// Why the task failed, timed out or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The conversation's workspace on its pod, as the turn found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceStatus>,
}

/// A conversation's workspace as a turn saw it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceStatus {
    /// The directory on the pod: OpenCode's project directory for the conversation.
    pub directory: String,
    /// Whether this turn created it (false: an earlier turn of the conversation did).
    #[serde(default)]
    pub created: bool,
    /// Its size on disk in bytes: when the turn started, then when it ended.
    #[serde(default)]
    pub bytes: i64,
    /// Each repository when the turn started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<RepositoryStatus>,
    /// What the turn changed in each repository, once it ended (the whole patch is kept in
    /// the database).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<RepositoryChangeStatus>,
}

/// Most files a change summary names; `filesChanged` counts them all.
pub const MAX_CHANGED_FILES_LISTED: usize = 20;

/// What a turn changed in one repository.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryChangeStatus {
    /// Where the repository is in the workspace.
    pub path: String,
    /// The commit checked out when the turn started.
    pub commit_before: String,
    /// The commit checked out when it ended (the agent may have committed).
    pub commit_after: String,
    /// Files added, changed or deleted, committed or not.
    pub files_changed: i64,
    /// Lines added, over all files.
    pub lines_added: i64,
    /// Lines removed, over all files.
    pub lines_removed: i64,
    /// The first files changed, in path order (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

/// One repository of a workspace when a turn started.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryStatus {
    /// Where it is in the workspace (`.` for the workspace itself).
    pub path: String,
    /// The commit checked out.
    pub commit: String,
    /// The tree of the whole working copy, the point the turn's changes are measured from.
    pub tree: String,
}

/// Subagents listed in a task's status at most.
pub const MAX_SUBAGENTS: usize = 20;

/// One subagent session of a task's turn.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubagentStatus {
    /// Its OpenCode session (`ses_...`); its parent is the task's session or another subagent.
    pub session_id: String,
    /// The session it was started from.
    pub parent_session_id: String,
    /// The agent that runs it, e.g. `Sisyphus-Junior`, `oracle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Its title, as the plugin set it (the delegated description).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Running, Idle (its work is done), Failed or Aborted.
    pub state: String,
    /// Tool calls it started.
    #[serde(default)]
    pub tools_started: i64,
    /// Tool calls it finished.
    #[serde(default)]
    pub tools_completed: i64,
}

/// A bounded summary of a task's progress events.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskProgress {
    /// Progress events received for the task.
    #[serde(default)]
    pub events: i64,
    /// Tool calls started.
    #[serde(default)]
    pub tools_started: i64,
    /// Tool calls finished (successfully or not).
    #[serde(default)]
    pub tools_completed: i64,
    /// The most recent tool the agent called, e.g. `bash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tool: Option<String>,
    /// When the most recent event happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_time: Option<Time>,
    /// The last line of text the agent wrote, truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message: Option<String>,
}

/// Why a task did not succeed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskError {
    /// A CamelCase reason, e.g. `SidecarNotFound`, `APIError`, `DeadlineExceeded`.
    pub reason: String,
    /// What happened, in words.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_is_stored_and_printed_by_the_name_the_api_writes() {
        for phase in TaskPhase::ALL {
            let serialized = serde_json::to_value(phase).unwrap();
            assert_eq!(serialized, phase.as_str(), "{phase:?}");
            assert_eq!(phase.to_string(), phase.as_str());
        }
    }

    #[test]
    fn a_task_without_a_reported_phase_is_pending() {
        let mut task = DelegatedTask::new(
            "t",
            serde_json::from_value(serde_json::json!({"organizationId": "o", "prompt": "p"}))
                .unwrap(),
        );
        assert_eq!(task.reported_phase(), None);
        assert_eq!(task.phase(), TaskPhase::Pending);
        task.status = Some(DelegatedTaskStatus {
            phase: Some(TaskPhase::Running),
            ..DelegatedTaskStatus::default()
        });
        assert_eq!(task.phase(), TaskPhase::Running);
    }
}
