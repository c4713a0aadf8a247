//! `POST /slack/events`: the `v0` signature headers over the raw body, then the body itself.
//! Input: timestamp, signature, then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nubabel_callback_api::{
    routes::slack::{SlackRequest, read_body},
    slack::signature::{TOLERANCE_SECONDS, sign, verify},
};
use nubabel_fuzz::{NOW, fields, text};

const SECRET: &[u8] = b"8f742231b10e8888abcd99yyyzzz85a5";

fuzz_target!(|data: &[u8]| {
    let [timestamp, signature, body] = fields(data, 3)[..] else {
        return;
    };
    let body = body.unwrap_or_default();
    let _ = verify(SECRET, text(timestamp), text(signature), body, NOW);
    // What Slack signs verifies when it is fresh, and is refused when it is not.
    if let Some(timestamp) = text(timestamp) {
        let signed = sign(SECRET, timestamp, body);
        let verified = verify(SECRET, Some(timestamp), Some(&signed), body, NOW);
        let fresh = timestamp
            .trim()
            .parse::<i64>()
            .is_ok_and(|sent| NOW.abs_diff(sent) <= TOLERANCE_SECONDS.unsigned_abs());
        assert_eq!(verified.is_ok(), fresh);
    }
    if let Ok(SlackRequest::Request { event, .. }) = read_body(body) {
        assert!(event.is_request());
    }
});
