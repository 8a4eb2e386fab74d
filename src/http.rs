//! The HTTP port (axum): the JWK Set for offline verifiers, probes, and metrics.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use crate::{metrics::Metrics, store::Store, token::KeySet};

/// How long verifiers may cache the JWK Set. Rotation: publish a new key at least this
/// long before it starts signing.
pub const JWKS_MAX_AGE_SECS: u32 = 300;

#[derive(Clone)]
struct AppState {
    keys: Arc<KeySet>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
}

/// `GET /.well-known/jwks.json`, `GET /healthz` (process alive, never touches the
/// database), `GET /readyz` (the store answers, migrations applied, not shutting down),
/// `GET /metrics` (Prometheus text format).
pub fn router(
    keys: Arc<KeySet>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { keys, store, metrics, draining })
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
        state.keys.jwks_json().to_owned(),
    )
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match state.store.revision().await {
        Ok(_) => (StatusCode::OK, "ready\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n"),
    }
}
