//! The status mirror: a bounded summary of each task's progress in `DelegatedTask.status.progress`.
//!
//! Writes go through server-side apply with this API's own field manager, so they own only
//! `status.progress` and never fight the operator over other status fields. Each task is
//! written at most once per interval (about a second): handlers only mark a task dirty, and a
//! background loop writes the summary as committed in Postgres at that moment, so replicas that
//! saw different events still write the same, newest numbers.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use nubabel_contract::progress::{MAX_LAST_MESSAGE_CHARS, MAX_LAST_TOOL_CHARS};
use nubabel_contract::text::cut_chars;
use nubabel_crds::v1alpha1::{DelegatedTask, TaskProgress};
use nubabel_store::{
    events::{self, ProgressSummary},
    sessions::TaskRef,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::metrics::{Metrics, MirrorLabels};

/// The field manager of the callback API's status writes.
pub const FIELD_MANAGER: &str = "nubabel-callback-api";

/// Tasks tracked at once; marks beyond this are dropped (the next event marks again).
const MAX_TRACKED_TASKS: usize = 10_000;

/// Tasks without events for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(120);

/// What a status write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The status was written.
    Written,
    /// The task no longer exists; nothing to do.
    TaskGone,
    /// The write failed; it is retried after the interval.
    Failed,
}

/// Writes one task's `status.progress`.
pub trait StatusWriter: Send + Sync + 'static {
    /// Writes `progress` into the status of `task`.
    fn write(
        &self,
        task: &TaskRef,
        progress: &TaskProgress,
    ) -> impl Future<Output = WriteOutcome> + Send;
}

/// Writes through the Kubernetes API with server-side apply.
#[derive(Clone)]
pub struct KubeStatusWriter {
    client: Client,
}

impl KubeStatusWriter {
    /// Writes with `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

/// The apply patch that sets only `status.progress`.
pub fn progress_patch(progress: &TaskProgress) -> Value {
    json!({
        "apiVersion": "nubabel.io/v1alpha1",
        "kind": "DelegatedTask",
        "status": { "progress": progress },
    })
}

impl StatusWriter for KubeStatusWriter {
    async fn write(&self, task: &TaskRef, progress: &TaskProgress) -> WriteOutcome {
        let api: Api<DelegatedTask> = Api::namespaced(self.client.clone(), &task.namespace);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&task.name, &params, &Patch::Apply(progress_patch(progress)))
            .await
        {
            Ok(_) => WriteOutcome::Written,
            Err(kube::Error::Api(status)) if status.code == 404 => WriteOutcome::TaskGone,
            Err(error) => {
                tracing::warn!(namespace = %task.namespace, task = %task.name, error = %error, "writing task progress failed");
                WriteOutcome::Failed
            }
        }
    }
}

/// The summary as the CRD holds it, every string bounded.
pub fn task_progress(summary: &ProgressSummary) -> TaskProgress {
    TaskProgress {
        events: summary.events,
        tools_started: summary.tools_started,
        tools_completed: summary.tools_completed,
        last_tool: summary
            .last_tool
            .as_deref()
            .map(|t| cut_chars(t, MAX_LAST_TOOL_CHARS)),
        last_event_time: summary.last_event_at.map(Time),
        last_message: summary
            .last_message
            .as_deref()
            .map(|m| cut_chars(m, MAX_LAST_MESSAGE_CHARS)),
    }
}

/// Coalesces progress writes per task. Cheap to clone.
pub struct StatusMirror<W> {
    inner: Arc<Inner<W>>,
}

impl<W> Clone for StatusMirror<W> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<W> std::fmt::Debug for StatusMirror<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusMirror").finish_non_exhaustive()
    }
}

struct Inner<W> {
    db: PgPool,
    writer: W,
    metrics: Arc<Metrics>,
    interval: Duration,
    tasks: Mutex<HashMap<TaskRef, Tracked>>,
    dirty: Notify,
}

struct Tracked {
    session_pk: Uuid,
    dirty: bool,
    last_write: Option<Instant>,
    last_mark: Instant,
}

