//! `GET /api/sidecar/sessions/{sessionId}/stream`: a session's events over Server-Sent Events.
//!
//! Every event carries its sequence number as the SSE `id`. A client that reconnects with
//! `Last-Event-ID: n` first gets every event after `n` (from Redis while the stream still holds
//! them, from Postgres otherwise), in order, then live events; numbers the client already has
//! are never sent again. The `id` and `event` fields are server-made (a number and
//! `progress`/`state`); client strings only ever travel inside the JSON `data` line, where
//! JSON escaping keeps newlines out of the framing.
//!
//! A `Last-Event-ID` past the session's last committed number is refused (400): no stream ever
//! sent it, and waiting for that number would silently skip every event up to it.
//!
//! A stream lasts no longer than its token: at the token's expiry the body ends cleanly, and a
//! client that reconnects needs a new token. A token an administrator revoked (see
//! `routes::stream_tokens`) opens no stream (401), and an open stream checks every
//! `NUBABEL_STREAM_REVOCATION_CHECK_SECONDS` and ends once its token is revoked.

use std::{
    convert::Infallible,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use nubabel_store::{
    Result as DataResult,
    events::{self, StoredEvent},
    sessions::{resolve_session, validate_session_id},
    stream_revocations,
};
use serde_json::json;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    auth::StreamReader,
    error::{ApiError, ErrorBody},
    extract::ApiPath,
    fanout::{PG_BATCH, Subscription},
    limits::Permit,
    metrics::GaugeGuard,
    state::AppState,
};

/// Events queued per connection before the pump waits for the client.
const CONNECTION_BUFFER: usize = 64;
/// The reconnection delay suggested to clients.
const RETRY_HINT: Duration = Duration::from_secs(2);

/// The stream route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream_session))
}

