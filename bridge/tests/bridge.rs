//! The bridge end to end: a real `opencode serve` driven by the scripted fake LLM, the bridge
//! in-process, and the real callback API on Postgres and Redis (a local receiver that checks
//! signatures stands in for the API only where the API must be down). One OpenCode server is
//! shared by the tests here; each test has its own session, bridge and database.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use clap::Parser;
use futures::StreamExt;
use nubabel_bridge::Bridge;
use nubabel_bridge::config::Config as BridgeConfig;
use nubabel_bridge::metrics::Metrics;
use nubabel_bridge::retry::Backoff;
use nubabel_callback_api::config::{Config as ApiConfig, LogFormat};
use nubabel_callback_api::startup::Application;
use nubabel_callback_api::state::AppState;
use nubabel_e2e::fake_llm::{ANSWER_PREFIX, TOOL_OUTPUT, TOOL_RESULT_PREFIX};
use nubabel_e2e::opencode_server::shared_opencode;
use nubabel_e2e::{fresh_database, test_redis_url, within};
use nubabel_opencode::{ClientConfig, Event, OpencodeClient, PromptRequest};
use nubabel_store::events::{self, EventKind, StoredEvent};
use nubabel_store::sessions::{NewMapping, SessionMappings, TaskRef};
use serde_json::Value;
use support::{MASTER_KEY, ORGANIZATION, identity, sidecar_key, verified_webhook_id};
use tokio::sync::oneshot;

mod support;

const TEST_TIMEOUT: Duration = Duration::from_secs(240);
const TURN_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

async fn opencode_client() -> Result<OpencodeClient> {
    let (base_url, password) = shared_opencode().await?;
    Ok(OpencodeClient::new(
        ClientConfig::new(base_url).with_password(password),
    )?)
}

/// The real callback API on a fresh database, served until the test ends.
struct Api {
    url: String,
    state: AppState,
    _stop: oneshot::Sender<()>,
}

impl Api {
    async fn start() -> Result<Self> {
        let config = ApiConfig {
            http_addr: "127.0.0.1:0".parse()?,
            admin_http_addr: "127.0.0.1:0".parse()?,
            database_url: fresh_database().await?.into(),
            database_max_connections: 4,
            redis_url: test_redis_url().await?.into(),
            signing_master_key: MASTER_KEY.into(),
            stream_token_key: "bridge-test-stream-key-0123456789abcdef".into(),
            max_body_bytes: 64 * 1024,
            signature_tolerance_seconds: 300,
            accept_body_only_signatures: false,
            stream_max_len: 1000,
            stream_max_bytes: nubabel_store::streams::DEFAULT_STREAM_MAX_BYTES,
            sse_keep_alive_seconds: 15,
            stream_revocation_check_seconds: 15,
            status_mirror: false,
            status_mirror_interval_ms: 1000,
            log_format: LogFormat::Text,
            delegate_api: false,
            delegate_max_wait_seconds: 900,
            slack_bot_token: None,
            slack_signing_secret: None,
            slack_api_url: "https://slack.com/api".into(),
            slack_teams: Vec::new(),
            slack_progress_interval_ms: 2000,
            slack_final_sweep_seconds: 60,
            retention_events_days: 30,
            retention_results_days: 90,
            retention_interval_seconds: 3600,
            vault_keys: None,
            admin_token: None,
            egress_allow: Vec::new(),
            oauth_refresh_skew_seconds: 60,
            mcp_call_timeout_ms: 20_000,
            mcp_tenant_concurrency: 8,
            mcp_queue_timeout_ms: 5_000,
            mcp_tools_cache_seconds: 60,
            commit_max_batch: 64,
            header_read_timeout_seconds: 10,
            callback_tenant_concurrency: 256,
            sse_tenant_streams: 500,
            sse_tenant_replays: 4,
            delegate_tenant_waits: 100,
            commit_concurrency: 4,
        };
        let application = Application::build(config).await?;
        let url = format!("http://127.0.0.1:{}", application.port());
        let state = application.state().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(application.run_until(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            url,
            state,
            _stop: stop,
        })
    }

