//! Proxy authorization (`--authz-policy`): a proxy in front of an app asks whether a
//! request may pass, by Envoy's external authorization API on the gRPC listener
//! ([`envoy`]) or by forward-auth at `/authz` on the HTTP listener ([`forward`]).
//!
//! Only the proxy may ask ([`trust`]). Forward-auth reads the original request from the
//! headers of the proxy the policy names ([`proxies`]); Envoy's from its attributes.
//! Then one decision for both ([`Authz::decide`]):
//! 1. The method, path and host are put in canonical form ([`canonical`]); a spelling
//!    that two parsers could read two ways is refused (403 with the reason), whatever
//!    route it would match.
//! 2. The first of the [`routes`] that matches the method, host and path decides; none
//!    is a denial (403). A public route allows anyone.
//! 3. The user comes from the policy's trusted header when it is present, else from a
//!    bearer JWT ([`jwt`]); neither, or an invalid one, is 401.
//! 4. The tenant comes from the route's `{tenant}` (host or path), else the application
//!    tenant. The user's roles are read live (the cache, else the store): any one of the
//!    route's roles allows; none is 403; a store that cannot answer is 503 / UNAVAILABLE.
//!
//! An allowed request carries `x-rolecheck-user`, `x-rolecheck-tenant` and
//! `x-rolecheck-roles` (the user's live roles in the tenant) to the app, replacing any
//! copies the client sent; a public one carries none of them (the proxy removes them).
//!
//! The policy is reloaded like the key file (SIGHUP, or a change to the file); a reload
//! that fails keeps the policy in force, logs the line and the reason, and counts
//! `rolecheck_authz_policy_reload_failures_total`.

pub mod canonical;
pub mod envoy;
mod fetch;
pub mod forward;
pub mod jwt;
pub mod policy;
pub mod proxies;
pub mod routes;
pub mod trust;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use prometheus_client::metrics::counter::Counter;

use self::{
    canonical::Refused,
    jwt::Verifier,
    policy::Policy,
    routes::{Matched, Segment, Target, Template},
    trust::{Exposure, ProxyTrust},
};
use crate::token::KeySet;
use crate::{
    cache::{
        RoleLookup,
        model::{Asked, Models},
    },
    domain::{TenantId, UserId, now_unix},
    error::Result,
    metrics::{DecisionLabels, Metrics},
};

/// The headers an allowed request carries to the app.
pub const USER_HEADER: &str = "x-rolecheck-user";
/// See [`USER_HEADER`].
pub const TENANT_HEADER: &str = "x-rolecheck-tenant";
/// See [`USER_HEADER`].
pub const ROLES_HEADER: &str = "x-rolecheck-roles";
/// Why a request was denied, on a 403 to the proxy (never on an answer to a caller that
/// is not the proxy).
pub const REASON_HEADER: &str = "x-rolecheck-reason";

/// A request's headers, by lower-case name.
pub trait Headers {
    /// The value of header `name` (lower-case), if present.
    fn get(&self, name: &str) -> Option<&str>;

    /// Whether header `name` is sent more than once (which one would count is
    /// ambiguous).
    fn repeated(&self, _name: &str) -> bool {
        false
    }
}

impl Headers for http::HeaderMap {
    fn get(&self, name: &str) -> Option<&str> {
        http::HeaderMap::get(self, name).and_then(|value| value.to_str().ok())
    }

    fn repeated(&self, name: &str) -> bool {
        self.get_all(name).iter().nth(1).is_some()
    }
}

impl Headers for std::collections::HashMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        std::collections::HashMap::get(self, name).map(String::as_str)
    }
}

/// The request a proxy asks about.
#[derive(Debug)]
pub struct Incoming<'a, H: Headers + ?Sized> {
    /// Its method.
    pub method: &'a str,
    /// Its host (the proxy's host header, `:authority`), when known.
    pub host: Option<&'a str>,
    /// Its target: the path with any query, or an absolute URL.
    pub target: &'a str,
    /// Its headers (for the identity).
    pub headers: &'a H,
}

/// What the proxy is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through; for a public route every field is empty.
    Allow {
        /// The user.
        user: String,
        /// The tenant the roles are in.
        tenant: String,
        /// The user's live roles in the tenant, comma-separated.
        roles: String,
    },
    /// No identity, or an invalid one: 401.
    Unauthenticated,
    /// No route, a route the user lacks the role for, or a request refused: 403, and
    /// why.
    Denied(&'static str),
    /// The answer cannot be known now (the store): 503 / UNAVAILABLE.
    Unavailable,
}

