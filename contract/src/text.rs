//! Text cut to a size limit without splitting a character: the one rule behind every bounded
//! field (event notes, status output, progress summaries, log tails).

/// The longest start of `text` of at most `max_bytes` bytes, cut at a character boundary.
pub fn head(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The longest end of `text` of at most `max_bytes` bytes, cut at a character boundary.
pub fn tail(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut start = text.len() - max_bytes;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// `text` if it fits in `max_bytes`, otherwise its start followed by `marker`, together at most
/// `max_bytes` bytes.
pub fn cut_marked(text: &str, max_bytes: usize, marker: &str) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    format!(
        "{}{marker}",
        head(text, max_bytes.saturating_sub(marker.len()))
    )
}

/// `text` if it has at most `max_chars` characters, otherwise its first `max_chars - 1`
/// characters and `…`.
pub fn cut_chars(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => text.to_owned(),
        Some(_) => {
            let keep: String = text.chars().take(max_chars.saturating_sub(1)).collect();
            format!("{keep}…")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_never_split_a_character() {
        let text = "aé€😀";
        for max in 0..=text.len() {
            assert!(head(text, max).len() <= max);
            assert!(tail(text, max).len() <= max);
            assert!(text.starts_with(head(text, max)));
            assert!(text.ends_with(tail(text, max)));
        }
        assert_eq!(head(text, 2), "a");
        assert_eq!(tail(text, 5), "😀");
    }

    #[test]
    fn a_marked_cut_fits_its_limit_marker_included() {
        assert_eq!(cut_marked("short", 10, "..."), "short");
        let cut = cut_marked(&"é".repeat(600), 1024, "...");
        assert!(cut.len() <= 1024 && cut.ends_with("..."));
        assert_eq!(cut_chars("short", 10), "short");
        assert_eq!(cut_chars("abcdef", 4), "abc…");
    }
}
