//! Callback signatures in the Standard Webhooks style, and the per-sidecar keys they use.
//!
//! The operator and the callback API share one master key. A sidecar's key is
//! `HMAC-SHA256(master, "nubabel-sidecar-key/v1\0" + organizationId + "\0" + namespace + "\0" +
//! name)`: the operator hands it to the sidecar's bridge (as a `whsec_` string in the sidecar's
//! Secret) and the API derives it again from the identity headers of each callback, so the API
//! needs no key store and a forged identity simply yields the wrong key.
//!
//! A `v1` signature is `v1,<base64(HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}"))>`,
//! over the raw body bytes, as <https://www.standardwebhooks.com> specifies. It does not cover
//! the request, so a captured callback could be re-sent to another route or session within the
//! time window. A `v2` signature also covers the method and the request target (path and
//! query, as sent): `v2,<base64(HMAC-SHA256(key, "nubabel-request/v2\0" + webhook-id + "\0" +
//! timestamp + "\0" + METHOD + "\0" + target + "\0" + body))>`. None of the first five fields
//! can hold a NUL, so the separators are unambiguous. Senders put both in `webhook-signature`
//! ([`sign_request`]); a receiver that knows `v2` checks only it, and accepts a `v1`-only
//! request only when told to ([`Versions::AllowBodyOnly`], for senders that predate
//! `v2`).
//!
//! MCP requests cannot be signed (OpenCode sends them, not the bridge), so a sidecar presents
//! a bearer token to the MCP gateway instead: `nmcp_<base64url(HMAC-SHA256(master,
//! "nubabel-mcp-token/v1\0" + organizationId + "\0" + namespace + "\0" + name))>`, derived
//! like the signing key under its own label, so neither value reveals the other. A fleet's
//! token rotates by generation: generation 0 is the token above, generation `g > 0` is
//! `nmcp_<g>.<base64url(HMAC-SHA256(master, the same input + "\0" + g))>`, so each generation
//! is a different token and names its generation for the gateway to accept or refuse.

use std::fmt;

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64URL},
};
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

use crate::identity::SidecarIdentity;

type HmacSha256 = Hmac<Sha256>;

/// Shortest master key accepted, in bytes.
pub const MIN_MASTER_KEY_BYTES: usize = 32;

/// How far a callback's timestamp may be from the receiver's clock, either way.
pub const DEFAULT_TOLERANCE_SECONDS: u64 = 5 * 60;

/// Domain separation for sidecar keys; bump the version to rotate every key at once.
const SIDECAR_KEY_CONTEXT: &[u8] = b"nubabel-sidecar-key/v1\0";

/// Domain separation for MCP bearer tokens.
const MCP_TOKEN_CONTEXT: &[u8] = b"nubabel-mcp-token/v1\0";

/// Prefix of every MCP bearer token.
pub const MCP_TOKEN_PREFIX: &str = "nmcp_";

/// Longest `webhook-id` accepted.
pub const MAX_WEBHOOK_ID_LEN: usize = 128;

/// Longest `webhook-signature` header accepted (a handful of signatures during rotation).
const MAX_SIGNATURE_HEADER_LEN: usize = 1024;

/// The master key shared by the operator and the callback API (`NUBABEL_SIGNING_MASTER_KEY`).
#[derive(Clone)]
pub struct MasterKey(SecretSlice<u8>);

/// The master key is too short to be safe.
#[derive(Debug, thiserror::Error)]
#[error("the signing master key must be at least {MIN_MASTER_KEY_BYTES} bytes, got {0}")]
pub struct MasterKeyTooShort(pub usize);

impl MasterKey {
    /// Wraps the key material, refusing keys shorter than 32 bytes.
    pub fn new(bytes: &[u8]) -> Result<Self, MasterKeyTooShort> {
        if bytes.len() < MIN_MASTER_KEY_BYTES {
            return Err(MasterKeyTooShort(bytes.len()));
        }
        Ok(Self(SecretSlice::from(bytes.to_vec())))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey([redacted])")
    }
}

