//! The one spelling of a request's method, path and host that routes are matched
//! against, or a refusal. Nothing is resolved: a spelling two parsers could read two
//! ways (the proxy deciding, the app routing) is refused, whatever route it would match.
//!
//! A path is the part before the first `?` or `#` (a query that looks like a path is
//! only a query). Refused: a path not starting with `/`; an empty segment (`//`, a
//! trailing `/`; the root `/` alone is fine); a `.` or `..` segment; a `\` or a `;`
//! (raw or encoded); an encoded `/` or `.`; an encoded letter, digit, `-`, `_` or `~`
//! (an app may or may not decode it before routing); a NUL or control character (raw or
//! encoded); any raw character a URI path cannot hold (space, `"`, `<`, non-ASCII…); a
//! malformed escape, or escapes that do not decode to UTF-8; a path longer than
//! [`MAX_PATH`]. What is left is decoded once, so `caf%C3%A9` is the segment `café`.
//!
//! A host is ASCII-lower-cased (names are case-insensitive) without a `:port`; refused
//! when empty, when it has an empty label (a trailing dot included), or anything but
//! letters, digits, `-` and `.` (or a bracketed IPv6 literal). A method is an upper-case
//! token (`get` is refused: methods are case-sensitive, and servers disagree).

/// Longest path (before the query) decided; a longer one is refused.
pub const MAX_PATH: usize = 4096;
/// Longest method decided.
const MAX_METHOD: usize = 32;

/// Why a request was refused (sent to the proxy as the reason header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub &'static str);

/// A canonical path: its decoded segments, joined by `/` without the leading one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(String);

impl Path {
    /// The segments in order; the root has none.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        (!self.0.is_empty()).then(|| self.0.split('/')).into_iter().flatten()
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}", self.0)
    }
}

/// The canonical form of `raw` (a path with an optional query and fragment).
pub fn path(raw: &str) -> Result<Path, Refused> {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let path = &raw[..end];
    if path.len() > MAX_PATH {
        return Err(Refused("path too long"));
    }
    let Some(body) = path.strip_prefix('/') else {
        return Err(Refused("path does not start with /"));
    };
    if body.is_empty() {
        return Ok(Path(String::new()));
    }
    let mut out = Vec::with_capacity(body.len());
    for (i, segment) in body.split('/').enumerate() {
        match segment {
            "" => return Err(Refused("empty path segment (// or a trailing /)")),
            "." | ".." => return Err(Refused("dot segment in the path")),
            _ => {}
        }
        if i > 0 {
            out.push(b'/');
        }
        decode_segment(segment.as_bytes(), &mut out)?;
    }
    String::from_utf8(out).map(Path).map_err(|_| Refused("path escapes are not UTF-8"))
}

fn decode_segment(raw: &[u8], out: &mut Vec<u8>) -> Result<(), Refused> {
    let mut i = 0;
    while i < raw.len() {
        let byte = raw[i];
        match byte {
            b'%' => {
                let value = raw
                    .get(i + 1..i + 3)
                    .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok())
                    .ok_or(Refused("malformed percent-escape in the path"))?;
                match value {
                    b'/' => return Err(Refused("encoded / in the path")),
                    b'\\' => return Err(Refused("encoded \\ in the path")),
                    b'.' => return Err(Refused("encoded . in the path")),
                    b';' => return Err(Refused("encoded ; in the path")),
                    0x00..=0x1f | 0x7f => return Err(Refused("encoded control character")),
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') => {
                        return Err(Refused("escape of a plain character in the path"));
                    }
                    b => out.push(b),
                }
                i += 3;
            }
            b'\\' => return Err(Refused("\\ in the path")),
            b';' => return Err(Refused("; in the path")),
            0x00..=0x1f | 0x7f => return Err(Refused("control character in the path")),
            b if plain(b) => {
                out.push(b);
                i += 1;
            }
            _ => return Err(Refused("character not allowed in a path")),
        }
    }
    Ok(())
}

/// RFC 3986 `pchar` less `%` (handled apart) and `;` (refused).
fn plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

