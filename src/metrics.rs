//! Prometheus metrics at `GET /metrics`, and the gRPC layer that records every request
//! (duration by method and status code, a request id, one debug line per request).
//!
//! Names follow Prometheus conventions: `rolecheck_…_seconds` histograms, `_total`
//! counters. Recording a Check costs one histogram observation (a few atomic adds).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tracing::Instrument;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    path: &'static str,
    status: &'static str,
}

/// Labels of store query durations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// The store operation.
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    alg: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 25 µs .. ~3.3 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(25e-6, 2.0, 18))
}

/// Every metric rolecheck exports.
pub struct Metrics {
    registry: Registry,
    requests: HistogramFamily<RequestLabels>,
    http: HistogramFamily<HttpLabels>,
    store: HistogramFamily<StoreLabels>,
    tokens: Family<TokenLabels, Counter>,
    /// API key file reloads that failed and kept the keys in force.
    pub key_reload_failures: Counter,
    /// Authorization policy reloads that failed and kept the policy in force.
    pub policy_reload_failures: Counter,
    /// Proxy authorization decisions by outcome (allowed, unauthenticated, denied,
    /// unavailable).
    pub authz_decisions: Family<DecisionLabels, Counter>,
    /// Cache hits (answered from memory).
    pub cache_hits: Counter,
    /// Cache misses (loaded from the store).
    pub cache_misses: Counter,
    cache_entries: Gauge,
    cache_loads: Gauge,
    applied_revision: Gauge,
    sync_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    cache_trusted: Gauge,
    reconnects: Gauge,
    /// Called at each scrape for the gauges (registered by the server, so these metrics
    /// import neither the cache nor the coherence state they describe).
    sample: OnceLock<Box<dyn Fn() -> Sample + Send + Sync>>,
}

/// The scrape-time gauges, as the server reads them from the coherence state and cache.
#[derive(Debug, Default)]
pub struct Sample {
    /// The highest revision applied.
    pub applied_revision: u64,
    /// Time since the feed last proved it was current.
    pub sync_age: std::time::Duration,
    /// Whether cached answers may be served.
    pub trusted: bool,
    /// How many times the feed was lost.
    pub reconnects: u64,
    /// Users in the cache, and cache loads in flight (none without a cache).
    pub cache: Option<(u64, usize)>,
}

