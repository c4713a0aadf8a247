//! The shapes OpenCode sends and accepts: sessions, prompts, messages with their parts, session
//! status, permission and question requests.
//!
//! Only the fields the operator and the bridge use are typed; unknown fields are ignored and
//! missing optional ones default, so a newer OpenCode that adds fields keeps working.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// `GET /global/health`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Health {
    /// Whether the server considers itself healthy.
    pub healthy: bool,
    /// The OpenCode version.
    #[serde(default)]
    pub version: String,
}

/// A session (a conversation) on the server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// `ses_...`.
    pub id: String,
    /// The title (given at creation, or generated after the first prompt).
    #[serde(default)]
    pub title: Option<String>,
    /// The project directory the session works in.
    #[serde(default)]
    pub directory: Option<String>,
    /// The parent session, for subagent sessions.
    #[serde(default, rename = "parentID")]
    pub parent_id: Option<String>,
    /// When it was created and last changed.
    #[serde(default)]
    pub time: SessionTime,
}

/// A session's timestamps, in Unix milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct SessionTime {
    /// When it was created.
    #[serde(default)]
    pub created: Option<i64>,
    /// When it last changed.
    #[serde(default)]
    pub updated: Option<i64>,
}

/// A model, as `provider/model`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    /// The provider id (`anthropic`, `fake`).
    #[serde(rename = "providerID")]
    pub provider_id: String,
    /// The model id within the provider.
    #[serde(rename = "modelID")]
    pub model_id: String,
}

impl ModelRef {
    /// Parses `provider/model` (the model id may itself contain `/`).
    pub fn parse(value: &str) -> Option<Self> {
        let (provider, model) = value.split_once('/')?;
        if provider.is_empty() || model.is_empty() {
            return None;
        }
        Some(Self {
            provider_id: provider.to_owned(),
            model_id: model.to_owned(),
        })
    }
}

/// One part of a prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PartInput {
    /// Plain text.
    Text {
        /// The text.
        text: String,
    },
}

/// The body of `POST /session/{id}/prompt_async` (and of the blocking `.../message`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromptRequest {
    /// The prompt's parts.
    pub parts: Vec<PartInput>,
    /// The agent to run (`build` when absent, or the plugin's default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The model, when not the configured default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelRef>,
    /// Extra system prompt for this turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

impl PromptRequest {
    /// A prompt of one text part, with the default agent and model.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            parts: vec![PartInput::Text { text: text.into() }],
            agent: None,
            model: None,
            system: None,
        }
    }

    /// Runs the prompt with `agent`.
    pub fn with_agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(agent.into());
        self
    }

    /// Runs the prompt with `model`.
    pub fn with_model(mut self, model: ModelRef) -> Self {
        self.model = Some(model);
        self
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The prompt.
    User,
    /// The agent's reply.
    Assistant,
    /// A role this client does not know.
    #[serde(other)]
    Other,
}

/// Why an assistant message (or a turn) failed: `{name, data: {message, ...}}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct MessageError {
    /// `APIError`, `MessageAbortedError`, `ProviderAuthError`, `UnknownError`, ...
    pub name: String,
    /// Details; `data.message` is the human-readable part.
    #[serde(default)]
    pub data: Value,
}

impl MessageError {
    /// `data.message`, when present.
    pub fn message(&self) -> Option<&str> {
        self.data.get("message").and_then(Value::as_str)
    }
}

/// Timestamps of a message, in Unix milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct MessageTime {
    /// When it was created.
    #[serde(default)]
    pub created: Option<i64>,
    /// When the assistant finished it.
    #[serde(default)]
    pub completed: Option<i64>,
}

/// A message's metadata (`info` in OpenCode's answers and events).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessageInfo {
    /// `msg_...`.
    pub id: String,
    /// The session.
    #[serde(rename = "sessionID")]
    pub session_id: String,
    /// Who wrote it.
    pub role: Role,
    /// The user message an assistant message answers.
    #[serde(rename = "parentID", default)]
    pub parent_id: Option<String>,
    /// The agent that wrote it or was asked (`build`, `Sisyphus - ultraworker`, ...).
    #[serde(default)]
    pub agent: Option<String>,
    /// `stop`, `tool-calls`, ... (assistant messages, once finished).
    #[serde(default)]
    pub finish: Option<String>,
    /// Why it failed (assistant messages).
    #[serde(default)]
    pub error: Option<MessageError>,
    /// Timestamps.
    #[serde(default)]
    pub time: MessageTime,
}

