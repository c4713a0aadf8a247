//! Short-lived tokens that let a client read one tenant's session streams.
//!
//! A stream token is a JWT (RFC 7519) signed with HS256 under the stream-token key that the
//! callback API and the token issuer (Nubabel's backend) share. Claims:
//! `aud` = `"nubabel-session-stream"`, `org` = the organization id, `iat` and `exp` (Unix seconds;
//! `exp` at most one hour after `iat`), and optionally `sid` to limit the token to one Nubabel
//! session. Any JWT library can issue one; this module issues and verifies them for Rust callers
//! and tests.
//!
//! Verification accepts only `alg: HS256` (never `none` or an asymmetric algorithm named by the
//! token), compares the MAC in constant time, and checks audience, issue time and expiry. The
//! lifetime is measured from `iat`, not from the moment of presentation, so a token cannot be
//! made with a far expiry and wait until it comes within the hour; a token without `iat` is
//! refused, since its lifetime cannot be told. [`StreamGrant::issued_at`] is what the callback
//! API's revocations compare against: tokens are revoked by tenant and issue time.

use std::fmt;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::identity::OrganizationId;

/// The `aud` claim every stream token carries.
pub const AUDIENCE: &str = "nubabel-session-stream";

/// Longest lifetime a token may have, from `iat` to `exp`.
pub const MAX_LIFETIME_SECONDS: i64 = 60 * 60;

/// How far ahead of this clock a token's `iat` may be (the issuer's clock may run fast).
pub const CLOCK_SKEW_SECONDS: i64 = 60;

/// Shortest stream-token key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// Longest token accepted, so a hostile header cannot cost much to parse.
const MAX_TOKEN_LEN: usize = 2048;

/// The key stream tokens are signed with (`NUBABEL_STREAM_TOKEN_KEY`).
#[derive(Clone)]
pub struct StreamTokenKey(SecretSlice<u8>);

/// The stream-token key is too short to be safe.
#[derive(Debug, thiserror::Error)]
#[error("the stream token key must be at least {MIN_KEY_BYTES} bytes, got {0}")]
pub struct StreamTokenKeyTooShort(pub usize);

impl StreamTokenKey {
    /// Wraps the key material, refusing keys shorter than 32 bytes.
    pub fn new(bytes: &[u8]) -> Result<Self, StreamTokenKeyTooShort> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(StreamTokenKeyTooShort(bytes.len()));
        }
        Ok(Self(SecretSlice::from(bytes.to_vec())))
    }

    fn mac(&self) -> Hmac<Sha256> {
        match <Hmac<Sha256> as KeyInit>::new_from_slice(self.0.expose_secret()) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
        }
    }
}

impl fmt::Debug for StreamTokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamTokenKey([redacted])")
    }
}

/// When a token is issued and when it expires, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// The `iat` claim.
    pub issued_at: i64,
    /// The `exp` claim.
    pub expires_at: i64,
}

impl Validity {
    /// Valid from `now` for `seconds`.
    pub fn starting_at(now: i64, seconds: i64) -> Self {
        Self {
            issued_at: now,
            expires_at: now.saturating_add(seconds),
        }
    }
}

/// What a verified token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamGrant {
    /// The tenant whose sessions the bearer may read.
    pub organization_id: OrganizationId,
    /// When set, the one Nubabel session the bearer may read.
    pub session_id: Option<String>,
    /// Issue time (`iat`), Unix seconds: a revocation refuses tokens issued at or before it.
    pub issued_at: i64,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    aud: String,
    org: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
    exp: i64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// Why a stream token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamTokenError {
    /// Not three base64url parts of JSON, or too long.
    #[error("malformed token")]
    Malformed,
    /// The header names an algorithm other than HS256.
    #[error("unsupported token algorithm")]
    UnsupportedAlgorithm,
    /// The MAC does not match.
    #[error("invalid token signature")]
    BadSignature,
    /// The audience is not `nubabel-session-stream`.
    #[error("token is not a session stream token")]
    WrongAudience,
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// The token has no `iat` claim, so its lifetime cannot be told.
    #[error("token has no iat (issued-at) claim")]
    MissingIssuedAt,
    /// The token's `iat` is ahead of this clock by more than the allowed skew.
    #[error("token is issued in the future")]
    IssuedInTheFuture,
    /// The token's `exp` is more than one hour after its `iat`.
    #[error("token lifetime exceeds one hour")]
    TooLongLived,
    /// The `org` claim is not a valid organization id.
    #[error("token names an invalid organization")]
    InvalidOrganization,
}

