//! Full-application tests: the API on port 0 against real Postgres (a fresh database per test)
//! and real Redis, through HTTP.

// Test support code: clippy.toml allows these inside `#[test]` functions only, and the helpers
// shared by the tests live outside them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod batches;
mod callbacks;
mod connections;
mod delegate;
mod egress;
mod helpers;
mod limits;
mod mappings;
mod mcp;
mod metrics;
mod mirror;
mod nul;
mod oauth;
mod openapi;
mod resilience;
mod retention;
mod session_scope;
mod slack;
mod stream;
mod stream_revocation;
mod task_reads;
mod tasks;
mod vault;
mod web;
