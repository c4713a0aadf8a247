//! Appending one event to a session: commit it to Postgres exactly once per event id, count
//! it, fan it out and mark the task's status for the mirror. The path of every sidecar
//! callback, also taken by the MCP gateway's tool-call events.

use nubabel_contract::identity::OrganizationId;
use nubabel_store::{
    events::{Appended, EventKind, EventPayload, NewEvent, PreparedEvent},
    sessions::SessionRef,
};

use crate::{
    committer::Committer,
    error::ApiError,
    fanout::Fanout,
    metrics::{CallbackLabels, Metrics, Outcome},
    mirror::{KubeStatusWriter, StatusMirror},
    session_cache::SessionCache,
};

/// What appending an event uses.
#[derive(Debug, Clone, Copy)]
pub struct EventLog<'a> {
    /// Group commit to Postgres.
    pub committer: &'a Committer,
    /// Resolved sessions, evicted when a session turns out to be gone.
    pub sessions: &'a SessionCache,
    /// Fan-out to SSE streams.
    pub fanout: &'a Fanout,
    /// The status mirror, when enabled.
    pub mirror: Option<&'a StatusMirror<KubeStatusWriter>>,
    /// Callback counts.
    pub metrics: &'a Metrics,
}

/// An appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The event's position in the session's stream (its SSE id).
    pub sequence: i64,
    /// True when this event id was appended before and nothing changed now.
    pub duplicate: bool,
}

impl EventLog<'_> {
    /// Commits one event of `session` exactly once per `event_id`, then fans it out and marks
    /// the task's status for the mirror.
    pub async fn append(
        &self,
        organization_id: &OrganizationId,
        event_id: &str,
        raw_body: &[u8],
        session: &SessionRef,
        payload: EventPayload<'_>,
    ) -> Result<Recorded, ApiError> {
        let kind = match payload {
            EventPayload::Progress { .. } => EventKind::Progress,
            EventPayload::State { .. } => EventKind::State,
        };
        let event = PreparedEvent::new(&NewEvent {
            session_pk: session.pk,
            organization_id,
            event_id,
            payload,
            raw_body,
        });
        let appended = match self.committer.append(event).await {
            Err(nubabel_store::Error::SessionNotFound) => {
                self.sessions.evict(session.pk);
                return Err(ApiError::SessionNotFound);
            }
            other => other?,
        };
        let count = |outcome| {
            self.metrics
                .callbacks
                .get_or_create(&CallbackLabels {
                    kind: kind.as_str(),
                    outcome,
                })
                .inc();
        };
        match appended {
            Appended::New(committed) => {
                count(Outcome::New);
                let sequence = committed.event.seq;
                if let (Some(mirror), Some(task)) = (self.mirror, committed.task) {
                    mirror.mark(task, session.pk);
                }
                self.fanout.publish(session.pk, committed.event).await;
                Ok(Recorded {
                    sequence,
                    duplicate: false,
                })
            }
            Appended::Duplicate { seq } => {
                count(Outcome::Duplicate);
                Ok(Recorded {
                    sequence: seq,
                    duplicate: true,
                })
            }
            Appended::IdReused => {
                count(Outcome::IdReused);
                Err(ApiError::EventIdReused)
            }
        }
    }
}
