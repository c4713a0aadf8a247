//! The Slack bot's shared state: accepted event ids (Slack retries events, and any replica may
//! get the retry), the channels each tenant's workspace was seen in and, per task that reports
//! to a Slack thread, its acknowledgement message, the last progress shown and the claim on the
//! final answer.
//!
//! Every decision that must happen once across replicas is a single conditional statement
//! here, so Postgres decides who wins.

use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::Result;

/// Records Slack event `event_id`; false when it was recorded before (a retry or a duplicate).
pub async fn record_event(pool: &PgPool, event_id: &str, team_id: &str) -> Result<bool> {
    let inserted = sqlx::query(
        "insert into slack_events (event_id, team_id) values ($1, $2)
         on conflict (event_id) do nothing",
    )
    .bind(event_id)
    .bind(team_id)
    .execute(pool)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Forgets event ids older than `max_age_seconds` (Slack stops retrying after about an hour).
pub async fn forget_events_older_than(pool: &PgPool, max_age_seconds: i64) -> Result<u64> {
    let deleted = sqlx::query(
        "delete from slack_events where created_at < now() - make_interval(secs => $1)",
    )
    .bind(max_age_seconds as f64)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}

/// Records that a verified event of team `team_id`, mapped to organization `organization_id`,
/// came from `channel`: from now on that tenant's tasks may report there.
pub async fn record_channel(
    pool: &PgPool,
    organization_id: &str,
    team_id: &str,
    channel: &str,
) -> Result<()> {
    sqlx::query(
        "insert into slack_channels (organization_id, team_id, channel) values ($1, $2, $3)
         on conflict do nothing",
    )
    .bind(organization_id)
    .bind(team_id)
    .bind(channel)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether a verified event of one of `team_ids`, mapped to `organization_id`, ever came from
/// `channel`.
pub async fn channel_seen(
    pool: &PgPool,
    organization_id: &str,
    team_ids: &[String],
    channel: &str,
) -> Result<bool> {
    let seen: bool = sqlx::query_scalar(
        "select exists (select 1 from slack_channels
                        where organization_id = $1 and team_id = any($2) and channel = $3)",
    )
    .bind(organization_id)
    .bind(team_ids)
    .bind(channel)
    .fetch_one(pool)
    .await?;
    Ok(seen)
}

/// A task reporting to a Slack thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlackThread {
    /// The task's `metadata.uid`.
    pub task_uid: Uuid,
    /// Slack channel id.
    pub channel: String,
    /// The thread's first message, if the task names one.
    pub thread_ts: Option<String>,
    /// The bot's acknowledgement message, once posted.
    pub ack_ts: Option<String>,
    /// Whether the channel was refused (its tenant was never seen there): nothing is posted.
    pub refused: bool,
}

/// Where a task reports.
#[derive(Debug, Clone, Copy)]
pub struct NewThread<'a> {
    /// The task's `metadata.uid`.
    pub task_uid: Uuid,
    /// The task's namespace.
    pub task_namespace: &'a str,
    /// The task's name.
    pub task_name: &'a str,
    /// Slack channel id.
    pub channel: &'a str,
    /// The thread's first message.
    pub thread_ts: Option<&'a str>,
    /// Whether the channel is refused: the row then only records that the refusal was
    /// reported.
    pub refused: bool,
}

/// Claims the acknowledgement of a task: true for exactly one caller, who then posts it and
/// records its timestamp with [`record_ack`] (or, for a refused channel, reports the refusal).
pub async fn claim_ack(pool: &PgPool, thread: &NewThread<'_>) -> Result<bool> {
    let inserted = sqlx::query(
        "insert into slack_threads
             (task_uid, task_namespace, task_name, channel, thread_ts, refused_at)
         values ($1, $2, $3, $4, $5, case when $6 then now() end)
         on conflict (task_uid) do nothing",
    )
    .bind(thread.task_uid)
    .bind(thread.task_namespace)
    .bind(thread.task_name)
    .bind(thread.channel)
    .bind(thread.thread_ts)
    .bind(thread.refused)
    .execute(pool)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Records the acknowledgement message's timestamp (and the thread it started, if any).
pub async fn record_ack(
    pool: &PgPool,
    task_uid: Uuid,
    ack_ts: &str,
    thread_ts: &str,
) -> Result<()> {
    sqlx::query(
        "update slack_threads set ack_ts = $2, thread_ts = coalesce(thread_ts, $3)
         where task_uid = $1",
    )
    .bind(task_uid)
    .bind(ack_ts)
    .bind(thread_ts)
    .execute(pool)
    .await?;
    Ok(())
}

/// The thread of task `task_uid`, if it has one.
pub async fn thread(pool: &PgPool, task_uid: Uuid) -> Result<Option<SlackThread>> {
    let row = sqlx::query(
        "select task_uid, channel, thread_ts, ack_ts, refused_at is not null as refused
         from slack_threads where task_uid = $1",
    )
    .bind(task_uid)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| SlackThread {
        task_uid: row.get("task_uid"),
        channel: row.get("channel"),
        thread_ts: row.get("thread_ts"),
        ack_ts: row.get("ack_ts"),
        refused: row.get("refused"),
    }))
}

