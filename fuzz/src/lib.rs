//! What the fuzz targets share: cutting one input into the fields of a request.

/// The clock every target verifies against (Unix seconds), so inputs replay the same way.
pub const NOW: i64 = 1_800_000_000;

/// Splits `data` at its first `count - 1` newlines into `count` fields (missing ones are
/// `None`; the last field keeps any further newlines, as a body would).
pub fn fields(data: &[u8], count: usize) -> Vec<Option<&[u8]>> {
    let mut parts = data.splitn(count, |byte| *byte == b'\n');
    (0..count).map(|_| parts.next()).collect()
}

/// A field as text, when it is UTF-8.
pub fn text(field: Option<&[u8]>) -> Option<&str> {
    field.and_then(|bytes| std::str::from_utf8(bytes).ok())
}
