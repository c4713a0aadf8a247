//! `Last-Event-ID` of a stream request: any header value is a non-negative sequence number or
//! a 400, never a panic, and numbers round-trip.
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use nubabel_callback_api::routes::stream::last_event_id;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert("last-event-id", value);
    if let Ok(after) = last_event_id(&headers) {
        assert!(after >= 0);
        let trimmed = std::str::from_utf8(data).map(str::trim);
        assert_eq!(
            trimmed.ok().and_then(|t| t.parse::<i64>().ok()),
            Some(after)
        );
    }
});
