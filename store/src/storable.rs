//! Text Postgres can store.
//!
//! Postgres refuses the NUL character in `text` (`invalid byte sequence`) and in `jsonb`
//! strings (`unsupported Unicode escape sequence`), yet NUL is valid JSON and valid UTF-8: tool
//! output of `find -print0` or of `cat` on a binary file carries it. Refusing such an event
//! would lose it, and failing on it would wedge the sender's queue, so every text that comes
//! from outside is stored with each NUL replaced by U+FFFD, the Unicode replacement character.
//! The request's raw bytes (and so its fingerprint for duplicate detection) are unchanged.

use std::borrow::Cow;

use serde_json::Value;

/// What a NUL is stored as.
pub const NUL_REPLACEMENT: char = '\u{FFFD}';

/// `text` with every NUL replaced, borrowed when it has none.
pub fn text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Replaces every NUL in `value`'s strings and object keys, at any depth.
pub fn json(value: &mut Value) {
    match value {
        Value::String(string) => {
            if let Cow::Owned(replaced) = text(string) {
                *string = replaced;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(json),
        Value::Object(map) => {
            if map.keys().any(|key| key.contains('\0')) {
                *map = std::mem::take(map)
                    .into_iter()
                    .map(|(key, value)| (text(&key).into_owned(), value))
                    .collect();
            }
            map.values_mut().for_each(json);
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// `value` with every NUL replaced (a copy only when it had one).
pub fn json_owned(value: &Value) -> Value {
    let mut value = value.clone();
    json(&mut value);
    value
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nul_is_replaced_in_strings_and_keys_at_any_depth() {
        let mut value = json!({
            "out": "a\u{0}b",
            "k\u{0}": [1, "\u{0}", {"deep": ["x\u{0}\u{0}y"]}],
            "n": 3, "t": true, "z": null
        });
        json(&mut value);
        assert_eq!(
            value,
            json!({
                "out": "a\u{FFFD}b",
                "k\u{FFFD}": [1, "\u{FFFD}", {"deep": ["x\u{FFFD}\u{FFFD}y"]}],
                "n": 3, "t": true, "z": null
            })
        );
        assert!(!value.to_string().contains("\\u0000"));
    }

    #[test]
    fn text_without_nul_is_borrowed_unchanged() {
        assert!(matches!(text("plain"), Cow::Borrowed("plain")));
        assert_eq!(text("a\0"), "a\u{FFFD}");
    }
}
