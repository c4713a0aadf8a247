//! SSE: live events, resuming with Last-Event-ID, readers' tokens, several replicas.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nubabel_contract::stream_token::Validity;
use nubabel_store::streams::{stream_bytes_key, stream_key};
use redis::streams::StreamRangeReply;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    SseReader, opencode_session_id, progress, sidecar, spawn_app, spawn_app_configured,
    spawn_app_on, unique,
};

const WAIT: Duration = Duration::from_secs(5);
/// The open-streams gauge, as `/metrics` exports it.
const OPEN_STREAMS: &str = "nubabel_callback_api_sse_streams";

#[tokio::test]
async fn a_reader_gets_each_event_live_with_its_sequence_as_id_and_keep_alives() -> Result<()> {
    let app = spawn_app().await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let response = app
        .open_stream(&mapping.session_id, &app.stream_token(&org, None), None)
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert_eq!(headers["cache-control"], "no-cache");
    let mut reader = SseReader::new(response);

    app.callback(
        &tenant,
        &mapping.session_id,
        "update",
        &unique("msg"),
        &serde_json::json!({"state": "busy"}),
    )
    .await?;
    for i in 0..3 {
        app.callback(
            &tenant,
            &mapping.opencode_session_id,
            "progress",
            &unique("msg"),
            &progress(i),
        )
        .await?;
    }

    let events = reader.take(4, WAIT).await?;
    let ids: Vec<i64> = events.iter().map(|e| e.seq()).collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    assert_eq!(events[0].event.as_deref(), Some("state"));
    assert_eq!(events[0].json()["data"]["state"], "busy");
    assert_eq!(events[1].event.as_deref(), Some("progress"));
    assert_eq!(events[3].json()["data"]["tool"], "tool-2");
    // With a one-second keep-alive, an idle stream shows comments.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    app.callback(
        &tenant,
        &mapping.session_id,
        "progress",
        &unique("msg"),
        &progress(3),
    )
    .await?;
    assert_eq!(reader.next(WAIT).await?.seq(), 5);
    assert!(reader.comments >= 1, "no keep-alive comment seen");
    Ok(())
}

#[tokio::test]
async fn a_reader_that_reconnects_gets_exactly_what_it_missed_in_order_then_live_events()
-> Result<()> {
    let app = spawn_app().await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let token = app.stream_token(&org, None);
    for i in 0..5 {
        app.callback(
            &tenant,
            &mapping.session_id,
            "progress",
            &unique("msg"),
            &progress(i),
        )
        .await?;
    }
    let mut first = SseReader::new(app.open_stream(&mapping.session_id, &token, None).await?);
    let seen: Vec<i64> = first.take(3, WAIT).await?.iter().map(|e| e.seq()).collect();
    assert_eq!(seen, [1, 2, 3]);
    drop(first);

    for i in 5..12 {
        app.callback(
            &tenant,
            &mapping.session_id,
            "progress",
            &unique("msg"),
            &progress(i),
        )
        .await?;
    }
    let mut resumed = SseReader::new(
        app.open_stream(&mapping.session_id, &token, Some(3))
            .await?,
    );
    let replayed: Vec<i64> = resumed
        .take(9, WAIT)
        .await?
        .iter()
        .map(|e| e.seq())
        .collect();
    assert_eq!(replayed, (4..=12).collect::<Vec<_>>());
    app.callback(
        &tenant,
        &mapping.session_id,
        "progress",
        &unique("msg"),
        &progress(12),
    )
    .await?;
    let live = resumed.next(WAIT).await?;
    assert_eq!(live.seq(), 13);
    assert_eq!(live.json()["data"]["tool"], "tool-12");
    // Nothing more: every event came exactly once.
    assert!(resumed.next(Duration::from_millis(500)).await.is_err());
    Ok(())
}

