//! Group commit: a batch appends each event exactly as a single append would, and callbacks
//! that arrive while a commit is in flight are committed together.

use std::time::Duration;

use anyhow::Result;
use nubabel_contract::identity::SidecarIdentity;
use nubabel_store::{
    Error,
    events::{self, Appended, EventPayload, NewEvent, PreparedEvent},
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    opencode_session_id, progress, sidecar, spawn_app, spawn_app_configured, unique,
};

fn prepared(sidecar: &SidecarIdentity, session_pk: Uuid, id: &str, body: &Value) -> PreparedEvent {
    let raw = serde_json::to_vec(body).unwrap();
    PreparedEvent::new(&NewEvent {
        session_pk,
        organization_id: sidecar.organization_id(),
        event_id: id,
        payload: EventPayload::Progress {
            event_type: body["type"].as_str().unwrap(),
            progress: body,
        },
        raw_body: &raw,
    })
}

fn tool(name: &str) -> Value {
    json!({"type": "tool_execute_start", "tool": name})
}

fn seq_of(result: &nubabel_store::Result<Appended>) -> Option<i64> {
    match result {
        Ok(Appended::New(committed)) => Some(committed.event.seq),
        _ => None,
    }
}

async fn sequences(app: &crate::helpers::TestApp, session_pk: Uuid) -> Result<Vec<(i64, String)>> {
    Ok(sqlx::query_as(
        "select seq, body->>'tool' from session_events where session_pk = $1 order by seq",
    )
    .bind(session_pk)
    .fetch_all(&app.db)
    .await?)
}

#[tokio::test]
async fn a_batch_numbers_each_session_in_order_and_settles_duplicates_reuse_and_missing_sessions()
-> Result<()> {
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let a = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let b = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let committed_before = unique("msg");
    let before = prepared(&tenant, a.session_pk, &committed_before, &tool("a0"));
    assert_eq!(
        seq_of(&events::append_prepared(&app.db, &before).await),
        Some(1)
    );

    let (a1, b1) = (unique("msg"), unique("msg"));
    let batch = [
        prepared(&tenant, b.session_pk, &b1, &tool("b1")),
        prepared(&tenant, a.session_pk, &a1, &tool("a1")),
        prepared(&tenant, a.session_pk, &unique("msg"), &tool("a2")),
        // The same delivery twice in one batch, and a retry of an event committed before.
        prepared(&tenant, a.session_pk, &a1, &tool("a1")),
        before.clone(),
        // B's event id again with another body: refused.
        prepared(&tenant, b.session_pk, &b1, &tool("other")),
        // A session that does not exist.
        prepared(&tenant, Uuid::new_v4(), &unique("msg"), &tool("x")),
        prepared(&tenant, b.session_pk, &unique("msg"), &tool("b2")),
    ];

    let results = events::append_batch(&app.db, &batch).await;

    assert_eq!(results.len(), batch.len());
    let seqs: Vec<Option<i64>> = results.iter().map(seq_of).collect();
    assert_eq!(seqs[..3], [Some(1), Some(2), Some(3)]);
    assert!(matches!(results[3], Ok(Appended::Duplicate { seq: 2 })));
    assert!(matches!(results[4], Ok(Appended::Duplicate { seq: 1 })));
    assert!(matches!(results[5], Ok(Appended::IdReused)));
    assert!(matches!(results[6], Err(Error::SessionNotFound)));
    assert_eq!(seqs[7], Some(2));
    // Each session's events are numbered in the order they arrived, without gaps.
    let expect = |tools: &[&str]| -> Vec<(i64, String)> {
        tools
            .iter()
            .zip(1..)
            .map(|(tool, seq)| (seq, (*tool).to_owned()))
            .collect()
    };
    assert_eq!(
        sequences(&app, a.session_pk).await?,
        expect(&["a0", "a1", "a2"])
    );
    assert_eq!(sequences(&app, b.session_pk).await?, expect(&["b1", "b2"]));
    let counters: Vec<(i64, i64, Option<String>)> = sqlx::query_as(
        "select last_seq, progress_events, last_tool from sessions where id = any($1) order by last_seq desc",
    )
    .bind(vec![a.session_pk, b.session_pk])
    .fetch_all(&app.db)
    .await?;
    assert_eq!(
        counters,
        [(3, 3, Some("a2".to_owned())), (2, 2, Some("b2".to_owned()))]
    );
    // The summary returned with each event is the one its own append left.
    let Ok(Appended::New(second)) = &results[2] else {
        panic!("a2 not new")
    };
    assert_eq!(
        (second.summary.events, second.summary.last_tool.as_deref()),
        (3, Some("a2"))
    );
    Ok(())
}

#[tokio::test]
async fn an_event_postgres_refuses_fails_alone_and_the_rest_of_its_batch_commits() -> Result<()> {
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let a = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    // An event id longer than the column's check allows (the API refuses such ids before they
    // get here): Postgres refuses the whole statement.
    let batch = [
        prepared(&tenant, a.session_pk, &unique("msg"), &tool("first")),
        prepared(&tenant, a.session_pk, &"x".repeat(129), &tool("refused")),
        prepared(&tenant, a.session_pk, &unique("msg"), &tool("last")),
    ];

    let results = events::append_batch(&app.db, &batch).await;

    assert_eq!(seq_of(&results[0]), Some(1));
    assert!(
        matches!(results[1], Err(Error::Postgres(_))),
        "{:?}",
        results[1]
    );
    assert_eq!(seq_of(&results[2]), Some(2));
    assert_eq!(
        sequences(&app, a.session_pk).await?,
        [(1, "first".to_owned()), (2, "last".to_owned())]
    );
    Ok(())
}

#[tokio::test]
async fn callbacks_arriving_during_a_commit_are_committed_together() -> Result<()> {
    let app = spawn_app_configured(|config| config.commit_concurrency = 1).await?;
    let tenant = sidecar(&unique("org"));
    let held = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let other = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;

    // Hold the first session's row so the only commit slot stays busy with its callback.
    let mut lock = app.db.begin().await?;
    sqlx::query("select 1 from sessions where id = $1 for update")
        .bind(held.session_pk)
        .execute(&mut *lock)
        .await?;
    let (first_id, first_body) = (unique("msg"), progress(0));
    let first = app.callback(
        &tenant,
        &held.session_id,
        "progress",
        &first_id,
        &first_body,
    );
    let events: Vec<(String, Value)> = (1..=20).map(|i| (unique("msg"), progress(i))).collect();
    let waiting = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        futures::future::join_all(
            events
                .iter()
                .map(|(id, body)| app.callback(&tenant, &other.session_id, "progress", id, body)),
        )
        .await
    };
    let release = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        lock.rollback().await
    };
    let (first, answers, released) = tokio::join!(first, waiting, release);
    released?;

    let mut sequences = Vec::new();
    for answer in answers {
        let answer = answer?;
        assert_eq!(answer.status(), StatusCode::OK);
        sequences.push(answer.json::<Value>().await?["sequence"].as_i64().unwrap());
    }
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=20).collect::<Vec<_>>());
    assert_eq!(first?.status(), StatusCode::OK);
    // The 20 callbacks waited behind one commit, so at most a few commits took them all.
    let metrics = reqwest::get(format!("{}/metrics", app.address))
        .await?
        .text()
        .await?;
    let batches = metric(&metrics, "nubabel_callback_api_append_batch_size_count");
    let events = metric(&metrics, "nubabel_callback_api_append_batch_size_sum");
    assert_eq!(events, 21.0, "{metrics}");
    assert!(batches < 11.0, "{batches} commits for 21 callbacks");
    Ok(())
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in metrics"))
}
