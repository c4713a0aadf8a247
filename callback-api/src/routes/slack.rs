//! `POST /slack/events`: the Slack Events API.
//!
//! The signature is checked on the raw body before anything is parsed. Slack wants an answer
//! within three seconds and retries otherwise, so the handler only records the event id (a
//! retry, on any replica, is then acknowledged and dropped) and creates the task in the
//! background; the notifier posts everything the thread sees. The channel of every verified
//! request is recorded for the team's tenant: the notifier posts only to such channels.

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use nubabel_crds::v1alpha1::{NotifySpec, SlackTarget};
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::unix_now,
    error::{ApiError, ErrorBody},
    routes::delegate::{NewTask, build_task, create_task},
    slack::{SlackBot, TeamTarget, text},
    state::AppState,
};

/// Largest Events API body accepted (Slack's events are a few KiB).
const MAX_EVENT_BYTES: usize = 256 * 1024;

/// The Slack route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(slack_events))
        .layer(DefaultBodyLimit::max(MAX_EVENT_BYTES))
}

#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    challenge: Option<String>,
    #[serde(default)]
    team_id: Option<String>,
    #[serde(default)]
    event_id: Option<String>,
    #[serde(default)]
    event: Option<MessageEvent>,
}

/// The fields of `app_mention` and `message` events the bot reads.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    subtype: Option<String>,
    #[serde(default)]
    channel_type: Option<String>,
    #[serde(default)]
    bot_id: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    ts: Option<String>,
    #[serde(default)]
    thread_ts: Option<String>,
}

impl MessageEvent {
    /// Mentions, and direct messages people wrote (not bots, not edits or deletions).
    pub fn is_request(&self) -> bool {
        let by_person = self.bot_id.is_none() && self.subtype.is_none() && self.user.is_some();
        match self.kind.as_str() {
            "app_mention" => by_person,
            "message" => by_person && self.channel_type.as_deref() == Some("im"),
            _ => false,
        }
    }
}

/// What a verified Events API body asks of the bot.
#[derive(Debug, Clone)]
pub enum SlackRequest {
    /// `url_verification`: answer with the challenge.
    Challenge(String),
    /// An `event_callback` in which a person addresses the bot.
    Request {
        /// The workspace (`team_id`).
        team: String,
        /// Slack's id of the event, the same on every retry.
        event_id: String,
        /// The message.
        event: Box<MessageEvent>,
    },
    /// Anything else: acknowledged, nothing done.
    Ignored,
}

/// Reads a (verified) Events API body: pure, so every body a sender can make is tested apart
/// from the handler's I/O.
pub fn read_body(body: &[u8]) -> Result<SlackRequest, ApiError> {
    let envelope: Envelope = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not a Slack event: {e}")))?;
    match envelope.kind.as_str() {
        "url_verification" => envelope
            .challenge
            .map(SlackRequest::Challenge)
            .ok_or_else(|| ApiError::BadRequest("url_verification without challenge".into())),
        "event_callback" => {
            let (Some(team), Some(event_id), Some(event)) =
                (envelope.team_id, envelope.event_id, envelope.event)
            else {
                return Err(ApiError::BadRequest(
                    "event_callback without team_id, event_id or event".into(),
                ));
            };
            Ok(if event.is_request() {
                SlackRequest::Request {
                    team,
                    event_id,
                    event: Box::new(event),
                }
            } else {
                SlackRequest::Ignored
            })
        }
        _ => Ok(SlackRequest::Ignored),
    }
}

/// Receives Slack events.
#[utoipa::path(
    post,
    path = "/slack/events",
    tag = "slack",
    request_body(content = Object, description = "A Slack Events API request (`url_verification` or `event_callback`)"),
    security(("slack_signature" = [])),
    responses(
        (status = 200, description = "Acknowledged (for `url_verification`: `{\"challenge\": ...}`)"),
        (status = 400, description = "The body is not a Slack event", body = ErrorBody),
        (status = 401, description = "Missing, stale or invalid Slack signature", body = ErrorBody),
        (status = 404, description = "The Slack bot is not configured on this server", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 503, description = "Postgres unavailable; Slack retries", body = ErrorBody),
    )
)]
async fn slack_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let bot = state.slack.clone().ok_or(ApiError::NotConfigured(
        "the Slack bot is not configured on this server",
    ))?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    bot.verify(
        header("x-slack-request-timestamp"),
        header("x-slack-signature"),
        &body,
        unix_now(),
    )
    .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    match read_body(&body)? {
        SlackRequest::Challenge(challenge) => {
            Ok(Json(json!({"challenge": challenge})).into_response())
        }
        SlackRequest::Request {
            team,
            event_id,
            event,
        } => {
            handle_event(
                &state,
                &bot,
                team,
                event_id,
                *event,
                header("x-slack-retry-num"),
            )
            .await?;
            Ok(StatusCode::OK.into_response())
        }
        SlackRequest::Ignored => Ok(StatusCode::OK.into_response()),
    }
}

