//! The `GET /event` stream: SSE framing and the typed events.
//!
//! OpenCode frames every event as one `data: <json>` line and a blank line, with no `event:`
//! or `id:` fields; the JSON is `{"id": "evt_...", "type": "...", "properties": {...}}`. There
//! is no replay: after a reconnect, read `GET /session/status` to catch up.

use std::pin::Pin;

use futures::Stream;
use serde::Deserialize;
use serde_json::Value;

use crate::error::Result;
use crate::types::{
    MessageError, MessageInfo, Part, PermissionRequest, QuestionRequest, Session, SessionStatus,
};

/// The typed event stream of `GET /event`. It ends when the server closes the connection; a
/// broken connection (including a read timeout) yields one error and then ends.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<EventEnvelope>> + Send>>;

/// One event with its id.
#[derive(Debug, Clone, PartialEq)]
pub struct EventEnvelope {
    /// The event id (`evt_...`); unique per server, absent on some synthetic events.
    pub id: Option<String>,
    /// The event.
    pub event: Event,
}

/// The events the operator and the bridge act on; everything else is `Other`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The first event of every connection.
    ServerConnected,
    /// Sent every 10 seconds.
    ServerHeartbeat,
    /// A session became busy, idle, or waits to retry a failed LLM call.
    SessionStatus {
        /// The session.
        session_id: String,
        /// Its new status.
        status: SessionStatus,
    },
    /// A session finished its turn (may come twice, e.g. after an abort).
    SessionIdle {
        /// The session.
        session_id: String,
    },
    /// The turn failed (an `idle` follows).
    SessionError {
        /// The session, when the error belongs to one.
        session_id: Option<String>,
        /// The error (`APIError`, `MessageAbortedError`, ...).
        error: Option<MessageError>,
    },
    /// A session was created; subagent sessions carry their parent's id.
    SessionCreated {
        /// The new session.
        session: Session,
    },
    /// A message was created or changed (its role, finish, error).
    MessageUpdated {
        /// The message.
        info: MessageInfo,
    },
    /// A part was created or changed: text (the whole text so far), a tool call's state, ...
    MessagePartUpdated {
        /// The session.
        session_id: String,
        /// The part.
        part: Part,
    },
    /// A piece of streamed text was appended to a part.
    MessagePartDelta {
        /// The session.
        session_id: String,
        /// The message.
        message_id: String,
        /// The part.
        part_id: String,
        /// The field that grew (`text`).
        field: String,
        /// What was appended.
        delta: String,
    },
    /// A tool waits for a permission.
    PermissionAsked(PermissionRequest),
    /// The `question` tool waits for an answer.
    QuestionAsked(QuestionRequest),
    /// Any other event, or a known one whose properties did not parse.
    Other {
        /// The event's `type`.
        event_type: String,
        /// Its properties.
        properties: Value,
    },
}

impl Event {
    /// The session the event is about, if any.
    pub fn session_id(&self) -> Option<&str> {
        match self {
            Self::SessionStatus { session_id, .. }
            | Self::SessionIdle { session_id }
            | Self::MessagePartUpdated { session_id, .. }
            | Self::MessagePartDelta { session_id, .. } => Some(session_id),
            Self::SessionError { session_id, .. } => session_id.as_deref(),
            Self::SessionCreated { session } => Some(&session.id),
            Self::MessageUpdated { info } => Some(&info.session_id),
            Self::PermissionAsked(request) => Some(&request.session_id),
            Self::QuestionAsked(request) => Some(&request.session_id),
            Self::ServerConnected | Self::ServerHeartbeat | Self::Other { .. } => None,
        }
    }
}

#[derive(Deserialize)]
struct StatusProperties {
    #[serde(rename = "sessionID")]
    session_id: String,
    status: SessionStatus,
}

#[derive(Deserialize)]
struct SessionProperties {
    #[serde(rename = "sessionID")]
    session_id: String,
}

#[derive(Deserialize)]
struct ErrorProperties {
    #[serde(rename = "sessionID", default)]
    session_id: Option<String>,
    #[serde(default)]
    error: Option<MessageError>,
}

#[derive(Deserialize)]
struct InfoProperties<T> {
    info: T,
}

