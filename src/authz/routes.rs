//! A policy's routes, compiled once when the policy loads: each pattern split into its
//! parts, each method list into a set, so matching a request walks the routes without
//! allocating. The first route that matches decides.
//!
//! Path literals are compared exactly, or ASCII-case-insensitively when the policy says
//! `case_insensitive` (for apps that route that way, like Express's default); hosts
//! always case-insensitively (the request's host is lower-cased, and so is the pattern).

use super::canonical::{self, Path};
use crate::domain::Role;

/// One route as the policy file spells it.
#[derive(Debug, Default)]
pub struct RouteSpec {
    /// The path pattern (`/tenants/{tenant}/**`).
    pub path: String,
    /// The host pattern (`{tenant}.shop.example`), if any.
    pub host: Option<String>,
    /// The methods; empty: every method.
    pub methods: Vec<String>,
    /// Any one of these; empty when public.
    pub roles: Vec<Role>,
    /// Or any one of these permissions (under the model); empty when public.
    pub permissions: Vec<Role>,
    /// Anyone may pass.
    pub public: bool,
}

/// The compiled routes.
#[derive(Debug, Default)]
pub struct Routes {
    routes: Box<[Route]>,
    case_insensitive: bool,
}

#[derive(Debug)]
struct Route {
    host: Option<Box<[Part]>>,
    path: Box<[Part]>,
    /// Upper-case; empty means every method.
    methods: Box<[Box<str>]>,
    roles: Box<[Role]>,
    permissions: Box<[Role]>,
    public: bool,
}

/// One segment of a host or path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Box<str>),
    /// `*`: any one segment.
    Any,
    /// `**`: any rest, even none (last in a path only).
    Rest,
    /// `{tenant}`: any one segment, which names the tenant.
    Tenant,
}

/// What a request asks to reach, in canonical form.
#[derive(Debug)]
pub struct Target<'a> {
    /// The method.
    pub method: &'a str,
    /// The host, when known.
    pub host: Option<&'a str>,
    /// The path.
    pub path: &'a Path,
}

/// The route a request matched.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched<'r, 't> {
    /// Anyone may pass.
    Public,
    /// The user must hold one of `roles`, or have one of `permissions`, in `tenant`
    /// (`None`: the application tenant).
    Roles {
        /// The tenant segment the request named, unchecked.
        tenant: Option<&'t str>,
        /// Any one of them.
        roles: &'r [Role],
        /// Or any one of these.
        permissions: &'r [Role],
    },
}

/// One segment of an OpenAPI-style route template (AuthZEN's API-gateway profile): a
/// literal, canonical like a path's, or a `{name}` placeholder standing for any value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment<'t> {
    /// This exact segment.
    Literal(&'t str),
    /// Any one segment.
    Placeholder,
}

/// What a route template asks to reach.
#[derive(Debug)]
pub struct Template<'t> {
    /// The method.
    pub method: &'t str,
    /// The host, when known.
    pub host: Option<&'t str>,
    /// The path's segments.
    pub segments: &'t [Segment<'t>],
}

/// How a route fits every request a template stands for.
enum Fit<'t> {
    /// It matches none of them.
    No,
    /// It matches all of them; the `{tenant}` segment, if the route has one.
    All(Option<Segment<'t>>),
    /// It matches some and not others (a placeholder against a literal).
    Some,
}

impl Routes {
    /// Compiles `specs` in order; an error names the route (from 0) and the reason.
    pub fn compile(specs: Vec<RouteSpec>, case_insensitive: bool) -> Result<Self, (usize, String)> {
        let routes = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| compile(spec, case_insensitive).map_err(|reason| (i, reason)))
            .collect::<Result<_, _>>()?;
        Ok(Self { routes, case_insensitive })
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there is no route (every request is denied).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// `(route, earlier route)` for every route that can never match because an earlier
    /// one matches every request it would.
    pub fn shadowed(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (j, later) in self.routes.iter().enumerate() {
            if let Some(i) = self.routes[..j]
                .iter()
                .position(|earlier| earlier.covers(later, self.case_insensitive))
            {
                out.push((j, i));
            }
        }
        out
    }

    /// The first route that matches `target`; `None` denies.
    pub fn decide<'r, 't>(&'r self, target: &Target<'t>) -> Option<Matched<'r, 't>> {
        self.routes.iter().find_map(|route| route.matches(target, self.case_insensitive))
    }
}

