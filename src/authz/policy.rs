//! The policy file (`--authz-policy`): where the user id comes from, and which role each
//! route needs in which tenant. Parsed and checked whole, or refused with the line and
//! the reason; see `../shared/CONTRACT.md` ("Proxy authorization") for the format.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::path::Refused;
use crate::{
    domain::{Role, TenantId},
    error::{Error, Result},
};

/// A policy, checked and ready to match requests.
#[derive(Debug)]
pub struct Policy {
    /// Where the user id comes from.
    pub identity: Identity,
    routes: Vec<Route>,
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
    /// A JWK Set fetched from this `http` or `https` URL.
    Url(http::Uri),
}

/// One route: the first that matches a request decides it.
#[derive(Debug)]
struct Route {
    host: Option<Vec<Part>>,
    path: Vec<Part>,
    /// Upper-case; empty means every method.
    methods: Vec<String>,
    /// Any one of these, in the route's tenant; empty when public.
    roles: Vec<Role>,
    public: bool,
}

/// One segment of a host or path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// `*`: any one segment.
    Any,
    /// `**`: any rest, even none (last in a path only).
    Rest,
    /// `{tenant}`: any one segment, which names the tenant.
    Tenant,
}

/// What a request asks to reach.
#[derive(Debug)]
pub struct Target<'a> {
    /// The method, as sent.
    pub method: &'a str,
    /// The normalized host, when known.
    pub host: Option<&'a str>,
    /// The normalized path segments.
    pub path: &'a [String],
}

/// The route a request matched.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched<'p> {
    /// Anyone may pass.
    Public,
    /// The user must hold one of `roles` in `tenant` (`None`: the application tenant).
    Roles {
        /// The tenant named by the request, unchecked.
        tenant: Option<String>,
        /// Any one of them.
        roles: &'p [Role],
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    identity: Option<IdentityFile>,
    #[serde(default)]
    route: Vec<Spanned<RouteFile>>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    path: String,
    host: Option<String>,
    methods: Option<Vec<String>>,
    roles: Option<Vec<String>>,
    public: Option<bool>,
}

