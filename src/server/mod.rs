//! The server: [`Server::bind`] assembles the application from its configuration
//! (listeners, credentials, keys, the store, the cache, the proxy policy) and returns it,
//! ready to serve; [`Server::run`] (in `serve`) serves it and, on shutdown, stops it in
//! order, its background tasks owned by one supervisor (`supervisor`), each task in a
//! file of its own (`health`, `upkeep`; the follower's in `crate::follower`).

mod health;
mod open;
mod serve;
mod signal;
mod supervisor;
mod upkeep;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;

pub use open::migrate;
pub use signal::shutdown_signal;

use crate::{
    auth::Keys,
    authz::Authz,
    authz::trust::{Exposure, ProxyTrust},
    cache::{
        CacheOptions, CachedStore, RoleLookup,
        model::{ModelFeed, Models},
    },
    coherence::{Coherence, Invalidate, NoCache},
    config::Config,
    domain::TenantId,
    error::Result,
    follower::UpstreamStore,
    listen::GrpcListener,
    metrics::Metrics,
    store::{MeasuredStore, Store},
    tls::Tls,
    token::{KeySet, TokenSettings, Tokens},
};

/// A bound, ready-to-serve rolecheck: the listeners are open, the store is open and
/// migrated, and everything is wired; nothing runs until [`Server::run`].
pub struct Server {
    /// The listeners, taken when serving starts.
    listener: Option<GrpcListener>,
    tls: Option<Arc<Tls>>,
    keys: Keys,
    http_listener: Option<TcpListener>,
    store: Store,
    cache: Option<Arc<CachedStore>>,
    authz: Option<Arc<Authz>>,
    upstream: Option<UpstreamStore>,
    tokens: Arc<Tokens>,
    metrics: Arc<Metrics>,
    coherence: Arc<Coherence>,
    /// The model checks are judged by.
    models: Arc<Models>,
    /// The store's change feed and what it invalidates, applied once `run` starts (a
    /// server bound and dropped unrun leaves no task holding the store).
    feed: Option<(crate::store::Feed, Arc<dyn Invalidate>)>,
    config: Config,
    application_id: TenantId,
}

impl Server {
    /// Binds `config.listen` (port 0 picks a free port), opens the store, applies
    /// migrations unless `--no-migrate`, and wraps the store in the cache. Every setting
    /// is checked before anything is opened that a refusal would have to close.
    pub async fn bind(config: Config) -> Result<Self> {
        let application_id = TenantId::parse("application_id", &config.application_id)?;
        config.validate()?;
        let metrics = Metrics::new();
        let callers = callers(&config, &metrics)?;
        // The policy is checked before the store is opened: a refusal leaves nothing open.
        let exposure = Exposure::of(&config, callers.enabled());
        if let Some(path) = &config.authz_policy {
            crate::authz::preflight(path, exposure)?;
        }
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Tls::load(cert, key, config.tls_client_ca.as_deref())?),
            _ => None,
        };
        let listener = GrpcListener::bind(&config.listen, config.unix_socket_mode).await?;
        let http_listener = bind(config.http_listen).await?;
        let upstream = match &config.upstream {
            None => None,
            Some(url) => Some(open::follow(&config, url)?),
        };
        let tokens = tokens(&config, &application_id, upstream.as_ref(), &metrics).await?;
        let store = match &upstream {
            Some(upstream) => Store::new(Arc::new(upstream.clone())),
            None => open::open_store(&config, &application_id, !config.no_migrate).await?,
        };
        let record: crate::store::measured::Record = {
            let metrics = metrics.clone();
            Arc::new(move |operation, took| metrics.store_query(operation, took))
        };
        let store = MeasuredStore::wrap(store, &record, config.db_query_timeout);
        let feed = store.backend.subscribe().await?;
        let coherence =
            Coherence::with_fault_delay(config.coherence_lease, config.fault_delay_feed);
        let (store, cache, sink) = cached(store, &config, &coherence, &metrics);
        let models = Models::new(store.tenants.clone());
        let sink = Arc::new(ModelFeed { models: models.clone(), inner: sink });
        let authz = match &config.authz_policy {
            Some(path) => Some(Authz::load(
                path,
                tokens.keys().clone(),
                (ProxyTrust::new(callers.clone(), config.authz_private_listener), exposure),
                (RoleLookup::new(store.roles.clone(), cache.clone()), models.clone()),
                application_id.clone(),
                &metrics,
            )?),
            None => None,
        };
        Ok(Self {
            listener: Some(listener),
            tls,
            keys: callers,
            http_listener: Some(http_listener),
            store,
            cache,
            authz,
            upstream,
            tokens,
            metrics,
            coherence,
            models,
            feed: Some((feed, sink)),
            config,
            application_id,
        })
    }

    /// The TCP address the gRPC listener is bound to (unspecified for a unix socket).
    pub fn local_addr(&self) -> SocketAddr {
        let bound = self.listener.as_ref().and_then(GrpcListener::local_addr);
        bound.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The address the HTTP listener (JWKS, probes) is bound to.
    pub fn http_addr(&self) -> SocketAddr {
        let bound = self.http_listener.as_ref().and_then(|listener| listener.local_addr().ok());
        bound.unwrap_or(self.config.http_listen)
    }
}

