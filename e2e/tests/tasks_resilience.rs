//! DelegatedTasks when things go wrong around them: tenants side by side, a task deleted while
//! it runs, the operator killed mid-task, a sidecar pod killed mid-task. Real OpenCode in pods
//! on the node shim, the scripted fake LLM, the real control plane.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::DeleteParams;
use nubabel_crds::v1alpha1::{DelegatedTask, TaskPhase};
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, await_condition, create, within};
use nubabel_opencode::{MessageWithParts, OpencodeClient, Role};
use task_support::{await_event, await_phase, await_running, task};

mod task_support;

const LIMIT: Duration = Duration::from_secs(240);
/// The finalizer that guarantees a deleted task's agent is aborted.
const FINALIZER: &str = "nubabel.io/abort-running-task";

/// Runs `body` against a fresh namespace with the whole system, then tears both down.
async fn with_system(
    prefix: &str,
    what: &str,
    body: impl AsyncFnOnce(&mut System, &TestNamespace) -> Result<()>,
) -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, prefix).await?;
    let mut system = System::start(&env, &namespace).await?;
    within(LIMIT, what, body(&mut system, &namespace)).await?;
    system.shutdown().await?;
    namespace.delete().await
}

/// The user messages of `messages` whose text is exactly `prompt`.
fn prompts_in(messages: &[MessageWithParts], prompt: &str) -> usize {
    nubabel_opencode::user_prompts(messages, prompt).count()
}

/// Waits until the StatefulSet has replaced pod `name` (whose uid was `old_uid`) and the fleet
/// `fleet` is ready again.
async fn await_replaced(
    system: &System,
    pods: &kube::Api<Pod>,
    name: &str,
    old_uid: Option<String>,
) -> Result<()> {
    await_condition(
        pods,
        name,
        "the pod to be replaced",
        |p: Option<&Pod>| p.is_some_and(|p| p.metadata.uid != old_uid),
        Duration::from_secs(60),
    )
    .await
    .with_context(|| system.diagnostics())?;
    system.await_fleet_ready("fleet", 1).await
}

