//! Failures of Redis and Postgres: nothing acknowledged is lost, nothing unwritten is acknowledged.

use std::time::Duration;

use anyhow::Result;
use nubabel_e2e::{PrivatePostgres, PrivateRedis, fresh_database};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{SseReader, opencode_session_id, progress, sidecar, spawn_app_on, unique};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn stopping_redis_mid_stream_loses_no_acknowledged_event() -> Result<()> {
    // Two replicas: callbacks go to A, readers are on B, so B can only learn of events through
    // Redis or, while Redis is down, from Postgres.
    let mut redis = PrivateRedis::start().await?;
    let replica_a = spawn_app_on(&fresh_database().await?, &redis.url()).await?;
    let replica_b = spawn_app_on(&replica_a.database_url, &redis.url()).await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let mapping = replica_a
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let token = replica_b.stream_token(&org, None);
    let mut reader = SseReader::new(
        replica_b
            .open_stream(&mapping.session_id, &token, None)
            .await?,
    );
    let post = |i: usize| {
        let (app, tenant, session) = (&replica_a, &tenant, mapping.session_id.clone());
        async move {
            let response = app
                .callback(tenant, &session, "progress", &unique("msg"), &progress(i))
                .await?;
            anyhow::ensure!(
                response.status() == StatusCode::OK,
                "event {i} got {}",
                response.status()
            );
            Ok::<_, anyhow::Error>(())
        }
    };
    let seqs =
        |events: Vec<crate::helpers::SseEvent>| events.iter().map(|e| e.seq()).collect::<Vec<_>>();

    for i in 0..10 {
        post(i).await?;
    }
    assert_eq!(
        seqs(reader.take(10, WAIT).await?),
        (1..=10).collect::<Vec<_>>()
    );

    redis.stop().await?;
    // Readiness follows Postgres: the replica stays in rotation and says it is degraded.
    let ready = replica_a
        .client
        .get(format!("{}/readyz", replica_a.address))
        .send()
        .await?;
    assert_eq!(ready.status(), StatusCode::OK);
    let health: Value = ready.json().await?;
    assert_eq!(
        health,
        serde_json::json!({"status": "degraded", "postgres": true, "redis": false})
    );
    for i in 10..20 {
        post(i).await?;
    }
    // Still down: B's reader gets the acknowledged events from Postgres.
    assert_eq!(
        seqs(reader.take(10, WAIT).await?),
        (11..=20).collect::<Vec<_>>()
    );
    // A reader that connects while Redis is down replays from Postgres.
    let mut late = SseReader::new(
        replica_b
            .open_stream(&mapping.session_id, &token, Some(5))
            .await?,
    );
    assert_eq!(
        seqs(late.take(15, WAIT).await?),
        (6..=20).collect::<Vec<_>>()
    );

    redis.restart().await?;
    for i in 20..30 {
        post(i).await?;
    }
    assert_eq!(
        seqs(reader.take(10, WAIT).await?),
        (21..=30).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(late.take(10, WAIT).await?),
        (21..=30).collect::<Vec<_>>()
    );
    assert!(
        reader.next(Duration::from_millis(300)).await.is_err(),
        "an event came twice"
    );
    assert_eq!(replica_a.count("session_events").await?, 30);
    Ok(())
}

#[tokio::test]
async fn with_postgres_down_callbacks_get_503_with_retry_after_and_succeed_on_retry() -> Result<()>
{
    let mut postgres = PrivatePostgres::start().await?;
    let database_url = postgres
        .create_database(&unique("db").replace('-', "_"))
        .await?;
    let app = spawn_app_on(&database_url, &nubabel_e2e::test_redis_url().await?).await?;
    let tenant = sidecar(&unique("org"));
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let id = unique("msg");
    let body = progress(0);

    postgres.stop().await?;
    let refused = app
        .callback(&tenant, &mapping.session_id, "progress", &id, &body)
        .await?;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "5");
    let error: Value = refused.json().await?;
    assert_eq!(error["error"]["code"], "unavailable");
    let ready = app
        .client
        .get(format!("{}/readyz", app.address))
        .send()
        .await?;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    postgres.restart().await?;
    // The pool reconnects on its own; the sender's retry of the same event is applied once.
    let mut accepted = None;
    for _ in 0..50 {
        let response = app
            .callback(&tenant, &mapping.session_id, "progress", &id, &body)
            .await?;
        if response.status() == StatusCode::OK {
            accepted = Some(response.json::<Value>().await?);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        accepted,
        Some(serde_json::json!({"sequence": 1, "duplicate": false}))
    );
    assert_eq!(app.count("session_events").await?, 1);
    Ok(())
}