async fn handle_event(
    state: &AppState,
    bot: &Arc<SlackBot>,
    team: String,
    event_id: String,
    event: MessageEvent,
    retry: Option<&str>,
) -> Result<(), ApiError> {
    let Some(target) = bot.teams.get(&team).cloned() else {
        tracing::warn!(%team, "slack event from a workspace that is not mapped to a tenant; ignored");
        return Ok(());
    };
    // The verified event proves the channel belongs to the team, so the tenant's tasks may
    // report there. Recorded before the event id, so a failure here is retried by Slack.
    if let Some(channel) = event.channel.as_deref() {
        nubabel_store::slack::record_channel(&state.db, &target.organization_id, &team, channel)
            .await?;
    }
    if !nubabel_store::slack::record_event(&state.db, &event_id, &team).await? {
        tracing::info!(%event_id, retry, "slack event seen before; acknowledged again");
        return Ok(());
    }
    let state = state.clone();
    let bot = Arc::clone(bot);
    tokio::spawn(async move {
        if let Err(error) = start_task(&state, &bot, &team, &target, &event).await {
            tracing::warn!(%team, %event_id, error = %error, "starting a task for a slack event failed");
        }
    });
    Ok(())
}

/// The Nubabel session of a Slack thread: every message of the thread continues it.
pub fn thread_session_id(team: &str, channel: &str, thread_ts: &str) -> String {
    format!("slack:{team}:{channel}:{thread_ts}")
}

async fn start_task(
    state: &AppState,
    bot: &SlackBot,
    team: &str,
    target: &TeamTarget,
    event: &MessageEvent,
) -> anyhow::Result<()> {
    let (Some(channel), Some(ts)) = (event.channel.as_deref(), event.ts.as_deref()) else {
        anyhow::bail!("the event names no channel or ts");
    };
    let thread_ts = event.thread_ts.as_deref().unwrap_or(ts);
    let prompt = text::prompt_of(event.text.as_deref().unwrap_or_default());
    if prompt.is_empty() {
        bot.client
            .post_message(
                channel,
                Some(thread_ts),
                "Ask me something after the mention, e.g. `@nubabel summarise this repository`.",
            )
            .await?;
        return Ok(());
    }
    let Some(client) = state.kube.clone().map(|k| k.0) else {
        anyhow::bail!("no Kubernetes client to create tasks with");
    };
    let user = event.user.clone().unwrap_or_default();
    let new = NewTask {
        namespace: target.namespace.clone(),
        organization_id: target.organization_id.clone(),
        user_id: Some(format!("slack:{team}:{user}")),
        session_id: thread_session_id(team, channel, thread_ts),
        prompt,
        category: None,
        load_skills: Vec::new(),
        context: Some(json!({"slack": {
            "team": team, "channel": channel, "user": user, "ts": ts, "threadTs": thread_ts,
        }})),
        notify: Some(NotifySpec {
            slack: Some(SlackTarget {
                channel: channel.to_owned(),
                thread_ts: Some(thread_ts.to_owned()),
            }),
        }),
    };
    let task = build_task(&new, "slack-", "slack");
    match create_task(&client, &target.namespace, &task).await {
        Ok(created) => {
            tracing::info!(namespace = %target.namespace, task = ?created.metadata.name, "task created for a slack message");
            Ok(())
        }
        Err(error) => {
            let reason = match &error {
                ApiError::Unprocessable(message) => message.clone(),
                _ => "the task could not be created; please try again later".to_owned(),
            };
            bot.client
                .post_message(
                    channel,
                    Some(thread_ts),
                    &format!("Sorry, I could not start that: {reason}."),
                )
                .await?;
            Err(anyhow::anyhow!("creating the task: {error:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn event(value: Value) -> MessageEvent {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn mentions_and_peoples_direct_messages_are_requests_and_nothing_else() {
        assert!(event(json!({"type": "app_mention", "user": "U1", "text": "hi"})).is_request());
        assert!(event(json!({"type": "message", "channel_type": "im", "user": "U1"})).is_request());
        assert!(
            !event(json!({"type": "message", "channel_type": "channel", "user": "U1"}))
                .is_request()
        );
        assert!(
            !event(json!({"type": "message", "channel_type": "im", "user": "U1", "bot_id": "B1"}))
                .is_request()
        );
        assert!(
            !event(json!({"type": "message", "channel_type": "im", "subtype": "message_changed"}))
                .is_request()
        );
        assert!(!event(json!({"type": "reaction_added", "user": "U1"})).is_request());
    }

    #[test]
    fn a_thread_is_one_session() {
        assert_eq!(thread_session_id("T1", "C1", "17.5"), "slack:T1:C1:17.5");
    }
}
