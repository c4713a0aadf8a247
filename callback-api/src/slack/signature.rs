//! Slack request signatures (the `v0` scheme): `X-Slack-Signature: v0=<hex HMAC-SHA256>` of
//! `v0:{X-Slack-Request-Timestamp}:{raw body}` with the app's signing secret.
//!
//! Checked before the body is parsed; timestamps more than five minutes from this server's
//! clock are refused (replays), and the MAC is compared in constant time.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// How far a request's timestamp may be from now, in seconds.
pub const TOLERANCE_SECONDS: i64 = 300;

/// Why a request's signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// `X-Slack-Request-Timestamp` or `X-Slack-Signature` is absent.
    #[error("missing X-Slack-Request-Timestamp or X-Slack-Signature header")]
    Missing,
    /// The timestamp is not a number.
    #[error("X-Slack-Request-Timestamp is not a Unix timestamp")]
    BadTimestamp,
    /// The timestamp is more than five minutes away from now.
    #[error("X-Slack-Request-Timestamp is more than five minutes from now")]
    Stale,
    /// Not `v0=` and 64 hex digits.
    #[error("X-Slack-Signature is not a v0 signature")]
    Malformed,
    /// The MAC does not match.
    #[error("X-Slack-Signature does not match the request")]
    Mismatch,
}

/// The `v0=...` signature of `body` sent at `timestamp`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let digest = mac(secret, timestamp, body).finalize().into_bytes();
    let mut out = String::with_capacity(67);
    out.push_str("v0=");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
    };
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac
}

/// Verifies a request's signature headers against its raw body at time `now` (Unix seconds).
pub fn verify(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return Err(SignatureError::Missing);
    };
    let sent: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    // abs_diff: any two i64 have a distance that fits a u64, so no timestamp can overflow it.
    if now.abs_diff(sent) > TOLERANCE_SECONDS.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let hex = signature
        .strip_prefix("v0=")
        .ok_or(SignatureError::Malformed)?;
    let expected = decode_hex(hex).ok_or(SignatureError::Malformed)?;
    mac(secret, timestamp, body)
        .verify_slice(&expected)
        .map_err(|_| SignatureError::Mismatch)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of Slack's "Verifying requests from Slack" guide.
    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const TIMESTAMP: &str = "1531420618";
    const BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SIGNATURE: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
    const NOW: i64 = 1_531_420_618 + 60;

    fn check(
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &str,
        now: i64,
    ) -> Result<(), SignatureError> {
        verify(
            SECRET.as_bytes(),
            timestamp,
            signature,
            body.as_bytes(),
            now,
        )
    }

    #[test]
    fn slacks_published_example_verifies_and_signs_the_same() {
        assert_eq!(check(Some(TIMESTAMP), Some(SIGNATURE), BODY, NOW), Ok(()));
        assert_eq!(
            sign(SECRET.as_bytes(), TIMESTAMP, BODY.as_bytes()),
            SIGNATURE
        );
    }

    #[test]
    fn a_changed_body_secret_or_timestamp_is_a_mismatch() {
        let tampered = BODY.replace("foobar", "foobaz");
        assert_eq!(
            check(Some(TIMESTAMP), Some(SIGNATURE), &tampered, NOW),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(
                b"another-secret",
                Some(TIMESTAMP),
                Some(SIGNATURE),
                BODY.as_bytes(),
                NOW
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(Some("1531420619"), Some(SIGNATURE), BODY, NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn old_or_future_timestamps_are_stale_even_with_a_valid_signature() {
        assert_eq!(
            check(Some(TIMESTAMP), Some(SIGNATURE), BODY, 1_531_420_618 + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            check(Some(TIMESTAMP), Some(SIGNATURE), BODY, 1_531_420_618 - 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            check(Some(TIMESTAMP), Some(SIGNATURE), BODY, 1_531_420_618 + 300),
            Ok(())
        );
    }

    #[test]
    fn timestamps_at_the_ends_of_i64_are_stale_at_any_time() {
        for timestamp in [i64::MIN, i64::MAX] {
            for now in [0, NOW] {
                assert_eq!(
                    check(Some(&timestamp.to_string()), Some(SIGNATURE), BODY, now),
                    Err(SignatureError::Stale),
                    "{timestamp} at {now}"
                );
            }
        }
    }

    #[test]
    fn missing_and_malformed_headers_are_refused() {
        assert_eq!(
            check(None, Some(SIGNATURE), BODY, NOW),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            check(Some(TIMESTAMP), None, BODY, NOW),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            check(Some("yesterday"), Some(SIGNATURE), BODY, NOW),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(
            check(
                Some(TIMESTAMP),
                Some(&SIGNATURE.replace("v0=", "v1=")),
                BODY,
                NOW
            ),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            check(Some(TIMESTAMP), Some("v0=abc"), BODY, NOW),
            Err(SignatureError::Malformed)
        );
    }
}
