//! `envoy.service.auth.v3.Authorization/Check` (Envoy's and Istio's external
//! authorization), served on the gRPC listener with the protos of the `envoy-types` crate
//! (pre-generated for our tonic and prost, so no Envoy proto tree is built here).
//!
//! The request is read from `attributes.request.http` (`method`, `path`, `host`) only.
//! Allowed: status OK, `ok_response` setting the `x-rolecheck-*` headers (overwriting the
//! client's) or, for a public route, removing them. Denied: status `PERMISSION_DENIED`
//! and `denied_response` 403 with the reason in `x-rolecheck-reason`; no identity: `UNAUTHENTICATED` and 401 with
//! `www-authenticate: Bearer`. A store that cannot answer fails the call with
//! `UNAVAILABLE`, which Envoy turns into its `status_on_error` (configure 503) and never
//! lets through (`failure_mode_allow: false`).

use std::sync::Arc;

use envoy_types::ext_authz::v3::{
    CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
    pb::{Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode},
};
use tonic::{Request, Response, Status};

use super::{Authz, Decision, Incoming, REASON_HEADER, ROLES_HEADER, TENANT_HEADER, USER_HEADER};

pub use envoy_types::ext_authz::v3::pb::AuthorizationServer;

/// The ext_authz service.
#[derive(Debug, Clone)]
pub struct EnvoyAuthz {
    authz: Arc<Authz>,
}

impl EnvoyAuthz {
    /// Decides with `authz`.
    pub fn new(authz: Arc<Authz>) -> Self {
        Self { authz }
    }
}

#[tonic::async_trait]
impl Authorization for EnvoyAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let http = request
            .get_ref()
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .ok_or_else(|| Status::invalid_argument("attributes.request.http is required"))?;
        // The request is read from the attributes Envoy fills, never from the headers it
        // copies (`:path` and the like): one source. `path` holds the query too.
        let missing = [
            (&http.method, "no attributes.request.http.method"),
            (&http.path, "no attributes.request.http.path"),
        ]
        .into_iter()
        .find(|(value, _)| value.is_empty());
        if let Some((_, why)) = missing {
            return Ok(Response::new(denied(why)));
        }
        let (method, target) = (http.method.as_str(), http.path.as_str());
        let host = (!http.host.is_empty()).then_some(http.host.as_str());
        let incoming = Incoming { method, host, target, headers: &http.headers };
        let mut response = CheckResponse::default();
        match self.authz.decide(&incoming).await {
            Decision::Allow { user, tenant, roles } => {
                let mut ok = OkHttpResponseBuilder::new();
                for (name, value) in
                    [(USER_HEADER, user), (TENANT_HEADER, tenant), (ROLES_HEADER, roles)]
                {
                    if value.is_empty() {
                        ok.remove_header(name);
                    } else {
                        ok.add_header(
                            name,
                            value,
                            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
                            false,
                        );
                    }
                }
                response.set_status(Status::ok("")).set_http_response(ok.build());
            }
            Decision::Unauthenticated => {
                let mut denied = DeniedHttpResponseBuilder::new();
                denied.set_http_status(HttpStatusCode::Unauthorized);
                denied.add_header("www-authenticate", "Bearer", None, false);
                response
                    .set_status(Status::unauthenticated("no valid identity"))
                    .set_http_response(denied.build());
            }
            Decision::Denied(why) => response = denied(why),
            Decision::Unavailable => {
                return Err(Status::unavailable(
                    "roles unavailable: the answer cannot be known now",
                ));
            }
        }
        Ok(Response::new(response))
    }
}

/// A 403 with the reason, in the status message and the `x-rolecheck-reason` header.
fn denied(why: &'static str) -> CheckResponse {
    let mut denied = DeniedHttpResponseBuilder::new();
    denied.set_http_status(HttpStatusCode::Forbidden);
    denied.add_header(REASON_HEADER, why, None, false);
    let mut response = CheckResponse::default();
    response.set_status(Status::permission_denied(why)).set_http_response(denied.build());
    response
}
