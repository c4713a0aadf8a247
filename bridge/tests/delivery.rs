//! Delivery against a scripted stand-in for the callback API that checks signatures: which
//! answers are retried and after how long, and which are dropped without holding up the
//! callbacks behind them. The delivery loop runs on its own: no OpenCode, Postgres or Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use nubabel_bridge::delivery::{CallbackSender, deliver};
use nubabel_bridge::liveness::Liveness;
use nubabel_bridge::mapping::{Callback, CallbackKind};
use nubabel_bridge::metrics::Metrics;
use nubabel_bridge::outbox::Outbox;
use nubabel_bridge::retry::Backoff;
use nubabel_e2e::within;
use support::{identity, sidecar_key, verified_webhook_id};
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod support;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Short pauses, so that a pause of a second can only come from `Retry-After`.
const BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(50),
    max: Duration::from_secs(5),
};

/// One scripted answer: a status and, maybe, a `Retry-After`.
#[derive(Clone, Copy)]
struct Answer(StatusCode, Option<&'static str>);

/// One request the receiver saw: its webhook id, when, and what it was answered.
#[derive(Clone, Debug)]
struct Arrival {
    webhook_id: String,
    at: Instant,
    status: u16,
}

/// The stand-in API: per webhook id, the answers to give in turn (then 200).
#[derive(Default)]
struct Receiver {
    answers: Mutex<HashMap<String, VecDeque<Answer>>>,
    arrivals: Mutex<Vec<Arrival>>,
    bad_signatures: Mutex<u64>,
}

impl Receiver {
    fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }

    fn arrivals_of(&self, webhook_id: &str) -> Vec<Arrival> {
        self.arrivals()
            .into_iter()
            .filter(|a| a.webhook_id == webhook_id)
            .collect()
    }
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(webhook_id) = verified_webhook_id(uri.path(), &headers, &body) else {
        *receiver.bad_signatures.lock().unwrap() += 1;
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let Answer(status, retry_after) = receiver
        .answers
        .lock()
        .unwrap()
        .get_mut(&webhook_id)
        .and_then(VecDeque::pop_front)
        .unwrap_or(Answer(StatusCode::OK, None));
    receiver.arrivals.lock().unwrap().push(Arrival {
        webhook_id,
        at: Instant::now(),
        status: status.as_u16(),
    });
    let mut response = (
        status,
        r#"{"error": {"code": "scripted", "message": "scripted"}}"#,
    )
        .into_response();
    if let Some(value) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, value.parse().unwrap());
    }
    response
}

/// The delivery loop posting to the stand-in, stopped when dropped.
struct Delivery {
    receiver: Arc<Receiver>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    task: JoinHandle<()>,
    server: JoinHandle<()>,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        self.task.abort();
        self.server.abort();
    }
}

async fn start(backoff: Backoff, script: &[(&str, &[Answer])]) -> Result<Delivery> {
    let receiver = Arc::new(Receiver::default());
    *receiver.answers.lock().unwrap() = script
        .iter()
        .map(|(id, answers)| ((*id).to_owned(), answers.iter().copied().collect()))
        .collect();
    let app = Router::new()
        .route("/api/sidecar/sessions/{session}/{route}", post(receive))
        .with_state(Arc::clone(&receiver));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let sender = CallbackSender::new(&url, sidecar_key(), identity(), Duration::from_secs(5))?;
    let metrics = Arc::new(Metrics::new());
    let outbox = Arc::new(Outbox::new(100, Arc::clone(&metrics)));
    let task = tokio::spawn(deliver(
        Arc::clone(&outbox),
        sender,
        backoff,
        Arc::clone(&metrics),
        Arc::new(Liveness::default()),
    ));
    Ok(Delivery {
        receiver,
        outbox,
        metrics,
        task,
        server,
    })
}

fn callback(webhook_id: &str) -> Callback {
    Callback {
        session_id: "ses_delivery".into(),
        kind: CallbackKind::Progress,
        webhook_id: webhook_id.into(),
        body: Bytes::from(format!(
            r#"{{"progress": {{"type": "message_part", "text": "{webhook_id}"}}}}"#
        )),
    }
}

