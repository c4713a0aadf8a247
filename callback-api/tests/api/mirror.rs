//! The status mirror writes the committed summary, at most about once per interval per task.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use nubabel_callback_api::{
    metrics::Metrics,
    mirror::{StatusMirror, StatusWriter, WriteOutcome},
};
use nubabel_crds::v1alpha1::TaskProgress;
use nubabel_store::{
    events::{self, Appended, EventPayload, NewEvent},
    sessions::TaskRef,
};
use serde_json::json;

use crate::helpers::{opencode_session_id, sidecar, spawn_app, unique};

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(Instant, TaskRef, TaskProgress)>>>);

impl StatusWriter for Recorder {
    async fn write(&self, task: &TaskRef, progress: &TaskProgress) -> WriteOutcome {
        self.0
            .lock()
            .unwrap()
            .push((Instant::now(), task.clone(), progress.clone()));
        WriteOutcome::Written
    }
}

#[tokio::test]
async fn a_burst_of_progress_becomes_one_write_per_interval_with_the_newest_summary() -> Result<()>
{
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let task = mapping.task.clone().expect("task");
    let recorder = Recorder::default();
    let mirror = StatusMirror::start(
        app.db.clone(),
        recorder.clone(),
        Arc::new(Metrics::new()),
        Duration::from_millis(500),
    );

    let started = Instant::now();
    for i in 0..40 {
        let body = json!({"type": if i % 2 == 0 { "tool_execute_start" } else { "tool_execute_end" }, "tool": "bash"});
        let raw = serde_json::to_vec(&body)?;
        let id = unique("msg");
        let event = NewEvent {
            session_pk: mapping.session_pk,
            organization_id: tenant.organization_id(),
            event_id: &id,
            payload: EventPayload::Progress {
                event_type: body["type"].as_str().unwrap_or_default(),
                progress: &body,
            },
            raw_body: &raw,
        };
        assert!(matches!(
            events::append(&app.db, &event).await?,
            Appended::New(_)
        ));
        mirror.mark(task.clone(), mapping.session_pk);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let burst = started.elapsed();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let writes = recorder.0.lock().unwrap().clone();
    // One write per 500 ms interval (plus the first, immediate one), never one per event.
    let allowed = usize::try_from(burst.as_millis() / 500)? + 2;
    assert!(
        writes.len() >= 2 && writes.len() <= allowed,
        "{} writes in {burst:?}",
        writes.len()
    );
    for pair in writes.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= Duration::from_millis(450),
            "writes too close together"
        );
    }
    let (_, written_task, last) = writes.last().expect("a write").clone();
    assert_eq!(written_task, task);
    assert_eq!(
        (last.events, last.tools_started, last.tools_completed),
        (40, 20, 20)
    );
    assert_eq!(last.last_tool.as_deref(), Some("bash"));
    assert!(last.last_event_time.is_some());
    Ok(())
}

#[tokio::test]
async fn a_new_task_on_the_same_session_starts_its_summary_from_zero() -> Result<()> {
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let response = app
        .callback(
            &tenant,
            &mapping.session_id,
            "progress",
            &unique("msg"),
            &crate::helpers::progress(0),
        )
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let (_, before) = events::progress_summary(&app.db, mapping.session_pk)
        .await?
        .expect("summary");
    assert_eq!(before.events, 1);

    let next_task = TaskRef::new(tenant.namespace(), "follow-up")?;
    nubabel_store::sessions::SessionMappings::new(app.db.clone())
        .record(&nubabel_store::sessions::NewMapping {
            sidecar: &tenant,
            session_id: &mapping.session_id,
            opencode_session_id: &mapping.opencode_session_id,
            pod_name: "fleet-0",
            task: Some(&next_task),
        })
        .await?;

    let (task, after) = events::progress_summary(&app.db, mapping.session_pk)
        .await?
        .expect("summary");
    assert_eq!(task, next_task);
    assert_eq!(
        (after.events, after.tools_started, after.last_tool),
        (0, 0, None)
    );
    Ok(())
}
