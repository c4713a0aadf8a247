//! DelegatedTasks end to end: a task manifest goes in, the real OpenCode server in a sidecar
//! pod works on it (against the scripted fake LLM), and the outcome lands in the status.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, Result};
use kube::api::{Api, Patch, PatchParams};
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar, TaskPhase};
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, await_condition, create, within};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(240);
const TASK_WAIT: Duration = Duration::from_secs(90);

fn task(
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
    .unwrap()
}

fn phase_of(task: Option<&DelegatedTask>) -> Option<TaskPhase> {
    task.and_then(|t| t.status.as_ref()).and_then(|s| s.phase)
}

async fn await_phase(
    api: &Api<DelegatedTask>,
    name: &str,
    wanted: TaskPhase,
    system: &System,
) -> Result<DelegatedTask> {
    let finished = await_condition(
        api,
        name,
        "the task to finish",
        |t: Option<&DelegatedTask>| phase_of(t).is_some_and(TaskPhase::is_finished),
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

async fn await_fleet_ready(
    system: &System,
    namespace: &TestNamespace,
    name: &str,
    replicas: i32,
) -> Result<()> {
    await_condition(
        &namespace.api::<OpencodeSidecar>(),
        name,
        "the sidecar fleet to be ready",
        move |s: Option<&OpencodeSidecar>| {
            s.and_then(|s| s.status.as_ref())
                .is_some_and(|s| s.ready_replicas == replicas)
        },
        Duration::from_secs(120),
    )
    .await
    .with_context(|| system.diagnostics())?;
    Ok(())
}

#[tokio::test]
async fn a_task_runs_on_real_opencode_and_a_second_turn_continues_its_session() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "tasks-happy").await?;
    let system = System::start(&env, &namespace).await?;
    within(LIMIT, "running two turns of a conversation", async {
        create(
            &namespace.api(),
            &system.sidecar_manifest("fleet", "org-a", 1)?,
        )
        .await?;
        await_fleet_ready(&system, &namespace, "fleet", 1).await?;
        let tasks = namespace.api::<DelegatedTask>();

        // Turn one: a tool call, then the answer.
        create(
            &tasks,
            &task(
                "turn-1",
                "org-a",
                Some("fleet"),
                Some("conversation-1"),
                "TOOLCALL marker-one",
            ),
        )
        .await?;
        let first = await_phase(&tasks, "turn-1", TaskPhase::Succeeded, &system).await?;
        let status = first.status.clone().unwrap();
        let output = status.output.clone().unwrap_or_default();
        assert!(output.contains("hello-from-tool"), "output: {output}");
        assert_eq!(status.sidecar.as_deref(), Some("fleet"));
        assert_eq!(status.attempts, 1);
        assert!(status.dispatch_time.is_some() && status.completion_time.is_some());
        let session = status
            .opencode_session_id
            .clone()
            .context("no OpenCode session")?;
        let pod = status.sidecar_pod.clone().context("no pod")?;

        // The callback API mirrors the bridge's progress into the status.
        await_condition(
            &tasks,
            "turn-1",
            "status.progress to show the tool call",
            |t: Option<&DelegatedTask>| {
                t.and_then(|t| t.status.as_ref())
                    .and_then(|s| s.progress.as_ref())
                    .is_some_and(|p| {
                        p.tools_completed >= 1 && p.last_tool.as_deref() == Some("bash")
                    })
            },
            Duration::from_secs(30),
        )
        .await
        .with_context(|| system.diagnostics())?;

        // The whole answer is kept in the database.
        let uid: uuid::Uuid = first.metadata.uid.clone().unwrap().parse()?;
        let stored = nubabel_data::results::output(system.db(), uid).await?;
        assert_eq!(stored.as_deref(), Some(output.as_str()));

        // Turn two: same sessionId, same OpenCode session and pod, and the LLM saw turn one.
        create(
            &tasks,
            &task(
                "turn-2",
                "org-a",
                Some("fleet"),
                Some("conversation-1"),
                "second question marker-two",
            ),
        )
        .await?;
        let second = await_phase(&tasks, "turn-2", TaskPhase::Succeeded, &system).await?;
        let status2 = second.status.unwrap();
        assert_eq!(
            status2.opencode_session_id.as_deref(),
            Some(session.as_str())
        );
        assert_eq!(status2.sidecar_pod.as_deref(), Some(pod.as_str()));
        let requests = system.fake_llm().requests_containing("marker-two");
        let with_history = requests.iter().any(|r| {
            r.to_string().contains("marker-one")
                && r["tools"].as_array().is_some_and(|t| !t.is_empty())
        });
        assert!(
            with_history,
            "the second turn's LLM request did not carry the first turn"
        );
        assert!(status2.output.unwrap_or_default().contains("marker-two"));
        Ok(())
    })
    .await?;
    system.shutdown().await?;
    namespace.delete().await
}