/// A message with its parts (`GET /session/{id}/message`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessageWithParts {
    /// The message.
    pub info: MessageInfo,
    /// Its parts, in order.
    #[serde(default)]
    pub parts: Vec<Part>,
}

/// Start and end of a part, in Unix milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct PartTime {
    /// When it started.
    #[serde(default)]
    pub start: Option<i64>,
    /// When it ended; absent while a text part streams.
    #[serde(default)]
    pub end: Option<i64>,
}

/// A text part.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TextPart {
    /// `prt_...`.
    pub id: String,
    /// The session.
    #[serde(rename = "sessionID", default)]
    pub session_id: String,
    /// The message it belongs to.
    #[serde(rename = "messageID", default)]
    pub message_id: String,
    /// The text so far.
    #[serde(default)]
    pub text: String,
    /// Added by OpenCode rather than written by the user or the model.
    #[serde(default)]
    pub synthetic: bool,
    /// Start and end; `end` is set once the text is complete.
    #[serde(default)]
    pub time: Option<PartTime>,
}

impl TextPart {
    /// True once the model has finished writing this part.
    pub fn is_complete(&self) -> bool {
        self.time.and_then(|time| time.end).is_some()
    }
}

/// Where a tool call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolStatus {
    /// The model is still streaming the call's arguments.
    Pending,
    /// The tool runs (or waits for a permission).
    Running,
    /// The tool finished.
    Completed,
    /// The tool failed or was rejected.
    Error,
    /// A status this client does not know.
    #[serde(other)]
    Unknown,
}

/// The state of a tool call.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolState {
    /// Where the call is.
    pub status: ToolStatus,
    /// The call's arguments.
    #[serde(default)]
    pub input: Value,
    /// A short description OpenCode gives the call once it is done.
    #[serde(default)]
    pub title: Option<String>,
    /// The tool's output (completed calls).
    #[serde(default)]
    pub output: Option<String>,
    /// The failure (errored calls).
    #[serde(default)]
    pub error: Option<String>,
    /// Tool-specific details (streamed output, exit code, ...).
    #[serde(default)]
    pub metadata: Value,
}

/// A tool call part.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolPart {
    /// `prt_...`.
    pub id: String,
    /// The session.
    #[serde(rename = "sessionID", default)]
    pub session_id: String,
    /// The assistant message it belongs to.
    #[serde(rename = "messageID", default)]
    pub message_id: String,
    /// The tool's name (`bash`, `edit`, `task`, ...).
    pub tool: String,
    /// The model's id for the call.
    #[serde(rename = "callID", default)]
    pub call_id: String,
    /// Where the call is.
    pub state: ToolState,
}

/// One part of a message. Types other than text and tool calls (`step-start`, `reasoning`,
/// `file`, ...) are kept as `Other`; a part that does not parse is `Other` too.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Text the user or the model wrote.
    Text(TextPart),
    /// A tool call.
    Tool(ToolPart),
    /// Any other part.
    Other {
        /// The part's `type`.
        part_type: String,
        /// The part's id, when it has one.
        id: Option<String>,
        /// The whole part.
        raw: Value,
    },
}

impl Part {
    /// Reads a part from JSON; never fails (unknown or malformed parts become `Other`).
    pub fn from_value(value: Value) -> Self {
        let part_type = value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let parsed = match part_type.as_str() {
            "text" => TextPart::deserialize(&value).map(Self::Text).ok(),
            "tool" => ToolPart::deserialize(&value).map(Self::Tool).ok(),
            _ => None,
        };
        parsed.unwrap_or_else(|| Self::Other {
            id: value.get("id").and_then(Value::as_str).map(str::to_owned),
            part_type,
            raw: value,
        })
    }

    /// The part's id.
    pub fn id(&self) -> Option<&str> {
        match self {
            Self::Text(part) => Some(&part.id),
            Self::Tool(part) => Some(&part.id),
            Self::Other { id, .. } => id.as_deref(),
        }
    }
}

impl<'de> Deserialize<'de> for Part {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(Self::from_value)
    }
}

