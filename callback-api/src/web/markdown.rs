//! Agent answers as HTML: a small subset of Markdown (headings, paragraphs, lists, quotes,
//! fenced and inline code, bold, italics, links), rendered so that nothing in the answer
//! becomes markup of its own. Every character of the answer is escaped; the only tags in the
//! output are the fixed, balanced ones this renderer writes, and a link's target must be
//! `http:`, `https:` or `mailto:` (anything else stays text). Raw HTML in an answer shows as
//! text.

/// `text` with the five HTML-significant characters escaped, for element text and quoted
/// attribute values alike.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The HTML of Markdown `source`.
pub fn render(source: &str) -> String {
    let mut out = String::new();
    let mut paragraph: Vec<&str> = Vec::new();
    let mut list: Option<&'static str> = None;
    let mut lines = source.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            flush(&mut out, &mut paragraph, &mut list);
            let mut code = Vec::new();
            for inner in lines.by_ref() {
                if inner.trim_start().starts_with("```") {
                    break;
                }
                code.push(inner);
            }
            out.push_str("<pre><code>");
            out.push_str(&escape(&code.join("\n")));
            out.push_str("</code></pre>\n");
        } else if trimmed.is_empty() {
            flush(&mut out, &mut paragraph, &mut list);
        } else if let Some((level, text)) = heading(trimmed) {
            flush(&mut out, &mut paragraph, &mut list);
            // The page's own title is the h1.
            let tag = format!("h{}", (level + 1).min(6));
            out.push_str(&format!("<{tag}>{}</{tag}>\n", inline(text)));
        } else if let Some((kind, item)) = list_item(trimmed) {
            if !paragraph.is_empty() || list.is_some_and(|open| open != kind) {
                flush(&mut out, &mut paragraph, &mut list);
            }
            if list.is_none() {
                out.push_str(&format!("<{kind}>\n"));
                list = Some(kind);
            }
            out.push_str(&format!("<li>{}</li>\n", inline(item)));
        } else if let Some(quoted) = trimmed.strip_prefix('>') {
            flush(&mut out, &mut paragraph, &mut list);
            out.push_str(&format!(
                "<blockquote><p>{}</p></blockquote>\n",
                inline(quoted.trim_start())
            ));
        } else {
            if list.is_some() {
                flush(&mut out, &mut paragraph, &mut list);
            }
            paragraph.push(trimmed);
        }
    }
    flush(&mut out, &mut paragraph, &mut list);
    out
}

/// Closes the open paragraph or list.
fn flush(out: &mut String, paragraph: &mut Vec<&str>, list: &mut Option<&'static str>) {
    if !paragraph.is_empty() {
        out.push_str(&format!("<p>{}</p>\n", inline(&paragraph.join("\n"))));
        paragraph.clear();
    }
    if let Some(kind) = list.take() {
        out.push_str(&format!("</{kind}>\n"));
    }
}

fn heading(line: &str) -> Option<(usize, &str)> {
    let level = line.chars().take_while(|&c| c == '#').count();
    let rest = line.get(level..)?;
    ((1..=6).contains(&level) && rest.starts_with(' ')).then(|| (level, rest.trim()))
}

fn list_item(line: &str) -> Option<(&'static str, &str)> {
    if let Some(item) = line.strip_prefix("- ").or_else(|| line.strip_prefix("* ")) {
        return Some(("ul", item));
    }
    let digits = line.chars().take_while(char::is_ascii_digit).count();
    let rest = line.get(digits..)?;
    (digits > 0 && digits < 10)
        .then(|| rest.strip_prefix(". "))
        .flatten()
        .map(|item| ("ol", item))
}