/// The policy in force with its token verifier (kept across reloads while
/// `[identity.jwt]` is unchanged, so its verified tokens and fetched keys stay).
struct Loaded {
    policy: Policy,
    verifier: Option<Arc<Verifier>>,
}

/// Decides proxy requests against the policy in force.
pub struct Authz {
    loaded: RwLock<Arc<Loaded>>,
    path: PathBuf,
    stamp: Option<crate::reload::Stamp>,
    own_keys: Arc<KeySet>,
    trust: ProxyTrust,
    exposure: Exposure,
    roles: RoleLookup,
    /// The model the route's roles and permissions are judged by.
    models: Arc<Models>,
    application_id: TenantId,
    reload_failures: Counter,
    outcomes: [Counter; 4],
}

impl std::fmt::Debug for Authz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authz").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Reads and checks the policy at `path` for a server exposed as `exposure`, before
/// anything else is opened (see [`Authz::load`], which checks it again).
pub fn preflight(path: &Path, exposure: Exposure) -> Result<Policy> {
    let policy = Policy::load(path)?;
    trust::start_check(exposure, policy.identity.header.is_some())?;
    Ok(policy)
}

impl Authz {
    /// Loads the policy at `path`; a policy that cannot be read, is invalid, or would
    /// answer who may not ask ([`trust::start_check`]) is refused. `own_keys` are
    /// rolecheck's keys (for `jwks_url = "self"`); `trust` tells the proxy from others.
    pub fn load(
        path: &Path,
        own_keys: Arc<KeySet>,
        (trust, exposure): (ProxyTrust, Exposure),
        (roles, models): (RoleLookup, Arc<Models>),
        application_id: TenantId,
        metrics: &Metrics,
    ) -> Result<Arc<Self>> {
        let stamp = crate::reload::stamp(path);
        let policy = Policy::load(path)?;
        trust::start_check(exposure, policy.identity.header.is_some())?;
        policy.warn_about(path);
        let verifier =
            policy.identity.jwt.clone().map(|jwt| Arc::new(Verifier::new(jwt, own_keys.clone())));
        tracing::info!(path = %path.display(), routes = policy.len(), "authorization policy loaded");
        let outcome =
            |decision| metrics.authz_decisions.get_or_create(&DecisionLabels { decision }).clone();
        let authz = Arc::new(Self {
            loaded: RwLock::new(Arc::new(Loaded { policy, verifier })),
            path: path.to_owned(),
            stamp,
            own_keys,
            trust,
            exposure,
            roles,
            models,
            application_id,
            reload_failures: metrics.policy_reload_failures.clone(),
            outcomes: [
                outcome("allowed"),
                outcome("unauthenticated"),
                outcome("denied"),
                outcome("unavailable"),
            ],
        });
        authz.refresh_keys();
        Ok(authz)
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded.read().map_or_else(|p| p.into_inner().clone(), |l| l.clone())
    }

    /// Starts fetching the JWK Set of the current verifier, if it has a URL.
    fn refresh_keys(&self) {
        if let Some(verifier) = &self.current().verifier {
            verifier.refresh();
        }
    }

    /// Who may ask, for forward-auth.
    pub fn trust(&self) -> &ProxyTrust {
        &self.trust
    }

    /// The proxy forward-auth requests come from, per the policy in force.
    pub fn proxy(&self) -> Option<proxies::Proxy> {
        self.current().policy.proxy.clone()
    }

    /// Re-reads the policy; on failure keeps the one in force and logs why. A policy
    /// that would loosen who may name a user (a trusted header with anonymous callers on
    /// a shared port) is a failure like any other.
    pub fn reload(&self) {
        let checked = Policy::load(&self.path).and_then(|policy| {
            trust::header_identity_check(self.exposure, policy.identity.header.is_some())?;
            Ok(policy)
        });
        match checked {
            Ok(policy) => {
                let old = self.current();
                let (verifier, fresh) = match (&policy.identity.jwt, &old.verifier) {
                    (Some(jwt), Some(verifier)) if verifier.config() == jwt => {
                        (Some(verifier.clone()), false)
                    }
                    (Some(jwt), _) => {
                        (Some(Arc::new(Verifier::new(jwt.clone(), self.own_keys.clone()))), true)
                    }
                    (None, _) => (None, false),
                };
                let routes = policy.len();
                policy.warn_about(&self.path);
                if let Ok(mut loaded) = self.loaded.write() {
                    *loaded = Arc::new(Loaded { policy, verifier });
                }
                // A new verifier fetches its keys; a kept one goes on refreshing its own.
                if fresh {
                    self.refresh_keys();
                }
                tracing::info!(routes, "authorization policy reloaded");
            }
            Err(err) => {
                self.reload_failures.inc();
                tracing::error!(%err, "authorization policy reload failed; keeping the policy in force");
            }
        }
    }

