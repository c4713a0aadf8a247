//! Sidecar callbacks: session state updates and progress events.
//!
//! Both follow the same path: verify the signature (before parsing anything), parse and
//! validate the body, resolve the session within the caller's tenant, commit the event to
//! Postgres exactly once, then fan it out and mark the task's status for the mirror. A 2xx
//! means the event is committed; a repeated `webhook-id` is answered 200 and changes nothing.

use axum::{Json, extract::State};
use nubabel_store::{
    events::EventPayload,
    sessions::{SessionRef, resolve_fleet_session, validate_session_id},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::SignedCallback,
    error::{ApiError, ErrorBody},
    extract::ApiPath,
    state::AppState,
};

/// Longest state or progress type accepted.
const MAX_TYPE_LEN: usize = 64;

/// The callback routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(update_session))
        .routes(routes!(record_progress))
}

/// Body of `POST /api/sidecar/sessions/{sessionId}/update`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionUpdate {
    /// The session's state, e.g. `busy`, `idle`, `completed`, `failed` (1 to 64 of
    /// `[A-Za-z0-9_.-]`).
    #[schema(example = "busy")]
    pub state: String,
    /// Free-form details sent with the state (an object).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: Option<Map<String, Value>>,
}

/// Body of `POST /api/sidecar/sessions/{sessionId}/progress`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgressCallback {
    /// The progress event.
    pub progress: ProgressEvent,
}

/// One progress event: a `type` and any other fields, kept as sent.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ProgressEvent {
    /// The event type, e.g. `tool_execute_start`, `tool_execute_end`, `message_part`, `retry`,
    /// `permission_asked` (1 to 64 of `[A-Za-z0-9_.-]`). Tool events name the tool in `tool`;
    /// message parts carry their text in `text`.
    #[serde(rename = "type")]
    #[schema(example = "tool_execute_start")]
    pub event_type: String,
    /// Every other field of the event.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub fields: Map<String, Value>,
}

/// The answer to an accepted callback.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    /// The event's position in the session's stream (its SSE id).
    pub sequence: i64,
    /// True when this `webhook-id` was accepted before and nothing changed now.
    pub duplicate: bool,
}

/// Records a session state update.
#[utoipa::path(
    post,
    path = "/api/sidecar/sessions/{sessionId}/update",
    tag = "callbacks",
    params(
        ("sessionId" = String, Path, description = "The Nubabel session id, or an OpenCode session id (`ses_...`) the session is mapped to"),
    ),
    request_body = SessionUpdate,
    security(("sidecar_signature" = [])),
    responses(
        (status = 200, description = "Committed (or a repeat of a committed event)", body = Accepted),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing, stale or invalid signature", body = ErrorBody),
        (status = 404, description = "No such session for this tenant", body = ErrorBody),
        (status = 429, description = "The tenant has too many callbacks in flight on this replica; nothing was written (see Retry-After)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing or invalid, or the webhook-id was used for another event", body = ErrorBody),
        (status = 503, description = "Postgres unavailable; retry after Retry-After seconds", body = ErrorBody),
    )
)]
async fn update_session(
    State(state): State<AppState>,
    ApiPath(session_id): ApiPath<String>,
    callback: SignedCallback,
) -> Result<Json<Accepted>, ApiError> {
    let _in_flight = state
        .limits
        .callbacks
        .acquire(callback.sidecar.organization_id().as_str())?;
    let update: SessionUpdate = parse_body(&callback.body)?;
    validate_type("state", &update.state)?;
    let metadata = Value::Object(update.metadata.unwrap_or_default());
    let session = find_session(&state, &callback, &session_id).await?;
    let payload = EventPayload::State {
        state: &update.state,
        metadata: &metadata,
    };
    append(&state, &callback, &session, payload).await
}

/// Records one progress event.
#[utoipa::path(
    post,
    path = "/api/sidecar/sessions/{sessionId}/progress",
    tag = "callbacks",
    params(
        ("sessionId" = String, Path, description = "The Nubabel session id, or an OpenCode session id (`ses_...`) the session is mapped to"),
    ),
    request_body = ProgressCallback,
    security(("sidecar_signature" = [])),
    responses(
        (status = 200, description = "Committed (or a repeat of a committed event)", body = Accepted),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing, stale or invalid signature", body = ErrorBody),
        (status = 404, description = "No such session for this tenant", body = ErrorBody),
        (status = 429, description = "The tenant has too many callbacks in flight on this replica; nothing was written (see Retry-After)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing or invalid, or the webhook-id was used for another event", body = ErrorBody),
        (status = 503, description = "Postgres unavailable; retry after Retry-After seconds", body = ErrorBody),
    )
)]
async fn record_progress(
    State(state): State<AppState>,
    ApiPath(session_id): ApiPath<String>,
    callback: SignedCallback,
) -> Result<Json<Accepted>, ApiError> {
    let _in_flight = state
        .limits
        .callbacks
        .acquire(callback.sidecar.organization_id().as_str())?;
    let ProgressCallback { progress } = parse_body(&callback.body)?;
    validate_type("progress.type", &progress.event_type)?;
    let mut body = progress.fields;
    body.insert(
        "type".to_owned(),
        Value::String(progress.event_type.clone()),
    );
    let body = Value::Object(body);
    let session = find_session(&state, &callback, &session_id).await?;
    let payload = EventPayload::Progress {
        event_type: &progress.event_type,
        progress: &body,
    };
    append(&state, &callback, &session, payload).await
}

