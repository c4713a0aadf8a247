//! The MCP wire format the gateway speaks on both sides: JSON-RPC 2.0 messages, protocol
//! revisions and their negotiation, tool names and tool results.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The revision this gateway implements and offers (the current one).
pub const LATEST_PROTOCOL_VERSION: &str = "2025-11-25";

/// Revisions accepted from clients, newest first. All use the streamable HTTP transport
/// (introduced in 2025-03-26); OpenCode 1.18.33 asks for 2025-11-25.
pub const SUPPORTED_PROTOCOL_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

/// The revision assumed when a request carries no `MCP-Protocol-Version` header.
pub const DEFAULT_PROTOCOL_VERSION: &str = "2025-03-26";

/// Header carrying the negotiated revision on every request after `initialize`.
pub const PROTOCOL_VERSION_HEADER: &str = "mcp-protocol-version";

/// Header carrying a session id, when a server assigns one.
pub const SESSION_ID_HEADER: &str = "mcp-session-id";

/// JSON-RPC: the body is not JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC: the JSON is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC: no such method.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC: invalid method parameters (also: unknown tool).
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC: internal error.
pub const INTERNAL_ERROR: i64 = -32603;

/// Longest tool name, per the MCP tool-name rules.
pub const MAX_TOOL_NAME_LEN: usize = 128;

/// The revision to answer an `initialize` with: the client's, when supported, else the latest.
pub fn negotiate(requested: Option<&str>) -> &'static str {
    requested
        .and_then(|wanted| {
            SUPPORTED_PROTOCOL_VERSIONS
                .iter()
                .find(|supported| **supported == wanted)
        })
        .copied()
        .unwrap_or(LATEST_PROTOCOL_VERSION)
}

/// Whether `version` is a revision this gateway speaks.
pub fn is_supported(version: &str) -> bool {
    SUPPORTED_PROTOCOL_VERSIONS.contains(&version)
}

/// Whether `name` follows the MCP tool-name rules: 1 to 128 of `[A-Za-z0-9_.-]`.
pub fn is_valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOOL_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The gateway's name for `tool` of connection `provider`: `<provider>_<tool>`. Providers are
/// `[a-z0-9-]`, so the first `_` separates them and no two providers' tools can collide.
pub fn gateway_tool_name(provider: &str, tool: &str) -> String {
    format!("{provider}_{tool}")
}

/// Splits a gateway tool name into provider and upstream tool name.
pub fn split_tool_name(name: &str) -> Option<(&str, &str)> {
    name.split_once('_')
        .filter(|(provider, tool)| !provider.is_empty() && !tool.is_empty())
}

/// A JSON-RPC message as received: a request (`id` and `method`), a notification (`method`
/// only) or a response (`id` and `result` or `error`).
#[derive(Debug, Clone, Deserialize)]
pub struct Incoming {
    /// Must be `"2.0"`.
    pub jsonrpc: Option<String>,
    /// The request id (a string or a number); absent on notifications.
    #[serde(default)]
    pub id: Option<Value>,
    /// The method; absent on responses.
    #[serde(default)]
    pub method: Option<String>,
    /// The parameters.
    #[serde(default)]
    pub params: Option<Value>,
    /// A response's result.
    #[serde(default)]
    pub result: Option<Value>,
    /// A response's error.
    #[serde(default)]
    pub error: Option<Value>,
}

/// What kind of message arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum MessageKind {
    /// A request that needs an answer.
    Request {
        /// Its id, echoed in the answer.
        id: Value,
        /// The method.
        method: String,
    },
    /// A notification: answered 202, nothing else.
    Notification,
    /// A response to a request of ours (the gateway sends none): answered 202.
    Response,
}

/// Why a message is not valid JSON-RPC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidMessage(pub &'static str);

impl Incoming {
    /// Classifies the message, checking the JSON-RPC envelope.
    pub fn kind(&self) -> Result<MessageKind, InvalidMessage> {
        if self.jsonrpc.as_deref() != Some("2.0") {
            return Err(InvalidMessage("jsonrpc must be \"2.0\""));
        }
        let valid_id = |id: &Value| id.is_string() || id.is_i64() || id.is_u64();
        match (&self.id, &self.method) {
            (Some(id), Some(method)) if valid_id(id) => Ok(MessageKind::Request {
                id: id.clone(),
                method: method.clone(),
            }),
            (Some(_), Some(_)) => Err(InvalidMessage("id must be a string or an integer")),
            (None, Some(_)) => Ok(MessageKind::Notification),
            (Some(_), None) if self.result.is_some() || self.error.is_some() => {
                Ok(MessageKind::Response)
            }
            _ => Err(InvalidMessage(
                "a message needs a method (request or notification) or a result or error",
            )),
        }
    }

    /// The parameters as an object (absent parameters are an empty object).
    pub fn params_object(&self) -> Result<Map<String, Value>, InvalidMessage> {
        match &self.params {
            None | Some(Value::Null) => Ok(Map::new()),
            Some(Value::Object(map)) => Ok(map.clone()),
            Some(_) => Err(InvalidMessage("params must be an object")),
        }
    }
}

/// A body that is not a message the gateway can answer, and the JSON-RPC error for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    /// The JSON-RPC error code ([`PARSE_ERROR`] or [`INVALID_REQUEST`]).
    pub code: i64,
    /// The request id, when the message had one.
    pub id: Option<Value>,
    /// What is wrong.
    pub message: &'static str,
}

/// What a readable body asks of the gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum Readable {
    /// A request: answered with a result or a JSON-RPC error.
    Request {
        /// Its id, echoed in the answer.
        id: Value,
        /// The method.
        method: String,
        /// Its parameters as an object, or why they are not one (answered [`INVALID_PARAMS`]).
        params: Result<Map<String, Value>, InvalidMessage>,
    },
    /// A notification or a response: accepted, nothing else.
    NoAnswer,
}