    /// Reloads on SIGHUP and whenever the file changes (polled every `every`).
    pub fn watch(self: &Arc<Self>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let authz = self.clone();
        crate::reload::watch(self.path.clone(), self.stamp, every, move || authz.reload())
    }

    /// Decides `request`.
    pub async fn decide<H: Headers + ?Sized>(&self, request: &Incoming<'_, H>) -> Decision {
        let decision = self.decide_uncounted(request).await;
        let index = match decision {
            Decision::Allow { .. } => 0,
            Decision::Unauthenticated => 1,
            Decision::Denied(_) => 2,
            Decision::Unavailable => 3,
        };
        self.outcomes[index].inc();
        decision
    }

    async fn decide_uncounted<H: Headers + ?Sized>(&self, request: &Incoming<'_, H>) -> Decision {
        let canonical = (|| {
            let method = canonical::method(request.method)?;
            let path = canonical::path(request.target)?;
            let host = request.host.map(canonical::host).transpose()?;
            Ok::<_, Refused>((method, path, host))
        })();
        let (method, path, host) = match canonical {
            Ok(parts) => parts,
            Err(Refused(why)) => {
                tracing::debug!(why, "proxy request refused");
                return Decision::Denied(why);
            }
        };
        let loaded = self.current();
        let target = Target { method, host: host.as_deref(), path: &path };
        let (tenant, roles) = match loaded.policy.routes.decide(&target) {
            None => return Decision::Denied("no route matches"),
            Some(Matched::Public) => {
                return Decision::Allow {
                    user: String::new(),
                    tenant: String::new(),
                    roles: String::new(),
                };
            }
            Some(Matched::Roles { tenant, roles, permissions }) => (tenant, (roles, permissions)),
        };
        let Some(user) = self.user(&loaded, request.headers).await else {
            return Decision::Unauthenticated;
        };
        let tenant = match tenant {
            None => self.application_id.clone(),
            Some(tenant) => match TenantId::parse("tenant", tenant) {
                Ok(id) => id,
                Err(_) => return Decision::Denied("the route's tenant is not a tenant id"),
            },
        };
        let answer = match self.held(&user, &tenant, roles).await {
            Ok(answer) => answer,
            Err(decision) => return decision,
        };
        let held = answer.roles.roles_in(tenant.as_str(), now_unix()).collect::<Vec<_>>().join(",");
        Decision::Allow {
            user: user.as_str().to_owned(),
            tenant: tenant.as_str().to_owned(),
            roles: held,
        }
    }

    /// `user`'s live roles, when they hold one of the route's `roles` or have one of its
    /// `permissions` in `tenant` under the model; else the decision to give.
    async fn held(
        &self,
        user: &UserId,
        tenant: &TenantId,
        (roles, permissions): (&[crate::domain::Role], &[crate::domain::Role]),
    ) -> std::result::Result<crate::store::Answer, Decision> {
        let (answer, model) = match self.models.answer(&self.roles, user.as_str(), 0).await {
            Ok(judged) => judged,
            Err(err) => {
                tracing::warn!(%err, "proxy decision: roles unavailable");
                return Err(Decision::Unavailable);
            }
        };
        let now = now_unix();
        let tenants = (self.application_id.as_str(), tenant.as_str());
        let allows = |asked| model.allows(&answer.roles, tenants, asked, now);
        if !roles.iter().any(|role| allows(Asked::Role(role.as_str())))
            && !permissions.iter().any(|permission| allows(Asked::Permission(permission.as_str())))
        {
            return Err(Decision::Denied("the user holds none of the route's roles there"));
        }
        Ok(answer)
    }

