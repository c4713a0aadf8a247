//! Callbacks: happy paths, exactly-once application, tenant isolation, signatures, bad input.

use anyhow::Result;
use nubabel_store::streams::{RedisSettings, RedisStore};
use reqwest::StatusCode;
use serde_json::{Value, json};

use nubabel_contract::signing::{self, MasterKey, derive_sidecar_key};

use crate::helpers::{
    MASTER_KEY, now, opencode_session_id, progress, sidecar, spawn_app, spawn_app_configured,
    unique,
};

#[tokio::test]
async fn a_state_update_is_committed_to_postgres_and_kept_hot_in_redis() -> Result<()> {
    let app = spawn_app().await?;
    let org = unique("org");
    let sidecar = sidecar(&org);
    let mapping = app
        .register(&sidecar, &unique("s"), &opencode_session_id())
        .await?;

    let response = app
        .callback(
            &sidecar,
            &mapping.session_id,
            "update",
            &unique("msg"),
            &json!({"state": "busy", "metadata": {"attempt": 1}}),
        )
        .await?;

    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await?;
    assert_eq!(body, json!({"sequence": 1, "duplicate": false}));
    let (state, metadata): (Option<String>, Value) =
        sqlx::query_as("select state, state_metadata from sessions where id = $1")
            .bind(mapping.session_pk)
            .fetch_one(&app.db)
            .await?;
    assert_eq!(state.as_deref(), Some("busy"));
    assert_eq!(metadata, json!({"attempt": 1}));
    let redis = RedisStore::new(&app.redis_url, RedisSettings::default())?;
    let hot = redis.state(mapping.session_pk).await?.expect("hot state");
    assert_eq!((hot.seq, hot.state.as_str()), (1, "busy"));
    Ok(())
}

#[tokio::test]
async fn a_progress_event_addressed_by_the_opencode_session_id_is_committed_with_the_next_sequence()
-> Result<()> {
    let app = spawn_app().await?;
    let sidecar = sidecar(&unique("org"));
    let mapping = app
        .register(&sidecar, &unique("s"), &opencode_session_id())
        .await?;

    for (i, expected) in [(0, 1), (1, 2)] {
        let response = app
            .callback(
                &sidecar,
                &mapping.opencode_session_id,
                "progress",
                &unique("msg"),
                &progress(i),
            )
            .await?;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.json::<Value>().await?["sequence"], expected);
    }
    let (events, tools, last_tool): (i64, i64, Option<String>) = sqlx::query_as(
        "select progress_events, tools_started, last_tool from sessions where id = $1",
    )
    .bind(mapping.session_pk)
    .fetch_one(&app.db)
    .await?;
    assert_eq!(
        (events, tools, last_tool.as_deref()),
        (2, 2, Some("tool-1"))
    );
    Ok(())
}

#[tokio::test]
async fn a_repeated_delivery_is_answered_as_success_and_applied_once() -> Result<()> {
    let app = spawn_app().await?;
    let sidecar = sidecar(&unique("org"));
    let mapping = app
        .register(&sidecar, &unique("s"), &opencode_session_id())
        .await?;
    let id = unique("msg");
    let body = serde_json::to_vec(&progress(7))?;
    let path = format!("/api/sidecar/sessions/{}/progress", mapping.session_id);

    // Five concurrent deliveries of one event (retries racing each other), then one more.
    let attempts = (0..5).map(|_| {
        app.post_raw(
            &path,
            app.signed_headers(&sidecar, &path, &id, now(), &body),
            body.clone(),
        )
    });
    let mut duplicates = 0;
    for response in futures::future::join_all(attempts).await {
        let response = response?;
        assert_eq!(response.status(), StatusCode::OK);
        let answer: Value = response.json().await?;
        assert_eq!(answer["sequence"], 1);
        duplicates += usize::from(answer["duplicate"] == true);
    }
    assert_eq!(duplicates, 4);
    let retry = app
        .post_raw(
            &path,
            app.signed_headers(&sidecar, &path, &id, now() + 1, &body),
            body.clone(),
        )
        .await?;
    assert_eq!(
        retry.json::<Value>().await?,
        json!({"sequence": 1, "duplicate": true})
    );

    assert_eq!(app.count("session_events").await?, 1);
    let (last_seq, events): (i64, i64) =
        sqlx::query_as("select last_seq, progress_events from sessions where id = $1")
            .bind(mapping.session_pk)
            .fetch_one(&app.db)
            .await?;
    assert_eq!((last_seq, events), (1, 1));
    Ok(())
}