/// A session's status (`GET /session/status`, `session.status` events). Idle sessions are
/// absent from `GET /session/status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SessionStatus {
    /// Nothing runs.
    Idle,
    /// A turn runs.
    Busy,
    /// The LLM call failed and OpenCode waits before trying again (it never gives up).
    Retry {
        /// The attempt about to be made, from 1.
        #[serde(default)]
        attempt: u32,
        /// Why the last attempt failed.
        #[serde(default)]
        message: String,
        /// When the next attempt starts, in Unix milliseconds.
        #[serde(default)]
        next: Option<i64>,
    },
    /// A status this client does not know.
    #[serde(other)]
    Unknown,
}

impl SessionStatus {
    /// `idle`, `busy`, `retry` or `unknown`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Busy => "busy",
            Self::Retry { .. } => "retry",
            Self::Unknown => "unknown",
        }
    }
}

/// The error of a `session.error` event.
pub type SessionError = MessageError;

/// Which tool call a permission or question request belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ToolRef {
    /// The assistant message.
    #[serde(rename = "messageID", default)]
    pub message_id: String,
    /// The call.
    #[serde(rename = "callID", default)]
    pub call_id: String,
}

/// A tool waits for a permission (`permission.asked`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PermissionRequest {
    /// `per_...`, for `POST /permission/{id}/reply`.
    pub id: String,
    /// The session.
    #[serde(rename = "sessionID")]
    pub session_id: String,
    /// The permission (`bash`, `edit`, ...).
    #[serde(default)]
    pub permission: String,
    /// What it applies to (the command, the path).
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Tool-specific details.
    #[serde(default)]
    pub metadata: Value,
    /// The tool call waiting.
    #[serde(default)]
    pub tool: Option<ToolRef>,
}

/// The `question` tool waits for an answer (`question.asked`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QuestionRequest {
    /// `que_...`, for `POST /question/{id}/reply`.
    pub id: String,
    /// The session.
    #[serde(rename = "sessionID")]
    pub session_id: String,
    /// The questions, each with a header and options.
    #[serde(default)]
    pub questions: Value,
    /// The tool call waiting.
    #[serde(default)]
    pub tool: Option<ToolRef>,
}

/// The text of the last assistant message (its text parts, joined by newlines), or `None` when
/// there is no assistant message or it has no text.
pub fn final_assistant_text(messages: &[MessageWithParts]) -> Option<String> {
    let last = messages
        .iter()
        .rev()
        .find(|message| message.info.role == Role::Assistant)?;
    let texts: Vec<&str> = last
        .parts
        .iter()
        .filter_map(|part| match part {
            Part::Text(text) if !text.synthetic && !text.text.is_empty() => {
                Some(text.text.as_str())
            }
            _ => None,
        })
        .collect();
    (!texts.is_empty()).then(|| texts.join("\n"))
}

/// The user messages whose text (their text parts, joined by newlines) is exactly `prompt`: where
/// a prompt sent to a session shows up in its messages.
pub fn user_prompts<'a>(
    messages: &'a [MessageWithParts],
    prompt: &'a str,
) -> impl Iterator<Item = &'a MessageWithParts> {
    messages
        .iter()
        .filter(|message| message.info.role == Role::User)
        .filter(move |message| {
            let texts: Vec<&str> = message
                .parts
                .iter()
                .filter_map(|part| match part {
                    Part::Text(text) => Some(text.text.as_str()),
                    _ => None,
                })
                .collect();
            texts.join("\n") == prompt
        })
}

