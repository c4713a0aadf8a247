//! Which OpenCode events become which callbacks: the pure core of the bridge.
//!
//! State updates (`POST .../update`, `{state, metadata}`) follow `session.status`: `busy`,
//! `retry` and `idle`, each posted once per change (OpenCode repeats `busy` within a turn).
//! Progress events (`POST .../progress`, `{progress: {type, ...}}`) report tool calls starting
//! and ending, text (coalesced: the finished part, plus at most one interim update per part per
//! interval while it streams), retries, permission and question requests, errors and the end of
//! a turn. Subagent sessions report progress on their root session; their states are not posted.
//!
//! Every callback carries a webhook id derived from what it reports, so a retried delivery is
//! recognised by the callback API: `{partId}-start` / `{partId}-end` for tool calls,
//! `{partId}-final` / `{partId}-{length}` for text, `{requestId}-asked` for permissions and
//! questions, `{eventId}-{what}` for status changes, and `resync-...` for states posted after a
//! reconnect. Events without an OpenCode id get `b{boot}-{nonce}-{n}` (see [`IdOrigin`]): the
//! callback API deduplicates ids per organization, so they must differ between the pods of a
//! tenant even when two start in the same millisecond.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nubabel_contract::signing::validate_webhook_id;
use nubabel_contract::text::tail;
use nubabel_opencode::{
    Event, EventEnvelope, MessageError, Part, PermissionRequest, QuestionRequest, Role,
    SessionStatus, TextPart, ToolPart, ToolStatus,
};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// Longest text of a `message_part`, in bytes (the end is kept: the last line is what the
/// task's status shows).
pub const MAX_TEXT_BYTES: usize = 6 * 1024;
/// Longest tool output or error carried by `tool_execute_end`, in bytes.
pub const MAX_TOOL_OUTPUT_BYTES: usize = 2 * 1024;
/// Longest tool input carried by `tool_execute_start` (serialised), in bytes; larger inputs
/// are left out.
pub const MAX_TOOL_INPUT_BYTES: usize = 1024;
/// Sessions tracked at most; idle ones are forgotten first.
const MAX_TRACKED_SESSIONS: usize = 4096;

/// The callback route a callback goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackKind {
    /// `POST /api/sidecar/sessions/{id}/update`.
    Update,
    /// `POST /api/sidecar/sessions/{id}/progress`.
    Progress,
}

/// One callback, ready to sign and send; the body is serialised once so that every retry
/// sends the same bytes under the same webhook id.
#[derive(Debug, Clone, PartialEq)]
pub struct Callback {
    /// The OpenCode session the callback is about (the root session for subagents).
    pub session_id: String,
    /// The route.
    pub kind: CallbackKind,
    /// The `webhook-id`: stable for what it reports, unique per tenant.
    pub webhook_id: String,
    /// The JSON body.
    pub body: Bytes,
}

impl Callback {
    fn new(session_id: &str, kind: CallbackKind, webhook_id: String, body: &Value) -> Self {
        Self {
            session_id: session_id.to_owned(),
            kind,
            webhook_id: safe_webhook_id(webhook_id),
            body: Bytes::from(body.to_string()),
        }
    }

    /// The request path under the callback API's base URL; the session id is one
    /// percent-encoded segment.
    pub fn path(&self) -> String {
        let route = match self.kind {
            CallbackKind::Update => "update",
            CallbackKind::Progress => "progress",
        };
        format!(
            "/api/sidecar/sessions/{}/{route}",
            path_segment(&self.session_id)
        )
    }

    /// The body as JSON (for logs and tests).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The state of an update, or the `progress.type` of a progress event.
    pub fn summary(&self) -> String {
        let body = self.json();
        let value = match self.kind {
            CallbackKind::Update => &body["state"],
            CallbackKind::Progress => &body["progress"]["type"],
        };
        value.as_str().unwrap_or_default().to_owned()
    }
}

/// `value` as one URL path segment: every byte but `[A-Za-z0-9_-]` percent-encoded. The bridge
/// signs the path it builds, so the path must reach the API unchanged: left raw, a space, DEL
/// or non-ASCII text is encoded by the HTTP client after signing, and `/`, `?` or `#` would
/// move the rest out of the segment (the API refuses either).
fn path_segment(value: &str) -> String {
    let mut segment = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            segment.push(char::from(byte));
        } else {
            segment.push_str(&format!("%{byte:02X}"));
        }
    }
    segment
}

/// A webhook id the callback API accepts: the given one when it is 1 to 128 characters of
/// `[A-Za-z0-9_-]`, else a hash of it (still stable for the same input).
pub fn safe_webhook_id(raw: String) -> String {
    if validate_webhook_id(&raw).is_ok() {
        return raw;
    }
    let digest = Sha256::digest(raw.as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("h-{hex}")
}

/// The state last posted for a session.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PostedState {
    Busy,
    Retry { attempt: u32 },
    Idle,
}

#[derive(Debug, Default)]
struct TextTrack {
    text: String,
    message_id: String,
    started: Option<Instant>,
    last_sent: Option<Instant>,
    sent_len: usize,
    finished: bool,
}

#[derive(Debug, Default)]
struct ToolTrack {
    started: bool,
    ended: bool,
}

#[derive(Debug, Default)]
struct SessionTrack {
    /// The agent its messages name (subagent sessions report it with their progress).
    agent: Option<String>,
    state: Option<PostedState>,
    idle_reported: bool,
    last_error: Option<MessageError>,
    roles: HashMap<String, Role>,
    texts: HashMap<String, TextTrack>,
    tools: HashMap<String, ToolTrack>,
}

