//! Retention: rows older than their table's retention are deleted; newer ones, the sessions
//! and the numbering are untouched.

use std::time::{Duration, Instant};

use anyhow::Result;
use nubabel_store::{
    results::{self, TaskResult},
    retention::{self, RetentionPolicy},
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    TestApp, opencode_session_id, progress, sidecar, spawn_app, spawn_app_configured, unique,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Sends `count` progress events to a new session; its primary key.
async fn session_with_events(app: &TestApp, count: usize) -> Result<(Uuid, String)> {
    let tenant = sidecar(&unique("org"));
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    for i in 0..count {
        let response = app
            .callback(
                &tenant,
                &mapping.session_id,
                "progress",
                &unique("msg"),
                &progress(i),
            )
            .await?;
        assert_eq!(response.status(), StatusCode::OK);
    }
    Ok((mapping.session_pk, mapping.session_id))
}

async fn age_events(app: &TestApp, session_pk: Uuid, up_to_seq: i64, days: i32) -> Result<()> {
    sqlx::query(
        "update session_events set received_at = now() - make_interval(days => $3)
         where session_pk = $1 and seq <= $2",
    )
    .bind(session_pk)
    .bind(up_to_seq)
    .bind(days)
    .execute(&app.db)
    .await?;
    Ok(())
}

async fn kept_sequences(app: &TestApp, session_pk: Uuid) -> Result<Vec<i64>> {
    Ok(
        sqlx::query_scalar("select seq from session_events where session_pk = $1 order by seq")
            .bind(session_pk)
            .fetch_all(&app.db)
            .await?,
    )
}

async fn record_result(app: &TestApp, uid: Uuid) -> Result<()> {
    results::record(
        &app.db,
        &TaskResult {
            task_uid: uid,
            organization_id: "org-a",
            task_namespace: "team-a",
            task_name: "task",
            session_id: None,
            phase: "Succeeded",
            output: Some("done"),
            error_reason: None,
            error_message: None,
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_sweep_deletes_only_rows_older_than_their_retention_in_batches() -> Result<()> {
    let app = spawn_app().await?;
    let (session_pk, _) = session_with_events(&app, 5).await?;
    age_events(&app, session_pk, 3, 31).await?;
    let (old_result, new_result) = (Uuid::new_v4(), Uuid::new_v4());
    record_result(&app, old_result).await?;
    record_result(&app, new_result).await?;
    // The updated_at trigger would stamp the update itself; this database is the test's own.
    sqlx::query("alter table task_results disable trigger set_updated_at")
        .execute(&app.db)
        .await?;
    sqlx::query(
        "update task_results set updated_at = now() - interval '91 days' where task_uid = $1",
    )
    .bind(old_result)
    .execute(&app.db)
    .await?;

    // Keeping everything deletes nothing.
    let none = retention::sweep(&app.db, RetentionPolicy::default(), 2).await?;
    assert_eq!((none.events, none.results), (0, 0));
    assert_eq!(kept_sequences(&app, session_pk).await?, [1, 2, 3, 4, 5]);

    // Batches of 2 take the 3 old events in two statements.
    let policy = RetentionPolicy {
        events: Some(30 * DAY),
        results: Some(90 * DAY),
    };
    let swept = retention::sweep(&app.db, policy, 2).await?;
    assert_eq!((swept.events, swept.results), (3, 1));
    assert_eq!(kept_sequences(&app, session_pk).await?, [4, 5]);
    assert!(results::output(&app.db, old_result).await?.is_none());
    assert_eq!(
        results::output(&app.db, new_result).await?.as_deref(),
        Some("done")
    );
    Ok(())
}

#[tokio::test]
async fn the_api_sweeps_by_itself_and_the_session_goes_on_numbering() -> Result<()> {
    let app = spawn_app_configured(|config| {
        config.retention_events_days = 1;
        config.retention_interval_seconds = 1;
    })
    .await?;
    let tenant = sidecar(&unique("org"));
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    for i in 0..2 {
        app.callback(
            &tenant,
            &mapping.session_id,
            "progress",
            &unique("msg"),
            &progress(i),
        )
        .await?;
    }
    age_events(&app, mapping.session_pk, 2, 2).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !kept_sequences(&app, mapping.session_pk).await?.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the old events were never deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The session and its numbering survive: the next event is 3, not 1.
    let next = app
        .callback(
            &tenant,
            &mapping.session_id,
            "progress",
            &unique("msg"),
            &progress(9),
        )
        .await?;
    assert_eq!(
        next.json::<Value>().await?,
        json!({"sequence": 3, "duplicate": false})
    );
    let metrics = reqwest::get(format!("{}/metrics", app.address))
        .await?
        .text()
        .await?;
    assert!(
        metrics
            .contains("nubabel_callback_api_retention_deleted_total{table=\"session_events\"} 2"),
        "{metrics}"
    );
    Ok(())
}