#[tokio::test]
async fn failures_end_tasks_with_a_reason_and_stop_the_agent() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "tasks-fail").await?;
    let system = System::start(&env, &namespace).await?;
    within(LIMIT, "failing tasks", async {
        create(
            &namespace.api(),
            &system.sidecar_manifest("fleet", "org-b", 1)?,
        )
        .await?;
        let tasks = namespace.api::<DelegatedTask>();

        // What can never work fails at once, without a pod.
        create(
            &tasks,
            &task("no-sidecar", "org-b", Some("missing"), None, "hello"),
        )
        .await?;
        let failed = await_phase(&tasks, "no-sidecar", TaskPhase::Failed, &system).await?;
        assert_eq!(
            failed.status.unwrap().error.unwrap().reason,
            "SidecarNotFound"
        );
        create(
            &tasks,
            &task("wrong-tenant", "org-other", Some("fleet"), None, "hello"),
        )
        .await?;
        let failed = await_phase(&tasks, "wrong-tenant", TaskPhase::Failed, &system).await?;
        assert_eq!(
            failed.status.unwrap().error.unwrap().reason,
            "OrganizationMismatch"
        );

        await_fleet_ready(&system, &namespace, "fleet", 1).await?;

        // The LLM refuses the request: Failed with OpenCode's error name.
        create(
            &tasks,
            &task(
                "bad-request",
                "org-b",
                Some("fleet"),
                None,
                "ERROR400 please",
            ),
        )
        .await?;
        let failed = await_phase(&tasks, "bad-request", TaskPhase::Failed, &system).await?;
        let error = failed.status.unwrap().error.unwrap();
        assert_eq!(error.reason, "APIError", "error: {error:?}");

        // The LLM fails forever: OpenCode retries, the deadline aborts it.
        let mut stuck = task("stuck", "org-b", Some("fleet"), None, "ERROR500 please");
        stuck.spec.timeout_seconds = 6;
        create(&tasks, &stuck).await?;
        let timed_out = await_phase(&tasks, "stuck", TaskPhase::TimedOut, &system).await?;
        assert_eq!(
            timed_out.status.clone().unwrap().error.unwrap().reason,
            "DeadlineExceeded"
        );

        // Cancel while the LLM streams slowly.
        create(
            &tasks,
            &task("slow", "org-b", Some("fleet"), None, "SLOW:60 please"),
        )
        .await?;
        await_condition(
            &tasks,
            "slow",
            "the task to run",
            |t: Option<&DelegatedTask>| phase_of(t) == Some(TaskPhase::Running),
            TASK_WAIT,
        )
        .await
        .with_context(|| system.diagnostics())?;
        tasks
            .patch(
                "slow",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"cancel": true}})),
            )
            .await?;
        let cancelled = await_phase(&tasks, "slow", TaskPhase::Cancelled, &system).await?;

        // Neither agent is still working.
        let pod = cancelled.status.clone().unwrap().sidecar_pod.unwrap();
        let password = system.opencode_password("fleet").await?;
        let pods = namespace.api::<k8s_openapi::api::core::v1::Pod>();
        let ip = pods.get(&pod).await?.status.and_then(|s| s.pod_ip).unwrap();
        let opencode = nubabel_opencode::OpencodeClient::new(
            nubabel_opencode::ClientConfig::new(format!("http://{ip}:4096"))
                .with_password(password),
        )?;
        let busy = opencode.session_status().await?;
        for name in ["stuck", "slow"] {
            let t = tasks.get(name).await?;
            let session = t.status.unwrap().opencode_session_id.unwrap();
            assert!(
                !busy.contains_key(&session),
                "{name}'s session is still {:?}",
                busy.get(&session)
            );
        }
        Ok(())
    })
    .await?;
    system.shutdown().await?;
    namespace.delete().await
}
