//! The tower layer that turns credentials into a [`Caller`] in request extensions, or
//! refuses the call: `UNAUTHENTICATED` without valid credentials, `PERMISSION_DENIED`
//! without the scope, `RESOURCE_EXHAUSTED` past the caller's rate limit. Health,
//! reflection and `GetKeys` are open.

use std::{
    future::Future,
    num::NonZeroU32,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tonic::Status;

use super::{Caller, Keys, Scope};

/// Who may call a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health, reflection, public keys).
    Open,
    /// A caller holding any one of these scopes.
    Needs(&'static [Scope]),
}

const CHECK: Access = Access::Needs(&[Scope::Check]);
const WRITE: Access = Access::Needs(&[Scope::Write]);
const ISSUE: Access = Access::Needs(&[Scope::Issue]);
const AUDIT_OR_FOLLOW: Access = Access::Needs(&[Scope::Audit, Scope::Follow]);
const PROXY: Access = Access::Needs(&[Scope::Proxy]);

/// Envoy's external authorization call.
pub const ENVOY_CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

/// Every method this server serves and who may call it. A path not listed here is
/// refused before it reaches a service (default deny); a test walks the served file
/// descriptor sets and fails on any method missing from this table.
pub const RULES: &[(&str, Access)] = &[
    ("/grpc.health.v1.Health/Check", Access::Open),
    ("/grpc.health.v1.Health/Watch", Access::Open),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Access::Open),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Access::Open),
    ("/rolecheck.v1.RoleCheck/GetKeys", Access::Open),
    ("/rolecheck.v1.RoleCheck/Check", CHECK),
    ("/rolecheck.v1.RoleCheck/CheckBatch", CHECK),
    ("/rolecheck.v1.RoleCheck/GetAuthorization", CHECK),
    ("/rolecheck.v1.RoleCheck/ListMembers", CHECK),
    ("/rolecheck.v1.RoleCheck/Grant", WRITE),
    ("/rolecheck.v1.RoleCheck/Revoke", WRITE),
    ("/rolecheck.v1.RoleCheck/SetRoles", WRITE),
    ("/rolecheck.v1.RoleCheck/SetModel", WRITE),
    ("/rolecheck.v1.RoleCheck/GetModel", CHECK),
    ("/rolecheck.v1.RoleCheck/Import", WRITE),
    // Every membership at once: for an operator (audit), not a service that checks.
    ("/rolecheck.v1.RoleCheck/Export", Access::Needs(&[Scope::Audit])),
    ("/rolecheck.v1.RoleCheck/Issue", ISSUE),
    // A follower reads history for its own Watch streams (what Watch shows it anyway).
    ("/rolecheck.v1.RoleCheck/ListChanges", AUDIT_OR_FOLLOW),
    ("/rolecheck.v1.RoleCheck/Watch", AUDIT_OR_FOLLOW),
    // Which users were asked about lately: a follower warming its cache.
    ("/rolecheck.v1.RoleCheck/ListActiveUsers", AUDIT_OR_FOLLOW),
    ("/rolecheck.v1.Tenants/CreateTenant", WRITE),
    ("/rolecheck.v1.Tenants/GetTenant", CHECK),
    ("/rolecheck.v1.Tenants/ListTenants", CHECK),
    ("/rolecheck.v1.Tenants/DeleteTenant", WRITE),
    // Proxy authorization (with --authz-policy): only the proxy may ask, since the answer
    // tells who holds which role. Open instead on a listener declared private
    // (--authz-private-listener, loopback or a unix socket only).
    (ENVOY_CHECK, PROXY),
];

/// The rule for a gRPC method path, with the path as `RULES` spells it (a bounded set of
/// names, used as the metrics label); `None` for a method this server does not serve.
pub fn rule(path: &str) -> Option<(&'static str, Access)> {
    RULES.iter().find(|(known, _)| *known == path).copied()
}

