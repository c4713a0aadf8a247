//! The per-session event log: progress events and state updates, numbered 1, 2, 3, ... per
//! session and deduplicated on the sender's event id.
//!
//! Appending is one call of the `append_events` function (migrations/): insert the event
//! numbered after the session's `last_seq`, read under the session's row lock (which also
//! orders concurrent appends to one session), then bump `last_seq` and apply the state or the
//! progress summary. A retried delivery conflicts on
//! `(organization_id, event_id)`; then nothing is inserted and nothing else changes, not even
//! the sequence.
//!
//! [`append_batch`] appends several events in one transaction and one round trip (the
//! `append_events` function), each exactly as on its own; the callback API uses it for group
//! commit.

use jiff::Timestamp;
use nubabel_contract::{identity::OrganizationId, progress::ProgressDelta};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    sessions::TaskRef,
    storable,
};

/// Whether an event is a progress event or a state update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// `POST .../progress`.
    Progress,
    /// `POST .../update`.
    State,
}

impl EventKind {
    /// The name stored in the database and used as the SSE event name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Progress => "progress",
            Self::State => "state",
        }
    }

    fn parse(value: &str) -> Result<Self> {
        match value {
            "progress" => Ok(Self::Progress),
            "state" => Ok(Self::State),
            other => Err(Error::Corrupt(format!("unknown event kind {other:?}"))),
        }
    }
}

/// One committed event, as it is replayed and streamed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEvent {
    /// Position in the session's log, from 1, without gaps.
    pub seq: i64,
    /// The sender's `webhook-id`.
    pub event_id: String,
    /// Progress event or state update.
    pub kind: EventKind,
    /// `progress.type`, or the state.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The `progress` object, or `{state, metadata}`.
    pub body: Value,
    /// When the API accepted it.
    pub received_at: Timestamp,
}

/// What a callback asks to append.
#[derive(Debug, Clone)]
pub enum EventPayload<'a> {
    /// A progress event: its `type` and the whole `progress` object.
    Progress {
        /// `progress.type`.
        event_type: &'a str,
        /// The `progress` object.
        progress: &'a Value,
    },
    /// A state update.
    State {
        /// The new state.
        state: &'a str,
        /// Free-form metadata sent with it.
        metadata: &'a Value,
    },
}

/// One event to append.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    /// The session (already resolved within `organization_id`).
    pub session_pk: Uuid,
    /// The tenant; event ids are unique per tenant.
    pub organization_id: &'a OrganizationId,
    /// The sender's `webhook-id`.
    pub event_id: &'a str,
    /// The event itself.
    pub payload: EventPayload<'a>,
    /// The exact request body, for telling a retry from a reused id.
    pub raw_body: &'a [u8],
}

/// The progress summary of the task a session works for (`status.progress`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgressSummary {
    /// Progress events seen for the task.
    pub events: i64,
    /// Tool calls started.
    pub tools_started: i64,
    /// Tool calls finished.
    pub tools_completed: i64,
    /// The most recent tool.
    pub last_tool: Option<String>,
    /// The last line of text the agent wrote.
    pub last_message: Option<String>,
    /// When the most recent event arrived.
    pub last_event_at: Option<Timestamp>,
}

/// A newly committed event and what the caller fans out.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The event.
    pub event: StoredEvent,
    /// The task the session works for, whose status mirrors `summary`.
    pub task: Option<TaskRef>,
    /// The task's progress summary after this event.
    pub summary: ProgressSummary,
}

/// The result of an append.
#[derive(Debug, Clone)]
pub enum Appended {
    /// The event is new and committed.
    New(Box<Committed>),
    /// The same event (id, session, kind and body) was committed before; nothing changed.
    Duplicate {
        /// Its position in the log.
        seq: i64,
    },
    /// The event id was used before for a different body or session; nothing changed.
    IdReused,
}

/// An event ready to append: everything the statement binds, owned, so it can wait in a batch.
#[derive(Debug, Clone)]
pub struct PreparedEvent {
    session_pk: Uuid,
    organization_id: String,
    event_id: String,
    kind: EventKind,
    event_type: String,
    body: Value,
    fingerprint: [u8; 32],
    delta: ProgressDelta,
    state: Option<String>,
    metadata: Option<Value>,
}

