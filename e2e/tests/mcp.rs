//! The MCP gateway end to end: OpenCode in a sidecar pod, configured by the operator with the
//! callback API's `/mcp` as a remote MCP server, calls a tenant tool; the callback API runs it
//! against the tenant's upstream MCP server with the tenant's token, which never enters the pod.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use nubabel_crds::v1alpha1::{DelegatedTask, TaskPhase};
use nubabel_e2e::fake_llm::TOOL_RESULT_PREFIX;
use nubabel_e2e::mcp_upstream::McpUpstream;
use nubabel_e2e::node_shim::HOST_IP;
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, await_condition, create, within};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(240);
const TENANT_TOKEN: &str = "tenant-a-upstream-token";

#[tokio::test]
async fn a_task_calls_a_tenant_tool_through_the_gateway_with_the_tenants_token() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "mcp-gateway").await?;
    let system = System::start(&env, &namespace).await?;
    let upstream = McpUpstream::start_on(IpAddr::V4(HOST_IP))?;
    within(LIMIT, "a task calling a tenant tool over MCP", async {
        // Registered before the fleet starts, so OpenCode's first tools/list has the tools.
        system
            .register_mcp_connection("org-a", "alpha", &upstream.url(), TENANT_TOKEN)
            .await?;
        system.bind_organization("org-a").await?;
        create(&namespace.api(), &system.sidecar_manifest("fleet", "org-a", 1)?).await?;
        system.await_fleet_ready("fleet", 1).await?;

        // OpenCode names the gateway's tools `nubabel_<provider>_<tool>`.
        let prompt = r#"MCPCALL:nubabel_alpha_echo:{"text": "from-the-e2e-task"}"#;
        let tasks = namespace.api::<DelegatedTask>();
        let task: DelegatedTask = serde_json::from_value(json!({
            "apiVersion": "nubabel.io/v1alpha1",
            "kind": "DelegatedTask",
            "metadata": {"name": "mcp-call"},
            "spec": {"organizationId": "org-a", "sidecarRef": {"name": "fleet"},
                     "sessionId": "mcp-conversation", "prompt": prompt, "timeoutSeconds": 120},
        }))?;
        create(&tasks, &task).await?;
        let finished = await_condition(
            &tasks,
            "mcp-call",
            "the task to finish",
            |t: Option<&DelegatedTask>| {
                t.and_then(|t| t.status.as_ref())
                    .and_then(|s| s.phase)
                    .is_some_and(TaskPhase::is_finished)
            },
            Duration::from_secs(120),
        )
        .await
        .with_context(|| system.diagnostics())?
        .context("the task disappeared")?;
        let status = finished.status.clone().unwrap_or_default();
        assert_eq!(
            status.phase,
            Some(TaskPhase::Succeeded),
            "error {:?}\n{}",
            status.error,
            system.diagnostics()
        );

        // The upstream got the call, with the tenant's token, which the pod never had.
        let calls = upstream.requests_for("tools/call");
        assert_eq!(calls.len(), 1, "{calls:?}\n{}", system.diagnostics());
        assert_eq!(calls[0].params["name"], "echo");
        assert_eq!(calls[0].params["arguments"], json!({"text": "from-the-e2e-task"}));
        let bearer = format!("Bearer {TENANT_TOKEN}");
        assert_eq!(calls[0].authorization.as_deref(), Some(bearer.as_str()));
        let pod_spec = serde_json::to_string(
            &namespace
                .api::<k8s_openapi::api::core::v1::Pod>()
                .get("fleet-0")
                .await?,
        )?;
        assert!(!pod_spec.contains(TENANT_TOKEN));

        // The tool's answer went back to the model, and into the task's output.
        let output = status.output.clone().unwrap_or_default();
        assert!(
            output.starts_with(TOOL_RESULT_PREFIX) && output.contains("from-the-e2e-task"),
            "output: {output}"
        );

        // The call is a progress event of the task's session, and shows in its status.
        let session_pk: uuid::Uuid = sqlx::query_scalar(
            "select id from sessions where organization_id = 'org-a' and session_id = 'mcp-conversation'",
        )
        .fetch_one(system.db())
        .await?;
        let recorded: Vec<Value> = sqlx::query_scalar(
            "select body from session_events where session_pk = $1 and event_type = 'mcp_tool_call'",
        )
        .bind(session_pk)
        .fetch_all(system.db())
        .await?;
        assert_eq!(recorded.len(), 1, "{recorded:?}");
        assert_eq!(recorded[0]["tool"], "alpha_echo");
        assert_eq!(recorded[0]["outcome"], "success");
        assert_eq!(recorded[0]["via"], "mcp");
        await_condition(
            &tasks,
            "mcp-call",
            "status.progress to show the tool call",
            |t: Option<&DelegatedTask>| {
                t.and_then(|t| t.status.as_ref())
                    .and_then(|s| s.progress.as_ref())
                    .is_some_and(|p| {
                        p.tools_completed >= 1
                            && p.last_tool.as_deref().is_some_and(|tool| tool.contains("alpha_echo"))
                    })
            },
            Duration::from_secs(30),
        )
        .await
        .with_context(|| system.diagnostics())?;
        Ok(())
    })
    .await?;
    drop(upstream);
    system.shutdown().await?;
    namespace.delete().await
}