impl Policy {
    /// Reads and checks the policy at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            Error::FailedPrecondition(format!("cannot read {}: {err}", path.display()))
        })?;
        Self::parse(&text).map_err(|err| match err {
            Error::FailedPrecondition(reason) => {
                Error::FailedPrecondition(format!("{}: {reason}", path.display()))
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
        let identity = match file.identity {
            None => Identity::default(),
            Some(identity) => Identity {
                header: match identity.header {
                    Some(header)
                        if http::HeaderName::try_from(header.get_ref().as_str()).is_err() =>
                    {
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
                        let keys = jwks_source(jwt.jwks_url.get_ref())
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
        let mut routes = Vec::with_capacity(file.route.len());
        for route in file.route {
            let start = route.span().start;
            let route = compile(route.into_inner()).map_err(|reason| at(start, reason))?;
            if !route.public && identity.header.is_none() && identity.jwt.is_none() {
                return Err(at(start, "a route needs roles but [identity] names no source".into()));
            }
            routes.push(route);
        }
        Ok(Self { identity, routes })
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the policy has no route (every request is denied).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The first route that matches `target`; `None` denies.
    pub fn decide<'p>(&'p self, target: &Target<'_>) -> Option<Matched<'p>> {
        self.routes.iter().find_map(|route| route.matches(target))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

fn jwks_source(url: &str) -> std::result::Result<JwksSource, String> {
    if url == "self" {
        return Ok(JwksSource::Own);
    }
    let uri: http::Uri =
        url.parse().map_err(|_| format!("`jwks_url` {url:?} is not \"self\" or a URL"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => Ok(JwksSource::Url(uri)),
        _ => Err(format!("`jwks_url` {url:?} is not \"self\" or an http(s) URL")),
    }
}

fn compile(file: RouteFile) -> std::result::Result<Route, String> {
    let path = pattern(&file.path, '/')?;
    if path.iter().rev().skip(1).any(|part| *part == Part::Rest) {
        return Err("`**` may only end a path".into());
    }
    let host = file
        .host
        .as_deref()
        .map(|host| {
            let parts = pattern(&host.to_ascii_lowercase(), '.')?;
            if parts.contains(&Part::Rest) {
                return Err("`**` is for paths, not hosts".to_owned());
            }
            Ok(parts)
        })
        .transpose()?;
    let tenants = path.iter().chain(host.iter().flatten()).filter(|p| **p == Part::Tenant).count();
    if tenants > 1 {
        return Err("`{tenant}` appears more than once".into());
    }
    let methods = file.methods.unwrap_or_default();
    if let Some(bad) =
        methods.iter().find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()))
    {
        return Err(format!("method {bad:?} is not a method name"));
    }
    let methods = methods.iter().map(|m| m.to_ascii_uppercase()).collect();
    let public = file.public.unwrap_or(false);
    let roles = file.roles.unwrap_or_default();
    match (public, roles.is_empty()) {
        (true, false) => return Err("a route is either `public = true` or has `roles`".into()),
        (false, true) => {
            return Err("a route needs `roles` (any one of them) or `public = true`".into());
        }
        _ => {}
    }
    let roles = roles
        .iter()
        .map(|role| Role::parse("roles", role).map_err(|err| format!("role {role:?}: {err}")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Route { host, path, methods, roles, public })
}

/// A host (split on `.`) or path (split on `/`, leading `/` required) pattern.
fn pattern(text: &str, separator: char) -> std::result::Result<Vec<Part>, String> {
    let body = if separator == '/' {
        text.strip_prefix('/').ok_or_else(|| format!("path {text:?} must start with /"))?
    } else {
        text
    };
    if separator == '/' {
        // A pattern is spelled as the requests it matches are: normalized.
        let normal =
            super::path::segments(text).map_err(|Refused(why)| format!("path {text:?}: {why}"))?;
        let raw: Vec<&str> = body.split('/').filter(|s| !s.is_empty()).collect();
        if normal.len() != raw.len() || normal.iter().zip(&raw).any(|(a, b)| a != b) {
            return Err(format!(
                "path {text:?} is not in normal form (no `.`, `..`, `//` or escapes of plain characters)"
            ));
        }
    }
    body.split(separator)
        .filter(|segment| !segment.is_empty())
        .map(|segment| match segment {
            "*" => Ok(Part::Any),
            "**" => Ok(Part::Rest),
            "{tenant}" => Ok(Part::Tenant),
            s if s.contains(['{', '}', '*']) => Err(format!("segment {s:?}: only `*`, `**` and `{{tenant}}` are special, and only as a whole segment")),
            s => Ok(Part::Literal(s.to_owned())),
        })
        .collect()
}

impl Route {
    fn matches<'p>(&'p self, target: &Target<'_>) -> Option<Matched<'p>> {
        if !self.methods.is_empty()
            && !self.methods.iter().any(|m| m.eq_ignore_ascii_case(target.method))
        {
            return None;
        }
        let mut tenant = None;
        if let Some(host) = &self.host {
            let name = target.host?;
            let labels: Vec<&str> = name.split('.').collect();
            tenant = match_parts(host, &labels)?.or(tenant);
        }
        let segments: Vec<&str> = target.path.iter().map(String::as_str).collect();
        tenant = match_parts(&self.path, &segments)?.or(tenant);
        Some(if self.public {
            Matched::Public
        } else {
            Matched::Roles { tenant: tenant.map(str::to_owned), roles: &self.roles }
        })
    }
}

/// Whether `parts` match `segments` whole: `Some` with the `{tenant}` segment if any.
fn match_parts<'s>(parts: &[Part], segments: &[&'s str]) -> Option<Option<&'s str>> {
    let mut tenant = None;
    for (i, part) in parts.iter().enumerate() {
        match part {
            Part::Rest => return Some(tenant),
            _ if i >= segments.len() => return None,
            Part::Literal(text) if text != segments[i] => return None,
            Part::Literal(_) | Part::Any => {}
            Part::Tenant => tenant = Some(segments[i]),
        }
    }
    (parts.len() == segments.len()).then_some(tenant)
}

/// Whether `tenant` (from a request) is a valid tenant id; else the request is denied.
pub fn tenant_id(tenant: &str) -> Option<TenantId> {
    TenantId::parse("tenant", tenant).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
[identity]
header = "X-User-Id"
[identity.jwt]
jwks_url = "self"
issuer = "rolecheck"

[[route]]
path = "/tenants/{tenant}/invoices/**"
methods = ["GET", "HEAD"]
roles = ["billing", "admin"]

[[route]]
host = "{tenant}.shop.example"
path = "/settings/**"
roles = ["admin"]

[[route]]
path = "/admin/**"
roles = ["support-agent"]

[[route]]
path = "/healthz"
public = true
"#;

    fn decide<'p>(
        policy: &'p Policy,
        method: &str,
        host: Option<&str>,
        path: &str,
    ) -> Option<Matched<'p>> {
        let segments = super::super::path::segments(path).expect("path");
        policy.decide(&Target { method, host, path: &segments })
    }

    #[test]
    fn the_first_matching_route_decides() {
        let policy = Policy::parse(SEED).expect("policy");
        assert_eq!(policy.identity.header.as_deref(), Some("x-user-id"));
        let invoices = decide(&policy, "GET", None, "/tenants/acme/invoices/7");
        assert!(
            matches!(invoices, Some(Matched::Roles { tenant: Some(ref t), roles }) if t == "acme" && roles.len() == 2)
        );
        assert!(matches!(
            decide(&policy, "GET", None, "/tenants/acme/invoices"),
            Some(Matched::Roles { .. })
        ));
        assert_eq!(
            decide(&policy, "POST", None, "/tenants/acme/invoices/7"),
            None,
            "method not listed"
        );
        let settings = decide(&policy, "POST", Some("acme.shop.example"), "/settings/x");
        assert!(
            matches!(settings, Some(Matched::Roles { tenant: Some(ref t), .. }) if t == "acme")
        );
        assert_eq!(decide(&policy, "GET", Some("shop.example"), "/settings/x"), None);
        assert!(matches!(
            decide(&policy, "GET", None, "/admin"),
            Some(Matched::Roles { tenant: None, .. })
        ));
        assert_eq!(decide(&policy, "GET", None, "/healthz"), Some(Matched::Public));
        assert_eq!(decide(&policy, "GET", None, "/healthz/x"), None, "no route: denied");
        assert_eq!(decide(&policy, "GET", None, "/"), None);
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
            (format!("{head}[[route]]\npath = \"/a/../b\"\nroles = [\"a\"]\n"), 3, "normal form"),
            (format!("{head}[[route]]\npath = \"a\"\nroles = [\"a\"]\n"), 3, "start with /"),
            (
                "[identity.jwt]\njwks_url = \"ftp://x\"\n".to_owned(),
                2,
                "not \"self\" or an http(s) URL",
            ),
            ("[identity.jwt]\njwks_url = \"::not a url\"\n".to_owned(), 2, "jwks_url"),
            ("[[route]]\npath = \"/a\"\nroles = [\"a\"]\n".to_owned(), 1, "names no source"),
        ] {
            let reason_got = refused(&text);
            assert!(reason_got.starts_with(&format!("line {line}:")), "{text}\n=> {reason_got}");
            assert!(reason_got.contains(reason), "{text}\n=> {reason_got}");
        }
    }
}
