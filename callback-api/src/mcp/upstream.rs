//! The gateway as an MCP client of an upstream server, over the streamable HTTP transport:
//! `initialize`, `notifications/initialized`, then requests, each answered with JSON or an
//! SSE stream; `Mcp-Session-Id` kept when the server assigns one, and the session closed with
//! `DELETE` when done.
//!
//! Redirects are followed on the upstream's own origin only: a redirect to another origin
//! fails the request, so the credential header (whatever its name) never leaves the origin
//! the connection names.

use futures::StreamExt;
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};
use url::Url;

use super::protocol::{LATEST_PROTOCOL_VERSION, PROTOCOL_VERSION_HEADER, SESSION_ID_HEADER};
use crate::{
    credentials::UpstreamAuth,
    egress::{self, Egress, ReadError, Redirects},
};

/// Largest upstream response body read, in bytes.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Longest upstream error message passed on, in characters.
const MAX_MESSAGE_CHARS: usize = 500;

/// Why an upstream exchange failed. The messages are safe to show the model: they carry no
/// credential, and no URL (a URL may hold a key in its query).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// HTTP 401: the credential was refused.
    #[error("the upstream MCP server refused the credentials (HTTP 401)")]
    Unauthorized,
    /// Any other unsuccessful HTTP status.
    #[error("the upstream MCP server answered HTTP {0}")]
    Status(u16),
    /// The request was refused by the egress rules.
    #[error("the upstream address is not allowed: {0}")]
    Refused(String),
    /// Connecting, sending or reading failed.
    #[error("the upstream MCP server could not be reached: {0}")]
    Transport(String),
    /// The answer was not valid MCP.
    #[error("the upstream MCP server sent an invalid answer: {0}")]
    Protocol(String),
    /// A JSON-RPC error answer.
    #[error("the upstream MCP server answered error {code}: {message}")]
    Rpc {
        /// The JSON-RPC error code.
        code: i64,
        /// Its message, truncated.
        message: String,
    },
}

impl UpstreamError {
    fn transport(error: &reqwest::Error) -> Self {
        if let Some(refusal) = egress::refusal(error) {
            return Self::Refused(refusal.to_string());
        }
        let kind = if error.is_timeout() {
            "timed out"
        } else if error.is_connect() {
            "connection failed"
        } else if error.is_redirect() {
            "redirect refused"
        } else if error.is_body() || error.is_decode() {
            "reading the answer failed"
        } else {
            "request failed"
        };
        Self::Transport(kind.to_owned())
    }
}

/// One session with an upstream server.
pub struct UpstreamSession<'a> {
    egress: &'a Egress,
    url: &'a Url,
    auth: &'a UpstreamAuth,
    session_id: Option<String>,
    protocol_version: String,
    next_id: u64,
}

impl<'a> UpstreamSession<'a> {
    /// Opens a session: `initialize`, then `notifications/initialized`.
    pub async fn open(
        egress: &'a Egress,
        url: &'a Url,
        auth: &'a UpstreamAuth,
    ) -> Result<Self, UpstreamError> {
        let mut session = Self {
            egress,
            url,
            auth,
            session_id: None,
            protocol_version: LATEST_PROTOCOL_VERSION.to_owned(),
            next_id: 0,
        };
        let params = json!({
            "protocolVersion": LATEST_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "nubabel-mcp-gateway", "version": env!("CARGO_PKG_VERSION")},
        });
        let result = session.request("initialize", params).await?;
        let version = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| UpstreamError::Protocol("initialize without protocolVersion".into()))?;
        if !super::protocol::is_supported(version) {
            return Err(UpstreamError::Protocol(format!(
                "unsupported protocol version {}",
                truncate(version)
            )));
        }
        session.protocol_version = version.to_owned();
        session
            .notify("notifications/initialized", json!({}))
            .await?;
        Ok(session)
    }

    /// Sends a request and returns its result (a JSON-RPC error becomes [`UpstreamError::Rpc`]).
    pub async fn request(&mut self, method: &str, params: Value) -> Result<Value, UpstreamError> {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let response = self.post(&message).await?;
        if method == "initialize"
            && let Some(session) = response
                .headers()
                .get(SESSION_ID_HEADER)
                .and_then(|v| v.to_str().ok())
        {
            self.session_id = Some(session.to_owned());
        }
        let answer = read_answer(response, id).await?;
        if let Some(error) = answer.get("error") {
            return Err(UpstreamError::Rpc {
                code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: truncate(
                    error
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("no message"),
                ),
            });
        }
        answer
            .get("result")
            .cloned()
            .ok_or_else(|| UpstreamError::Protocol("a response without result or error".into()))
    }

    /// Sends a notification (answered 202 Accepted, or 200 by lenient servers).
    pub async fn notify(&mut self, method: &str, params: Value) -> Result<(), UpstreamError> {
        let message = json!({"jsonrpc": "2.0", "method": method, "params": params});
        self.post(&message).await.map(drop)
    }

    /// Ends the session on the server (`DELETE`), when it assigned one; best effort.
    pub async fn close(self) {
        let Some(session_id) = self.session_id.as_deref() else {
            return;
        };
        let Ok(request) =
            self.egress
                .request(Method::DELETE, self.url.clone(), Redirects::SameOrigin)
        else {
            return;
        };
        let Ok(credential) = self.auth.header_value() else {
            return;
        };
        let request = request
            .header(self.auth.header.clone(), credential)
            .header(SESSION_ID_HEADER, session_id)
            .header(PROTOCOL_VERSION_HEADER, &self.protocol_version);
        // 405 means the server does not let clients end sessions; nothing to do either way.
        let _ = request.send().await;
    }

    async fn post(&self, message: &Value) -> Result<reqwest::Response, UpstreamError> {
        let credential = self.auth.header_value().map_err(|_| {
            UpstreamError::Transport("the stored credential is not a valid header value".into())
        })?;
        let mut request = self
            .egress
            .request(Method::POST, self.url.clone(), Redirects::SameOrigin)
            .map_err(|e| UpstreamError::Refused(e.to_string()))?
            .header(header::ACCEPT, "application/json, text/event-stream")
            .header(header::CONTENT_TYPE, "application/json")
            .header(self.auth.header.clone(), credential)
            .body(message.to_string());
        if let Some(session_id) = &self.session_id {
            request = request
                .header(SESSION_ID_HEADER, session_id)
                .header(PROTOCOL_VERSION_HEADER, &self.protocol_version);
        }
        let response = request
            .send()
            .await
            .map_err(|e| UpstreamError::transport(&e))?;
        match response.status() {
            StatusCode::UNAUTHORIZED => Err(UpstreamError::Unauthorized),
            status if status.is_success() => Ok(response),
            status => Err(UpstreamError::Status(status.as_u16())),
        }
    }
}