impl Routes {
    /// The route that decides every request `template` stands for, and its `{tenant}`
    /// segment (a placeholder when the template leaves the tenant open). The first route
    /// that matches them all decides, as for a request; but when an earlier route matches
    /// only some of them (a placeholder where it has a literal), the template is refused:
    /// the gateway would apply one decision to requests the policy decides apart.
    pub fn decide_template<'r, 't>(
        &'r self,
        template: &Template<'t>,
    ) -> Result<Option<(Matched<'r, 't>, Option<Segment<'t>>)>, &'static str> {
        for route in self.routes.iter() {
            match route.fits(template, self.case_insensitive) {
                Fit::No => {}
                Fit::Some => {
                    return Err("the route template stands for requests that routes decide apart");
                }
                Fit::All(tenant) => {
                    let matched = match route.public {
                        true => Matched::Public,
                        false => Matched::Roles {
                            tenant: match tenant {
                                Some(Segment::Literal(tenant)) => Some(tenant),
                                _ => None,
                            },
                            roles: &route.roles,
                            permissions: &route.permissions,
                        },
                    };
                    return Ok(Some((matched, tenant)));
                }
            }
        }
        Ok(None)
    }
}

fn compile(spec: RouteSpec, case_insensitive: bool) -> Result<Route, String> {
    let path = path_pattern(&spec.path, case_insensitive)?;
    let host = spec.host.as_deref().map(host_pattern).transpose()?;
    let tenants = path.iter().chain(host.iter().flatten()).filter(|p| **p == Part::Tenant).count();
    if tenants > 1 {
        return Err("`{tenant}` appears more than once".into());
    }
    if let Some(bad) = spec.methods.iter().find(|m| canonical::method(m).is_err()) {
        return Err(format!("method {bad:?} is not an upper-case method name"));
    }
    match (spec.public, spec.roles.is_empty() && spec.permissions.is_empty()) {
        (true, false) => {
            return Err("a route is either `public = true` or has `roles` or `permissions`".into());
        }
        (false, true) => {
            return Err(
                "a route needs `roles` or `permissions` (any one of them) or `public = true`"
                    .into(),
            );
        }
        _ => {}
    }
    Ok(Route {
        host,
        path,
        methods: spec.methods.into_iter().map(String::into_boxed_str).collect(),
        roles: spec.roles.into(),
        permissions: spec.permissions.into(),
        public: spec.public,
    })
}

/// A path pattern: spelled as the requests it matches are (canonical), with `*`, `**`
/// (last only) and `{tenant}` as whole segments.
fn path_pattern(text: &str, case_insensitive: bool) -> Result<Box<[Part]>, String> {
    let body = text.strip_prefix('/').ok_or_else(|| format!("path {text:?} must start with /"))?;
    if case_insensitive && !text.is_ascii() {
        return Err(format!("path {text:?}: `case_insensitive` routes are ASCII"));
    }
    if body.is_empty() {
        return Ok(Box::new([]));
    }
    let parts = body
        .split('/')
        .map(|segment| {
            if segment.is_empty() {
                return Err(format!("path {text:?}: empty path segment (// or a trailing /)"));
            }
            let part = part(segment)?;
            if let Part::Literal(literal) = &part {
                let alone = format!("/{literal}");
                match canonical::path(&alone) {
                    Err(canonical::Refused(why)) => return Err(format!("path {text:?}: {why}")),
                    Ok(canonical) if canonical.to_string() != alone => {
                        return Err(format!(
                            "path {text:?} is not in canonical form (no escapes, no query)"
                        ));
                    }
                    Ok(_) => {}
                }
            }
            Ok(part)
        })
        .collect::<Result<Box<[Part]>, String>>()?;
    if parts.iter().rev().skip(1).any(|part| *part == Part::Rest) {
        return Err("`**` may only end a path".into());
    }
    Ok(parts)
}

fn host_pattern(text: &str) -> Result<Box<[Part]>, String> {
    let lower = text.to_ascii_lowercase();
    let parts = lower.split('.').map(part).collect::<Result<Box<[Part]>, String>>()?;
    if parts.contains(&Part::Rest) {
        return Err("`**` is for paths, not hosts".into());
    }
    let literal_ok = |p: &Part| match p {
        Part::Literal(label) => canonical::host(label).is_ok() && !label.contains('.'),
        _ => true,
    };
    if !parts.iter().all(literal_ok) {
        return Err(format!("host {text:?} is not a host name pattern"));
    }
    Ok(parts)
}

fn part(segment: &str) -> Result<Part, String> {
    match segment {
        "*" => Ok(Part::Any),
        "**" => Ok(Part::Rest),
        "{tenant}" => Ok(Part::Tenant),
        s if s.contains(['{', '}', '*']) => Err(format!(
            "segment {s:?}: only `*`, `**` and `{{tenant}}` are special, and only as a whole segment"
        )),
        s => Ok(Part::Literal(s.into())),
    }
}

impl Route {
    /// Whether every request `other` matches, `self` matches too.
    fn covers(&self, other: &Route, case_insensitive: bool) -> bool {
        let methods = self.methods.is_empty()
            || (!other.methods.is_empty()
                && other.methods.iter().all(|m| self.methods.contains(m)));
        let host = match (&self.host, &other.host) {
            (None, _) => true,
            (Some(mine), Some(theirs)) => parts_cover(mine, theirs, false),
            (Some(_), None) => false,
        };
        methods && host && parts_cover(&self.path, &other.path, case_insensitive)
    }