/// Reads one request body: JSON, one JSON-RPC 2.0 message (no batches), its kind and its
/// parameters. Pure, so every body a caller can send is tested apart from the route's I/O.
pub fn read_message(body: &[u8]) -> Result<Readable, Unreadable> {
    let unreadable = |code, id, message| Unreadable { code, id, message };
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| unreadable(PARSE_ERROR, None, "the body is not JSON"))?;
    if value.is_array() {
        return Err(unreadable(
            INVALID_REQUEST,
            None,
            "batches are not supported: send one message per request",
        ));
    }
    let message: Incoming = serde_json::from_value(value)
        .map_err(|_| unreadable(INVALID_REQUEST, None, "not a JSON-RPC message"))?;
    match message.kind() {
        Ok(MessageKind::Request { id, method }) => Ok(Readable::Request {
            id,
            method,
            params: message.params_object(),
        }),
        Ok(MessageKind::Notification | MessageKind::Response) => Ok(Readable::NoAnswer),
        Err(InvalidMessage(error)) => Err(unreadable(INVALID_REQUEST, message.id, error)),
    }
}

/// A JSON-RPC success response.
pub fn success(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// A JSON-RPC error response (`id` is null when the request's id could not be read).
pub fn failure(id: Option<&Value>, code: i64, message: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id.cloned().unwrap_or(Value::Null),
        "error": {"code": code, "message": message},
    })
}

/// One tool as `tools/list` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tool {
    /// The tool's name.
    pub name: String,
    /// A human-readable title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// What the tool does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub input_schema: Value,
    /// JSON Schema of the structured result, if the tool declares one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    /// Behaviour hints (read-only, destructive, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Value>,
}

/// A tool result that reports a failure to the model: `isError: true` and one text block.
pub fn error_result(message: &str) -> Value {
    json!({"content": [{"type": "text", "text": message}], "isError": true})
}

/// Whether a tool result reports a failure.
pub fn result_is_error(result: &Value) -> bool {
    result.get("isError").and_then(Value::as_bool) == Some(true)
}

/// The text blocks of a tool result, joined by newlines.
pub fn result_text(result: &Value) -> String {
    result
        .get("content")
        .and_then(Value::as_array)
        .map(|blocks| {
            blocks
                .iter()
                .filter_map(|block| block.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(value: Value) -> Incoming {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn negotiation_keeps_a_supported_revision_and_offers_the_latest_otherwise() {
        assert_eq!(negotiate(Some("2025-11-25")), "2025-11-25");
        assert_eq!(negotiate(Some("2025-03-26")), "2025-03-26");
        assert_eq!(negotiate(Some("2024-11-05")), LATEST_PROTOCOL_VERSION);
        assert_eq!(negotiate(Some("garbage")), LATEST_PROTOCOL_VERSION);
        assert_eq!(negotiate(None), LATEST_PROTOCOL_VERSION);
        assert!(is_supported("2025-06-18"));
        assert!(!is_supported("2024-11-05"));
    }

    #[test]
    fn messages_are_classified_by_their_envelope() {
        let request = incoming(json!({"jsonrpc": "2.0", "id": 7, "method": "ping"}));
        assert_eq!(
            request.kind().unwrap(),
            MessageKind::Request {
                id: json!(7),
                method: "ping".into()
            }
        );
        let notification =
            incoming(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        assert_eq!(notification.kind().unwrap(), MessageKind::Notification);
        let response = incoming(json!({"jsonrpc": "2.0", "id": "a", "result": {}}));
        assert_eq!(response.kind().unwrap(), MessageKind::Response);
        assert!(incoming(json!({"id": 1, "method": "ping"})).kind().is_err());
        assert!(
            incoming(json!({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}))
                .kind()
                .is_err()
        );
        assert!(
            incoming(json!({"jsonrpc": "2.0", "id": null, "method": "ping"}))
                .kind()
                .is_ok_and(|kind| kind == MessageKind::Notification)
        );
        assert!(incoming(json!({"jsonrpc": "2.0", "id": 1})).kind().is_err());
    }

    #[test]
    fn tool_names_follow_the_mcp_rules_and_split_at_the_first_underscore() {
        assert!(is_valid_tool_name("linear_create_issue"));
        assert!(is_valid_tool_name("a.b-c_D9"));
        assert!(!is_valid_tool_name(""));
        assert!(!is_valid_tool_name("has space"));
        assert!(!is_valid_tool_name("slash/name"));
        assert!(!is_valid_tool_name(&"x".repeat(129)));
        assert_eq!(
            gateway_tool_name("linear", "create_issue"),
            "linear_create_issue"
        );
        assert_eq!(
            split_tool_name("linear_create_issue"),
            Some(("linear", "create_issue"))
        );
        assert_eq!(
            split_tool_name("my-notion_search"),
            Some(("my-notion", "search"))
        );
        assert_eq!(split_tool_name("nounderscore"), None);
        assert_eq!(split_tool_name("_tool"), None);
        assert_eq!(split_tool_name("provider_"), None);
    }

    #[test]
    fn error_results_are_tool_results_with_is_error() {
        let result = error_result("the upstream refused the call");
        assert!(result_is_error(&result));
        assert_eq!(result_text(&result), "the upstream refused the call");
        assert!(!result_is_error(&json!({"content": []})));
        assert_eq!(
            failure(None, PARSE_ERROR, "bad")["id"],
            Value::Null,
            "an unreadable id is null"
        );
    }
}
