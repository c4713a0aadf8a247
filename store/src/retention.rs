//! Retention: rows older than their table's retention are deleted, in small batches so a sweep
//! never holds many locks or one long transaction.
//!
//! Session events are the bulk (every callback); task results and Slack threads are one row per
//! task. Sessions and their mappings are kept: a conversation can always be continued, it only
//! replays fewer old events. Replicas may sweep at the same time: each batch takes only rows no
//! other sweep has locked.

use std::time::Duration;

use sqlx::PgPool;

use crate::error::Result;

/// Rows deleted per statement.
pub const DEFAULT_BATCH: i64 = 5000;

/// How long each kind of row is kept; `None` keeps it forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionPolicy {
    /// Session events (progress events and state updates), by when they were received.
    pub events: Option<Duration>,
    /// Task results and Slack threads, by when they last changed.
    pub results: Option<Duration>,
}

/// What one sweep deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Swept {
    /// Session events.
    pub events: u64,
    /// Task results.
    pub results: u64,
    /// Slack threads.
    pub slack_threads: u64,
}

/// One statement per table, deleting at most `$2` rows older than `$1` seconds.
const DELETE_EVENTS: &str = "with doomed as (
        select session_pk, seq from session_events
        where received_at < now() - make_interval(secs => $1)
        order by received_at limit $2 for update skip locked)
    delete from session_events e using doomed d
    where e.session_pk = d.session_pk and e.seq = d.seq";
const DELETE_RESULTS: &str = "with doomed as (
        select task_uid from task_results
        where updated_at < now() - make_interval(secs => $1)
        order by updated_at limit $2 for update skip locked)
    delete from task_results t using doomed d where t.task_uid = d.task_uid";
const DELETE_SLACK_THREADS: &str = "with doomed as (
        select task_uid from slack_threads
        where updated_at < now() - make_interval(secs => $1)
        order by updated_at limit $2 for update skip locked)
    delete from slack_threads t using doomed d where t.task_uid = d.task_uid";

/// Deletes every row older than `policy` allows, `batch` rows per statement.
pub async fn sweep(pool: &PgPool, policy: RetentionPolicy, batch: i64) -> Result<Swept> {
    let mut swept = Swept::default();
    if let Some(age) = policy.events {
        swept.events = delete_older(pool, DELETE_EVENTS, age, batch).await?;
    }
    if let Some(age) = policy.results {
        swept.results = delete_older(pool, DELETE_RESULTS, age, batch).await?;
        swept.slack_threads = delete_older(pool, DELETE_SLACK_THREADS, age, batch).await?;
    }
    Ok(swept)
}

async fn delete_older(
    pool: &PgPool,
    statement: &'static str,
    age: Duration,
    batch: i64,
) -> Result<u64> {
    let batch = batch.max(1);
    let mut total = 0;
    loop {
        let deleted = sqlx::query(statement)
            .bind(age.as_secs_f64())
            .bind(batch)
            .execute(pool)
            .await?
            .rows_affected();
        total += deleted;
        if deleted < u64::try_from(batch).unwrap_or(u64::MAX) {
            return Ok(total);
        }
    }
}
