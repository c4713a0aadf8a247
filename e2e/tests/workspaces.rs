//! Workspaces end to end: a task clones a repository that requires credentials from a real Git
//! server, the agent (real OpenCode, scripted fake LLM) reads and edits it with its tools, the
//! next turn of the conversation finds the edit, another conversation on the same pod sees none
//! of it, and bad inputs end the task with a reason. The credential never shows in the pod
//! spec, the task's status, its events or any log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use nubabel_crds::v1alpha1::{DelegatedTask, TaskPhase};
use nubabel_e2e::git_server::{GitServer, Login};
use nubabel_e2e::node_shim::HOST_IP;
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, create, within};
use serde_json::json;
use task_support::{await_event, await_phase, task};

mod task_support;

const LIMIT: Duration = Duration::from_secs(300);
const TOKEN: &str = "e2e-git-token-7d1c";

/// A prompt that has the agent run `command` with its bash tool.
fn bash(command: &str) -> String {
    format!(
        "MCPCALL:bash:{}",
        json!({"command": command, "description": "Work on the repository"})
    )
}

fn with_workspace(mut task: DelegatedTask, workspace: serde_json::Value) -> DelegatedTask {
    task.spec.workspace = Some(serde_json::from_value(workspace).unwrap());
    task
}

#[tokio::test]
async fn a_conversation_works_on_its_own_checkout_and_the_credential_stays_out_of_sight()
-> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "workspaces").await?;
    let system = System::start(&env, &namespace).await?;
    let git = GitServer::start_on(
        HOST_IP.into(),
        Login {
            username: "x-access-token".to_owned(),
            password: TOKEN.to_owned(),
        },
    )?;
    let commits = git.create_repository(
        "billing",
        &[
            BTreeMap::from([("README.md", "billing v1\n")]),
            BTreeMap::from([("README.md", "billing v2\n")]),
        ],
    )?;
    within(LIMIT, "working in workspaces", async {
        system.bind_organization("org-a").await?;
        create(
            &namespace.api::<Secret>(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "git-credentials"},
                "stringData": {"username": "x-access-token", "password": TOKEN},
            }))?,
        )
        .await?;
        create(
            &namespace.api(),
            &system.sidecar_manifest("fleet", "org-a", 1)?,
        )
        .await?;
        system.await_fleet_ready("fleet", 1).await?;
        let tasks = namespace.api::<DelegatedTask>();
        let repository = json!({
            "url": git.url("billing"), "ref": commits[0], "path": "billing", "depth": 1,
            "credentialsSecretRef": {"name": "git-credentials"},
        });

        // Turn one reads the file at the commit asked for, then edits it.
        create(
            &tasks,
            &with_workspace(
                task(
                    "turn-1",
                    "org-a",
                    Some("fleet"),
                    Some("conv-a"),
                    &bash("cat billing/README.md && echo edited-by-turn-1 >> billing/README.md"),
                ),
                json!({"repositories": [repository]}),
            ),
        )
        .await?;
        let first = await_phase(&tasks, "turn-1", TaskPhase::Succeeded, &system).await?;
        let status = first.status.clone().unwrap();
        let output = status.output.clone().unwrap_or_default();
        assert!(output.contains("billing v1"), "output: {output}");
        let workspace = status.workspace.clone().context("no workspace in status")?;
        assert!(workspace.created);
        assert!(workspace.bytes > 0, "the checkout's size");
        assert_eq!(workspace.repositories[0].path, "billing");
        assert_eq!(workspace.repositories[0].commit, commits[0]);
        // What the turn changed: in the status, bounded, and whole in the database.
        let change = workspace.changes.first().context("no changes in status")?;
        assert_eq!(change.path, "billing");
        assert_eq!(change.files, vec!["README.md".to_owned()]);
        assert_eq!(
            (
                change.files_changed,
                change.lines_added,
                change.lines_removed
            ),
            (1, 1, 0)
        );
        assert_eq!(change.commit_before, commits[0]);
        assert_eq!(change.commit_after, commits[0]);
        let uid: uuid::Uuid = first.metadata.uid.clone().unwrap().parse()?;
        let stored = nubabel_store::changes::for_task(system.db(), uid).await?;
        assert_eq!(stored.len(), 1);
        assert!(
            stored[0].patch.contains("+edited-by-turn-1"),
            "{}",
            stored[0].patch
        );
        // And over HTTP, with the tenant's API token.
        let token = nubabel_store::api_tokens::issue(
            system.db(),
            &nubabel_contract::identity::OrganizationId::parse("org-a")?,
            namespace.name(),
            "",
        )
        .await?;
        let changes: serde_json::Value = reqwest::Client::new()
            .get(format!(
                "{}/api/tasks/turn-1/changes",
                system.callback_url()
            ))
            .bearer_auth(&token.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let patch = changes["repositories"][0]["patch"]
            .as_str()
            .unwrap_or_default();
        assert!(patch.contains("+edited-by-turn-1"), "{changes}");

        // Turn two of the same conversation finds the edit.
        create(
            &tasks,
            &task(
                "turn-2",
                "org-a",
                Some("fleet"),
                Some("conv-a"),
                &bash("cat billing/README.md"),
            ),
        )
        .await?;
        let second = await_phase(&tasks, "turn-2", TaskPhase::Succeeded, &system).await?;
        let status2 = second.status.unwrap();
        assert!(
            status2
                .output
                .unwrap_or_default()
                .contains("edited-by-turn-1"),
            "the next turn sees the edit"
        );
        let workspace2 = status2.workspace.context("no workspace in status")?;
        assert_eq!(workspace2.directory, workspace.directory);
        assert!(!workspace2.created);
        // It started from where the first turn left the checkout, and changed nothing.
        assert_eq!(
            workspace2.changes[0].files_changed, 0,
            "{:?}",
            workspace2.changes
        );

        // Another conversation on the same pod has a directory of its own, without the checkout.
        create(
            &tasks,
            &task(
                "other",
                "org-a",
                Some("fleet"),
                Some("conv-b"),
                &bash("ls -a; cat billing/README.md || echo no-checkout-here"),
            ),
        )
        .await?;
        let other = await_phase(&tasks, "other", TaskPhase::Succeeded, &system).await?;
        let other_status = other.status.unwrap();
        assert_eq!(other_status.sidecar_pod, status.sidecar_pod);
        assert_ne!(
            other_status.workspace.context("no workspace")?.directory,
            workspace.directory
        );
        let other_output = other_status.output.unwrap_or_default();
        assert!(other_output.contains("no-checkout-here"), "{other_output}");
        assert!(!other_output.contains("edited-by-turn-1"), "{other_output}");

        // Bad inputs end the task before anything reaches the agent.
        let llm_requests = system.fake_llm().requests().len();
        let bad = [
            (
                "wrong-secret",
                json!({"url": git.url("billing"),
                "credentialsSecretRef": {"name": "no-such-secret"}}),
                "WorkspaceUnavailable",
            ),
            (
                "no-credentials",
                json!({"url": git.url("billing")}),
                "WorkspaceUnavailable",
            ),
            (
                "missing-ref",
                json!({"url": git.url("billing"), "ref": "no-such-branch",
                "credentialsSecretRef": {"name": "git-credentials"}}),
                "WorkspaceUnavailable",
            ),
            (
                "escaping",
                json!({"url": git.url("billing"), "path": "../../outside"}),
                "InvalidWorkspace",
            ),
        ];
        for (name, repository, reason) in &bad {
            create(
                &tasks,
                &with_workspace(
                    task(name, "org-a", Some("fleet"), Some(name), "never sent"),
                    json!({"repositories": [repository]}),
                ),
            )
            .await?;
            let failed = await_phase(&tasks, name, TaskPhase::Failed, &system).await?;
            let error = failed.status.unwrap().error.unwrap();
            assert_eq!(error.reason, *reason, "{name}: {}", error.message);
            if *reason == "WorkspaceUnavailable" {
                assert!(
                    error.message.contains(&git.url("billing"))
                        || error.message.contains("no-such-secret"),
                    "{name}: {}",
                    error.message
                );
            }
            await_event(&namespace, name, "Warning", reason).await?;
        }
        assert_eq!(
            system.fake_llm().requests().len(),
            llm_requests,
            "no bad input reached the LLM"
        );

        // A fleet's limit and defaults: a task without a workspace of its own gets the fleet's
        // files, and a checkout past the limit fails the task.
        let mut small = serde_json::to_value(system.sidecar_manifest("small", "org-a", 1)?)?;
        small["spec"]["workspaces"] = json!({
            "sizeLimit": "200",
            "defaults": {"files": [{"path": "AGENTS.md", "content": "fleet-default-marker\n"}]},
        });
        create(
            &namespace.api(),
            &serde_json::from_value::<nubabel_crds::v1alpha1::OpencodeSidecar>(small)?,
        )
        .await?;
        system.await_fleet_ready("small", 1).await?;
        create(
            &tasks,
            &task(
                "defaults",
                "org-a",
                Some("small"),
                Some("conv-d"),
                &bash("cat AGENTS.md"),
            ),
        )
        .await?;
        let defaults = await_phase(&tasks, "defaults", TaskPhase::Succeeded, &system).await?;
        let output = defaults.status.unwrap().output.unwrap_or_default();
        assert!(output.contains("fleet-default-marker"), "{output}");
        create(
            &tasks,
            &with_workspace(
                task(
                    "too-large",
                    "org-a",
                    Some("small"),
                    Some("conv-l"),
                    "never sent",
                ),
                json!({"repositories": [repository]}),
            ),
        )
        .await?;
        let large = await_phase(&tasks, "too-large", TaskPhase::Failed, &system).await?;
        assert_eq!(
            large.status.unwrap().error.unwrap().reason,
            "WorkspaceTooLarge"
        );
        await_event(&namespace, "too-large", "Warning", "WorkspaceTooLarge").await?;

        // The credential is nowhere but in its Secret.
        let mut seen = String::new();
        for pod in namespace
            .api::<Pod>()
            .list(&ListParams::default())
            .await?
            .items
        {
            seen.push_str(&serde_json::to_string(&pod)?);
        }
        for task in tasks.list(&ListParams::default()).await?.items {
            seen.push_str(&serde_json::to_string(&task.status)?);
        }
        for event in namespace
            .api::<Event>()
            .list(&ListParams::default())
            .await?
            .items
        {
            seen.push_str(&serde_json::to_string(&event)?);
        }
        seen.push_str(&system.operator_log_tail());
        seen.push_str(&system.pod_log_tails(10_000));
        assert!(!seen.contains(TOKEN), "the Git token leaked");
        assert!(git.authorizations().iter().any(Option::is_some));
        Ok(())
    })
    .await
    .with_context(|| system.diagnostics())
}
