//! Signing and sending callbacks, with retries.
//!
//! Each request carries the Standard Webhooks headers (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature`, signed over the request and body with the sidecar's key as
//! `nubabel_contract::signing::sign_request` does) and the
//! identity headers the callback API derives the key from. A retry sends the same id and body
//! with a fresh timestamp, so the API deduplicates it. When to retry and how long to wait is
//! [`crate::retry`]'s decision; a callback refused for good is dropped, so it never holds up the
//! ones behind it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nubabel_contract::identity::SidecarIdentity;
use nubabel_contract::signing::{RequestTarget, SidecarKey, sign_request};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};

use crate::liveness::Liveness;
use crate::mapping::Callback;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::random;
use crate::retry::{Backoff, honours_retry_after, is_retryable, parse_retry_after};

/// Header naming the caller's organization (as the callback API reads it).
pub const ORGANIZATION_HEADER: &str = "x-nubabel-organization";
/// Header naming the caller's sidecar fleet as `<namespace>/<name>`.
pub const SIDECAR_HEADER: &str = "x-nubabel-sidecar";

/// What one attempt to deliver a callback gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The API committed it (or had committed it before).
    Delivered,
    /// The API refused it for good: sending it again cannot help.
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The start of the API's answer.
        reason: String,
    },
    /// No answer, or an answer that says "later" (5xx, 408, 429).
    Retry {
        /// Why.
        reason: String,
        /// The pause the API asked for (`Retry-After` on 429 and 503), if it gave a valid one.
        retry_after: Option<Duration>,
    },
}

/// Signs and posts callbacks to one callback API.
#[derive(Debug, Clone)]
pub struct CallbackSender {
    http: reqwest::Client,
    base_url: String,
    key: SidecarKey,
    identity: SidecarIdentity,
}

impl CallbackSender {
    /// A sender to `base_url` (the API's root, e.g. `http://nubabel-callback-api:8080`).
    pub fn new(
        base_url: &str,
        key: SidecarKey,
        identity: SidecarIdentity,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            key,
            identity,
        })
    }

    /// The API's base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// One attempt.
    pub async fn send(&self, callback: &Callback) -> Outcome {
        let timestamp = unix_seconds();
        let path = callback.path();
        let signature = sign_request(
            &self.key,
            &callback.webhook_id,
            timestamp,
            RequestTarget::post(&path),
            &callback.body,
        );
        let request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", &callback.webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .header(
                ORGANIZATION_HEADER,
                self.identity.organization_id().as_str(),
            )
            .header(
                SIDECAR_HEADER,
                format!("{}/{}", self.identity.namespace(), self.identity.name()),
            )
            .body(callback.body.clone());
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                return Outcome::Retry {
                    reason: error_chain(&error),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Outcome::Delivered;
        }
        let code = status.as_u16();
        let retry_after = if honours_retry_after(code) {
            response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| parse_retry_after(value, SystemTime::now()))
        } else {
            None
        };
        let reason: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        if is_retryable(code) {
            Outcome::Retry {
                reason: format!("{code}: {reason}"),
                retry_after,
            }
        } else {
            Outcome::Rejected {
                status: code,
                reason,
            }
        }
    }

    /// Whether the API's `/healthz` answers 2xx.
    pub async fn api_healthy(&self) -> bool {
        let url = format!("{}/healthz", self.base_url);
        matches!(self.http.get(url).send().await, Ok(response) if response.status().is_success())
    }
}

/// Delivers the buffer's callbacks in order, forever: each is retried with jittered exponential
/// backoff (at least as long as the API's `Retry-After`) until the API accepts or refuses it, or
/// it is dropped from a full buffer meanwhile.
pub async fn deliver(
    outbox: Arc<Outbox>,
    sender: CallbackSender,
    backoff: Backoff,
    metrics: Arc<Metrics>,
    liveness: Arc<Liveness>,
) {
    loop {
        let (seq, callback) = outbox.front().await;
        let mut pause = backoff.initial;
        let mut attempts = 0_u32;
        loop {
            attempts += 1;
            match sender.send(&callback).await {
                Outcome::Delivered => {
                    metrics.delivered.inc();
                    liveness.api_answered();
                    if attempts > 1 {
                        tracing::info!(attempts, webhook_id = %callback.webhook_id, "callback delivered after retries");
                    }
                    break;
                }
                Outcome::Rejected { status, reason } => {
                    metrics.rejected.inc();
                    liveness.api_answered();
                    // 404: a session the operator never mapped (e.g. one opened by hand).
                    tracing::warn!(
                        status,
                        reason,
                        session = %callback.session_id,
                        webhook_id = %callback.webhook_id,
                        kind = %callback.summary(),
                        "the callback API refused a callback; dropped"
                    );
                    break;
                }
                Outcome::Retry {
                    reason,
                    retry_after,
                } => {
                    metrics.failed_attempts.inc();
                    pause = backoff.retry_pause(pause, retry_after, random::fraction());
                    // The first failure and then every tenth, so an outage does not flood the log.
                    if attempts == 1 || attempts.is_multiple_of(10) {
                        tracing::warn!(
                            attempts,
                            reason,
                            ?retry_after,
                            ?pause,
                            buffered = outbox.len(),
                            "callback delivery failed; retrying"
                        );
                    }
                    tokio::time::sleep(pause).await;
                    if !outbox.is_front(seq) {
                        break;
                    }
                }
            }
        }
        outbox.remove(seq);
    }
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// An error with its causes, for logs (reqwest's own message omits them).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
