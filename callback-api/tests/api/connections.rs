//! The admin API of MCP connections: authentication, the lifecycle, validation, and that no
//! secret ever appears in a response or a log line.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tracing_subscriber::fmt::MakeWriter;

use crate::{
    helpers::{build_app_with, spawn_app, spawn_app_with, unique},
    oauth::{TokenEndpoint, TokenMode},
};

fn loopback(config: &mut nubabel_callback_api::config::Config) {
    config.egress_allow = vec!["127.0.0.0/8".to_owned()];
}

#[tokio::test]
async fn admin_routes_need_the_admin_token() -> Result<()> {
    let app = spawn_app().await?;
    let url = format!(
        "{}/api/admin/organizations/org-a/connections",
        app.admin_address
    );
    let missing = app.client.get(&url).send().await?;
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let wrong = app.client.get(&url).bearer_auth("nope").send().await?;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let body: Value = wrong.json().await?;
    assert_eq!(body["error"]["message"], "invalid admin token");
    Ok(())
}

#[tokio::test]
async fn the_admin_api_is_served_only_on_its_own_listener() -> Result<()> {
    let app = spawn_app().await?;
    let path = "/api/admin/organizations/org-a/connections";
    // With the right token, on the API's listener (the one sidecars reach): no such route.
    let public = app
        .client
        .get(format!("{}{path}", app.address))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .send()
        .await?;
    assert_eq!(public.status(), StatusCode::NOT_FOUND);
    let (status, body) = app.admin(Method::GET, path, None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    // And the admin listener serves nothing else.
    let stray = app
        .client
        .get(format!("{}/healthz", app.admin_address))
        .send()
        .await?;
    assert_eq!(stray.status(), StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn without_an_admin_token_configured_the_admin_api_answers_503() -> Result<()> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let app = spawn_app_with(&database_url, &redis_url, |c| c.admin_token = None).await?;
    let (status, body) = app
        .admin(
            Method::GET,
            "/api/admin/organizations/org-a/connections",
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body["error"]["message"],
        "the admin API is disabled: set NUBABEL_ADMIN_TOKEN"
    );
    Ok(())
}

#[tokio::test]
async fn without_vault_keys_connections_cannot_be_stored_or_used() -> Result<()> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let with_vault = spawn_app_with(&database_url, &redis_url, loopback).await?;
    let org = unique("org");
    let body = json!({"provider": "linear", "upstreamUrl": "http://127.0.0.1:9/mcp",
                      "auth": {"type": "bearer", "token": "t"}});
    let path = format!("/api/admin/organizations/{org}/connections");
    let (status, _) = with_vault.admin(Method::POST, &path, Some(&body)).await?;
    assert_eq!(status, StatusCode::CREATED);

    let (without, state) = build_app_with(&database_url, &redis_url, |c| {
        loopback(c);
        c.vault_keys = None;
    })
    .await?;
    let (status, answer) = without.admin(Method::POST, &path, Some(&body)).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer["error"]["message"],
        "the credential vault is not configured: set NUBABEL_VAULT_KEYS"
    );
    let connection = nubabel_store::connections::find(&without.db, &org, "linear")
        .await?
        .unwrap();
    let error = state.credentials.authorize(&connection).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "credentials are unavailable: the credential vault is not configured (NUBABEL_VAULT_KEYS)"
    );
    Ok(())
}