#[derive(Deserialize)]
struct PartProperties {
    #[serde(rename = "sessionID", default)]
    session_id: Option<String>,
    part: Value,
}

#[derive(Deserialize)]
struct DeltaProperties {
    #[serde(rename = "sessionID")]
    session_id: String,
    #[serde(rename = "messageID", default)]
    message_id: String,
    #[serde(rename = "partID")]
    part_id: String,
    #[serde(default)]
    field: String,
    #[serde(default)]
    delta: String,
}

impl EventEnvelope {
    /// Reads one event from its JSON; never fails: unknown types, and known types whose
    /// properties do not parse, become [`Event::Other`].
    pub fn from_value(value: Value) -> Self {
        let id = value.get("id").and_then(Value::as_str).map(str::to_owned);
        let event_type = value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let properties = value.get("properties").cloned().unwrap_or(Value::Null);
        let event = typed(&event_type, &properties).unwrap_or_else(|| {
            if is_known(&event_type) {
                tracing::warn!(
                    event_type,
                    "an OpenCode event did not have the expected shape"
                );
            }
            Event::Other {
                event_type,
                properties,
            }
        });
        Self { id, event }
    }

    /// Reads one SSE `data:` payload; `None` when it is not a JSON object.
    pub fn parse(data: &str) -> Option<Self> {
        match serde_json::from_str::<Value>(data) {
            Ok(value @ Value::Object(_)) => Some(Self::from_value(value)),
            _ => None,
        }
    }

    /// Reads one `data:` payload of `GET /global/event`, which wraps each event of every
    /// project directory as `{"directory", "project", "payload": {...}}`; `None` when it is not
    /// such an object.
    pub fn parse_global(data: &str) -> Option<Self> {
        match serde_json::from_str::<Value>(data) {
            Ok(Value::Object(mut wrapper)) => match wrapper.remove("payload") {
                Some(payload @ Value::Object(_)) => Some(Self::from_value(payload)),
                _ => None,
            },
            _ => None,
        }
    }
}

fn is_known(event_type: &str) -> bool {
    matches!(
        event_type,
        "session.status"
            | "session.idle"
            | "session.error"
            | "session.created"
            | "message.updated"
            | "message.part.updated"
            | "message.part.delta"
            | "permission.asked"
            | "question.asked"
    )
}

fn typed(event_type: &str, properties: &Value) -> Option<Event> {
    fn parse<T: serde::de::DeserializeOwned>(properties: &Value) -> Option<T> {
        T::deserialize(properties).ok()
    }
    Some(match event_type {
        "server.connected" => Event::ServerConnected,
        "server.heartbeat" => Event::ServerHeartbeat,
        "session.status" => {
            let p: StatusProperties = parse(properties)?;
            Event::SessionStatus {
                session_id: p.session_id,
                status: p.status,
            }
        }
        "session.idle" => Event::SessionIdle {
            session_id: parse::<SessionProperties>(properties)?.session_id,
        },
        "session.error" => {
            let p: ErrorProperties = parse(properties)?;
            Event::SessionError {
                session_id: p.session_id,
                error: p.error,
            }
        }
        "session.created" => Event::SessionCreated {
            session: parse::<InfoProperties<Session>>(properties)?.info,
        },
        "message.updated" => Event::MessageUpdated {
            info: parse::<InfoProperties<MessageInfo>>(properties)?.info,
        },
        "message.part.updated" => {
            let p: PartProperties = parse(properties)?;
            let part = Part::from_value(p.part);
            let session_id = p.session_id.or_else(|| match &part {
                Part::Text(text) => Some(text.session_id.clone()),
                Part::Tool(tool) => Some(tool.session_id.clone()),
                Part::Other { raw, .. } => raw
                    .get("sessionID")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            })?;
            Event::MessagePartUpdated { session_id, part }
        }
        "message.part.delta" => {
            let p: DeltaProperties = parse(properties)?;
            Event::MessagePartDelta {
                session_id: p.session_id,
                message_id: p.message_id,
                part_id: p.part_id,
                field: p.field,
                delta: p.delta,
            }
        }
        "permission.asked" => Event::PermissionAsked(parse(properties)?),
        "question.asked" => Event::QuestionAsked(parse(properties)?),
        _ => return None,
    })
}