/// One sidecar's callback signing key (32 bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct SidecarKey([u8; 32]);

impl SidecarKey {
    /// The key as Standard Webhooks serialises secrets: `whsec_<base64>`.
    pub fn to_whsec(&self) -> String {
        format!("whsec_{}", BASE64.encode(self.0))
    }

    /// Parses a `whsec_<base64>` secret (or bare base64), as a bridge reads it from its Secret.
    pub fn from_whsec(value: &str) -> Option<Self> {
        let encoded = value.strip_prefix("whsec_").unwrap_or(value);
        let bytes = BASE64.decode(encoded.trim()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    fn mac(&self) -> HmacSha256 {
        new_mac(&self.0)
    }
}

impl fmt::Debug for SidecarKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SidecarKey([redacted])")
    }
}

/// An HMAC-SHA256 instance keyed with `key`.
fn new_mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (long ones are hashed first), so `new_from_slice` cannot
    // fail; `Hmac::new` over a fixed-size key block would need the same length anyway.
    match <HmacSha256 as KeyInit>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
    }
}

/// Derives the signing key of one sidecar fleet from the master key.
pub fn derive_sidecar_key(master: &MasterKey, sidecar: &SidecarIdentity) -> SidecarKey {
    let mut mac = new_mac(master.0.expose_secret());
    mac.update(SIDECAR_KEY_CONTEXT);
    mac.update(sidecar.organization_id().as_str().as_bytes());
    mac.update(b"\0");
    mac.update(sidecar.namespace().as_bytes());
    mac.update(b"\0");
    mac.update(sidecar.name().as_bytes());
    SidecarKey(mac.finalize().into_bytes().into())
}

/// One sidecar fleet's bearer token for the MCP gateway (`nmcp_<base64url>`).
#[derive(Clone, PartialEq, Eq)]
pub struct McpToken(String);

impl McpToken {
    /// The token as the sidecar presents it (`Authorization: Bearer <token>`).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for McpToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("McpToken([redacted])")
    }
}

fn mcp_token_mac(master: &MasterKey, sidecar: &SidecarIdentity, generation: u32) -> HmacSha256 {
    let mut mac = new_mac(master.0.expose_secret());
    mac.update(MCP_TOKEN_CONTEXT);
    mac.update(sidecar.organization_id().as_str().as_bytes());
    mac.update(b"\0");
    mac.update(sidecar.namespace().as_bytes());
    mac.update(b"\0");
    mac.update(sidecar.name().as_bytes());
    // Generation 0 keeps the input tokens had before generations existed.
    if generation > 0 {
        mac.update(b"\0");
        mac.update(generation.to_string().as_bytes());
    }
    mac
}

/// Derives the MCP bearer token of one sidecar fleet, generation 0, from the master key.
pub fn derive_mcp_token(master: &MasterKey, sidecar: &SidecarIdentity) -> McpToken {
    derive_mcp_token_generation(master, sidecar, 0)
}

/// Derives generation `generation` of one sidecar fleet's MCP bearer token.
pub fn derive_mcp_token_generation(
    master: &MasterKey,
    sidecar: &SidecarIdentity,
    generation: u32,
) -> McpToken {
    let tag = BASE64URL.encode(
        mcp_token_mac(master, sidecar, generation)
            .finalize()
            .into_bytes(),
    );
    if generation == 0 {
        McpToken(format!("{MCP_TOKEN_PREFIX}{tag}"))
    } else {
        McpToken(format!("{MCP_TOKEN_PREFIX}{generation}.{tag}"))
    }
}