impl SessionTrack {
    /// Drops what only matters within a turn.
    fn end_turn(&mut self) {
        self.roles.clear();
        self.texts.clear();
        self.tools.clear();
    }
}

/// Settings of the mapping.
#[derive(Debug, Clone)]
pub struct MapperSettings {
    /// Shortest time between two interim text updates of one part.
    pub text_interval: Duration,
    /// Sent in state metadata (`pod`), so the API knows where the session runs.
    pub pod_name: Option<String>,
    /// Sent in state metadata (`podIP`).
    pub pod_ip: Option<String>,
}

/// What keeps the ids a mapper makes up for events without an OpenCode id apart from those of
/// every other bridge of the tenant: the start time, and a random nonce for bridges that start
/// in the same millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdOrigin {
    /// The bridge's start, in Unix milliseconds.
    pub boot_millis: u64,
    /// 64 random bits drawn once per process.
    pub nonce: u64,
}

impl IdOrigin {
    /// The origin of a bridge that started at `boot_millis`, with a fresh random nonce.
    pub fn new(boot_millis: u64) -> Self {
        Self {
            boot_millis,
            nonce: crate::random::u64(),
        }
    }
}

/// Turns events into callbacks, remembering what each session reported so far.
#[derive(Debug)]
pub struct Mapper {
    settings: MapperSettings,
    sessions: HashMap<String, SessionTrack>,
    parents: HashMap<String, String>,
    origin: IdOrigin,
    generated: u64,
}

impl Mapper {
    /// A mapper that knows nothing yet; `origin` sets the ids of events without an OpenCode id
    /// apart from other pods' and other runs'.
    pub fn new(settings: MapperSettings, origin: IdOrigin) -> Self {
        Self {
            settings,
            sessions: HashMap::new(),
            parents: HashMap::new(),
            origin,
            generated: 0,
        }
    }

    /// The callbacks one event calls for (often none), in the order to send them.
    pub fn handle(&mut self, envelope: &EventEnvelope, now: Instant) -> Vec<Callback> {
        let event_key = match &envelope.id {
            Some(id) => id.clone(),
            None => {
                self.generated += 1;
                // At most 1 + 20 + 1 + 16 + 1 + 20 characters: well within the 128 allowed.
                format!(
                    "b{}-{:016x}-{}",
                    self.origin.boot_millis, self.origin.nonce, self.generated
                )
            }
        };
        match &envelope.event {
            Event::SessionStatus { session_id, status } => {
                self.on_status(session_id, status, &event_key)
            }
            Event::SessionIdle { session_id } => self.on_idle(session_id, &event_key),
            Event::SessionError {
                session_id: Some(session_id),
                error,
            } => self.on_error(session_id, error.as_ref(), &event_key),
            Event::SessionCreated { session } => match &session.parent_id {
                Some(parent) => {
                    self.parents.insert(session.id.clone(), parent.clone());
                    let mut fields = Map::new();
                    fields.insert("type".to_owned(), json!("subagent_started"));
                    if let Some(title) = &session.title {
                        fields.insert("title".to_owned(), json!(tail(title, MAX_TOOL_INPUT_BYTES)));
                    }
                    vec![self.progress(
                        &session.id,
                        format!("{event_key}-subagent-started"),
                        fields,
                    )]
                }
                None => Vec::new(),
            },
            Event::MessageUpdated { info } => {
                let track = self.track(&info.session_id);
                track.roles.insert(info.id.clone(), info.role);
                if info.agent.is_some() {
                    track.agent.clone_from(&info.agent);
                }
                Vec::new()
            }
            Event::MessagePartUpdated {
                session_id,
                part: Part::Tool(tool),
            } => self.on_tool(session_id, tool),
            Event::MessagePartUpdated {
                session_id,
                part: Part::Text(text),
            } => self.on_text(session_id, text, now),
            Event::MessagePartDelta {
                session_id,
                message_id,
                part_id,
                field,
                delta,
            } if field == "text" => self.on_delta(session_id, message_id, part_id, delta, now),
            Event::PermissionAsked(request) => self.on_permission(request),
            Event::QuestionAsked(request) => self.on_question(request),
            _ => Vec::new(),
        }
    }

    /// After (re)connecting: posts the current state of every busy or retrying session that
    /// differs from what was posted, and `idle` for sessions posted as busy that are no longer
    /// listed (they finished while the stream was down). `stamp` (ms) makes the ids unique.
    pub fn resync(
        &mut self,
        statuses: &HashMap<String, SessionStatus>,
        stamp: u64,
    ) -> Vec<Callback> {
        let mut out = Vec::new();
        let mut listed: Vec<(&String, &SessionStatus)> = statuses.iter().collect();
        listed.sort_by_key(|(id, _)| id.as_str());
        for (session_id, status) in listed {
            if self.parents.contains_key(session_id) {
                continue;
            }
            let key = format!("resync-{session_id}-{stamp}");
            out.extend(self.on_status(session_id, status, &key));
        }
        let finished: Vec<String> = self
            .sessions
            .iter()
            .filter(|(id, track)| {
                !statuses.contains_key(*id)
                    && matches!(
                        track.state,
                        Some(PostedState::Busy | PostedState::Retry { .. })
                    )
            })
            .map(|(id, _)| id.clone())
            .collect();
        for session_id in finished {
            let key = format!("resync-{session_id}-{stamp}");
            out.extend(self.post_idle(&session_id, &key, true));
        }
        out
    }

