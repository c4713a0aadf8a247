//! Per-tenant limits: a tenant past its limit gets 429 with Retry-After, nothing is written,
//! and other tenants are not affected.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use reqwest::{Response, StatusCode};
use serde_json::Value;

use crate::helpers::{
    SseReader, build_app_with, opencode_session_id, progress, sidecar, spawn_app_configured, unique,
};

async fn assert_limited(response: Response, what: &str) -> Result<()> {
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["code"], "too_many_requests");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(what), "{message}");
    Ok(())
}

#[tokio::test]
async fn a_tenant_past_its_callbacks_in_flight_gets_429_and_nothing_is_written() -> Result<()> {
    let app = spawn_app_configured(|config| config.callback_tenant_concurrency = 2).await?;
    let busy = sidecar(&unique("org"));
    let calm = sidecar(&unique("org"));
    let held = app
        .register(&busy, &unique("s"), &opencode_session_id())
        .await?;
    let other = app
        .register(&calm, &unique("s"), &opencode_session_id())
        .await?;

    // Hold the session's row so the tenant's first two callbacks stay in flight.
    let mut lock = app.db.begin().await?;
    sqlx::query("select 1 from sessions where id = $1 for update")
        .bind(held.session_pk)
        .execute(&mut *lock)
        .await?;
    let (id1, id2, id3) = (unique("msg"), unique("msg"), unique("msg"));
    let (body1, body2, body3) = (progress(1), progress(2), progress(3));
    let in_flight = futures::future::join(
        app.callback(&busy, &held.session_id, "progress", &id1, &body1),
        app.callback(&busy, &held.session_id, "progress", &id2, &body2),
    );
    let meanwhile = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let third = app
            .callback(&busy, &held.session_id, "progress", &id3, &body3)
            .await?;
        assert_limited(third, "2 callbacks in flight").await?;
        let calm_answer = app
            .callback(
                &calm,
                &other.session_id,
                "progress",
                &unique("msg"),
                &progress(1),
            )
            .await?;
        assert_eq!(calm_answer.status(), StatusCode::OK);
        lock.rollback().await?;
        anyhow::Ok(())
    };
    let ((first, second), checked) = tokio::join!(in_flight, meanwhile);
    checked?;
    assert_eq!(first?.status(), StatusCode::OK);
    assert_eq!(second?.status(), StatusCode::OK);

    let stored: Vec<String> = sqlx::query_scalar(
        "select event_id from session_events where session_pk = $1 order by seq",
    )
    .bind(held.session_pk)
    .fetch_all(&app.db)
    .await?;
    assert_eq!(stored.len(), 2);
    assert!(!stored.contains(&id3), "the refused callback was written");
    // Once the tenant is below its limit, the refused callback goes through on retry.
    let retry = app
        .callback(&busy, &held.session_id, "progress", &id3, &body3)
        .await?;
    assert_eq!(retry.status(), StatusCode::OK);
    let metrics = reqwest::get(format!("{}/metrics", app.address))
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains(r#"nubabel_callback_api_tenant_limited_total{limit="callbacks"} 1"#),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_tenant_past_its_open_streams_gets_429_until_it_closes_one() -> Result<()> {
    let app = spawn_app_configured(|config| config.sse_tenant_streams = 2).await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let other_org = unique("org");
    let other = sidecar(&other_org);
    let session = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let other_session = app
        .register(&other, &unique("s"), &opencode_session_id())
        .await?;
    let token = app.stream_token(&org, None);

    let first = app.open_stream(&session.session_id, &token, None).await?;
    let second = app.open_stream(&session.session_id, &token, None).await?;
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let third = app.open_stream(&session.session_id, &token, None).await?;
    assert_limited(third, "2 streams open").await?;
    let elsewhere = app
        .open_stream(
            &other_session.session_id,
            &app.stream_token(&other_org, None),
            None,
        )
        .await?;
    assert_eq!(elsewhere.status(), StatusCode::OK);

    // Closing a stream gives its place back (the server notices the closed connection).
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = app.open_stream(&session.session_id, &token, None).await?;
        if again.status() == StatusCode::OK {
            break;
        }
        assert_eq!(again.status(), StatusCode::TOO_MANY_REQUESTS);
        if Instant::now() > deadline {
            bail!("the closed stream's place never came back");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(second);
    Ok(())
}

/// Registers a session of `tenant` with `events` progress events that only Postgres holds
/// (its Redis stream is gone, as after expiry), so a reader replays them from Postgres.
async fn session_only_postgres_holds(
    app: &crate::helpers::TestApp,
    tenant: &nubabel_contract::identity::SidecarIdentity,
    events: usize,
) -> Result<nubabel_store::sessions::SessionMapping> {
    let mapping = app
        .register(tenant, &unique("s"), &opencode_session_id())
        .await?;
    for i in 0..events {
        app.callback(
            tenant,
            &mapping.session_id,
            "progress",
            &unique("msg"),
            &progress(i),
        )
        .await?;
    }
    let client = redis::Client::open(app.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: i64 = redis::cmd("DEL")
        .arg(nubabel_store::streams::stream_key(mapping.session_pk))
        .query_async(&mut conn)
        .await?;
    Ok(mapping)
}

#[tokio::test]
async fn a_tenant_past_its_replaying_streams_gets_429_while_another_tenant_still_replays()
-> Result<()> {
    let app = spawn_app_configured(|config| config.sse_tenant_replays = 2).await?;
    let busy_org = unique("org");
    let busy = sidecar(&busy_org);
    let calm_org = unique("org");
    let calm = sidecar(&calm_org);
    let busy_session = session_only_postgres_holds(&app, &busy, 3).await?;
    let calm_session = session_only_postgres_holds(&app, &calm, 3).await?;
    let busy_token = app.stream_token(&busy_org, None);

    // Postgres is slow to give events back: replays stay in flight until the lock goes.
    let mut lock = app.db.begin().await?;
    sqlx::query("lock table session_events in access exclusive mode")
        .execute(&mut *lock)
        .await?;
    let first = app
        .open_stream(&busy_session.session_id, &busy_token, None)
        .await?;
    let second = app
        .open_stream(&busy_session.session_id, &busy_token, None)
        .await?;
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let third = app
        .open_stream(&busy_session.session_id, &busy_token, None)
        .await?;
    assert_limited(third, "2 streams replaying").await?;
    // Another tenant's replay is admitted, and so is the busy tenant's stream with nothing to
    // replay (resuming at the last event).
    let calm_stream = app
        .open_stream(
            &calm_session.session_id,
            &app.stream_token(&calm_org, None),
            None,
        )
        .await?;
    assert_eq!(calm_stream.status(), StatusCode::OK);
    let live_only = app
        .open_stream(&busy_session.session_id, &busy_token, Some(3))
        .await?;
    assert_eq!(live_only.status(), StatusCode::OK);

    // Once the replays are done, their shares come back and every stream has its events.
    lock.rollback().await?;
    let mut calm_reader = crate::helpers::SseReader::new(calm_stream);
    assert_eq!(calm_reader.take(3, Duration::from_secs(5)).await?.len(), 3);
    for response in [first, second] {
        let mut reader = crate::helpers::SseReader::new(response);
        assert_eq!(reader.take(3, Duration::from_secs(5)).await?.len(), 3);
    }
    let again = app
        .open_stream(&busy_session.session_id, &busy_token, None)
        .await?;
    assert_eq!(again.status(), StatusCode::OK);
    drop(live_only);
    Ok(())
}

#[tokio::test]
async fn a_live_stream_filling_a_gap_from_postgres_takes_a_replay_share_and_waits_for_one()
-> Result<()> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let (app, state) = build_app_with(&database_url, &redis_url, |config| {
        config.sse_tenant_replays = 1
    })
    .await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let callback = |i: usize| {
        let (tenant, session) = (tenant.clone(), mapping.session_id.clone());
        let app = &app;
        async move {
            let answer = app
                .callback(&tenant, &session, "progress", &unique("msg"), &progress(i))
                .await?;
            anyhow::ensure!(answer.status() == StatusCode::OK, "{}", answer.status());
            anyhow::Ok(())
        }
    };
    callback(1).await?;
    // Live from the start: nothing to replay, so the stream is admitted without a share.
    let mut reader = SseReader::new(
        app.open_stream(&mapping.session_id, &app.stream_token(&org, None), Some(1))
            .await?,
    );
    // The tenant's one share is taken, as by another stream replaying.
    let share = state
        .limits
        .replays
        .acquire(&org)
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    // Redis carries number 3 before Postgres shows 2 (an append that overtook another): the
    // live stream has a gap to fill from Postgres, and for that read it waits for a share.
    let early = nubabel_store::events::StoredEvent {
        seq: 3,
        event_id: unique("msg"),
        kind: nubabel_store::events::EventKind::Progress,
        event_type: "tool_execute_start".into(),
        body: progress(3)["progress"].clone(),
        received_at: jiff::Timestamp::now(),
    };
    let client = redis::Client::open(app.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: String = redis::cmd("XADD")
        .arg(nubabel_store::streams::stream_key(mapping.session_pk))
        .arg("0-3")
        .arg("e")
        .arg(serde_json::to_string(&early)?)
        .query_async(&mut conn)
        .await?;
    let waiting = r#"nubabel_callback_api_tenant_limited_total{limit="replays"} 1"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = reqwest::get(format!("{}/metrics", app.address))
            .await?
            .text()
            .await?;
        if metrics.contains(waiting) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the live stream read Postgres without waiting for a share:\n{metrics}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Once the share is back, the stream goes on: every event once, in order.
    drop(share);
    for i in 2..=4 {
        callback(i).await?;
    }
    let events = reader.take(3, Duration::from_secs(5)).await?;
    let seen: Vec<(i64, Value)> = events
        .iter()
        .map(|e| (e.seq(), e.json()["data"]["tool"].clone()))
        .collect();
    assert_eq!(
        seen,
        (2..=4)
            .map(|i| (i, Value::from(format!("tool-{i}"))))
            .collect::<Vec<_>>()
    );
    assert_eq!(state.limits.replays.held(&org), 0);
    Ok(())
}

#[tokio::test]
async fn a_connection_trickling_its_request_head_is_closed() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = spawn_app_configured(|config| config.header_read_timeout_seconds = 1).await?;
    let address = app.address.trim_start_matches("http://").to_owned();

    // Half a request head, then nothing (slowloris): the server hangs up.
    let mut slow = tokio::net::TcpStream::connect(&address).await?;
    slow.write_all(b"POST /api/sidecar/sessions/s/progress HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let started = Instant::now();
    let mut buffer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buffer))
        .await
        .map_err(|_| anyhow::anyhow!("the server kept the trickling connection open"))??;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );

    // A head sent in time, on a connection that then stays idle between requests, is served.
    let mut prompt = tokio::net::TcpStream::connect(&address).await?;
    prompt
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut answer = [0u8; 12];
    prompt.read_exact(&mut answer).await?;
    assert_eq!(&answer, b"HTTP/1.1 200");
    Ok(())
}
