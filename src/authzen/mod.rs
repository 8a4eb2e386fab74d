//! AuthZEN 1.0 (the OpenID Authorization API) on the HTTP port, so a gateway or app that
//! speaks it asks rolecheck with no adapter.
//!
//! - `POST /access/v1/evaluation`, `/access/v1/evaluations` ([`decide`]), `POST
//!   /access/v1/search/subject`, `/resource`, `/action` ([`search`]), and `GET
//!   /.well-known/authzen-configuration` (the metadata: the endpoints under the base URL
//!   the caller reached).
//! - The mapping: `subject.id` is the user (any `subject.type`); `action.name` is a
//!   permission the model defines, else a role; the tenant is `resource.id` when
//!   `resource.type` is `tenant`, else `resource.properties.tenant_id`, else
//!   `context.tenant_id`, else the application tenant. A `route` resource, when a proxy
//!   policy is loaded, is a path or route template and the action an HTTP method,
//!   decided by the policy's routes (the API-gateway profile).
//! - Callers present the same keys as on the gRPC port (`authorization: Bearer`, or a
//!   listed client certificate), with the scope `check`: else 401 (403 for a known key
//!   without it). With no key file, only a loopback HTTP listener (or
//!   `--insecure-no-auth`) answers anyone.
//! - A decision is a 200, a deny too. A malformed request is a 400 naming the field;
//!   a body over [`MAX_BODY`] a 413; an answer that cannot be proven current a 503 (fail
//!   closed, as `UNAVAILABLE` on gRPC). `X-Request-ID` is echoed on every answer, and
//!   every request is counted in `rolecheck_http_request_duration_seconds`.

mod decide;
mod search;
pub mod wire;

use std::{sync::Arc, time::Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};

pub use decide::MAX_EVALUATIONS;
pub use search::{MAX_SCANNED, SUBJECT_TYPES};

use self::wire::{Bad, Object};
use crate::{
    auth::{Caller, Keys, PeerIdentity, Scope},
    authz::Authz,
    cache::{RoleLookup, model::Models},
    domain::TenantId,
    error::Error,
    metrics::Metrics,
    store::TenantReads,
};

/// The largest request body: 1,000 evaluations of about a kilobyte each.
pub const MAX_BODY: usize = 1 << 20;

/// The paths, as counted in the metrics.
const EVALUATION: &str = "/access/v1/evaluation";
const EVALUATIONS: &str = "/access/v1/evaluations";
const SEARCH_SUBJECT: &str = "/access/v1/search/subject";
const SEARCH_RESOURCE: &str = "/access/v1/search/resource";
const SEARCH_ACTION: &str = "/access/v1/search/action";
const METADATA: &str = "/.well-known/authzen-configuration";

/// Answers AuthZEN requests from the same roles, model and policy as the gRPC API.
pub struct AuthZen {
    roles: RoleLookup,
    models: Arc<Models>,
    tenants: Arc<dyn TenantReads>,
    authz: Option<Arc<Authz>>,
    application_id: TenantId,
    callers: Callers,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AuthZen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthZen").finish_non_exhaustive()
    }
}

/// Who may ask.
#[derive(Debug, Clone)]
pub struct Callers {
    /// The API keys.
    pub keys: Keys,
    /// With no key file: whether anyone who reaches the port is answered (a loopback
    /// HTTP listener, or `--insecure-no-auth`).
    pub open: bool,
    /// Whether the HTTP listener speaks TLS (the scheme of the metadata's URLs).
    pub tls: bool,
    /// Requests per second each caller may make (`--rate-limit`, as on gRPC).
    pub rate_per_second: Option<std::num::NonZeroU32>,
}

/// What AuthZEN answers from.
#[derive(Clone)]
pub struct Sources {
    /// One user's roles (the cache, else the store).
    pub roles: RoleLookup,
    /// The model.
    pub models: Arc<Models>,
    /// Tenants and their members (the searches).
    pub tenants: Arc<dyn TenantReads>,
    /// The proxy policy, for `route` resources.
    pub authz: Option<Arc<Authz>>,
}