/// Streams a session's events.
#[utoipa::path(
    get,
    path = "/api/sidecar/sessions/{sessionId}/stream",
    tag = "stream",
    params(
        ("sessionId" = String, Path, description = "The Nubabel session id, or an OpenCode session id (`ses_...`) the session is mapped to"),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event id"),
        ("access_token" = Option<String>, Query, description = "Stream token, for clients that cannot send an Authorization header"),
    ),
    security(("stream_token" = [])),
    responses(
        (status = 200, description = "`text/event-stream`: events `progress` and `state`, each with `id` = sequence number and JSON `data`; the stream ends when the token expires or is revoked", content_type = "text/event-stream", body = String),
        (status = 400, description = "Last-Event-ID is not a non-negative integer, or is past the session's last event", body = ErrorBody),
        (status = 401, description = "Missing, expired, invalid or revoked stream token", body = ErrorBody),
        (status = 404, description = "No such session for this token", body = ErrorBody),
        (status = 429, description = "The tenant has too many streams open, or too many replaying past events, on this replica (see Retry-After)", body = ErrorBody),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    )
)]
async fn stream_session(
    State(state): State<AppState>,
    StreamReader(grant): StreamReader,
    ApiPath(session_id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = last_event_id(&headers)?;
    if validate_session_id("sessionId", &session_id).is_err() {
        return Err(ApiError::SessionNotFound);
    }
    let session = resolve_session(&state.db, &grant.organization_id, &session_id)
        .await?
        .ok_or(ApiError::SessionNotFound)?;
    // A token limited to one session reads only that one (404, like any other session).
    if grant
        .session_id
        .as_ref()
        .is_some_and(|sid| *sid != session.session_id)
    {
        return Err(ApiError::SessionNotFound);
    }
    let revocation = Revocation {
        organization_id: grant.organization_id.as_str().to_owned(),
        session_id: session.session_id.clone(),
        issued_at: grant.issued_at,
    };
    if revocation.applies(&state).await? {
        return Err(ApiError::Unauthorized("stream token revoked".into()));
    }
    // Held as long as the response body: the client closing the stream gives it back.
    let open = state
        .limits
        .streams
        .acquire(grant.organization_id.as_str())?;
    // Subscribe before replaying, so nothing committed in between is missed.
    let subscription = state.fanout.subscribe(session.pk).await?;
    // A stream with events to replay may read Postgres for them: each tenant has a bounded
    // share of those reads, held until the stream is live.
    let replay = if after < subscription.live_after {
        Some(
            state
                .limits
                .replays
                .acquire(grant.organization_id.as_str())?,
        )
    } else {
        None
    };
    // Everything up to `live_after` is committed; only a later resume point needs a look.
    if after > subscription.live_after {
        let last = events::last_seqs(&state.db, &[session.pk])
            .await?
            .first()
            .map_or(0, |(_, seq)| *seq);
        refuse_resume_past(after, last)?;
    }
    let (sender, receiver) = mpsc::channel(CONNECTION_BUFFER);
    // Held with the stream's place by the response body, so however the stream ends (the
    // client leaving, the pump stopping or failing) both are given back.
    let held = (open, GaugeGuard::hold(&state.metrics.sse_streams));
    let token_left = time_left(grant.expires_at, SystemTime::now());
    tokio::spawn(pump(
        state.clone(),
        session.pk,
        after,
        subscription,
        sender,
        Grant {
            token_left,
            revocation,
            replay,
        },
    ));

    let events = ReceiverStream::new(receiver).map(move |event| {
        let _held = &held;
        event
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.settings.sse_keep_alive))
        .into_response();
    // nginx (and ingress-nginx) would otherwise buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The `Last-Event-ID` header as a sequence number (0 when absent: replay from the start).
pub fn last_event_id(headers: &HeaderMap) -> Result<i64, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(0);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be a non-negative integer".into()))
}

/// Time from `now` until `expires_at` (Unix seconds); zero once it has passed.
fn time_left(expires_at: i64, now: SystemTime) -> Duration {
    let expiry = Duration::from_secs(u64::try_from(expires_at).unwrap_or(0));
    let now = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    expiry.saturating_sub(now)
}

/// What one stream may use: its token's time left and what would revoke it, and the tenant's
/// share of replays while it replays.
struct Grant {
    token_left: Duration,
    revocation: Revocation,
    replay: Option<Permit>,
}

/// What a revocation of this stream's token would name: its tenant, the session read and the
/// token's issue time.
struct Revocation {
    organization_id: String,
    session_id: String,
    issued_at: i64,
}

impl Revocation {
    /// Whether an administrator revoked the token.
    async fn applies(&self, state: &AppState) -> DataResult<bool> {
        let mark =
            stream_revocations::revoked_through(&state.db, &self.organization_id, &self.session_id)
                .await?;
        Ok(revoked_by(self.issued_at, mark))
    }

    /// Returns once the token is revoked, looking every `every`. A failed look is logged and
    /// tried again: while Postgres is down the stream's own reads fail and end it anyway.
    async fn until_applies(self, state: AppState, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.applies(&state).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => {
                    tracing::debug!(error = %error, "checking a stream token's revocation failed");
                }
            }
        }
    }
}

/// Whether a token issued at `issued_at` is revoked by `mark`: tokens issued at or before the
/// mark's second are.
fn revoked_by(issued_at: i64, mark: Option<i64>) -> bool {
    mark.is_some_and(|through| issued_at <= through)
}

/// Refuses a resume point past `last`, the session's last committed sequence number.
fn refuse_resume_past(after: i64, last: i64) -> Result<(), ApiError> {
    if after > last {
        return Err(ApiError::BadRequest(format!(
            "Last-Event-ID {after} is past the session's last event ({last})"
        )));
    }
    Ok(())
}

/// Renders one event. Only the JSON `data` carries client-supplied text.
pub fn sse_event(event: &StoredEvent) -> Event {
    let data = json!({
        "seq": event.seq,
        "eventId": event.event_id,
        "kind": event.kind,
        "type": event.event_type,
        "receivedAt": event.received_at,
        "data": event.body,
    });
    Event::default()
        .id(event.seq.to_string())
        .event(event.kind.as_str())
        .data(data.to_string())
}

type Sender = mpsc::Sender<Result<Event, Infallible>>;

/// One connection: replay, then live events, each number once and in order.
struct Pump {
    state: AppState,
    session_pk: Uuid,
    /// The organization whose share of replays the stream's Postgres reads take.
    tenant: String,
    sender: Sender,
    /// The next number the client needs.
    next: i64,
}

/// Why the pump stopped early.
enum Stop {
    /// The client went away.
    Disconnected,
    /// Reading events failed; the client reconnects with its last id.
    Failed(nubabel_store::Error),
}

