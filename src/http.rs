//! The HTTP port (axum): the JWK Set for offline verifiers, probes, and metrics.
//!
//! The port is served by hyper's HTTP/1 connection builder, so its built-in limits apply:
//! a client must send a request's headers within [`HEADER_READ_TIMEOUT`], a connection
//! lives at most [`CONNECTION_LIFETIME`], and at most [`MAX_CONNECTIONS`] are open at
//! once (past that a new connection is closed at once). No handler touches the database:
//! `/readyz` answers from the state the health task keeps.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use crate::{metrics::Metrics, token::KeySet};

/// Longest a client may take to send a request's headers (slow clients hold no slot).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one HTTP connection is kept, however busy.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// Most HTTP connections open at once.
pub const MAX_CONNECTIONS: usize = 256;

/// How long verifiers may cache the JWK Set. Rotation: publish a new key at least this
/// long before it starts signing.
pub const JWKS_MAX_AGE_SECS: u32 = 300;

#[derive(Clone)]
struct AppState {
    keys: Arc<KeySet>,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
}

/// `GET /.well-known/jwks.json`, `GET /healthz` (process alive, never touches the
/// database), `GET /readyz` (the store answered the health task's last probe, which also
/// drives gRPC health, and the server is not shutting down), `GET /metrics` (Prometheus
/// text format).
pub fn router(
    keys: Arc<KeySet>,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { keys, ready, metrics, draining })
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.render(),
    )
}

async fn jwks(State(state): State<AppState>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/jwk-set+json".to_owned()),
            (header::CACHE_CONTROL, format!("public, max-age={JWKS_MAX_AGE_SECS}")),
        ],
        state.keys.jwks_json().to_string(),
    )
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match state.ready.load(Ordering::SeqCst) {
        true => (StatusCode::OK, "ready\n"),
        false => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n"),
    }
}

/// The client certificate a connection presented, once verified.
pub trait ClientCertificate {
    /// Its identity; `None` on plain TCP.
    fn client_certificate(&self) -> Option<crate::auth::PeerIdentity>;
}

impl ClientCertificate for tokio::net::TcpStream {
    fn client_certificate(&self) -> Option<crate::auth::PeerIdentity> {
        None
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open requests
/// finish for up to `grace`.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    L: axum::serve::Listener,
    L::Io: ClientCertificate,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let io = tokio::select! {
            (io, _) = listener.accept() => io,
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(limit = MAX_CONNECTIONS, "HTTP connection refused: at the limit");
            continue;
        };
        // A verified client certificate reaches the handlers as an extension (forward-auth
        // accepts the proxy's, see `crate::authz::trust`).
        let service = match io.client_certificate() {
            Some(peer) => router.clone().layer(axum::Extension(peer)),
            None => router.clone(),
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(slot);
        });
    }
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("HTTP connections did not finish in time");
    }
}
