//! The one error type every handler returns, and how it turns into a response.
//!
//! Clients see a stable code and a message they can act on, as
//! `{"error": {"code": "...", "message": "..."}}`; internal failures are logged here and
//! answered with a generic message, never with their text.

use axum::{
    Json,
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::metrics::RouteLabels;

/// Seconds a client should wait before retrying when Postgres is unavailable.
pub const RETRY_AFTER_SECONDS: u64 = 5;
/// Seconds a client should wait before retrying when its tenant is at a limit.
pub const LIMITED_RETRY_AFTER_SECONDS: u64 = 1;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON, or a header or parameter is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing, stale or invalid signature or token.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: authenticated, but not allowed to act for what the request names.
    #[error("{0}")]
    Forbidden(String),
    /// 404: the feature is not configured on this server.
    #[error("{0}")]
    NotConfigured(&'static str),
    /// 404: no such session for the caller's tenant.
    #[error("session not found")]
    SessionNotFound,
    /// 404: the named resource does not exist (the message names it).
    #[error("{0}")]
    NotFound(String),
    /// 409: the resource already exists (the message names it).
    #[error("{0}")]
    Conflict(String),
    /// 503: the feature is not configured on this deployment (the message says how to).
    #[error("{0}")]
    Disabled(String),
    /// 413: the body is larger than the limit.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415: the body is not declared as JSON.
    #[error("content-type must be application/json")]
    UnsupportedMediaType,
    /// 422: the JSON is well-formed but a field is missing or invalid (the message names it).
    #[error("{0}")]
    Unprocessable(String),
    /// 422: the event id was used before with a different body or session.
    #[error("webhook-id was already used for a different event")]
    EventIdReused,
    /// 429: the tenant is at one of its limits; nothing was read or written.
    #[error("{0}")]
    TooManyRequests(String),
    /// 503: Postgres is unreachable; nothing was written.
    #[error("the service is temporarily unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// 500: anything else; details go to the log only.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A machine-readable code and a human-readable message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code, e.g. `invalid_signature`, `session_not_found`.
    pub code: &'static str,
    /// What went wrong, naming the field or header at fault.
    pub message: String,
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotConfigured(_) => (StatusCode::NOT_FOUND, "not_configured"),
            Self::SessionNotFound => (StatusCode::NOT_FOUND, "session_not_found"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::Disabled(_) => (StatusCode::SERVICE_UNAVAILABLE, "disabled"),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            Self::EventIdReused => (StatusCode::UNPROCESSABLE_ENTITY, "event_id_reused"),
            Self::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<nubabel_store::Error> for ApiError {
    fn from(error: nubabel_store::Error) -> Self {
        if error.is_postgres_unavailable() {
            return Self::Unavailable(error.into());
        }
        if error.is_unstorable_text() {
            return Self::Unprocessable(
                "a text field holds a NUL character, which cannot be stored".into(),
            );
        }
        match error {
            nubabel_store::Error::SessionNotFound => Self::SessionNotFound,
            other => Self::Internal(other.into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        // Logged by `log_failures`, which knows the route; IntoResponse stays pure.
        let report = match &self {
            Self::Internal(error) | Self::Unavailable(error) => {
                Some(ErrorReport(format!("{error:?}")))
            }
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        let retry_after = match status {
            StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_AFTER_SECONDS),
            StatusCode::TOO_MANY_REQUESTS => Some(LIMITED_RETRY_AFTER_SECONDS),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(report) = report {
            response.extensions_mut().insert(report);
        }
        response
    }
}

/// The internal cause of a 5xx response, for [`log_failures`] to log.
#[derive(Debug, Clone)]
pub struct ErrorReport(pub String);

/// Middleware: logs the cause of every answer that carries an [`ErrorReport`], with the
/// request's method, route and status.
pub async fn log_failures(request: Request, next: Next) -> Response {
    let RouteLabels {
        method,
        matched_path,
    } = RouteLabels::of(&request);
    let response = next.run(request).await;
    if let Some(ErrorReport(cause)) = response.extensions().get::<ErrorReport>() {
        let status = response.status();
        tracing::error!(%method, %matched_path, status = status.as_u16(), %cause, "request failed");
    }
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn body_of(error: ApiError) -> (StatusCode, serde_json::Value, Option<HeaderValue>) {
        let response = error.into_response();
        let status = response.status();
        let retry = response.headers().get(header::RETRY_AFTER).cloned();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap(), retry)
    }

    #[tokio::test]
    async fn internal_errors_never_show_their_text() {
        let (status, body, _) = body_of(ApiError::Internal(anyhow::anyhow!(
            "password=hunter2 at db:5432"
        )))
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"]["message"], "internal error");
        assert!(!body.to_string().contains("hunter2"));
    }

    #[tokio::test]
    async fn unavailable_tells_the_client_when_to_retry() {
        let (status, body, retry) =
            body_of(ApiError::Unavailable(anyhow::anyhow!("pool timed out"))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"]["code"], "unavailable");
        assert_eq!(retry, Some(HeaderValue::from_static("5")));
    }

    #[tokio::test]
    async fn client_errors_carry_their_message() {
        let (status, body, _) = body_of(ApiError::Unprocessable(
            "progress.type: missing field `type`".into(),
        ))
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            body["error"]["message"],
            "progress.type: missing field `type`"
        );
    }
}