/// Binds the HTTP listener.
async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| crate::listen::cannot_listen(&addr, "--http-listen", &err))
}

/// The scrape-time gauges from `coherence` and `cache`. The cache is held weakly: its
/// store holds the metrics, and a cycle would keep the store (and an embedded file's
/// lock) alive after the server is gone.
fn sample(
    coherence: Arc<Coherence>,
    cache: Option<std::sync::Weak<CachedStore>>,
) -> impl Fn() -> crate::metrics::Sample + Send + Sync + 'static {
    move || crate::metrics::Sample {
        applied_revision: coherence.applied(),
        sync_age: coherence.sync_age(),
        trusted: coherence.is_current(),
        reconnects: coherence.reconnects(),
        cache: cache
            .as_ref()
            .and_then(std::sync::Weak::upgrade)
            .map(|cache| (cache.entry_count(), cache.loads_in_flight())),
    }
}

/// The callers' credentials (`--api-keys-file`), with the warnings an operator should see.
fn callers(config: &Config, metrics: &Metrics) -> Result<Keys> {
    let callers = Keys::load(config.api_keys_file.as_deref(), metrics.key_reload_failures.clone())?;
    if let Some(warning) = config.without_keys()? {
        tracing::warn!(listen = %config.listen, "{warning}");
    }
    for warning in callers.current().warnings(config.tls_client_ca.is_some()) {
        tracing::warn!("api keys file: {warning}");
    }
    Ok(callers)
}

/// The token minter: signing with this server's key, or, on a follower, verifying with
/// the upstream's published keys (Issue is relayed to the upstream).
async fn tokens(
    config: &Config,
    application_id: &TenantId,
    upstream: Option<&UpstreamStore>,
    metrics: &Arc<Metrics>,
) -> Result<Arc<Tokens>> {
    let keys = match upstream {
        Some(upstream) => {
            let jwks = open::retry_at_start(config, || upstream.keys()).await?;
            Arc::new(KeySet::published(jwks))
        }
        None => {
            let generated_key =
                config.embedded_store().then(|| config.data_dir.join("signing-key.pem"));
            Arc::new(KeySet::load(&config.signing_key, generated_key.as_deref())?)
        }
    };
    match (keys.signer(), upstream) {
        (_, Some(_)) => tracing::info!("following an upstream: Issue is relayed to it"),
        (Some(key), None) => {
            tracing::info!(kid = key.kid(), alg = ?key.algorithm(), "signing tokens")
        }
        (None, None) => tracing::warn!("no signing key configured: Issue is refused"),
    }
    Ok(Arc::new(Tokens::new(
        keys,
        metrics.clone(),
        TokenSettings {
            issuer: config.issuer.clone(),
            audience: config.audience.clone().unwrap_or_else(|| application_id.to_string()),
            default_ttl: config.token_ttl.min(config.max_token_ttl),
            max_ttl: config.max_token_ttl,
            max_bytes: config.max_token_bytes,
        },
    )))
}

/// `store` behind the cache (unless `--cache-capacity 0`), the cache, and what the feed
/// invalidates; the metrics sample both at scrape time.
fn cached(
    store: Store,
    config: &Config,
    coherence: &Arc<Coherence>,
    metrics: &Arc<Metrics>,
) -> (Store, Option<Arc<CachedStore>>, Arc<dyn Invalidate>) {
    if config.cache_capacity == 0 {
        metrics.observe(sample(coherence.clone(), None));
        return (store, None, Arc::new(NoCache));
    }
    let options = CacheOptions {
        capacity: config.cache_capacity,
        ttl: config.cache_ttl,
        min_revision_wait: config.min_revision_wait,
        hits: metrics.cache_hits.clone(),
        misses: metrics.cache_misses.clone(),
    };
    let (store, cache) = CachedStore::wrap(store, &options, coherence.clone());
    metrics.observe(sample(coherence.clone(), Some(Arc::downgrade(&cache))));
    (store, Some(cache.clone()), cache)
}