    /// Records what the operator records before it prompts: the Nubabel session `nubabel_id`
    /// runs as `opencode_id` on pod `fleet-0`, for task `team-a/<nubabel_id>`.
    async fn map(&self, nubabel_id: &str, opencode_id: &str) -> Result<uuid::Uuid> {
        let identity = identity();
        let task = TaskRef::new("team-a", nubabel_id)?;
        let mapping = SessionMappings::new(self.state.db.clone())
            .record(&NewMapping {
                sidecar: &identity,
                session_id: nubabel_id,
                opencode_session_id: opencode_id,
                pod_name: "fleet-0",
                task: Some(&task),
            })
            .await?;
        Ok(mapping.session_pk)
    }

    /// The session's committed events, polled until `done` accepts them (bounded).
    async fn events_until(
        &self,
        session_pk: uuid::Uuid,
        limit: Duration,
        done: impl Fn(&[StoredEvent]) -> bool,
    ) -> Result<Vec<StoredEvent>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let stored = events::list_after(&self.state.db, session_pk, 0, 1000).await?;
            if done(&stored) {
                return Ok(stored);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "waited {limit:?}; committed so far: {:#?}",
                    describe(&stored)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn describe(stored: &[StoredEvent]) -> Vec<String> {
    stored
        .iter()
        .map(|e| format!("{} {} {}", e.kind.as_str(), e.event_type, e.event_id))
        .collect()
}

fn has(stored: &[StoredEvent], kind: EventKind, event_type: &str) -> bool {
    stored
        .iter()
        .any(|e| e.kind == kind && e.event_type == event_type)
}

fn position(stored: &[StoredEvent], event_type: &str) -> usize {
    stored
        .iter()
        .position(|e| e.event_type == event_type)
        .unwrap_or_else(|| panic!("no {event_type} in {:#?}", describe(stored)))
}

/// A bridge in-process, configured the way the operator's pod spec does it (flags standing in
/// for the same environment variables), with short retry pauses.
struct RunningBridge {
    metrics: Arc<Metrics>,
    probes: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start_bridge(callback_url: &str) -> Result<RunningBridge> {
    let (opencode_url, password) = shared_opencode().await?;
    let config = BridgeConfig::try_parse_from([
        "nubabel-bridge".to_owned(),
        format!("--opencode-url={opencode_url}"),
        format!("--opencode-password={password}"),
        format!("--callback-url={callback_url}"),
        format!("--signing-key={}", sidecar_key().to_whsec()),
        "--sidecar=team-a/fleet".to_owned(),
        format!("--organization-id={ORGANIZATION}"),
        "--pod-name=fleet-0".to_owned(),
        "--listen=127.0.0.1:0".to_owned(),
    ])?;
    let mut settings = config.settings()?;
    settings.delivery_backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    let bridge = Bridge::bind(settings).await?;
    let metrics = bridge.metrics();
    let probes = bridge.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(bridge.run(async {
        let _ = stopped.await;
    }));
    // `server.connected` counts as the first event: from then on nothing is missed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metrics.events.get() == 0 {
        if tokio::time::Instant::now() >= deadline {
            bail!("the bridge did not connect to OpenCode's event stream within 10 s");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(RunningBridge {
        metrics,
        probes,
        _stop: stop,
    })
}

async fn wait_for_idle(
    client: &OpencodeClient,
    session: &str,
    start: impl Future<Output = Result<()>>,
) -> Result<()> {
    let mut events = client.events().await?;
    start.await?;
    let wait = async {
        while let Some(envelope) = events.next().await {
            if matches!(&envelope?.event, Event::SessionIdle { session_id } if session_id == session)
            {
                return Ok(());
            }
        }
        bail!("the event stream ended")
    };
    tokio::time::timeout(TURN_TIMEOUT, wait)
        .await
        .context("OpenCode did not finish the turn")?
}

#[tokio::test]
async fn a_tool_call_turn_reaches_the_callback_api_signed_complete_and_in_order() -> Result<()> {
    within(TEST_TIMEOUT, "the tool call callback test", async {
        let api = Api::start().await?;
        let bridge = start_bridge(&api.url).await?;
        let client = opencode_client().await?;
        let session = client.create_session(Some("bridge tool call")).await?;
        let pk = api.map("bridge-tool-call", &session.id).await?;

        client
            .prompt_async(&session.id, &PromptRequest::text("TOOLCALL please"))
            .await?;
        let stored = api
            .events_until(pk, TURN_TIMEOUT, |stored| {
                has(stored, EventKind::Progress, "session_idle")
            })
            .await?;

        let kinds = describe(&stored);
        assert_eq!(
            (stored[0].kind, stored[0].event_type.as_str()),
            (EventKind::State, "busy"),
            "{kinds:#?}"
        );
        assert_eq!(stored[0].body["metadata"]["pod"], "fleet-0");
        let start = position(&stored, "tool_execute_start");
        let end = position(&stored, "tool_execute_end");
        assert!(start < end, "{kinds:#?}");
        assert_eq!(stored[start].body["tool"], "bash");
        assert_eq!(stored[end].body["status"], "completed");
        assert_eq!(
            stored[end].body["output"].as_str().map(str::trim),
            Some(TOOL_OUTPUT)
        );
        let final_text: Vec<&Value> = stored
            .iter()
            .filter(|e| e.event_type == "message_part" && e.body["final"] == true)
            .map(|e| &e.body["text"])
            .collect();
        assert_eq!(
            final_text.last().and_then(|t| t.as_str()),
            Some(format!("{TOOL_RESULT_PREFIX}{TOOL_OUTPUT}").as_str())
        );
        // The turn ends with the idle state, then the end-of-turn event.
        let tail: Vec<(EventKind, &str)> = stored[stored.len() - 2..]
            .iter()
            .map(|e| (e.kind, e.event_type.as_str()))
            .collect();
        assert_eq!(
            tail,
            [
                (EventKind::State, "idle"),
                (EventKind::Progress, "session_idle")
            ],
            "{kinds:#?}"
        );
        // Busy is posted once per turn even though OpenCode repeats it.
        assert_eq!(
            stored.iter().filter(|e| e.event_type == "busy").count(),
            1,
            "{kinds:#?}"
        );

        let (_, summary) = events::progress_summary(&api.state.db, pk)
            .await?
            .context("no summary")?;
        assert_eq!((summary.tools_started, summary.tools_completed), (1, 1));
        assert_eq!(summary.last_tool.as_deref(), Some("bash"));
        // The answer to the last callback may reach the bridge just after the test reads the
        // events back: wait for the count, within a deadline.
        let wanted = u64::try_from(stored.len())?;
        let counted = tokio::time::timeout(Duration::from_secs(10), async {
            while bridge.metrics.delivered.get() < wanted {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            counted.is_ok(),
            "the bridge counted {} of {wanted} delivered callbacks",
            bridge.metrics.delivered.get()
        );

        let ready = reqwest::get(format!("http://{}/readyz", bridge.probes)).await?;
        assert_eq!(ready.status(), 200);
        let metrics = reqwest::get(format!("http://{}/metrics", bridge.probes))
            .await?
            .text()
            .await?;
        assert!(
            metrics.contains("nubabel_bridge_callbacks_delivered_total"),
            "{metrics}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_bridge_started_mid_turn_posts_the_busy_state_from_status_and_the_idle_after_abort()
-> Result<()> {
    within(TEST_TIMEOUT, "the resync test", async {
        let api = Api::start().await?;
        let client = opencode_client().await?;
        let session = client.create_session(Some("bridge resync")).await?;
        let pk = api.map("bridge-resync", &session.id).await?;

        // The turn is under way before the bridge exists: only GET /session/status can tell it.
        let mut events = client.events().await?;
        client
            .prompt_async(&session.id, &PromptRequest::text("SLOW:60"))
            .await?;
        tokio::time::timeout(TURN_TIMEOUT, async {
            while let Some(envelope) = events.next().await {
                if matches!(&envelope?.event, Event::MessagePartDelta { session_id, .. } if *session_id == session.id) {
                    return Ok(());
                }
            }
            bail!("the event stream ended")
        })
        .await
        .context("no token streamed")??;

        let _bridge = start_bridge(&api.url).await?;
        let stored = api
            .events_until(pk, Duration::from_secs(15), |stored| has(stored, EventKind::State, "busy"))
            .await?;
        assert!(stored[0].event_id.starts_with("resync-"), "{:#?}", describe(&stored));

        assert!(client.abort(&session.id).await?);
        let stored = api
            .events_until(pk, Duration::from_secs(30), |stored| has(stored, EventKind::Progress, "session_idle"))
            .await?;
        let error = &stored[position(&stored, "session_error")].body;
        assert_eq!(error["name"], "MessageAbortedError");
        let idle = &stored[position(&stored, "idle")];
        assert_eq!(idle.kind, EventKind::State);
        assert_eq!(idle.body["metadata"]["error"]["name"], "MessageAbortedError");
        Ok(())
    })
    .await
}

/// What the stand-in receiver saw: verified callbacks, in arrival order.
#[derive(Default)]
struct Receiver {
    up: AtomicBool,
    refused_while_down: AtomicU64,
    bad_signatures: AtomicU64,
    accepted: Mutex<Vec<(String, String, Value)>>,
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    Path((session, route)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let target = format!("/api/sidecar/sessions/{session}/{route}");
    let Some(id) = verified_webhook_id(&target, &headers, &body) else {
        receiver.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    };
    if !receiver.up.load(Ordering::Relaxed) {
        receiver.refused_while_down.fetch_add(1, Ordering::Relaxed);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let kind = if route == "update" {
        body["state"].clone()
    } else {
        body["progress"]["type"].clone()
    };
    receiver.accepted.lock().unwrap().push((
        session,
        id,
        serde_json::json!({"route": route, "kind": kind, "body": body}),
    ));
    StatusCode::OK
}

#[tokio::test]
async fn callbacks_wait_while_the_api_is_down_and_arrive_complete_and_in_order_when_it_is_back()
-> Result<()> {
    within(TEST_TIMEOUT, "the buffer and retry test", async {
        let receiver = Arc::new(Receiver::default());
        let app = Router::new()
            .route("/api/sidecar/sessions/{session}/{route}", post(receive))
            .with_state(Arc::clone(&receiver));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });

        let bridge = start_bridge(&url).await?;
        let client = opencode_client().await?;
        let session = client.create_session(Some("bridge buffer")).await?;
        let prompt = format!("buffered MARK-{}", session.id);
        wait_for_idle(&client, &session.id, async {
            Ok(client
                .prompt_async(&session.id, &PromptRequest::text(prompt.clone()))
                .await?)
        })
        .await?;

        // The whole turn happened while the API was down: it is all buffered.
        let ours = |receiver: &Receiver| -> Vec<(String, Value)> {
            receiver
                .accepted
                .lock()
                .unwrap()
                .iter()
                .filter(|(s, _, _)| *s == session.id)
                .map(|(_, id, v)| (id.clone(), v.clone()))
                .collect()
        };
        // busy, the answer, idle and session_idle at least (the bridge may read the last
        // events a moment after this test's own stream did).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while bridge.metrics.buffered.get() < 4 {
            if tokio::time::Instant::now() >= deadline {
                bail!("only {} callbacks buffered", bridge.metrics.buffered.get());
            }
            tokio::time::sleep(POLL).await;
        }
        assert!(ours(&receiver).is_empty());
        assert!(receiver.refused_while_down.load(Ordering::Relaxed) > 0);
        assert!(bridge.metrics.failed_attempts.get() > 0);

        receiver.up.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !ours(&receiver)
            .iter()
            .any(|(_, v)| v["kind"] == "session_idle")
        {
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "not delivered after the API came back: {:#?}",
                    ours(&receiver)
                );
            }
            tokio::time::sleep(POLL).await;
        }

        let delivered = ours(&receiver);
        let kinds: Vec<&str> = delivered
            .iter()
            .map(|(_, v)| v["kind"].as_str().unwrap_or("?"))
            .collect();
        assert_eq!(kinds.first(), Some(&"busy"), "{kinds:?}");
        assert_eq!(
            &kinds[kinds.len() - 2..],
            ["idle", "session_idle"],
            "{kinds:?}"
        );
        let last_text = delivered
            .iter()
            .rfind(|(_, v)| v["kind"] == "message_part")
            .map(|(_, v)| v["body"]["progress"]["text"].clone());
        assert_eq!(
            last_text,
            Some(Value::String(format!("{ANSWER_PREFIX}{prompt}")))
        );
        let mut ids: Vec<&String> = delivered.iter().map(|(id, _)| id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(
            ids.len(),
            delivered.len(),
            "a callback arrived twice: {delivered:#?}"
        );
        assert_eq!(receiver.bad_signatures.load(Ordering::Relaxed), 0);
        assert_eq!(bridge.metrics.dropped.get(), 0);
        Ok(())
    })
    .await
}
