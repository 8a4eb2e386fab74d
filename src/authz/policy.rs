//! The policy file (`--authz-policy`): the proxy in front, where the user id comes from,
//! and which role each route needs in which tenant. Parsed and checked whole, or refused
//! with the line and the reason; see `../shared/CONTRACT.md` ("Proxy authorization").

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{
    proxies::Proxy,
    routes::{RouteSpec, Routes},
};
use crate::{
    domain::Role,
    error::{Error, Result},
};

/// A policy, checked and ready to match requests.
#[derive(Debug)]
pub struct Policy {
    /// The proxy forward-auth requests come from; `None`: forward-auth refuses them all
    /// (an Envoy-only policy).
    pub proxy: Option<Proxy>,
    /// Where the user id comes from.
    pub identity: Identity,
    /// The routes, compiled.
    pub routes: Routes,
    /// Each route's line in the file.
    lines: Vec<usize>,
}

/// Where the user id comes from.
#[derive(Debug, Default)]
pub struct Identity {
    /// A header a proxy in front has set after authenticating the user (lower-cased).
    pub header: Option<String>,
    /// A bearer JWT in `authorization`.
    pub jwt: Option<JwtIdentity>,
}

/// How a bearer JWT is verified, and which claim names the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtIdentity {
    /// Where the keys come from.
    pub keys: JwksSource,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// The claim holding the user id (`sub` by default).
    pub user_claim: String,
}

/// Where a JWT's verification keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// rolecheck's own signing keys.
    Own,
    /// A JWK Set fetched from this URL: `https`, or `http` to loopback or when the
    /// policy says `allow_http = true`.
    Url(http::Uri),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    proxy: Option<Spanned<ProxyFile>>,
    #[serde(default)]
    identity: Option<IdentityFile>,
    #[serde(default)]
    route: Vec<Spanned<RouteFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyFile {
    kind: Option<String>,
    #[serde(default)]
    case_insensitive: bool,
    method_header: Option<String>,
    uri_header: Option<String>,
    host_header: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    header: Option<Spanned<String>>,
    jwt: Option<Spanned<JwtFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtFile {
    jwks_url: Spanned<String>,
    issuer: Option<String>,
    audience: Option<String>,
    user_claim: Option<String>,
    #[serde(default)]
    allow_http: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    path: String,
    host: Option<String>,
    methods: Option<Vec<String>>,
    roles: Option<Vec<String>>,
    permissions: Option<Vec<String>>,
    public: Option<bool>,
}

impl Policy {
    /// Reads and checks the policy at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            Error::FailedPrecondition(format!(
                "cannot read the policy {} (--authz-policy): {err}",
                path.display()
            ))
        })?;
        Self::parse(&text).map_err(|err| match err {
            Error::FailedPrecondition(reason) => {
                Error::FailedPrecondition(format!("policy {}: {reason}", path.display()))
            }
            other => other,
        })
    }

    /// Parses and checks a policy; an error names the line and the reason.
    pub fn parse(text: &str) -> Result<Self> {
        let file: PolicyFile = toml::from_str(text).map_err(|err| {
            let line = err.span().map_or(0, |span| line_of(text, span.start));
            let reason = err.message().to_owned();
            Error::FailedPrecondition(format!("line {line}: {reason}"))
        })?;
        let at = |start: usize, reason: String| {
            Error::FailedPrecondition(format!("line {}: {reason}", line_of(text, start)))
        };
        let (proxy, case_insensitive) = match file.proxy {
            None => (None, false),
            Some(proxy) => {
                let start = proxy.span().start;
                let proxy = proxy.into_inner();
                let case_insensitive = proxy.case_insensitive;
                (Some(proxy_source(proxy).map_err(|reason| at(start, reason))?), case_insensitive)
            }
        };
        let identity = match file.identity {
            None => Identity::default(),
            Some(identity) => Identity {
                header: match identity.header {
                    Some(header) if !header_name(header.get_ref()) => {
                        return Err(at(
                            header.span().start,
                            "`header` is not a header name".into(),
                        ));
                    }
                    Some(header) => Some(header.into_inner().to_ascii_lowercase()),
                    None => None,
                },
                jwt: identity
                    .jwt
                    .map(|jwt| {
                        let start = jwt.span().start;
                        let jwt = jwt.into_inner();
                        let keys = jwks_source(jwt.jwks_url.get_ref(), jwt.allow_http)
                            .map_err(|reason| at(jwt.jwks_url.span().start.max(start), reason))?;
                        Ok::<_, Error>(JwtIdentity {
                            keys,
                            issuer: jwt.issuer,
                            audience: jwt.audience,
                            user_claim: jwt.user_claim.unwrap_or_else(|| "sub".into()),
                        })
                    })
                    .transpose()?,
            },
        };
        let mut starts = Vec::with_capacity(file.route.len());
        let mut specs = Vec::with_capacity(file.route.len());
        for route in file.route {
            let start = route.span().start;
            let spec = spec(route.into_inner()).map_err(|reason| at(start, reason))?;
            if !spec.public && identity.header.is_none() && identity.jwt.is_none() {
                return Err(at(
                    start,
                    "a route needs roles or permissions but [identity] names no source".into(),
                ));
            }
            starts.push(start);
            specs.push(spec);
        }
        let routes = Routes::compile(specs, case_insensitive)
            .map_err(|(i, reason)| at(starts[i], reason))?;
        let lines = starts.iter().map(|&start| line_of(text, start)).collect();
        Ok(Self { proxy, identity, routes, lines })
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// What is valid but surely not meant: no route at all (every request is denied),
    /// and routes an earlier one shadows (they can never match).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.routes.is_empty() {
            out.push("the policy has no [[route]]: every request is denied".to_owned());
        }
        if self.proxy.is_none() {
            out.push(
                "the policy names no [proxy]: forward-auth at /authz refuses every request \
                 (ext_authz is unaffected)"
                    .to_owned(),
            );
        }
        for (shadowed, by) in self.routes.shadowed() {
            out.push(format!(
                "line {}: this route can never match: the route at line {} matches every \
                 request it would",
                self.lines[shadowed], self.lines[by]
            ));
        }
        out
    }

    /// Logs [`Policy::warnings`].
    pub fn warn_about(&self, path: &Path) {
        for warning in self.warnings() {
            tracing::warn!(path = %path.display(), "{warning}");
        }
    }

    /// Whether the policy has no route (every request is denied).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

