//! The few Slack Web API methods the bot calls: `chat.postMessage` and `chat.update`.
//!
//! The bot token goes in the `Authorization` header only and is never logged. A 429 answer
//! (Slack's rate limits) blocks every call of this client until its `Retry-After` has passed.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

/// How long one Web API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait assumed when a 429 comes without a usable `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why a Web API call failed.
#[derive(Debug, thiserror::Error)]
pub enum SlackError {
    /// Slack (or this client, after an earlier 429) asks to wait this long.
    #[error("rate limited by Slack; retry after {0:?}")]
    RateLimited(Duration),
    /// Slack answered `ok: false`.
    #[error("slack answered {0}")]
    Api(String),
    /// The call did not get an answer, or the answer was not Slack's JSON.
    #[error("calling slack failed: {0}")]
    Transport(String),
}

/// A Slack Web API client. Cheap to clone.
#[derive(Clone)]
pub struct SlackClient {
    http: reqwest::Client,
    base_url: String,
    token: SecretString,
    blocked_until: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for SlackClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackClient")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    ts: Option<String>,
}

impl SlackClient {
    /// A client of the Web API at `base_url` (e.g. `https://slack.com/api`) with bot token
    /// `token`.
    pub fn new(base_url: &str, token: SecretString) -> Result<Self, SlackError> {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| SlackError::Transport(e.to_string()))?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
            blocked_until: Arc::default(),
        })
    }

    /// Posts `text` to `channel`, in the thread of `thread_ts` when given; returns the new
    /// message's `ts`.
    pub async fn post_message(
        &self,
        channel: &str,
        thread_ts: Option<&str>,
        text: &str,
    ) -> Result<String, SlackError> {
        let mut body = json!({"channel": channel, "text": text, "unfurl_links": false});
        if let Some(thread_ts) = thread_ts {
            body["thread_ts"] = json!(thread_ts);
        }
        let answer = self.call("chat.postMessage", &body).await?;
        answer
            .ts
            .ok_or_else(|| SlackError::Transport("chat.postMessage answered without ts".into()))
    }

    /// Replaces the text of message `ts` in `channel`.
    pub async fn update_message(
        &self,
        channel: &str,
        ts: &str,
        text: &str,
    ) -> Result<(), SlackError> {
        self.call(
            "chat.update",
            &json!({"channel": channel, "ts": ts, "text": text}),
        )
        .await
        .map(|_| ())
    }

    /// How long calls are blocked by an earlier 429, if they are.
    pub fn blocked_for(&self) -> Option<Duration> {
        let until = (*lock(&self.blocked_until))?;
        until.checked_duration_since(Instant::now())
    }

    async fn call(&self, method: &str, body: &Value) -> Result<Answer, SlackError> {
        if let Some(wait) = self.blocked_for() {
            return Err(SlackError::RateLimited(wait));
        }
        let response = self
            .http
            .post(format!("{}/{method}", self.base_url))
            .bearer_auth(self.token.expose_secret())
            .json(body)
            .send()
            .await
            .map_err(|e| SlackError::Transport(e.without_url().to_string()))?;
        if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(DEFAULT_RETRY_AFTER, Duration::from_secs);
            *lock(&self.blocked_until) = Some(Instant::now() + wait);
            tracing::warn!(method, retry_after = ?wait, "slack rate limit; pausing calls");
            return Err(SlackError::RateLimited(wait));
        }
        let status = response.status();
        let answer: Answer = response.json().await.map_err(|_| {
            SlackError::Transport(format!("{method} answered {status} without Slack's JSON"))
        })?;
        if !answer.ok {
            return Err(SlackError::Api(
                answer.error.unwrap_or_else(|| "an unnamed error".into()),
            ));
        }
        Ok(answer)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Updates are single assignments, so a poisoned lock still holds a consistent value.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
