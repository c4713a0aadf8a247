//! A fake Slack for tests: the Web API methods the bot calls (`chat.postMessage`,
//! `chat.update`), answering like Slack does, and signed Events API requests to send to the
//! callback API.
//!
//! Every call is recorded with whether it carried the expected bot token; a wrong token gets
//! Slack's `{"ok": false, "error": "invalid_auth"}`. [`FakeSlack::rate_limit_next`] makes the
//! next call of a method answer 429 with `Retry-After`, as Slack's tier limits do;
//! [`FakeSlack::fail_call`] makes a later call answer `{"ok": false, "error": ...}`.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// One Web API call the fake received.
#[derive(Debug, Clone)]
pub struct SlackCall {
    /// The method, e.g. `chat.postMessage`.
    pub method: String,
    /// The JSON body.
    pub body: Value,
    /// Whether it carried the expected bot token.
    pub authorized: bool,
    /// The HTTP status the fake answered.
    pub status: u16,
    /// Whether the answer was a success (`"ok": true`).
    pub ok: bool,
}

impl SlackCall {
    /// The message text of the call.
    pub fn text(&self) -> &str {
        self.body["text"].as_str().unwrap_or_default()
    }
}

#[derive(Default)]
struct Shared {
    token: String,
    calls: Vec<SlackCall>,
    next_ts: u64,
    rate_limited: Vec<(String, u64)>,
    /// Method, how many of its calls still succeed before the failing one, and the error.
    failing: Vec<(String, usize, String)>,
}

/// A running fake Slack Web API. Stops when dropped.
pub struct FakeSlack {
    address: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    server: JoinHandle<()>,
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeSlack {
    /// Starts the fake on `ip` (port 0), accepting bot token `token`.
    pub async fn start(ip: IpAddr, token: &str) -> Result<Self> {
        let shared = Arc::new(Mutex::new(Shared {
            token: token.to_owned(),
            next_ts: 1_700_000_000,
            ..Shared::default()
        }));
        let app = Router::new()
            .route("/api/{method}", post(call))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .context("binding the fake slack")?;
        let address = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            address,
            shared,
            server,
        })
    }

    /// The base URL to configure as `NUBABEL_SLACK_API_URL`.
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.address)
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<SlackCall> {
        lock(&self.shared).calls.clone()
    }

    /// The calls of `method` so far.
    pub fn calls_to(&self, method: &str) -> Vec<SlackCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method)
            .collect()
    }

    /// Answers the next call of `method` with 429 and `Retry-After: retry_after_seconds`.
    pub fn rate_limit_next(&self, method: &str, retry_after_seconds: u64) {
        lock(&self.shared)
            .rate_limited
            .push((method.to_owned(), retry_after_seconds));
    }

    /// Lets `succeeding` more calls of `method` through, then answers the next one with
    /// Slack's `{"ok": false, "error": error}` (recorded with status 200, as Slack sends it).
    pub fn fail_call(&self, method: &str, succeeding: usize, error: &str) {
        lock(&self.shared)
            .failing
            .push((method.to_owned(), succeeding, error.to_owned()));
    }

    /// Waits until `done` holds for the calls so far; returns them.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&[SlackCall]) -> bool,
    ) -> Result<Vec<SlackCall>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let calls = self.calls();
            if done(&calls) {
                return Ok(calls);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "fake slack: {what} did not happen within {limit:?}; calls: {calls:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn call(
    State(shared): State<Arc<Mutex<Shared>>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut shared = lock(&shared);
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", shared.token));
    let limited = shared
        .rate_limited
        .iter()
        .position(|(m, _)| *m == method)
        .map(|i| shared.rate_limited.remove(i).1);
    let (status, answer) = if let Some(retry_after) = limited {
        shared.calls.push(SlackCall {
            method,
            body,
            authorized,
            status: 429,
            ok: false,
        });
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after.to_string())],
            "",
        )
            .into_response();
    } else if !authorized {
        (
            StatusCode::OK,
            json!({"ok": false, "error": "invalid_auth"}),
        )
    } else if let Some(error) = take_failure(&mut shared.failing, &method) {
        (StatusCode::OK, json!({"ok": false, "error": error}))
    } else {
        match method.as_str() {
            "chat.postMessage" => {
                shared.next_ts += 1;
                let ts = format!("{}.000100", shared.next_ts);
                (
                    StatusCode::OK,
                    json!({"ok": true, "channel": body["channel"], "ts": ts,
                           "message": {"text": body["text"], "ts": ts, "thread_ts": body["thread_ts"]}}),
                )
            }
            "chat.update" => (
                StatusCode::OK,
                json!({"ok": true, "channel": body["channel"], "ts": body["ts"], "text": body["text"]}),
            ),
            _ => (
                StatusCode::OK,
                json!({"ok": false, "error": "unknown_method"}),
            ),
        }
    };
    shared.calls.push(SlackCall {
        method,
        body,
        authorized,
        status: status.as_u16(),
        ok: answer["ok"] == true,
    });
    (status, axum::Json(answer)).into_response()
}

/// Counts a call of `method` against the armed failures; returns the error when it is due.
fn take_failure(failing: &mut Vec<(String, usize, String)>, method: &str) -> Option<String> {
    let index = failing.iter().position(|(m, _, _)| m == method)?;
    if failing[index].1 == 0 {
        return Some(failing.remove(index).2);
    }
    failing[index].1 -= 1;
    None
}

/// An `event_callback` body for a message event of `kind` (`app_mention` or `message` in a DM).
pub fn message_event(
    event_id: &str,
    team: &str,
    channel: &str,
    ts: &str,
    thread_ts: Option<&str>,
    text: &str,
) -> Value {
    let mut event = json!({
        "type": "app_mention", "user": "U0PERSON", "text": text, "ts": ts,
        "channel": channel, "event_ts": ts,
    });
    if let Some(thread_ts) = thread_ts {
        event["thread_ts"] = json!(thread_ts);
    }
    json!({
        "token": "legacy-verification-token", "team_id": team, "api_app_id": "A0NUBABEL",
        "event": event, "type": "event_callback", "event_id": event_id,
        "event_time": 1_700_000_000,
    })
}

/// Signs `body` as Slack does at `timestamp`: the `X-Slack-Request-Timestamp` and
/// `X-Slack-Signature` headers.
pub fn signed_headers(
    signing_secret: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let timestamp = timestamp.to_string();
    vec![
        ("content-type", "application/json".to_owned()),
        ("x-slack-request-timestamp", timestamp.clone()),
        (
            "x-slack-signature",
            nubabel_callback_api::slack::signature::sign(
                signing_secret.as_bytes(),
                &timestamp,
                body,
            ),
        ),
    ]
}