#[tokio::test]
async fn connections_are_created_listed_updated_and_deleted_per_tenant() -> Result<()> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let app = spawn_app_with(&database_url, &redis_url, loopback).await?;
    let (org_a, org_b) = (unique("org-a"), unique("org-b"));
    let base_a = format!("/api/admin/organizations/{org_a}/connections");

    let (status, created) = app
        .admin(
            Method::POST,
            &base_a,
            Some(&json!({
                "provider": "github",
                "upstreamUrl": "http://127.0.0.1:7001/mcp",
                "auth": {"type": "apiKey", "header": "X-Api-Key", "key": "key-1"},
            })),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["provider"], "github");
    assert_eq!(created["organizationId"], org_a.as_str());
    assert_eq!(created["state"], "active");
    assert_eq!(
        created["auth"],
        json!({"type": "apiKey", "header": "x-api-key", "secrets": ["apiKey"]})
    );

    let (status, duplicate) = app
        .admin(
            Method::POST,
            &base_a,
            Some(&json!({
                "provider": "github",
                "upstreamUrl": "http://127.0.0.1:7001/mcp",
                "auth": {"type": "bearer", "token": "t"},
            })),
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{duplicate}");

    // Another tenant may use the same provider name; lists are per tenant.
    let (status, _) = app
        .admin(
            Method::POST,
            &format!("/api/admin/organizations/{org_b}/connections"),
            Some(&json!({
                "provider": "github",
                "upstreamUrl": "http://127.0.0.1:7002/mcp",
                "auth": {"type": "bearer", "token": "token-b"},
            })),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED);
    let (_, list) = app.admin(Method::GET, &base_a, None).await?;
    let providers: Vec<&str> = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["upstreamUrl"].as_str().unwrap())
        .collect();
    assert_eq!(providers, ["http://127.0.0.1:7001/mcp"]);

    let (status, updated) = app
        .admin(
            Method::PATCH,
            &format!("{base_a}/github"),
            Some(&json!({"upstreamUrl": "http://127.0.0.1:7001/v2/mcp"})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["upstreamUrl"], "http://127.0.0.1:7001/v2/mcp");
    assert_eq!(updated["auth"]["secrets"], json!(["apiKey"]));

    let (status, _) = app
        .admin(Method::DELETE, &format!("{base_a}/github"), None)
        .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, gone) = app
        .admin(Method::GET, &format!("{base_a}/github"), None)
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        gone["error"]["message"],
        "no connection for provider \"github\""
    );
    // B's connection is untouched.
    let (status, _) = app
        .admin(
            Method::GET,
            &format!("/api/admin/organizations/{org_b}/connections/github"),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn invalid_registrations_are_refused_with_the_field_named() -> Result<()> {
    let app = spawn_app().await?;
    let base = "/api/admin/organizations/org-a/connections";
    let cases = [
        (
            json!({"provider": "Bad_Name", "upstreamUrl": "https://93.184.215.14/", "auth": {"type": "bearer", "token": "t"}}),
            "provider: must be 1 to 32 characters of [a-z0-9-]",
        ),
        (
            json!({"provider": "p", "upstreamUrl": "not a url", "auth": {"type": "bearer", "token": "t"}}),
            "upstreamUrl: not a valid URL",
        ),
        (
            json!({"provider": "p", "upstreamUrl": "http://127.0.0.1:8080/mcp", "auth": {"type": "bearer", "token": "t"}}),
            "upstreamUrl: egress refused: http://127.0.0.1:8080 must use https",
        ),
        (
            json!({"provider": "p", "upstreamUrl": "https://169.254.169.254/", "auth": {"type": "bearer", "token": "t"}}),
            "upstreamUrl: egress refused: 169.254.169.254 resolves to 169.254.169.254",
        ),
        (
            json!({"provider": "p", "upstreamUrl": "https://[::1]/mcp", "auth": {"type": "bearer", "token": "t"}}),
            "upstreamUrl: egress refused: ::1 resolves to ::1, a loopback address",
        ),
        (
            json!({"provider": "p", "upstreamUrl": "https://localhost:9/mcp", "auth": {"type": "bearer", "token": "t"}}),
            "upstreamUrl: egress refused: localhost resolves to",
        ),
        (
            json!({"provider": "p", "upstreamUrl": "https://93.184.215.14/", "auth": {"type": "bearer", "token": " "}}),
            "auth.token: must not be empty",
        ),
        (
            json!({"provider": "p", "upstreamUrl": "https://93.184.215.14/", "auth": {"type": "apiKey", "header": "bad header", "key": "k"}}),
            "auth.header: must be a valid HTTP header name",
        ),
        (
            json!({"provider": "p", "upstreamUrl": "https://93.184.215.14/", "auth": {"type": "password", "password": "k"}}),
            "auth.type: unknown variant `password`",
        ),
        (
            json!({"provider": "p", "upstreamUrl": "https://93.184.215.14/"}),
            "missing field `auth`",
        ),
    ];
    for (body, expected) in cases {
        let (status, answer) = app.admin(Method::POST, base, Some(&body)).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(expected), "{body}: {message}");
    }
    Ok(())
}

/// Log output of the current thread's subscriber.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::env::var_os("TEST_LOG").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// Every log line of this test process at TRACE level, from the first call on. A global
/// subscriber, as a thread-scoped one misses events whose callsites other tests' threads
/// registered first; other tests' lines land here too, which the assertions tolerate. With
/// `TEST_LOG` set, lines are printed as well.
pub fn capture_all_logs() -> Captured {
    static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURED
        .get_or_init(|| {
            let captured = Captured::default();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(captured.clone())
                .with_ansi(false)
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber");
            captured
        })
        .clone()
}

