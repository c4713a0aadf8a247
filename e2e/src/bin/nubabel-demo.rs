//! `nubabel-demo`: the quick start's main job. Inside the local stack (`nubabel-local run`), it
//! starts the callback API, the operator, a node shim and the scripted fake LLM, applies a
//! tenant's `OpencodeSidecar` and a `DelegatedTask`, and prints the task's progress and answer
//! as they happen. Real OpenCode servers do the work; only the LLM is scripted.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar, TaskPhase};
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, create, kubectl, within};

const PROMPT: &str = "TOOLCALL: check that the workspace has a shell, then say what you found.";

#[tokio::main]
async fn main() -> Result<()> {
    nubabel_e2e::install_crypto_provider();
    within(Duration::from_secs(300), "the demo", demo()).await
}

async fn demo() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "demo").await?;
    println!(
        "namespace {}: starting the callback API, the operator, a node and a fake LLM",
        namespace.name()
    );
    let system = System::start(&env, &namespace).await?;

    let sidecar = system.sidecar_manifest("acme", "org-acme", 1)?;
    create(&namespace.api::<OpencodeSidecar>(), &sidecar).await?;
    println!(
        "applied OpencodeSidecar acme (organization org-acme, 1 replica); waiting for a ready pod"
    );
    let sidecars = namespace.api::<OpencodeSidecar>();
    nubabel_e2e::await_condition(
        &sidecars,
        "acme",
        "a ready sidecar pod",
        |s: Option<&OpencodeSidecar>| {
            s.and_then(|s| s.status.as_ref())
                .is_some_and(|s| s.ready_replicas >= 1)
        },
        Duration::from_secs(120),
    )
    .await
    .with_context(|| system.diagnostics())?;

    let task: DelegatedTask = serde_json::from_value(serde_json::json!({
        "apiVersion": "nubabel.io/v1alpha1",
        "kind": "DelegatedTask",
        "metadata": {"name": "first-task"},
        "spec": {"organizationId": "org-acme", "sessionId": "demo-session", "prompt": PROMPT}
    }))?;
    let tasks = namespace.api::<DelegatedTask>();
    create(&tasks, &task).await?;
    println!("applied DelegatedTask first-task: {PROMPT:?}");

    let mut last_line = String::new();
    let mut updates = watcher(
        tasks.clone(),
        watcher::Config::default().fields("metadata.name=first-task"),
    )
    .applied_objects()
    .boxed();
    let finished = loop {
        let Some(update) = updates.next().await else {
            bail!("the watch ended")
        };
        let task = update?;
        let status = task.status.clone().unwrap_or_default();
        let progress = status.progress.clone().unwrap_or_default();
        let line = format!(
            "  phase {:<9} pod {:<8} events {:>2}  tools {}/{}  last tool {}",
            status
                .phase
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Pending".to_owned()),
            status.sidecar_pod.as_deref().unwrap_or("-"),
            progress.events,
            progress.tools_completed,
            progress.tools_started,
            progress.last_tool.as_deref().unwrap_or("-"),
        );
        if line != last_line {
            println!("{line}");
            last_line = line;
        }
        if status.phase.is_some_and(TaskPhase::is_finished) {
            break task;
        }
    };
    // The callback API mirrors progress about once a second; give the last update a moment.
    let mirrored = nubabel_e2e::await_condition(
        &tasks,
        "first-task",
        "the progress mirror to catch up",
        |t: Option<&DelegatedTask>| {
            t.and_then(|t| t.status.as_ref())
                .and_then(|s| s.progress.as_ref())
                .is_some_and(|p| p.tools_completed >= 1)
        },
        Duration::from_secs(10),
    )
    .await;
    let finished = match mirrored {
        Ok(Some(task)) => {
            let progress = task
                .status
                .as_ref()
                .and_then(|s| s.progress.clone())
                .unwrap_or_default();
            println!(
                "  progress mirrored: {} events, {} tool call(s)",
                progress.events, progress.tools_completed
            );
            task
        }
        _ => finished,
    };
    let status = finished.status.unwrap_or_default();
    println!(
        "\nOpenCode session {} answered:\n{}\n",
        status.opencode_session_id.unwrap_or_default(),
        status.output.unwrap_or_default()
    );
    let listing = kubectl(["get", "ocs,dtask", "-n", namespace.name()]).await?;
    println!(
        "$ kubectl get ocs,dtask\n{}",
        String::from_utf8_lossy(&listing.stdout)
    );

    system.shutdown().await?;
    namespace.delete().await?;
    if status.phase != Some(TaskPhase::Succeeded) {
        bail!("the task ended {:?}: {:?}", status.phase, status.error);
    }
    Ok(())
}
