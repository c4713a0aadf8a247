//! The client against a real `opencode serve` driven by the scripted fake LLM: sessions,
//! asynchronous prompts, the typed event stream, messages, status and abort. One server is
//! shared by every test here; each test works in its own session.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use nubabel_e2e::fake_llm::{ANSWER_PREFIX, TOOL_OUTPUT, TOOL_RESULT_PREFIX, message_text};
use nubabel_e2e::opencode_server::{shared_opencode, with_shared};
use nubabel_e2e::within;
use nubabel_opencode::{
    ClientConfig, Event, EventStream, OpencodeClient, Part, PromptRequest, SessionStatus,
    ToolStatus, final_assistant_text, last_assistant_error,
};
use serde_json::Value;

/// Starting the shared server (5 to 8 s, more on a loaded machine) counts against the first test.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);
/// A turn against the fake LLM takes about a second warm and 8 s in a fresh project.
const TURN_TIMEOUT: Duration = Duration::from_secs(60);

async fn client() -> Result<OpencodeClient> {
    let (base_url, password) = shared_opencode().await?;
    Ok(OpencodeClient::new(
        ClientConfig::new(base_url).with_password(password),
    )?)
}

/// Opens the event stream and waits for `server.connected`, so no later event is missed.
async fn subscribe(client: &OpencodeClient) -> Result<EventStream> {
    let mut events = client.events().await?;
    let first = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .context("no server.connected within 10 s")?
        .context("the event stream ended at once")??;
    assert_eq!(first.event, Event::ServerConnected);
    Ok(events)
}

/// Collects the events of `session` until `done` accepts one (included), within `limit`.
async fn events_until(
    events: &mut EventStream,
    session: &str,
    limit: Duration,
    mut done: impl FnMut(&Event) -> bool,
) -> Result<Vec<Event>> {
    let mut seen = Vec::new();
    let collect = async {
        while let Some(envelope) = events.next().await {
            let event = envelope?.event;
            if event.session_id() != Some(session) {
                continue;
            }
            let finished = done(&event);
            seen.push(event);
            if finished {
                return Ok(());
            }
        }
        bail!("the event stream ended")
    };
    match tokio::time::timeout(limit, collect).await {
        Ok(result) => result.map(|()| seen),
        Err(_) => bail!("waited {limit:?} for an event of {session}; saw {seen:#?}"),
    }
}

fn is_idle(event: &Event) -> bool {
    matches!(event, Event::SessionIdle { .. })
}

