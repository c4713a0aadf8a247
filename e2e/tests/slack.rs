//! The Slack bot end to end: a signed mention reaches the callback API, becomes a task that
//! real OpenCode works on, and the fake Slack sees the acknowledgement, progress edits and the
//! answer in the thread; a reply in the thread continues the same OpenCode session.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, Result};
use kube::api::ListParams;
use nubabel_crds::v1alpha1::{DelegatedTask, TaskPhase};
use nubabel_e2e::fake_llm::TOOL_OUTPUT;
use nubabel_e2e::fake_slack::{FakeSlack, SlackCall, message_event, signed_headers};
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, await_condition, create, within};
use reqwest::StatusCode;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);
const WAIT: Duration = Duration::from_secs(90);
const BOT_TOKEN: &str = "xoxb-e2e-bot-token";
const SECRET: &str = "e2e-signing-secret";
const TEAM: &str = "T0E2E";
const CHANNEL: &str = "C0E2E";

async fn send(http: &reqwest::Client, system: &System, event: &Value) -> Result<()> {
    let raw = serde_json::to_vec(event)?;
    let mut request = http.post(format!("{}/slack/events", system.callback_url()));
    for (name, value) in signed_headers(SECRET, jiff::Timestamp::now().as_second(), &raw) {
        request = request.header(name, value);
    }
    let started = std::time::Instant::now();
    let response = request.body(raw).send().await?;
    assert_eq!(response.status(), StatusCode::OK);
    // Slack wants its answer within three seconds; the work happens afterwards.
    assert!(started.elapsed() < Duration::from_secs(3));
    Ok(())
}

fn answers<'a>(calls: &'a [SlackCall], needle: &str) -> Vec<&'a SlackCall> {
    calls
        .iter()
        .filter(|c| c.method == "chat.postMessage" && c.status == 200 && c.text().contains(needle))
        .collect()
}

async fn finished_task(
    tasks: &kube::Api<DelegatedTask>,
    system: &System,
    count: usize,
) -> Result<DelegatedTask> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut items = tasks.list(&ListParams::default()).await?.items;
        items.sort_by_key(|t| t.metadata.creation_timestamp.clone().map(|t| t.0));
        if items.len() >= count {
            let name = items[count - 1].metadata.name.clone().unwrap();
            return await_condition(
                tasks,
                &name,
                "the task to finish",
                |t: Option<&DelegatedTask>| {
                    t.and_then(|t| t.status.as_ref())
                        .and_then(|s| s.phase)
                        .is_some_and(TaskPhase::is_finished)
                },
                WAIT,
            )
            .await
            .with_context(|| system.diagnostics())?
            .context("the task disappeared");
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no task {count} appeared"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_mention_gets_an_acknowledgement_progress_and_the_answer_and_replies_continue()
-> Result<()> {
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, "slack").await?;
    let slack = FakeSlack::start("127.0.0.1".parse()?, BOT_TOKEN).await?;
    let system = System::start_with(
        &env,
        &namespace,
        &[
            format!("--slack-bot-token={BOT_TOKEN}"),
            format!("--slack-signing-secret={SECRET}"),
            format!("--slack-api-url={}", slack.api_url()),
            format!("--slack-teams={TEAM}=org-s/{}", namespace.name()),
        ],
    )
    .await?;
    within(LIMIT, "a conversation in a Slack thread", async {
        system.bind_organization("org-s").await?;
        create(
            &namespace.api(),
            &system.sidecar_manifest("fleet", "org-s", 1)?,
        )
        .await?;
        system.await_fleet_ready("fleet", 1).await?;
        let http = reqwest::Client::new();
        let tasks = namespace.api::<DelegatedTask>();
        let thread = "1800000000.000100";

        send(
            &http,
            &system,
            &message_event(
                "EvE2E1",
                TEAM,
                CHANNEL,
                thread,
                None,
                "<@U0BOT> TOOLCALL marker-one",
            ),
        )
        .await?;
        let first = finished_task(&tasks, &system, 1).await?;
        let status = first.status.clone().unwrap();
        assert_eq!(
            status.phase,
            Some(TaskPhase::Succeeded),
            "{:?}",
            status.error
        );
        let calls = slack
            .wait_for("the answer in the thread", WAIT, |calls| {
                !answers(calls, TOOL_OUTPUT).is_empty()
            })
            .await
            .with_context(|| system.diagnostics())?;

        // Acknowledgement first, in the thread; then edits of it; then the answer.
        let ack = calls
            .iter()
            .find(|c| c.method == "chat.postMessage" && c.status == 200)
            .unwrap();
        assert!(ack.authorized);
        assert_eq!(ack.body["thread_ts"], thread);
        assert!(ack.text().contains("On it"), "{}", ack.text());
        let answer_at = calls
            .iter()
            .position(|c| c.method == "chat.postMessage" && c.text().contains(TOOL_OUTPUT))
            .unwrap();
        let edits_before: Vec<_> = calls[..answer_at]
            .iter()
            .filter(|c| c.method == "chat.update" && c.status == 200)
            .collect();
        assert!(
            !edits_before.is_empty(),
            "no progress edit before the answer: {calls:#?}"
        );
        assert_eq!(calls[answer_at].body["thread_ts"], thread);
        slack
            .wait_for("the acknowledgement to say done", WAIT, |calls| {
                calls
                    .iter()
                    .any(|c| c.method == "chat.update" && c.text().contains("Done"))
            })
            .await?;

        // A reply in the thread continues the conversation in the same OpenCode session.
        send(
            &http,
            &system,
            &message_event(
                "EvE2E2",
                TEAM,
                CHANNEL,
                "1800000050.000100",
                Some(thread),
                "<@U0BOT> second question marker-two",
            ),
        )
        .await?;
        let second = finished_task(&tasks, &system, 2).await?;
        assert_eq!(second.spec.session_id, first.spec.session_id);
        let second_status = second.status.unwrap();
        assert_eq!(second_status.phase, Some(TaskPhase::Succeeded));
        assert_eq!(
            second_status.opencode_session_id,
            status.opencode_session_id
        );
        let saw_turn_one = system
            .fake_llm()
            .requests_containing("marker-two")
            .iter()
            .any(|r| r.to_string().contains("marker-one"));
        assert!(
            saw_turn_one,
            "the reply's LLM request did not carry the first turn"
        );
        let calls = slack
            .wait_for("the second answer", WAIT, |calls| {
                !answers(calls, "marker-two").is_empty()
            })
            .await?;
        let second_answers = answers(&calls, "marker-two");
        assert_eq!(second_answers.len(), 1);
        assert_eq!(second_answers[0].body["thread_ts"], thread);
        assert_eq!(
            answers(&calls, TOOL_OUTPUT).len(),
            1,
            "the first answer was posted again"
        );
        Ok(())
    })
    .await?;
    system.shutdown().await?;
    namespace.delete().await
}