    fn track(&mut self, session_id: &str) -> &mut SessionTrack {
        if self.sessions.len() >= MAX_TRACKED_SESSIONS && !self.sessions.contains_key(session_id) {
            self.sessions
                .retain(|_, track| track.state != Some(PostedState::Idle) && track.state.is_some());
        }
        self.sessions.entry(session_id.to_owned()).or_default()
    }

    /// The session progress is reported on: the root of a subagent chain.
    fn root(&self, session_id: &str) -> String {
        let mut current = session_id;
        // Bounded, in case a malformed chain loops.
        for _ in 0..16 {
            match self.parents.get(current) {
                Some(parent) => current = parent,
                None => break,
            }
        }
        current.to_owned()
    }

    fn progress(
        &self,
        session_id: &str,
        webhook_id: String,
        mut fields: Map<String, Value>,
    ) -> Callback {
        fields.insert(
            "opencodeSessionId".to_owned(),
            Value::String(session_id.to_owned()),
        );
        // A subagent's progress names its parent and agent, so it is never read as the task's.
        if let Some(parent) = self.parents.get(session_id) {
            fields.insert("parentSessionId".to_owned(), json!(parent));
            if let Some(agent) = self.sessions.get(session_id).and_then(|t| t.agent.as_ref()) {
                fields.insert("agent".to_owned(), json!(agent));
            }
        }
        let root = self.root(session_id);
        Callback::new(
            &root,
            CallbackKind::Progress,
            webhook_id,
            &json!({ "progress": fields }),
        )
    }

    fn update(
        &self,
        session_id: &str,
        webhook_id: String,
        state: &str,
        mut metadata: Map<String, Value>,
    ) -> Callback {
        if let Some(pod) = &self.settings.pod_name {
            metadata.insert("pod".to_owned(), Value::String(pod.clone()));
        }
        if let Some(ip) = &self.settings.pod_ip {
            metadata.insert("podIP".to_owned(), Value::String(ip.clone()));
        }
        Callback::new(
            session_id,
            CallbackKind::Update,
            webhook_id,
            &json!({ "state": state, "metadata": metadata }),
        )
    }

    fn on_status(&mut self, session_id: &str, status: &SessionStatus, key: &str) -> Vec<Callback> {
        if self.parents.contains_key(session_id) {
            // A subagent's states are not the task's; a new turn of it is reported again.
            if matches!(status, SessionStatus::Busy) {
                let track = self.track(session_id);
                if track.idle_reported {
                    track.idle_reported = false;
                    track.last_error = None;
                }
            }
            return Vec::new();
        }
        match status {
            SessionStatus::Busy => {
                let track = self.track(session_id);
                match track.state {
                    Some(PostedState::Busy) => return Vec::new(),
                    // A new turn: forget how the previous one ended.
                    None | Some(PostedState::Idle) => {
                        track.last_error = None;
                        track.idle_reported = false;
                    }
                    Some(PostedState::Retry { .. }) => {}
                }
                track.state = Some(PostedState::Busy);
                vec![self.update(session_id, format!("{key}-busy"), "busy", Map::new())]
            }
            SessionStatus::Retry {
                attempt,
                message,
                next,
            } => {
                let track = self.track(session_id);
                if track.state == Some(PostedState::Retry { attempt: *attempt }) {
                    return Vec::new();
                }
                if matches!(track.state, None | Some(PostedState::Idle)) {
                    track.last_error = None;
                    track.idle_reported = false;
                }
                track.state = Some(PostedState::Retry { attempt: *attempt });
                let details = json!({"attempt": attempt, "message": message, "next": next});
                let details = details.as_object().cloned().unwrap_or_default();
                let mut progress = details.clone();
                progress.insert("type".to_owned(), json!("retry"));
                vec![
                    self.update(session_id, format!("{key}-retry"), "retry", details),
                    self.progress(session_id, format!("{key}-retry-progress"), progress),
                ]
            }
            SessionStatus::Idle => {
                if self.track(session_id).state == Some(PostedState::Idle) {
                    return Vec::new();
                }
                self.post_state_idle(session_id, key, false)
            }
            SessionStatus::Unknown => Vec::new(),
        }
    }

    fn post_state_idle(&mut self, session_id: &str, key: &str, resynced: bool) -> Vec<Callback> {
        let track = self.track(session_id);
        track.state = Some(PostedState::Idle);
        let mut metadata = Map::new();
        if let Some(error) = &track.last_error {
            metadata.insert("error".to_owned(), error_json(error));
        }
        if resynced {
            metadata.insert("resynced".to_owned(), Value::Bool(true));
        }
        vec![self.update(session_id, format!("{key}-idle"), "idle", metadata)]
    }

    /// The idle state (if not yet posted) and the `session_idle` progress event of a turn.
    fn post_idle(&mut self, session_id: &str, key: &str, resynced: bool) -> Vec<Callback> {
        let mut out = Vec::new();
        if self.track(session_id).state != Some(PostedState::Idle) {
            out.extend(self.post_state_idle(session_id, key, resynced));
        }
        let track = self.track(session_id);
        if !track.idle_reported {
            track.idle_reported = true;
            track.end_turn();
            let mut fields = Map::new();
            fields.insert("type".to_owned(), json!("session_idle"));
            if let Some(error) = &track.last_error {
                fields.insert("error".to_owned(), error_json(error));
            }
            if resynced {
                fields.insert("resynced".to_owned(), Value::Bool(true));
            }
            out.push(self.progress(session_id, format!("{key}-session-idle"), fields));
        }
        out
    }