/// The generation of `presented` if it is an MCP token of `sidecar` (constant-time comparison
/// of the MAC); `None` for anything else.
pub fn verify_mcp_token(
    master: &MasterKey,
    sidecar: &SidecarIdentity,
    presented: &str,
) -> Option<u32> {
    let encoded = presented.strip_prefix(MCP_TOKEN_PREFIX)?;
    let (generation, encoded) = match encoded.split_once('.') {
        // A canonical number only, so one generation has one spelling.
        Some((generation, encoded)) => (
            generation
                .parse::<u32>()
                .ok()
                .filter(|g| *g > 0 && g.to_string() == generation)?,
            encoded,
        ),
        None => (0, encoded),
    };
    let tag = BASE64URL.decode(encoded).ok()?;
    mcp_token_mac(master, sidecar, generation)
        .verify_slice(&tag)
        .ok()
        .map(|()| generation)
}

/// Domain separation for `v2` signatures, which cover the request as well as the body.
const REQUEST_SIGNATURE_CONTEXT: &[u8] = b"nubabel-request/v2\0";

/// The request a `v2` signature is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTarget<'a> {
    /// The HTTP method, e.g. `POST`.
    pub method: &'a str,
    /// The path and query exactly as sent, e.g. `/api/sidecar/sessions/s-1/progress`.
    pub target: &'a str,
}

impl<'a> RequestTarget<'a> {
    /// A `POST` to `target`.
    pub fn post(target: &'a str) -> Self {
        Self {
            method: "POST",
            target,
        }
    }
}

/// Which signature versions a receiver accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Versions {
    /// Only `v2` signatures, which cover the method and target.
    #[default]
    RequestBoundOnly,
    /// `v2` when the request carries one; otherwise a `v1` signature over the body alone (for
    /// senders that predate `v2`, during an upgrade).
    AllowBodyOnly,
}

/// Which kind of signature a verified request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// A `v2` signature over the request and the body.
    RequestBound,
    /// A `v1` signature over the body alone (accepted under [`Versions::AllowBodyOnly`]).
    BodyOnly,
}

/// Signs one message with `v1` only: returns the `webhook-signature` header value
/// (`v1,<base64>`). Receivers that require `v2` refuse it; senders use [`sign_request`].
pub fn sign(key: &SidecarKey, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    signature_for(&key.0, webhook_id, timestamp, body)
}

/// Signs one request: returns the `webhook-signature` header value `v1,<base64> v2,<base64>`,
/// so receivers that predate `v2` still verify it.
pub fn sign_request(
    key: &SidecarKey,
    webhook_id: &str,
    timestamp: i64,
    request: RequestTarget<'_>,
    body: &[u8],
) -> String {
    let mut mac = key.mac();
    feed_request(&mut mac, webhook_id, timestamp, request, body);
    format!(
        "{} v2,{}",
        sign(key, webhook_id, timestamp, body),
        BASE64.encode(mac.finalize().into_bytes())
    )
}

fn feed_request(
    mac: &mut HmacSha256,
    webhook_id: &str,
    timestamp: i64,
    request: RequestTarget<'_>,
    body: &[u8],
) {
    mac.update(REQUEST_SIGNATURE_CONTEXT);
    for field in [
        webhook_id.as_bytes(),
        timestamp.to_string().as_bytes(),
        request.method.as_bytes(),
        request.target.as_bytes(),
    ] {
        mac.update(field);
        mac.update(b"\0");
    }
    mac.update(body);
}