/// Parses JSON: syntax errors are 400, a missing or mistyped field is 422 naming its path.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_data() {
            let message = strip_position(&inner.to_string());
            if path == "." {
                ApiError::Unprocessable(message)
            } else {
                ApiError::Unprocessable(format!("{path}: {message}"))
            }
        } else {
            ApiError::BadRequest(format!("malformed JSON: {inner}"))
        }
    })?;
    // Trailing bytes after the value make the body malformed, not just longer.
    deserializer
        .end()
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    Ok(parsed)
}

/// serde_json appends " at line L column C"; for a field error the path says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(index) => message[..index].to_owned(),
        None => message.to_owned(),
    }
}

fn validate_type(field: &str, value: &str) -> Result<(), ApiError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_TYPE_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(format!(
            "{field}: must be 1 to {MAX_TYPE_LEN} of [A-Za-z0-9_.-]"
        )))
    }
}

async fn find_session(
    state: &AppState,
    callback: &SignedCallback,
    id: &str,
) -> Result<SessionRef, ApiError> {
    if validate_session_id("sessionId", id).is_err() {
        return Err(ApiError::SessionNotFound);
    }
    if let Some(session) = state.sessions.get(&callback.sidecar, id) {
        return Ok(session);
    }
    let session = resolve_fleet_session(&state.db, &callback.sidecar, id)
        .await?
        .ok_or(ApiError::SessionNotFound)?;
    state
        .sessions
        .insert(&callback.sidecar, id, session.clone());
    Ok(session)
}

async fn append(
    state: &AppState,
    callback: &SignedCallback,
    session: &SessionRef,
    payload: EventPayload<'_>,
) -> Result<Json<Accepted>, ApiError> {
    let recorded = state
        .event_log()
        .append(
            callback.sidecar.organization_id(),
            &callback.webhook_id,
            &callback.body,
            session,
            payload,
        )
        .await?;
    Ok(Json(Accepted {
        sequence: recorded.sequence,
        duplicate: recorded.duplicate,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(error: ApiError) -> (u16, String) {
        let status = match &error {
            ApiError::BadRequest(_) => 400,
            ApiError::Unprocessable(_) => 422,
            _ => 0,
        };
        (status, error.to_string())
    }

    #[test]
    fn a_missing_field_is_422_and_names_it() {
        let error =
            parse_body::<ProgressCallback>(br#"{"progress": {"tool": "bash"}}"#).unwrap_err();
        assert_eq!(
            message(error),
            (422, "progress: missing field `type`".to_owned())
        );
        let error = parse_body::<SessionUpdate>(br#"{"metadata": {}}"#).unwrap_err();
        assert_eq!(message(error), (422, "missing field `state`".to_owned()));
    }

    #[test]
    fn a_mistyped_field_is_422_and_names_it() {
        let error =
            parse_body::<SessionUpdate>(br#"{"state": "busy", "metadata": "x"}"#).unwrap_err();
        let (status, text) = message(error);
        assert_eq!(status, 422);
        assert!(text.starts_with("metadata: invalid type: string"), "{text}");
        let error = parse_body::<SessionUpdate>(br#"{"state": "busy", "extra": 1}"#).unwrap_err();
        assert!(message(error).1.contains("unknown field `extra`"));
    }

    #[test]
    fn malformed_json_is_400() {
        for body in [
            &b"{"[..],
            b"not json",
            b"{\"state\": \"busy\"} trailing",
            b"",
        ] {
            let (status, text) = message(parse_body::<SessionUpdate>(body).unwrap_err());
            assert_eq!(status, 400, "{text}");
            assert!(text.starts_with("malformed JSON"), "{text}");
        }
    }

    #[test]
    fn progress_keeps_every_field_it_was_sent() {
        let parsed: ProgressCallback =
            parse_body(br#"{"progress": {"type": "tool_execute_start", "tool": "bash", "n": 1}}"#)
                .unwrap();
        assert_eq!(parsed.progress.event_type, "tool_execute_start");
        assert_eq!(parsed.progress.fields["tool"], "bash");
        assert_eq!(parsed.progress.fields["n"], 1);
    }

    #[test]
    fn types_are_restricted_to_a_safe_alphabet() {
        assert!(validate_type("state", "busy").is_ok());
        assert!(validate_type("state", "tool.execute-start_1").is_ok());
        assert!(validate_type("state", "").is_err());
        assert!(validate_type("state", "busy\nid: 7").is_err());
        assert!(validate_type("state", &"a".repeat(65)).is_err());
    }
}
