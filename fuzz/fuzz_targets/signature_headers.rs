//! The signed-callback headers: caller identity, `webhook-id`, `webhook-timestamp`,
//! `webhook-signature` against the method, target and body, both signature versions; the
//! bridge's `whsec_` key and the MCP bearer token. Input: the fields one per line, the body
//! last.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nubabel_contract::{
    identity::SidecarIdentity,
    signing::{
        Acceptance, MasterKey, RequestTarget, SidecarKey, SignedHeaders, Verified, Versions,
        derive_mcp_token, derive_sidecar_key, sign_request, validate_webhook_id, verify,
        verify_mcp_token,
    },
};
use nubabel_fuzz::{NOW, fields, text};

fuzz_target!(|data: &[u8]| {
    let [
        organization,
        sidecar,
        id,
        timestamp,
        signature,
        method,
        target,
        body,
    ] = fields(data, 8)[..]
    else {
        return;
    };
    let Ok(master) = MasterKey::new(&[7; 32]) else {
        return;
    };
    let Ok(known) = SidecarIdentity::new("org-fuzz", "team-a", "fleet") else {
        return;
    };
    let caller = match (text(organization), text(sidecar)) {
        (Some(organization), Some(sidecar)) => {
            SidecarIdentity::from_headers(organization, sidecar).unwrap_or_else(|_| known.clone())
        }
        _ => known.clone(),
    };
    let key = derive_sidecar_key(&master, &caller);
    let headers = SignedHeaders {
        id: text(id),
        timestamp: text(timestamp),
        signature: text(signature),
    };
    let request = RequestTarget {
        method: text(method).unwrap_or("POST"),
        target: text(target).unwrap_or("/"),
    };
    let body = body.unwrap_or_default();
    for versions in [Versions::RequestBoundOnly, Versions::AllowBodyOnly] {
        let acceptance = Acceptance {
            tolerance_seconds: 300,
            versions,
        };
        let _ = verify(&key, &headers, request, body, NOW, acceptance);
        // What a sender signs verifies, whatever the request and body.
        if let Some(id) = headers.id.filter(|id| validate_webhook_id(id).is_ok()) {
            let signed = sign_request(&key, id, NOW, request, body);
            let now = NOW.to_string();
            let genuine = SignedHeaders {
                id: Some(id),
                timestamp: Some(&now),
                signature: Some(&signed),
            };
            let verified = verify(&key, &genuine, request, body, NOW, acceptance);
            if !request.method.contains('\0') && !request.target.contains('\0') {
                assert_eq!(verified, Ok(Verified::RequestBound));
            }
            // Another fleet's key never verifies it.
            let other = derive_sidecar_key(&master, &known);
            if other != key {
                assert!(verify(&other, &genuine, request, body, NOW, acceptance).is_err());
            }
        }
    }
    if let Some(secret) = headers.signature {
        let _ = SidecarKey::from_whsec(secret);
        let generation = verify_mcp_token(&master, &caller, secret);
        // Only the fleet's own token (generation 0 here) is accepted.
        if generation.is_some() {
            assert_eq!(secret, derive_mcp_token(&master, &caller).expose());
        }
    }
});