/// `raw` (a `Host` or `:authority` value) lower-cased, without its port.
pub fn host(raw: &str) -> Result<String, Refused> {
    let name = match raw.rsplit_once(':') {
        Some((name, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!name.starts_with('[') || name.ends_with(']')) =>
        {
            name
        }
        _ => raw,
    };
    let ipv6 = name.len() > 2
        && name.starts_with('[')
        && name.ends_with(']')
        && name[1..name.len() - 1].bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    if ipv6 {
        return Ok(name.to_ascii_lowercase());
    }
    if name.is_empty() || name.split('.').any(str::is_empty) {
        return Err(Refused("empty label in the host"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
        return Err(Refused("not a host name"));
    }
    Ok(name.to_ascii_lowercase())
}

/// `raw` when it is an upper-case method token.
pub fn method(raw: &str) -> Result<&str, Refused> {
    let ok = (1..=MAX_METHOD).contains(&raw.len())
        && raw.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
    if ok { Ok(raw) } else { Err(Refused("method is not an upper-case token")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(raw: &str) -> Result<String, Refused> {
        path(raw).map(|p| p.to_string())
    }

    #[test]
    fn a_plain_path_is_itself_and_the_query_is_never_part_of_it() {
        for (raw, want) in [
            ("/tenants/acme/invoices", "/tenants/acme/invoices"),
            ("/", "/"),
            ("/ADMIN", "/ADMIN"),
            ("/public?/admin/users", "/public"),
            ("/public#/admin", "/public"),
            ("/public?x=/../admin", "/public"),
            ("/a%20b", "/a b"),
            ("/a%3fb", "/a?b"),
            ("/caf%C3%A9", "/café"),
            ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
            ("/v1.2/x", "/v1.2/x"),
            ("/...", "/..."),
        ] {
            assert_eq!(canonical(raw).as_deref(), Ok(want), "{raw}");
        }
        assert_eq!(path("/").expect("root").segments().count(), 0);
        let p = path("/a/b").expect("path");
        assert_eq!(p.segments().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn every_ambiguous_spelling_is_refused() {
        for raw in [
            "/tenants/bbb/../aaa/invoices/1",
            "/tenants/bbb/./invoices",
            "/..",
            "/%2e%2e/admin",
            "/public/%2E%2E/admin",
            "/public/.%2e/admin",
            "/a%2eb",
            "//admin",
            "/admin//users",
            "/admin/",
            "/admin\\users",
            "/admin%5Cusers",
            "/admin%5cusers",
            "/admin%2Fusers",
            "/admin%2fusers",
            "/admin;jsessionid=x",
            "/admin%3Bx",
            "/%61dmin/users",
            "/admin%7E",
            "/bad%zz",
            "/bad%2",
            "/bad%",
            "/ctl\u{1}",
            "/nul%00",
            "/del%7f",
            "/sp ace",
            "/caf\u{e9}",
            "/quote\"",
            "/bad%C3",
            "admin",
            "",
            "?/admin",
        ] {
            assert!(canonical(raw).is_err(), "{raw:?} is refused, got {:?}", canonical(raw));
        }
        let long = format!("/{}", "a".repeat(MAX_PATH));
        assert_eq!(canonical(&long), Err(Refused("path too long")));
    }

    #[test]
    fn hosts_are_lower_cased_without_port_and_never_resolved() {
        assert_eq!(host("Acme.Shop.Example:8443").as_deref(), Ok("acme.shop.example"));
        assert_eq!(host("127.0.0.1:80").as_deref(), Ok("127.0.0.1"));
        assert_eq!(host("[::1]:8080").as_deref(), Ok("[::1]"));
        for bad in ["acme.shop.example.", "acme..example", "", ":80", "acme/../x", "a_b.example"] {
            assert!(host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn methods_are_upper_case_tokens() {
        assert_eq!(method("GET"), Ok("GET"));
        for bad in ["get", "", "G ET", "GET\r", &"A".repeat(33)] {
            assert!(method(bad).is_err(), "{bad:?}");
        }
    }
}