impl PreparedEvent {
    /// Prepares `event`: its stored body (with any NUL replaced, see [`storable`]),
    /// fingerprint (of the raw body) and summary delta.
    pub fn new(event: &NewEvent<'_>) -> Self {
        let (kind, event_type, body, delta, state, metadata) = match &event.payload {
            EventPayload::Progress {
                event_type,
                progress,
            } => {
                let progress = storable::json_owned(progress);
                let delta = ProgressDelta::from_progress(event_type, &progress);
                (
                    EventKind::Progress,
                    *event_type,
                    progress,
                    delta,
                    None,
                    None,
                )
            }
            EventPayload::State { state, metadata } => {
                // The state itself is a validated name (`[A-Za-z0-9_.-]`).
                let metadata = storable::json_owned(metadata);
                (
                    EventKind::State,
                    *state,
                    json!({ "state": state, "metadata": metadata }),
                    ProgressDelta::default(),
                    Some((*state).to_owned()),
                    Some(metadata),
                )
            }
        };
        Self {
            session_pk: event.session_pk,
            organization_id: event.organization_id.as_str().to_owned(),
            event_id: event.event_id.to_owned(),
            kind,
            event_type: event_type.to_owned(),
            body,
            fingerprint: fingerprint(kind, event.session_pk, event.raw_body),
            delta,
            state,
            metadata,
        }
    }

    fn committed(&self, row: &PgRow) -> Result<Appended> {
        Ok(Appended::New(Box::new(Committed {
            event: StoredEvent {
                seq: row.try_get("last_seq")?,
                event_id: self.event_id.clone(),
                kind: self.kind,
                event_type: self.event_type.clone(),
                body: self.body.clone(),
                received_at: timestamp(row.try_get("received_at_us")?)?,
            },
            task: TaskRef::from_row(row)?,
            summary: summary_from_row(row)?,
        })))
    }
}

/// Appends one event to its session's log, exactly once per event id.
pub async fn append(pool: &PgPool, event: &NewEvent<'_>) -> Result<Appended> {
    append_prepared(pool, &PreparedEvent::new(event)).await
}

/// Appends one prepared event to its session's log, exactly once per event id: a batch of one
/// (the `append_events` function is the one copy of the append).
pub async fn append_prepared(pool: &PgPool, event: &PreparedEvent) -> Result<Appended> {
    append_together(pool, std::slice::from_ref(event))
        .await?
        .pop()
        .ok_or_else(|| Error::Corrupt("append_events answered no event".to_owned()))?
}

/// Appends several events in one transaction, each exactly as [`append_prepared`] would, and
/// gives one result per event, in the order given.
///
/// Events of one session keep their relative order. When the batch as a whole fails (an event
/// Postgres refuses, say), each event is tried on its own, so one bad event fails only itself.
pub async fn append_batch(pool: &PgPool, events: &[PreparedEvent]) -> Vec<Result<Appended>> {
    if let [event] = events {
        return vec![append_prepared(pool, event).await];
    }
    match append_together(pool, events).await {
        Ok(results) => results,
        Err(error) => {
            tracing::debug!(error = %error, events = events.len(), "batch append failed; appending one by one");
            // One after another: appended concurrently, a session's later event could take
            // its sequence number before an earlier one. Failed batches are rare.
            let mut results = Vec::with_capacity(events.len());
            for event in events {
                results.push(append_prepared(pool, event).await);
            }
            results
        }
    }
}

async fn append_together(pool: &PgPool, events: &[PreparedEvent]) -> Result<Vec<Result<Appended>>> {
    // Sessions are locked in this order; sorting by session makes every batch lock them in the
    // same order (no deadlock between replicas), and the stable sort keeps each session's
    // events in arrival order.
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by_key(|&index| events[index].session_pk);
    let sorted: Vec<&PreparedEvent> = order.iter().map(|&index| &events[index]).collect();
    // One array per parameter of `append_events`, in the sorted order.
    fn column<'e, T>(sorted: &[&'e PreparedEvent], f: impl Fn(&'e PreparedEvent) -> T) -> Vec<T> {
        sorted.iter().map(|event| f(event)).collect()
    }
    let rows = sqlx::query(
        "select * from append_events($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(column(&sorted, |e| e.session_pk))
    .bind(column(&sorted, |e| e.organization_id.as_str()))
    .bind(column(&sorted, |e| e.event_id.as_str()))
    .bind(column(&sorted, |e| e.kind.as_str()))
    .bind(column(&sorted, |e| e.event_type.as_str()))
    .bind(column(&sorted, |e| &e.body))
    .bind(column(&sorted, |e| e.fingerprint.as_slice()))
    .bind(column(&sorted, |e| {
        i64::from(e.kind == EventKind::Progress)
    }))
    .bind(column(&sorted, |e| e.delta.tools_started))
    .bind(column(&sorted, |e| e.delta.tools_completed))
    .bind(column(&sorted, |e| e.delta.last_tool.as_deref()))
    .bind(column(&sorted, |e| e.delta.last_message.as_deref()))
    .bind(column(&sorted, |e| e.state.as_deref()))
    .bind(column(&sorted, |e| e.metadata.as_ref()))
    .fetch_all(pool)
    .await?;

    let mut results: Vec<Option<Result<Appended>>> = events.iter().map(|_| None).collect();
    for row in &rows {
        let ord: i32 = row.try_get("ord")?;
        let index = usize::try_from(ord - 1)
            .ok()
            .and_then(|position| order.get(position).copied())
            .ok_or_else(|| Error::Corrupt(format!("append_events returned position {ord}")))?;
        results[index] = Some(events[index].committed(row));
    }
    // Events without a row were not inserted: a duplicate, a reused id or a session gone.
    let mut out = Vec::with_capacity(events.len());
    for (event, result) in events.iter().zip(results) {
        out.push(match result {
            Some(result) => result,
            None => existing(pool, event).await,
        });
    }
    Ok(out)
}

