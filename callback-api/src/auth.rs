//! Who is calling: signed sidecar callbacks and stream readers with a bearer token.
//!
//! Sidecars sign every callback in the Standard Webhooks style with the key of their fleet,
//! and name the fleet in `x-nubabel-organization` and `x-nubabel-sidecar: <namespace>/<name>`.
//! The key is derived from those headers, so a forged identity fails verification. The
//! signature (`v2`) covers the method and the path, so a captured callback cannot be re-sent
//! to another route or session. Headers are checked before the body is read; the body is read
//! up to the configured limit only.
//!
//! Stream readers present a stream token (see `nubabel_contract::stream_token`) as
//! `Authorization: Bearer <token>`, or as `?access_token=<token>` for browsers' `EventSource`,
//! which cannot set headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, OriginalUri, Query, Request},
    http::{HeaderMap, StatusCode, header, request::Parts},
};
use nubabel_contract::{
    identity::SidecarIdentity,
    signing::{self, RequestTarget, SignedHeaders, Verified, derive_sidecar_key},
    stream_token::{self, StreamGrant},
};
use serde::Deserialize;

use crate::{error::ApiError, state::AppState};

/// Header naming the caller's organization.
pub const ORGANIZATION_HEADER: &str = "x-nubabel-organization";
/// Header naming the caller's sidecar fleet as `<namespace>/<name>`.
pub const SIDECAR_HEADER: &str = "x-nubabel-sidecar";

/// Current Unix time in seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// A callback whose signature has been verified.
#[derive(Debug)]
pub struct SignedCallback {
    /// The sidecar fleet that sent it.
    pub sidecar: SidecarIdentity,
    /// Its `webhook-id`, the idempotency key.
    pub webhook_id: String,
    /// The raw body, exactly as signed.
    pub body: Bytes,
}

impl FromRequest<AppState> for SignedCallback {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let headers = request.headers();
        let organization = header(headers, ORGANIZATION_HEADER).ok_or_else(|| {
            ApiError::Unauthorized(format!("missing {ORGANIZATION_HEADER} header"))
        })?;
        let sidecar = header(headers, SIDECAR_HEADER)
            .ok_or_else(|| ApiError::Unauthorized(format!("missing {SIDECAR_HEADER} header")))?;
        let sidecar = SidecarIdentity::from_headers(organization, sidecar)
            .map_err(|e| ApiError::Unauthorized(format!("invalid caller identity: {e}")))?;
        let signed = SignedHeaders {
            id: header(headers, "webhook-id"),
            timestamp: header(headers, "webhook-timestamp"),
            signature: header(headers, "webhook-signature"),
        };
        let now = unix_now();
        let acceptance = state.settings.signatures;
        let (webhook_id, _) = signing::check_headers(&signed, now, acceptance.tolerance_seconds)
            .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
        let (webhook_id, timestamp, signature) = (
            webhook_id.to_owned(),
            signed.timestamp.map(str::to_owned),
            signed.signature.map(str::to_owned),
        );
        let is_json = header(headers, header::CONTENT_TYPE.as_str())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let method = request.method().as_str().to_owned();
        // The URI as the client sent it, even under a nested router.
        let uri = request
            .extensions()
            .get::<OriginalUri>()
            .map_or(request.uri(), |original| &original.0);
        let target = uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), ToString::to_string);

        // Honours DefaultBodyLimit: a declared length over it is refused before reading, and
        // a streamed body is cut off at the limit.
        let body =
            Bytes::from_request(request, state)
                .await
                .map_err(|rejection| match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => {
                        ApiError::PayloadTooLarge(state.settings.max_body_bytes)
                    }
                    _ => ApiError::BadRequest("failed to read the request body".to_owned()),
                })?;

        let key = derive_sidecar_key(&state.keys.master, &sidecar);
        let signed = SignedHeaders {
            id: Some(&webhook_id),
            timestamp: timestamp.as_deref(),
            signature: signature.as_deref(),
        };
        let request = RequestTarget {
            method: &method,
            target: &target,
        };
        let verified = signing::verify(&key, &signed, request, &body, now, acceptance)
            .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
        if verified == Verified::BodyOnly {
            state.metrics.body_only_signatures.inc();
        }
        Ok(Self {
            sidecar,
            webhook_id,
            body,
        })
    }
}

impl SignedCallback {
    /// Claims this callback's `webhook-id` for as long as its signature could be replayed,
    /// for routes whose effect must happen at most once (a tool call): 409 when it was
    /// claimed before, 503 when Redis cannot say.
    pub async fn claim_once(&self, state: &AppState) -> Result<(), ApiError> {
        // A timestamp up to `tolerance` ahead stays valid until `2 * tolerance` from now.
        let tolerance = state.settings.signatures.tolerance_seconds;
        let ttl = Duration::from_secs(tolerance.saturating_mul(2).saturating_add(5));
        let claimed = state
            .redis
            .claim_request_id(self.sidecar.organization_id(), &self.webhook_id, ttl)
            .await
            .map_err(|error| ApiError::Unavailable(error.into()))?;
        if claimed {
            Ok(())
        } else {
            Err(ApiError::Conflict(
                "webhook-id was already used: this request runs at most once per id".into(),
            ))
        }
    }
}

/// A stream reader authorised by a valid stream token.
#[derive(Debug)]
pub struct StreamReader(pub StreamGrant);

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

impl FromRequestParts<AppState> for StreamReader {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let from_header = header(&parts.headers, header::AUTHORIZATION.as_str())
            .map(|value| {
                value
                    .strip_prefix("Bearer ")
                    .map(str::trim)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        ApiError::Unauthorized("authorization must be a Bearer token".into())
                    })
            })
            .transpose()?;
        let token = match from_header {
            Some(token) => token,
            None => Query::<TokenQuery>::try_from_uri(&parts.uri)
                .ok()
                .and_then(|Query(q)| q.access_token)
                .ok_or_else(|| ApiError::Unauthorized("missing stream token".into()))?,
        };
        stream_token::verify(&state.keys.stream_token, &token, unix_now())
            .map(StreamReader)
            .map_err(|e| ApiError::Unauthorized(e.to_string()))
    }
}