/// Issues a token for `organization_id` (and optionally one session) with `validity` as its
/// `iat` and `exp`. Nothing is checked here: [`verify`] refuses a validity longer than
/// [`MAX_LIFETIME_SECONDS`].
pub fn issue(
    key: &StreamTokenKey,
    organization_id: &OrganizationId,
    session_id: Option<&str>,
    validity: Validity,
) -> String {
    let header = Header {
        alg: "HS256".to_owned(),
        typ: Some("JWT".to_owned()),
    };
    let claims = Claims {
        aud: AUDIENCE.to_owned(),
        org: organization_id.as_str().to_owned(),
        sid: session_id.map(str::to_owned),
        iat: Some(validity.issued_at),
        exp: validity.expires_at,
    };
    // Serialising these plain structs cannot fail.
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let claims = serde_json::to_vec(&claims).unwrap_or_default();
    let signing_input = format!("{}.{}", B64URL.encode(header), B64URL.encode(claims));
    let mut mac = key.mac();
    mac.update(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        B64URL.encode(mac.finalize().into_bytes())
    )
}

/// Verifies a token at time `now` (Unix seconds) and returns what it grants.
pub fn verify(
    key: &StreamTokenKey,
    token: &str,
    now: i64,
) -> Result<StreamGrant, StreamTokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(StreamTokenError::Malformed);
    }
    let (signing_input, signature) = token.rsplit_once('.').ok_or(StreamTokenError::Malformed)?;
    let (header, claims) = signing_input
        .split_once('.')
        .filter(|(_, claims)| !claims.contains('.'))
        .ok_or(StreamTokenError::Malformed)?;
    let header: Header = decode_json(header)?;
    if header.alg != "HS256" {
        return Err(StreamTokenError::UnsupportedAlgorithm);
    }
    let signature = B64URL
        .decode(signature)
        .map_err(|_| StreamTokenError::Malformed)?;
    let mut mac = key.mac();
    mac.update(signing_input.as_bytes());
    // verify_slice compares in constant time.
    mac.verify_slice(&signature)
        .map_err(|_| StreamTokenError::BadSignature)?;
    let claims: Claims = decode_json(claims)?;
    if claims.aud != AUDIENCE {
        return Err(StreamTokenError::WrongAudience);
    }
    if claims.exp <= now {
        return Err(StreamTokenError::Expired);
    }
    let issued_at = check_lifetime(claims.iat, claims.exp, now)?;
    let organization_id =
        OrganizationId::parse(&claims.org).map_err(|_| StreamTokenError::InvalidOrganization)?;
    Ok(StreamGrant {
        organization_id,
        session_id: claims.sid,
        issued_at,
        expires_at: claims.exp,
    })
}