/// The error of the last assistant message, if it failed.
pub fn last_assistant_error(messages: &[MessageWithParts]) -> Option<&MessageError> {
    messages
        .iter()
        .rev()
        .find(|message| message.info.role == Role::Assistant)?
        .info
        .error
        .as_ref()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn messages(value: Value) -> Vec<MessageWithParts> {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn final_assistant_text_reads_the_last_assistant_message_only() {
        let list = messages(json!([
            {"info": {"id": "msg_1", "sessionID": "ses_1", "role": "user"},
             "parts": [{"id": "prt_1", "type": "text", "text": "hi"}]},
            {"info": {"id": "msg_2", "sessionID": "ses_1", "role": "assistant", "finish": "tool-calls"},
             "parts": [{"id": "prt_2", "type": "tool", "tool": "bash", "callID": "c",
                        "state": {"status": "completed", "output": "x"}}]},
            {"info": {"id": "msg_3", "sessionID": "ses_1", "role": "assistant", "finish": "stop"},
             "parts": [{"id": "prt_3", "type": "step-start"},
                       {"id": "prt_4", "type": "text", "text": "first"},
                       {"id": "prt_5", "type": "text", "text": "second"},
                       {"id": "prt_6", "type": "step-finish", "reason": "stop"}]},
        ]));
        assert_eq!(
            final_assistant_text(&list).as_deref(),
            Some("first\nsecond")
        );
        assert!(last_assistant_error(&list).is_none());
        assert_eq!(final_assistant_text(&list[..1]), None);
    }

    #[test]
    fn a_failed_turn_exposes_its_error_name_and_message() {
        let list = messages(json!([
            {"info": {"id": "msg_2", "sessionID": "ses_1", "role": "assistant",
                      "error": {"name": "APIError", "data": {"message": "Bad Request", "statusCode": 400}}},
             "parts": []},
        ]));
        let error = last_assistant_error(&list).unwrap();
        assert_eq!(error.name, "APIError");
        assert_eq!(error.message(), Some("Bad Request"));
        assert_eq!(final_assistant_text(&list), None);
    }

    #[test]
    fn unknown_and_malformed_parts_become_other_without_failing() {
        let part: Part =
            serde_json::from_value(json!({"id": "prt_9", "type": "reasoning", "text": "hm"}))
                .unwrap();
        assert!(matches!(&part, Part::Other { part_type, .. } if part_type == "reasoning"));
        assert_eq!(part.id(), Some("prt_9"));
        // A tool part without its state still parses, as Other.
        let broken: Part =
            serde_json::from_value(json!({"id": "prt_8", "type": "tool", "tool": "bash"})).unwrap();
        assert!(matches!(broken, Part::Other { .. }));
    }

    #[test]
    fn tool_states_parse_every_status_seen_on_the_wire() {
        let part = |state: Value| match Part::from_value(
            json!({"id": "p", "type": "tool", "tool": "bash", "callID": "c", "state": state}),
        ) {
            Part::Tool(tool) => tool.state,
            other => panic!("not a tool part: {other:?}"),
        };
        assert_eq!(
            part(json!({"status": "pending", "input": {}, "raw": ""})).status,
            ToolStatus::Pending
        );
        let done = part(
            json!({"status": "completed", "output": "hello-from-tool\n", "title": "echo hello"}),
        );
        assert_eq!(done.status, ToolStatus::Completed);
        assert_eq!(done.output.as_deref(), Some("hello-from-tool\n"));
        let failed = part(json!({"status": "error", "error": "rejected"}));
        assert_eq!(failed.error.as_deref(), Some("rejected"));
        assert_eq!(
            part(json!({"status": "paused"})).status,
            ToolStatus::Unknown
        );
    }

    #[test]
    fn session_statuses_parse_retry_details_and_tolerate_new_types() {
        let status: std::collections::HashMap<String, SessionStatus> = serde_json::from_value(json!({
            "ses_a": {"type": "busy"},
            "ses_b": {"type": "retry", "attempt": 4, "message": "fake server error", "next": 1795472801035_i64},
            "ses_c": {"type": "compacting"},
        }))
        .unwrap();
        assert_eq!(status["ses_a"], SessionStatus::Busy);
        assert_eq!(
            status["ses_b"],
            SessionStatus::Retry {
                attempt: 4,
                message: "fake server error".into(),
                next: Some(1795472801035)
            }
        );
        assert_eq!(status["ses_c"], SessionStatus::Unknown);
    }

    #[test]
    fn prompts_serialize_as_opencode_expects() {
        let prompt = PromptRequest::text("hello")
            .with_agent("build")
            .with_model(ModelRef::parse("fake/fake-model").unwrap());
        assert_eq!(
            serde_json::to_value(&prompt).unwrap(),
            json!({"parts": [{"type": "text", "text": "hello"}], "agent": "build",
                   "model": {"providerID": "fake", "modelID": "fake-model"}})
        );
        assert_eq!(
            serde_json::to_value(PromptRequest::text("x")).unwrap(),
            json!({"parts": [{"type": "text", "text": "x"}]})
        );
        assert_eq!(
            ModelRef::parse("openrouter/anthropic/claude")
                .unwrap()
                .model_id,
            "anthropic/claude"
        );
        assert!(ModelRef::parse("no-slash").is_none());
    }
}