fn statuses(events: &[Event]) -> Vec<&'static str> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::SessionStatus { status, .. } => Some(status.name()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_prompt_makes_the_session_busy_then_idle_and_the_messages_end_with_the_answer()
-> Result<()> {
    within(TEST_TIMEOUT, "the plain prompt test", async {
        let client = client().await?;
        assert!(client.health().await?.healthy);
        let session = client.create_session(Some("plain prompt")).await?;
        assert!(session.id.starts_with("ses_"), "{session:?}");
        let mut events = subscribe(&client).await?;

        let marker = format!("MARK-PLAIN-{}", session.id);
        client
            .prompt_async(
                &session.id,
                &PromptRequest::text(format!("Say PONG {marker}")),
            )
            .await?;
        let seen = events_until(&mut events, &session.id, TURN_TIMEOUT, is_idle).await?;

        let statuses = statuses(&seen);
        assert_eq!(statuses.first(), Some(&"busy"), "{seen:#?}");
        assert_eq!(statuses.last(), Some(&"idle"), "{seen:#?}");
        assert!(
            seen.iter()
                .any(|e| matches!(e, Event::MessagePartDelta { .. })),
            "no deltas: {seen:#?}"
        );

        let messages = client.messages(&session.id, None).await?;
        let answer = final_assistant_text(&messages).context("no assistant text")?;
        assert_eq!(answer, format!("{ANSWER_PREFIX}Say PONG {marker}"));
        assert!(last_assistant_error(&messages).is_none());
        let last_two = client.messages(&session.id, Some(1)).await?;
        assert_eq!(last_two.len(), 1);
        assert!(!client.session_status().await?.contains_key(&session.id));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_toolcall_prompt_shows_the_bash_part_running_then_completed_with_its_output() -> Result<()>
{
    within(TEST_TIMEOUT, "the tool call test", async {
        let client = client().await?;
        let session = client.create_session(Some("tool call")).await?;
        let mut events = subscribe(&client).await?;
        client
            .prompt_async(&session.id, &PromptRequest::text("TOOLCALL please"))
            .await?;
        let seen = events_until(&mut events, &session.id, TURN_TIMEOUT, is_idle).await?;

        let tool_states: Vec<_> = seen
            .iter()
            .filter_map(|event| match event {
                Event::MessagePartUpdated {
                    part: Part::Tool(tool),
                    ..
                } => Some(tool),
                _ => None,
            })
            .collect();
        let first_running = tool_states
            .iter()
            .position(|t| t.state.status == ToolStatus::Running);
        let completed = tool_states
            .iter()
            .position(|t| t.state.status == ToolStatus::Completed);
        let (Some(running), Some(completed)) = (first_running, completed) else {
            panic!("no running and completed tool states: {tool_states:#?}");
        };
        assert!(running < completed);
        let done = tool_states[completed];
        assert_eq!(done.tool, "bash");
        assert!(done.call_id.starts_with("call_fake_"), "{done:?}");
        assert_eq!(
            done.state.output.as_deref().map(str::trim),
            Some(TOOL_OUTPUT)
        );

        let messages = client.messages(&session.id, None).await?;
        assert_eq!(
            final_assistant_text(&messages).as_deref(),
            Some(format!("{TOOL_RESULT_PREFIX}{TOOL_OUTPUT}").as_str())
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_llm_that_answers_400_fails_the_turn_with_an_api_error_and_then_idles() -> Result<()> {
    within(TEST_TIMEOUT, "the LLM error test", async {
        let client = client().await?;
        let session = client.create_session(Some("llm error")).await?;
        let mut events = subscribe(&client).await?;
        client
            .prompt_async(&session.id, &PromptRequest::text("ERROR400"))
            .await?;
        let seen = events_until(&mut events, &session.id, TURN_TIMEOUT, is_idle).await?;

        let error = seen
            .iter()
            .find_map(|event| match event {
                Event::SessionError { error, .. } => error.clone(),
                _ => None,
            })
            .with_context(|| format!("no session.error: {seen:#?}"))?;
        assert_eq!(error.name, "APIError");
        assert_eq!(error.data["statusCode"], 400);
        assert!(
            !statuses(&seen).contains(&"retry"),
            "a 400 must not be retried: {seen:#?}"
        );
        let messages = client.messages(&session.id, None).await?;
        assert_eq!(
            last_assistant_error(&messages).map(|e| e.name.as_str()),
            Some("APIError")
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn abort_during_a_slow_answer_brings_the_session_back_to_idle() -> Result<()> {
    within(TEST_TIMEOUT, "the abort test", async {
        let client = client().await?;
        let session = client.create_session(Some("abort")).await?;
        let mut events = subscribe(&client).await?;
        client
            .prompt_async(&session.id, &PromptRequest::text("SLOW:60"))
            .await?;
        // The first streamed token proves the LLM call is under way.
        events_until(&mut events, &session.id, TURN_TIMEOUT, |event| {
            matches!(event, Event::MessagePartDelta { delta, .. } if delta.contains("slow-1"))
        })
        .await?;
        assert_eq!(
            client.session_status().await?.get(&session.id),
            Some(&SessionStatus::Busy)
        );

        assert!(client.abort(&session.id).await?);
        // Far less than the 60 s the answer would take.
        let seen = events_until(&mut events, &session.id, Duration::from_secs(15), is_idle).await?;
        assert_eq!(statuses(&seen).last(), Some(&"idle"), "{seen:#?}");
        assert!(!client.session_status().await?.contains_key(&session.id));
        let messages = client.messages(&session.id, None).await?;
        assert_eq!(
            last_assistant_error(&messages).map(|e| e.name.as_str()),
            Some("MessageAbortedError")
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_second_prompt_in_the_same_session_sends_the_first_turn_to_the_llm() -> Result<()> {
    within(TEST_TIMEOUT, "the multi-turn test", async {
        let client = client().await?;
        let session = client.create_session(Some("two turns")).await?;
        let mut events = subscribe(&client).await?;
        let first = format!("MARK-FIRST-{}", session.id);
        let second = format!("MARK-SECOND-{}", session.id);
        for marker in [&first, &second] {
            client
                .prompt_async(&session.id, &PromptRequest::text(marker.clone()))
                .await?;
            events_until(&mut events, &session.id, TURN_TIMEOUT, is_idle).await?;
        }

        let requests = with_shared(|shared| shared.llm.requests_containing(&second))?;
        let turn = requests
            .iter()
            .find(|r| r["tools"].as_array().is_some_and(|tools| !tools.is_empty()))
            .with_context(|| format!("no agent request for the second prompt: {requests:#?}"))?;
        let messages = turn["messages"].as_array().context("no messages")?;
        let text_of = |role: &str| -> Vec<String> {
            messages
                .iter()
                .filter(|m| m["role"] == role)
                .map(message_text)
                .collect()
        };
        assert!(
            text_of("user").iter().any(|t| t.contains(&first)),
            "{messages:#?}"
        );
        let first_answer = format!("{ANSWER_PREFIX}{first}");
        assert!(
            text_of("assistant")
                .iter()
                .any(|t| t.contains(&first_answer)),
            "{messages:#?}"
        );
        assert!(
            messages
                .last()
                .is_some_and(|m| m["role"] == "user" && message_text(m).contains(&second)),
            "{messages:#?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_401_and_unknown_sessions_are_not_found() -> Result<()> {
    within(TEST_TIMEOUT, "the auth test", async {
        let (base_url, _) = shared_opencode().await?;
        let intruder = OpencodeClient::new(ClientConfig::new(base_url).with_password("wrong"))?;
        let error = intruder.health().await.unwrap_err();
        assert_eq!(error.status(), Some(401), "{error:?}");
        assert!(!error.is_transient());

        let client = client().await?;
        let error = client
            .messages("ses_doesnotexist0000000000000", None)
            .await
            .unwrap_err();
        assert!(error.is_not_found(), "{error:?}");
        let status: Value = serde_json::to_value(client.session_status().await?)?;
        assert!(status.is_object());
        Ok(())
    })
    .await
}
