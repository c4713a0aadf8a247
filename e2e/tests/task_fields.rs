//! Every field of a task reaches OpenCode, proven by what the fake LLM receives: the caller's
//! context after the prompt, the model the fleet maps the task's category to, the instructions
//! of the skills it loads. A category or skill the fleet does not have fails the task before
//! the LLM is called.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar, TaskPhase};
use nubabel_e2e::system::{FAKE_PROVIDER, System};
use nubabel_e2e::{TestEnv, TestNamespace, create, within};
use serde_json::json;
use task_support::{await_event, await_phase, request_texts, task, with};

mod task_support;

const LIMIT: Duration = Duration::from_secs(240);

#[tokio::test]
async fn context_category_and_skills_reach_the_llm_and_unknown_ones_fail_first() -> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "task-fields").await?;
    let system = System::start(&env, &namespace).await?;
    within(LIMIT, "sending every task field", async {
        system.bind_organization("org-f").await?;
        create(
            &namespace.api::<ConfigMap>(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "skills"},
                "data": {"release-notes": "Write release notes in the past tense. SKILL-MARKER-42"},
            }))?,
        )
        .await?;
        let mut fleet = serde_json::to_value(system.sidecar_manifest("fleet", "org-f", 1)?)?;
        fleet["spec"]["categories"] =
            json!({"quick": {"model": format!("{FAKE_PROVIDER}/fast-model")}});
        fleet["spec"]["skillsConfigMapRef"] = json!({"name": "skills"});
        let fleet: OpencodeSidecar = serde_json::from_value(fleet)?;
        create(&namespace.api(), &fleet).await?;
        system.await_fleet_ready("fleet", 1).await?;
        let tasks = namespace.api::<DelegatedTask>();

        create(
            &tasks,
            &with(
                task(
                    "all-fields",
                    "org-f",
                    Some("fleet"),
                    None,
                    "marker-fields please",
                ),
                json!({
                    "category": "quick",
                    "loadSkills": ["release-notes"],
                    "context": {"ticket": "PAY-77", "channel": "#billing"},
                }),
            ),
        )
        .await?;
        await_phase(&tasks, "all-fields", TaskPhase::Succeeded, &system).await?;
        let requests = system.fake_llm().requests_containing("marker-fields");
        let turn = requests
            .iter()
            .find(|r| r["tools"].as_array().is_some_and(|t| !t.is_empty()))
            .context("no agent request for the task")?;
        assert_eq!(turn["model"], "fast-model", "the category's model");
        let sent = request_texts(turn, None);
        assert!(
            sent.contains("PAY-77") && sent.contains("Context from the requester"),
            "{sent}"
        );
        assert!(sent.contains("SKILL-MARKER-42"), "the skill's body: {sent}");

        // A task without a category runs on the fleet's model.
        create(
            &tasks,
            &task("plain", "org-f", Some("fleet"), None, "marker-plain please"),
        )
        .await?;
        await_phase(&tasks, "plain", TaskPhase::Succeeded, &system).await?;
        let plain = system.fake_llm().requests_containing("marker-plain");
        assert!(
            plain.iter().all(|r| r["model"] == "fake-model"),
            "{plain:?}"
        );

        // Unknown names end the task before the LLM is called.
        for (name, fields, reason) in [
            (
                "unknown-category",
                json!({"category": "ultrabrain"}),
                "UnknownCategory",
            ),
            (
                "unknown-skill",
                json!({"loadSkills": ["no-such-skill"]}),
                "UnknownSkill",
            ),
        ] {
            let marker = format!("marker-{name}");
            create(
                &tasks,
                &with(task(name, "org-f", Some("fleet"), None, &marker), fields),
            )
            .await?;
            let failed = await_phase(&tasks, name, TaskPhase::Failed, &system).await?;
            let error = failed.status.unwrap().error.unwrap();
            assert_eq!(error.reason, reason, "{}", error.message);
            await_event(&namespace, name, "Warning", reason).await?;
            assert!(
                system.fake_llm().requests_containing(&marker).is_empty(),
                "{name} reached the LLM"
            );
        }
        Ok(())
    })
    .await
    .with_context(|| system.diagnostics())
}
