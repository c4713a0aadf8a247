//! Sessions and session mappings: which OpenCode session on which pod serves a Nubabel
//! session, and which tenant it belongs to.
//!
//! The operator records a mapping before it sends a prompt; that creates the session row. The
//! callback API only resolves sessions, always within the caller's tenant, so a session of
//! another tenant is indistinguishable from one that does not exist.

use nubabel_contract::identity::{
    InvalidIdentity, OrganizationId, SidecarIdentity, validate_namespace, validate_object_name,
};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Longest Nubabel or OpenCode session id accepted.
pub const MAX_SESSION_ID_LEN: usize = 253;

/// A `DelegatedTask`, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskRef {
    /// The task's namespace.
    pub namespace: String,
    /// The task's name.
    pub name: String,
}

impl TaskRef {
    /// Builds a reference, validating both names.
    pub fn new(namespace: &str, name: &str) -> Result<Self, InvalidIdentity> {
        validate_namespace(namespace)?;
        validate_object_name("taskName", name)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    pub(crate) fn from_columns(namespace: Option<String>, name: Option<String>) -> Option<Self> {
        Some(Self {
            namespace: namespace?,
            name: name?,
        })
    }
}

/// Checks a session id (Nubabel's or OpenCode's): 1 to 253 bytes, no control characters.
pub fn validate_session_id(field: &'static str, value: &str) -> Result<(), InvalidIdentity> {
    if value.is_empty() || value.len() > MAX_SESSION_ID_LEN {
        return Err(InvalidIdentity {
            field,
            reason: "must be 1 to 253 bytes",
        });
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidIdentity {
            field,
            reason: "must not contain control characters",
        });
    }
    Ok(())
}

/// How OpenCode's own session ids begin. Nubabel session ids never do, so an id in a callback
/// path names exactly one kind of session and a caller cannot shadow an OpenCode session by
/// choosing a Nubabel id equal to it.
pub const OPENCODE_SESSION_PREFIX: &str = "ses_";

/// Checks a Nubabel session id: a valid session id that does not begin with
/// [`OPENCODE_SESSION_PREFIX`], which is OpenCode's.
pub fn validate_nubabel_session_id(
    field: &'static str,
    value: &str,
) -> Result<(), InvalidIdentity> {
    validate_session_id(field, value)?;
    if is_opencode_session_id(value) {
        return Err(InvalidIdentity {
            field,
            reason: "must not begin with \"ses_\", which is reserved for OpenCode's session ids",
        });
    }
    Ok(())
}

/// Whether `id` is an OpenCode session id rather than a Nubabel one.
pub fn is_opencode_session_id(id: &str) -> bool {
    id.starts_with(OPENCODE_SESSION_PREFIX)
}

/// What the operator records before it sends a prompt.
#[derive(Debug, Clone)]
pub struct NewMapping<'a> {
    /// The sidecar fleet (and through it the tenant) that runs the session.
    pub sidecar: &'a SidecarIdentity,
    /// The Nubabel session id.
    pub session_id: &'a str,
    /// The OpenCode session id (`ses_...`) on the pod.
    pub opencode_session_id: &'a str,
    /// The pod the OpenCode session lives on.
    pub pod_name: &'a str,
    /// The task the session now works for; its `status.progress` is mirrored from here on.
    pub task: Option<&'a TaskRef>,
}

/// A recorded mapping, as `SessionMappings::get` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionMapping {
    /// The session row's key, used for stream keys and events.
    pub session_pk: Uuid,
    /// The tenant.
    pub organization_id: String,
    /// The Nubabel session id.
    pub session_id: String,
    /// The current OpenCode session id.
    pub opencode_session_id: String,
    /// Namespace of the sidecar fleet.
    pub sidecar_namespace: String,
    /// Name of the sidecar fleet.
    pub sidecar_name: String,
    /// The pod the OpenCode session lives on.
    pub pod_name: String,
    /// The task the session works for.
    pub task: Option<TaskRef>,
}

