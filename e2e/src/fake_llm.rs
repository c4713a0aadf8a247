//! A scripted fake LLM for tests: an OpenAI-compatible streaming chat completions server, so a
//! real OpenCode server runs offline with deterministic answers, tool calls, errors and delays.
//!
//! The script reads trigger words in the text of the last user message:
//!
//! | trigger      | reply                                                                   |
//! |--------------|-------------------------------------------------------------------------|
//! | (none)       | `Hello from the fake LLM. You said: <the prompt>` (so markers echo back) |
//! | `TOOLCALL`   | a `bash` tool call running `echo hello-from-tool`                        |
//! | `MCPCALL:<tool>:<json>` | a call of tool `<tool>` (e.g. an MCP tool, `nubabel_<provider>_<tool>`) with the JSON object as arguments |
//! | `ERROR400`   | HTTP 400 with an OpenAI-style error body (OpenCode does not retry)       |
//! | `ERROR500`   | HTTP 500, every time (OpenCode retries forever)                          |
//! | `SLOW` / `SLOW:N` | N tokens (default 30), one per second                              |
//!
//! A tool call is answered only when the request offers tools and the last message is the
//! user's; after a tool result the reply is `The tool said: <output>`, so an agent loop ends.
//! Title-generation requests (no tools, a "title" system prompt) get a short fixed title. Every
//! request body is recorded, with its arrival time, for assertions and measurements.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// The title every title-generation request gets.
pub const FAKE_TITLE: &str = "Fake title";
/// What the bash tool call of `TOOLCALL` prints.
pub const TOOL_OUTPUT: &str = "hello-from-tool";
/// The command the `TOOLCALL` tool call runs.
pub const TOOL_COMMAND: &str = "echo hello-from-tool";
/// Tokens a bare `SLOW` streams.
pub const DEFAULT_SLOW_TOKENS: u32 = 30;
/// Prefix of every plain answer; the prompt follows it.
pub const ANSWER_PREFIX: &str = "Hello from the fake LLM. You said: ";
/// Prefix of the answer after a tool result; the tool's output follows it.
pub const TOOL_RESULT_PREFIX: &str = "The tool said: ";
/// Longest prompt echoed back, in characters.
const MAX_ECHO_CHARS: usize = 200;
/// Pause between one `SLOW` token and the next.
const SLOW_TOKEN_INTERVAL: Duration = Duration::from_secs(1);

/// What the script answers to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Stream this text, in a few chunks.
    Text(String),
    /// Stream one tool call.
    ToolCall {
        /// The tool's name.
        name: String,
        /// The arguments, as a JSON string.
        arguments: String,
    },
    /// Stream `tokens` tokens, one per second.
    Slow {
        /// How many tokens.
        tokens: u32,
    },
    /// Answer with this status and an OpenAI-style error body.
    Error {
        /// The HTTP status.
        status: u16,
        /// The error message.
        message: String,
    },
}

/// Decides the reply to one chat completions request body.
pub fn script(request: &Value) -> Reply {
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let has_tools = request
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|tools| !tools.is_empty());
    if !has_tools && is_title_request(messages) {
        return Reply::Text(FAKE_TITLE.to_owned());
    }
    let last = messages.last();
    if let Some(last) = last.filter(|m| m.get("role").and_then(Value::as_str) == Some("tool")) {
        return Reply::Text(format!("{TOOL_RESULT_PREFIX}{}", message_text(last).trim()));
    }
    let prompt = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(message_text)
        .unwrap_or_default();
    let last_is_user = last.and_then(|m| m.get("role")).and_then(Value::as_str) == Some("user");
    if prompt.contains("ERROR400") {
        return Reply::Error {
            status: 400,
            message: "fake bad request".to_owned(),
        };
    }
    if prompt.contains("ERROR500") {
        return Reply::Error {
            status: 500,
            message: "fake server error".to_owned(),
        };
    }
    if let Some((name, arguments)) = mcp_call(&prompt).filter(|_| has_tools && last_is_user) {
        return Reply::ToolCall { name, arguments };
    }
    if prompt.contains("TOOLCALL") && has_tools && last_is_user {
        let arguments = json!({"command": TOOL_COMMAND, "description": "Echo a greeting"});
        return Reply::ToolCall {
            name: "bash".to_owned(),
            arguments: arguments.to_string(),
        };
    }
    if let Some(rest) = prompt.split("SLOW").nth(1) {
        let tokens = rest
            .strip_prefix(':')
            .and_then(|n| {
                let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .unwrap_or(DEFAULT_SLOW_TOKENS);
        return Reply::Slow { tokens };
    }
    let echoed: String = prompt.trim().chars().take(MAX_ECHO_CHARS).collect();
    Reply::Text(format!("{ANSWER_PREFIX}{echoed}"))
}

/// Prefix of the trigger that calls a named tool: `MCPCALL:<tool>:<json object>`.
pub const MCP_CALL_TRIGGER: &str = "MCPCALL:";

/// The tool name and JSON arguments of an `MCPCALL:<tool>:<json>` trigger in `prompt`.
pub fn mcp_call(prompt: &str) -> Option<(String, String)> {
    let (_, rest) = prompt.split_once(MCP_CALL_TRIGGER)?;
    let (name, rest) = rest.split_once(':')?;
    let name = name.trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    let arguments = serde_json::Deserializer::from_str(rest)
        .into_iter::<Value>()
        .next()?
        .ok()
        .filter(Value::is_object)?;
    Some((name.to_owned(), arguments.to_string()))
}

/// OpenCode's title generator has its own system prompt ("You are a title generator...").
fn is_title_request(messages: &[Value]) -> bool {
    messages
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("system"))
        .any(|m| message_text(m).to_lowercase().contains("title"))
}