/// Claims the next progress edit of a task's acknowledgement: true when `text` differs from
/// what was last shown and the last edit is at least `min_interval_ms` old, for exactly one
/// caller. The final answer's claim stops further edits.
pub async fn claim_progress(
    pool: &PgPool,
    task_uid: Uuid,
    text: &str,
    min_interval_ms: i64,
) -> Result<bool> {
    let claimed = sqlx::query(
        "update slack_threads set progress_text = $2, progress_at = now()
         where task_uid = $1 and ack_ts is not null and final_claimed_at is null
           and progress_text is distinct from $2
           and (progress_at is null
                or progress_at <= now() - make_interval(secs => $3::float8 / 1000))",
    )
    .bind(task_uid)
    .bind(text)
    .bind(min_interval_ms as f64)
    .execute(pool)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// Forgets the progress text claimed last (its edit did not reach Slack), keeping the time,
/// so the next claim shows it again no sooner than the interval allows.
pub async fn unclaim_progress(pool: &PgPool, task_uid: Uuid) -> Result<()> {
    sqlx::query("update slack_threads set progress_text = null where task_uid = $1")
        .bind(task_uid)
        .execute(pool)
        .await?;
    Ok(())
}

/// Claims the final answer of a task: true for exactly one caller. A claim older than
/// `stale_after_seconds` without a posted answer (its replica died) may be taken over.
pub async fn claim_final(pool: &PgPool, task_uid: Uuid, stale_after_seconds: i64) -> Result<bool> {
    let claimed = sqlx::query(
        "update slack_threads set final_claimed_at = now()
         where task_uid = $1 and final_posted_at is null
           and (final_claimed_at is null
                or final_claimed_at < now() - make_interval(secs => $2::float8))",
    )
    .bind(task_uid)
    .bind(stale_after_seconds as f64)
    .execute(pool)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// Tasks whose final answer was claimed more than `stale_after_seconds` ago and never posted
/// (the replica holding the claim stopped): `(task uid, namespace, name)`, oldest claim first.
pub async fn stale_finals(
    pool: &PgPool,
    stale_after_seconds: i64,
    limit: i64,
) -> Result<Vec<(Uuid, String, String)>> {
    let rows = sqlx::query(
        "select task_uid, task_namespace, task_name from slack_threads
         where final_posted_at is null
           and final_claimed_at < now() - make_interval(secs => $1::float8)
         order by final_claimed_at
         limit $2",
    )
    .bind(stale_after_seconds as f64)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("task_uid")?,
                row.try_get("task_namespace")?,
                row.try_get("task_name")?,
            ))
        })
        .collect()
}

/// How many messages of the final answer of task `task_uid` were posted so far.
pub async fn final_parts_posted(pool: &PgPool, task_uid: Uuid) -> Result<usize> {
    let posted: Option<i32> =
        sqlx::query_scalar("select final_parts_posted from slack_threads where task_uid = $1")
            .bind(task_uid)
            .fetch_optional(pool)
            .await?;
    Ok(posted.map_or(0, |n| usize::try_from(n).unwrap_or(0)))
}

/// Records that the first `parts` messages of the final answer are posted.
pub async fn record_final_parts(pool: &PgPool, task_uid: Uuid, parts: usize) -> Result<()> {
    sqlx::query(
        "update slack_threads set final_parts_posted = greatest(final_parts_posted, $2)
         where task_uid = $1",
    )
    .bind(task_uid)
    .bind(i32::try_from(parts).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(())
}

/// Records that the final answer was posted.
pub async fn record_final(pool: &PgPool, task_uid: Uuid) -> Result<()> {
    sqlx::query("update slack_threads set final_posted_at = now() where task_uid = $1")
        .bind(task_uid)
        .execute(pool)
        .await?;
    Ok(())
}

/// Gives up a final claim whose posting failed, so a later attempt (on any replica) retries.
pub async fn release_final(pool: &PgPool, task_uid: Uuid) -> Result<()> {
    sqlx::query(
        "update slack_threads set final_claimed_at = null
         where task_uid = $1 and final_posted_at is null",
    )
    .bind(task_uid)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether the final answer of task `task_uid` was posted.
pub async fn final_posted(pool: &PgPool, task_uid: Uuid) -> Result<bool> {
    let posted: Option<bool> = sqlx::query_scalar(
        "select final_posted_at is not null from slack_threads where task_uid = $1",
    )
    .bind(task_uid)
    .fetch_optional(pool)
    .await?;
    Ok(posted.unwrap_or(false))
}