/// Records and reads session mappings (Postgres is the only store: a stale cached mapping
/// would send a prompt to the wrong conversation, and a lookup by unique index is cheap).
#[derive(Debug, Clone)]
pub struct SessionMappings {
    pool: PgPool,
}

impl SessionMappings {
    /// Mappings stored in `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Records that `opencode_session_id` on `pod_name` now serves the Nubabel session,
    /// creating the session on first use. Idempotent; a new task resets the progress summary.
    ///
    /// Fails with [`Error::MappingConflict`] when the OpenCode session already serves another
    /// Nubabel session of the tenant.
    pub async fn record(&self, mapping: &NewMapping<'_>) -> Result<SessionMapping> {
        validate_nubabel_session_id("sessionId", mapping.session_id)?;
        validate_session_id("opencodeSessionId", mapping.opencode_session_id)?;
        validate_object_name("podName", mapping.pod_name)?;
        let organization_id = mapping.sidecar.organization_id().as_str();
        let (task_namespace, task_name) = match mapping.task {
            Some(task) => (Some(task.namespace.as_str()), Some(task.name.as_str())),
            None => (None, None),
        };
        let mut tx = self.pool.begin().await?;
        // A new task starts its progress summary from zero; the same task keeps it.
        let session_pk: Uuid = sqlx::query_scalar(
            "insert into sessions (organization_id, session_id, task_namespace, task_name)
             values ($1, $2, $3, $4)
             on conflict (organization_id, session_id) do update
             set task_namespace = excluded.task_namespace,
                 task_name = excluded.task_name,
                 progress_events = case when (sessions.task_namespace, sessions.task_name) is not distinct from (excluded.task_namespace, excluded.task_name) then sessions.progress_events else 0 end,
                 tools_started = case when (sessions.task_namespace, sessions.task_name) is not distinct from (excluded.task_namespace, excluded.task_name) then sessions.tools_started else 0 end,
                 tools_completed = case when (sessions.task_namespace, sessions.task_name) is not distinct from (excluded.task_namespace, excluded.task_name) then sessions.tools_completed else 0 end,
                 last_tool = case when (sessions.task_namespace, sessions.task_name) is not distinct from (excluded.task_namespace, excluded.task_name) then sessions.last_tool end,
                 last_message = case when (sessions.task_namespace, sessions.task_name) is not distinct from (excluded.task_namespace, excluded.task_name) then sessions.last_message end,
                 last_event_at = case when (sessions.task_namespace, sessions.task_name) is not distinct from (excluded.task_namespace, excluded.task_name) then sessions.last_event_at end
             returning id",
        )
        .bind(organization_id)
        .bind(mapping.session_id)
        .bind(task_namespace)
        .bind(task_name)
        .fetch_one(&mut *tx)
        .await?;
        let mapped: Option<i64> = sqlx::query_scalar(
            "insert into session_mappings
                 (session_pk, organization_id, opencode_session_id, sidecar_namespace,
                  sidecar_name, pod_name)
             values ($1, $2, $3, $4, $5, $6)
             on conflict (organization_id, opencode_session_id) do update
             set sidecar_namespace = excluded.sidecar_namespace,
                 sidecar_name = excluded.sidecar_name,
                 pod_name = excluded.pod_name,
                 updated_at = now()
             where session_mappings.session_pk = excluded.session_pk
             returning id",
        )
        .bind(session_pk)
        .bind(organization_id)
        .bind(mapping.opencode_session_id)
        .bind(mapping.sidecar.namespace())
        .bind(mapping.sidecar.name())
        .bind(mapping.pod_name)
        .fetch_optional(&mut *tx)
        .await?;
        if mapped.is_none() {
            return Err(Error::MappingConflict(
                mapping.opencode_session_id.to_owned(),
            ));
        }
        tx.commit().await?;
        Ok(SessionMapping {
            session_pk,
            organization_id: organization_id.to_owned(),
            session_id: mapping.session_id.to_owned(),
            opencode_session_id: mapping.opencode_session_id.to_owned(),
            sidecar_namespace: mapping.sidecar.namespace().to_owned(),
            sidecar_name: mapping.sidecar.name().to_owned(),
            pod_name: mapping.pod_name.to_owned(),
            task: mapping.task.cloned(),
        })
    }