#[tokio::test]
async fn concurrent_events_of_one_session_are_numbered_without_gaps_and_counted_once() -> Result<()>
{
    let app = spawn_app().await?;
    let sidecar = sidecar(&unique("org"));
    let mapping = app
        .register(&sidecar, &unique("s"), &opencode_session_id())
        .await?;
    let path = format!("/api/sidecar/sessions/{}/progress", mapping.session_id);

    // 40 distinct events, each delivered twice at once: every pair races on the event id and
    // every event races the others on the session's sequence.
    let events: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| Ok((unique("msg"), serde_json::to_vec(&progress(i))?)))
        .collect::<Result<_>>()?;
    let deliveries = events.iter().flat_map(|(id, body)| {
        [0, 1].map(|_| {
            app.post_raw(
                &path,
                app.signed_headers(&sidecar, &path, id, now(), body),
                body.clone(),
            )
        })
    });
    let mut sequences = Vec::new();
    let mut duplicates = 0;
    for response in futures::future::join_all(deliveries).await {
        let response = response?;
        assert_eq!(response.status(), StatusCode::OK);
        let answer: Value = response.json().await?;
        if answer["duplicate"] == true {
            duplicates += 1;
        } else {
            sequences.push(answer["sequence"].as_i64().unwrap());
        }
    }
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=40).collect::<Vec<i64>>());
    assert_eq!(duplicates, 40);

    let stored: Vec<i64> =
        sqlx::query_scalar("select seq from session_events where session_pk = $1 order by seq")
            .bind(mapping.session_pk)
            .fetch_all(&app.db)
            .await?;
    assert_eq!(stored, (1..=40).collect::<Vec<i64>>());
    let (last_seq, counted): (i64, i64) =
        sqlx::query_as("select last_seq, progress_events from sessions where id = $1")
            .bind(mapping.session_pk)
            .fetch_one(&app.db)
            .await?;
    assert_eq!((last_seq, counted), (40, 40));
    Ok(())
}

#[tokio::test]
async fn an_event_id_reused_for_another_body_is_refused_and_changes_nothing() -> Result<()> {
    let app = spawn_app().await?;
    let sidecar = sidecar(&unique("org"));
    let mapping = app
        .register(&sidecar, &unique("s"), &opencode_session_id())
        .await?;
    let id = unique("msg");
    let first = app
        .callback(&sidecar, &mapping.session_id, "progress", &id, &progress(1))
        .await?;
    assert_eq!(first.status(), StatusCode::OK);

    let reused = app
        .callback(&sidecar, &mapping.session_id, "progress", &id, &progress(2))
        .await?;

    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        reused.json::<Value>().await?["error"]["code"],
        "event_id_reused"
    );
    assert_eq!(app.count("session_events").await?, 1);
    Ok(())
}

#[tokio::test]
async fn no_tenant_can_touch_another_tenants_sessions() -> Result<()> {
    let app = spawn_app().await?;
    let tenants: Vec<_> = (0..2).map(|_| sidecar(&unique("org"))).collect();
    let mut sessions = Vec::new();
    for tenant in &tenants {
        sessions.push(
            app.register(tenant, &unique("s"), &opencode_session_id())
                .await?,
        );
    }

    for (caller_index, caller) in tenants.iter().enumerate() {
        for (owner_index, session) in sessions.iter().enumerate() {
            for id in [&session.session_id, &session.opencode_session_id] {
                for (action, body) in [
                    ("update", json!({"state": "idle"})),
                    ("progress", progress(0)),
                ] {
                    let response = app
                        .callback(caller, id, action, &unique("msg"), &body)
                        .await?;
                    let expected = if caller_index == owner_index {
                        StatusCode::OK
                    } else {
                        StatusCode::NOT_FOUND
                    };
                    assert_eq!(
                        response.status(),
                        expected,
                        "caller {caller_index} -> session {owner_index} {action} via {id}"
                    );
                }
            }
        }
    }
    // Only the 2 tenants x 2 ids x 2 actions on their own sessions were written.
    assert_eq!(app.count("session_events").await?, 8);

    // A tenant's key cannot pass for another tenant: the identity headers choose the key.
    let body = serde_json::to_vec(&progress(0))?;
    let path = format!("/api/sidecar/sessions/{}/progress", sessions[1].session_id);
    let mut forged = app.signed_headers(&tenants[0], &path, &unique("msg"), now(), &body);
    forged.insert(
        "x-nubabel-organization",
        tenants[1].organization_id().to_string().parse()?,
    );
    forged.insert(
        "x-nubabel-sidecar",
        format!("{}/{}", tenants[1].namespace(), tenants[1].name()).parse()?,
    );
    let response = app.post_raw(&path, forged, body).await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.count("session_events").await?, 8);
    Ok(())
}

