//! Pure rewrites of container values: `$(VAR)` expansion, pod-local addresses and mount paths.

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// Kubernetes `$(VAR)` expansion against the variables defined so far; `$$` escapes.
pub(super) fn expand(value: &str, defined: &[(String, String)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(stripped) = tail.strip_prefix("$$") {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = tail.strip_prefix("$(")
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = defined.iter().rev().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Rewrites pod-local addresses to the pod IP and mount paths to host directories.
pub(super) fn rewrite_value(value: &str, ip: Ipv4Addr, mounts: &[(String, PathBuf)]) -> String {
    let ip = ip.to_string();
    let out = value
        .replace("0.0.0.0", &ip)
        .replace("127.0.0.1", &ip)
        .replace("localhost", &ip);
    replace_path_prefixes(&out, mounts)
}

/// Replaces each mount path (`mounts` is sorted longest first) with its host directory where
/// it starts a path (at the start of the value or after `=`, `:`, whitespace or a quote) and
/// is followed by `/`, the end, or a non-path character. One pass: a host directory that was
/// put in is never rewritten again (a run directory under `/tmp` next to a `/tmp` mount).
fn replace_path_prefixes(value: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut i = 0;
    let bytes = value.as_bytes();
    'scan: while i < value.len() {
        let starts_path =
            i == 0 || matches!(bytes[i - 1], b'=' | b':' | b' ' | b'"' | b'\'' | b',');
        if starts_path {
            for (prefix, dir) in mounts {
                if !value[i..].starts_with(prefix.as_str()) {
                    continue;
                }
                let after = value[i + prefix.len()..].chars().next();
                if after.is_none_or(|c| {
                    c == '/' || !(c.is_alphanumeric() || c == '-' || c == '_' || c == '.')
                }) {
                    out.push_str(&dir.to_string_lossy());
                    i += prefix.len();
                    continue 'scan;
                }
            }
        }
        let ch = value[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_shim::HOST_IP;

    #[test]
    fn mount_paths_are_rewritten_once() {
        let ip = Ipv4Addr::new(127, 20, 1, 5);
        let mounts = vec![
            (
                "/data".to_owned(),
                PathBuf::from("/tmp/run/pod/volumes/data"),
            ),
            ("/tmp".to_owned(), PathBuf::from("/tmp/run/pod/volumes/tmp")),
        ];
        assert_eq!(
            rewrite_value("/data/home", ip, &mounts),
            "/tmp/run/pod/volumes/data/home"
        );
        // An emptyDir at /tmp is a directory of its own; TMPDIR changes only where the
        // container sets it.
        assert_eq!(
            rewrite_value("/tmp", ip, &mounts),
            "/tmp/run/pod/volumes/tmp"
        );
        assert_eq!(
            rewrite_value("/tmp/x:/data", ip, &mounts),
            "/tmp/run/pod/volumes/tmp/x:/tmp/run/pod/volumes/data"
        );
    }

    #[test]
    fn variables_expand_like_kubernetes() {
        let defined = vec![("A".to_owned(), "x".to_owned())];
        assert_eq!(expand("$(A)-$(B)-$$(A)", &defined), "x-$(B)-$(A)");
    }

    #[test]
    fn pod_local_addresses_and_mount_paths_are_rewritten() {
        let ip = Ipv4Addr::new(127, 20, 1, 5);
        let mounts = vec![("/data".to_owned(), PathBuf::from("/tmp/run/v/data"))];
        assert_eq!(
            rewrite_value("--hostname 0.0.0.0", ip, &mounts),
            "--hostname 127.20.1.5"
        );
        assert_eq!(
            rewrite_value("http://127.0.0.1:4096", ip, &mounts),
            "http://127.20.1.5:4096"
        );
        assert_eq!(
            rewrite_value("/data/home", ip, &mounts),
            "/tmp/run/v/data/home"
        );
        assert_eq!(rewrite_value("/database", ip, &mounts), "/database");
        assert_eq!(
            rewrite_value(&format!("http://{HOST_IP}:8080"), ip, &mounts),
            format!("http://{HOST_IP}:8080")
        );
    }
}
