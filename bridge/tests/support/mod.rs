//! What the bridge's test binaries share: the test fleet's identity and key, and the signature
//! check of a stand-in callback receiver.
#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use nubabel_contract::identity::SidecarIdentity;
use nubabel_contract::signing::{
    self, Acceptance, MasterKey, RequestTarget, SidecarKey, SignedHeaders, Versions,
    derive_sidecar_key,
};

/// The callback API's master key in these tests.
pub const MASTER_KEY: &str = "bridge-test-master-key-0123456789abcdef";
/// The tenant of the test fleet.
pub const ORGANIZATION: &str = "org-bridge";

/// The test fleet, `team-a/fleet` of [`ORGANIZATION`].
pub fn identity() -> SidecarIdentity {
    SidecarIdentity::new(ORGANIZATION, "team-a", "fleet").unwrap()
}

/// The test fleet's signing key, derived as the callback API derives it.
pub fn sidecar_key() -> SidecarKey {
    derive_sidecar_key(&MasterKey::new(MASTER_KEY.as_bytes()).unwrap(), &identity())
}

/// The `webhook-id` of a callback POSTed to `target`, signed (`v2`, over the request) by the
/// test fleet with its identity headers, or `None` when a header is missing or wrong or the
/// signature does not match.
pub fn verified_webhook_id(target: &str, headers: &HeaderMap, body: &[u8]) -> Option<String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let signed = SignedHeaders {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
    };
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let identity_ok = header("x-nubabel-organization") == Some(ORGANIZATION)
        && header("x-nubabel-sidecar") == Some("team-a/fleet");
    let acceptance = Acceptance {
        tolerance_seconds: 300,
        versions: Versions::RequestBoundOnly,
    };
    let request = RequestTarget::post(target);
    (identity_ok
        && signing::verify(&sidecar_key(), &signed, request, body, now, acceptance).is_ok())
    .then(|| signed.id.unwrap_or_default().to_owned())
}
