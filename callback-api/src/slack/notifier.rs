//! Watches the DelegatedTasks of the Slack-mapped namespaces and tells their Slack threads
//! what happens: an acknowledgement when a task appears, edits of it as `status.progress`
//! changes (which the status mirror keeps current), and the answer when the task ends.
//!
//! Every replica watches; Postgres claims decide which replica posts the acknowledgement,
//! each progress edit (at most one per interval per message, the latest state trailing) and
//! the final answer, so each appears once.
//!
//! A task reports only to a channel its tenant was seen in: a verified Slack event from a team
//! mapped to the task's organization and namespace named that channel. Any other channel is
//! refused once per task, by whichever replica claims it, with a Warning event on the task, a
//! log line and `nubabel_callback_api_slack_channels_refused_total`; nothing is posted there.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use nubabel_crds::v1alpha1::{DelegatedTask, SlackTarget, TaskPhase};
use nubabel_store::slack::{self as store, NewThread, SlackThread};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{SlackBot, SlackError, text};
use crate::metrics::Metrics;

/// Reason of the Warning event on a task whose Slack channel is refused.
pub const CHANNEL_NOT_SEEN_REASON: &str = "SlackChannelNotSeen";
/// The controller name on the events the notifier publishes.
const REPORTING_CONTROLLER: &str = "nubabel-callback-api";

/// Tasks that ended longer ago than this without a thread record are not announced (they
/// ended before the bot knew them, e.g. on a fresh database).
const ANNOUNCE_ENDED_WITHIN_SECONDS: i64 = 900;
/// A final claim older than this whose answer never got posted may be taken over.
const FINAL_CLAIM_STALE_SECONDS: i64 = 300;
/// Event ids are kept this long (Slack retries for about an hour at most).
const EVENT_ID_RETENTION_SECONDS: i64 = 24 * 3600;
/// Stale final claims handled per sweep.
const SWEEP_BATCH: i64 = 100;
/// Attempts per message when Slack rate-limits or fails.
const POST_ATTEMPTS: u32 = 5;
/// Pauses between attempts to post a final answer whose posting failed (each attempt already
/// retries rate limits and transport errors [`POST_ATTEMPTS`] times).
const FINAL_RETRY_DELAYS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

/// The notifier of one replica. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    bot: Arc<SlackBot>,
    db: PgPool,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    /// Latest progress text per task waiting for its interval to pass, and whether a timer runs.
    trailing: Mutex<HashMap<Uuid, Trailing>>,
}

struct Trailing {
    text: String,
    channel: String,
    ack_ts: String,
}

