//! DelegatedTasks end to end: a task manifest goes in, the real OpenCode server in a sidecar
//! pod works on it (against the scripted fake LLM), and the outcome lands in the status.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, Result};
use kube::api::{Patch, PatchParams};
use nubabel_crds::v1alpha1::{DelegatedTask, TaskPhase};
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, await_condition, create, within};
use serde_json::json;
use task_support::{await_phase, task};

mod task_support;

const LIMIT: Duration = Duration::from_secs(240);

#[tokio::test]
async fn a_task_runs_on_real_opencode_and_a_second_turn_continues_its_session() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "tasks-happy").await?;
    let system = System::start(&env, &namespace).await?;
    within(LIMIT, "running two turns of a conversation", async {
        system.bind_organization("org-a").await?;
        create(
            &namespace.api(),
            &system.sidecar_manifest("fleet", "org-a", 1)?,
        )
        .await?;
        system.await_fleet_ready("fleet", 1).await?;
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

        // The callback API's SSE stream of the session delivered the same tool events.
        let progress = tasks
            .get("turn-1")
            .await?
            .status
            .and_then(|s| s.progress)
            .context("no progress")?;
        let token = system.stream_token("org-a", Some("conversation-1"))?;
        let streamed = tokio::time::timeout(
            Duration::from_secs(30),
            system.read_session_stream("conversation-1", &token, |e| e.type_() == "session_idle"),
        )
        .await
        .context("the stream did not deliver the end of the turn")??;
        let tool_events = |type_: &str| -> Vec<&serde_json::Value> {
            streamed
                .iter()
                .filter(|e| e.event == "progress" && e.type_() == type_)
                .map(|e| &e.data["data"])
                .collect()
        };
        let (starts, ends) = (
            tool_events("tool_execute_start"),
            tool_events("tool_execute_end"),
        );
        assert_eq!(starts.len() as i64, progress.tools_started);
        assert_eq!(ends.len() as i64, progress.tools_completed);
        assert_eq!(
            ends.last().and_then(|e| e["tool"].as_str()),
            progress.last_tool.as_deref()
        );
        assert!(
            ends.iter()
                .any(|e| e.to_string().contains("hello-from-tool")),
            "the tool's output travels with its end: {ends:?}"
        );
        let ids: Vec<u64> = streamed.iter().map(|e| e.id).collect();
        assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());

        // The whole answer is kept in the database.
        let uid: uuid::Uuid = first.metadata.uid.clone().unwrap().parse()?;
        let stored = nubabel_store::results::output(system.db(), uid).await?;
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
        system.bind_organization("org-b").await?;
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

        system.await_fleet_ready("fleet", 1).await?;

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
        task_support::await_running(&tasks, "slow", &system).await?;
        tasks
            .patch(
                "slow",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"cancel": true}})),
            )
            .await?;
        await_phase(&tasks, "slow", TaskPhase::Cancelled, &system).await?;

        // Neither agent is still working (each in its conversation's directory).
        for name in ["stuck", "slow"] {
            let t = tasks.get(name).await?;
            let busy = system.opencode_of_task(&t).await?.session_status().await?;
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

#[tokio::test]
async fn tasks_created_together_never_overfill_a_pod() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "tasks-capacity").await?;
    let system = System::start(&env, &namespace).await?;
    within(LIMIT, "running three tasks on a pod with one slot", async {
        system.bind_organization("org-c").await?;
        let mut sidecar = system.sidecar_manifest("fleet", "org-c", 1)?;
        sidecar.spec.max_sessions_per_pod = Some(1);
        create(&namespace.api(), &sidecar).await?;
        system.await_fleet_ready("fleet", 1).await?;
        let tasks = namespace.api::<DelegatedTask>();

        // Three tasks at once: the operator reconciles them concurrently, each before the
        // others' placements come back through the watch.
        let names = ["first", "second", "third"];
        let manifests: Vec<DelegatedTask> = names
            .iter()
            .map(|name| {
                task(
                    name,
                    "org-c",
                    Some("fleet"),
                    None,
                    &format!("SLOW:3 marker-{name}"),
                )
            })
            .collect();
        futures::future::try_join_all(manifests.iter().map(|manifest| create(&tasks, manifest)))
            .await?;

        // At no moment do two unfinished tasks hold the pod's one slot.
        await_finished_one_at_a_time(&tasks, names.len(), "hold the one slot", &system).await?;
        for name in names {
            let done = await_phase(&tasks, name, TaskPhase::Succeeded, &system).await?;
            let output = done.status.unwrap().output.unwrap_or_default();
            assert!(output.contains("slow-2"), "{name}: {output}");
        }
        Ok(())
    })
    .await?;
    system.shutdown().await?;
    namespace.delete().await
}

