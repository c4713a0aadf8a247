//! The shared data layer of the callback API and the operator.
//!
//! Postgres (through sqlx) is the record: sessions, session mappings and every accepted
//! callback. Redis holds what is hot: per-session event streams for fan-out across replicas and
//! SSE replay, and each session's latest state. Signing keys for sidecar callbacks and stream
//! tokens for readers are derived here too, so the operator and the API share one
//! implementation.

#[cfg(feature = "store")]
pub mod api_tokens;
pub mod connections;
#[cfg(feature = "store")]
pub mod db;
#[cfg(feature = "store")]
pub mod error;
#[cfg(feature = "store")]
pub mod events;
pub mod identity;
pub mod progress;
#[cfg(feature = "store")]
pub mod results;
#[cfg(feature = "store")]
pub mod sessions;
pub mod signing;
#[cfg(feature = "store")]
pub mod slack;
pub mod stream_token;
#[cfg(feature = "store")]
pub mod streams;
pub mod vault;

#[cfg(feature = "store")]
pub use error::{Error, Result};
