//! What the readiness probe knows without asking: whether OpenCode's event stream is followed,
//! and when the callback API last answered a callback.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a callback API answer counts as "reachable" without asking its `/healthz`.
pub const API_RECENT: Duration = Duration::from_secs(60);

/// When the callback API last answered a callback.
#[derive(Debug, Default)]
pub struct Liveness {
    api_answered: Mutex<Option<Instant>>,
    // NB: a pod must not take work before its events are followed, or a fast turn finishes
    // unseen while the stream is still reconnecting.
    following_events: std::sync::atomic::AtomicBool,
}

impl Liveness {
    /// Records whether the OpenCode event stream is connected.
    pub fn following_events(&self, connected: bool) {
        self.following_events
            .store(connected, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the OpenCode event stream is connected.
    pub fn is_following_events(&self) -> bool {
        self.following_events
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records an answer from the API (accepted or refused: either way it is up).
    pub fn api_answered(&self) {
        *self
            .api_answered
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// Whether the API answered within `API_RECENT`.
    pub fn api_recent(&self) -> bool {
        self.api_answered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < API_RECENT)
    }
}