/// Waits until OpenCode no longer lists `session` as busy (or retrying).
async fn await_session_not_busy(opencode: &OpencodeClient, session: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = opencode.session_status().await?;
        if !status.contains_key(session) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "session {session} is still {:?}",
            status.get(session)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn running_on(task: &DelegatedTask) -> (String, String) {
    let status = task.status.clone().unwrap_or_default();
    (
        status.sidecar_pod.expect("a running task has a pod"),
        status
            .opencode_session_id
            .expect("a running task has an OpenCode session"),
    )
}

#[tokio::test]
async fn tenants_share_a_namespace_but_never_pods_sessions_or_events() -> Result<()> {
    with_system(
        "tasks-tenants",
        "two tenants side by side",
        async |system, namespace| {
            system.bind_organization("org-a").await?;
            create(
                &namespace.api(),
                &system.sidecar_manifest("fleet-a", "org-a", 1)?,
            )
            .await?;
            system.bind_organization("org-b").await?;
            create(
                &namespace.api(),
                &system.sidecar_manifest("fleet-b", "org-b", 1)?,
            )
            .await?;
            system.await_fleet_ready("fleet-a", 1).await?;
            system.await_fleet_ready("fleet-b", 1).await?;
            let tasks = namespace.api::<DelegatedTask>();

            // Named or resolved by organization, each tenant's tasks land on its own fleet.
            create(
                &tasks,
                &task(
                    "a-named",
                    "org-a",
                    Some("fleet-a"),
                    Some("chat-a"),
                    "hello a1",
                ),
            )
            .await?;
            create(&tasks, &task("a-resolved", "org-a", None, None, "hello a2")).await?;
            create(
                &tasks,
                &task("b-resolved", "org-b", None, Some("chat-b"), "hello b1"),
            )
            .await?;
            let mut ran = Vec::new();
            for (name, fleet) in [
                ("a-named", "fleet-a"),
                ("a-resolved", "fleet-a"),
                ("b-resolved", "fleet-b"),
            ] {
                let done = await_phase(&tasks, name, TaskPhase::Succeeded, system).await?;
                let status = done.status.clone().unwrap();
                assert_eq!(status.sidecar.as_deref(), Some(fleet), "{name}");
                let (pod, session) = running_on(&done);
                assert!(pod.starts_with(&format!("{fleet}-")), "{name} ran on {pod}");
                ran.push((name, fleet, pod, session));
            }

            // Each OpenCode session lives on its own tenant's server and nowhere else.
            for (name, fleet, pod, session) in &ran {
                let own = system.opencode_on(fleet, pod).await?;
                own.session(session)
                    .await
                    .with_context(|| format!("{name}'s session on {pod}"))?;
                let (other_fleet, other_pod) = ran
                    .iter()
                    .find(|(_, f, _, _)| f != fleet)
                    .map(|(_, f, p, _)| (*f, p.clone()))
                    .unwrap();
                let other = system.opencode_on(other_fleet, &other_pod).await?;
                let error = other.session(session).await.expect_err("a foreign session");
                assert!(
                    error.is_not_found(),
                    "{name}'s session on {other_pod}: {error}"
                );
            }

            // A's stream token reads A's sessions, never B's, by either id.
            let token_a = system.stream_token("org-a", None)?;
            let own = system.open_session_stream("chat-a", &token_a).await?;
            assert!(
                own.status().is_success(),
                "A reading chat-a: {}",
                own.status()
            );
            drop(own);
            let b_session = &ran[2].3;
            for session in ["chat-b", b_session.as_str()] {
                let foreign = system.open_session_stream(session, &token_a).await?;
                assert_eq!(foreign.status().as_u16(), 404, "A reading B's {session}");
            }
            let limited = system.stream_token("org-a", Some("chat-a"))?;
            let other = system.open_session_stream(&ran[1].3, &limited).await?;
            assert_eq!(other.status().as_u16(), 404, "a token limited to chat-a");

            // A task of A naming B's fleet never runs.
            create(
                &tasks,
                &task(
                    "a-on-b",
                    "org-a",
                    Some("fleet-b"),
                    None,
                    "hello marker-a-on-b",
                ),
            )
            .await?;
            let failed = await_phase(&tasks, "a-on-b", TaskPhase::Failed, system).await?;
            let status = failed.status.unwrap();
            assert_eq!(status.error.unwrap().reason, "OrganizationMismatch");
            assert_eq!(status.sidecar_pod, None);
            assert_eq!(
                system.fake_llm().requests_containing("marker-a-on-b").len(),
                0,
                "nothing of the refused task reached an LLM"
            );
            Ok(())
        },
    )
    .await
}

#[tokio::test]
async fn deleting_a_running_task_aborts_its_agent_before_the_task_goes() -> Result<()> {
    with_system(
        "tasks-delete",
        "deleting a running task",
        async |system, namespace| {
            system.bind_organization("org-d").await?;
            create(
                &namespace.api(),
                &system.sidecar_manifest("fleet", "org-d", 1)?,
            )
            .await?;
            system.await_fleet_ready("fleet", 1).await?;
            let tasks = namespace.api::<DelegatedTask>();
            create(
                &tasks,
                &task("doomed", "org-d", Some("fleet"), None, "SLOW:60 doomed"),
            )
            .await?;
            let running = await_running(&tasks, "doomed", system).await?;
            assert!(
                running
                    .metadata
                    .finalizers
                    .clone()
                    .unwrap_or_default()
                    .iter()
                    .any(|f| f == FINALIZER),
                "a running task carries the finalizer"
            );
            let (_, session) = running_on(&running);
            let opencode = system.opencode_of_task(&running).await?;
            assert!(
                opencode.session_status().await?.contains_key(&session),
                "the agent works"
            );

            tasks.delete("doomed", &DeleteParams::default()).await?;
            await_condition(
                &tasks,
                "doomed",
                "the task to be gone",
                |t: Option<&DelegatedTask>| t.is_none(),
                Duration::from_secs(30),
            )
            .await
            .with_context(|| system.diagnostics())?;
            // The finalizer aborted the turn before it let the task go: the session is idle
            // within 30 s, where the slow answer alone takes 60.
            await_session_not_busy(&opencode, &session).await?;
            let messages = opencode.messages(&session, None).await?;
            // No reply finished; one cut mid-answer carries MessageAbortedError (an abort
            // before OpenCode began the reply, as on a loaded machine, leaves none or one
            // without an error).
            assert!(
                messages
                    .iter()
                    .all(|m| m.info.finish.as_deref() != Some("stop")),
                "a reply finished despite the abort"
            );
            for reply in messages.iter().filter(|m| m.info.role == Role::Assistant) {
                if let Some(error) = &reply.info.error {
                    assert_eq!(
                        error.name, "MessageAbortedError",
                        "the turn ended by the abort"
                    );
                }
            }
            let note = await_event(namespace, "doomed", "Normal", "Cancelled").await?;
            assert!(note.contains("deleted task"), "{note}");
            Ok(())
        },
    )
    .await
}

#[tokio::test]
async fn an_operator_killed_mid_task_neither_loses_nor_repeats_the_prompt() -> Result<()> {
    with_system(
        "tasks-restart",
        "restarting the operator mid-task",
        async |system, namespace| {
            system.bind_organization("org-r").await?;
            create(
                &namespace.api(),
                &system.sidecar_manifest("fleet", "org-r", 1)?,
            )
            .await?;
            system.await_fleet_ready("fleet", 1).await?;
            let tasks = namespace.api::<DelegatedTask>();

            // Killed while the agent works; back before it finishes.
            let prompt = "SLOW:8 marker-restart-running";
            create(
                &tasks,
                &task("while-running", "org-r", Some("fleet"), None, prompt),
            )
            .await?;
            let running = await_running(&tasks, "while-running", system).await?;
            system.kill_operator().await?;
            system.restart_operator().await?;
            let done = await_phase(&tasks, "while-running", TaskPhase::Succeeded, system).await?;
            let status = done.status.clone().unwrap();
            assert_eq!(status.attempts, 1);
            assert_eq!(
                running_on(&done),
                running_on(&running),
                "same pod and session"
            );
            assert!(status.output.unwrap_or_default().contains("slow-8"));
            let (pod, session) = running_on(&done);
            let opencode = system.opencode_on("fleet", &pod).await?;
            assert_eq!(
                prompts_in(&opencode.messages(&session, None).await?, prompt),
                1
            );

            // Killed while the agent works; the turn ends while no operator runs.
            let prompt = "SLOW:2 marker-restart-finished";
            create(
                &tasks,
                &task("while-down", "org-r", Some("fleet"), None, prompt),
            )
            .await?;
            let running = await_running(&tasks, "while-down", system).await?;
            system.kill_operator().await?;
            let (_, session) = running_on(&running);
            let opencode = system.opencode_of_task(&running).await?;
            await_session_not_busy(&opencode, &session).await?;
            system.restart_operator().await?;
            let done = await_phase(&tasks, "while-down", TaskPhase::Succeeded, system).await?;
            let status = done.status.clone().unwrap();
            assert_eq!(status.attempts, 1);
            assert!(status.output.unwrap_or_default().contains("slow-2"));
            assert_eq!(
                prompts_in(&opencode.messages(&session, None).await?, prompt),
                1
            );

            // Each prompt reached the LLM once as a turn (title requests carry no tools).
            for marker in ["marker-restart-running", "marker-restart-finished"] {
                let turns = system
                    .fake_llm()
                    .requests_containing(marker)
                    .into_iter()
                    .filter(|r| r["tools"].as_array().is_some_and(|t| !t.is_empty()))
                    .count();
                assert_eq!(turns, 1, "LLM turns with {marker}");
            }
            Ok(())
        },
    )
    .await
}

#[tokio::test]
async fn a_sidecar_pod_killed_mid_task_fails_the_task_and_the_session_starts_anew() -> Result<()> {
    with_system(
        "tasks-podkill",
        "killing a sidecar pod mid-task",
        async |system, namespace| {
            system.bind_organization("org-k").await?;
            create(
                &namespace.api(),
                &system.sidecar_manifest("fleet", "org-k", 1)?,
            )
            .await?;
            system.await_fleet_ready("fleet", 1).await?;
            let tasks = namespace.api::<DelegatedTask>();
            create(
                &tasks,
                &task(
                    "orphan",
                    "org-k",
                    Some("fleet"),
                    Some("chat-k"),
                    "SLOW:60 orphan",
                ),
            )
            .await?;
            let running = await_running(&tasks, "orphan", system).await?;
            let (pod, session) = running_on(&running);
            let pods = namespace.api::<Pod>();
            let old_uid = pods.get(&pod).await?.metadata.uid;

            pods.delete(&pod, &DeleteParams::default()).await?;
            let failed = await_phase(&tasks, "orphan", TaskPhase::Failed, system).await?;
            let error = failed.status.clone().unwrap().error.unwrap();
            assert_eq!(error.reason, "SidecarPodLost", "{error:?}");
            assert!(
                error.message.contains(&format!("pod {pod}")),
                "{}",
                error.message
            );
            let note = await_event(namespace, "orphan", "Warning", "SidecarPodLost").await?;
            assert!(note.contains(&pod), "{note}");

            // The StatefulSet brings the pod back, empty (its sessions lived on an emptyDir): the
            // next turn of the session starts a new OpenCode session there.
            await_replaced(system, &pods, &pod, old_uid).await?;
            create(
                &tasks,
                &task(
                    "after",
                    "org-k",
                    Some("fleet"),
                    Some("chat-k"),
                    "hello again",
                ),
            )
            .await?;
            let done = await_phase(&tasks, "after", TaskPhase::Succeeded, system).await?;
            let (new_pod, new_session) = running_on(&done);
            assert_eq!(new_pod, pod);
            assert_ne!(new_session, session);
            let note = await_event(namespace, "after", "Normal", "SessionLost").await?;
            assert!(note.contains(&session), "{note}");
            Ok(())
        },
    )
    .await
}

#[tokio::test]
async fn with_storage_a_conversation_outlives_its_pod() -> Result<()> {
    with_system(
        "tasks-storage",
        "continuing a conversation after its pod restarted",
        async |system, namespace| {
            system.bind_organization("org-s").await?;
            let mut sidecar = system.sidecar_manifest("fleet", "org-s", 1)?;
            sidecar.spec.storage =
                Some(serde_json::from_value(serde_json::json!({"size": "1Gi"}))?);
            create(&namespace.api(), &sidecar).await?;
            system.await_fleet_ready("fleet", 1).await?;
            let tasks = namespace.api::<DelegatedTask>();
            let pods = namespace.api::<Pod>();

            // Turn one, then a turn cut off by the pod's deletion.
            create(
                &tasks,
                &task(
                    "first",
                    "org-s",
                    Some("fleet"),
                    Some("chat-s"),
                    "remember marker-kept",
                ),
            )
            .await?;
            let first = await_phase(&tasks, "first", TaskPhase::Succeeded, system).await?;
            let (pod, session) = running_on(&first);
            create(
                &tasks,
                &task(
                    "cut",
                    "org-s",
                    Some("fleet"),
                    Some("chat-s"),
                    "SLOW:60 marker-cut",
                ),
            )
            .await?;
            let running = await_running(&tasks, "cut", system).await?;
            assert_eq!(running_on(&running), (pod.clone(), session.clone()));
            let old_uid = pods.get(&pod).await?.metadata.uid;
            pods.delete(&pod, &DeleteParams::default()).await?;
            let failed = await_phase(&tasks, "cut", TaskPhase::Failed, system).await?;
            let error = failed.status.clone().unwrap().error.unwrap();
            assert_eq!(error.reason, "SidecarPodLost", "{error:?}");
            assert!(
                error.message.contains("the session is kept on its storage"),
                "{}",
                error.message
            );

            // The StatefulSet brings the pod back on the same volume: the next turn continues
            // the same OpenCode session, and the LLM sees turn one.
            await_replaced(system, &pods, &pod, old_uid).await?;
            create(
                &tasks,
                &task(
                    "after",
                    "org-s",
                    Some("fleet"),
                    Some("chat-s"),
                    "and now marker-after",
                ),
            )
            .await?;
            let done = await_phase(&tasks, "after", TaskPhase::Succeeded, system).await?;
            assert_eq!(
                running_on(&done),
                (pod.clone(), session.clone()),
                "{}",
                system.diagnostics()
            );
            let requests = system.fake_llm().requests_containing("marker-after");
            assert!(
                requests
                    .iter()
                    .any(|r| r.to_string().contains("marker-kept")),
                "the turn after the restart did not carry turn one: {requests:?}"
            );
            let output = done.status.unwrap().output.unwrap_or_default();
            assert!(output.contains("marker-after"), "{output}");
            Ok(())
        },
    )
    .await
}