#[tokio::test]
async fn turns_of_one_session_created_together_run_one_after_another_in_one_conversation()
-> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "tasks-same-session").await?;
    let system = System::start(&env, &namespace).await?;
    within(
        LIMIT,
        "running two turns of one session created together",
        async {
            // Two pods with free slots: nothing but the session keeps the turns apart.
            system.bind_organization("org-t").await?;
            let sidecar = system.sidecar_manifest("fleet", "org-t", 2)?;
            create(&namespace.api(), &sidecar).await?;
            system.await_fleet_ready("fleet", 2).await?;
            let tasks = namespace.api::<DelegatedTask>();
            let names = ["turn-a", "turn-b"];
            let manifests: Vec<DelegatedTask> = names
                .iter()
                .map(|name| {
                    task(
                        name,
                        "org-t",
                        Some("fleet"),
                        Some("chat-t"),
                        &format!("SLOW:3 marker-{name}"),
                    )
                })
                .collect();
            futures::future::try_join_all(
                manifests.iter().map(|manifest| create(&tasks, manifest)),
            )
            .await?;

            // At no moment do both turns hold a pod.
            await_finished_one_at_a_time(&tasks, names.len(), "run", &system).await?;

            // One conversation: the same OpenCode session on the same pod, and the later turn's
            // request to the LLM carries the earlier turn.
            let mut done = Vec::new();
            for name in names {
                let task = await_phase(&tasks, name, TaskPhase::Succeeded, &system).await?;
                let status = task.status.unwrap();
                done.push((
                    status.completion_time.map(|t| t.0),
                    name,
                    status.sidecar_pod.unwrap_or_default(),
                    status.opencode_session_id.unwrap_or_default(),
                ));
            }
            done.sort();
            let (_, earlier, pod, session) = &done[0];
            let (_, later, later_pod, later_session) = &done[1];
            assert_eq!(
                (later_pod, later_session),
                (pod, session),
                "{}",
                system.diagnostics()
            );
            let requests = system
                .fake_llm()
                .requests_containing(&format!("marker-{later}"));
            assert!(
                requests
                    .iter()
                    .any(|r| r.to_string().contains(&format!("marker-{earlier}"))),
                "the later turn did not carry the earlier one: {requests:?}"
            );
            Ok(())
        },
    )
    .await?;
    system.shutdown().await?;
    namespace.delete().await
}

/// Waits until `count` tasks of the namespace finished, asserting at every look that at most
/// one unfinished task holds a pod (the failure says the holders `what` at once).
async fn await_finished_one_at_a_time(
    tasks: &kube::Api<DelegatedTask>,
    count: usize,
    what: &str,
    system: &System,
) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    loop {
        let listed = tasks.list(&Default::default()).await?.items;
        let holding: Vec<String> = listed
            .iter()
            .filter(|t| {
                let status = t.status.clone().unwrap_or_default();
                status.sidecar_pod.is_some() && !status.phase.is_some_and(TaskPhase::is_finished)
            })
            .map(kube::ResourceExt::name_any)
            .collect();
        assert!(
            holding.len() <= 1,
            "{holding:?} {what} at once\n{}",
            system.diagnostics()
        );
        let finished = listed.iter().filter(|t| t.phase().is_finished()).count();
        if finished == count {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{finished} of {count} tasks finished\n{}",
            system.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