async fn existing(pool: &PgPool, event: &PreparedEvent) -> Result<Appended> {
    let row = sqlx::query(
        "select session_pk, seq, kind, fingerprint
         from session_events
         where organization_id = $1 and event_id = $2",
    )
    .bind(&event.organization_id)
    .bind(&event.event_id)
    .fetch_optional(pool)
    .await?
    .ok_or(Error::SessionNotFound)?;
    let same = row.try_get::<Uuid, _>("session_pk")? == event.session_pk
        && row.try_get::<String, _>("kind")? == event.kind.as_str()
        && row.try_get::<Vec<u8>, _>("fingerprint")? == event.fingerprint.as_slice();
    Ok(if same {
        Appended::Duplicate {
            seq: row.try_get("seq")?,
        }
    } else {
        Appended::IdReused
    })
}

fn fingerprint(kind: EventKind, session_pk: Uuid, raw_body: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(kind.as_str().as_bytes());
    hash.update([0]);
    hash.update(session_pk.as_bytes());
    hash.update([0]);
    hash.update(raw_body);
    hash.finalize().into()
}

/// Events of a session with `seq > after`, oldest first, at most `limit`.
pub async fn list_after(
    pool: &PgPool,
    session_pk: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>> {
    sqlx::query(
        "select seq, event_id, kind, event_type, body,
                (extract(epoch from received_at) * 1000000)::int8 as received_at_us
         from session_events
         where session_pk = $1 and seq > $2
         order by seq
         limit $3",
    )
    .bind(session_pk)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?
    .iter()
    .map(event_from_row)
    .collect()
}

/// The newest sequence number of each of `sessions` (sessions without events give 0).
pub async fn last_seqs(pool: &PgPool, sessions: &[Uuid]) -> Result<Vec<(Uuid, i64)>> {
    let rows = sqlx::query("select id, last_seq from sessions where id = any($1)")
        .bind(sessions)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("id")?, row.try_get("last_seq")?)))
        .collect()
}

/// The task a session works for and its progress summary, as committed now.
pub async fn progress_summary(
    pool: &PgPool,
    session_pk: Uuid,
) -> Result<Option<(TaskRef, ProgressSummary)>> {
    let row = sqlx::query(
        "select task_namespace, task_name, progress_events, tools_started, tools_completed,
                last_tool, last_message,
                (extract(epoch from last_event_at) * 1000000)::int8 as last_event_at_us
         from sessions
         where id = $1",
    )
    .bind(session_pk)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let Some(task) = TaskRef::from_row(&row)? else {
        return Ok(None);
    };
    Ok(Some((task, summary_from_row(&row)?)))
}

fn event_from_row(row: &PgRow) -> Result<StoredEvent> {
    Ok(StoredEvent {
        seq: row.try_get("seq")?,
        event_id: row.try_get("event_id")?,
        kind: EventKind::parse(row.try_get("kind")?)?,
        event_type: row.try_get("event_type")?,
        body: row.try_get("body")?,
        received_at: timestamp(row.try_get("received_at_us")?)?,
    })
}

fn summary_from_row(row: &PgRow) -> Result<ProgressSummary> {
    Ok(ProgressSummary {
        events: row.try_get("progress_events")?,
        tools_started: row.try_get("tools_started")?,
        tools_completed: row.try_get("tools_completed")?,
        last_tool: row.try_get("last_tool")?,
        last_message: row.try_get("last_message")?,
        last_event_at: row
            .try_get::<Option<i64>, _>("last_event_at_us")?
            .map(timestamp)
            .transpose()?,
    })
}

impl TaskRef {
    fn from_row(row: &PgRow) -> Result<Option<Self>> {
        let namespace: Option<String> = row.try_get("task_namespace")?;
        let name: Option<String> = row.try_get("task_name")?;
        Ok(namespace
            .zip(name)
            .map(|(namespace, name)| Self { namespace, name }))
    }
}

fn timestamp(micros: i64) -> Result<Timestamp> {
    Timestamp::from_microsecond(micros).map_err(|e| Error::Corrupt(e.to_string()))
}
