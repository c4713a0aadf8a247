//! A fleet's permissions reach OpenCode: by default the agent cannot read outside its
//! conversation's workspace (with the `read` tool or through the shell), a fleet that allows it
//! can, and a denied shell pattern is refused while other commands run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, Result};
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar, TaskPhase};
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, create, within};
use serde_json::json;
use task_support::{await_phase, task};

mod task_support;

const LIMIT: Duration = Duration::from_secs(240);
const MARKER: &str = "outside-the-workspace-5e1f";

fn call(tool: &str, arguments: serde_json::Value) -> String {
    format!("MCPCALL:{tool}:{arguments}")
}

async fn output_of(
    tasks: &kube::Api<DelegatedTask>,
    system: &System,
    name: &str,
    fleet: &str,
    prompt: &str,
) -> Result<String> {
    create(tasks, &task(name, "org-p", Some(fleet), None, prompt)).await?;
    let done = await_phase(tasks, name, TaskPhase::Succeeded, system).await?;
    Ok(done.status.unwrap().output.unwrap_or_default())
}

#[tokio::test]
async fn the_agent_stays_in_its_workspace_unless_its_fleet_allows_more() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "permissions").await?;
    let system = System::start(&env, &namespace).await?;
    let outside = tempfile::tempdir()?;
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, format!("{MARKER}\n"))?;
    let secret = secret.to_string_lossy().into_owned();
    within(LIMIT, "checking permissions", async {
        system.bind_organization("org-p").await?;
        create(
            &namespace.api(),
            &system.sidecar_manifest("strict", "org-p", 1)?,
        )
        .await?;
        let mut open = serde_json::to_value(system.sidecar_manifest("open", "org-p", 1)?)?;
        open["spec"]["permissions"] = json!({"externalDirectory": "allow", "bashDeny": ["rm *"]});
        let open: OpencodeSidecar = serde_json::from_value(open)?;
        create(&namespace.api(), &open).await?;
        system.await_fleet_ready("strict", 1).await?;
        system.await_fleet_ready("open", 1).await?;
        let tasks = namespace.api::<DelegatedTask>();

        let read = call("read", json!({"filePath": secret}));
        let strict_read = output_of(&tasks, &system, "strict-read", "strict", &read).await?;
        assert!(!strict_read.contains(MARKER), "{strict_read}");
        let open_read = output_of(&tasks, &system, "open-read", "open", &read).await?;
        assert!(open_read.contains(MARKER), "{open_read}");

        let rm = call(
            "bash",
            json!({"command": "rm -f nothing-here && echo removed", "description": "Remove"}),
        );
        let refused = output_of(&tasks, &system, "open-rm", "open", &rm).await?;
        assert!(!refused.contains("removed"), "{refused}");
        let echo = call(
            "bash",
            json!({"command": "echo still-allowed", "description": "Echo"}),
        );
        let allowed = output_of(&tasks, &system, "open-echo", "open", &echo).await?;
        assert!(allowed.contains("still-allowed"), "{allowed}");
        Ok(())
    })
    .await
    .with_context(|| system.diagnostics())
}
