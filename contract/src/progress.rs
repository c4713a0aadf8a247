//! What one progress event contributes to a task's `status.progress` summary.
//!
//! Pure functions over the event body, so the rules are unit-tested without a database. The
//! counters live on the session row and are updated in the same transaction as the event.

use serde_json::Value;

use crate::text::cut_chars;

/// Longest tool name kept in the summary, in characters.
pub const MAX_LAST_TOOL_CHARS: usize = 64;

/// Longest message line kept in the summary, in characters.
pub const MAX_LAST_MESSAGE_CHARS: usize = 256;

/// Progress type of a tool call that started.
pub const TOOL_EXECUTE_START: &str = "tool_execute_start";
/// Progress type of a tool call that finished, successfully or not.
pub const TOOL_EXECUTE_END: &str = "tool_execute_end";
/// Progress type of a tool call the MCP gateway ran for the session (the bridge reports the
/// same call as OpenCode's tool events, so it names the tool without counting it again).
pub const MCP_TOOL_CALL: &str = "mcp_tool_call";
/// Progress type of a piece of text the agent wrote.
pub const MESSAGE_PART: &str = "message_part";

/// The change one progress event makes to the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgressDelta {
    /// 1 when a tool call started.
    pub tools_started: i64,
    /// 1 when a tool call finished.
    pub tools_completed: i64,
    /// The tool named by a tool event, truncated.
    pub last_tool: Option<String>,
    /// The last non-empty line of a message part, truncated.
    pub last_message: Option<String>,
}

impl ProgressDelta {
    /// Reads the delta from a progress event of type `event_type` with body `progress`.
    ///
    /// Tool events name the tool in `tool` (or `name`); message parts carry `text` (or
    /// `content`); gateway tool calls name the tool in `tool`. Other types only count as events.
    pub fn from_progress(event_type: &str, progress: &Value) -> Self {
        let text = |keys: &[&str]| {
            keys.iter()
                .find_map(|key| progress.get(*key).and_then(Value::as_str))
        };
        match event_type {
            TOOL_EXECUTE_START | TOOL_EXECUTE_END => Self {
                tools_started: i64::from(event_type == TOOL_EXECUTE_START),
                tools_completed: i64::from(event_type == TOOL_EXECUTE_END),
                last_tool: text(&["tool", "name"])
                    .map(|tool| cut_chars(tool.trim(), MAX_LAST_TOOL_CHARS))
                    .filter(|tool| !tool.is_empty()),
                last_message: None,
            },
            MCP_TOOL_CALL => Self {
                last_tool: text(&["tool"])
                    .map(|tool| cut_chars(tool.trim(), MAX_LAST_TOOL_CHARS))
                    .filter(|tool| !tool.is_empty()),
                ..Self::default()
            },
            MESSAGE_PART => Self {
                last_message: text(&["text", "content"]).and_then(last_line),
                ..Self::default()
            },
            _ => Self::default(),
        }
    }
}

/// The last line of `text` that has something other than whitespace, truncated.
fn last_line(text: &str) -> Option<String> {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(|line| cut_chars(line, MAX_LAST_MESSAGE_CHARS))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tool_events_count_and_name_the_tool() {
        let start = ProgressDelta::from_progress("tool_execute_start", &json!({"tool": "bash"}));
        assert_eq!(start.tools_started, 1);
        assert_eq!(start.tools_completed, 0);
        assert_eq!(start.last_tool.as_deref(), Some("bash"));
        let end = ProgressDelta::from_progress("tool_execute_end", &json!({"name": "edit"}));
        assert_eq!((end.tools_started, end.tools_completed), (0, 1));
        assert_eq!(end.last_tool.as_deref(), Some("edit"));
    }

    #[test]
    fn message_parts_keep_the_last_non_empty_line() {
        let delta = ProgressDelta::from_progress(
            "message_part",
            &json!({"text": "first line\nsecond line\n\n  "}),
        );
        assert_eq!(delta.last_message.as_deref(), Some("second line"));
        assert_eq!(
            ProgressDelta::from_progress("message_part", &json!({"text": " \n"})).last_message,
            None
        );
    }

    #[test]
    fn gateway_tool_calls_name_the_tool_without_counting_it_again() {
        let delta = ProgressDelta::from_progress(
            "mcp_tool_call",
            &json!({"tool": "linear_create_issue", "outcome": "success"}),
        );
        assert_eq!(delta.last_tool.as_deref(), Some("linear_create_issue"));
        assert_eq!((delta.tools_started, delta.tools_completed), (0, 0));
    }

    #[test]
    fn other_types_change_only_the_event_count() {
        assert_eq!(
            ProgressDelta::from_progress("retry", &json!({"tool": "bash"})),
            ProgressDelta::default()
        );
    }

    #[test]
    fn long_values_are_truncated_on_character_boundaries() {
        let long = "é".repeat(300);
        let delta = ProgressDelta::from_progress("message_part", &json!({ "text": long }));
        let message = delta.last_message.unwrap();
        assert_eq!(message.chars().count(), MAX_LAST_MESSAGE_CHARS);
        assert!(message.ends_with('…'));
        assert_eq!(cut_chars("short", 10), "short");
    }
}
