//! How a request's path and host are spelled before any route sees them, so that no
//! spelling of a path reaches a route it should not.
//!
//! A path is cut at `?` or `#` (a query that looks like a path is only a query),
//! percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, other
//! escapes are kept with upper-case hex, and dot segments and empty segments (`//`, a
//! trailing `/`) are removed. Refused outright: an encoded `/` or `\` (`%2F`, `%5C`: an
//! application may decode it into a separator the route never saw), a raw `\`, control
//! characters, a malformed escape, a path not starting with `/`, and one longer than
//! [`MAX_PATH`]. A host is lower-cased, without its port or a trailing dot.

/// Longest path (before the query) decided; a longer one is refused.
pub const MAX_PATH: usize = 4096;

/// Why a path or host was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub &'static str);

/// The normalized segments of `raw` (a request target: a path with an optional query,
/// or an absolute URL whose path is taken), in order; the root is no segments.
pub fn segments(raw: &str) -> Result<Vec<String>, Refused> {
    let path = strip_origin(raw);
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path.len() > MAX_PATH {
        return Err(Refused("path too long"));
    }
    if !path.starts_with('/') {
        return Err(Refused("path must start with /"));
    }
    let decoded = decode(path)?;
    let mut out: Vec<String> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            other => out.push(other.to_owned()),
        }
    }
    Ok(out)
}

/// `raw` without `scheme://authority` when it is an absolute URL (`X-Original-URL`).
fn strip_origin(raw: &str) -> &str {
    for scheme in ["http://", "https://"] {
        if raw.get(..scheme.len()).is_some_and(|s| s.eq_ignore_ascii_case(scheme)) {
            let after = &raw[scheme.len()..];
            return after.find('/').map_or("/", |at| &after[at..]);
        }
    }
    raw
}

fn decode(path: &str) -> Result<String, Refused> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let value = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or(Refused("malformed percent-escape"))?;
                match value {
                    b'/' | b'\\' => return Err(Refused("encoded / or \\ in the path")),
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                        out.push(b as char)
                    }
                    b => out.push_str(&format!("%{b:02X}")),
                }
                i += 3;
            }
            b'\\' => return Err(Refused("\\ in the path")),
            b if b < 0x20 || b == 0x7f => return Err(Refused("control character in the path")),
            first => {
                // A whole character (the input is UTF-8).
                let width = utf8_width(first);
                out.push_str(&path[i..i + width]);
                i += width;
            }
        }
    }
    Ok(out)
}

fn utf8_width(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// `raw` (a `Host` or `:authority` value) lower-cased, without its port or a trailing
/// dot; refused when empty or when it holds anything but letters, digits, `-` and `.`.
pub fn host(raw: &str) -> Result<String, Refused> {
    let name = match raw.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => raw,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(Refused("not a host name"));
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(raw: &str) -> Result<String, Refused> {
        segments(raw).map(|s| format!("/{}", s.join("/")))
    }

    #[test]
    fn every_spelling_is_decided_as_its_normal_form_or_refused() {
        for (raw, want) in [
            ("/tenants/acme/invoices", "/tenants/acme/invoices"),
            ("/tenants/acme/invoices/", "/tenants/acme/invoices"),
            ("//tenants///acme//invoices", "/tenants/acme/invoices"),
            ("/public/../admin/users", "/admin/users"),
            ("/public/./../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/public/%2E%2E/admin", "/admin"),
            ("/%61dmin/users", "/admin/users"),
            ("/ADMIN", "/ADMIN"),
            ("/public?/admin/users", "/public"),
            ("/public#/admin", "/public"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("https://shop.example/admin/x?y", "/admin/x"),
            ("/", "/"),
        ] {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
        for raw in [
            "/admin%2Fusers",
            "/admin%2fusers",
            "/admin%5Cusers",
            "/admin\\users",
            "/bad%zz",
            "/bad%2",
            "/ctl\u{1}",
            "admin",
            "",
        ] {
            assert!(norm(raw).is_err(), "{raw:?} is refused");
        }
        let long = format!("/{}", "a".repeat(MAX_PATH));
        assert_eq!(norm(&long), Err(Refused("path too long")));
    }

    #[test]
    fn hosts_are_lower_cased_without_port() {
        assert_eq!(host("Acme.Shop.Example:8443").as_deref(), Ok("acme.shop.example"));
        assert_eq!(host("acme.shop.example.").as_deref(), Ok("acme.shop.example"));
        assert!(host("acme/../x").is_err());
        assert!(host("").is_err());
    }
}