    fn on_idle(&mut self, session_id: &str, key: &str) -> Vec<Callback> {
        if self.parents.contains_key(session_id) {
            // A subagent's turn ending is not the task's (its parent goes on): it is reported
            // as the subagent's, once per turn.
            let track = self.track(session_id);
            if track.idle_reported {
                return Vec::new();
            }
            track.idle_reported = true;
            track.end_turn();
            let mut fields = Map::new();
            fields.insert("type".to_owned(), json!("subagent_idle"));
            if let Some(error) = &track.last_error {
                fields.insert("error".to_owned(), error_json(error));
            }
            return vec![self.progress(session_id, format!("{key}-subagent-idle"), fields)];
        }
        self.post_idle(session_id, key, false)
    }

    fn on_error(
        &mut self,
        session_id: &str,
        error: Option<&MessageError>,
        key: &str,
    ) -> Vec<Callback> {
        let mut fields = Map::new();
        fields.insert("type".to_owned(), json!("session_error"));
        if let Some(error) = error {
            if let Value::Object(details) = error_json(error) {
                fields.extend(details);
            }
            self.track(session_id).last_error = Some(error.clone());
        }
        vec![self.progress(session_id, format!("{key}-error"), fields)]
    }

    fn on_tool(&mut self, session_id: &str, tool: &ToolPart) -> Vec<Callback> {
        let (start, end) = {
            let track = self
                .track(session_id)
                .tools
                .entry(tool.id.clone())
                .or_default();
            let started = matches!(
                tool.state.status,
                ToolStatus::Running | ToolStatus::Completed | ToolStatus::Error
            );
            let ended = matches!(tool.state.status, ToolStatus::Completed | ToolStatus::Error);
            let start = started && !track.started;
            let end = ended && !track.ended;
            track.started |= started;
            track.ended |= ended;
            (start, end)
        };
        let mut out = Vec::new();
        let base = |kind: &str| {
            let mut fields = Map::new();
            fields.insert("type".to_owned(), json!(kind));
            fields.insert("tool".to_owned(), json!(tool.tool));
            fields.insert("callId".to_owned(), json!(tool.call_id));
            fields.insert("partId".to_owned(), json!(tool.id));
            fields.insert("messageId".to_owned(), json!(tool.message_id));
            fields
        };
        if start {
            let mut fields = base("tool_execute_start");
            let input = tool.state.input.to_string();
            if !tool.state.input.is_null() && input.len() <= MAX_TOOL_INPUT_BYTES {
                fields.insert("input".to_owned(), tool.state.input.clone());
            }
            out.push(self.progress(session_id, format!("{}-start", tool.id), fields));
        }
        if end {
            let mut fields = base("tool_execute_end");
            let status = if tool.state.status == ToolStatus::Completed {
                "completed"
            } else {
                "error"
            };
            fields.insert("status".to_owned(), json!(status));
            if let Some(title) = &tool.state.title {
                fields.insert("title".to_owned(), json!(title));
            }
            if let Some(output) = &tool.state.output {
                fields.insert(
                    "output".to_owned(),
                    json!(tail(output, MAX_TOOL_OUTPUT_BYTES)),
                );
            }
            if let Some(error) = &tool.state.error {
                fields.insert(
                    "error".to_owned(),
                    json!(tail(error, MAX_TOOL_OUTPUT_BYTES)),
                );
            }
            out.push(self.progress(session_id, format!("{}-end", tool.id), fields));
        }
        out
    }

    fn on_text(&mut self, session_id: &str, part: &TextPart, now: Instant) -> Vec<Callback> {
        let track = self.track(session_id);
        // The prompt arrives as a text part of the user's message; only the agent's text is
        // progress.
        if part.synthetic || track.roles.get(&part.message_id) == Some(&Role::User) {
            return Vec::new();
        }
        let text = track.texts.entry(part.id.clone()).or_default();
        text.message_id.clone_from(&part.message_id);
        text.text.clone_from(&part.text);
        text.started.get_or_insert(now);
        if part.is_complete() {
            if text.finished || text.text.trim().is_empty() {
                return Vec::new();
            }
            text.finished = true;
            let fields = text_fields(&part.id, text, true);
            return vec![self.progress(session_id, format!("{}-final", part.id), fields)];
        }
        self.interim_text(session_id, &part.id, now)
    }

    fn on_delta(
        &mut self,
        session_id: &str,
        message_id: &str,
        part_id: &str,
        delta: &str,
        now: Instant,
    ) -> Vec<Callback> {
        let track = self.track(session_id);
        if track.roles.get(message_id) == Some(&Role::User) {
            return Vec::new();
        }
        // Only parts announced as text: reasoning parts stream deltas too.
        let Some(text) = track.texts.get_mut(part_id) else {
            return Vec::new();
        };
        if text.finished {
            return Vec::new();
        }
        text.text.push_str(delta);
        text.started.get_or_insert(now);
        self.interim_text(session_id, part_id, now)
    }

    fn interim_text(&mut self, session_id: &str, part_id: &str, now: Instant) -> Vec<Callback> {
        let interval = self.settings.text_interval;
        let Some(text) = self.track(session_id).texts.get_mut(part_id) else {
            return Vec::new();
        };
        let since = text.last_sent.or(text.started).unwrap_or(now);
        let grown = text.text.len() > text.sent_len && !text.text.trim().is_empty();
        if !grown || now.duration_since(since) < interval {
            return Vec::new();
        }
        text.last_sent = Some(now);
        text.sent_len = text.text.len();
        let id = format!("{part_id}-{}", text.text.len());
        let fields = text_fields(part_id, text, false);
        vec![self.progress(session_id, id, fields)]
    }