fn signature_for(key: &[u8], webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = new_mac(key);
    feed(&mut mac, webhook_id, timestamp, body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

fn feed(mac: &mut HmacSha256, webhook_id: &str, timestamp: i64, body: &[u8]) {
    mac.update(webhook_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
}

/// Why a signed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A required header is absent (the header's name).
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// `webhook-id` is empty, too long or has characters other than `[A-Za-z0-9_-]`.
    #[error("webhook-id must be 1 to 128 characters of [A-Za-z0-9_-]")]
    InvalidId,
    /// `webhook-timestamp` is not an integer number of seconds.
    #[error("webhook-timestamp must be an integer number of seconds")]
    InvalidTimestamp,
    /// The timestamp is outside the tolerance window (a replay or a skewed clock).
    #[error("webhook-timestamp is outside the accepted window")]
    StaleTimestamp,
    /// `webhook-signature` has no `v1,<base64>` entry.
    #[error("webhook-signature must hold v1,<base64> signatures")]
    MalformedSignature,
    /// No signature matched the body with the sender's key.
    #[error("no signature matches")]
    NoMatchingSignature,
    /// Only `v1` signatures, which do not cover the method and path, and the receiver requires
    /// `v2`.
    #[error("webhook-signature must hold a v2 signature, which covers the method and path")]
    RequestNotSigned,
}

/// The three Standard Webhooks headers of one request, as received.
#[derive(Debug, Clone, Copy)]
pub struct SignedHeaders<'a> {
    /// `webhook-id`: the message id, the same on every retry.
    pub id: Option<&'a str>,
    /// `webhook-timestamp`: Unix seconds of this attempt.
    pub timestamp: Option<&'a str>,
    /// `webhook-signature`: space-separated `v1,<base64>` entries.
    pub signature: Option<&'a str>,
}

/// Checks the header values that do not need the body: presence, id syntax and the time window.
///
/// Cheap, so a receiver runs it before it reads the body. Returns the id and timestamp.
pub fn check_headers<'a>(
    headers: &SignedHeaders<'a>,
    now: i64,
    tolerance_seconds: u64,
) -> Result<(&'a str, i64), SignatureError> {
    let id = headers
        .id
        .ok_or(SignatureError::MissingHeader("webhook-id"))?;
    let timestamp = headers
        .timestamp
        .ok_or(SignatureError::MissingHeader("webhook-timestamp"))?;
    if headers.signature.is_none() {
        return Err(SignatureError::MissingHeader("webhook-signature"));
    }
    validate_webhook_id(id)?;
    let timestamp: i64 = timestamp
        .parse()
        .map_err(|_| SignatureError::InvalidTimestamp)?;
    if now.abs_diff(timestamp) > tolerance_seconds {
        return Err(SignatureError::StaleTimestamp);
    }
    Ok((id, timestamp))
}

/// Checks that a `webhook-id` is safe to sign over, store and echo back.
pub fn validate_webhook_id(id: &str) -> Result<(), SignatureError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_WEBHOOK_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SignatureError::InvalidId)
    }
}

/// Verifies a whole message: headers, time window and signature (constant-time comparison).
///
/// When any `v2` entry is present, only `v2` entries count, so a request cannot be downgraded
/// by a `v1` entry beside a wrong `v2`. Without one, a `v1` entry counts only under
/// [`Versions::AllowBodyOnly`]. Any one of several matching entries is enough, so senders
/// can rotate keys without downtime.
pub fn verify(
    key: &SidecarKey,
    headers: &SignedHeaders<'_>,
    request: RequestTarget<'_>,
    body: &[u8],
    now: i64,
    acceptance: Acceptance,
) -> Result<Verified, SignatureError> {
    let (id, timestamp) = check_headers(headers, now, acceptance.tolerance_seconds)?;
    let signature = headers
        .signature
        .ok_or(SignatureError::MissingHeader("webhook-signature"))?;
    if signature.len() > MAX_SIGNATURE_HEADER_LEN {
        return Err(SignatureError::MalformedSignature);
    }
    let entries = || {
        signature
            .split(' ')
            .filter_map(|entry| entry.split_once(','))
    };
    let (version, verified, mac) = if entries().any(|(version, _)| version == "v2") {
        if request.method.contains('\0') || request.target.contains('\0') {
            return Err(SignatureError::NoMatchingSignature);
        }
        let mut mac = key.mac();
        feed_request(&mut mac, id, timestamp, request, body);
        ("v2", Verified::RequestBound, mac)
    } else if acceptance.versions == Versions::AllowBodyOnly {
        let mut mac = key.mac();
        feed(&mut mac, id, timestamp, body);
        ("v1", Verified::BodyOnly, mac)
    } else if entries().any(|(version, _)| version == "v1") {
        return Err(SignatureError::RequestNotSigned);
    } else {
        return Err(SignatureError::MalformedSignature);
    };
    let mut saw_version = false;
    for (_, encoded) in entries().filter(|(v, _)| *v == version) {
        saw_version = true;
        let Ok(candidate) = BASE64.decode(encoded) else {
            continue;
        };
        // verify_slice compares in constant time.
        if mac.clone().verify_slice(&candidate).is_ok() {
            return Ok(verified);
        }
    }
    Err(if saw_version {
        SignatureError::NoMatchingSignature
    } else {
        SignatureError::MalformedSignature
    })
}