/// The outcome label of a proxy authorization decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allowed`, `unauthenticated`, `denied` or `unavailable`.
    pub decision: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    ///
    /// One piece, past 80 lines: it is the list of every metric with its help text, read
    /// top to bottom as the `/metrics` page reads; split, the list would be scattered.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("rolecheck");
        let requests = HistogramFamily::<RequestLabels>::new_with_constructor(latency_histogram);
        let store = HistogramFamily::<StoreLabels>::new_with_constructor(latency_histogram);
        let http = HistogramFamily::<HttpLabels>::new_with_constructor(latency_histogram);
        let tokens = Family::<TokenLabels, Counter>::default();
        let (cache_hits, cache_misses) = (Counter::default(), Counter::default());
        let key_reload_failures = Counter::default();
        let policy_reload_failures = Counter::default();
        registry.register(
            "authz_policy_reload_failures",
            "Authorization policy reloads refused (unreadable or invalid); the policy in force was kept",
            policy_reload_failures.clone(),
        );
        let authz_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "authz_decisions",
            "Proxy authorization decisions (ext_authz and forward-auth), by outcome",
            authz_decisions.clone(),
        );
        registry.register(
            "api_keys_reload_failures",
            "API key file reloads refused (unreadable, unparsable, empty); the keys in force were kept",
            key_reload_failures.clone(),
        );

        let (cache_entries, applied_revision, cache_trusted, reconnects) =
            (Gauge::default(), Gauge::default(), Gauge::default(), Gauge::default());
        let sync_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "grpc_request_duration_seconds",
            "gRPC requests by method and status code",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP API requests (AuthZEN) by path and status code",
            http.clone(),
        );
        registry.register(
            "store_query_duration_seconds",
            "Store operations by kind",
            store.clone(),
        );
        registry.register("tokens_issued", "Access tokens minted, by algorithm", tokens.clone());
        registry.register("cache_hits", "Checks answered from the cache", cache_hits.clone());
        registry.register("cache_misses", "Cache loads from the store", cache_misses.clone());
        registry.register("cache_entries", "Users in the cache", cache_entries.clone());
        let cache_loads = Gauge::default();
        registry.register(
            "cache_loads_in_flight",
            "Cache loads from the store now in flight (0 when reads stop)",
            cache_loads.clone(),
        );
        registry.register(
            "applied_revision",
            "Highest revision this replica has applied",
            applied_revision.clone(),
        );
        registry.register(
            "coherence_sync_age_seconds",
            "Replica lag bound: time since the change feed last proved it was current",
            sync_age.clone(),
        );
        registry.register(
            "cache_trusted",
            "1 while cached answers are served, 0 while blind",
            cache_trusted.clone(),
        );
        registry.register(
            "listener_reconnects",
            "Times the change listener lost its connection (closed, or silent past the lease)",
            reconnects.clone(),
        );
        Arc::new(Self {
            registry,
            requests,
            http,
            store,
            tokens,
            key_reload_failures,
            policy_reload_failures,
            authz_decisions,
            cache_hits,
            cache_misses,
            cache_entries,
            cache_loads,
            applied_revision,
            sync_age,
            cache_trusted,
            reconnects,
            sample: OnceLock::new(),
        })
    }

    /// Records an HTTP API request (`path` one of a fixed set, so the labels stay
    /// bounded) with its status.
    pub fn http_request(
        &self,
        path: &'static str,
        status: http::StatusCode,
        took: std::time::Duration,
    ) {
        let status = match status.as_u16() {
            200 => "200",
            400 => "400",
            401 => "401",
            403 => "403",
            404 => "404",
            405 => "405",
            413 => "413",
            429 => "429",
            500 => "500",
            503 => "503",
            _ => "other",
        };
        self.http.get_or_create(&HttpLabels { path, status }).observe(took.as_secs_f64());
    }

    /// Where the scrape-time gauges come from: `sample` is called at each scrape.
    pub fn observe(&self, sample: impl Fn() -> Sample + Send + Sync + 'static) {
        let _ = self.sample.set(Box::new(sample));
    }

    /// Records one store operation.
    pub fn store_query(&self, operation: &'static str, took: std::time::Duration) {
        self.store.get_or_create(&StoreLabels { operation }).observe(took.as_secs_f64());
    }

    /// Counts one minted token.
    pub fn token_issued(&self, alg: &str) {
        self.tokens.get_or_create(&TokenLabels { alg: alg.to_owned() }).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        if let Some(sample) = self.sample.get() {
            let sample = sample();
            self.applied_revision.set(sample.applied_revision as i64);
            self.sync_age.set(sample.sync_age.as_secs_f64());
            self.cache_trusted.set(i64::from(sample.trusted));
            self.reconnects.set(sample.reconnects as i64);
            if let Some((entries, loads)) = sample.cache {
                self.cache_entries.set(entries as i64);
                self.cache_loads.set(loads as i64);
            }
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The method label: a method the server serves (one of the auth layer's rules), else
/// `unknown`, so no request, authenticated or not, can add a label value.
fn method_label(path: &str) -> &'static str {
    crate::auth::rule(path).map_or("unknown", |(known, _)| known.trim_start_matches('/'))
}

/// The code label: one of the seventeen gRPC codes.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Records each request's duration and status, under a span with its request id
/// (`x-request-id` when the caller sends one).
#[derive(Clone, Debug)]
pub struct RequestLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RequestLayer {
    type Service = RequestMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics { inner, metrics: self.0.clone() }
    }
}

/// The service [`RequestLayer`] produces.
#[derive(Clone, Debug)]
pub struct RequestMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for RequestMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let method = method_label(request.uri().path());
        // The request id and span cost something only when debug logging is on.
        let span = if tracing::enabled!(tracing::Level::DEBUG) {
            let request_id = request
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
                .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_owned);
            tracing::debug_span!("request", request_id = %request_id, method = %method)
        } else {
            tracing::Span::none()
        };
        let response = self.inner.call(request);
        let metrics = self.metrics.clone();
        Box::pin(
            async move {
                // A call dropped before it answers (its caller went away: a deadline, a
                // reset stream, a closed connection) is counted as `Cancelled`.
                let mut unanswered = Unanswered { metrics: Some(metrics), method, started };
                let response = response.await;
                let Some(metrics) = unanswered.metrics.take() else { return response };
                let response = response?;
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                let elapsed = started.elapsed();
                metrics
                    .requests
                    .get_or_create(&RequestLabels { method, code: code_label(code) })
                    .observe(elapsed.as_secs_f64());
                tracing::debug!(code = ?code, micros = elapsed.as_micros() as u64, "request");
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// Records a call as `Cancelled` if it is dropped before it answers.
struct Unanswered {
    metrics: Option<Arc<Metrics>>,
    method: &'static str,
    started: Instant,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(metrics) = self.metrics.take() {
            metrics
                .requests
                .get_or_create(&RequestLabels { method: self.method, code: "Cancelled" })
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}