#[tokio::test]
async fn no_secret_appears_in_responses_or_logs() -> Result<()> {
    let captured = capture_all_logs();

    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let (app, state) = build_app_with(&database_url, &redis_url, loopback).await?;
    let endpoint = TokenEndpoint::start(TokenMode::Rotate).await?;
    let org = unique("org");
    let base = format!("/api/admin/organizations/{org}/connections");
    let secrets = [
        "bearer-SECRET-1",
        "apikey-SECRET-2",
        "access-SECRET-3",
        "refresh-SECRET-4",
        "client-SECRET-5",
        "bearer-SECRET-6",
    ];
    let mut answers = Vec::new();
    let requests = [
        (
            Method::POST,
            base.clone(),
            Some(
                json!({"provider": "one", "upstreamUrl": "http://127.0.0.1:9/mcp",
                        "auth": {"type": "bearer", "token": secrets[0]}}),
            ),
        ),
        (
            Method::POST,
            base.clone(),
            Some(
                json!({"provider": "two", "upstreamUrl": "http://127.0.0.1:9/mcp",
                        "auth": {"type": "apiKey", "header": "x-key", "key": secrets[1]}}),
            ),
        ),
        (
            Method::POST,
            base.clone(),
            Some(
                json!({"provider": "three", "upstreamUrl": "http://127.0.0.1:9/mcp",
                        "auth": {"type": "oauth2", "tokenUrl": endpoint.url, "clientId": "c",
                                 "accessToken": secrets[2], "refreshToken": secrets[3],
                                 "clientSecret": secrets[4], "expiresIn": 1}}),
            ),
        ),
        // Refused requests carrying secrets must not echo them either.
        (
            Method::POST,
            base.clone(),
            Some(
                json!({"provider": "four", "upstreamUrl": "https://10.0.0.1/",
                        "auth": {"type": "bearer", "token": secrets[5]}}),
            ),
        ),
        (
            Method::POST,
            base.clone(),
            Some(
                json!({"provider": "four", "upstreamUrl": "http://127.0.0.1:9/mcp",
                        "auth": {"type": "bearer", "token": secrets[5], "extra": secrets[5]}}),
            ),
        ),
        (
            Method::PATCH,
            format!("{base}/one"),
            Some(json!({"auth": {"type": "bearer", "token": secrets[5]}})),
        ),
        (Method::GET, base.clone(), None),
        (Method::GET, format!("{base}/three"), None),
    ];
    for (method, path, body) in &requests {
        let (status, answer) = app.admin(method.clone(), path, body.as_ref()).await?;
        answers.push((status, answer));
    }
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| s.as_u16()).collect();
    assert_eq!(statuses, [201, 201, 201, 422, 422, 200, 200, 200]);
    assert_eq!(
        answers[7].1["auth"]["secrets"],
        json!(["accessToken", "refreshToken", "clientSecret"])
    );

    // A refresh (the token expires within the skew) goes through the broker and the token
    // endpoint, with the refresh token and client secret in its request.
    let three = nubabel_store::connections::find(&app.db, &org, "three")
        .await?
        .unwrap();
    state.credentials.authorize(&three).await?;
    assert_eq!(endpoint.count(), 1);
    assert_eq!(endpoint.form(0)["refresh_token"], secrets[3]);

    let logs = String::from_utf8(captured.0.lock().unwrap().clone())?;
    assert!(
        logs.contains("registered an MCP connection")
            && logs.contains("refreshed an OAuth access token"),
        "the capture saw the requests: {logs}"
    );
    for secret in secrets.iter().chain(["at-1", "rt-1"].iter()) {
        assert!(!logs.contains(secret), "{secret} in logs");
        for (_, answer) in &answers {
            assert!(!answer.to_string().contains(secret), "{secret} in {answer}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn moving_the_upstream_url_reseals_the_secrets_within_its_origin_and_needs_them_across()
-> Result<()> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let (app, state) = build_app_with(&database_url, &redis_url, loopback).await?;
    let org = unique("org");
    let base = format!("/api/admin/organizations/{org}/connections");
    let (status, created) = app
        .admin(
            Method::POST,
            &base,
            Some(&json!({
                "provider": "github",
                "upstreamUrl": "http://127.0.0.1:7001/mcp",
                "auth": {"type": "apiKey", "header": "x-api-key", "key": "key-1"},
            })),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let path = format!("{base}/github");
    let key = || async {
        let connection = nubabel_store::connections::find(&app.db, &org, "github")
            .await
            .unwrap()
            .unwrap();
        let auth = state.credentials.authorize(&connection).await.unwrap();
        secrecy::ExposeSecret::expose_secret(&auth.value).to_owned()
    };

    // Another path on the same origin: the stored key is sealed again, for the new URL.
    let (status, moved) = app
        .admin(
            Method::PATCH,
            &path,
            Some(&json!({"upstreamUrl": "http://127.0.0.1:7001/v2/mcp"})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_eq!(moved["auth"]["secrets"], json!(["apiKey"]));
    assert_eq!(key().await, "key-1");

    // Another origin (another port, another host): the key does not follow without being given again.
    for other in ["http://127.0.0.1:7003/mcp", "http://127.0.0.2:7001/v2/mcp"] {
        let (status, refused) = app
            .admin(Method::PATCH, &path, Some(&json!({"upstreamUrl": other})))
            .await?;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{other}: {refused}"
        );
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("auth: required when upstreamUrl moves to another origin"),
            "{message}"
        );
    }
    let (_, unchanged) = app.admin(Method::GET, &path, None).await?;
    assert_eq!(unchanged["upstreamUrl"], "http://127.0.0.1:7001/v2/mcp");
    assert_eq!(key().await, "key-1");

    let (status, replaced) = app
        .admin(
            Method::PATCH,
            &path,
            Some(&json!({
                "upstreamUrl": "http://127.0.0.1:7003/mcp",
                "auth": {"type": "apiKey", "header": "x-api-key", "key": "key-2"},
            })),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["upstreamUrl"], "http://127.0.0.1:7003/mcp");
    assert_eq!(key().await, "key-2");
    Ok(())
}
