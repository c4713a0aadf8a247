//! Finished tasks' full outcomes: the operator writes the whole final answer here, while the
//! task's status keeps only a bounded excerpt.

use sqlx::PgPool;
use uuid::Uuid;

use crate::{error::Result, storable};

/// The outcome of one finished task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskResult<'a> {
    /// The task's `metadata.uid`.
    pub task_uid: Uuid,
    /// The tenant.
    pub organization_id: &'a str,
    /// The task's namespace.
    pub task_namespace: &'a str,
    /// The task's name.
    pub task_name: &'a str,
    /// The Nubabel session, if the task had one.
    pub session_id: Option<&'a str>,
    /// The phase it ended in (Succeeded, Failed, Cancelled, TimedOut).
    pub phase: &'a str,
    /// The agent's whole final answer.
    pub output: Option<&'a str>,
    /// Why it did not succeed.
    pub error_reason: Option<&'a str>,
    /// In words.
    pub error_message: Option<&'a str>,
}

/// Records (or, for a repeated write of the same task, replaces) a task's outcome. The agent's
/// answer and the error message are stored with any NUL replaced ([`storable`]).
pub async fn record(pool: &PgPool, result: &TaskResult<'_>) -> Result<()> {
    sqlx::query(
        "insert into task_results (task_uid, organization_id, task_namespace, task_name,
                                   session_id, phase, output, error_reason, error_message)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         on conflict (task_uid) do update
         set phase = excluded.phase, output = excluded.output,
             error_reason = excluded.error_reason, error_message = excluded.error_message",
    )
    .bind(result.task_uid)
    .bind(result.organization_id)
    .bind(result.task_namespace)
    .bind(result.task_name)
    .bind(result.session_id)
    .bind(result.phase)
    .bind(result.output.map(storable::text))
    .bind(result.error_reason)
    .bind(result.error_message.map(storable::text))
    .execute(pool)
    .await?;
    Ok(())
}

/// The whole output of task `task_uid`, if it finished with one.
pub async fn output(pool: &PgPool, task_uid: Uuid) -> Result<Option<String>> {
    let output: Option<Option<String>> =
        sqlx::query_scalar("select output from task_results where task_uid = $1")
            .bind(task_uid)
            .fetch_optional(pool)
            .await?;
    Ok(output.flatten())
}

/// The SQL tail that keeps the newest row of one task name (a macro, so queries stay
/// `&'static str`).
macro_rules! newest_of_name {
    () => {
        "from task_results
         where organization_id = $1 and task_namespace = $2 and task_name = $3
         order by created_at desc limit 1"
    };
}

/// The uid of the newest finished task named `name` in `namespace` of `organization_id`.
pub async fn newest_uid(
    pool: &PgPool,
    organization_id: &str,
    namespace: &str,
    name: &str,
) -> Result<Option<Uuid>> {
    Ok(
        sqlx::query_scalar(concat!("select task_uid ", newest_of_name!()))
            .bind(organization_id)
            .bind(namespace)
            .bind(name)
            .fetch_optional(pool)
            .await?,
    )
}

/// A finished task's outcome as stored, for reading it back after the task object is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResult {
    /// The task's `metadata.uid`.
    pub task_uid: Uuid,
    /// The Nubabel session, if the task had one.
    pub session_id: Option<String>,
    /// The phase it ended in.
    pub phase: String,
    /// The agent's whole final answer.
    pub output: Option<String>,
    /// Why it did not succeed.
    pub error_reason: Option<String>,
    /// In words.
    pub error_message: Option<String>,
    /// When the outcome was first recorded.
    pub recorded_at: jiff::Timestamp,
}

/// The newest finished task named `name` in `namespace` of `organization_id`, in full.
pub async fn newest(
    pool: &PgPool,
    organization_id: &str,
    namespace: &str,
    name: &str,
) -> Result<Option<StoredResult>> {
    let row: Option<StoredResultRow> = sqlx::query_as(concat!(
        "select task_uid, session_id, phase, output, error_reason, error_message,
                (extract(epoch from created_at) * 1000000)::int8 ",
        newest_of_name!()
    ))
    .bind(organization_id)
    .bind(namespace)
    .bind(name)
    .fetch_optional(pool)
    .await?;
    row.map(
        |(task_uid, session_id, phase, output, error_reason, error_message, recorded_us)| {
            Ok(StoredResult {
                task_uid,
                session_id,
                phase,
                output,
                error_reason,
                error_message,
                recorded_at: jiff::Timestamp::from_microsecond(recorded_us).map_err(|e| {
                    crate::error::Error::Corrupt(format!("task_results.created_at: {e}"))
                })?,
            })
        },
    )
    .transpose()
}

/// A `task_results` row as [`newest`] reads it.
type StoredResultRow = (
    Uuid,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
);
