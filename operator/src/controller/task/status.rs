//! The task's status: the fields this controller owns, built purely for each step, and one
//! server-side apply to write them.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use nubabel_crds::conditions::{self, status as cstatus, types};
use nubabel_crds::v1alpha1::{
    DelegatedTask, DelegatedTaskStatus, MAX_OUTPUT_BYTES, TaskError, TaskPhase, WorkspaceStatus,
};

use super::plan::{Ending, reasons};
use crate::controller::FIELD_MANAGER;

/// The fields of status this controller owns (everything but the callback API's progress).
pub fn own_status(task: &DelegatedTask) -> DelegatedTaskStatus {
    let mut status = task.status.clone().unwrap_or_default();
    status.progress = None;
    status
}

/// Sets condition `type_` of `status`, keeping its transition time unless its value flips;
/// true when anything changed.
pub fn set_condition(
    status: &mut DelegatedTaskStatus,
    task: &DelegatedTask,
    type_: &str,
    value: &str,
    reason: &str,
    message: String,
) -> bool {
    // The API server of Kubernetes 1.20 turns an empty message into null under server-side
    // apply, which the schema refuses: never send one.
    let message = if message.is_empty() {
        reason.to_owned()
    } else {
        message
    };
    conditions::set_condition(
        &mut status.conditions,
        conditions::condition(
            type_,
            value,
            reason,
            message,
            task.metadata.generation,
            Time(Timestamp::now()),
        ),
    )
}

/// The status of a task waiting for capacity in fleet `sidecar`, or `None` when the task
/// already waits for the same reason (nothing to write).
pub fn queued(
    task: &DelegatedTask,
    sidecar: Option<&str>,
    reason: &str,
    message: &str,
) -> Option<DelegatedTaskStatus> {
    let mut status = own_status(task);
    let was_queued = status.phase == Some(TaskPhase::Queued);
    status.phase = Some(TaskPhase::Queued);
    status.sidecar = sidecar.map(str::to_owned);
    let changed = set_condition(
        &mut status,
        task,
        types::DISPATCHED,
        cstatus::FALSE,
        reason,
        message.to_owned(),
    );
    (changed || !was_queued).then_some(status)
}

/// The status of a task that ended.
pub fn finished(task: &DelegatedTask, ending: &Ending) -> DelegatedTaskStatus {
    let mut status = own_status(task);
    status.phase = Some(ending.phase);
    status.completion_time = Some(Time(Timestamp::now()));
    let succeeded = ending.phase == TaskPhase::Succeeded;
    set_condition(
        &mut status,
        task,
        types::SUCCEEDED,
        if succeeded {
            cstatus::TRUE
        } else {
            cstatus::FALSE
        },
        &ending.reason,
        ending.message.clone(),
    );
    if status.dispatch_time.is_none() {
        set_condition(
            &mut status,
            task,
            types::DISPATCHED,
            cstatus::FALSE,
            &ending.reason,
            ending.message.clone(),
        );
    }
    status.error = (!succeeded).then(|| TaskError {
        reason: ending.reason.clone(),
        message: ending.message.clone(),
    });
    status.output = ending.output.as_deref().map(bounded_output);
    status
}

/// The status of a task whose prompt is about to be sent to `opencode_session` on `pod` of
/// fleet `sidecar`: recorded before sending, so no later reconcile picks another session.
pub fn dispatching(
    task: &DelegatedTask,
    sidecar: &str,
    pod: &str,
    opencode_session: &str,
    new_attempt: bool,
    workspace: WorkspaceStatus,
) -> DelegatedTaskStatus {
    let mut status = own_status(task);
    status.workspace = Some(workspace);
    status.sidecar = Some(sidecar.to_owned());
    if new_attempt {
        status.attempts += 1;
    }
    status.phase = Some(TaskPhase::Pending);
    status.sidecar_pod = Some(pod.to_owned());
    status.opencode_session_id = Some(opencode_session.to_owned());
    set_condition(
        &mut status,
        task,
        types::DISPATCHED,
        cstatus::UNKNOWN,
        reasons::DISPATCHING,
        format!("sending the prompt to OpenCode session {opencode_session} on pod {pod}"),
    );
    status
}

/// When the current dispatch attempt began: the Dispatched condition's transition to
/// Unknown, which an interrupted attempt's retry keeps.
pub fn attempt_started(status: &DelegatedTaskStatus) -> Option<Timestamp> {
    conditions::find(&status.conditions, types::DISPATCHED).map(|c| c.last_transition_time.0)
}

