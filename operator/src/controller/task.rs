//! The DelegatedTask controller: sends each task's prompt to its tenant's OpenCode fleet,
//! follows the agent until it finishes, and records the outcome in the task's status.

pub mod plan;