    fn on_permission(&mut self, request: &PermissionRequest) -> Vec<Callback> {
        let mut fields = Map::new();
        fields.insert("type".to_owned(), json!("permission_asked"));
        fields.insert("id".to_owned(), json!(request.id));
        fields.insert("permission".to_owned(), json!(request.permission));
        fields.insert("patterns".to_owned(), json!(request.patterns));
        if let Some(tool) = &request.tool {
            fields.insert("callId".to_owned(), json!(tool.call_id));
        }
        vec![self.progress(&request.session_id, format!("{}-asked", request.id), fields)]
    }

    fn on_question(&mut self, request: &QuestionRequest) -> Vec<Callback> {
        let mut fields = Map::new();
        fields.insert("type".to_owned(), json!("question_asked"));
        fields.insert("id".to_owned(), json!(request.id));
        let questions = request.questions.to_string();
        if questions.len() <= MAX_TEXT_BYTES {
            fields.insert("questions".to_owned(), request.questions.clone());
        }
        if let Some(tool) = &request.tool {
            fields.insert("callId".to_owned(), json!(tool.call_id));
        }
        vec![self.progress(&request.session_id, format!("{}-asked", request.id), fields)]
    }
}

fn text_fields(part_id: &str, text: &TextTrack, finished: bool) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("type".to_owned(), json!("message_part"));
    fields.insert("partId".to_owned(), json!(part_id));
    fields.insert("messageId".to_owned(), json!(text.message_id));
    fields.insert("text".to_owned(), json!(tail(&text.text, MAX_TEXT_BYTES)));
    fields.insert("final".to_owned(), json!(finished));
    if text.text.len() > MAX_TEXT_BYTES {
        fields.insert("truncated".to_owned(), json!(true));
    }
    fields
}

