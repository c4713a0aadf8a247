//! The client's error type.

/// What can go wrong talking to OpenCode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configured base URL cannot be used.
    #[error("invalid OpenCode URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as configured.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// An id that would not be safe in a URL path (OpenCode ids are `ses_...`, `per_...`).
    #[error("invalid OpenCode id {0:?}")]
    InvalidId(String),
    /// The HTTP client could not be built.
    #[error("building the HTTP client failed")]
    Build(#[source] reqwest::Error),
    /// The request did not get an answer: connection refused or reset, or a timeout.
    #[error("{method} {path} failed")]
    Transport {
        /// The HTTP method.
        method: &'static str,
        /// The request path.
        path: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// OpenCode answered with an error status.
    #[error("{method} {path} answered {status}: {message}")]
    Status {
        /// The HTTP method.
        method: &'static str,
        /// The request path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// OpenCode's error name (`NotFoundError`, `BadRequest`, ...), when it sent one.
        name: Option<String>,
        /// OpenCode's message, or the start of the body.
        message: String,
    },
    /// The answer could not be decoded.
    #[error("{method} {path}: unexpected answer")]
    Decode {
        /// The HTTP method.
        method: &'static str,
        /// The request path.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The server took the request but did not start answering in time (a server still
    /// starting can hold a request it accepted).
    #[error("{path} did not answer within {seconds} s")]
    NoAnswer {
        /// The request path.
        path: String,
        /// How long it was given.
        seconds: u64,
    },
    /// The event stream broke (read timeout, reset) after it had started.
    #[error("the event stream broke")]
    EventStream(#[source] reqwest::Error),
}

impl Error {
    /// The HTTP status OpenCode answered with, if it answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True for a 404: the session (or other object) does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// True when trying again later may succeed: no answer, or a 5xx, 408 or 429.
    ///
    /// A prompt that failed this way may still have been accepted; callers that must send a
    /// prompt at most once check the session's messages before they send it again.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::NoAnswer { .. } | Self::EventStream(_) => true,
            Self::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