#[tokio::test]
async fn a_resume_older_than_the_redis_stream_replays_from_postgres() -> Result<()> {
    let app = spawn_app().await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    for i in 0..20 {
        app.callback(
            &tenant,
            &mapping.session_id,
            "progress",
            &unique("msg"),
            &progress(i),
        )
        .await?;
    }
    // As if the stream had expired or been trimmed: only the newest five are in Redis.
    let client = redis::Client::open(app.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: i64 = redis::cmd("XTRIM")
        .arg(stream_key(mapping.session_pk))
        .arg("MAXLEN")
        .arg(5)
        .query_async(&mut conn)
        .await?;

    let mut reader = SseReader::new(
        app.open_stream(&mapping.session_id, &app.stream_token(&org, None), Some(2))
            .await?,
    );
    let replayed: Vec<i64> = reader
        .take(18, WAIT)
        .await?
        .iter()
        .map(|e| e.seq())
        .collect();
    assert_eq!(replayed, (3..=20).collect::<Vec<_>>());
    assert!(reader.next(Duration::from_millis(300)).await.is_err());
    Ok(())
}

#[tokio::test]
async fn a_sessions_redis_stream_stays_within_its_byte_budget_and_a_resume_across_the_trimmed_part_gets_everything()
-> Result<()> {
    const BUDGET: usize = 16 * 1024;
    const EVENTS: i64 = 40;
    let app = spawn_app_configured(|config| config.stream_max_bytes = BUDGET as u64).await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    // About 1.2 KiB of JSON each: 40 of them are three times the budget.
    let padding = "x".repeat(1000);
    let body = |i: i64| json!({"progress": {"type": "tool_execute_start", "tool": format!("tool-{i}"), "input": {"padding": padding}}});
    for i in 1..=EVENTS {
        let answer = app
            .callback(
                &tenant,
                &mapping.session_id,
                "progress",
                &unique("msg"),
                &body(i),
            )
            .await?;
        assert_eq!(answer.status(), StatusCode::OK);
    }

    let client = redis::Client::open(app.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let deadline = Instant::now() + WAIT;
    let entries = loop {
        let entries = stream_entry_sizes(&mut conn, mapping.session_pk).await?;
        if entries.last().is_some_and(|(seq, _)| *seq == EVENTS) {
            break entries;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the last event never reached redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let held: usize = entries.iter().map(|(_, size)| size).sum();
    assert!(held <= BUDGET, "{held} bytes in the stream");
    assert!(
        held + entries[0].1 > BUDGET,
        "trimmed more than needed: {held} bytes"
    );
    assert!(entries.len() < 20, "{} entries kept", entries.len());
    assert_eq!(
        stream_byte_count(&mut conn, mapping.session_pk).await?,
        held
    );
    let oldest = entries[0].0;
    assert!(oldest > 2, "the stream still starts at {oldest}");

    // A reader that has only the first event resumes across the trimmed part: Postgres gives
    // what Redis no longer holds, then Redis and the live stream the rest, each once, in order.
    let mut reader = SseReader::new(
        app.open_stream(&mapping.session_id, &app.stream_token(&org, None), Some(1))
            .await?,
    );
    let replayed: Vec<i64> = reader
        .take(usize::try_from(EVENTS - 1)?, WAIT)
        .await?
        .iter()
        .map(|e| e.seq())
        .collect();
    assert_eq!(replayed, (2..=EVENTS).collect::<Vec<_>>());
    // With its byte count lost (evicted, say), the next append counts the stream again.
    let _: i64 = redis::cmd("DEL")
        .arg(stream_bytes_key(mapping.session_pk))
        .query_async(&mut conn)
        .await?;
    app.callback(
        &tenant,
        &mapping.session_id,
        "progress",
        &unique("msg"),
        &body(EVENTS + 1),
    )
    .await?;
    let live = reader.next(WAIT).await?;
    assert_eq!(live.seq(), EVENTS + 1);
    assert_eq!(live.json()["data"]["tool"], format!("tool-{}", EVENTS + 1));
    assert!(reader.next(Duration::from_millis(300)).await.is_err());
    let held: usize = stream_entry_sizes(&mut conn, mapping.session_pk)
        .await?
        .iter()
        .map(|(_, size)| size)
        .sum();
    assert!(held <= BUDGET, "{held} bytes in the stream");
    assert_eq!(
        stream_byte_count(&mut conn, mapping.session_pk).await?,
        held
    );
    Ok(())
}

/// The sequence number and the event JSON's size of each entry of a session's Redis stream.
async fn stream_entry_sizes(
    conn: &mut redis::aio::MultiplexedConnection,
    session_pk: uuid::Uuid,
) -> Result<Vec<(i64, usize)>> {
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream_key(session_pk))
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await?;
    reply
        .ids
        .iter()
        .map(|entry| -> Result<(i64, usize)> {
            let seq = entry.id.trim_start_matches("0-").parse()?;
            let size = match entry.map.get("e") {
                Some(redis::Value::BulkString(json)) => json.len(),
                _ => 0,
            };
            Ok((seq, size))
        })
        .collect()
}

/// The byte count kept beside a session's Redis stream.
async fn stream_byte_count(
    conn: &mut redis::aio::MultiplexedConnection,
    session_pk: uuid::Uuid,
) -> Result<usize> {
    Ok(redis::cmd("GET")
        .arg(stream_bytes_key(session_pk))
        .query_async(conn)
        .await?)
}

#[tokio::test]
async fn readers_need_a_valid_token_for_the_sessions_tenant() -> Result<()> {
    let app = spawn_app().await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let other = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let url = format!(
        "{}/api/sidecar/sessions/{}/stream",
        app.address, mapping.session_id
    );

    let no_token = app.client.get(&url).send().await?;
    assert_eq!(no_token.status(), StatusCode::UNAUTHORIZED);
    let garbage = app
        .client
        .get(&url)
        .bearer_auth("not-a-token")
        .send()
        .await?;
    assert_eq!(garbage.status(), StatusCode::UNAUTHORIZED);
    let other_tenant = app
        .open_stream(
            &mapping.session_id,
            &app.stream_token(&unique("org"), None),
            None,
        )
        .await?;
    assert_eq!(other_tenant.status(), StatusCode::NOT_FOUND);
    let other_session = app
        .open_stream(
            &mapping.session_id,
            &app.stream_token(&org, Some(&other.session_id)),
            None,
        )
        .await?;
    assert_eq!(other_session.status(), StatusCode::NOT_FOUND);
    let expired = {
        let key = nubabel_contract::stream_token::StreamTokenKey::new(
            crate::helpers::STREAM_KEY.as_bytes(),
        )?;
        let org_id = nubabel_contract::identity::OrganizationId::parse(&org)?;
        let issued = crate::helpers::now() - 60;
        nubabel_contract::stream_token::issue(
            &key,
            &org_id,
            None,
            Validity::starting_at(issued, 59),
        )
    };
    assert_eq!(
        app.open_stream(&mapping.session_id, &expired, None)
            .await?
            .status(),
        StatusCode::UNAUTHORIZED
    );

    let scoped = app
        .open_stream(
            &mapping.opencode_session_id,
            &app.stream_token(&org, Some(&mapping.session_id)),
            None,
        )
        .await?;
    assert_eq!(scoped.status(), StatusCode::OK);
    let by_query = app
        .client
        .get(format!(
            "{url}?access_token={}",
            app.stream_token(&org, None)
        ))
        .send()
        .await?;
    assert_eq!(by_query.status(), StatusCode::OK);
    let not_a_number = app
        .client
        .get(&url)
        .bearer_auth(app.stream_token(&org, None))
        .header("last-event-id", "x")
        .send()
        .await?;
    assert_eq!(not_a_number.status(), StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test]
async fn a_reader_on_one_replica_sees_events_posted_to_another_within_milliseconds() -> Result<()> {
    let replica_a = spawn_app().await?;
    let replica_b = spawn_app_on(&replica_a.database_url, &replica_a.redis_url).await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let mapping = replica_a
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let mut reader = SseReader::new(
        replica_b
            .open_stream(
                &mapping.session_id,
                &replica_b.stream_token(&org, None),
                None,
            )
            .await?,
    );
    // Let replica B's reader join the Redis read.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let sent = Instant::now();
        let response = replica_a
            .callback(
                &tenant,
                &mapping.session_id,
                "progress",
                &unique("msg"),
                &progress(i),
            )
            .await?;
        assert_eq!(response.status(), StatusCode::OK);
        let event = reader.next(WAIT).await?;
        worst = worst.max(sent.elapsed());
        assert_eq!(event.seq(), i64::try_from(i)? + 1);
        let data: Value = event.json();
        assert_eq!(data["data"]["tool"], format!("tool-{i}"));
    }
    // Generous for a shared 2-core test machine; typical figures are a few milliseconds.
    assert!(
        worst < Duration::from_millis(500),
        "slowest cross-replica delivery took {worst:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_resume_point_past_the_sessions_last_event_is_refused_and_the_open_streams_gauge_holds()
-> Result<()> {
    let app = spawn_app().await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    for i in 0..2 {
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
    let token = app.stream_token(&org, None);
    let before = app.metric(OPEN_STREAMS).await?.context("no gauge")?;

    for beyond in [3, i64::MAX / 2, i64::MAX] {
        let response = app
            .open_stream(&mapping.session_id, &token, Some(beyond))
            .await?;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{beyond}");
        let body: Value = response.json().await?;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("Last-Event-ID"), "{body}");
        app.wait_for_metric(OPEN_STREAMS, before, WAIT).await?;
    }

    // Resuming at the last event is fine: the reader waits for the next one.
    let at_last = app
        .open_stream(&mapping.session_id, &token, Some(2))
        .await?;
    assert_eq!(at_last.status(), StatusCode::OK);
    app.wait_for_metric(OPEN_STREAMS, before + 1.0, WAIT)
        .await?;
    let mut reader = SseReader::new(at_last);
    app.callback(
        &tenant,
        &mapping.session_id,
        "progress",
        &unique("msg"),
        &progress(2),
    )
    .await?;
    assert_eq!(reader.next(WAIT).await?.seq(), 3);

    // The client closing its stream brings the gauge back.
    drop(reader);
    app.wait_for_metric(OPEN_STREAMS, before, WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn a_stream_ends_by_itself_once_its_token_expires() -> Result<()> {
    let app = spawn_app().await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let before = app.metric(OPEN_STREAMS).await?.context("no gauge")?;
    let token = app.stream_token_valid_for(&org, None, 2);
    let response = app.open_stream(&mapping.session_id, &token, None).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let mut reader = SseReader::new(response);
    app.callback(
        &tenant,
        &mapping.session_id,
        "progress",
        &unique("msg"),
        &progress(0),
    )
    .await?;
    assert_eq!(reader.next(WAIT).await?.seq(), 1);

    // Keep-alives go out every second, so only the expiry can end this stream.
    reader.wait_for_end(Duration::from_secs(6)).await?;
    app.wait_for_metric(OPEN_STREAMS, before, WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn a_token_living_longer_than_an_hour_from_its_issue_is_refused_even_near_its_expiry()
-> Result<()> {
    let app = spawn_app().await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let now = crate::helpers::now();
    // Issued 50 minutes ago for 100 minutes: 50 minutes left, but its lifetime is over the cap.
    let too_long = app.stream_token_with(
        &org,
        None,
        Validity {
            issued_at: now - 3000,
            expires_at: now + 3000,
        },
    );
    let refused = app
        .open_stream(&mapping.session_id, &too_long, None)
        .await?;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let body: Value = refused.json().await?;
    assert_eq!(body["error"]["message"], "token lifetime exceeds one hour");

    let within = app.stream_token_with(
        &org,
        None,
        Validity {
            issued_at: now - 3000,
            expires_at: now + 600,
        },
    );
    let accepted = app.open_stream(&mapping.session_id, &within, None).await?;
    assert_eq!(accepted.status(), StatusCode::OK);
    Ok(())
}