/// Reads the answer to request `id` from a JSON body or an SSE stream (skipping the server's
/// notifications and requests on the stream).
async fn read_answer(response: reqwest::Response, id: u64) -> Result<Value, UpstreamError> {
    let is_sse = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("text/event-stream"));
    if !is_sse {
        let body = read_limited(response).await?;
        let message: Value = serde_json::from_slice(&body)
            .map_err(|_| UpstreamError::Protocol("the body is not JSON".into()))?;
        return match_answer(message, id)
            .ok_or_else(|| UpstreamError::Protocol("no answer to the request".into()));
    }
    let mut parser = SseParser::default();
    let mut stream = response.bytes_stream();
    let mut read = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| UpstreamError::transport(&e))?;
        read += chunk.len();
        if read > MAX_RESPONSE_BYTES {
            return Err(UpstreamError::Protocol(format!(
                "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        for data in parser.push(&chunk) {
            let Ok(message) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            if let Some(answer) = match_answer(message, id) {
                return Ok(answer);
            }
        }
    }
    Err(UpstreamError::Protocol(
        "the event stream ended without an answer".into(),
    ))
}

fn match_answer(message: Value, id: u64) -> Option<Value> {
    let is_ours = message.get("id").and_then(Value::as_u64) == Some(id)
        && message.get("method").is_none()
        && (message.get("result").is_some() || message.get("error").is_some());
    is_ours.then_some(message)
}

async fn read_limited(response: reqwest::Response) -> Result<Vec<u8>, UpstreamError> {
    egress::read_capped(response, MAX_RESPONSE_BYTES)
        .await
        .map_err(|error| match &error {
            ReadError::TooLarge(_) => UpstreamError::Protocol(error.to_string()),
            ReadError::Body(error) => UpstreamError::transport(error),
        })
}

/// Splits an SSE byte stream into the `data` of its events.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: String,
    pending: Vec<u8>,
}

impl SseParser {
    /// Adds bytes; returns the data of every event completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        // Keep an incomplete UTF-8 sequence for the next chunk.
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(text) => text.len(),
            Err(error) => error.valid_up_to(),
        };
        let text: Vec<u8> = self.pending.drain(..valid).collect();
        self.buffer
            .push_str(&String::from_utf8_lossy(&text).replace("\r\n", "\n"));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let data: Vec<&str> = block
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|data| data.strip_prefix(' ').unwrap_or(data))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

fn truncate(text: &str) -> String {
    nubabel_contract::text::cut_chars(text, MAX_MESSAGE_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_across_chunks_and_line_endings() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"event: message\r\ndata: {\"a\"").is_empty());
        assert_eq!(parser.push(b":1}\r\n\r\n: comment\n\n"), vec!["{\"a\":1}"]);
        assert_eq!(
            parser.push(b"data: one\ndata: two\n\nid: 3\ndata:x\n\n"),
            vec!["one\ntwo", "x"]
        );
        // A multi-byte character split between chunks survives.
        let text = "data: caf\u{e9}\n\n".as_bytes();
        let (first, second) = text.split_at(10);
        assert!(parser.push(first).is_empty());
        assert_eq!(parser.push(second), vec!["caf\u{e9}"]);
    }

    #[test]
    fn only_the_answer_to_our_request_matches() {
        let answer = json!({"jsonrpc": "2.0", "id": 2, "result": {}});
        assert!(match_answer(answer.clone(), 2).is_some());
        assert!(match_answer(answer, 1).is_none());
        let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}});
        assert!(match_answer(progress, 2).is_none());
        let server_request = json!({"jsonrpc": "2.0", "id": 2, "method": "sampling/createMessage"});
        assert!(match_answer(server_request, 2).is_none());
    }
}