/// The access rule for a gRPC method path; `None` means refused.
pub fn required_scope(path: &str) -> Option<Access> {
    rule(path).map(|(_, access)| access)
}

/// The identity a verified client certificate carries, from structured fields only
/// (never a rendered subject string, in which one RDN's value can imitate another).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject's common name, when the subject has exactly one CN attribute.
    pub cn: Option<String>,
    /// The certificate's DNS subject alternative names.
    pub dns: Vec<String>,
    /// The certificate's URI subject alternative names (e.g. SPIFFE ids).
    pub uris: Vec<String>,
}

impl PeerIdentity {
    /// Whether the certificate carries any identity at all.
    pub fn is_empty(&self) -> bool {
        self.cn.is_none() && self.dns.is_empty() && self.uris.is_empty()
    }
}

/// Adds caller authentication (and an optional per-caller rate limit) to a service.
#[derive(Clone)]
pub struct AuthLayer {
    keys: Keys,
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    private_authz: bool,
}

impl AuthLayer {
    /// Authenticates with `keys`; `rate_per_second` limits each caller (None: no limit).
    pub fn new(keys: Keys, rate_per_second: Option<NonZeroU32>) -> Self {
        let limiter =
            rate_per_second.map(|rate| Arc::new(RateLimiter::keyed(Quota::per_second(rate))));
        Self { keys, limiter, private_authz: false }
    }

    /// Lets [`ENVOY_CHECK`] through without credentials: the listener is declared
    /// private (`--authz-private-listener`; the server refuses it on a shared address).
    pub fn private_authz(mut self, open: bool) -> Self {
        self.private_authz = open;
        self
    }

    fn authorize<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let Some(access) = required_scope(request.uri().path()) else {
            return Err(Status::unimplemented("no such method"));
        };
        if access == Access::Open || (self.private_authz && request.uri().path() == ENVOY_CHECK) {
            return Ok(());
        }
        let caller = if !self.keys.enabled() {
            Caller::anonymous()
        } else if let Some(secret) = bearer(request.headers()) {
            let ring = self.keys.current();
            ring.authenticate(secret).ok_or_else(|| Status::unauthenticated("unknown API key"))?
        } else if let Some(peer) =
            request.extensions().get::<PeerIdentity>().filter(|p| !p.is_empty())
        {
            let ring = self.keys.current();
            ring.certificate(peer).ok_or_else(|| {
                Status::unauthenticated("client certificate is not listed in the API keys file")
            })?
        } else {
            return Err(Status::unauthenticated(
                "missing credentials: send `authorization: Bearer <key>`",
            ));
        };
        if let Access::Needs(scopes) = access
            && !scopes.iter().any(|scope| caller.may(*scope))
        {
            let names: Vec<String> =
                scopes.iter().map(|s| format!("{s:?}").to_lowercase()).collect();
            return Err(Status::permission_denied(format!(
                "caller {} lacks the {} scope",
                caller.name,
                names.join(" or ")
            )));
        }
        let caller = relayed(request.headers(), caller)?;
        if let Some(limiter) = &self.limiter
            && limiter.check_key(&caller.name).is_err()
        {
            return Err(Status::resource_exhausted(format!(
                "rate limit exceeded for caller {}",
                caller.name
            )));
        }
        request.extensions_mut().insert(caller);
        Ok(())
    }
}

/// The header a follower sets to name the caller it relays a call for.
pub const ON_BEHALF_OF: &str = "x-rolecheck-on-behalf-of";

/// Longest relayed caller name.
const MAX_RELAYED_NAME: usize = 256;