/// The text of a message whose content is a string or a list of `{type:"text", text}` parts.
pub fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// One SSE frame of the stream, and how long to wait before sending it.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Pause before this frame.
    pub delay: Duration,
    /// The `data:` payload: a chunk object, or `[DONE]`.
    pub data: String,
}

/// The frames of a streamed reply (`Text`, `ToolCall` or `Slow`; errors are not streamed).
pub fn frames(reply: &Reply, model: &str, completion_id: &str, call_id: &str) -> Vec<Frame> {
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let now = |value: Value| Frame {
        delay: Duration::ZERO,
        data: value.to_string(),
    };
    let mut out = vec![now(chunk(
        json!({"role": "assistant", "content": ""}),
        None,
    ))];
    let finish = match reply {
        Reply::Text(text) => {
            // Word-sized chunks, so OpenCode sees several deltas as with a real model.
            for piece in text.split_inclusive(' ') {
                out.push(now(chunk(json!({ "content": piece }), None)));
            }
            "stop"
        }
        Reply::Slow { tokens } => {
            for n in 1..=*tokens {
                out.push(Frame {
                    delay: SLOW_TOKEN_INTERVAL,
                    data: chunk(json!({ "content": format!("slow-{n} ") }), None).to_string(),
                });
            }
            "stop"
        }
        Reply::ToolCall { name, arguments } => {
            out.push(now(chunk(
                json!({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                        "function": {"name": name, "arguments": ""}}]}),
                None,
            )));
            // Two fragments: OpenCode must concatenate streamed arguments.
            let middle = arguments.len() / 2;
            let split = (0..=middle)
                .rev()
                .find(|&i| arguments.is_char_boundary(i))
                .unwrap_or(0);
            for fragment in [&arguments[..split], &arguments[split..]] {
                out.push(now(chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}),
                    None,
                )));
            }
            "tool_calls"
        }
        Reply::Error { .. } => return Vec::new(),
    };
    out.push(now(chunk(json!({}), Some(finish))));
    out.push(now(json!({
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    })));
    out.push(Frame {
        delay: Duration::ZERO,
        data: "[DONE]".to_owned(),
    });
    out
}

/// The OpenAI-style error body of an error reply.
pub fn error_body(status: u16, message: &str) -> Value {
    let kind = if status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

/// One request as the fake LLM received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// When its body had been read (wall clock, for comparing with other processes' times).
    pub at: SystemTime,
    /// The request body.
    pub body: Value,
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Received>>,
    counter: AtomicU64,
}

