//! Spawning the application and talking to it like a sidecar or a stream reader would.

use std::{collections::VecDeque, time::Duration};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use nubabel_callback_api::{
    config::{Config, LogFormat},
    startup::Application,
};
use nubabel_contract::{
    identity::{OrganizationId, SidecarIdentity},
    signing::{self, MasterKey, RequestTarget, derive_sidecar_key},
    stream_token::{self, StreamTokenKey},
};
use nubabel_store::sessions::{NewMapping, SessionMapping, SessionMappings, TaskRef};
use reqwest::{Response, header::HeaderMap};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::oneshot;

pub const MASTER_KEY: &str = "test-master-key-0123456789abcdefghij";
pub const STREAM_KEY: &str = "test-stream-key-0123456789abcdefghij";
/// The vault keyring of tests: one key, `k1`, of 32 bytes 0x01.
pub const VAULT_KEYS: &str = "k1=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123";

/// A running application and what a test needs to reach it.
pub struct TestApp {
    pub address: String,
    /// The admin listener's address (`http://127.0.0.1:PORT`).
    pub admin_address: String,
    pub db: PgPool,
    pub database_url: String,
    pub redis_url: String,
    pub client: reqwest::Client,
    /// The startup re-encryption of stale vault rows, when the app has a vault.
    pub reencryption: Option<tokio::task::JoinHandle<()>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// A config for tests: port 0, no Kubernetes, fixed keys, a short keep-alive.
pub fn test_config(database_url: &str, redis_url: &str) -> Config {
    Config {
        http_addr: "127.0.0.1:0".parse().expect("address"),
        admin_http_addr: "127.0.0.1:0".parse().expect("address"),
        database_url: database_url.into(),
        database_max_connections: 8,
        redis_url: redis_url.into(),
        signing_master_key: MASTER_KEY.into(),
        stream_token_key: STREAM_KEY.into(),
        max_body_bytes: 16 * 1024,
        signature_tolerance_seconds: 300,
        accept_body_only_signatures: false,
        stream_max_len: 1000,
        stream_max_bytes: nubabel_store::streams::DEFAULT_STREAM_MAX_BYTES,
        sse_keep_alive_seconds: 1,
        stream_revocation_check_seconds: 1,
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
        vault_keys: Some(VAULT_KEYS.into()),
        admin_token: Some(ADMIN_TOKEN.into()),
        egress_allow: Vec::new(),
        oauth_refresh_skew_seconds: 60,
        mcp_call_timeout_ms: 5_000,
        mcp_tenant_concurrency: 8,
        mcp_queue_timeout_ms: 1_000,
        mcp_tools_cache_seconds: 60,
        commit_max_batch: 64,
        header_read_timeout_seconds: 10,
        callback_tenant_concurrency: 256,
        sse_tenant_streams: 500,
        sse_tenant_replays: 4,
        delegate_tenant_waits: 100,
        commit_concurrency: 4,
    }
}

/// The application on a fresh database and the shared test Redis.
pub async fn spawn_app() -> Result<TestApp> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    spawn_app_on(&database_url, &redis_url).await
}

/// The application on the given database and Redis (several apps may share them).
pub async fn spawn_app_on(database_url: &str, redis_url: &str) -> Result<TestApp> {
    spawn_app_with(database_url, redis_url, |_| {}).await
}

/// The application on a fresh database and the shared test Redis, its test config changed by
/// `configure`.
pub async fn spawn_app_configured(configure: impl FnOnce(&mut Config)) -> Result<TestApp> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    spawn_app_with(&database_url, &redis_url, configure).await
}

/// The application on the given database and Redis, with `configure` applied to the test
/// config (vault keys, admin token, egress allowlist, ...).
pub async fn spawn_app_with(
    database_url: &str,
    redis_url: &str,
    configure: impl FnOnce(&mut Config),
) -> Result<TestApp> {
    Ok(build_app_with(database_url, redis_url, configure).await?.0)
}

