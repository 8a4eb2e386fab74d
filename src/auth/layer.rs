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
    /// A caller holding this scope.
    Needs(Scope),
    /// Any authenticated caller (methods this build does not know).
    Authenticated,
}

/// The access rule for a gRPC method path.
pub fn required_scope(path: &str) -> Access {
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        return Access::Open;
    }
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Access::Authenticated;
    };
    match (service, method) {
        ("rolecheck.v1.RoleCheck", "GetKeys") => Access::Open,
        (
            "rolecheck.v1.RoleCheck",
            "Check" | "CheckBatch" | "GetAuthorization" | "ListMembers" | "Watch" | "ListChanges",
        )
        | ("rolecheck.v1.Tenants", "GetTenant" | "ListTenants") => Access::Needs(Scope::Check),
        ("rolecheck.v1.RoleCheck", "Grant" | "Revoke" | "SetRoles")
        | ("rolecheck.v1.Tenants", "CreateTenant" | "DeleteTenant") => Access::Needs(Scope::Write),
        ("rolecheck.v1.RoleCheck", "Issue") => Access::Needs(Scope::Issue),
        _ => Access::Authenticated,
    }
}

/// The verified client-certificate subject of a TLS connection, when there is one.
#[derive(Clone, Debug, Default)]
pub struct PeerIdentity {
    /// The certificate subject, e.g. `CN=billing-service`.
    pub subject: Option<String>,
}

/// Adds caller authentication (and an optional per-caller rate limit) to a service.
#[derive(Clone)]
pub struct AuthLayer {
    keys: Keys,
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
}

impl AuthLayer {
    /// Authenticates with `keys`; `rate_per_second` limits each caller (None: no limit).
    pub fn new(keys: Keys, rate_per_second: Option<NonZeroU32>) -> Self {
        let limiter =
            rate_per_second.map(|rate| Arc::new(RateLimiter::keyed(Quota::per_second(rate))));
        Self { keys, limiter }
    }

    fn authorize<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let access = required_scope(request.uri().path());
        if access == Access::Open {
            return Ok(());
        }
        let ring = self.keys.current();
        let caller = if ring.is_empty() {
            Caller::anonymous()
        } else if let Some(secret) = bearer(request.headers()) {
            ring.authenticate(secret).ok_or_else(|| Status::unauthenticated("unknown API key"))?
        } else if let Some(subject) =
            request.extensions().get::<PeerIdentity>().and_then(|p| p.subject.clone())
        {
            ring.certificate(&subject)
        } else {
            return Err(Status::unauthenticated(
                "missing credentials: send `authorization: Bearer <key>`",
            ));
        };
        if let Access::Needs(scope) = access {
            if !caller.may(scope) {
                let scope = format!("{scope:?}").to_lowercase();
                return Err(Status::permission_denied(format!(
                    "caller {} lacks the {scope} scope",
                    caller.name
                )));
            }
        }
        if let Some(limiter) = &self.limiter {
            if limiter.check_key(&caller.name).is_err() {
                return Err(Status::resource_exhausted(format!(
                    "rate limit exceeded for caller {}",
                    caller.name
                )));
            }
        }
        request.extensions_mut().insert(caller);
        Ok(())
    }
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
    use super::*;

    #[test]
    fn every_contract_method_has_its_scope() {
        use Access::*;
        let rc = |m: &str| required_scope(&format!("/rolecheck.v1.RoleCheck/{m}"));
        let tn = |m: &str| required_scope(&format!("/rolecheck.v1.Tenants/{m}"));
        for m in ["Check", "CheckBatch", "GetAuthorization", "ListMembers", "Watch"] {
            assert_eq!(rc(m), Needs(Scope::Check), "{m}");
        }
        for m in ["Grant", "Revoke", "SetRoles"] {
            assert_eq!(rc(m), Needs(Scope::Write), "{m}");
        }
        assert_eq!(rc("Issue"), Needs(Scope::Issue));
        assert_eq!(rc("GetKeys"), Open);
        assert_eq!(tn("GetTenant"), Needs(Scope::Check));
        assert_eq!(tn("CreateTenant"), Needs(Scope::Write));
        assert_eq!(required_scope("/grpc.health.v1.Health/Check"), Open);
        assert_eq!(required_scope("/grpc.reflection.v1.ServerReflection/X"), Open);
        assert_eq!(required_scope("/other.Service/Method"), Authenticated);
    }
}