/// A running fake LLM on `127.0.0.1:<random port>` (or another address), served from a thread of its own (so it
/// outlives the runtime of any one test). Dropping it stops the server.
pub struct FakeLlm {
    address: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeLlm")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl FakeLlm {
    /// Binds a free loopback port and starts serving.
    pub fn start() -> Result<Self> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// Binds a free port on `ip` and starts serving (pods on the node shim reach host
    /// services on `node_shim::HOST_IP`, never on 127.0.0.1, which is their own address).
    pub fn start_on(ip: std::net::IpAddr) -> Result<Self> {
        let listener = std::net::TcpListener::bind((ip, 0))
            .with_context(|| format!("binding the fake LLM to a port on {ip}"))?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the fake LLM's runtime")?;
        let app = router(Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("fake-llm".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!("fake LLM: adopting the listener: {error}");
                            return;
                        }
                    };
                    let server = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = stopped.await;
                    });
                    if let Err(error) = server.await {
                        tracing::error!("fake LLM: {error}");
                    }
                });
            })
            .context("starting the fake LLM thread")?;
        Ok(Self {
            address,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The OpenAI-compatible base URL, `http://ADDRESS:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.address)
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Every request body received so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.received().into_iter().map(|r| r.body).collect()
    }

    /// Every request received so far with its arrival time, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The request bodies whose JSON text contains `needle`.
    pub fn requests_containing(&self, needle: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|request| request.to_string().contains(needle))
            .collect()
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // Open SSE responses (a `SLOW` reply) would hold a graceful shutdown; don't wait.
        drop(self.thread.take());
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .with_state(shared)
}

async fn models() -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}))
        .into_response()
}

async fn chat_completions(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => {
            let body = error_body(400, &format!("the body is not JSON: {error}"));
            return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        }
    };
    shared
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Received {
            at: SystemTime::now(),
            body: request.clone(),
        });
    let n = shared.counter.fetch_add(1, Ordering::Relaxed) + 1;
    let reply = script(&request);
    if let Reply::Error { status, message } = &reply {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, axum::Json(error_body(status.as_u16(), message))).into_response();
    }
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("fake-model");
    let frames = frames(
        &reply,
        model,
        &format!("chatcmpl-{n}"),
        &format!("call_fake_{n}"),
    );
    let streamed = request.get("stream").and_then(Value::as_bool) != Some(false);
    if !streamed {
        return axum::Json(whole_completion(&reply, model, n)).into_response();
    }
    let stream = futures::stream::unfold(frames.into_iter(), |mut rest| async move {
        let frame = rest.next()?;
        if !frame.delay.is_zero() {
            tokio::time::sleep(frame.delay).await;
        }
        let bytes = Bytes::from(format!("data: {}\n\n", frame.data));
        Some((Ok::<_, Infallible>(bytes), rest))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|error| {
            let body = error_body(500, &error.to_string());
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
        })
}

/// The non-streamed form (`"stream": false`), which OpenCode does not use but clients may.
fn whole_completion(reply: &Reply, model: &str, n: u64) -> Value {
    let (message, finish) = match reply {
        Reply::ToolCall { name, arguments } => (
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": format!("call_fake_{n}"),
                   "type": "function", "function": {"name": name, "arguments": arguments}}]}),
            "tool_calls",
        ),
        Reply::Text(text) => (json!({"role": "assistant", "content": text}), "stop"),
        Reply::Slow { tokens } => {
            let text: String = (1..=*tokens).map(|n| format!("slow-{n} ")).collect();
            (json!({"role": "assistant", "content": text}), "stop")
        }
        Reply::Error { message, .. } => (json!({"role": "assistant", "content": message}), "stop"),
    };
    json!({
        "id": format!("chatcmpl-{n}"),
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Value {
        json!({"role": "user", "content": text})
    }

    fn with_tools(messages: Vec<Value>) -> Value {
        json!({"model": "fake-model", "stream": true, "messages": messages,
               "tools": [{"type": "function", "function": {"name": "bash"}}]})
    }

    #[test]
    fn a_plain_prompt_is_echoed_after_a_fixed_prefix() {
        let reply = script(&with_tools(vec![
            json!({"role": "system", "content": "You are opencode"}),
            user("Say PONG MARK-42"),
        ]));
        assert_eq!(
            reply,
            Reply::Text(format!("{ANSWER_PREFIX}Say PONG MARK-42"))
        );
    }

    #[test]
    fn toolcall_asks_for_bash_only_when_tools_are_offered_and_the_user_spoke_last() {
        let reply = script(&with_tools(vec![user("please TOOLCALL")]));
        let Reply::ToolCall { name, arguments } = reply else {
            panic!("expected a tool call, got {reply:?}");
        };
        assert_eq!(name, "bash");
        let arguments: Value = serde_json::from_str(&arguments).unwrap();
        assert_eq!(arguments["command"], TOOL_COMMAND);

        let no_tools = json!({"messages": [user("please TOOLCALL")]});
        assert!(matches!(script(&no_tools), Reply::Text(_)));

        let after_tool = with_tools(vec![
            user("please TOOLCALL"),
            json!({"role": "assistant", "content": null, "tool_calls": []}),
            json!({"role": "tool", "tool_call_id": "call_1", "content": "hello-from-tool\n"}),
        ]);
        assert_eq!(
            script(&after_tool),
            Reply::Text(format!("{TOOL_RESULT_PREFIX}hello-from-tool"))
        );
    }

    #[test]
    fn mcpcall_calls_the_named_tool_with_the_json_arguments() {
        let reply = script(&with_tools(vec![user(
            r#"please MCPCALL:nubabel_alpha_echo:{"text": "hi there"} and report"#,
        )]));
        let Reply::ToolCall { name, arguments } = reply else {
            panic!("expected a tool call, got {reply:?}");
        };
        assert_eq!(name, "nubabel_alpha_echo");
        assert_eq!(
            serde_json::from_str::<Value>(&arguments).unwrap(),
            json!({"text": "hi there"})
        );
        assert_eq!(mcp_call("MCPCALL:tool:not json"), None);
        assert_eq!(mcp_call("MCPCALL::{}"), None);
        assert_eq!(mcp_call("MCPCALL:tool:[1]"), None);
        assert!(matches!(
            script(&json!({"messages": [user("MCPCALL:t:{}")]})),
            Reply::Text(_)
        ));
    }

    #[test]
    fn title_requests_get_a_short_title_even_when_the_prompt_has_a_trigger() {
        let request = json!({"messages": [
            {"role": "system", "content": "You are a title generator. You output ONLY a thread title."},
            {"role": "user", "content": [{"type": "text", "text": "ERROR500 TOOLCALL"}]},
        ]});
        assert_eq!(script(&request), Reply::Text(FAKE_TITLE.to_owned()));
    }

    #[test]
    fn error_triggers_answer_with_their_status() {
        assert!(matches!(
            script(&with_tools(vec![user("ERROR400")])),
            Reply::Error { status: 400, .. }
        ));
        assert!(matches!(
            script(&with_tools(vec![user("x ERROR500 y")])),
            Reply::Error { status: 500, .. }
        ));
        let body = error_body(400, "fake bad request");
        assert_eq!(body["error"]["message"], "fake bad request");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn slow_takes_an_optional_token_count() {
        assert_eq!(
            script(&with_tools(vec![user("SLOW:3 now")])),
            Reply::Slow { tokens: 3 }
        );
        assert_eq!(
            script(&with_tools(vec![user("go SLOW")])),
            Reply::Slow {
                tokens: DEFAULT_SLOW_TOKENS
            }
        );
        let frames = frames(&Reply::Slow { tokens: 3 }, "m", "c", "k");
        let delayed = frames
            .iter()
            .filter(|f| f.delay == SLOW_TOKEN_INTERVAL)
            .count();
        assert_eq!(delayed, 3);
    }

    #[test]
    fn text_frames_follow_the_openai_chunk_format_and_end_with_usage_and_done() {
        let frames = frames(
            &Reply::Text("Hello there world".into()),
            "fake-model",
            "chatcmpl-1",
            "call_1",
        );
        let data: Vec<&str> = frames.iter().map(|f| f.data.as_str()).collect();
        assert_eq!(data.last(), Some(&"[DONE]"));
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["id"], "chatcmpl-1");
            assert_eq!(chunk["model"], "fake-model");
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Hello there world");
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        let usage = &chunks[chunks.len() - 1];
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 15);
    }

    #[test]
    fn tool_call_frames_stream_the_arguments_in_fragments_that_concatenate_to_json() {
        let reply = Reply::ToolCall {
            name: "bash".into(),
            arguments: json!({"command": TOOL_COMMAND}).to_string(),
        };
        let frames = frames(&reply, "fake-model", "chatcmpl-2", "call_fake_2");
        let chunks: Vec<Value> = frames
            .iter()
            .filter(|f| f.data != "[DONE]")
            .map(|f| serde_json::from_str(&f.data).unwrap())
            .collect();
        let first_call = &chunks[1]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(first_call["id"], "call_fake_2");
        assert_eq!(first_call["function"]["name"], "bash");
        let arguments: String = chunks
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&arguments).unwrap()["command"],
            TOOL_COMMAND
        );
        assert_eq!(
            chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
            "tool_calls"
        );
    }

    #[tokio::test]
    async fn the_server_streams_sse_records_requests_and_answers_errors_with_status() {
        let llm = FakeLlm::start().unwrap();
        let address = llm.address();
        let post = |body: Value| async move {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            let body = body.to_string();
            let request = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
                .await
                .unwrap();
            let mut response = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response)
                .await
                .unwrap();
            String::from_utf8(response).unwrap()
        };

        let ok = post(with_tools(vec![user("MARK-7")])).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("content-type: text/event-stream"), "{ok}");
        assert!(ok.contains("data: [DONE]"), "{ok}");
        assert!(ok.contains("\"content\":\"MARK-7\""), "{ok}");

        let bad = post(with_tools(vec![user("ERROR400")])).await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        assert!(bad.contains("fake bad request"), "{bad}");
        for _ in 0..2 {
            let failing = post(with_tools(vec![user("ERROR500")])).await;
            assert!(failing.starts_with("HTTP/1.1 500"), "{failing}");
        }

        assert_eq!(llm.requests().len(), 4);
        assert_eq!(llm.requests_containing("MARK-7").len(), 1);
        assert!(llm.base_url().ends_with("/v1"));
    }
}
