//! The bridge's event mapping: OpenCode event payloads (one per line, as `/event` or
//! `/global/event` sends them) through one mapper, and the SSE framing they arrive in. Every
//! callback made must be one the callback API accepts: a valid `webhook-id`, a JSON object
//! body, and a path that reaches the API as it was signed.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nubabel_bridge::mapping::{IdOrigin, Mapper, MapperSettings};
use nubabel_contract::signing::validate_webhook_id;
use nubabel_opencode::{EventEnvelope, events::SseDecoder};

fuzz_target!(|data: &[u8]| {
    let split = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
    let mut decoder = SseDecoder::default();
    let _ = decoder.push(&data[..split]);
    let _ = decoder.push(&data[split..]);

    let mut mapper = Mapper::new(
        MapperSettings {
            text_interval: Duration::from_millis(500),
            pod_name: Some("fleet-0".into()),
            pod_ip: Some("10.0.0.7".into()),
        },
        IdOrigin {
            boot_millis: 1_800_000_000_000,
            nonce: 0x5eed,
        },
    );
    let start = Instant::now();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for (n, line) in text.lines().enumerate() {
        let Some(envelope) =
            EventEnvelope::parse_global(line).or_else(|| EventEnvelope::parse(line))
        else {
            continue;
        };
        let now = start + Duration::from_millis(300 * u64::try_from(n).unwrap_or(0));
        for callback in mapper.handle(&envelope, now) {
            assert!(
                validate_webhook_id(&callback.webhook_id).is_ok(),
                "{}",
                callback.webhook_id
            );
            let body: serde_json::Value =
                serde_json::from_slice(&callback.body).unwrap_or(serde_json::Value::Null);
            assert!(body.is_object(), "{body}");
            // The path the bridge signs is the path the API receives: nothing in a session id
            // may add a segment, a query or a fragment, or be rewritten on the way.
            let path = callback.path();
            // No URL names a segment `.` or `..` (parsers drop or fold it): such a callback
            // is answered 404 and dropped, as the API has no route for it.
            if matches!(callback.session_id.as_str(), "." | "..") {
                continue;
            }
            let url = url::Url::parse(&format!("http://callback-api{path}"));
            let sent = url
                .as_ref()
                .map(|url| (url.path(), url.query(), url.fragment()));
            assert_eq!(
                sent,
                Ok((path.as_str(), None, None)),
                "{:?}",
                callback.session_id
            );
            assert_eq!(path.split('/').count(), 6, "{path}");
        }
    }
});
