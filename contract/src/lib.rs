//! The wire contract between the operator, the callback API and the sidecar's bridge.
//!
//! Identities of tenants and sidecars, the per-sidecar signing keys and the callback
//! signatures made with them, the MCP bearer tokens, the stream tokens that let readers follow
//! a tenant's sessions, what a progress event contributes to a task's summary, the bridge's
//! environment names, how bounded text is cut, and what the operator asks a pod's bridge to
//! put in a conversation's workspace. Pure code
//! with no database or network client, so the bridge in every sidecar pod links it as is and
//! every side of a callback shares one implementation.

pub mod bridge_env;
pub mod identity;
pub mod progress;
pub mod signing;
pub mod stream_token;
pub mod text;
pub mod workspace;