/// Inline Markdown: code spans, links, `**bold**`, `*italics*`. Unclosed emphasis is closed
/// at the end, so the output is always balanced.
fn inline(text: &str) -> String {
    let mut out = String::new();
    let mut bold = false;
    let mut italic = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '`' {
            if let Some(end) = rest[1..].find('`') {
                out.push_str(&format!("<code>{}</code>", escape(&rest[1..=end])));
                rest = &rest[end + 2..];
                continue;
            }
        } else if c == '[' {
            if let Some((label, target, len)) = link(rest) {
                if is_safe_target(target) {
                    out.push_str(&format!(
                        "<a href=\"{}\" rel=\"nofollow noopener noreferrer\">{}</a>",
                        escape(target),
                        escape(label)
                    ));
                } else {
                    out.push_str(&escape(&rest[..len]));
                }
                rest = &rest[len..];
                continue;
            }
        } else if let Some(after) = rest.strip_prefix("**") {
            out.push_str(if bold { "</strong>" } else { "<strong>" });
            bold = !bold;
            rest = after;
            continue;
        } else if c == '*' {
            out.push_str(if italic { "</em>" } else { "<em>" });
            italic = !italic;
            rest = &rest[1..];
            continue;
        } else if c == '\n' {
            out.push_str("<br>\n");
            rest = &rest[1..];
            continue;
        }
        out.push_str(&escape(&rest[..c.len_utf8()]));
        rest = &rest[c.len_utf8()..];
    }
    if italic {
        out.push_str("</em>");
    }
    if bold {
        out.push_str("</strong>");
    }
    out
}

/// `[label](target)` at the start of `text`: the label, the target and the length taken.
fn link(text: &str) -> Option<(&str, &str, usize)> {
    let close = text.find("](")?;
    let label = &text[1..close];
    if label.contains('[') || label.contains('\n') {
        return None;
    }
    let target_start = close + 2;
    let target_len = text[target_start..].find(')')?;
    let target = &text[target_start..target_start + target_len];
    if target.contains(char::is_whitespace) {
        return None;
    }
    Some((label, target, target_start + target_len + 1))
}

fn is_safe_target(target: &str) -> bool {
    let lower = target.to_ascii_lowercase();
    ["https://", "http://", "mailto:"]
        .iter()
        .any(|scheme| lower.starts_with(scheme))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_and_script_in_an_answer_show_as_text() {
        let html = render("Hi <script>alert(1)</script>\n\n<img src=x onerror=alert(1)>");
        assert_eq!(
            html,
            "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt;</p>\n\
             <p>&lt;img src=x onerror=alert(1)&gt;</p>\n"
        );
        assert!(!render("`<b>` and ```\n<i>\n```").contains("<b>"));
    }

    #[test]
    fn links_keep_only_web_and_mail_targets() {
        assert_eq!(
            render("[docs](https://example.com/a?b=\"c\")"),
            "<p><a href=\"https://example.com/a?b=&quot;c&quot;\" \
             rel=\"nofollow noopener noreferrer\">docs</a></p>\n"
        );
        assert_eq!(
            render("[x](javascript:alert(1))"),
            "<p>[x](javascript:alert(1))</p>\n"
        );
        assert!(!render("[x](JavaScript:alert(1))").contains("href"));
        assert!(!render("[x](data:text/html,hi)").contains("href"));
    }

    #[test]
    fn common_markdown_becomes_the_matching_elements() {
        let html = render(
            "# Title\nSome **bold** and *italic* with `code`.\n\n- one\n- two\n\n1. first\n\n> quoted\n\n```\nfn main() {}\n```",
        );
        assert_eq!(
            html,
            "<h2>Title</h2>\n\
             <p>Some <strong>bold</strong> and <em>italic</em> with <code>code</code>.</p>\n\
             <ul>\n<li>one</li>\n<li>two</li>\n</ul>\n\
             <ol>\n<li>first</li>\n</ol>\n\
             <blockquote><p>quoted</p></blockquote>\n\
             <pre><code>fn main() {}</code></pre>\n"
        );
    }

    #[test]
    fn unclosed_emphasis_is_closed_so_the_markup_stays_balanced() {
        assert_eq!(
            render("**bold *it"),
            "<p><strong>bold <em>it</em></strong></p>\n"
        );
    }
}