impl Notifier {
    /// A notifier posting with `bot`, claiming in `db`, counting in `metrics` and reporting
    /// refused channels on the tasks through `client`.
    pub fn new(bot: Arc<SlackBot>, db: PgPool, metrics: Arc<Metrics>, client: &Client) -> Self {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.to_owned(),
            instance: std::env::var("HOSTNAME").ok(),
        };
        Self {
            inner: Arc::new(Inner {
                bot,
                db,
                metrics,
                recorder: Recorder::new(client.clone(), reporter),
                trailing: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Starts one watch per mapped namespace, and the cleanup of old event ids; abort the
    /// handles to stop.
    pub fn start(&self, client: &Client) -> Vec<JoinHandle<()>> {
        let mut handles: Vec<JoinHandle<()>> = self
            .inner
            .bot
            .namespaces()
            .into_iter()
            .map(|namespace| {
                let api: Api<DelegatedTask> = Api::namespaced(client.clone(), &namespace);
                let notifier = self.clone();
                tokio::spawn(async move { notifier.watch(api, namespace).await })
            })
            .collect();
        let notifier = self.clone();
        let tasks = client.clone();
        handles.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(notifier.inner.bot.final_sweep_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(error) = notifier.sweep_stale_finals(&tasks).await {
                    tracing::warn!(error = %error, "looking for stale slack answers failed");
                }
            }
        }));
        let db = self.inner.db.clone();
        handles.push(tokio::spawn(async move {
            loop {
                if let Err(error) =
                    store::forget_events_older_than(&db, EVENT_ID_RETENTION_SECONDS).await
                {
                    tracing::warn!(error = %error, "forgetting old slack event ids failed");
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }));
        handles
    }

    async fn watch(&self, api: Api<DelegatedTask>, namespace: String) {
        let mut tasks = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(item) = tasks.next().await {
            match item {
                Ok(task) => self.on_task(task).await,
                Err(error) => {
                    tracing::warn!(%namespace, error = %error, "watching tasks for slack failed; retrying");
                }
            }
        }
    }

    /// Posts the answers a stopped replica claimed but never posted. Watch events come only
    /// when a task changes, and a finished task seldom changes again, so without this sweep
    /// such an answer would wait for the next restart of a replica.
    async fn sweep_stale_finals(&self, client: &Client) -> anyhow::Result<()> {
        let stale =
            store::stale_finals(&self.inner.db, FINAL_CLAIM_STALE_SECONDS, SWEEP_BATCH).await?;
        for (uid, namespace, name) in stale {
            let api: Api<DelegatedTask> = Api::namespaced(client.clone(), &namespace);
            match api.get_opt(&name).await {
                Ok(Some(task)) if task.uid().as_deref() == Some(uid.to_string().as_str()) => {
                    tracing::info!(%namespace, task = %name, "taking over a stale slack answer");
                    self.on_task(task).await;
                }
                // The task is gone: its answer cannot be rebuilt, so stop looking for it.
                Ok(_) => store::release_final(&self.inner.db, uid).await?,
                // One unreadable task (e.g. a namespace no longer served) does not hold up the
                // others; it is looked at again next sweep.
                Err(error) => {
                    tracing::warn!(%namespace, task = %name, %error, "reading a task with a stale slack answer failed");
                }
            }
        }
        Ok(())
    }

    /// Handles one observed state of a task.
    pub async fn on_task(&self, task: DelegatedTask) {
        let Some(target) = task.spec.notify.as_ref().and_then(|n| n.slack.clone()) else {
            return;
        };
        let Some(uid) = task.uid().and_then(|u| u.parse::<Uuid>().ok()) else {
            return;
        };
        if let Err(error) = self.notify(&task, uid, &target).await {
            tracing::warn!(task = %task.name_any(), error = %error, "notifying slack failed");
        }
    }

    async fn notify(
        &self,
        task: &DelegatedTask,
        uid: Uuid,
        target: &SlackTarget,
    ) -> anyhow::Result<()> {
        let db = &self.inner.db;
        let phase = task.status.as_ref().and_then(|s| s.phase);
        let finished = phase.is_some_and(TaskPhase::is_finished);
        let mut thread = store::thread(db, uid).await?;
        if thread.is_none() {
            if finished && ended_long_ago(task) {
                return Ok(());
            }
            let namespace = task.namespace().unwrap_or_default();
            let name = task.name_any();
            let refused = !self.channel_allowed(task, &namespace, target).await?;
            let new = NewThread {
                task_uid: uid,
                task_namespace: &namespace,
                task_name: &name,
                channel: &target.channel,
                thread_ts: target.thread_ts.as_deref(),
                refused,
            };
            if store::claim_ack(db, &new).await? {
                if refused {
                    self.report_refusal(task, &namespace, target).await;
                    return Ok(());
                }
                if !finished {
                    self.acknowledge(task, uid, target).await?;
                }
            }
            thread = store::thread(db, uid).await?;
        }
        let Some(thread) = thread else {
            return Ok(());
        };
        if thread.refused {
            return Ok(());
        }
        if finished {
            let notifier = self.clone();
            let task = task.clone();
            tokio::spawn(async move {
                // A failed answer is tried again later, not only on the task's next change.
                for (attempt, delay) in FINAL_RETRY_DELAYS.iter().enumerate() {
                    match notifier.finish(&task, uid, &thread).await {
                        Ok(()) => return,
                        Err(error) => tracing::warn!(
                            task = %task.name_any(),
                            error = %error,
                            attempt = attempt + 1,
                            retry_in_seconds = delay.as_secs(),
                            "posting the answer to slack failed"
                        ),
                    }
                    tokio::time::sleep(*delay).await;
                }
                if let Err(error) = notifier.finish(&task, uid, &thread).await {
                    tracing::error!(task = %task.name_any(), error = %error, "posting the answer to slack failed; giving up until the task changes");
                }
            });
        } else {
            self.progress(task, uid, &thread).await?;
        }
        Ok(())
    }

    /// Whether the tenant of `task` (its organization in `namespace`) was seen in the
    /// channel it names, through a team mapped to that tenant.
    async fn channel_allowed(
        &self,
        task: &DelegatedTask,
        namespace: &str,
        target: &SlackTarget,
    ) -> anyhow::Result<bool> {
        let organization = &task.spec.organization_id;
        let teams = self.inner.bot.teams_serving(organization, namespace);
        if teams.is_empty() {
            return Ok(false);
        }
        Ok(store::channel_seen(&self.inner.db, organization, &teams, &target.channel).await?)
    }

    /// Says, on the task, in the log and in the metrics, that its channel was refused.
    async fn report_refusal(&self, task: &DelegatedTask, namespace: &str, target: &SlackTarget) {
        self.inner.metrics.slack_channels_refused.inc();
        tracing::warn!(
            %namespace,
            task = %task.name_any(),
            organization = %task.spec.organization_id,
            channel = %target.channel,
            "a task names a slack channel its tenant's workspace was never seen in; nothing is posted there"
        );
        let event = Event {
            type_: EventType::Warning,
            reason: CHANNEL_NOT_SEEN_REASON.to_owned(),
            note: Some(format!(
                "No message goes to Slack channel {}: the bot has never been addressed there from a workspace mapped to organization {} in this namespace. Mention the bot in that channel first, or name a channel it was mentioned in.",
                target.channel, task.spec.organization_id
            )),
            action: "NotifySlack".to_owned(),
            secondary: None,
        };
        if let Err(error) = self
            .inner
            .recorder
            .publish(&event, &task.object_ref(&()))
            .await
        {
            tracing::warn!(%error, "publishing the refused-channel event failed");
        }
    }

    async fn acknowledge(
        &self,
        task: &DelegatedTask,
        uid: Uuid,
        target: &SlackTarget,
    ) -> anyhow::Result<()> {
        let message = text::acknowledgement(&task.name_any());
        let ts = self
            .with_retries(|| {
                self.inner.bot.client.post_message(
                    &target.channel,
                    target.thread_ts.as_deref(),
                    &message,
                )
            })
            .await?;
        let thread_ts = target.thread_ts.clone().unwrap_or_else(|| ts.clone());
        store::record_ack(&self.inner.db, uid, &ts, &thread_ts).await?;
        Ok(())
    }

    async fn progress(
        &self,
        task: &DelegatedTask,
        uid: Uuid,
        thread: &SlackThread,
    ) -> anyhow::Result<()> {
        let Some(ack_ts) = thread.ack_ts.clone() else {
            return Ok(());
        };
        // Until the operator picks the task up, the acknowledgement says all there is.
        if task
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_none_or(|p| p == TaskPhase::Pending)
        {
            return Ok(());
        }
        let line = text::progress(task);
        let pending = Trailing {
            text: line,
            channel: thread.channel.clone(),
            ack_ts,
        };
        self.edit_or_defer(uid, pending).await
    }

    /// Edits the acknowledgement now if the interval allows, else remembers the text and edits
    /// it when the interval has passed (the newest text wins).
    async fn edit_or_defer(&self, uid: Uuid, pending: Trailing) -> anyhow::Result<()> {
        let interval = self.inner.bot.progress_interval;
        let interval_ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
        if self.inner.bot.client.blocked_for().is_none()
            && store::claim_progress(&self.inner.db, uid, &pending.text, interval_ms).await?
        {
            match self
                .inner
                .bot
                .client
                .update_message(&pending.channel, &pending.ack_ts, &pending.text)
                .await
            {
                Ok(()) => return Ok(()),
                Err(SlackError::RateLimited(_)) => {
                    store::unclaim_progress(&self.inner.db, uid).await?;
                }
                Err(error) => {
                    store::unclaim_progress(&self.inner.db, uid).await?;
                    return Err(error.into());
                }
            }
        }
        let schedule = {
            let mut trailing = lock(&self.inner.trailing);
            let first = !trailing.contains_key(&uid);
            trailing.insert(uid, pending);
            first
        };
        if schedule {
            let notifier = self.clone();
            tokio::spawn(async move {
                let wait = notifier
                    .inner
                    .bot
                    .client
                    .blocked_for()
                    .unwrap_or_default()
                    .max(interval);
                tokio::time::sleep(wait).await;
                let Some(pending) = lock(&notifier.inner.trailing).remove(&uid) else {
                    return;
                };
                match store::claim_progress(&notifier.inner.db, uid, &pending.text, interval_ms)
                    .await
                {
                    Ok(true) => {
                        if let Err(error) = notifier
                            .inner
                            .bot
                            .client
                            .update_message(&pending.channel, &pending.ack_ts, &pending.text)
                            .await
                        {
                            // The next status change shows it again.
                            tracing::debug!(error = %error, "a deferred progress edit failed");
                            let _ = store::unclaim_progress(&notifier.inner.db, uid).await;
                        }
                    }
                    Ok(false) => {}
                    Err(error) => tracing::warn!(error = %error, "claiming a progress edit failed"),
                }
            });
        }
        Ok(())
    }

    async fn finish(
        &self,
        task: &DelegatedTask,
        uid: Uuid,
        thread: &SlackThread,
    ) -> anyhow::Result<()> {
        let db = &self.inner.db;
        if store::final_posted(db, uid).await?
            || !store::claim_final(db, uid, FINAL_CLAIM_STALE_SECONDS).await?
        {
            return Ok(());
        }
        lock(&self.inner.trailing).remove(&uid);
        let output = match nubabel_store::results::output(db, uid).await {
            Ok(Some(output)) => Some(output),
            _ => task.status.as_ref().and_then(|s| s.output.clone()),
        };
        let thread_ts = thread.thread_ts.clone().or_else(|| thread.ack_ts.clone());
        // A long answer takes several messages; after a failure the next attempt posts only
        // the ones the thread does not show yet.
        let already = store::final_parts_posted(db, uid).await?;
        let posted = async {
            let messages = text::final_messages(task, output.as_deref());
            for (index, message) in messages.iter().enumerate().skip(already) {
                self.with_retries(|| {
                    self.inner.bot.client.post_message(
                        &thread.channel,
                        thread_ts.as_deref(),
                        message,
                    )
                })
                .await?;
                store::record_final_parts(db, uid, index + 1).await?;
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(error) = posted {
            store::release_final(db, uid).await?;
            return Err(error);
        }
        store::record_final(db, uid).await?;
        if let Some(ack_ts) = &thread.ack_ts {
            let ended = text::ended(task);
            if let Err(error) = self
                .with_retries(|| {
                    self.inner
                        .bot
                        .client
                        .update_message(&thread.channel, ack_ts, &ended)
                })
                .await
            {
                tracing::debug!(error = %error, "marking the acknowledgement done failed");
            }
        }
        tracing::info!(task = %task.name_any(), "answer posted to slack");
        Ok(())
    }

    /// Runs `call`, waiting out rate limits and retrying transient failures.
    async fn with_retries<T, F, Fut>(&self, mut call: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SlackError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match call().await {
                Ok(value) => return Ok(value),
                Err(SlackError::RateLimited(wait)) if attempt < POST_ATTEMPTS => {
                    tokio::time::sleep(wait).await;
                }
                Err(SlackError::Transport(_)) if attempt < POST_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

fn ended_long_ago(task: &DelegatedTask) -> bool {
    let completed = task
        .status
        .as_ref()
        .and_then(|s| s.completion_time.as_ref())
        .map(|t| t.0.as_second());
    completed.is_some_and(|at| crate::auth::unix_now() - at > ANNOUNCE_ENDED_WITHIN_SECONDS)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Updates are single map operations, so a poisoned map is still consistent.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
