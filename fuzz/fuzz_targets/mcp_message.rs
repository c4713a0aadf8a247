//! `POST /mcp`: one JSON-RPC body, read as the gateway reads it, then what the gateway takes
//! from its parameters (protocol revision, tool name), and the answer it would send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nubabel_callback_api::mcp::protocol::{
    INVALID_PARAMS, MAX_TOOL_NAME_LEN, Readable, failure, is_supported, is_valid_tool_name,
    negotiate, read_message, split_tool_name, success,
};
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    match read_message(data) {
        Ok(Readable::Request { id, method, params }) => {
            assert!(id.is_string() || id.is_i64() || id.is_u64());
            let answer = match params {
                Ok(params) => {
                    let requested = params.get("protocolVersion").and_then(Value::as_str);
                    assert!(is_supported(negotiate(requested)));
                    if let Some(name) = params.get("name").and_then(Value::as_str) {
                        if is_valid_tool_name(name) {
                            assert!(name.len() <= MAX_TOOL_NAME_LEN);
                        }
                        if let Some((provider, tool)) = split_tool_name(name) {
                            assert!(name.starts_with(provider) && name.ends_with(tool));
                        }
                    }
                    success(&id, json!({ "method": method }))
                }
                Err(error) => failure(Some(&id), INVALID_PARAMS, &error.to_string()),
            };
            assert!(serde_json::to_vec(&answer).is_ok());
        }
        Ok(Readable::NoAnswer) => {}
        Err(unreadable) => {
            let answer = failure(unreadable.id.as_ref(), unreadable.code, unreadable.message);
            assert!(serde_json::to_vec(&answer).is_ok());
        }
    }
});