/// What a receiver accepts: how far timestamps may be from its clock, and which signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acceptance {
    /// Seconds a timestamp may be from now, either way.
    pub tolerance_seconds: u64,
    /// Which signature versions count.
    pub versions: Versions,
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_614_265_330;

    fn key() -> SidecarKey {
        let master = MasterKey::new(&[7u8; 32]).unwrap();
        derive_sidecar_key(
            &master,
            &SidecarIdentity::new("org-a", "tenant-a", "fleet").unwrap(),
        )
    }

    const TARGET: &str = "/api/sidecar/sessions/s-1/progress";

    /// `verify` as a receiver that still accepts `v1` does it, for a POST to [`TARGET`].
    fn verify_v1(
        key: &SidecarKey,
        headers: &SignedHeaders<'_>,
        body: &[u8],
        now: i64,
        tolerance_seconds: u64,
    ) -> Result<Verified, SignatureError> {
        verify(
            key,
            headers,
            RequestTarget::post(TARGET),
            body,
            now,
            Acceptance {
                tolerance_seconds,
                versions: Versions::AllowBodyOnly,
            },
        )
    }

    fn strict() -> Acceptance {
        Acceptance {
            tolerance_seconds: 300,
            versions: Versions::RequestBoundOnly,
        }
    }

    #[test]
    fn a_request_signature_verifies_only_for_its_method_and_target() {
        let body = br#"{"state":"busy"}"#;
        let sig = sign_request(&key(), "msg_1", NOW, RequestTarget::post(TARGET), body);
        let ts = NOW.to_string();
        let check = |request: RequestTarget<'_>, body: &[u8]| {
            verify(
                &key(),
                &headers("msg_1", &ts, &sig),
                request,
                body,
                NOW,
                strict(),
            )
        };
        assert_eq!(
            check(RequestTarget::post(TARGET), body),
            Ok(Verified::RequestBound)
        );
        for other in [
            "/api/sidecar/sessions/s-2/progress",
            "/api/sidecar/sessions/s-1/update",
            "/api/sidecar/mcp/invoke",
            "/api/sidecar/sessions/s-1/progress?x=1",
        ] {
            assert_eq!(
                check(RequestTarget::post(other), body),
                Err(SignatureError::NoMatchingSignature),
                "{other}"
            );
        }
        let put = RequestTarget {
            method: "PUT",
            target: TARGET,
        };
        assert_eq!(check(put, body), Err(SignatureError::NoMatchingSignature));
        assert_eq!(
            check(RequestTarget::post(TARGET), br#"{"state":"idle"}"#),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn a_body_only_signature_is_refused_unless_allowed() {
        let sig = sign(&key(), "msg_1", NOW, b"{}");
        let ts = NOW.to_string();
        let target = RequestTarget::post(TARGET);
        assert_eq!(
            verify(
                &key(),
                &headers("msg_1", &ts, &sig),
                target,
                b"{}",
                NOW,
                strict()
            ),
            Err(SignatureError::RequestNotSigned)
        );
        assert_eq!(
            verify_v1(&key(), &headers("msg_1", &ts, &sig), b"{}", NOW, 300),
            Ok(Verified::BodyOnly)
        );
    }

    #[test]
    fn a_wrong_v2_is_not_rescued_by_a_valid_v1_beside_it() {
        // A captured request re-sent to another target with its v2 kept: only v2 counts.
        let sig = sign_request(&key(), "msg_1", NOW, RequestTarget::post(TARGET), b"{}");
        let moved = RequestTarget::post("/api/sidecar/sessions/s-2/progress");
        assert_eq!(
            verify_v1(
                &key(),
                &headers("msg_1", &NOW.to_string(), &sig),
                b"{}",
                NOW,
                300
            ),
            Ok(Verified::RequestBound)
        );
        let lenient = Acceptance {
            tolerance_seconds: 300,
            versions: Versions::AllowBodyOnly,
        };
        assert_eq!(
            verify(
                &key(),
                &headers("msg_1", &NOW.to_string(), &sig),
                moved,
                b"{}",
                NOW,
                lenient
            ),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn shifted_field_boundaries_sign_differently() {
        let a = sign_request(&key(), "msg_1", NOW, RequestTarget::post("/a"), b"b");
        let b = sign_request(&key(), "msg_1", NOW, RequestTarget::post("/a\0b"), b"");
        assert_ne!(a.split(' ').nth(1), b.split(' ').nth(1));
        let ts = NOW.to_string();
        assert_eq!(
            verify(
                &key(),
                &headers("msg_1", &ts, &b),
                RequestTarget::post("/a\0b"),
                b"",
                NOW,
                strict()
            ),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            id: Some(id),
            timestamp: Some(ts),
            signature: Some(sig),
        }
    }

    #[test]
    fn signature_matches_the_standard_webhooks_reference_vector() {
        // The vector the Standard Webhooks reference libraries test against (a 24-byte secret).
        let secret = BASE64.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let signature = signature_for(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_fresh_signature_verifies() {
        let body = br#"{"state":"busy"}"#;
        let sig = sign(&key(), "msg_1", NOW, body);
        assert_eq!(
            verify_v1(
                &key(),
                &headers("msg_1", &NOW.to_string(), &sig),
                body,
                NOW,
                300
            ),
            Ok(Verified::BodyOnly)
        );
    }

    #[test]
    fn a_tampered_body_is_refused() {
        let sig = sign(&key(), "msg_1", NOW, br#"{"state":"busy"}"#);
        let result = verify_v1(
            &key(),
            &headers("msg_1", &NOW.to_string(), &sig),
            br#"{"state":"idle"}"#,
            NOW,
            300,
        );
        assert_eq!(result, Err(SignatureError::NoMatchingSignature));
    }

    #[test]
    fn a_tampered_id_is_refused() {
        let sig = sign(&key(), "msg_1", NOW, b"{}");
        let result = verify_v1(
            &key(),
            &headers("msg_2", &NOW.to_string(), &sig),
            b"{}",
            NOW,
            300,
        );
        assert_eq!(result, Err(SignatureError::NoMatchingSignature));
    }

    #[test]
    fn another_sidecars_key_is_refused() {
        let master = MasterKey::new(&[7u8; 32]).unwrap();
        let other = derive_sidecar_key(
            &master,
            &SidecarIdentity::new("org-b", "tenant-a", "fleet").unwrap(),
        );
        let sig = sign(&other, "msg_1", NOW, b"{}");
        let result = verify_v1(
            &key(),
            &headers("msg_1", &NOW.to_string(), &sig),
            b"{}",
            NOW,
            300,
        );
        assert_eq!(result, Err(SignatureError::NoMatchingSignature));
    }

    #[test]
    fn keys_differ_per_organization_namespace_and_name() {
        let master = MasterKey::new(&[7u8; 32]).unwrap();
        let k = |o, n, s| derive_sidecar_key(&master, &SidecarIdentity::new(o, n, s).unwrap());
        let base = k("org-a", "ns", "fleet");
        assert_ne!(base, k("org-b", "ns", "fleet"));
        assert_ne!(base, k("org-a", "ns2", "fleet"));
        assert_ne!(base, k("org-a", "ns", "fleet2"));
        // The NUL separators keep shifted boundaries apart.
        assert_ne!(k("org-a", "b", "c"), k("org-ab", "c", "c"));
        let other_master = MasterKey::new(&[8u8; 32]).unwrap();
        let id = SidecarIdentity::new("org-a", "ns", "fleet").unwrap();
        assert_ne!(base, derive_sidecar_key(&other_master, &id));
    }

    #[test]
    fn timestamps_outside_five_minutes_are_refused_both_ways() {
        let body = b"{}";
        for (ts, ok) in [
            (NOW - 301, false),
            (NOW - 299, true),
            (NOW + 299, true),
            (NOW + 301, false),
        ] {
            let sig = sign(&key(), "msg_1", ts, body);
            let result = verify_v1(
                &key(),
                &headers("msg_1", &ts.to_string(), &sig),
                body,
                NOW,
                300,
            );
            assert_eq!(result.is_ok(), ok, "timestamp offset {}", ts - NOW);
            if !ok {
                assert_eq!(result, Err(SignatureError::StaleTimestamp));
            }
        }
    }

    #[test]
    fn each_missing_header_is_named() {
        let sig = sign(&key(), "msg_1", NOW, b"{}");
        let ts = NOW.to_string();
        let cases = [
            (
                SignedHeaders {
                    id: None,
                    timestamp: Some(&ts),
                    signature: Some(&sig),
                },
                "webhook-id",
            ),
            (
                SignedHeaders {
                    id: Some("msg_1"),
                    timestamp: None,
                    signature: Some(&sig),
                },
                "webhook-timestamp",
            ),
            (
                SignedHeaders {
                    id: Some("msg_1"),
                    timestamp: Some(&ts),
                    signature: None,
                },
                "webhook-signature",
            ),
        ];
        for (h, name) in cases {
            assert_eq!(
                verify_v1(&key(), &h, b"{}", NOW, 300),
                Err(SignatureError::MissingHeader(name))
            );
        }
    }

    #[test]
    fn one_valid_signature_among_several_is_enough() {
        let good = sign(&key(), "msg_1", NOW, b"{}");
        let list = format!("v1,Zm9vYmFy v1a,ignored {good}");
        assert_eq!(
            verify_v1(
                &key(),
                &headers("msg_1", &NOW.to_string(), &list),
                b"{}",
                NOW,
                300
            ),
            Ok(Verified::BodyOnly)
        );
        let none = "v1,Zm9vYmFy v1,YmFyYmF6";
        assert_eq!(
            verify_v1(
                &key(),
                &headers("msg_1", &NOW.to_string(), none),
                b"{}",
                NOW,
                300
            ),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn malformed_headers_are_refused_without_panicking() {
        let sig = sign(&key(), "msg_1", NOW, b"{}");
        let ts = NOW.to_string();
        assert_eq!(
            verify_v1(&key(), &headers("msg_1", "soon", &sig), b"{}", NOW, 300),
            Err(SignatureError::InvalidTimestamp)
        );
        assert_eq!(
            verify_v1(&key(), &headers("msg.1", &ts, &sig), b"{}", NOW, 300),
            Err(SignatureError::InvalidId)
        );
        assert_eq!(
            verify_v1(&key(), &headers("", &ts, &sig), b"{}", NOW, 300),
            Err(SignatureError::InvalidId)
        );
        assert_eq!(
            verify_v1(
                &key(),
                &headers("msg_1", &ts, "sha256=abc"),
                b"{}",
                NOW,
                300
            ),
            Err(SignatureError::MalformedSignature)
        );
        assert_eq!(
            verify_v1(&key(), &headers("msg_1", &ts, "v1,***"), b"{}", NOW, 300),
            Err(SignatureError::NoMatchingSignature)
        );
        assert_eq!(
            verify_v1(
                &key(),
                &headers("msg_1", &ts, &"v1,a".repeat(400)),
                b"{}",
                NOW,
                300
            ),
            Err(SignatureError::MalformedSignature)
        );
    }

    #[test]
    fn whsec_round_trips_and_is_never_printed() {
        let k = key();
        assert_eq!(SidecarKey::from_whsec(&k.to_whsec()), Some(k.clone()));
        assert_eq!(format!("{k:?}"), "SidecarKey([redacted])");
        assert!(MasterKey::new(&[1u8; 31]).is_err());
    }

    #[test]
    fn an_mcp_token_verifies_only_for_its_own_sidecar() {
        let master = MasterKey::new(&[7u8; 32]).unwrap();
        let a = SidecarIdentity::new("org-a", "tenant-a", "fleet").unwrap();
        let b = SidecarIdentity::new("org-b", "tenant-a", "fleet").unwrap();
        let token = derive_mcp_token(&master, &a);
        assert!(token.expose().starts_with(MCP_TOKEN_PREFIX));
        assert_eq!(verify_mcp_token(&master, &a, token.expose()), Some(0));
        assert_eq!(verify_mcp_token(&master, &b, token.expose()), None);
        let other_master = MasterKey::new(&[8u8; 32]).unwrap();
        assert_eq!(verify_mcp_token(&other_master, &a, token.expose()), None);
        for forged in ["", "nmcp_", "nmcp_!!!", "Bearer x", &token.expose()[5..]] {
            assert_eq!(verify_mcp_token(&master, &a, forged), None, "{forged}");
        }
    }

    #[test]
    fn each_mcp_token_generation_is_another_token_that_verifies_as_its_own_generation_only() {
        let master = MasterKey::new(&[7u8; 32]).unwrap();
        let a = SidecarIdentity::new("org-a", "tenant-a", "fleet").unwrap();
        let b = SidecarIdentity::new("org-b", "tenant-a", "fleet").unwrap();
        let zero = derive_mcp_token(&master, &a);
        assert_eq!(derive_mcp_token_generation(&master, &a, 0), zero);
        let one = derive_mcp_token_generation(&master, &a, 1);
        let two = derive_mcp_token_generation(&master, &a, 2);
        assert_ne!(one, zero);
        assert_ne!(one, two);
        assert!(one.expose().starts_with("nmcp_1."));
        assert_eq!(verify_mcp_token(&master, &a, one.expose()), Some(1));
        assert_eq!(verify_mcp_token(&master, &a, two.expose()), Some(2));
        assert_eq!(verify_mcp_token(&master, &b, two.expose()), None);
        // The generation is covered by the MAC: relabelling a token breaks it.
        let tag = &two.expose()["nmcp_2.".len()..];
        for forged in [
            format!("nmcp_1.{tag}"),
            format!("nmcp_3.{tag}"),
            format!("nmcp_02.{tag}"),
            format!("nmcp_+2.{tag}"),
            format!("nmcp_0.{tag}"),
            format!("nmcp_{tag}"),
            format!("nmcp_4294967296.{tag}"),
        ] {
            assert_eq!(verify_mcp_token(&master, &a, &forged), None, "{forged}");
        }
    }

    #[test]
    fn the_mcp_token_is_not_the_signing_key_and_is_never_printed() {
        let master = MasterKey::new(&[7u8; 32]).unwrap();
        let a = SidecarIdentity::new("org-a", "tenant-a", "fleet").unwrap();
        let token = derive_mcp_token(&master, &a);
        let key = derive_sidecar_key(&master, &a).to_whsec();
        assert_ne!(token.expose()[5..], key[6..]);
        assert_eq!(format!("{token:?}"), "McpToken([redacted])");
    }
}
