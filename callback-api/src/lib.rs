//! The callback API: where everything that happens inside the sidecar pods arrives.
//!
//! Sidecars post signed callbacks (session state, progress events); each is committed to
//! Postgres exactly once before it is acknowledged, fanned out through Redis streams to the
//! SSE streams of every replica, and summarised into the task's `status.progress`.

pub mod auth;
pub mod committer;
pub mod config;
pub mod credentials;
pub mod egress;
pub mod error;
pub mod event_log;
pub mod extract;
pub mod fanout;
pub mod limits;
pub mod mcp;
pub mod metrics;
pub mod mirror;
pub mod retention;
pub mod routes;
pub mod session_cache;
pub mod slack;
pub mod startup;
pub mod state;
pub mod task_views;
pub mod telemetry;
pub mod tokens;
pub mod web;