#[tokio::test]
async fn bad_signatures_are_refused_with_401_and_write_nothing() -> Result<()> {
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let path = format!("/api/sidecar/sessions/{}/progress", mapping.session_id);
    let body = serde_json::to_vec(&progress(0))?;

    let tampered = {
        let headers = app.signed_headers(&tenant, &path, &unique("msg"), now(), &body);
        (headers, serde_json::to_vec(&progress(1))?)
    };
    let wrong_key = {
        // Signed by a fleet of the same tenant with another name: another key.
        let other = nubabel_contract::identity::SidecarIdentity::new(
            tenant.organization_id().as_str(),
            tenant.namespace(),
            "other",
        )?;
        let mut headers = app.signed_headers(&other, &path, &unique("msg"), now(), &body);
        headers.insert(
            "x-nubabel-sidecar",
            format!("{}/{}", tenant.namespace(), tenant.name()).parse()?,
        );
        (headers, body.clone())
    };
    let stale = (
        app.signed_headers(&tenant, &path, &unique("msg"), now() - 301, &body),
        body.clone(),
    );
    let future = (
        app.signed_headers(&tenant, &path, &unique("msg"), now() + 301, &body),
        body.clone(),
    );
    // Signed for another session of the same fleet, or for another route: a capture cannot
    // be re-sent elsewhere.
    let other_session = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let other_path = format!(
        "/api/sidecar/sessions/{}/progress",
        other_session.session_id
    );
    let moved_session = (
        app.signed_headers(&tenant, &other_path, &unique("msg"), now(), &body),
        body.clone(),
    );
    let update_path = format!("/api/sidecar/sessions/{}/update", mapping.session_id);
    let moved_route = (
        app.signed_headers(&tenant, &update_path, &unique("msg"), now(), &body),
        body.clone(),
    );
    // Signed over the body alone (v1 only), which this server does not accept by default.
    let body_only = (body_only_signed(&app, &tenant, &path, &body)?, body.clone());
    let mut cases = vec![
        ("tampered body", tampered),
        ("wrong key", wrong_key),
        ("stale", stale),
        ("future", future),
        ("signed for another session", moved_session),
        ("signed for another route", moved_route),
        ("signed over the body only", body_only),
    ];
    for header in [
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "x-nubabel-organization",
        "x-nubabel-sidecar",
    ] {
        let mut headers = app.signed_headers(&tenant, &path, &unique("msg"), now(), &body);
        headers.remove(header);
        cases.push((header, (headers, body.clone())));
    }

    for (name, (headers, body)) in cases {
        let response = app.post_raw(&path, headers, body).await?;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{name}");
        let error: Value = response.json().await?;
        assert_eq!(error["error"]["code"], "unauthorized", "{name}");
    }
    assert_eq!(app.count("session_events").await?, 0);

    let valid = app
        .post_raw(
            &path,
            app.signed_headers(&tenant, &path, &unique("msg"), now(), &body),
            body.clone(),
        )
        .await?;
    assert_eq!(valid.status(), StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn an_unregistered_session_is_404_and_nothing_is_created() -> Result<()> {
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let response = app
        .callback(
            &tenant,
            "ses_nobody",
            "progress",
            &unique("msg"),
            &progress(0),
        )
        .await?;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.json::<Value>().await?["error"]["code"],
        "session_not_found"
    );
    assert_eq!(app.count("sessions").await?, 0);
    assert_eq!(app.count("session_events").await?, 0);
    Ok(())
}

#[tokio::test]
async fn malformed_incomplete_or_oversized_bodies_are_refused_and_write_nothing() -> Result<()> {
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let progress_path = format!("/api/sidecar/sessions/{}/progress", mapping.session_id);
    let update_path = format!("/api/sidecar/sessions/{}/update", mapping.session_id);

    let cases: Vec<(&str, &String, Vec<u8>, StatusCode, &str)> = vec![
        (
            "not json",
            &progress_path,
            b"{\"progress\": ".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "missing type",
            &progress_path,
            br#"{"progress": {"tool": "bash"}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "progress: missing field `type`",
        ),
        (
            "missing progress",
            &progress_path,
            br#"{}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing field `progress`",
        ),
        (
            "missing state",
            &update_path,
            br#"{"metadata": {}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing field `state`",
        ),
        (
            "bad state",
            &update_path,
            br#"{"state": "busy\nid: 9"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "state: must be",
        ),
        (
            "metadata not an object",
            &update_path,
            br#"{"state": "busy", "metadata": [1]}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "metadata: invalid type",
        ),
        (
            "too large",
            &progress_path,
            format!(
                r#"{{"progress": {{"type": "message_part", "text": "{}"}}}}"#,
                "x".repeat(20_000)
            )
            .into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than",
        ),
    ];
    for (name, path, body, status, message) in cases {
        let headers = app.signed_headers(&tenant, path, &unique("msg"), now(), &body);
        let response = app.post_raw(path, headers, body).await?;
        assert_eq!(response.status(), status, "{name}");
        let error: Value = response.json().await?;
        let text = error["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(text.contains(message), "{name}: {text}");
    }

    // A body that is not declared as JSON.
    let body = serde_json::to_vec(&progress(0))?;
    let mut headers = app.signed_headers(&tenant, &progress_path, &unique("msg"), now(), &body);
    headers.insert("content-type", "text/plain".parse()?);
    let response = app.post_raw(&progress_path, headers, body).await?;
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    assert_eq!(app.count("session_events").await?, 0);
    Ok(())
}

#[tokio::test]
async fn an_endless_body_is_cut_off_with_413_before_it_is_read_whole() -> Result<()> {
    let app = spawn_app().await?;
    let tenant = sidecar(&unique("org"));
    let mapping = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    // Chunked with no length: the server must stop at its limit, because the body never ends.
    let chunks = futures::stream::repeat_with(|| {
        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 4096]))
    });
    let path = format!("/api/sidecar/sessions/{}/progress", mapping.session_id);
    let headers = app.signed_headers(&tenant, &path, &unique("msg"), now(), b"{}");
    let response = app
        .client
        .post(format!("{}{path}", app.address))
        .headers(headers)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    match response {
        Ok(response) => assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE),
        // The server may close the connection while the client is still sending.
        Err(error) => assert!(error.is_request() || error.is_body(), "{error}"),
    }
    assert_eq!(app.count("session_events").await?, 0);
    Ok(())
}