/// Like [`spawn_app_with`], also handing out the application's state (its credential broker,
/// egress client, ...).
pub async fn build_app_with(
    database_url: &str,
    redis_url: &str,
    configure: impl FnOnce(&mut Config),
) -> Result<(TestApp, nubabel_callback_api::state::AppState)> {
    if std::env::var_os("TEST_LOG").is_some() {
        // The secrets-in-logs test owns the global subscriber; it also prints under TEST_LOG.
        crate::connections::capture_all_logs();
    }
    let mut config = test_config(database_url, redis_url);
    configure(&mut config);
    let mut application = Application::build(config).await?;
    let reencryption = application.take_reencryption();
    let state = application.state().clone();
    let address = format!("http://127.0.0.1:{}", application.port());
    let admin_address = format!("http://{}", application.admin_addr()?);
    let db = application.state().db.clone();
    let (shutdown, stopped) = oneshot::channel();
    tokio::spawn(application.run_until(async {
        let _ = stopped.await;
    }));
    Ok((
        TestApp {
            address,
            admin_address,
            db,
            database_url: database_url.to_owned(),
            redis_url: redis_url.to_owned(),
            client: reqwest::Client::new(),
            reencryption,
            shutdown: Some(shutdown),
        },
        state,
    ))
}

pub fn sidecar(org: &str) -> SidecarIdentity {
    SidecarIdentity::new(org, &format!("ns-{org}"), "fleet").expect("valid identity")
}

pub fn now() -> i64 {
    nubabel_callback_api::auth::unix_now()
}

/// A unique OpenCode session id (`ses_...`), as OpenCode makes them.
pub fn opencode_session_id() -> String {
    format!("ses_{}", uuid::Uuid::new_v4().simple())
}

/// Unique ids per test, so tests sharing Redis never share keys.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

impl TestApp {
    /// Registers a session the way the operator does before it sends a prompt.
    pub async fn register(
        &self,
        sidecar: &SidecarIdentity,
        session_id: &str,
        opencode_session_id: &str,
    ) -> Result<SessionMapping> {
        let task = TaskRef::new(
            sidecar.namespace(),
            &format!("task-{}", session_id.to_lowercase().replace('_', "-")),
        )?;
        Ok(SessionMappings::new(self.db.clone())
            .record(&NewMapping {
                sidecar,
                session_id,
                opencode_session_id,
                pod_name: "fleet-0",
                task: Some(&task),
            })
            .await?)
    }

    /// Signed headers for a POST of `body` to `path`, as `sidecar`'s bridge sends them.
    pub fn signed_headers(
        &self,
        sidecar: &SidecarIdentity,
        path: &str,
        webhook_id: &str,
        timestamp: i64,
        body: &[u8],
    ) -> HeaderMap {
        let master = MasterKey::new(MASTER_KEY.as_bytes()).expect("master key");
        let key = derive_sidecar_key(&master, sidecar);
        let mut headers = HeaderMap::new();
        let mut set = |name: &'static str, value: String| {
            headers.insert(name, value.parse().expect("header value"));
        };
        set("content-type", "application/json".into());
        set("webhook-id", webhook_id.into());
        set("webhook-timestamp", timestamp.to_string());
        set(
            "webhook-signature",
            signing::sign_request(&key, webhook_id, timestamp, RequestTarget::post(path), body),
        );
        set(
            "x-nubabel-organization",
            sidecar.organization_id().to_string(),
        );
        set(
            "x-nubabel-sidecar",
            format!("{}/{}", sidecar.namespace(), sidecar.name()),
        );
        headers
    }

    /// Posts a raw body with the given headers.
    pub async fn post_raw(
        &self,
        path: &str,
        headers: HeaderMap,
        body: Vec<u8>,
    ) -> Result<Response> {
        Ok(self
            .client
            .post(format!("{}{path}", self.address))
            .headers(headers)
            .body(body)
            .send()
            .await?)
    }

    /// Posts a signed callback to `/api/sidecar/sessions/{session}/{action}`.
    pub async fn callback(
        &self,
        sidecar: &SidecarIdentity,
        session: &str,
        action: &str,
        webhook_id: &str,
        body: &Value,
    ) -> Result<Response> {
        let body = serde_json::to_vec(body)?;
        let path = format!("/api/sidecar/sessions/{session}/{action}");
        let headers = self.signed_headers(sidecar, &path, webhook_id, now(), &body);
        self.post_raw(&path, headers, body).await
    }

    /// A stream token for `org` (optionally limited to one session), valid ten minutes.
    pub fn stream_token(&self, org: &str, session_id: Option<&str>) -> String {
        self.stream_token_valid_for(org, session_id, 600)
    }

    /// A stream token for `org` (optionally limited to one session), valid `seconds` from now.
    pub fn stream_token_valid_for(
        &self,
        org: &str,
        session_id: Option<&str>,
        seconds: i64,
    ) -> String {
        self.stream_token_with(
            org,
            session_id,
            stream_token::Validity::starting_at(now(), seconds),
        )
    }

    /// A stream token for `org` (optionally limited to one session) with the given `iat` and
    /// `exp`, whatever they are.
    pub fn stream_token_with(
        &self,
        org: &str,
        session_id: Option<&str>,
        validity: stream_token::Validity,
    ) -> String {
        let key = StreamTokenKey::new(STREAM_KEY.as_bytes()).expect("stream key");
        stream_token::issue(
            &key,
            &OrganizationId::parse(org).expect("org"),
            session_id,
            validity,
        )
    }

    /// Opens the SSE stream of `session`.
    pub async fn open_stream(
        &self,
        session: &str,
        token: &str,
        last_event_id: Option<i64>,
    ) -> Result<Response> {
        let mut request = self
            .client
            .get(format!(
                "{}/api/sidecar/sessions/{session}/stream",
                self.address
            ))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        Ok(request.send().await?)
    }

    /// The value `/metrics` shows for `series` (a metric name with its labels, as exported).
    pub async fn metric(&self, series: &str) -> Result<Option<f64>> {
        let exposition = self
            .client
            .get(format!("{}/metrics", self.address))
            .send()
            .await?
            .text()
            .await?;
        Ok(exposition.lines().find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        }))
    }

    /// Waits until `/metrics` shows `value` for `series`, failing after `limit`.
    pub async fn wait_for_metric(&self, series: &str, value: f64, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let current = self.metric(series).await?;
            if current == Some(value) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{series} is {current:?}, not {value}, after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Number of rows in `table`.
    pub async fn count(&self, table: &str) -> Result<i64> {
        let sql = match table {
            "sessions" => "select count(*) from sessions",
            "session_events" => "select count(*) from session_events",
            "session_mappings" => "select count(*) from session_mappings",
            other => bail!("unknown table {other}"),
        };
        Ok(sqlx::query_scalar(sql).fetch_one(&self.db).await?)
    }
}