impl AuthZen {
    /// Answers from `sources`, to `callers`.
    pub fn new(
        sources: Sources,
        application_id: TenantId,
        callers: Callers,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let Sources { roles, models, tenants, authz } = sources;
        let limiter =
            callers.rate_per_second.map(|rate| RateLimiter::keyed(Quota::per_second(rate)));
        Arc::new(Self { roles, models, tenants, authz, application_id, callers, limiter, metrics })
    }

    /// The routes, behind the caller check, request-id echo and metrics.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(EVALUATION, post(evaluation))
            .route(EVALUATIONS, post(evaluations))
            .route(SEARCH_SUBJECT, post(search_subject))
            .route(SEARCH_RESOURCE, post(search_resource))
            .route(SEARCH_ACTION, post(search_action))
            .route(METADATA, get(metadata))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .route_layer(middleware::from_fn_with_state(self.clone(), guard))
            .with_state(self.clone())
    }

    /// Whether the caller of a request with `headers` (on a connection whose client
    /// certificate is `peer`) may ask, and has not asked more often than `--rate-limit`.
    fn admit(&self, headers: &HeaderMap, peer: Option<&PeerIdentity>) -> Result<(), Refused> {
        let name = self.caller(headers, peer)?;
        match &self.limiter {
            Some(limiter) if limiter.check_key(&name).is_err() => Err(Refused::TooMany(name)),
            _ => Ok(()),
        }
    }

    /// The name of the caller, when it may ask.
    fn caller(&self, headers: &HeaderMap, peer: Option<&PeerIdentity>) -> Result<String, Refused> {
        if !self.callers.keys.enabled() {
            return match self.callers.open {
                true => Ok(Caller::anonymous().name),
                false => Err(Refused::Unauthenticated(
                    "AuthZEN answers no one on a non-loopback HTTP listener without API keys \
                     (--api-keys-file)",
                )),
            };
        }
        let ring = self.callers.keys.current();
        let caller = match (bearer(headers), peer.filter(|peer| !peer.is_empty())) {
            (Some(secret), _) => {
                ring.authenticate(secret).ok_or(Refused::Unauthenticated("unknown API key"))?
            }
            (None, Some(peer)) => ring.certificate(peer).ok_or(Refused::Unauthenticated(
                "client certificate is not listed in the API keys file",
            ))?,
            (None, None) => {
                return Err(Refused::Unauthenticated(
                    "missing credentials: send `authorization: Bearer <key>`",
                ));
            }
        };
        match caller.may(Scope::Check) {
            true => Ok(caller.name),
            false => Err(Refused::LacksScope(caller.name)),
        }
    }
}

/// A caller not answered.
#[derive(Debug)]
enum Refused {
    /// No key, or one we do not know: 401, and why.
    Unauthenticated(&'static str),
    /// This caller's key lacks the `check` scope: 403.
    LacksScope(String),
    /// This caller is past `--rate-limit`: 429.
    TooMany(String),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Unauthenticated(why) => {
                let challenge = [(header::WWW_AUTHENTICATE, "Bearer")];
                (StatusCode::UNAUTHORIZED, challenge, format!("{why}\n")).into_response()
            }
            Refused::LacksScope(name) => {
                let message = format!("caller {name} lacks the check scope\n");
                (StatusCode::FORBIDDEN, message).into_response()
            }
            Refused::TooMany(name) => {
                let message = format!("rate limit exceeded for caller {name}\n");
                (StatusCode::TOO_MANY_REQUESTS, message).into_response()
            }
        }
    }
}

/// The secret of an `authorization: Bearer <secret>` header (only one may be sent).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else { return None };
    let (scheme, secret) = value.to_str().ok()?.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| secret.trim()).filter(|s| !s.is_empty())
}