/// `caller` as recorded when the call is relayed: a follower (a caller with the `follow`
/// scope) names its own caller in [`ON_BEHALF_OF`], and the audit trail records both,
/// as `<original> via <follower>`. The call still needs its own scope on the follower's
/// key, so a follower never does more than its key allows. Anyone else sending the
/// header is refused.
fn relayed(headers: &http::HeaderMap, caller: Caller) -> Result<Caller, Status> {
    let Some(value) = headers.get(ON_BEHALF_OF) else { return Ok(caller) };
    if !caller.may(Scope::Follow) {
        return Err(Status::permission_denied(format!(
            "caller {} lacks the follow scope needed to relay calls ({ON_BEHALF_OF})",
            caller.name
        )));
    }
    let original = value
        .to_str()
        .ok()
        .filter(|name| {
            (1..=MAX_RELAYED_NAME).contains(&name.len())
                && name.bytes().all(|b| (0x20..0x7f).contains(&b))
        })
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{ON_BEHALF_OF}: 1 to {MAX_RELAYED_NAME} printable ASCII characters"
            ))
        })?;
    Ok(Caller { name: format!("{original} via {}", caller.name), scopes: caller.scopes })
}

/// The secret of an `authorization: Bearer <secret>` header.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, secret) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| secret.trim()).filter(|s| !s.is_empty())
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, layer: self.clone() }
    }
}

/// The service [`AuthLayer`] produces.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.layer.authorize(&mut request) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => {
                tracing::debug!(code = ?status.code(), path = request.uri().path(), "refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Every method of every file descriptor set the server registers.
    fn served_methods() -> Vec<String> {
        let sets = [
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut methods = Vec::new();
        for bytes in sets {
            let set = prost_types::FileDescriptorSet::decode(bytes).expect("descriptor set");
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        methods.push(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        // Envoy's ext_authz comes pre-generated (envoy-types), with no descriptor set.
        let envoy = <crate::authz::envoy::AuthorizationServer<crate::authz::envoy::EnvoyAuthz>
            as tonic::server::NamedService>::NAME;
        methods.push(format!("/{envoy}/Check"));
        methods
    }

    #[test]
    fn every_served_method_has_a_rule_and_every_rule_a_method() {
        let served = served_methods();
        assert!(served.len() >= 19, "{served:?}");
        let missing: Vec<&String> = served.iter().filter(|m| rule(m).is_none()).collect();
        assert!(missing.is_empty(), "methods with no access rule: {missing:?}");
        let stale: Vec<&str> =
            RULES.iter().map(|(p, _)| *p).filter(|p| !served.iter().any(|m| m == p)).collect();
        assert!(stale.is_empty(), "rules for methods nobody serves: {stale:?}");
    }

    #[test]
    fn scopes_are_as_the_contract_says() {
        let rc = |m: &str| required_scope(&format!("/rolecheck.v1.RoleCheck/{m}"));
        let tn = |m: &str| required_scope(&format!("/rolecheck.v1.Tenants/{m}"));
        for m in ["Check", "CheckBatch", "GetAuthorization", "ListMembers", "GetModel"] {
            assert_eq!(rc(m), Some(CHECK), "{m}");
        }
        for m in ["Grant", "Revoke", "SetRoles", "SetModel"] {
            assert_eq!(rc(m), Some(WRITE), "{m}");
        }
        assert_eq!(rc("Issue"), Some(ISSUE));
        assert_eq!(rc("ListChanges"), Some(Access::Needs(&[Scope::Audit, Scope::Follow])));
        assert_eq!(rc("Watch"), Some(Access::Needs(&[Scope::Audit, Scope::Follow])));
        assert_eq!(rc("GetKeys"), Some(Access::Open));
        assert_eq!(tn("GetTenant"), Some(CHECK));
        assert_eq!(tn("ListTenants"), Some(CHECK));
        assert_eq!(tn("CreateTenant"), Some(WRITE));
        assert_eq!(tn("DeleteTenant"), Some(WRITE));
        assert_eq!(required_scope("/grpc.health.v1.Health/Check"), Some(Access::Open));
        assert_eq!(required_scope("/rolecheck.v1.RoleCheck/Nope"), None);
        assert_eq!(required_scope("/other.Service/Method"), None);
        assert_eq!(required_scope("/rolecheck.v1.RoleCheck/Check/"), None);
    }
}