/// `status` once OpenCode accepted the prompt without listing it yet: recorded, so no
/// reconcile ever sends it again.
pub fn prompt_sent(
    mut status: DelegatedTaskStatus,
    task: &DelegatedTask,
    pod: &str,
    opencode_session: &str,
) -> DelegatedTaskStatus {
    set_condition(
        &mut status,
        task,
        types::DISPATCHED,
        cstatus::UNKNOWN,
        reasons::PROMPT_SENT,
        format!(
            "OpenCode session {opencode_session} on pod {pod} accepted the prompt; waiting for \
             it to be listed"
        ),
    );
    status
}

/// `status` once the session lists the prompt as message `message_id`: the task runs.
pub fn running(
    mut status: DelegatedTaskStatus,
    task: &DelegatedTask,
    pod: &str,
    opencode_session: &str,
    message_id: String,
) -> DelegatedTaskStatus {
    status.phase = Some(TaskPhase::Running);
    status.prompt_message_id = Some(message_id);
    status.dispatch_time = Some(Time(Timestamp::now()));
    set_condition(
        &mut status,
        task,
        types::DISPATCHED,
        cstatus::TRUE,
        reasons::PROMPT_ACCEPTED,
        format!("OpenCode session {opencode_session} on pod {pod} has the prompt"),
    );
    set_condition(
        &mut status,
        task,
        types::SUCCEEDED,
        cstatus::UNKNOWN,
        "Running",
        "the agent is working".to_owned(),
    );
    status
}

/// The final answer, cut at a character boundary to [`MAX_OUTPUT_BYTES`] with a note.
pub fn bounded_output(text: &str) -> String {
    const NOTE: &str = "\n[truncated; the whole answer is kept in the database]";
    nubabel_contract::text::cut_marked(text, MAX_OUTPUT_BYTES, NOTE)
}

/// Writes the fields this controller owns (server-side apply, forced: it is their only writer).
pub async fn write(
    client: &Client,
    task: &DelegatedTask,
    mut status: DelegatedTaskStatus,
) -> Result<(), kube::Error> {
    status.observed_generation = task.metadata.generation;
    status.progress = None;
    let patch = serde_json::json!({
        "apiVersion": DelegatedTask::api_version(&()),
        "kind": DelegatedTask::kind(&()),
        "status": status,
    });
    Api::<DelegatedTask>::namespaced(client.clone(), &task.namespace().unwrap_or_default())
        .patch_status(
            &task.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> DelegatedTask {
        DelegatedTask::new(
            "t",
            serde_json::from_value(serde_json::json!({"organizationId": "o", "prompt": "p"}))
                .unwrap(),
        )
    }

    #[test]
    fn long_output_is_cut_at_a_character_boundary_with_a_note() {
        let text = "é".repeat(MAX_OUTPUT_BYTES);
        let bounded = bounded_output(&text);
        assert!(bounded.len() <= MAX_OUTPUT_BYTES);
        assert!(bounded.ends_with("kept in the database]"));
        assert_eq!(bounded_output("short"), "short");
    }

    #[test]
    fn a_task_queued_again_for_the_same_reason_writes_nothing() {
        let mut task = task();
        let first = queued(&task, Some("fleet"), reasons::NO_CAPACITY, "full").unwrap();
        assert_eq!(first.phase, Some(TaskPhase::Queued));
        task.status = Some(first);
        assert_eq!(
            queued(&task, Some("fleet"), reasons::NO_CAPACITY, "full"),
            None
        );
        assert!(queued(&task, Some("fleet"), reasons::SESSION_BUSY, "busy").is_some());
    }

    #[test]
    fn a_retried_attempt_on_the_same_session_keeps_its_start_and_count() {
        let mut task = task();
        let first = dispatching(
            &task,
            "fleet",
            "fleet-0",
            "ses_1",
            true,
            WorkspaceStatus::default(),
        );
        assert_eq!(first.attempts, 1);
        let started = attempt_started(&first);
        task.status = Some(first);
        let again = dispatching(
            &task,
            "fleet",
            "fleet-0",
            "ses_1",
            false,
            WorkspaceStatus::default(),
        );
        assert_eq!(again.attempts, 1);
        assert_eq!(attempt_started(&again), started);
    }

    #[test]
    fn an_ending_before_dispatch_also_says_why_nothing_was_dispatched() {
        let ending = Ending::without_output(
            TaskPhase::Failed,
            reasons::SIDECAR_NOT_FOUND,
            "no fleet".to_owned(),
        );
        let status = finished(&task(), &ending);
        let dispatched = conditions::find(&status.conditions, types::DISPATCHED).unwrap();
        assert_eq!(dispatched.reason, reasons::SIDECAR_NOT_FOUND);
        assert_eq!(
            status.error.map(|e| e.reason).as_deref(),
            Some(reasons::SIDECAR_NOT_FOUND)
        );
        assert_eq!(status.output, None);
    }
}
