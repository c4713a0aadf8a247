//! A small upstream MCP server for tests, speaking the streamable HTTP transport the way
//! third-party servers do: `initialize` assigns an `Mcp-Session-Id` that later requests must
//! carry, notifications are answered 202, and answers come as JSON or as an SSE stream (with a
//! progress notification before the answer).
//!
//! Tools: `echo` (answers with the arguments and the `Authorization` header it received),
//! `slow` (sleeps `ms` milliseconds first) and `fail` (a result with `isError: true`). Every
//! request is recorded, and the most tool calls seen running at once is kept. In 401 mode
//! every request is refused with 401; with an accepted credential set, every other one is.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// The session id the server assigns.
pub const UPSTREAM_SESSION_ID: &str = "upstream-session-1";

/// One request the server received.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    /// The JSON-RPC method (`initialize`, `tools/list`, ...), or the HTTP method otherwise.
    pub method: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Mcp-Session-Id` header, if any.
    pub session_id: Option<String>,
    /// The `MCP-Protocol-Version` header, if any.
    pub protocol_version: Option<String>,
    /// The JSON-RPC params.
    pub params: Value,
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<ReceivedRequest>>,
    running: AtomicUsize,
    peak: AtomicUsize,
    sse: AtomicBool,
    unauthorized: AtomicBool,
    accepted: Mutex<Option<String>>,
}

/// A running upstream MCP server on its own thread. Dropping it stops the server.
pub struct McpUpstream {
    address: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for McpUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpUpstream")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl McpUpstream {
    /// Binds a free loopback port and starts serving.
    pub fn start() -> Result<Self> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// Binds a free port on `ip` and starts serving.
    pub fn start_on(ip: IpAddr) -> Result<Self> {
        let listener = std::net::TcpListener::bind((ip, 0))
            .with_context(|| format!("binding the upstream MCP server to a port on {ip}"))?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("building the upstream MCP server's runtime")?;
        let app = Router::new()
            .route(
                "/mcp",
                post(handle).get(method_not_allowed).delete(end_session),
            )
            .with_state(Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("mcp-upstream".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!("upstream MCP server: adopting the listener: {error}");
                            return;
                        }
                    };
                    let server = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = stopped.await;
                    });
                    if let Err(error) = server.await {
                        tracing::error!("upstream MCP server: {error}");
                    }
                });
            })
            .context("starting the upstream MCP server thread")?;
        Ok(Self {
            address,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The MCP endpoint, `http://ADDRESS:PORT/mcp`.
    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.address)
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Answer requests with SSE streams (true) or JSON bodies (false, the default).
    pub fn answer_with_sse(&self, sse: bool) {
        self.shared.sse.store(sse, Ordering::SeqCst);
    }

    /// Refuse every request with 401 (true), or serve them (false, the default).
    pub fn refuse_all(&self, refuse: bool) {
        self.shared.unauthorized.store(refuse, Ordering::SeqCst);
    }

    /// Refuse with 401 every request whose `Authorization` is not `authorization` (`None`
    /// accepts any, the default).
    pub fn accept_only(&self, authorization: Option<&str>) {
        *self
            .shared
            .accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = authorization.map(str::to_owned);
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The requests for `method`.
    pub fn requests_for(&self, method: &str) -> Vec<ReceivedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method)
            .collect()
    }

    /// The most tool calls that were running at once.
    pub fn peak_concurrent_calls(&self) -> usize {
        self.shared.peak.load(Ordering::SeqCst)
    }
}

impl Drop for McpUpstream {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        drop(self.thread.take());
    }
}

/// The two tools' descriptions, as `tools/list` returns them (plus `fail`).
pub fn tool_list() -> Value {
    json!([
        {
            "name": "echo",
            "description": "Answers with its arguments and the Authorization header it received",
            "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
        },
        {
            "name": "slow",
            "description": "Sleeps `ms` milliseconds, then answers",
            "inputSchema": {"type": "object", "properties": {"ms": {"type": "integer"}}, "required": ["ms"]},
        },
        {
            "name": "fail",
            "description": "Always fails",
            "inputSchema": {"type": "object"},
        },
    ])
}

fn header_string(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn method_not_allowed() -> StatusCode {
    StatusCode::METHOD_NOT_ALLOWED
}

async fn end_session(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> StatusCode {
    record(&shared, "DELETE", &headers, Value::Null);
    StatusCode::NO_CONTENT
}

fn record(shared: &Shared, method: &str, headers: &HeaderMap, params: Value) {
    shared
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(ReceivedRequest {
            method: method.to_owned(),
            authorization: header_string(headers, "authorization"),
            session_id: header_string(headers, "mcp-session-id"),
            protocol_version: header_string(headers, "mcp-protocol-version"),
            params,
        });
}

async fn handle(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let method = message
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or("response")
        .to_owned();
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    record(&shared, &method, &headers, params.clone());
    let accepted = shared
        .accepted
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let refused = accepted.is_some_and(|a| header_string(&headers, "authorization") != Some(a));
    if shared.unauthorized.load(Ordering::SeqCst) || refused {
        return (StatusCode::UNAUTHORIZED, "invalid token").into_response();
    }
    let Some(id) = message.get("id").cloned() else {
        return StatusCode::ACCEPTED.into_response();
    };
    if method != "initialize"
        && header_string(&headers, "mcp-session-id").as_deref() != Some(UPSTREAM_SESSION_ID)
    {
        return (StatusCode::BAD_REQUEST, "missing or unknown Mcp-Session-Id").into_response();
    }
    let result = match method.as_str() {
        "initialize" => json!({
            "protocolVersion": params.get("protocolVersion").cloned().unwrap_or(json!("2025-11-25")),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "test-upstream", "version": "1.0.0"},
        }),
        "tools/list" => json!({ "tools": tool_list() }),
        "tools/call" => call(&shared, &headers, &params).await,
        _ => {
            let error = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "method not found"}});
            return axum::Json(error).into_response();
        }
    };
    let answer = json!({"jsonrpc": "2.0", "id": id, "result": result});
    let mut response = if shared.sse.load(Ordering::SeqCst) {
        let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress",
                              "params": {"progressToken": 1, "progress": 1}});
        let body =
            format!("event: message\ndata: {progress}\n\nevent: message\ndata: {answer}\n\n");
        ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
    } else {
        axum::Json(answer).into_response()
    };
    if method == "initialize"
        && let Ok(value) = UPSTREAM_SESSION_ID.parse()
    {
        response.headers_mut().insert("mcp-session-id", value);
    }
    response
}

/// Counts a running call until dropped (also when the client goes away mid-call).
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn call(shared: &Shared, headers: &HeaderMap, params: &Value) -> Value {
    let running = shared.running.fetch_add(1, Ordering::SeqCst) + 1;
    let _running = Running(&shared.running);
    shared.peak.fetch_max(running, Ordering::SeqCst);
    let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
    match params.get("name").and_then(Value::as_str) {
        Some("echo") => {
            let echoed = json!({
                "arguments": arguments,
                "authorization": header_string(headers, "authorization"),
            });
            json!({"content": [{"type": "text", "text": echoed.to_string()}], "structuredContent": echoed})
        }
        Some("slow") => {
            let ms = arguments.get("ms").and_then(Value::as_u64).unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json!({"content": [{"type": "text", "text": format!("slept {ms} ms")}]})
        }
        Some("fail") => {
            json!({"content": [{"type": "text", "text": "the tool failed on purpose"}], "isError": true})
        }
        other => {
            json!({"content": [{"type": "text", "text": format!("unknown tool {other:?}")}], "isError": true})
        }
    }
}