impl From<nubabel_store::Error> for Stop {
    fn from(error: nubabel_store::Error) -> Self {
        Self::Failed(error)
    }
}

/// Runs one connection until the client leaves, reading fails, `token_left` has passed or the
/// token is revoked; dropping the sender then ends the response body.
async fn pump(
    state: AppState,
    session_pk: Uuid,
    after: i64,
    subscription: Subscription,
    sender: Sender,
    grant: Grant,
) {
    let Grant {
        token_left,
        revocation,
        replay,
    } = grant;
    let mut pump = Pump {
        state: state.clone(),
        session_pk,
        tenant: revocation.organization_id.clone(),
        sender,
        next: after.saturating_add(1),
    };
    let revoked = revocation.until_applies(state.clone(), state.settings.stream_revocation_check);
    tokio::select! {
        ended = tokio::time::timeout(token_left, pump.run(subscription, replay)) => match ended {
            Ok(Err(Stop::Failed(error))) => {
                tracing::warn!(%session_pk, error = %error, "closing an event stream after a read failure");
            }
            Err(_) => tracing::debug!(%session_pk, "closing an event stream: its token expired"),
            Ok(Ok(()) | Err(Stop::Disconnected)) => {}
        },
        () = revoked => tracing::info!(%session_pk, "closing an event stream: its token was revoked"),
    }
}

impl Pump {
    /// Replays up to the live start holding `replay` (the tenant's share of replays), then
    /// sends live events.
    async fn run(
        &mut self,
        subscription: Subscription,
        replay: Option<Permit>,
    ) -> Result<(), Stop> {
        let Subscription {
            mut receiver,
            live_after,
        } = subscription;
        self.send(Event::default().retry(RETRY_HINT)).await?;
        while self.next <= live_after {
            let batch = self.replay_batch(self.next - 1).await?;
            if batch.is_empty() {
                break;
            }
            self.send_all(batch).await?;
        }
        drop(replay);
        loop {
            tokio::select! {
                () = self.sender.closed() => return Err(Stop::Disconnected),
                received = receiver.recv() => match received {
                    Ok(event) => {
                        if event.seq > self.next {
                            // A number went missing on the way: take it from Postgres.
                            self.catch_up(Some(event.seq - 1)).await?;
                        }
                        if event.seq == self.next {
                            self.send_stored(&event).await?;
                        }
                    }
                    // This client fell behind the channel: everything it missed is in Postgres.
                    Err(RecvError::Lagged(_)) => self.catch_up(None).await?,
                    Err(RecvError::Closed) => return Ok(()),
                },
            }
        }
    }

    /// Events after `after`: from the Redis stream when it holds the very next one, otherwise
    /// (trimmed, expired or Redis down) from Postgres.
    async fn replay_batch(&self, after: i64) -> DataResult<Vec<StoredEvent>> {
        if let Ok(from_redis) = self
            .state
            .redis
            .range_after(self.session_pk, after, 500)
            .await
        {
            let contiguous: Vec<StoredEvent> = from_redis
                .into_iter()
                .enumerate()
                .take_while(|(i, e)| i64::try_from(*i).is_ok_and(|i| e.seq == after + 1 + i))
                .map(|(_, e)| e)
                .collect();
            if !contiguous.is_empty() {
                return Ok(contiguous);
            }
        }
        events::list_after(&self.state.db, self.session_pk, after, PG_BATCH).await
    }

    /// Sends everything Postgres has from `next` up to `up_to` (or to the end), holding one of
    /// the tenant's replay shares: a live stream that fell behind reads Postgres like a replay
    /// does. Past its tenant's share it waits for one (the client gets keep-alives meanwhile),
    /// so many lagging streams of one tenant cannot take the pool every tenant shares.
    async fn catch_up(&mut self, up_to: Option<i64>) -> Result<(), Stop> {
        if up_to.is_some_and(|last| last < self.next) {
            return Ok(());
        }
        let replays = std::sync::Arc::clone(&self.state.limits.replays);
        let _share = tokio::select! {
            () = self.sender.closed() => return Err(Stop::Disconnected),
            share = replays.acquire_waiting(&self.tenant) => share,
        };
        loop {
            let limit = up_to.map_or(PG_BATCH, |last| (last - self.next + 1).clamp(0, PG_BATCH));
            if limit == 0 {
                return Ok(());
            }
            let batch =
                events::list_after(&self.state.db, self.session_pk, self.next - 1, limit).await?;
            if batch.is_empty() {
                return Ok(());
            }
            self.send_all(batch).await?;
        }
    }