fn header_name(name: &str) -> bool {
    http::HeaderName::try_from(name).is_ok()
}

fn proxy_source(file: ProxyFile) -> std::result::Result<Proxy, String> {
    let explicit = [&file.method_header, &file.uri_header, &file.host_header];
    match (&file.kind, explicit) {
        (Some(kind), [None, None, None]) => Proxy::kind(kind).ok_or_else(|| {
            format!("[proxy] kind {kind:?} is not nginx, ingress-nginx, traefik or caddy")
        }),
        (None, [Some(method), Some(uri), Some(host)]) => {
            if let Some(bad) = [method, uri, host].into_iter().find(|name| !header_name(name)) {
                return Err(format!("[proxy] {bad:?} is not a header name"));
            }
            let names = [method, uri, host].map(|name| name.to_ascii_lowercase());
            if names[0] == names[1] || names[1] == names[2] || names[0] == names[2] {
                return Err("[proxy] names one header for two parts of the request".into());
            }
            let [method, uri, host] = names;
            Ok(Proxy::Explicit { method, uri, host })
        }
        _ => Err("[proxy] needs `kind`, or all of `method_header`, `uri_header` and \
                  `host_header` (not both)"
            .into()),
    }
}

fn jwks_source(url: &str, allow_http: bool) -> std::result::Result<JwksSource, String> {
    if url == "self" {
        return Ok(JwksSource::Own);
    }
    let uri: http::Uri =
        url.parse().map_err(|_| format!("`jwks_url` {url:?} is not \"self\" or a URL"))?;
    let host = uri.host().filter(|host| !host.is_empty());
    match (uri.scheme_str(), host) {
        (Some("https"), Some(_)) => Ok(JwksSource::Url(uri)),
        (Some("http"), Some(host)) if allow_http || loopback(host) => Ok(JwksSource::Url(uri)),
        (Some("http"), Some(_)) => Err(format!(
            "`jwks_url` {url:?}: keys fetched over plain http can be swapped on the way; \
             use https, a loopback address, or say `allow_http = true`"
        )),
        _ => Err(format!("`jwks_url` {url:?} is not \"self\" or an http(s) URL")),
    }
}

