//! What the DelegatedTask e2e files share: task manifests and waiting for phases, fleets and
//! events.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use nubabel_crds::v1alpha1::{DelegatedTask, TaskPhase};
use nubabel_e2e::system::System;
use nubabel_e2e::{TestNamespace, await_condition};
use serde_json::json;

/// How long a task may take to finish.
pub const TASK_WAIT: Duration = Duration::from_secs(90);

/// A task for `organization`, on sidecar `sidecar` (or resolved by organization), in Nubabel
/// session `session` (or one of its own).
pub fn task(
    name: &str,
    organization: &str,
    sidecar: Option<&str>,
    session: Option<&str>,
    prompt: &str,
) -> DelegatedTask {
    let mut spec = json!({"organizationId": organization, "prompt": prompt, "timeoutSeconds": 120});
    if let Some(sidecar) = sidecar {
        spec["sidecarRef"] = json!({"name": sidecar});
    }
    if let Some(session) = session {
        spec["sessionId"] = json!(session);
    }
    serde_json::from_value(json!({
        "apiVersion": "nubabel.io/v1alpha1",
        "kind": "DelegatedTask",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a valid DelegatedTask")
}

/// `task` with `fields` set in its spec (over what it had).
pub fn with(mut task: DelegatedTask, fields: serde_json::Value) -> DelegatedTask {
    let mut spec = serde_json::to_value(&task.spec).expect("a spec serialises");
    if let (Some(spec), Some(fields)) = (spec.as_object_mut(), fields.as_object()) {
        spec.extend(fields.clone());
    }
    task.spec = serde_json::from_value(spec).expect("a valid spec");
    task
}

/// Every text of a chat completions request's messages of `role` (all roles when `None`),
/// joined by newlines.
pub fn request_texts(request: &serde_json::Value, role: Option<&str>) -> String {
    request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| role.is_none_or(|role| m["role"] == role))
        .map(nubabel_e2e::fake_llm::message_text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the task finishes and fails unless it ended in `wanted`.
pub async fn await_phase(
    api: &Api<DelegatedTask>,
    name: &str,
    wanted: TaskPhase,
    system: &System,
) -> Result<DelegatedTask> {
    let finished = await_condition(
        api,
        name,
        "the task to finish",
        |t: Option<&DelegatedTask>| {
            t.and_then(DelegatedTask::reported_phase)
                .is_some_and(TaskPhase::is_finished)
        },
        TASK_WAIT,
    )
    .await
    .with_context(|| system.diagnostics())?
    .context("the task disappeared")?;
    let status = finished.status.clone().unwrap_or_default();
    anyhow::ensure!(
        status.phase == Some(wanted),
        "task {name} ended {:?}, not {wanted:?}: error {:?}\n{}",
        status.phase,
        status.error,
        system.diagnostics()
    );
    Ok(finished)
}

/// Waits until the task is Running (OpenCode accepted its prompt).
pub async fn await_running(
    api: &Api<DelegatedTask>,
    name: &str,
    system: &System,
) -> Result<DelegatedTask> {
    await_condition(
        api,
        name,
        "the task to run",
        |t: Option<&DelegatedTask>| {
            t.and_then(DelegatedTask::reported_phase) == Some(TaskPhase::Running)
        },
        TASK_WAIT,
    )
    .await
    .with_context(|| system.diagnostics())?
    .context("the task disappeared")
}

/// Waits for an event of `type_` and `reason` about object `name`; returns its note.
pub async fn await_event(
    namespace: &TestNamespace,
    name: &str,
    type_: &str,
    reason: &str,
) -> Result<String> {
    let events = namespace.api::<Event>();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.type_.as_deref() == Some(type_)
                    && e.reason.as_deref() == Some(reason)
            });
        if let Some(event) = found {
            return Ok(event.note.unwrap_or_default());
        }
        if Instant::now() > deadline {
            bail!("no {type_} event {reason} about {name}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