/// A token is valid from `iat` (less the clock skew) and for at most an hour from it; returns
/// its `iat`.
fn check_lifetime(
    issued_at: Option<i64>,
    expires_at: i64,
    now: i64,
) -> Result<i64, StreamTokenError> {
    let issued_at = issued_at.ok_or(StreamTokenError::MissingIssuedAt)?;
    if issued_at > now.saturating_add(CLOCK_SKEW_SECONDS) {
        return Err(StreamTokenError::IssuedInTheFuture);
    }
    // i128: the claims are any i64 the issuer wrote.
    if i128::from(expires_at) - i128::from(issued_at) > i128::from(MAX_LIFETIME_SECONDS) {
        return Err(StreamTokenError::TooLongLived);
    }
    Ok(issued_at)
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, StreamTokenError> {
    let bytes = B64URL
        .decode(part)
        .map_err(|_| StreamTokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| StreamTokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn key() -> StreamTokenKey {
        StreamTokenKey::new(&[3u8; 32]).unwrap()
    }

    fn org(id: &str) -> OrganizationId {
        OrganizationId::parse(id).unwrap()
    }

    #[test]
    fn an_issued_token_grants_its_organization_and_session() {
        let token = issue(
            &key(),
            &org("org-a"),
            Some("s-1"),
            Validity::starting_at(NOW, 600),
        );
        let grant = verify(&key(), &token, NOW).unwrap();
        assert_eq!(grant.organization_id, org("org-a"));
        assert_eq!(grant.session_id.as_deref(), Some("s-1"));
    }

    #[test]
    fn tokens_from_a_standard_jwt_library_verify() {
        // Built by hand the way any HS256 JWT library does, with claims in another order.
        let header = B64URL.encode(br#"{"typ":"JWT","alg":"HS256"}"#);
        let claims = B64URL.encode(format!(
            r#"{{"exp":{},"org":"org-a","aud":"nubabel-session-stream","iat":{NOW}}}"#,
            NOW + 60
        ));
        let input = format!("{header}.{claims}");
        let mut mac = key().mac();
        mac.update(input.as_bytes());
        let token = format!("{input}.{}", B64URL.encode(mac.finalize().into_bytes()));
        assert_eq!(verify(&key(), &token, NOW).unwrap().session_id, None);
    }

    fn valid(issued_at: i64, expires_at: i64) -> Validity {
        Validity {
            issued_at,
            expires_at,
        }
    }

    #[test]
    fn expired_long_lived_and_foreign_tokens_are_refused() {
        assert_eq!(
            verify(
                &key(),
                &issue(&key(), &org("o"), None, valid(NOW - 60, NOW)),
                NOW
            ),
            Err(StreamTokenError::Expired)
        );
        assert_eq!(
            verify(
                &key(),
                &issue(&key(), &org("o"), None, Validity::starting_at(NOW, 3601)),
                NOW
            ),
            Err(StreamTokenError::TooLongLived)
        );
        let other = StreamTokenKey::new(&[4u8; 32]).unwrap();
        assert_eq!(
            verify(
                &key(),
                &issue(&other, &org("o"), None, Validity::starting_at(NOW, 60)),
                NOW
            ),
            Err(StreamTokenError::BadSignature)
        );
    }

    #[test]
    fn the_lifetime_counts_from_issue_not_from_presentation() {
        let check = |validity| verify(&key(), &issue(&key(), &org("o"), None, validity), NOW);
        // Issued 50 minutes ago for 100 minutes: only 50 minutes left, still too long-lived.
        assert_eq!(
            check(valid(NOW - 3000, NOW + 3000)),
            Err(StreamTokenError::TooLongLived)
        );
        // Made long ago with a far expiry, it never becomes valid as its expiry comes near.
        assert_eq!(
            check(valid(NOW - 86_400 * 365, NOW + 60)),
            Err(StreamTokenError::TooLongLived)
        );
        assert!(check(valid(NOW - 3000, NOW + 600)).is_ok());
        assert!(check(Validity::starting_at(NOW, MAX_LIFETIME_SECONDS)).is_ok());
        // The issuer's clock may be a little ahead, not more.
        assert!(check(Validity::starting_at(NOW + 60, 600)).is_ok());
        assert_eq!(
            check(Validity::starting_at(NOW + 61, 600)),
            Err(StreamTokenError::IssuedInTheFuture)
        );
        assert_eq!(
            check(valid(i64::MIN, i64::MAX)),
            Err(StreamTokenError::TooLongLived)
        );
    }

    #[test]
    fn a_token_without_an_issue_time_is_refused() {
        let header = B64URL.encode(br#"{"alg":"HS256"}"#);
        let claims = B64URL.encode(format!(
            r#"{{"aud":"nubabel-session-stream","org":"o","exp":{}}}"#,
            NOW + 60
        ));
        let input = format!("{header}.{claims}");
        let mut mac = key().mac();
        mac.update(input.as_bytes());
        let token = format!("{input}.{}", B64URL.encode(mac.finalize().into_bytes()));
        assert_eq!(
            verify(&key(), &token, NOW),
            Err(StreamTokenError::MissingIssuedAt)
        );
    }

    #[test]
    fn tokens_that_switch_the_algorithm_or_edit_claims_are_refused() {
        let token = issue(&key(), &org("org-a"), None, Validity::starting_at(NOW, 60));
        let mut parts: Vec<&str> = token.split('.').collect();
        let none_header = B64URL.encode(br#"{"alg":"none"}"#);
        parts[0] = &none_header;
        assert_eq!(
            verify(&key(), &parts.join("."), NOW),
            Err(StreamTokenError::UnsupportedAlgorithm)
        );

        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = B64URL.encode(format!(
            r#"{{"aud":"nubabel-session-stream","org":"org-b","exp":{}}}"#,
            NOW + 60
        ));
        parts[1] = &forged;
        assert_eq!(
            verify(&key(), &parts.join("."), NOW),
            Err(StreamTokenError::BadSignature)
        );

        for junk in ["", "a.b", "a.b.c.d", "!!!.###.$$$", &"a".repeat(3000)] {
            assert_eq!(
                verify(&key(), junk, NOW),
                Err(StreamTokenError::Malformed),
                "{junk:.20}"
            );
        }
    }

    #[test]
    fn a_token_for_another_audience_is_refused() {
        let header = B64URL.encode(br#"{"alg":"HS256"}"#);
        let claims = B64URL.encode(format!(
            r#"{{"aud":"something-else","org":"o","iat":{NOW},"exp":{}}}"#,
            NOW + 60
        ));
        let input = format!("{header}.{claims}");
        let mut mac = key().mac();
        mac.update(input.as_bytes());
        let token = format!("{input}.{}", B64URL.encode(mac.finalize().into_bytes()));
        assert_eq!(
            verify(&key(), &token, NOW),
            Err(StreamTokenError::WrongAudience)
        );
    }
}