impl<W: StatusWriter> StatusMirror<W> {
    /// Starts the write loop; it stops when the last clone is dropped.
    pub fn start(db: PgPool, writer: W, metrics: Arc<Metrics>, interval: Duration) -> Self {
        let inner = Arc::new(Inner {
            db,
            writer,
            metrics,
            interval,
            tasks: Mutex::new(HashMap::new()),
            dirty: Notify::new(),
        });
        tokio::spawn(write_loop(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Notes that `task` (served by `session_pk`) has new progress.
    pub fn mark(&self, task: TaskRef, session_pk: Uuid) {
        let mut tasks = lock(&self.inner.tasks);
        if tasks.len() >= MAX_TRACKED_TASKS && !tasks.contains_key(&task) {
            return;
        }
        let tracked = tasks.entry(task).or_insert(Tracked {
            session_pk,
            dirty: false,
            last_write: None,
            last_mark: Instant::now(),
        });
        tracked.session_pk = session_pk;
        tracked.dirty = true;
        tracked.last_mark = Instant::now();
        drop(tasks);
        self.inner.dirty.notify_one();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each update is a single field write, so a poisoned map is still consistent.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<W: StatusWriter> Inner<W> {
    /// Tasks that are dirty and were not written within the interval; marks them written.
    fn take_due(&self) -> (Vec<(TaskRef, Uuid)>, Option<Duration>) {
        let now = Instant::now();
        let mut tasks = lock(&self.tasks);
        tasks.retain(|_, t| t.dirty || now.duration_since(t.last_mark) < FORGET_AFTER);
        let mut due = Vec::new();
        let mut next_wake: Option<Duration> = None;
        for (task, tracked) in tasks.iter_mut().filter(|(_, t)| t.dirty) {
            let wait = tracked.last_write.map_or(Duration::ZERO, |at| {
                self.interval.saturating_sub(now.duration_since(at))
            });
            if wait.is_zero() {
                tracked.dirty = false;
                tracked.last_write = Some(now);
                due.push((task.clone(), tracked.session_pk));
            } else {
                next_wake = Some(next_wake.map_or(wait, |w| w.min(wait)));
            }
        }
        (due, next_wake)
    }

    async fn flush(&self, task: TaskRef, session_pk: Uuid) {
        let summary = match events::progress_summary(&self.db, session_pk).await {
            // The session moved on to another task, which gets its own writes.
            Ok(Some((current, summary))) if current == task => summary,
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(error = %error, "reading task progress failed");
                self.remark(&task);
                return;
            }
        };
        let outcome = self.writer.write(&task, &task_progress(&summary)).await;
        let result = match outcome {
            WriteOutcome::Written => "written",
            WriteOutcome::TaskGone => "task_gone",
            WriteOutcome::Failed => {
                self.remark(&task);
                "failed"
            }
        };
        self.metrics
            .status_writes
            .get_or_create(&MirrorLabels { result })
            .inc();
    }

    fn remark(&self, task: &TaskRef) {
        if let Some(tracked) = lock(&self.tasks).get_mut(task) {
            tracked.dirty = true;
        }
    }
}

async fn write_loop<W: StatusWriter>(inner: Weak<Inner<W>>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let (due, next_wake) = inner.take_due();
        for (task, session_pk) in due {
            inner.flush(task, session_pk).await;
        }
        // Sleep until the next task is due, a new mark arrives, or a second passes (to notice
        // shutdown).
        let wait = next_wake
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let _ = tokio::time::timeout(wait, inner.dirty.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use kube::client::Body;

    use super::*;

    fn summary() -> ProgressSummary {
        ProgressSummary {
            events: 7,
            tools_started: 3,
            tools_completed: 2,
            last_tool: Some("bash".into()),
            last_message: Some("x".repeat(1000)),
            last_event_at: Some(jiff::Timestamp::from_second(1_800_000_000).unwrap()),
        }
    }

    #[test]
    fn the_patch_sets_only_status_progress_with_crd_field_names_and_bounded_text() {
        let patch = progress_patch(&task_progress(&summary()));
        assert_eq!(patch["apiVersion"], "nubabel.io/v1alpha1");
        assert_eq!(patch["kind"], "DelegatedTask");
        let status = patch["status"].as_object().unwrap();
        assert_eq!(status.keys().collect::<Vec<_>>(), ["progress"]);
        let progress = &status["progress"];
        assert_eq!(progress["events"], 7);
        assert_eq!(progress["toolsStarted"], 3);
        assert_eq!(progress["toolsCompleted"], 2);
        assert_eq!(progress["lastTool"], "bash");
        assert_eq!(progress["lastEventTime"], "2027-01-15T08:00:00Z");
        assert_eq!(
            progress["lastMessage"].as_str().unwrap().chars().count(),
            MAX_LAST_MESSAGE_CHARS
        );
    }

    #[tokio::test]
    async fn kube_writer_applies_the_status_subresource_with_its_own_field_manager() {
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let writer = KubeStatusWriter::new(Client::new(service, "default"));
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("one request");
            let uri = request.uri().to_string();
            let method = request.method().clone();
            let content_type = request.headers()[http::header::CONTENT_TYPE].clone();
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let response = serde_json::to_vec(&json!({
                "apiVersion": "nubabel.io/v1alpha1", "kind": "DelegatedTask",
                "metadata": {"name": "task-1", "namespace": "tenant-a"},
                "spec": {"organizationId": "org-a", "prompt": "hi"}
            }))
            .unwrap();
            send.send_response(
                http::Response::builder()
                    .body(Body::from(response))
                    .unwrap(),
            );
            (method, uri, content_type, body)
        });
        let task = TaskRef::new("tenant-a", "task-1").unwrap();
        let outcome = writer.write(&task, &task_progress(&summary())).await;
        let (method, uri, content_type, body) = server.await.unwrap();
        assert_eq!(outcome, WriteOutcome::Written);
        assert_eq!(method, http::Method::PATCH);
        assert!(
            uri.starts_with(
                "/apis/nubabel.io/v1alpha1/namespaces/tenant-a/delegatedtasks/task-1/status?"
            ),
            "{uri}"
        );
        assert!(
            uri.contains("fieldManager=nubabel-callback-api") && uri.contains("force=true"),
            "{uri}"
        );
        assert_eq!(content_type, "application/apply-patch+yaml");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["status"]["progress"]["toolsStarted"], 3);
    }

    #[tokio::test]
    async fn kube_writer_reports_a_deleted_task_as_gone() {
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let writer = KubeStatusWriter::new(Client::new(service, "default"));
        tokio::spawn(async move {
            let (_, send) = handle.next_request().await.expect("one request");
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "not found", "reason": "NotFound", "code": 404});
            send.send_response(
                http::Response::builder()
                    .status(404)
                    .body(Body::from(serde_json::to_vec(&status).unwrap()))
                    .unwrap(),
            );
        });
        let task = TaskRef::new("tenant-a", "gone").unwrap();
        assert_eq!(
            writer.write(&task, &task_progress(&summary())).await,
            WriteOutcome::TaskGone
        );
    }
}