impl Delivery {
    /// Waits (bounded) until the buffer is empty and `delivered` callbacks were delivered.
    async fn until_delivered(&self, delivered: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.metrics.delivered.get() < delivered || !self.outbox.is_empty() {
            if Instant::now() >= deadline {
                bail!(
                    "{} of {delivered} delivered, {} buffered; arrivals: {:#?}",
                    self.metrics.delivered.get(),
                    self.outbox.len(),
                    self.receiver.arrivals()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*self.receiver.bad_signatures.lock().unwrap(), 0);
        Ok(())
    }
}

fn statuses(arrivals: &[Arrival]) -> Vec<u16> {
    arrivals.iter().map(|a| a.status).collect()
}

#[tokio::test]
async fn a_429_is_retried_after_its_retry_after_and_then_delivered() -> Result<()> {
    within(TEST_TIMEOUT, "the 429 test", async {
        let limited = [Answer(StatusCode::TOO_MANY_REQUESTS, Some("1"))];
        let delivery = start(BACKOFF, &[("cb-limited", &limited)]).await?;
        delivery.outbox.push(callback("cb-limited"));
        delivery.until_delivered(1).await?;

        let arrivals = delivery.receiver.arrivals_of("cb-limited");
        assert_eq!(statuses(&arrivals), [429, 200]);
        // The backoff alone would have waited 50 to 150 ms.
        let pause = arrivals[1].at - arrivals[0].at;
        assert!(
            Duration::from_secs(1) <= pause && pause < Duration::from_millis(1800),
            "retried after {pause:?}"
        );
        assert_eq!(delivery.metrics.failed_attempts.get(), 1);
        assert_eq!(delivery.metrics.rejected.get(), 0);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_retry_after_of_an_hour_is_cut_to_the_backoff_maximum() -> Result<()> {
    within(TEST_TIMEOUT, "the long Retry-After test", async {
        let backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(700),
        };
        let unavailable = [Answer(StatusCode::SERVICE_UNAVAILABLE, Some("3600"))];
        let delivery = start(backoff, &[("cb-parked", &unavailable)]).await?;
        delivery.outbox.push(callback("cb-parked"));
        delivery.until_delivered(1).await?;

        let arrivals = delivery.receiver.arrivals_of("cb-parked");
        assert_eq!(statuses(&arrivals), [503, 200]);
        let pause = arrivals[1].at - arrivals[0].at;
        assert!(
            backoff.max <= pause && pause < Duration::from_millis(1500),
            "retried after {pause:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_422_is_dropped_and_counted_and_the_callback_behind_it_is_delivered() -> Result<()> {
    within(TEST_TIMEOUT, "the 422 test", async {
        let invalid = [Answer(StatusCode::UNPROCESSABLE_ENTITY, None)];
        let delivery = start(BACKOFF, &[("cb-invalid", &invalid)]).await?;
        delivery.outbox.push(callback("cb-invalid"));
        delivery.outbox.push(callback("cb-next"));
        delivery.until_delivered(1).await?;

        let seen: Vec<(String, u16)> = delivery
            .receiver
            .arrivals()
            .into_iter()
            .map(|a| (a.webhook_id, a.status))
            .collect();
        assert_eq!(
            seen,
            [("cb-invalid".to_owned(), 422), ("cb-next".to_owned(), 200)]
        );
        assert_eq!(delivery.metrics.rejected.get(), 1);
        assert_eq!(delivery.metrics.failed_attempts.get(), 0);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_500_is_retried_until_delivered_and_keeps_its_place_in_the_queue() -> Result<()> {
    within(TEST_TIMEOUT, "the 500 test", async {
        let failing = [
            Answer(StatusCode::INTERNAL_SERVER_ERROR, None),
            Answer(StatusCode::INTERNAL_SERVER_ERROR, None),
        ];
        let delivery = start(BACKOFF, &[("cb-flaky", &failing)]).await?;
        delivery.outbox.push(callback("cb-flaky"));
        delivery.outbox.push(callback("cb-after"));
        delivery.until_delivered(2).await?;

        let seen: Vec<(String, u16)> = delivery
            .receiver
            .arrivals()
            .into_iter()
            .map(|a| (a.webhook_id, a.status))
            .collect();
        assert_eq!(
            seen,
            [
                ("cb-flaky".to_owned(), 500),
                ("cb-flaky".to_owned(), 500),
                ("cb-flaky".to_owned(), 200),
                ("cb-after".to_owned(), 200),
            ]
        );
        assert_eq!(delivery.metrics.failed_attempts.get(), 2);
        assert_eq!(delivery.metrics.rejected.get(), 0);
        Ok(())
    })
    .await
}