/// Whether `host` (from a URL) is a loopback address or `localhost`.
fn loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn spec(file: RouteFile) -> std::result::Result<RouteSpec, String> {
    let names = |field: &str, names: Option<Vec<String>>| {
        names
            .unwrap_or_default()
            .iter()
            .map(|name| Role::parse(field, name).map_err(|err| format!("{field} {name:?}: {err}")))
            .collect::<std::result::Result<Vec<_>, _>>()
    };
    Ok(RouteSpec {
        path: file.path,
        host: file.host,
        methods: file.methods.unwrap_or_default().iter().map(|m| m.to_ascii_uppercase()).collect(),
        roles: names("role", file.roles)?,
        permissions: names("permission", file.permissions)?,
        public: file.public.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{
        canonical,
        routes::{Matched, Target},
    };

    const SEED: &str = r#"
[proxy]
kind = "nginx"

[identity]
header = "X-User-Id"
[identity.jwt]
jwks_url = "self"
issuer = "rolecheck"

[[route]]
path = "/tenants/{tenant}/invoices/**"
methods = ["get", "HEAD"]
roles = ["billing", "admin"]

[[route]]
path = "/healthz"
public = true
"#;

    #[test]
    fn the_seed_policy_loads() {
        let policy = Policy::parse(SEED).expect("policy");
        assert_eq!(policy.proxy, Some(Proxy::Nginx));
        assert_eq!(policy.identity.header.as_deref(), Some("x-user-id"));
        assert_eq!(policy.len(), 2);
        let path = canonical::path("/tenants/acme/invoices/7").expect("path");
        let matched = policy.routes.decide(&Target { method: "GET", host: None, path: &path });
        assert!(matches!(matched, Some(Matched::Roles { tenant: Some("acme"), .. })));
        let explicit = Policy::parse(
            "[proxy]\nmethod_header = \"X-M\"\nuri_header = \"x-u\"\nhost_header = \"x-h\"\n",
        )
        .expect("explicit");
        assert_eq!(
            explicit.proxy,
            Some(Proxy::Explicit { method: "x-m".into(), uri: "x-u".into(), host: "x-h".into() })
        );
        assert_eq!(Policy::parse("").expect("empty").proxy, None);
    }

    fn refused(text: &str) -> String {
        match Policy::parse(text) {
            Err(Error::FailedPrecondition(reason)) => reason,
            other => panic!("refused, got {other:?}"),
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_line_and_the_reason() {
        let head = "[identity]\nheader = \"x-user-id\"\n";
        for (text, line, reason) in [
            (
                format!("{head}[[route]]\npath = \"/a\"\nrole = [\"x\"]\n"),
                5,
                "unknown field `role`",
            ),
            (format!("{head}colour = 1\n"), 3, "unknown field `colour`"),
            (format!("{head}\n[[route]]\npath = \"/a\"\n"), 4, "needs `roles`"),
            (
                format!("{head}[[route]]\npath = \"/t/{{tenant}}/{{tenant}}\"\nroles = [\"a\"]\n"),
                3,
                "more than once",
            ),
            (
                format!(
                    "{head}[[route]]\nhost = \"{{tenant}}.x\"\npath = \"/t/{{tenant}}\"\nroles = [\"a\"]\n"
                ),
                3,
                "more than once",
            ),
            (format!("{head}[[route]]\npath = \"/a\"\nroles = [\"\"]\n"), 3, "role \"\""),
            (
                format!("{head}[[route]]\npath = \"/a\"\nroles = [\"a\"]\npublic = true\n"),
                3,
                "either",
            ),
            (format!("{head}[[route]]\npath = \"/**/a\"\nroles = [\"a\"]\n"), 3, "only end"),
            (format!("{head}[[route]]\npath = \"/a/../b\"\nroles = [\"a\"]\n"), 3, "dot segment"),
            (format!("{head}[[route]]\npath = \"a\"\nroles = [\"a\"]\n"), 3, "start with /"),
            (format!("{head}[[route]]\npath = \"/a\"\nmethods = [\"G T\"]\npublic = true\n"), 3, "method"),
            (
                "[identity.jwt]\njwks_url = \"ftp://x\"\n".to_owned(),
                2,
                "not \"self\" or an http(s) URL",
            ),
            ("[identity.jwt]\njwks_url = \"::not a url\"\n".to_owned(), 2, "jwks_url"),
            ("[identity.jwt]\njwks_url = \"http://idp.example/jwks\"\n".to_owned(), 2, "plain http"),
            ("[[route]]\npath = \"/a\"\nroles = [\"a\"]\n".to_owned(), 1, "names no source"),
            ("[proxy]\nkind = \"apache\"\n".to_owned(), 1, "is not nginx"),
            ("[proxy]\ncase_insensitive = true\n".to_owned(), 1, "needs `kind`"),
            ("[proxy]\nkind = \"nginx\"\nuri_header = \"x-u\"\n".to_owned(), 1, "not both"),
            (
                "[proxy]\nmethod_header = \"x\"\nuri_header = \"x\"\nhost_header = \"h\"\n".to_owned(),
                1,
                "two parts",
            ),
            (
                "[proxy]\nkind = \"nginx\"\ncase_insensitive = true\n[[route]]\npath = \"/caf\u{e9}\"\npublic = true\n".to_owned(),
                4,
                "ASCII",
            ),
        ] {
            let reason_got = refused(&text);
            assert!(reason_got.starts_with(&format!("line {line}:")), "{text}\n=> {reason_got}");
            assert!(reason_got.contains(reason), "{text}\n=> {reason_got}");
        }
    }

    #[test]
    fn plain_http_keys_only_from_loopback_or_when_allowed() {
        for url in ["http://127.0.0.1:9/jwks", "http://localhost/jwks", "http://[::1]/jwks"] {
            let text = format!("[identity.jwt]\njwks_url = \"{url}\"\n");
            assert!(Policy::parse(&text).is_ok(), "{url}");
        }
        let allowed = "[identity.jwt]\njwks_url = \"http://idp.example/jwks\"\nallow_http = true\n";
        assert!(Policy::parse(allowed).is_ok());
    }
}