/// One parsed SSE event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn seq(&self) -> i64 {
        self.id
            .as_deref()
            .and_then(|id| id.parse().ok())
            .unwrap_or(-1)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// Reads SSE events off a streaming response.
pub struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
    ready: VecDeque<SseEvent>,
    /// Comment lines seen (keep-alives).
    pub comments: usize,
}

impl SseReader {
    pub fn new(response: Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
            ready: VecDeque::new(),
            comments: 0,
        }
    }

    /// The next event that carries data, waiting at most `limit`.
    pub async fn next(&mut self, limit: Duration) -> Result<SseEvent> {
        tokio::time::timeout(limit, async {
            loop {
                if let Some(event) = self.ready.pop_front() {
                    return Ok(event);
                }
                let chunk = self.body.next().await.context("stream ended")??;
                self.buffer.push_str(std::str::from_utf8(&chunk)?);
                while let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    self.parse_block(&block);
                }
            }
        })
        .await
        .context("no SSE event in time")?
    }

    /// Reads until the server ends the stream cleanly, keeping the events read on the way;
    /// fails if the body breaks off with an error or is still open after `limit`.
    pub async fn wait_for_end(&mut self, limit: Duration) -> Result<()> {
        tokio::time::timeout(limit, async {
            while let Some(chunk) = self.body.next().await {
                self.buffer.push_str(std::str::from_utf8(&chunk?)?);
                while let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    self.parse_block(&block);
                }
            }
            Ok(())
        })
        .await
        .context("the stream is still open")?
    }

    /// Waits for `n` events.
    pub async fn take(&mut self, n: usize, limit: Duration) -> Result<Vec<SseEvent>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next(limit).await?);
        }
        Ok(out)
    }

    fn parse_block(&mut self, block: &str) {
        let mut event = SseEvent {
            id: None,
            event: None,
            data: String::new(),
        };
        let mut has_data = false;
        for line in block.lines() {
            if line.starts_with(':') {
                self.comments += 1;
            } else if let Some(v) = line.strip_prefix("id: ") {
                event.id = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("event: ") {
                event.event = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                if has_data {
                    event.data.push('\n');
                }
                event.data.push_str(v);
                has_data = true;
            }
        }
        if has_data {
            self.ready.push_back(event);
        }
    }
}

pub fn progress(i: usize) -> Value {
    serde_json::json!({ "progress": { "type": "tool_execute_start", "tool": format!("tool-{i}") } })
}