    /// The current mapping of a Nubabel session of `organization_id`, if any.
    pub async fn get(
        &self,
        organization_id: &OrganizationId,
        session_id: &str,
    ) -> Result<Option<SessionMapping>> {
        let row = sqlx::query(
            "select s.id, s.organization_id, s.session_id, s.task_namespace, s.task_name,
                    m.opencode_session_id, m.sidecar_namespace, m.sidecar_name, m.pod_name
             from sessions s
             join session_mappings m on m.session_pk = s.id
             where s.organization_id = $1 and s.session_id = $2
             order by m.updated_at desc, m.id desc
             limit 1",
        )
        .bind(organization_id.as_str())
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| mapping_from_row(&row)).transpose()
    }
}

fn mapping_from_row(row: &PgRow) -> Result<SessionMapping> {
    Ok(SessionMapping {
        session_pk: row.try_get("id")?,
        organization_id: row.try_get("organization_id")?,
        session_id: row.try_get("session_id")?,
        opencode_session_id: row.try_get("opencode_session_id")?,
        sidecar_namespace: row.try_get("sidecar_namespace")?,
        sidecar_name: row.try_get("sidecar_name")?,
        pod_name: row.try_get("pod_name")?,
        task: TaskRef::from_columns(row.try_get("task_namespace")?, row.try_get("task_name")?),
    })
}

/// A session as a callback or a stream reader addresses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    /// The session row's key.
    pub pk: Uuid,
    /// The Nubabel session id.
    pub session_id: String,
}

/// Finds a session of `organization_id` by the id a stream reader names: an OpenCode session id
/// (`ses_...`) the session was ever mapped to, or else its Nubabel session id. The two never
/// overlap (see [`validate_nubabel_session_id`]). Sessions of other tenants are never found.
pub async fn resolve_session(
    pool: &PgPool,
    organization_id: &OrganizationId,
    id: &str,
) -> Result<Option<SessionRef>> {
    resolve(pool, organization_id, None, id).await
}

/// Finds a session by the id in a callback path, as [`resolve_session`] does, but only among
/// the sessions `sidecar`'s fleet was ever given (a mapping names the fleet): a fleet's key
/// or token reaches no other session of its tenant.
pub async fn resolve_fleet_session(
    pool: &PgPool,
    sidecar: &SidecarIdentity,
    id: &str,
) -> Result<Option<SessionRef>> {
    let fleet = (sidecar.namespace(), sidecar.name());
    resolve(pool, sidecar.organization_id(), Some(fleet), id).await
}

/// The session `id` names within the tenant, among those mapped to `fleet` (namespace, name)
/// when one is given.
async fn resolve(
    pool: &PgPool,
    organization_id: &OrganizationId,
    fleet: Option<(&str, &str)>,
    id: &str,
) -> Result<Option<SessionRef>> {
    let query = if is_opencode_session_id(id) {
        "select s.id, s.session_id
         from session_mappings m
         join sessions s on s.id = m.session_pk
         where m.organization_id = $1 and m.opencode_session_id = $2
           and ($3::text is null or (m.sidecar_namespace = $3 and m.sidecar_name = $4))"
    } else {
        "select s.id, s.session_id
         from sessions s
         where s.organization_id = $1 and s.session_id = $2
           and ($3::text is null or exists (
               select 1 from session_mappings m
               where m.session_pk = s.id
                 and m.sidecar_namespace = $3 and m.sidecar_name = $4))"
    };
    let (namespace, name) = fleet.unzip();
    let row = sqlx::query(query)
        .bind(organization_id.as_str())
        .bind(id)
        .bind(namespace)
        .bind(name)
        .fetch_optional(pool)
        .await?;
    row.map(|row| session_ref(&row)).transpose()
}

fn session_ref(row: &PgRow) -> Result<SessionRef> {
    Ok(SessionRef {
        pk: row.try_get("id")?,
        session_id: row.try_get("session_id")?,
    })
}
