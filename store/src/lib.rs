//! The data layer of the callback API and the operator.
//!
//! Postgres (through sqlx) is the record: sessions, session mappings, every accepted callback,
//! task results, tenant API tokens, Slack threads, stream-token revocations, MCP
//! token floors and MCP connections, whose credentials the vault seals. Redis holds what is hot: per-session event
//! streams for fan-out across replicas and SSE replay, and each session's latest state. Identities, signing and stream tokens are
//! the wire contract and live in `nubabel_contract`.

pub mod api_tokens;
pub mod changes;
pub mod connections;
pub mod db;
pub mod error;
pub mod events;
pub mod mcp_tokens;
pub mod results;
pub mod retention;
pub mod sessions;
pub mod slack;
pub mod storable;
pub mod stream_revocations;
pub mod streams;
pub mod vault;

pub use error::{Error, Result};