    fn matches<'r, 't>(
        &'r self,
        target: &Target<'t>,
        case_insensitive: bool,
    ) -> Option<Matched<'r, 't>> {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| **m == *target.method) {
            return None;
        }
        let mut tenant = None;
        if let Some(host) = &self.host {
            tenant = match_parts(host, target.host?.split('.'), false)?;
        }
        tenant = match_parts(&self.path, target.path.segments(), case_insensitive)?.or(tenant);
        Some(if self.public {
            Matched::Public
        } else {
            Matched::Roles { tenant, roles: &self.roles, permissions: &self.permissions }
        })
    }
}

impl Route {
    /// How this route fits the requests `template` stands for.
    fn fits<'t>(&self, template: &Template<'t>, case_insensitive: bool) -> Fit<'t> {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| **m == *template.method) {
            return Fit::No;
        }
        let mut tenant = None;
        if let Some(host) = &self.host {
            let Some(host_name) = template.host else { return Fit::No };
            match match_parts(host, host_name.split('.'), false) {
                None => return Fit::No,
                Some(found) => tenant = found.map(Segment::Literal),
            }
        }
        let mut segments = template.segments.iter();
        let mut some = false;
        for part in self.path.iter() {
            if *part == Part::Rest {
                return if some { Fit::Some } else { Fit::All(tenant) };
            }
            let Some(&segment) = segments.next() else { return Fit::No };
            match (part, segment) {
                (Part::Literal(text), Segment::Literal(value)) => {
                    let same = match case_insensitive {
                        true => text.eq_ignore_ascii_case(value),
                        false => **text == *value,
                    };
                    if !same {
                        return Fit::No;
                    }
                }
                (Part::Literal(_), Segment::Placeholder) => some = true,
                (Part::Tenant, segment) => tenant = Some(segment),
                _ => {}
            }
        }
        match (segments.next(), some) {
            (Some(_), _) => Fit::No,
            (None, true) => Fit::Some,
            (None, false) => Fit::All(tenant),
        }
    }
}

/// Whether pattern `wide` matches every sequence of segments pattern `narrow` does.
fn parts_cover(wide: &[Part], narrow: &[Part], case_insensitive: bool) -> bool {
    for (i, part) in wide.iter().enumerate() {
        match (part, narrow.get(i)) {
            (Part::Rest, _) => return true,
            (_, None | Some(Part::Rest)) => return false,
            (Part::Any | Part::Tenant, Some(_)) => {}
            (Part::Literal(a), Some(Part::Literal(b))) => {
                let same = if case_insensitive { a.eq_ignore_ascii_case(b) } else { a == b };
                if !same {
                    return false;
                }
            }
            (Part::Literal(_), Some(_)) => return false,
        }
    }
    wide.len() == narrow.len()
}

