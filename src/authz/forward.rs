//! Forward-auth at `/authz` on the HTTP listener (any method), for nginx `auth_request`,
//! ingress-nginx `auth-url`, Traefik `ForwardAuth` and Caddy `forward_auth`.
//!
//! The original request is read from `X-Forwarded-Method`, `X-Forwarded-Uri` and
//! `X-Forwarded-Host` (Traefik, Caddy), or `X-Original-Method` and `X-Original-URI` /
//! `X-Original-URL` (nginx, ingress-nginx); the host falls back to `Host`. Without an
//! original URI there is nothing to decide: 403. Answers: 200 with the `x-rolecheck-*`
//! headers (empty for a public route, so a proxy that copies them sends none), 401 with
//! `www-authenticate: Bearer`, 403, or 503.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::{Authz, Decision, Incoming, ROLES_HEADER, TENANT_HEADER, USER_HEADER};

/// The `/authz` handler.
pub async fn handle(
    State(authz): State<Arc<Authz>>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let method =
        get("x-forwarded-method").or_else(|| get("x-original-method")).unwrap_or(method.as_str());
    let Some(target) =
        get("x-forwarded-uri").or_else(|| get("x-original-uri")).or_else(|| get("x-original-url"))
    else {
        tracing::debug!("forward-auth request without an original URI");
        return StatusCode::FORBIDDEN.into_response();
    };
    let host = get("x-forwarded-host").or_else(|| get(header::HOST.as_str()));
    let incoming = Incoming { method, host, target, headers: &headers };
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
        Decision::Denied => StatusCode::FORBIDDEN.into_response(),
        Decision::Unavailable => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}