fn error_json(error: &MessageError) -> Value {
    let mut details = json!({ "name": error.name });
    if let Some(message) = error.message() {
        details["message"] = json!(tail(message, MAX_TOOL_OUTPUT_BYTES));
    }
    if let Some(status) = error.data.get("statusCode") {
        details["statusCode"] = status.clone();
    }
    details
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_session_id_is_one_path_segment_that_reaches_the_api_as_signed() {
        let callback = |session_id: &str| Callback {
            session_id: session_id.to_owned(),
            kind: CallbackKind::Progress,
            webhook_id: "w".into(),
            body: Bytes::new(),
        };
        assert_eq!(
            callback("ses_1A-z").path(),
            "/api/sidecar/sessions/ses_1A-z/progress"
        );
        // Found by the bridge_mapping fuzz target: DEL (and spaces, non-ASCII) were encoded by
        // the HTTP client after signing, so the API saw another path than the signed one.
        let odd = "s\u{7f} é/../x?y#z%41.";
        let path = callback(odd).path();
        assert_eq!(
            path,
            "/api/sidecar/sessions/s%7F%20%C3%A9%2F%2E%2E%2Fx%3Fy%23z%2541%2E/progress"
        );
        let sent = reqwest::Url::parse(&format!("http://callback-api{path}")).unwrap();
        assert_eq!(
            (sent.path(), sent.query(), sent.fragment()),
            (path.as_str(), None, None)
        );
    }

    fn mapper() -> Mapper {
        Mapper::new(
            MapperSettings {
                text_interval: Duration::from_secs(1),
                pod_name: Some("fleet-0".into()),
                pod_ip: None,
            },
            IdOrigin {
                boot_millis: 7,
                nonce: 0xab,
            },
        )
    }

    fn envelope(id: &str, event_type: &str, properties: Value) -> EventEnvelope {
        EventEnvelope::from_value(json!({"id": id, "type": event_type, "properties": properties}))
    }

    fn status(id: &str, session: &str, status: Value) -> EventEnvelope {
        envelope(
            id,
            "session.status",
            json!({"sessionID": session, "status": status}),
        )
    }

    fn tool(id: &str, session: &str, state: Value) -> EventEnvelope {
        envelope(
            id,
            "message.part.updated",
            json!({"sessionID": session, "part": {
            "id": "prt_tool", "sessionID": session, "messageID": "msg_a", "type": "tool",
            "tool": "bash", "callID": "call_1", "state": state}}),
        )
    }

    fn text(id: &str, session: &str, message: &str, body: &str, end: Option<i64>) -> EventEnvelope {
        envelope(
            id,
            "message.part.updated",
            json!({"sessionID": session, "part": {
            "id": format!("prt_text_{message}"), "sessionID": session, "messageID": message, "type": "text",
            "text": body, "time": {"start": 1, "end": end}}}),
        )
    }

    fn delta(id: &str, session: &str, message: &str, piece: &str) -> EventEnvelope {
        envelope(
            id,
            "message.part.delta",
            json!({"sessionID": session, "messageID": message,
            "partID": format!("prt_text_{message}"), "field": "text", "delta": piece}),
        )
    }

    fn role(id: &str, session: &str, message: &str, role: &str) -> EventEnvelope {
        envelope(
            id,
            "message.updated",
            json!({"sessionID": session,
            "info": {"id": message, "sessionID": session, "role": role}}),
        )
    }

    fn summaries(callbacks: &[Callback]) -> Vec<String> {
        callbacks.iter().map(Callback::summary).collect()
    }

    fn run(mapper: &mut Mapper, events: &[EventEnvelope], now: Instant) -> Vec<Callback> {
        events.iter().flat_map(|e| mapper.handle(e, now)).collect()
    }

    #[test]
    fn a_plain_turn_posts_busy_once_the_final_text_then_idle_and_session_idle() {
        let mut m = mapper();
        let now = Instant::now();
        let out = run(
            &mut m,
            &[
                role("evt_0", "ses_1", "msg_u", "user"),
                text("evt_1", "ses_1", "msg_u", "Say PONG", Some(1)),
                status("evt_2", "ses_1", json!({"type": "busy"})),
                role("evt_3", "ses_1", "msg_a", "assistant"),
                status("evt_4", "ses_1", json!({"type": "busy"})),
                text("evt_5", "ses_1", "msg_a", "", None),
                delta("evt_6", "ses_1", "msg_a", "Hello "),
                delta("evt_7", "ses_1", "msg_a", "PONG"),
                text("evt_8", "ses_1", "msg_a", "Hello PONG", Some(2)),
                status("evt_9", "ses_1", json!({"type": "idle"})),
                envelope("evt_10", "session.idle", json!({"sessionID": "ses_1"})),
                envelope("evt_11", "session.idle", json!({"sessionID": "ses_1"})),
            ],
            now,
        );
        assert_eq!(
            summaries(&out),
            ["busy", "message_part", "idle", "session_idle"]
        );
        assert_eq!(out[0].path(), "/api/sidecar/sessions/ses_1/update");
        assert_eq!(
            out[0].json(),
            json!({"state": "busy", "metadata": {"pod": "fleet-0"}})
        );
        assert_eq!(out[1].path(), "/api/sidecar/sessions/ses_1/progress");
        let part = &out[1].json()["progress"];
        assert_eq!(part["text"], "Hello PONG");
        assert_eq!(part["final"], true);
        assert_eq!(part["opencodeSessionId"], "ses_1");
        let ids: Vec<&str> = out.iter().map(|c| c.webhook_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "evt_2-busy",
                "prt_text_msg_a-final",
                "evt_9-idle",
                "evt_10-session-idle"
            ]
        );
    }

    #[test]
    fn a_tool_call_posts_one_start_and_one_end_with_its_output() {
        let mut m = mapper();
        let out = run(
            &mut m,
            &[
                tool("evt_1", "ses_1", json!({"status": "pending", "input": {}})),
                tool(
                    "evt_2",
                    "ses_1",
                    json!({"status": "running", "input": {"command": "echo hi"}}),
                ),
                tool(
                    "evt_3",
                    "ses_1",
                    json!({"status": "running", "input": {"command": "echo hi"}, "metadata": {"output": "hi"}}),
                ),
                tool(
                    "evt_4",
                    "ses_1",
                    json!({"status": "completed", "input": {"command": "echo hi"}, "output": "hi\n", "title": "echo hi"}),
                ),
                tool(
                    "evt_5",
                    "ses_1",
                    json!({"status": "completed", "output": "hi\n"}),
                ),
            ],
            Instant::now(),
        );
        assert_eq!(summaries(&out), ["tool_execute_start", "tool_execute_end"]);
        let start = &out[0].json()["progress"];
        assert_eq!(
            (start["tool"].as_str(), start["callId"].as_str()),
            (Some("bash"), Some("call_1"))
        );
        assert_eq!(start["input"]["command"], "echo hi");
        let end = &out[1].json()["progress"];
        assert_eq!(
            (end["status"].as_str(), end["output"].as_str()),
            (Some("completed"), Some("hi\n"))
        );
        assert_eq!(
            (out[0].webhook_id.as_str(), out[1].webhook_id.as_str()),
            ("prt_tool-start", "prt_tool-end")
        );
    }

    #[test]
    fn a_tool_seen_only_when_it_failed_still_posts_start_before_end() {
        let mut m = mapper();
        let out = m.handle(
            &tool(
                "evt_1",
                "ses_1",
                json!({"status": "error", "error": "rejected"}),
            ),
            Instant::now(),
        );
        assert_eq!(summaries(&out), ["tool_execute_start", "tool_execute_end"]);
        assert_eq!(out[1].json()["progress"]["status"], "error");
        assert_eq!(out[1].json()["progress"]["error"], "rejected");
    }

    #[test]
    fn streaming_text_is_coalesced_to_at_most_one_interim_update_per_interval() {
        let mut m = mapper();
        let t0 = Instant::now();
        let mut out = m.handle(&role("e0", "ses_1", "msg_a", "assistant"), t0);
        out.extend(m.handle(&text("e1", "ses_1", "msg_a", "", None), t0));
        for (i, ms) in (0..40).map(|i| (i, i * 100)) {
            out.extend(m.handle(
                &delta(&format!("d{i}"), "ses_1", "msg_a", "x"),
                t0 + Duration::from_millis(ms),
            ));
        }
        // 40 deltas over 3.9 s: interims at 1.0, 2.0 and 3.0 s only.
        assert_eq!(summaries(&out), ["message_part"; 3]);
        assert!(out.iter().all(|c| c.json()["progress"]["final"] == false));
        assert_eq!(out[0].json()["progress"]["text"], "x".repeat(11));
        out = m.handle(
            &text("e2", "ses_1", "msg_a", &"x".repeat(40), Some(5)),
            t0 + Duration::from_secs(4),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].json()["progress"]["final"], true);
        // A repeated final update of the same part posts nothing.
        assert!(
            m.handle(
                &text("e3", "ses_1", "msg_a", &"x".repeat(40), Some(5)),
                t0 + Duration::from_secs(9)
            )
            .is_empty()
        );
    }

    #[test]
    fn the_prompt_text_and_reasoning_deltas_are_not_progress() {
        let mut m = mapper();
        let now = Instant::now();
        let out = run(
            &mut m,
            &[
                role("e0", "ses_1", "msg_u", "user"),
                text("e1", "ses_1", "msg_u", "secret prompt", Some(1)),
                envelope(
                    "e2",
                    "message.part.delta",
                    json!({"sessionID": "ses_1", "messageID": "msg_a",
                "partID": "prt_reasoning", "field": "text", "delta": "thinking"}),
                ),
            ],
            now,
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn retries_post_each_attempt_as_state_and_progress_and_errors_reach_the_idle_state() {
        let mut m = mapper();
        let out = run(
            &mut m,
            &[
                status("e1", "ses_1", json!({"type": "busy"})),
                status(
                    "e2",
                    "ses_1",
                    json!({"type": "retry", "attempt": 1, "message": "fake server error", "next": 10}),
                ),
                status(
                    "e3",
                    "ses_1",
                    json!({"type": "retry", "attempt": 1, "message": "fake server error", "next": 10}),
                ),
                status(
                    "e4",
                    "ses_1",
                    json!({"type": "retry", "attempt": 2, "message": "fake server error", "next": 20}),
                ),
                envelope(
                    "e5",
                    "session.error",
                    json!({"sessionID": "ses_1", "error": {"name": "APIError",
                "data": {"message": "Bad Request", "statusCode": 400}}}),
                ),
                status("e6", "ses_1", json!({"type": "idle"})),
                envelope("e7", "session.idle", json!({"sessionID": "ses_1"})),
            ],
            Instant::now(),
        );
        assert_eq!(
            summaries(&out),
            [
                "busy",
                "retry",
                "retry",
                "retry",
                "retry",
                "session_error",
                "idle",
                "session_idle"
            ]
        );
        assert_eq!(out[1].json()["metadata"]["attempt"], 1);
        assert_eq!(out[2].json()["progress"]["message"], "fake server error");
        let error = &out[5].json()["progress"];
        assert_eq!(
            (error["name"].as_str(), error["statusCode"].as_i64()),
            (Some("APIError"), Some(400))
        );
        assert_eq!(out[6].json()["metadata"]["error"]["name"], "APIError");
        // The next turn starts clean.
        let next = run(
            &mut m,
            &[
                status("e8", "ses_1", json!({"type": "busy"})),
                status("e9", "ses_1", json!({"type": "idle"})),
            ],
            Instant::now(),
        );
        assert_eq!(next[1].json()["metadata"].get("error"), None);
    }

    #[test]
    fn permission_and_question_requests_are_progress_with_stable_ids() {
        let mut m = mapper();
        let out = run(
            &mut m,
            &[
                envelope(
                    "e1",
                    "permission.asked",
                    json!({"id": "per_1", "sessionID": "ses_1", "permission": "bash",
                "patterns": ["rm -rf x"], "tool": {"messageID": "msg_a", "callID": "call_9"}}),
                ),
                envelope(
                    "e2",
                    "question.asked",
                    json!({"id": "que_1", "sessionID": "ses_1",
                "questions": [{"question": "Proceed?", "options": []}]}),
                ),
            ],
            Instant::now(),
        );
        assert_eq!(summaries(&out), ["permission_asked", "question_asked"]);
        assert_eq!(out[0].json()["progress"]["patterns"], json!(["rm -rf x"]));
        assert_eq!(out[0].json()["progress"]["callId"], "call_9");
        assert_eq!(
            (out[0].webhook_id.as_str(), out[1].webhook_id.as_str()),
            ("per_1-asked", "que_1-asked")
        );
    }

    #[test]
    fn subagent_progress_goes_to_the_root_session_and_its_states_are_not_posted() {
        let mut m = mapper();
        let out = run(
            &mut m,
            &[
                envelope(
                    "e1",
                    "session.created",
                    json!({"sessionID": "ses_child", "info": {"id": "ses_child", "parentID": "ses_root",
                        "title": "look around (@explore subagent)"}}),
                ),
                envelope(
                    "e2",
                    "session.created",
                    json!({"sessionID": "ses_grandchild", "info": {"id": "ses_grandchild", "parentID": "ses_child"}}),
                ),
                status("e3", "ses_grandchild", json!({"type": "busy"})),
                role("e3b", "ses_grandchild", "msg_g", "user"),
                envelope(
                    "e3c",
                    "message.updated",
                    json!({"sessionID": "ses_grandchild", "info": {"id": "msg_a",
                        "sessionID": "ses_grandchild", "role": "assistant", "agent": "Sisyphus-Junior"}}),
                ),
                tool(
                    "e4",
                    "ses_grandchild",
                    json!({"status": "completed", "output": "done"}),
                ),
                status("e5", "ses_grandchild", json!({"type": "idle"})),
                envelope("e6", "session.idle", json!({"sessionID": "ses_grandchild"})),
                envelope("e7", "session.idle", json!({"sessionID": "ses_grandchild"})),
            ],
            Instant::now(),
        );
        // No state of a subagent, and its going idle is its own, reported once.
        assert_eq!(
            summaries(&out),
            [
                "subagent_started",
                "subagent_started",
                "tool_execute_start",
                "tool_execute_end",
                "subagent_idle"
            ]
        );
        assert!(out.iter().all(|c| c.session_id == "ses_root"));
        assert!(out.iter().all(|c| c.kind == CallbackKind::Progress));
        let started = out[0].json()["progress"].clone();
        assert_eq!(started["opencodeSessionId"], "ses_child");
        assert_eq!(started["parentSessionId"], "ses_root");
        assert_eq!(started["title"], "look around (@explore subagent)");
        let tool_end = out[3].json()["progress"].clone();
        assert_eq!(tool_end["opencodeSessionId"], "ses_grandchild");
        assert_eq!(tool_end["parentSessionId"], "ses_child");
        assert_eq!(tool_end["agent"], "Sisyphus-Junior");
        assert_eq!(out[4].webhook_id, "e6-subagent-idle");
    }

    #[test]
    fn resync_posts_busy_sessions_and_idles_the_ones_that_finished_while_disconnected() {
        let mut m = mapper();
        run(
            &mut m,
            &[
                status("e1", "ses_done", json!({"type": "busy"})),
                status("e2", "ses_still", json!({"type": "busy"})),
            ],
            Instant::now(),
        );
        let statuses: HashMap<String, SessionStatus> = [
            ("ses_still".to_owned(), SessionStatus::Busy),
            (
                "ses_new".to_owned(),
                SessionStatus::Retry {
                    attempt: 3,
                    message: "down".into(),
                    next: Some(5),
                },
            ),
        ]
        .into();
        let out = m.resync(&statuses, 1234);
        let described: Vec<(String, String)> = out
            .iter()
            .map(|c| (c.session_id.clone(), c.summary()))
            .collect();
        assert_eq!(
            described,
            [
                ("ses_new".to_owned(), "retry".to_owned()),
                ("ses_new".to_owned(), "retry".to_owned()),
                ("ses_done".to_owned(), "idle".to_owned()),
                ("ses_done".to_owned(), "session_idle".to_owned()),
            ]
        );
        assert_eq!(out[2].json()["metadata"]["resynced"], true);
        assert!(
            out.iter()
                .all(|c| c.webhook_id.starts_with("resync-") && c.webhook_id.contains("-1234"))
        );
        // Nothing changed since: a second resync posts nothing.
        assert!(m.resync(&statuses, 1235).is_empty());
    }

    #[test]
    fn webhook_ids_are_valid_for_the_api_even_from_odd_input() {
        assert_eq!(safe_webhook_id("prt_abc-start".into()), "prt_abc-start");
        let hashed = safe_webhook_id(format!("resync-{}-1", "x".repeat(200)));
        assert!(validate_webhook_id(&hashed).is_ok());
        assert_eq!(
            hashed,
            safe_webhook_id(format!("resync-{}-1", "x".repeat(200)))
        );
        assert!(validate_webhook_id(&safe_webhook_id("evt.1/2".into())).is_ok());
        let mut m = mapper();
        let out = m.handle(
            &EventEnvelope::from_value(json!({"type": "session.status",
            "properties": {"sessionID": "ses_1", "status": {"type": "busy"}}})),
            Instant::now(),
        );
        assert_eq!(out[0].webhook_id, "b7-00000000000000ab-1-busy");
    }

    fn busy_without_an_id() -> EventEnvelope {
        EventEnvelope::from_value(json!({"type": "session.status",
            "properties": {"sessionID": "ses_1", "status": {"type": "busy"}}}))
    }

    #[test]
    fn pods_started_in_the_same_millisecond_give_events_without_an_id_different_valid_ids() {
        let settings = MapperSettings {
            text_interval: Duration::from_secs(1),
            pod_name: None,
            pod_ip: None,
        };
        let boot = 1_800_000_000_000;
        let ids: Vec<String> = [IdOrigin::new(boot), IdOrigin::new(boot)]
            .into_iter()
            .map(|origin| {
                let mut m = Mapper::new(settings.clone(), origin);
                m.handle(&busy_without_an_id(), Instant::now())
                    .remove(0)
                    .webhook_id
            })
            .collect();
        assert_ne!(ids[0], ids[1]);
        for id in &ids {
            assert!(validate_webhook_id(id).is_ok(), "{id}");
            assert!(id.starts_with("b1800000000000-"), "{id}");
        }
        // The longest an id can get still fits.
        let mut m = Mapper::new(
            settings,
            IdOrigin {
                boot_millis: u64::MAX,
                nonce: u64::MAX,
            },
        );
        m.generated = u64::MAX - 1;
        let longest = m.handle(&busy_without_an_id(), Instant::now()).remove(0);
        assert_eq!(
            longest.webhook_id,
            format!("b{0}-ffffffffffffffff-{0}-busy", u64::MAX)
        );
    }

    #[test]
    fn long_text_and_output_keep_their_end_within_the_limits() {
        let long = format!("{}\nlast line é", "a".repeat(3 * MAX_TEXT_BYTES));
        let kept = tail(&long, MAX_TEXT_BYTES);
        assert!(kept.len() <= MAX_TEXT_BYTES && kept.ends_with("last line é"));
        assert_eq!(tail("é", 1), "");
        let mut m = mapper();
        let out = run(
            &mut m,
            &[text("e1", "ses_1", "msg_a", &long, Some(2))],
            Instant::now(),
        );
        assert_eq!(out[0].json()["progress"]["truncated"], true);
        assert!(out[0].body.len() < 8 * 1024);
    }
}