/// Whether `parts` match `segments` whole: `Some` with the `{tenant}` segment if any.
fn match_parts<'s>(
    parts: &[Part],
    mut segments: impl Iterator<Item = &'s str>,
    case_insensitive: bool,
) -> Option<Option<&'s str>> {
    let mut tenant = None;
    for part in parts {
        if *part == Part::Rest {
            return Some(tenant);
        }
        let segment = segments.next()?;
        match part {
            Part::Literal(text) if case_insensitive && !text.eq_ignore_ascii_case(segment) => {
                return None;
            }
            Part::Literal(text) if !case_insensitive && **text != *segment => return None,
            Part::Tenant => tenant = Some(segment),
            _ => {}
        }
    }
    segments.next().is_none().then_some(tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(case_insensitive: bool) -> Routes {
        let role = |r: &str| Role::parse("roles", r).expect("role");
        let specs = vec![
            RouteSpec {
                path: "/tenants/{tenant}/invoices/**".into(),
                methods: vec!["GET".into(), "HEAD".into()],
                roles: vec![role("billing"), role("admin")],
                ..Default::default()
            },
            RouteSpec {
                path: "/settings/**".into(),
                host: Some("{tenant}.Shop.example".into()),
                roles: vec![role("admin")],
                ..Default::default()
            },
            RouteSpec {
                path: "/admin/**".into(),
                roles: vec![role("agent")],
                ..Default::default()
            },
            RouteSpec { path: "/healthz".into(), public: true, ..Default::default() },
        ];
        Routes::compile(specs, case_insensitive).expect("routes")
    }

    fn decide(
        routes: &Routes,
        method: &str,
        host: Option<&str>,
        path: &str,
    ) -> Option<(bool, Option<String>, usize)> {
        let path = canonical::path(path).expect("path");
        routes.decide(&Target { method, host, path: &path }).map(|m| match m {
            Matched::Public => (true, None, 0),
            Matched::Roles { tenant, roles, .. } => (false, tenant.map(str::to_owned), roles.len()),
        })
    }

    #[test]
    fn the_first_matching_route_decides() {
        let r = routes(false);
        assert_eq!(
            decide(&r, "GET", None, "/tenants/acme/invoices/7"),
            Some((false, Some("acme".into()), 2))
        );
        assert_eq!(
            decide(&r, "GET", None, "/tenants/acme/invoices"),
            Some((false, Some("acme".into()), 2)),
            "`**` matches no rest too"
        );
        assert_eq!(decide(&r, "POST", None, "/tenants/acme/invoices/7"), None, "method");
        assert_eq!(
            decide(&r, "POST", Some("acme.shop.example"), "/settings/x"),
            Some((false, Some("acme".into()), 1))
        );
        assert_eq!(decide(&r, "GET", Some("shop.example"), "/settings/x"), None);
        assert_eq!(decide(&r, "GET", None, "/settings/x"), None, "a host route needs a host");
        assert_eq!(decide(&r, "GET", None, "/admin"), Some((false, None, 1)));
        assert_eq!(decide(&r, "GET", None, "/healthz"), Some((true, None, 0)));
        assert_eq!(decide(&r, "GET", None, "/healthz/x"), None);
        assert_eq!(decide(&r, "GET", None, "/"), None);
    }

    #[test]
    fn case_matters_unless_the_policy_says_otherwise() {
        let exact = routes(false);
        assert_eq!(decide(&exact, "GET", None, "/ADMIN/users"), None);
        assert_eq!(decide(&exact, "GET", None, "/Tenants/acme/invoices/1"), None);
        let folded = routes(true);
        assert_eq!(decide(&folded, "GET", None, "/ADMIN/users"), Some((false, None, 1)));
        assert_eq!(
            decide(&folded, "GET", None, "/Tenants/ACME/Invoices/1"),
            Some((false, Some("ACME".into()), 2)),
            "the tenant is passed on as spelled"
        );
    }

    #[test]
    fn routes_an_earlier_one_covers_are_found() {
        let spec = |path: &str, methods: &[&str]| RouteSpec {
            path: path.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            public: true,
            ..Default::default()
        };
        let routes = Routes::compile(
            vec![
                spec("/tenants/{tenant}/**", &["GET"]),
                spec("/tenants/acme/invoices", &["GET"]),
                spec("/tenants/acme/invoices", &["POST"]),
                spec("/admin", &[]),
                spec("/admin", &["GET"]),
                spec("/a/*/c", &[]),
                spec("/a/b/c", &[]),
                spec("/a/b", &[]),
                spec("/**", &[]),
                spec("/x", &[]),
            ],
            false,
        )
        .expect("routes");
        assert_eq!(routes.shadowed(), [(1, 0), (4, 3), (6, 5), (9, 8)]);
    }

    #[test]
    fn patterns_must_be_canonical() {
        for (path, why) in [
            ("/a/../b", "dot segment"),
            ("/a//b", "empty path segment"),
            ("/a/", "empty path segment"),
            ("/%61", "plain character"),
            ("/a?b", "canonical form"),
            ("a", "start with /"),
            ("/**/a", "only end"),
            ("/x{tenant}", "whole segment"),
        ] {
            let spec = RouteSpec { path: path.into(), public: true, ..Default::default() };
            let err = Routes::compile(vec![spec], false).expect_err(path).1;
            assert!(err.contains(why), "{path}: {err}");
        }
        let spec = RouteSpec { path: "/café".into(), public: true, ..Default::default() };
        assert!(Routes::compile(vec![spec], true).is_err(), "non-ASCII with case folding");
        let spec = RouteSpec {
            path: "/a".into(),
            methods: vec!["get".into()],
            public: true,
            ..Default::default()
        };
        assert!(Routes::compile(vec![spec], false).is_err(), "lower-case method");
    }
}
