//! OAuth 2 refresh through the credential broker, against a token endpoint written for the
//! tests: refresh before expiry and on 401, single-flight across two API instances on one
//! database, rotating refresh tokens, and `invalid_grant`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use axum::{Json, Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use futures::{StreamExt, future::join_all};
use nubabel_callback_api::{
    credentials::{CredentialError, UpstreamAuth},
    state::AppState,
};
use nubabel_store::connections::{self, Connection};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, TestApp, build_app_with, unique};

/// How the token endpoint answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenMode {
    /// New tokens `at-<n>` and `rt-<n>` on the n-th refresh, valid an hour.
    Rotate,
    /// `400 {"error": "invalid_grant"}`.
    InvalidGrant,
}

#[derive(Default)]
struct Seen {
    count: AtomicUsize,
    forms: Mutex<Vec<HashMap<String, String>>>,
}

/// A local OAuth token endpoint that counts refreshes.
pub struct TokenEndpoint {
    pub url: String,
    seen: Arc<Seen>,
}

impl TokenEndpoint {
    pub async fn start(mode: TokenMode) -> Result<Self> {
        let seen = Arc::new(Seen::default());
        let app = Router::new()
            .route(
                "/token",
                post(
                    move |State(seen): State<Arc<Seen>>, body: Bytes| async move {
                        let form: HashMap<String, String> = url::form_urlencoded::parse(&body)
                            .map(|(k, v)| (k.into_owned(), v.into_owned()))
                            .collect();
                        let n = seen.count.fetch_add(1, Ordering::SeqCst) + 1;
                        seen.forms.lock().unwrap().push(form);
                        // Slow enough that concurrent callers pile up behind the first.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        match mode {
                            TokenMode::Rotate => (
                                StatusCode::OK,
                                Json(json!({
                                    "access_token": format!("at-{n}"),
                                    "refresh_token": format!("rt-{n}"),
                                    "token_type": "Bearer",
                                    "expires_in": 3600,
                                })),
                            ),
                            TokenMode::InvalidGrant => (
                                StatusCode::BAD_REQUEST,
                                Json(json!({"error": "invalid_grant"})),
                            ),
                        }
                    },
                ),
            )
            .with_state(Arc::clone(&seen));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://127.0.0.1:{}/token", listener.local_addr()?.port());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, seen })
    }

    /// Refresh requests received.
    pub fn count(&self) -> usize {
        self.seen.count.load(Ordering::SeqCst)
    }

    /// The form fields of the n-th request (0-based).
    pub fn form(&self, n: usize) -> HashMap<String, String> {
        self.seen.forms.lock().unwrap()[n].clone()
    }
}

/// Two API instances on one fresh database, allowed to reach loopback.
pub async fn two_instances() -> Result<((TestApp, AppState), (TestApp, AppState))> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let allow = |c: &mut nubabel_callback_api::config::Config| {
        c.egress_allow = vec!["127.0.0.0/8".to_owned()];
    };
    let first = build_app_with(&database_url, &redis_url, allow).await?;
    let second = build_app_with(&database_url, &redis_url, allow).await?;
    Ok((first, second))
}

impl TestApp {
    /// Sends an admin request with the admin token.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.admin_address))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let status = StatusCode::from_u16(response.status().as_u16())?;
        let text = response.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    /// Registers an OAuth connection whose access token `at-0` expires at `expires_at`.
    pub async fn register_oauth(
        &self,
        org: &str,
        provider: &str,
        token_url: &str,
        expires_at: &str,
    ) -> Result<Connection> {
        let (status, body) = self
            .admin(
                reqwest::Method::POST,
                &format!("/api/admin/organizations/{org}/connections"),
                Some(&json!({
                    "provider": provider,
                    "upstreamUrl": "http://127.0.0.1:9/mcp",
                    "auth": {
                        "type": "oauth2",
                        "tokenUrl": token_url,
                        "clientId": "client-1",
                        "clientSecret": "client-secret-1",
                        "accessToken": "at-0",
                        "refreshToken": "rt-0",
                        "expiresAt": expires_at,
                    }
                })),
            )
            .await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Ok(connections::find(&self.db, org, provider).await?.unwrap())
    }
}

