//! Where forward-auth reads the original request: from exactly the headers of the proxy
//! the policy names (`[proxy] kind`), one extractor per kind, never another family. A
//! header that is missing, sent twice, or not visible ASCII is a refusal: the proxy's
//! config sets each one (overwriting any the client sent), so anything else means the
//! proxy is not the one the policy describes.
//!
//! | kind | method | URI | host |
//! | --- | --- | --- | --- |
//! | `nginx` | `X-Original-Method` | `X-Original-URI` | `X-Original-Host` |
//! | `ingress-nginx` | `X-Original-Method` | `X-Original-URL` (`scheme://host/path`) | from the URL |
//! | `traefik`, `caddy` | `X-Forwarded-Method` | `X-Forwarded-Uri` | `X-Forwarded-Host` |
//! | explicit | `method_header` | `uri_header` | `host_header` |

use http::HeaderMap;

use super::canonical::Refused;

/// The proxy in front, as the policy names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proxy {
    /// nginx `auth_request`, with the `proxy_set_header` lines of docs/proxies.md.
    Nginx,
    /// ingress-nginx `auth-url`.
    IngressNginx,
    /// Traefik `ForwardAuth`.
    Traefik,
    /// Caddy `forward_auth`.
    Caddy,
    /// Header names the operator spells out (lower-case).
    Explicit {
        /// The original method.
        method: String,
        /// The original path and query.
        uri: String,
        /// The original host.
        host: String,
    },
}

/// The original request, as the proxy's headers give it (not yet canonical).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Original<'h> {
    /// The method.
    pub method: &'h str,
    /// The path with any query.
    pub target: &'h str,
    /// The host, possibly with a port.
    pub host: &'h str,
}

impl Proxy {
    /// The kind named `kind` in a policy.
    pub fn kind(kind: &str) -> Option<Self> {
        Some(match kind {
            "nginx" => Self::Nginx,
            "ingress-nginx" => Self::IngressNginx,
            "traefik" => Self::Traefik,
            "caddy" => Self::Caddy,
            _ => return None,
        })
    }

    /// Reads the original request from `headers`.
    pub fn extract<'h>(&self, headers: &'h HeaderMap) -> Result<Original<'h>, Refused> {
        match self {
            Self::Nginx => nginx(headers),
            Self::IngressNginx => ingress_nginx(headers),
            Self::Traefik | Self::Caddy => forwarded(headers),
            Self::Explicit { method, uri, host } => Ok(Original {
                method: one(headers, method, "missing original method header")?,
                target: one(headers, uri, "missing original URI header")?,
                host: one(headers, host, "missing original host header")?,
            }),
        }
    }
}

/// nginx: the three `X-Original-*` headers docs/proxies.md's config sets.
fn nginx(headers: &HeaderMap) -> Result<Original<'_>, Refused> {
    Ok(Original {
        method: one(headers, "x-original-method", "missing X-Original-Method")?,
        target: one(headers, "x-original-uri", "missing X-Original-URI")?,
        host: one(headers, "x-original-host", "missing X-Original-Host")?,
    })
}

/// ingress-nginx: `X-Original-URL` is `$scheme://$http_host$request_uri`.
fn ingress_nginx(headers: &HeaderMap) -> Result<Original<'_>, Refused> {
    let method = one(headers, "x-original-method", "missing X-Original-Method")?;
    let url = one(headers, "x-original-url", "missing X-Original-URL")?;
    let rest = ["http://", "https://"]
        .into_iter()
        .find_map(|scheme| {
            url.get(..scheme.len())
                .filter(|s| s.eq_ignore_ascii_case(scheme))
                .map(|_| &url[scheme.len()..])
        })
        .ok_or(Refused("X-Original-URL is not an http(s) URL"))?;
    let at = rest.find('/').ok_or(Refused("X-Original-URL has no path"))?;
    let (host, target) = rest.split_at(at);
    if host.contains(['@', '?', '#']) {
        return Err(Refused("X-Original-URL authority is not a host"));
    }
    Ok(Original { method, target, host })
}

/// Traefik and Caddy: the `X-Forwarded-*` headers each sets on the auth request.
fn forwarded(headers: &HeaderMap) -> Result<Original<'_>, Refused> {
    Ok(Original {
        method: one(headers, "x-forwarded-method", "missing X-Forwarded-Method")?,
        target: one(headers, "x-forwarded-uri", "missing X-Forwarded-Uri")?,
        host: one(headers, "x-forwarded-host", "missing X-Forwarded-Host")?,
    })
}

/// The one value of header `name`; missing (`why`), repeated or not visible ASCII is
/// refused.
fn one<'h>(headers: &'h HeaderMap, name: &str, why: &'static str) -> Result<&'h str, Refused> {
    let mut values = headers.get_all(name).iter();
    let value = values.next().ok_or(Refused(why))?;
    if values.next().is_some() {
        return Err(Refused("original-request header sent more than once"));
    }
    value.to_str().map_err(|_| Refused("original-request header is not visible ASCII"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                http::HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    const EVERY_FAMILY: &[(&str, &str)] = &[
        ("x-original-method", "GET"),
        ("x-original-uri", "/nginx"),
        ("x-original-host", "nginx.example"),
        ("x-original-url", "https://ingress.example/ingress?q"),
        ("x-forwarded-method", "POST"),
        ("x-forwarded-uri", "/forwarded"),
        ("x-forwarded-host", "forwarded.example"),
        ("x-real-method", "PUT"),
        ("x-uri", "/explicit"),
        ("x-host", "explicit.example"),
    ];

    #[test]
    fn each_kind_reads_only_its_own_headers() {
        let all = headers(EVERY_FAMILY);
        let original = |method, target, host| Original { method, target, host };
        assert_eq!(Proxy::Nginx.extract(&all), Ok(original("GET", "/nginx", "nginx.example")));
        assert_eq!(
            Proxy::IngressNginx.extract(&all),
            Ok(original("GET", "/ingress?q", "ingress.example"))
        );
        for kind in [Proxy::Traefik, Proxy::Caddy] {
            assert_eq!(kind.extract(&all), Ok(original("POST", "/forwarded", "forwarded.example")));
        }
        let explicit = Proxy::Explicit {
            method: "x-real-method".into(),
            uri: "x-uri".into(),
            host: "x-host".into(),
        };
        assert_eq!(explicit.extract(&all), Ok(original("PUT", "/explicit", "explicit.example")));
    }

    #[test]
    fn a_missing_or_repeated_header_is_refused() {
        // Another family's headers never stand in for the named one's.
        let forwarded_only = headers(&EVERY_FAMILY[4..7]);
        assert_eq!(
            Proxy::Nginx.extract(&forwarded_only),
            Err(Refused("missing X-Original-Method"))
        );
        assert_eq!(
            Proxy::IngressNginx.extract(&forwarded_only),
            Err(Refused("missing X-Original-Method"))
        );
        let nginx_only = headers(&EVERY_FAMILY[..3]);
        assert_eq!(Proxy::Traefik.extract(&nginx_only), Err(Refused("missing X-Forwarded-Method")));
        let twice = headers(&[
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/public"),
            ("x-forwarded-uri", "/admin"),
            ("x-forwarded-host", "h"),
        ]);
        assert_eq!(
            Proxy::Caddy.extract(&twice),
            Err(Refused("original-request header sent more than once"))
        );
        for url in ["ftp://h/x", "https://h", "https://u@h/x", "/x"] {
            let h = headers(&[("x-original-method", "GET"), ("x-original-url", url)]);
            assert!(Proxy::IngressNginx.extract(&h).is_err(), "{url}");
        }
    }
}