/// Headers a bridge that predates request-bound signatures sends: `v1` over the body only.
fn body_only_signed(
    app: &crate::helpers::TestApp,
    tenant: &nubabel_contract::identity::SidecarIdentity,
    path: &str,
    body: &[u8],
) -> Result<reqwest::header::HeaderMap> {
    let id = unique("msg");
    let timestamp = now();
    let mut headers = app.signed_headers(tenant, path, &id, timestamp, body);
    let master = MasterKey::new(MASTER_KEY.as_bytes())?;
    let v1 = signing::sign(&derive_sidecar_key(&master, tenant), &id, timestamp, body);
    headers.insert("webhook-signature", v1.parse()?);
    Ok(headers)
}

#[tokio::test]
async fn body_only_signatures_are_refused_by_name_unless_the_upgrade_setting_allows_them()
-> Result<()> {
    let body = serde_json::to_vec(&progress(0))?;
    for (allowed, expected) in [(false, StatusCode::UNAUTHORIZED), (true, StatusCode::OK)] {
        let app =
            spawn_app_configured(|config| config.accept_body_only_signatures = allowed).await?;
        let tenant = sidecar(&unique("org"));
        let mapping = app
            .register(&tenant, &unique("s"), &opencode_session_id())
            .await?;
        let path = format!("/api/sidecar/sessions/{}/progress", mapping.session_id);
        let headers = body_only_signed(&app, &tenant, &path, &body)?;
        let response = app.post_raw(&path, headers, body.clone()).await?;
        assert_eq!(response.status(), expected, "allowed: {allowed}");
        if allowed {
            let metrics = reqwest::get(format!("{}/metrics", app.address))
                .await?
                .text()
                .await?;
            assert!(
                metrics.contains("nubabel_callback_api_body_only_signatures_total 1"),
                "{metrics}"
            );
        } else {
            let error: Value = response.json().await?;
            let message = error["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("v2"), "{message}");
        }
    }
    Ok(())
}