fn value(auth: &UpstreamAuth) -> String {
    auth.value.expose_secret().to_owned()
}

fn an_hour_ago() -> String {
    (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)).to_string()
}

#[tokio::test]
async fn fifty_concurrent_calls_on_an_expired_token_across_two_instances_refresh_once() -> Result<()>
{
    let ((app, first), (_other, second)) = two_instances().await?;
    let endpoint = TokenEndpoint::start(TokenMode::Rotate).await?;
    let org = unique("org");
    let connection = app
        .register_oauth(&org, "linear", &endpoint.url, &an_hour_ago())
        .await?;

    let calls = (0..50).map(|i| {
        let broker = if i % 2 == 0 {
            Arc::clone(&first.credentials)
        } else {
            Arc::clone(&second.credentials)
        };
        let connection = connection.clone();
        async move { broker.authorize(&connection).await }
    });
    let results = join_all(calls).await;

    assert_eq!(endpoint.count(), 1, "exactly one refresh");
    for result in &results {
        let auth = result.as_ref().expect("authorized");
        assert_eq!(auth.header, http::header::AUTHORIZATION);
        assert_eq!(value(auth), "Bearer at-1");
    }
    let form = endpoint.form(0);
    assert_eq!(form["grant_type"], "refresh_token");
    assert_eq!(form["refresh_token"], "rt-0");
    assert_eq!(form["client_id"], "client-1");
    assert_eq!(form["client_secret"], "client-secret-1");

    // The stored expiry moved an hour ahead, so the next call uses the token as it is.
    let stored = connections::find(&app.db, &org, "linear").await?.unwrap();
    assert!(stored.token_expires_at.unwrap() > jiff::Timestamp::now());
    assert_eq!(
        value(&first.credentials.authorize(&stored).await?),
        "Bearer at-1"
    );
    assert_eq!(endpoint.count(), 1);
    Ok(())
}

#[tokio::test]
async fn a_401_refreshes_once_with_the_rotated_refresh_token() -> Result<()> {
    let ((app, first), (_other, second)) = two_instances().await?;
    let endpoint = TokenEndpoint::start(TokenMode::Rotate).await?;
    let org = unique("org");
    let in_an_hour = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
    let connection = app
        .register_oauth(&org, "linear", &endpoint.url, &in_an_hour)
        .await?;
    let current = first.credentials.authorize(&connection).await?;
    assert_eq!(value(&current), "Bearer at-0");
    assert_eq!(endpoint.count(), 0, "a fresh token is not refreshed");

    // Ten calls see the upstream refuse at-0 at once, on both instances.
    let calls = (0..10).map(|i| {
        let broker = if i % 2 == 0 {
            Arc::clone(&first.credentials)
        } else {
            Arc::clone(&second.credentials)
        };
        let (connection, rejected) = (connection.clone(), current.clone());
        async move { broker.reauthorize(&connection, &rejected).await }
    });
    for result in join_all(calls).await {
        assert_eq!(value(&result?), "Bearer at-1");
    }
    assert_eq!(endpoint.count(), 1);
    assert_eq!(endpoint.form(0)["refresh_token"], "rt-0");

    // The upstream refuses at-1 too: the next refresh presents the rotated rt-1.
    let rejected = first.credentials.authorize(&connection).await?;
    let renewed = second
        .credentials
        .reauthorize(&connection, &rejected)
        .await?;
    assert_eq!(value(&renewed), "Bearer at-2");
    assert_eq!(endpoint.count(), 2);
    assert_eq!(endpoint.form(1)["refresh_token"], "rt-1");
    Ok(())
}

