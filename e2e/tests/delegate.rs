//! `POST /api/delegate` end to end: a tenant API token, the callback API creating the task,
//! the operator running it on real OpenCode (against the fake LLM), and the seed's answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, Result};
use nubabel_contract::identity::OrganizationId;
use nubabel_crds::v1alpha1::{DelegatedTask, TaskPhase};
use nubabel_e2e::fake_llm::TOOL_OUTPUT;
use nubabel_e2e::opencode_server::FAKE_MODEL;
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, await_condition, create, within};
use nubabel_store::api_tokens;
use reqwest::StatusCode;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(300);

#[tokio::test]
async fn delegate_waits_for_the_answer_and_the_same_session_continues_the_conversation()
-> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "delegate").await?;
    let system = System::start(&env, &namespace).await?;
    within(LIMIT, "delegating two turns", async {
        system.bind_organization("org-d").await?;
        create(
            &namespace.api(),
            &system.sidecar_manifest("fleet", "org-d", 1)?,
        )
        .await?;
        system.await_fleet_ready("fleet", 1).await?;
        let token = api_tokens::issue(
            system.db(),
            &OrganizationId::parse("org-d")?,
            namespace.name(),
            "e2e",
        )
        .await?;
        let other = api_tokens::issue(
            system.db(),
            &OrganizationId::parse("org-other")?,
            namespace.name(),
            "e2e",
        )
        .await?;
        let http = reqwest::Client::new();
        let url = format!("{}/api/delegate", system.callback_url());
        let request = |prompt: &str| {
            json!({
                "category": "quick", "load_skills": [], "prompt": prompt,
                "session_id": "conversation-d", "organizationId": "org-d", "userId": "u-1",
                "context": {"from": "e2e"},
            })
        };

        // Another tenant's token cannot create org-d's tasks.
        let refused = http
            .post(&url)
            .bearer_auth(&other.token)
            .json(&request("TOOLCALL nope"))
            .send()
            .await?;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);

        // Turn one waits (the default) and answers like the seed's /delegate.
        let response = http
            .post(&url)
            .bearer_auth(&token.token)
            .json(&request("TOOLCALL marker-one"))
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::OK);
        let first: Value = response.json().await?;
        assert_eq!(
            first["status"],
            "success",
            "{first}\n{}",
            system.diagnostics()
        );
        assert!(
            first["output"].as_str().unwrap().contains(TOOL_OUTPUT),
            "{first}"
        );
        let metadata = &first["metadata"];
        assert_eq!(metadata["model"], FAKE_MODEL);
        assert_eq!(metadata["nubabelSessionId"], "conversation-d");
        assert_eq!(metadata["phase"], "Succeeded");
        let opencode_session = metadata["opencodeSessionId"].as_str().unwrap().to_owned();
        assert!(opencode_session.starts_with("ses"), "{metadata}");

        // Turn two does not wait: 202 with the task and its stream, then the task succeeds in
        // the same OpenCode session, and the LLM saw turn one.
        let response = http
            .post(format!("{url}?wait=false"))
            .bearer_auth(&token.token)
            .json(&request("second question marker-two"))
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let accepted: Value = response.json().await?;
        let name = accepted["taskName"].as_str().unwrap().to_owned();
        let tasks = namespace.api::<DelegatedTask>();
        let second = await_condition(
            &tasks,
            &name,
            "the second task to finish",
            |t: Option<&DelegatedTask>| {
                t.and_then(|t| t.status.as_ref())
                    .and_then(|s| s.phase)
                    .is_some_and(TaskPhase::is_finished)
            },
            Duration::from_secs(90),
        )
        .await
        .with_context(|| system.diagnostics())?
        .unwrap();
        let status = second.status.unwrap();
        assert_eq!(
            status.phase,
            Some(TaskPhase::Succeeded),
            "{:?}",
            status.error
        );
        assert_eq!(
            status.opencode_session_id.as_deref(),
            Some(opencode_session.as_str())
        );
        assert!(status.output.unwrap_or_default().contains("marker-two"));
        let saw_turn_one = system
            .fake_llm()
            .requests_containing("marker-two")
            .iter()
            .any(|r| r.to_string().contains("marker-one"));
        assert!(
            saw_turn_one,
            "the second turn's LLM request did not carry the first turn"
        );

        // The stream token handed out reads the session's events.
        let stream = http
            .get(format!(
                "{}{}",
                system.callback_url(),
                accepted["streamUrl"].as_str().unwrap()
            ))
            .bearer_auth(accepted["streamToken"].as_str().unwrap())
            .send()
            .await?;
        assert_eq!(stream.status(), StatusCode::OK);
        assert_eq!(
            stream.headers()["content-type"].to_str()?,
            "text/event-stream"
        );
        Ok(())
    })
    .await?;
    system.shutdown().await?;
    namespace.delete().await
}