    /// Whether `user` may take `method` on `route` (a path, or an OpenAPI-style route
    /// template whose `{name}` segments stand for any value) at `host`: AuthZEN's
    /// API-gateway profile, decided by the policy's routes as a proxy's request would be.
    /// `named` is a tenant the caller names besides (AuthZEN's `properties` or `context`):
    /// it fills a `{tenant}` the template leaves open, and must agree with one it fills.
    pub async fn decide_route(
        &self,
        user: &UserId,
        (method, host, route): (&str, Option<&str>, &str),
        named: Option<&TenantId>,
    ) -> Decision {
        let parsed = (|| {
            let method = canonical::method(method)?;
            let host = host.map(canonical::host).transpose()?;
            Ok::<_, Refused>((method, host, template(route)?))
        })();
        let (method, host, (path, placeholders)) = match parsed {
            Ok(parts) => parts,
            Err(Refused(why)) => return Decision::Denied(why),
        };
        let segments: Vec<Segment<'_>> = path
            .segments()
            .zip(placeholders.iter())
            .map(|(text, &open)| if open { Segment::Placeholder } else { Segment::Literal(text) })
            .collect();
        let loaded = self.current();
        let template = Template { method, host: host.as_deref(), segments: &segments };
        let (roles, found) = match loaded.policy.routes.decide_template(&template) {
            Err(why) => return Decision::Denied(why),
            Ok(None) => return Decision::Denied("no route matches"),
            Ok(Some((Matched::Public, _))) => {
                return Decision::Allow {
                    user: String::new(),
                    tenant: String::new(),
                    roles: String::new(),
                };
            }
            Ok(Some((Matched::Roles { roles, permissions, .. }, found))) => {
                ((roles, permissions), found)
            }
        };
        let tenant = match (found, named) {
            (None, None) => self.application_id.clone(),
            (Some(Segment::Placeholder), Some(named)) => named.clone(),
            (Some(Segment::Placeholder), None) => {
                return Decision::Denied(
                    "the route's {tenant} is a placeholder: name the tenant in resource.properties.tenant_id",
                );
            }
            (Some(Segment::Literal(text)), _) => match TenantId::parse("tenant", text) {
                Ok(id) => id,
                Err(_) => return Decision::Denied("the route's tenant is not a tenant id"),
            },
            (None, Some(_)) => self.application_id.clone(),
        };
        if named.is_some_and(|named| *named != tenant) {
            return Decision::Denied("the tenant named is not the tenant the route names");
        }
        match self.held(user, &tenant, roles).await {
            Ok(_) => Decision::Allow {
                user: user.as_str().to_owned(),
                tenant: tenant.as_str().to_owned(),
                roles: String::new(),
            },
            Err(decision) => decision,
        }
    }

    /// The user the request names: the trusted header when present, else a bearer JWT.
    async fn user<H: Headers + ?Sized>(&self, loaded: &Loaded, headers: &H) -> Option<UserId> {
        if let Some(name) = loaded.policy.identity.header.as_deref() {
            if headers.repeated(name) {
                return None;
            }
            if let Some(value) = headers.get(name) {
                return UserId::parse("user", value.trim()).ok();
            }
        }
        let verifier = loaded.verifier.as_ref()?;
        if headers.repeated("authorization") {
            return None;
        }
        let token = bearer(headers.get("authorization")?)?;
        match verifier.user(token).await {
            Ok(user) => UserId::parse("user", &user).ok(),
            Err(rejected) => {
                tracing::debug!(?rejected, "proxy request bearer token rejected");
                None
            }
        }
    }
}

/// A route template in canonical form, and which of its segments are `{name}`
/// placeholders. A placeholder is a whole segment of name characters; anything else is
/// read as a path is, and refused as a path would be.
fn template(route: &str) -> std::result::Result<(canonical::Path, Vec<bool>), Refused> {
    let path = route.split(['?', '#']).next().unwrap_or_default();
    let mut placeholders = Vec::new();
    let mut literal = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            literal.push('/');
        }
        let open = segment.len() > 2
            && segment.starts_with('{')
            && segment.ends_with('}')
            && segment[1..segment.len() - 1]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        literal.push_str(if open { "_" } else { segment });
        if i > 0 {
            placeholders.push(open);
        }
    }
    let canonical = canonical::path(&literal)?;
    if path == "/" {
        placeholders.clear();
    }
    if canonical.segments().count() != placeholders.len() {
        return Err(Refused("the route template's segments are ambiguous"));
    }
    Ok((canonical, placeholders))
}

/// The token of an `authorization: Bearer <token>` value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}