#[tokio::test]
async fn invalid_grant_marks_the_connection_and_says_reauthorization_is_needed() -> Result<()> {
    let ((app, first), (_other, second)) = two_instances().await?;
    let endpoint = TokenEndpoint::start(TokenMode::InvalidGrant).await?;
    let org = unique("org");
    let connection = app
        .register_oauth(&org, "linear", &endpoint.url, &an_hour_ago())
        .await?;

    let error = first.credentials.authorize(&connection).await.unwrap_err();
    assert_eq!(
        error,
        CredentialError::NeedsReauthorization {
            provider: "linear".into()
        }
    );
    assert!(
        error.to_string().contains("needs re-authorization"),
        "{error}"
    );
    let (_, shown) = app
        .admin(
            reqwest::Method::GET,
            &format!("/api/admin/organizations/{org}/connections/linear"),
            None,
        )
        .await?;
    assert_eq!(shown["state"], "needsReauthorization");

    // The other instance fails the same way without asking the endpoint again.
    let again = second.credentials.authorize(&connection).await.unwrap_err();
    assert!(matches!(
        again,
        CredentialError::NeedsReauthorization { .. }
    ));
    assert_eq!(endpoint.count(), 1);

    // Storing new tokens re-authorizes it.
    let (status, updated) = app
        .admin(
            reqwest::Method::PATCH,
            &format!("/api/admin/organizations/{org}/connections/linear"),
            Some(&json!({"auth": {"type": "bearer", "token": "static-1"}})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["state"], "active");
    assert_eq!(
        value(&second.credentials.authorize(&connection).await?),
        "Bearer static-1"
    );
    Ok(())
}

#[tokio::test]
async fn a_token_endpoint_on_an_inward_address_is_refused_when_not_allowlisted() -> Result<()> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let (app, _) = build_app_with(&database_url, &redis_url, |_| {}).await?;
    let (status, body) = app
        .admin(
            reqwest::Method::POST,
            "/api/admin/organizations/org-a/connections",
            Some(&json!({
                "provider": "linear",
                "upstreamUrl": "https://93.184.215.14/mcp",
                "auth": {
                    "type": "oauth2",
                    "tokenUrl": "https://169.254.169.254/token",
                    "clientId": "c",
                    "accessToken": "at-0",
                }
            })),
        )
        .await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("auth.tokenUrl: egress refused"),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn a_token_endpoint_that_redirects_is_refused_and_the_form_goes_nowhere_else() -> Result<()> {
    let ((app, first), _) = two_instances().await?;
    let elsewhere = TokenEndpoint::start(TokenMode::Rotate).await?;
    let redirector = crate::egress::Landing::start().await?;
    let token_url = redirector.redirect_to(&elsewhere.url);
    let org = unique("org");
    let connection = app
        .register_oauth(&org, "linear", token_url.as_str(), &an_hour_ago())
        .await?;

    let error = first.credentials.authorize(&connection).await.unwrap_err();
    let CredentialError::Unavailable(message) = &error else {
        panic!("{error:?}");
    };
    assert!(
        message.starts_with("the token endpoint of linear")
            && message.contains("redirected")
            && message.contains("must answer directly"),
        "{message}"
    );
    assert_eq!(
        elsewhere.count(),
        0,
        "the refresh token was posted elsewhere"
    );
    // Nothing was stored: the connection is still active with its old token.
    let stored = connections::find(&app.db, &org, "linear").await?.unwrap();
    assert_eq!(stored.token_expires_at, connection.token_expires_at);
    Ok(())
}

/// A token endpoint answering 200 with twice `MAX` bytes of a chunked body, then never
/// ending it.
async fn start_endless_token_endpoint() -> Result<String> {
    const CHUNK: usize = 16 * 1024;
    let app = Router::new().route(
        "/token",
        post(|| async {
            let chunks = futures::stream::iter(
                (0..8).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; CHUNK]))),
            );
            let endless = chunks.chain(futures::stream::pending());
            axum::body::Body::from_stream(endless)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://127.0.0.1:{}/token", listener.local_addr()?.port());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

#[tokio::test]
async fn a_token_response_past_the_cap_is_refused_while_it_streams() -> Result<()> {
    let ((app, first), _) = two_instances().await?;
    let token_url = start_endless_token_endpoint().await?;
    let org = unique("org");
    let connection = app
        .register_oauth(&org, "linear", &token_url, &an_hour_ago())
        .await?;

    // The body never ends: only a reader that stops at the cap answers before the timeout.
    let error = first.credentials.authorize(&connection).await.unwrap_err();
    assert_eq!(
        error,
        CredentialError::Unavailable(
            "the token response of linear is larger than 65536 bytes".into()
        )
    );
    Ok(())
}