/// Splits an SSE byte stream into the payloads of its `data:` fields, one per event.
///
/// Follows the SSE rules OpenCode's framing needs: lines end in `\n` or `\r\n`, several
/// `data:` lines of one event are joined with `\n`, a blank line ends the event, comments
/// (`:`) and other fields are ignored. Bytes may arrive split anywhere, even inside a UTF-8
/// character.
#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    data: Option<String>,
}

/// Longest SSE line kept; a longer one is cut (OpenCode's events are a few KiB).
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

impl SseDecoder {
    /// Feeds bytes; returns the payloads of the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut complete = Vec::new();
        for &byte in bytes {
            if byte != b'\n' {
                if self.line.len() < MAX_LINE_BYTES {
                    self.line.push(byte);
                }
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = std::mem::take(&mut self.line);
            if line.is_empty() {
                complete.extend(self.data.take());
                continue;
            }
            let line = String::from_utf8_lossy(&line);
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line.as_ref(), ""),
            };
            if field == "data" {
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                }
            }
        }
        complete
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::types::{TextPart, ToolStatus};

    fn event(value: Value) -> Event {
        EventEnvelope::from_value(value).event
    }

    #[test]
    fn a_global_event_is_its_payload_and_a_payload_less_record_is_skipped() {
        let wrapped = r#"{"directory":"/w/a","project":"global","payload":{"id":"evt_1","type":"session.idle","properties":{"sessionID":"ses_a"}}}"#;
        let envelope = EventEnvelope::parse_global(wrapped).unwrap();
        assert_eq!(envelope.id.as_deref(), Some("evt_1"));
        assert_eq!(
            envelope.event,
            Event::SessionIdle {
                session_id: "ses_a".to_owned()
            }
        );
        let connected = r#"{"payload":{"id":"evt_0","type":"server.connected","properties":{}}}"#;
        assert_eq!(
            EventEnvelope::parse_global(connected).unwrap().event,
            Event::ServerConnected
        );
        assert!(EventEnvelope::parse_global(r#"{"directory":"/w"}"#).is_none());
        assert!(EventEnvelope::parse_global("[1]").is_none());
    }

    #[test]
    fn the_decoder_joins_events_split_across_chunks_and_ignores_comments() {
        let mut decoder = SseDecoder::default();
        assert!(decoder.push(b": keep-alive\n\ndata: {\"a\"").is_empty());
        assert_eq!(
            decoder.push(b":1}\r\n\r\ndata: x\ndata: y\n"),
            vec!["{\"a\":1}"]
        );
        assert_eq!(
            decoder.push(b"\nevent: ignored\ndata:z\n\n"),
            vec!["x\ny", "z"]
        );
        // A character split across chunks survives.
        let text = "data: é\n\n".as_bytes();
        assert!(decoder.push(&text[..7]).is_empty());
        assert_eq!(decoder.push(&text[7..]), vec!["é"]);
    }

    #[test]
    fn status_events_parse_busy_idle_and_retry() {
        let envelope = EventEnvelope::parse(
            r#"{"id":"evt_1","type":"session.status","properties":{"sessionID":"ses_1","status":{"type":"busy"}}}"#,
        )
        .unwrap();
        assert_eq!(envelope.id.as_deref(), Some("evt_1"));
        assert_eq!(
            envelope.event,
            Event::SessionStatus {
                session_id: "ses_1".into(),
                status: SessionStatus::Busy
            }
        );
        let retry = event(
            json!({"type": "session.status", "properties": {"sessionID": "ses_1",
            "status": {"type": "retry", "attempt": 2, "message": "fake server error", "next": 5}}}),
        );
        assert_eq!(
            retry,
            Event::SessionStatus {
                session_id: "ses_1".into(),
                status: SessionStatus::Retry {
                    attempt: 2,
                    message: "fake server error".into(),
                    next: Some(5)
                }
            }
        );
        assert_eq!(
            event(json!({"type": "session.idle", "properties": {"sessionID": "ses_1"}})),
            Event::SessionIdle {
                session_id: "ses_1".into()
            }
        );
    }

    #[test]
    fn session_errors_keep_name_and_message() {
        let Event::SessionError { session_id, error } = event(
            json!({"type": "session.error", "properties": {
            "sessionID": "ses_1", "error": {"name": "APIError", "data": {"message": "Bad Request", "statusCode": 400}}}}),
        ) else {
            panic!("not a session error");
        };
        assert_eq!(session_id.as_deref(), Some("ses_1"));
        let error = error.unwrap();
        assert_eq!(
            (error.name.as_str(), error.message()),
            ("APIError", Some("Bad Request"))
        );
    }

    #[test]
    fn part_events_carry_tool_states_text_and_deltas() {
        let Event::MessagePartUpdated {
            session_id,
            part: Part::Tool(tool),
        } = event(json!({"type": "message.part.updated",
            "properties": {"sessionID": "ses_1", "part": {"id": "prt_1", "sessionID": "ses_1", "messageID": "msg_1",
            "type": "tool", "tool": "bash", "callID": "call_1", "state": {"status": "running", "input": {"command": "ls"}}}}}))
        else {
            panic!("not a tool part");
        };
        assert_eq!(session_id, "ses_1");
        assert_eq!(
            (tool.tool.as_str(), tool.call_id.as_str(), tool.state.status),
            ("bash", "call_1", ToolStatus::Running)
        );

        // Without sessionID beside the part, the part's own is used.
        let Event::MessagePartUpdated {
            session_id,
            part: Part::Text(TextPart { text, .. }),
        } = event(json!({
            "type": "message.part.updated", "properties": {"part": {"id": "prt_2", "sessionID": "ses_2",
            "messageID": "msg_1", "type": "text", "text": "Hello", "time": {"start": 1, "end": 2}}}}))
        else {
            panic!("not a text part");
        };
        assert_eq!((session_id.as_str(), text.as_str()), ("ses_2", "Hello"));

        assert_eq!(
            event(
                json!({"type": "message.part.delta", "properties": {"sessionID": "ses_1", "messageID": "msg_1",
                "partID": "prt_2", "field": "text", "delta": "lo"}})
            ),
            Event::MessagePartDelta {
                session_id: "ses_1".into(),
                message_id: "msg_1".into(),
                part_id: "prt_2".into(),
                field: "text".into(),
                delta: "lo".into()
            }
        );
    }

    #[test]
    fn permission_question_and_child_session_events_are_typed() {
        let Event::PermissionAsked(permission) = event(
            json!({"type": "permission.asked", "properties": {
            "id": "per_1", "sessionID": "ses_1", "permission": "bash", "patterns": ["echo hi"],
            "metadata": {"command": "echo hi"}, "always": ["echo *"], "tool": {"messageID": "msg_1", "callID": "c1"}}}),
        ) else {
            panic!("not a permission request");
        };
        assert_eq!(
            (permission.id.as_str(), permission.permission.as_str()),
            ("per_1", "bash")
        );
        assert_eq!(permission.tool.unwrap().call_id, "c1");

        let Event::QuestionAsked(question) =
            event(json!({"type": "question.asked", "properties": {
            "id": "que_1", "sessionID": "ses_1", "questions": [{"question": "Proceed?"}]}}))
        else {
            panic!("not a question");
        };
        assert_eq!(question.questions[0]["question"], "Proceed?");

        let Event::SessionCreated { session } = event(
            json!({"type": "session.created", "properties": {
            "sessionID": "ses_2", "info": {"id": "ses_2", "title": "child", "parentID": "ses_1"}}}),
        ) else {
            panic!("not a session creation");
        };
        assert_eq!(session.parent_id.as_deref(), Some("ses_1"));
    }

    #[test]
    fn unknown_types_and_malformed_known_ones_become_other() {
        assert_eq!(
            event(json!({"type": "server.heartbeat", "properties": {}})),
            Event::ServerHeartbeat
        );
        assert!(matches!(
            event(json!({"type": "plugin.added", "properties": {"id": "x"}})),
            Event::Other { event_type, .. } if event_type == "plugin.added"
        ));
        assert!(matches!(
            event(json!({"type": "session.status", "properties": {"status": "weird"}})),
            Event::Other { event_type, .. } if event_type == "session.status"
        ));
        assert!(
            matches!(event(json!({"no": "type"})), Event::Other { event_type, .. } if event_type.is_empty())
        );
        assert!(EventEnvelope::parse("not json").is_none());
        assert!(EventEnvelope::parse("[1]").is_none());
    }
}