/// Admits the caller (not for the metadata, which is public like the JWK Set), echoes
/// `X-Request-ID`, and counts the request.
async fn guard(State(authzen): State<Arc<AuthZen>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = match request.uri().path() {
        EVALUATION => EVALUATION,
        EVALUATIONS => EVALUATIONS,
        SEARCH_SUBJECT => SEARCH_SUBJECT,
        SEARCH_RESOURCE => SEARCH_RESOURCE,
        SEARCH_ACTION => SEARCH_ACTION,
        _ => METADATA,
    };
    let request_id = request.headers().get("x-request-id").cloned();
    let peer = request.extensions().get::<PeerIdentity>();
    let admitted = match path {
        METADATA => Ok(()),
        _ => authzen.admit(request.headers(), peer),
    };
    let mut response = match admitted {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    };
    if let Some(id) = request_id {
        response.headers_mut().insert("x-request-id", id);
    }
    authzen.metrics.http_request(path, response.status(), started.elapsed());
    response
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum Failure {
    /// 400: the request is malformed.
    Bad(String),
    /// 503: no answer can be proven current now.
    Unavailable(String),
    /// 500: a fault of ours (logged, never detailed).
    Internal,
}

impl From<Bad> for Failure {
    fn from(bad: Bad) -> Self {
        Failure::Bad(bad.0)
    }
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument { .. } => Failure::Bad(err.to_string()),
            Error::Unavailable(why) | Error::OutOfRange(why) | Error::FailedPrecondition(why) => {
                Failure::Unavailable(why)
            }
            Error::NotFound(_) | Error::AlreadyExists(_) | Error::Internal(_) => {
                tracing::error!(%err, "AuthZEN request failed");
                Failure::Internal
            }
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Failure::Bad(message) => (StatusCode::BAD_REQUEST, message),
            Failure::Unavailable(message) => (StatusCode::SERVICE_UNAVAILABLE, message),
            Failure::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal error".into()),
        };
        (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message + "\n")
            .into_response()
    }
}

/// `value` as a JSON body.
fn to_json(value: &impl serde::Serialize) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(value).map_err(|err| {
        tracing::error!(%err, "AuthZEN answer did not serialize");
        Failure::Internal
    })
}

/// The JSON request body, or the 400 that says what is wrong with it.
fn json_body(headers: &HeaderMap, body: &[u8]) -> Result<Object, Failure> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    if !wire::is_json(content_type) {
        return Err(Failure::Bad("content-type must be application/json".into()));
    }
    Ok(wire::body(body)?)
}

fn reply(answer: Result<Vec<u8>, Failure>) -> Response {
    match answer {
        Ok(body) => {
            let json = HeaderValue::from_static("application/json");
            (StatusCode::OK, [(header::CONTENT_TYPE, json)], body).into_response()
        }
        Err(failure) => failure.into_response(),
    }
}

macro_rules! endpoint {
    ($name:ident, $method:ident) => {
        async fn $name(
            State(authzen): State<Arc<AuthZen>>,
            headers: HeaderMap,
            body: Bytes,
        ) -> Response {
            let answer = match json_body(&headers, &body) {
                Ok(body) => authzen.$method(&body).await,
                Err(failure) => Err(failure),
            };
            reply(answer)
        }
    };
}

endpoint!(evaluation, evaluation);
endpoint!(evaluations, evaluations);
endpoint!(search_subject, search_subjects);
endpoint!(search_resource, search_resources);
endpoint!(search_action, search_actions);

/// `GET /.well-known/authzen-configuration`: the endpoints, under the base URL the
/// caller reached (its `Host`, checked to be a host and port; the scheme is the HTTP
/// listener's).
async fn metadata(State(authzen): State<Arc<AuthZen>>, headers: HeaderMap) -> Response {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if crate::authz::canonical::host(host).is_err() {
        return Failure::Bad("the Host header is not a host name and port".into()).into_response();
    }
    let base = format!("{}://{host}", if authzen.callers.tls { "https" } else { "http" });
    let url = |path: &str| format!("{base}{path}");
    let document = serde_json::json!({
        "policy_decision_point": base,
        "access_evaluation_endpoint": url(EVALUATION),
        "access_evaluations_endpoint": url(EVALUATIONS),
        "search_subject_endpoint": url(SEARCH_SUBJECT),
        "search_resource_endpoint": url(SEARCH_RESOURCE),
        "search_action_endpoint": url(SEARCH_ACTION),
    });
    reply(to_json(&document))
}
