//! Turning kernel bytes into record text.

/// Renders bytes as text. Valid UTF-8 passes through; invalid bytes and control characters
/// become `\xNN`, so a file name cannot forge line breaks or terminal escapes in any output.
pub fn escape_bytes(bytes: &[u8]) -> String {
    // Most names are printable ASCII, which passes as it is.
    if bytes.iter().all(|b| (0x20..0x7f).contains(b))
        && let Ok(text) = std::str::from_utf8(bytes)
    {
        return text.to_owned();
    }
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Joins `rel` to the absolute `base` (unless `rel` is absolute) and removes `.`, `..` and
/// repeated slashes lexically. `..` at the root stays at the root, as in the kernel.
pub fn normalize(base: &[u8], rel: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    let sources: [&[u8]; 2] = if rel.first() == Some(&b'/') {
        [b"", rel]
    } else {
        [base, rel]
    };
    for src in sources {
        for part in src.split(|b| *b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => {
                    parts.pop();
                }
                p => parts.push(p),
            }
        }
    }
    if parts.is_empty() {
        return b"/".to_vec();
    }
    let mut out = Vec::new();
    for p in parts {
        out.push(b'/');
        out.extend_from_slice(p);
    }
    out
}

/// True when `path` is `dir` or lies below it (component-wise).
pub fn is_under(path: &[u8], dir: &[u8]) -> bool {
    if dir == b"/" {
        return path.first() == Some(&b'/');
    }
    path.starts_with(dir) && matches!(path.get(dir.len()), None | Some(b'/'))
}

/// Symbolic name of an errno value ("ENOENT").
pub fn errno_name(errno: i64) -> String {
    let name = match errno {
        1 => "EPERM",
        2 => "ENOENT",
        3 => "ESRCH",
        4 => "EINTR",
        5 => "EIO",
        6 => "ENXIO",
        7 => "E2BIG",
        9 => "EBADF",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        14 => "EFAULT",
        16 => "EBUSY",
        17 => "EEXIST",
        18 => "EXDEV",
        19 => "ENODEV",
        20 => "ENOTDIR",
        21 => "EISDIR",
        22 => "EINVAL",
        23 => "ENFILE",
        24 => "EMFILE",
        26 => "ETXTBSY",
        27 => "EFBIG",
        28 => "ENOSPC",
        30 => "EROFS",
        31 => "EMLINK",
        36 => "ENAMETOOLONG",
        40 => "ELOOP",
        75 => "EOVERFLOW",
        88 => "ENOTSOCK",
        91 => "EPROTOTYPE",
        93 => "EPROTONOSUPPORT",
        95 => "EOPNOTSUPP",
        97 => "EAFNOSUPPORT",
        98 => "EADDRINUSE",
        99 => "EADDRNOTAVAIL",
        100 => "ENETDOWN",
        101 => "ENETUNREACH",
        103 => "ECONNABORTED",
        104 => "ECONNRESET",
        106 => "EISCONN",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        113 => "EHOSTUNREACH",
        114 => "EALREADY",
        115 => "EINPROGRESS",
        122 => "EDQUOT",
        _ => return format!("E{errno}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_invalid_and_control_bytes() {
        assert_eq!(escape_bytes(b"plain/path"), "plain/path");
        assert_eq!(escape_bytes("résumé".as_bytes()), "résumé");
        assert_eq!(escape_bytes(b"a\nb"), "a\\x0ab");
        assert_eq!(escape_bytes(b"\xff\xfeok"), "\\xff\\xfeok");
        assert_eq!(escape_bytes(b"\x1b[31m"), "\\x1b[31m");
        // The edges of printable ASCII, which takes the fast path.
        assert_eq!(escape_bytes(b" ~a\x7f\x1f"), " ~a\\x7f\\x1f");
        assert_eq!(escape_bytes(b" ~ "), " ~ ");
    }

    #[test]
    fn normalizes_lexically() {
        assert_eq!(normalize(b"/data/phi", b"x.txt"), b"/data/phi/x.txt");
        assert_eq!(normalize(b"/tmp", b"../data/phi/x"), b"/data/phi/x");
        assert_eq!(normalize(b"/tmp", b"/abs//./p/../q"), b"/abs/q");
        assert_eq!(normalize(b"/", b"../../.."), b"/");
        assert_eq!(normalize(b"/a", b""), b"/a");
    }

    #[test]
    fn under_checks_component_boundaries() {
        assert!(is_under(b"/data/phi/x", b"/data/phi"));
        assert!(is_under(b"/data/phi", b"/data/phi"));
        assert!(!is_under(b"/data/phix", b"/data/phi"));
        assert!(is_under(b"/anything", b"/"));
    }

    #[test]
    fn names_errnos() {
        assert_eq!(errno_name(2), "ENOENT");
        assert_eq!(errno_name(13), "EACCES");
        assert_eq!(errno_name(115), "EINPROGRESS");
        assert_eq!(errno_name(4000), "E4000");
    }
}