    async fn send_all(&mut self, batch: Vec<StoredEvent>) -> Result<(), Stop> {
        for event in batch {
            if event.seq == self.next {
                self.send_stored(&event).await?;
            }
        }
        Ok(())
    }

    async fn send_stored(&mut self, event: &StoredEvent) -> Result<(), Stop> {
        self.send(sse_event(event)).await?;
        self.next = event.seq + 1;
        Ok(())
    }

    async fn send(&self, event: Event) -> Result<(), Stop> {
        self.sender
            .send(Ok(event))
            .await
            .map_err(|_| Stop::Disconnected)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use futures::stream;
    use http_body_util::BodyExt;
    use nubabel_store::events::EventKind;

    use super::*;

    fn event(body: serde_json::Value) -> StoredEvent {
        StoredEvent {
            seq: 42,
            event_id: "msg_1".into(),
            kind: EventKind::Progress,
            event_type: "message_part".into(),
            body,
            received_at: jiff::Timestamp::from_second(1_800_000_000).unwrap(),
        }
    }

    async fn render(event: Event) -> String {
        let response = Sse::new(stream::iter([Ok::<_, Infallible>(event)])).into_response();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn client_text_with_newlines_stays_inside_one_data_line() {
        let hostile = "line\n\nid: 999\nevent: state\r\ndata: forged\r\rretry: 1";
        let text = render(sse_event(&event(
            json!({ "text": hostile, "type": "message_part" }),
        )))
        .await;
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "id: 42");
        assert_eq!(lines[1], "event: progress");
        assert!(lines[2].starts_with("data: {"));
        // One event: three fields, then the blank line that ends it.
        assert_eq!(lines[3], "");
        assert_eq!(lines[4], "");
        assert_eq!(lines.len(), 5, "{text:?}");
        assert!(!text.contains('\r'));
        let data: serde_json::Value = serde_json::from_str(&lines[2]["data: ".len()..]).unwrap();
        assert_eq!(data["data"]["text"], hostile);
        assert_eq!(data["seq"], 42);
    }

    #[test]
    fn the_time_left_on_a_token_is_never_negative() {
        let now = UNIX_EPOCH + Duration::from_millis(1_800_000_000_250);
        assert_eq!(time_left(1_800_000_002, now), Duration::from_millis(1_750));
        assert_eq!(time_left(1_800_000_000, now), Duration::ZERO);
        assert_eq!(time_left(-5, now), Duration::ZERO);
        assert_eq!(
            time_left(i64::MAX, UNIX_EPOCH),
            Duration::from_secs(i64::MAX.unsigned_abs())
        );
    }

    #[test]
    fn a_revocation_covers_tokens_issued_up_to_and_in_its_second_and_none_after() {
        assert!(!revoked_by(100, None));
        assert!(revoked_by(99, Some(100)));
        assert!(revoked_by(100, Some(100)));
        assert!(!revoked_by(101, Some(100)));
        assert!(revoked_by(i64::MIN, Some(i64::MIN)));
    }

    #[test]
    fn a_resume_point_may_be_the_last_event_but_not_past_it() {
        assert!(refuse_resume_past(0, 0).is_ok());
        assert!(refuse_resume_past(7, 7).is_ok());
        assert!(refuse_resume_past(8, 7).is_err());
        assert!(refuse_resume_past(i64::MAX, 7).is_err());
    }

    #[test]
    fn last_event_id_must_be_a_non_negative_integer() {
        let mut headers = HeaderMap::new();
        assert_eq!(last_event_id(&headers).unwrap(), 0);
        headers.insert("last-event-id", HeaderValue::from_static("17"));
        assert_eq!(last_event_id(&headers).unwrap(), 17);
        for bad in ["-1", "1-0", "abc", ""] {
            headers.insert("last-event-id", HeaderValue::from_static(bad));
            assert!(last_event_id(&headers).is_err(), "{bad}");
        }
    }
}
