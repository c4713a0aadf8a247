//! HTTP client of the OpenCode server (`opencode serve`), as the operator and the bridge use
//! it: health, sessions, asynchronous prompts, messages, session status, abort, and the
//! `GET /event` stream as typed events.
//!
//! Shapes follow what OpenCode 1.18 sends on the wire. Every type tolerates fields it does not
//! know, and the event parser never fails on an event type it does not know (`Event::Other`),
//! so a newer OpenCode degrades to "unknown event" rather than to a broken stream.

pub mod client;
pub mod error;
pub mod events;
pub mod types;

pub use client::{ClientConfig, DEFAULT_USERNAME, OpencodeClient};
pub use error::{Error, Result};
pub use events::{Event, EventEnvelope, EventStream};
pub use types::{
    Health, MessageError, MessageInfo, MessageWithParts, ModelRef, Part, PartInput,
    PermissionRequest, PromptRequest, QuestionRequest, Role, Session, SessionError, SessionStatus,
    TextPart, ToolPart, ToolState, ToolStatus, final_assistant_text, last_assistant_error,
    user_prompts,
};
