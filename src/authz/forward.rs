//! Forward-auth at `/authz` on the HTTP listener (any method), for nginx `auth_request`,
//! ingress-nginx `auth-url`, Traefik `ForwardAuth` and Caddy `forward_auth`.
//!
//! First the caller must be the proxy ([`super::trust`]): else 401 (403 for a known key
//! without the `proxy` scope) and nothing else. Then the original request is read from
//! the headers of the proxy the policy names ([`super::proxies`]), and decided. Answers:
//! 200 with the `x-rolecheck-*` headers (empty for a public route, so a proxy that
//! copies them sends none), 401 with `www-authenticate: Bearer`, 403 with the reason in
//! `x-rolecheck-reason`, or 503.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::{
    Authz, Decision, Incoming, REASON_HEADER, ROLES_HEADER, TENANT_HEADER, USER_HEADER,
    trust::Untrusted,
};
use crate::auth::PeerIdentity;

/// The `/authz` handler.
pub async fn handle(
    State(authz): State<Arc<Authz>>,
    peer: Option<axum::Extension<PeerIdentity>>,
    headers: HeaderMap,
) -> Response {
    match authz.trust().forward_auth(&headers, peer.as_ref().map(|p| &p.0)) {
        Ok(()) => {}
        Err(Untrusted::Unauthenticated) => {
            return (StatusCode::UNAUTHORIZED, "forward-auth is answered to the proxy only\n")
                .into_response();
        }
        Err(Untrusted::LacksScope) => {
            return (StatusCode::FORBIDDEN, "this key lacks the proxy scope\n").into_response();
        }
    }
    let Some(proxy) = authz.proxy() else {
        return denied("the policy names no [proxy]");
    };
    let original = match proxy.extract(&headers) {
        Ok(original) => original,
        Err(refused) => return denied(refused.0),
    };
    let incoming = Incoming {
        method: original.method,
        host: Some(original.host),
        target: original.target,
        headers: &headers,
    };
    match authz.decide(&incoming).await {
        Decision::Allow { user, tenant, roles } => {
            let mut response = StatusCode::OK.into_response();
            for (name, value) in
                [(USER_HEADER, user), (TENANT_HEADER, tenant), (ROLES_HEADER, roles)]
            {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        Decision::Unauthenticated => {
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")]).into_response()
        }
        Decision::Denied(why) => denied(why),
        Decision::Unavailable => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

fn denied(why: &'static str) -> Response {
    tracing::debug!(why, "forward-auth request denied");
    (StatusCode::FORBIDDEN, [(REASON_HEADER, HeaderValue::from_static(why))]).into_response()
}
