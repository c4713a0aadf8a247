//! Revoking stream tokens through the admin API: refused at the next open, open streams ended
//! within the check interval, and nothing else touched.

use std::time::Duration;

use anyhow::{Context, Result};
use nubabel_contract::stream_token::Validity;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_TOKEN, SseReader, TestApp, now, opencode_session_id, progress, sidecar, spawn_app, unique,
};

const WAIT: Duration = Duration::from_secs(5);
/// The open-streams gauge, as `/metrics` exports it.
const OPEN_STREAMS: &str = "nubabel_callback_api_sse_streams";

/// Posts a revocation for `org` with `body` (none when `None`); returns status and JSON.
async fn revoke(app: &TestApp, org: &str, body: Option<Value>) -> Result<(StatusCode, Value)> {
    let mut request = app
        .client
        .post(format!(
            "{}/api/admin/organizations/{org}/stream-tokens/revoke",
            app.admin_address
        ))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status();
    Ok((status, response.json().await?))
}

/// A token for `org` issued `seconds_ago`, valid ten minutes from its issue.
fn issued_ago(app: &TestApp, org: &str, session: Option<&str>, seconds_ago: i64) -> String {
    let issued_at = now() - seconds_ago;
    app.stream_token_with(
        org,
        session,
        Validity {
            issued_at,
            expires_at: issued_at + 600,
        },
    )
}

#[tokio::test]
async fn a_revoked_token_opens_no_stream_and_its_open_stream_ends_within_the_check_interval()
-> Result<()> {
    let app = spawn_app().await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let first = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let second = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let other_org = unique("org");
    let other_tenant = sidecar(&other_org);
    let others = app
        .register(&other_tenant, &unique("s"), &opencode_session_id())
        .await?;
    let before = app.metric(OPEN_STREAMS).await?.context("no gauge")?;

    let token = issued_ago(&app, &org, None, 2);
    let response = app.open_stream(&first.session_id, &token, None).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let mut reader = SseReader::new(response);
    app.callback(
        &tenant,
        &first.session_id,
        "progress",
        &unique("msg"),
        &progress(0),
    )
    .await?;
    assert_eq!(reader.next(WAIT).await?.seq(), 1);
    let other_token = issued_ago(&app, &other_org, None, 2);
    let response = app
        .open_stream(&others.session_id, &other_token, None)
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let mut other_reader = SseReader::new(response);

    let (status, revoked) = revoke(&app, &org, None).await?;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!(revoked["organizationId"], org.as_str());
    assert_eq!(revoked["sessionId"], Value::Null);
    let through = revoked["revokedThrough"]
        .as_i64()
        .context("no revokedThrough")?;
    assert!(through >= now() - 1, "{revoked}");

    // Keep-alives go out every second and the token has ten minutes left: only the revocation
    // can end this stream, within the one-second check interval of the tests.
    reader.wait_for_end(Duration::from_secs(4)).await?;
    for session in [&first.session_id, &second.session_id] {
        let refused = app.open_stream(session, &token, None).await?;
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        let body: Value = refused.json().await?;
        assert_eq!(body["error"]["message"], "stream token revoked");
    }
    // Another tenant's stream goes on.
    app.callback(
        &other_tenant,
        &others.session_id,
        "progress",
        &unique("msg"),
        &progress(0),
    )
    .await?;
    assert_eq!(other_reader.next(WAIT).await?.seq(), 1);
    drop(other_reader);

    // A token issued after the revocation's second reads again.
    let fresh = app.stream_token_with(&org, None, Validity::starting_at(through + 1, 600));
    let response = app.open_stream(&first.session_id, &fresh, None).await?;
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    app.wait_for_metric(OPEN_STREAMS, before, WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn revoking_one_sessions_tokens_leaves_the_tenants_other_sessions_readable() -> Result<()> {
    let app = spawn_app().await?;
    let org = unique("org");
    let tenant = sidecar(&org);
    let opencode_id = opencode_session_id();
    let revoked_session = app.register(&tenant, &unique("s"), &opencode_id).await?;
    let kept_session = app
        .register(&tenant, &unique("s"), &opencode_session_id())
        .await?;
    let tenant_token = issued_ago(&app, &org, None, 2);
    let scoped_token = issued_ago(&app, &org, Some(&revoked_session.session_id), 2);

    // Named by its OpenCode id, the session is revoked under its Nubabel id.
    let (status, revoked) = revoke(&app, &org, Some(json!({"sessionId": opencode_id}))).await?;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!(revoked["sessionId"], revoked_session.session_id.as_str());

    for token in [&tenant_token, &scoped_token] {
        let refused = app
            .open_stream(&revoked_session.session_id, token, None)
            .await?;
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        let by_opencode_id = app.open_stream(&opencode_id, token, None).await?;
        assert_eq!(by_opencode_id.status(), StatusCode::UNAUTHORIZED);
    }
    let kept = app
        .open_stream(&kept_session.session_id, &tenant_token, None)
        .await?;
    assert_eq!(kept.status(), StatusCode::OK);
    drop(kept);

    // Malformed requests change nothing and say why.
    let (status, _) = revoke(&app, &org, Some(json!({"sessionId": ""}))).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = revoke(&app, &org, Some(json!({"session": "x"}))).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = revoke(&app, "Not An Org", None).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let unauthenticated = app
        .client
        .post(format!(
            "{}/api/admin/organizations/{org}/stream-tokens/revoke",
            app.admin_address
        ))
        .send()
        .await?;
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
    let kept = app
        .open_stream(&kept_session.session_id, &tenant_token, None)
        .await?;
    assert_eq!(kept.status(), StatusCode::OK);
    Ok(())
}
