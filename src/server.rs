//! Bind, then serve: the gRPC services, health, reflection, and graceful shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::TcpIncoming;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{RoleCheckApi, TenantsApi},
    auth::{AuthLayer, Keys},
    authz::trust::{Exposure, ProxyTrust},
    authz::{
        Authz,
        envoy::{AuthorizationServer, EnvoyAuthz},
    },
    cache::{CacheOptions, CachedStore, RoleLookup},
    codec::FramingFaultLayer,
    coherence::{Coherence, Invalidate, NoCache},
    config::Config,
    domain::TenantId,
    error::{Error, Result},
    follower::{UpstreamOptions, UpstreamStore},
    listen::GrpcListener,
    metrics::{Metrics, RequestLayer},
    pb::{self, role_check_server::RoleCheckServer, tenants_server::TenantsServer},
    store::{self, HistoryLog, MeasuredStore, Store, StoreOptions, TenantReads},
    tls::{Port, Tls},
    token::{KeySet, TokenSettings, Tokens},
};

/// TCP keepalive probes unanswered before the kernel drops a gRPC connection.
const KEEPALIVE_RETRIES: u32 = 3;

/// How often the health service re-checks the store while serving.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How often it re-checks while the store answers but the feed is not current yet (a
/// follower catching up), so it is ready soon after it can be.
const HEALTH_RETRY: Duration = Duration::from_millis(100);

/// A bound, ready-to-serve rolecheck: the listener is open and the store is migrated.
pub struct Server {
    listener: GrpcListener,
    tls: Option<Arc<Tls>>,
    keys: Keys,
    http_listener: TcpListener,
    store: Store,
    cache: Option<Arc<CachedStore>>,
    authz: Option<Arc<Authz>>,
    upstream: Option<UpstreamStore>,
    tokens: Arc<Tokens>,
    metrics: Arc<Metrics>,
    coherence: Arc<Coherence>,
    /// The store's change feed and what it invalidates, applied once `run` starts (a
    /// server bound and dropped unrun leaves no task holding the store).
    feed: Option<(crate::store::Feed, Arc<dyn Invalidate>)>,
    config: Config,
    application_id: TenantId,
}

impl Server {
    /// Binds `config.listen` (port 0 picks a free port), opens the store, applies
    /// migrations unless `--no-migrate`, and wraps the store in the cache.
    pub async fn bind(config: Config) -> Result<Self> {
        let application_id = TenantId::parse("application_id", &config.application_id)?;
        config.validate()?;
        let metrics = Metrics::new();
        let callers =
            Keys::load(config.api_keys_file.as_deref(), metrics.key_reload_failures.clone())?;
        if let Some(warning) = config.without_keys()? {
            tracing::warn!(listen = %config.listen, "{warning}");
        }
        for warning in callers.current().warnings(config.tls_client_ca.is_some()) {
            tracing::warn!("api keys file: {warning}");
        }
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
            Some(url) => Some(follow(&config, url)?),
        };
        let keys = match &upstream {
            Some(upstream) => {
                let jwks = retry_at_start(&config, || upstream.keys()).await?;
                Arc::new(KeySet::published(jwks))
            }
            None => {
                let generated_key =
                    config.embedded_store().then(|| config.data_dir.join("signing-key.pem"));
                Arc::new(KeySet::load(&config.signing_key, generated_key.as_deref())?)
            }
        };
        match (keys.signer(), &upstream) {
            (_, Some(_)) => tracing::info!("following an upstream: Issue is relayed to it"),
            (Some(key), None) => {
                tracing::info!(kid = key.kid(), alg = ?key.algorithm(), "signing tokens")
            }
            (None, None) => tracing::warn!("no signing key configured: Issue is refused"),
        }
        let tokens = Arc::new(Tokens::new(
            keys,
            metrics.clone(),
            TokenSettings {
                issuer: config.issuer.clone(),
                audience: config.audience.clone().unwrap_or_else(|| application_id.to_string()),
                default_ttl: config.token_ttl.min(config.max_token_ttl),
                max_ttl: config.max_token_ttl,
                max_bytes: config.max_token_bytes,
            },
        ));
        let store = match &upstream {
            Some(upstream) => Store::new(Arc::new(upstream.clone())),
            None => open_store(&config, &application_id, !config.no_migrate).await?,
        };
        let record: crate::store::measured::Record = {
            let metrics = metrics.clone();
            Arc::new(move |operation, took| metrics.store_query(operation, took))
        };
        let store = MeasuredStore::wrap(store, &record, config.db_query_timeout);
        let feed = store.backend.subscribe().await?;
        let coherence =
            Coherence::with_fault_delay(config.coherence_lease, config.fault_delay_feed);
        let (store, cache, sink): (Store, _, Arc<dyn Invalidate>) = if config.cache_capacity == 0 {
            metrics.observe(sample(coherence.clone(), None));
            (store, None, Arc::new(NoCache))
        } else {
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
        };
        let authz = match &config.authz_policy {
            Some(path) => Some(Authz::load(
                path,
                tokens.keys().clone(),
                (ProxyTrust::new(callers.clone(), config.authz_private_listener), exposure),
                RoleLookup::new(store.roles.clone(), cache.clone()),
                application_id.clone(),
                &metrics,
            )?),
            None => None,
        };
        Ok(Self {
            listener,
            tls,
            keys: callers,
            http_listener,
            store,
            cache,
            authz,
            upstream,
            tokens,
            metrics,
            coherence,
            feed: Some((feed, sink)),
            config,
            application_id,
        })
    }

    /// The TCP address the gRPC listener is bound to (unspecified for a unix socket).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The address the HTTP listener (JWKS, probes) is bound to.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener.local_addr().unwrap_or(self.config.http_listen)
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight calls
    /// finish, and closes the store's connections.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let http_addr = self.http_addr();
        let feed_task = self.feed.take().map(|(feed, sink)| self.coherence.run(feed, sink));
        let (health, health_service) = tonic_health::server::health_reporter();
        // One probe before serving, so readiness and gRPC health are known from the start.
        // A follower is ready once its feed is connected and caught up, too.
        let feed = self.upstream.is_some().then(|| self.coherence.clone());
        // A follower warms its cache before it is ready (see `crate::follower::warm`).
        let warming = self.upstream.clone().filter(|_| self.config.warm_users > 0);
        let warmed = Arc::new(std::sync::atomic::AtomicBool::new(warming.is_none()));
        let warm_task = warming.map(|upstream| {
            let roles = RoleLookup::new(self.store.roles.clone(), self.cache.clone());
            let (coherence, warmed) = (self.coherence.clone(), warmed.clone());
            let (limit, within) = (self.config.warm_users, self.config.warm_timeout);
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let done =
                    crate::follower::warm(&upstream, &roles, &coherence, limit, within).await;
                let elapsed = started.elapsed();
                tracing::info!(listed = done.listed, loaded = done.loaded, ?elapsed, "warm start");
                warmed.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        });
        let keys_task = self.upstream.clone().map(|upstream| {
            tokio::spawn(crate::follower::follow_keys(
                upstream,
                self.tokens.keys().clone(),
                self.coherence.clone(),
            ))
        });
        let initially = self.store.tenants.revision().await.is_ok()
            && feed.as_ref().is_none_or(|coherence| coherence.is_current())
            && warmed.load(std::sync::atomic::Ordering::SeqCst);
        let store_ready = Arc::new(std::sync::atomic::AtomicBool::new(initially));
        let status = if initially { ServingStatus::Serving } else { ServingStatus::NotServing };
        for service in HEALTH_SERVICES {
            health.set_service_status(service, status).await;
        }
        let health_task = tokio::spawn(watch_health(
            health.clone(),
            self.store.tenants.clone(),
            feed,
            warmed,
            store_ready.clone(),
        ));
        let prune_task =
            tokio::spawn(prune_history(self.store.history.clone(), self.config.history_retention));

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|err| Error::Internal(Box::new(err)))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|err| Error::Internal(Box::new(err)))?;

        let max = self.config.max_message_bytes;
        let issuing: Arc<dyn crate::api::Issuing> = match &self.upstream {
            Some(upstream) => Arc::new(upstream.clone()),
            None => Arc::new(crate::api::SignHere {
                tokens: self.tokens.clone(),
                roles: RoleLookup::new(self.store.roles.clone(), self.cache.clone()),
                application_id: self.application_id.clone(),
            }),
        };
        let role_check = RoleCheckApi::new(
            self.store.clone(),
            self.cache.clone(),
            issuing,
            self.application_id.clone(),
            self.coherence.clone(),
            crate::api::WatchLimits::new(
                self.config.max_watch_streams,
                self.config.max_watch_streams_per_caller,
            ),
        );
        let watch_hub = role_check.watch_hub();
        let role_check = RoleCheckServer::new(role_check).max_decoding_message_size(max);
        let tenants =
            TenantsServer::new(TenantsApi::new(self.store.clone())).max_decoding_message_size(max);

        let addr = self.config.listen.to_string();
        let (stop_http, http_stopping) = tokio::sync::oneshot::channel::<()>();
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut http_router = crate::http::router(
            self.tokens.keys().clone(),
            store_ready.clone(),
            self.metrics.clone(),
            draining.clone(),
        );
        if let Some(authz) = &self.authz {
            http_router = http_router.merge(
                axum::Router::new()
                    .route("/authz", axum::routing::any(crate::authz::forward::handle))
                    .with_state(authz.clone()),
            );
        }
        let http_stopped = async {
            let _ = http_stopping.await;
        };
        let grace = self.config.shutdown_grace;
        let http_task = match &self.tls {
            Some(tls) => {
                let incoming = tls.incoming(self.http_listener, Port::Http);
                tokio::spawn(crate::http::serve(incoming, http_router, http_stopped, grace))
            }
            None => tokio::spawn(crate::http::serve(
                self.http_listener,
                http_router,
                http_stopped,
                grace,
            )),
        };
        let tls_watch = self.tls.as_ref().map(|tls| tls.watch(Duration::from_secs(2)));
        if let Some(path) = &self.config.pid_file {
            std::fs::write(path, format!("{}\n", std::process::id())).map_err(|err| {
                Error::FailedPrecondition(format!(
                    "cannot write --pid-file {}: {err}",
                    path.display()
                ))
            })?;
        }
        tracing::info!(%http_addr, "serving HTTP");
        match self.listener.local_addr() {
            Some(addr) => tracing::info!(%addr, "serving gRPC"),
            None => tracing::info!(%addr, "serving gRPC"),
        }
        let key_watch = self.keys.watch(Duration::from_secs(2));
        let policy_watch = self.authz.as_ref().map(|authz| authz.watch(Duration::from_secs(2)));
        let rate = std::num::NonZeroU32::new(self.config.rate_limit);
        let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
        let delay = self.config.shutdown_delay;
        let (drain_flag, health_on_drain) = (draining.clone(), health.clone());
        let shutdown = async move {
            shutdown.await;
            drain_flag.store(true, std::sync::atomic::Ordering::SeqCst);
            health_task.abort();
            for service in HEALTH_SERVICES {
                health_on_drain.set_service_status(service, ServingStatus::NotServing).await;
            }
            if !delay.is_zero() {
                tracing::info!(?delay, "not ready; serving until the delay ends");
                tokio::time::sleep(delay).await;
            }
            watch_hub.close();
            let _ = stopping_tx.send(());
        };
        let router = tonic::transport::Server::builder()
            .timeout(self.config.request_timeout)
            .http2_keepalive_interval(Some(self.config.keepalive_interval))
            .http2_keepalive_timeout(Some(self.config.keepalive_timeout))
            .max_concurrent_streams(self.config.max_concurrent_streams)
            .layer(RequestLayer(self.metrics.clone()))
            .layer(FramingFaultLayer { max_message_bytes: self.config.max_message_bytes })
            .layer(
                AuthLayer::new(self.keys.clone(), rate)
                    .private_authz(self.config.authz_private_listener),
            )
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(role_check)
            .add_service(tenants)
            .add_optional_service(self.authz.clone().map(|authz| {
                AuthorizationServer::new(EnvoyAuthz::new(authz)).max_decoding_message_size(max)
            }));
        let socket_path = match &self.listener {
            GrpcListener::Unix(_, path) => Some(path.clone()),
            GrpcListener::Tcp(_) => None,
        };
        let pid_file = self.config.pid_file.clone();
        let keepalive = self.config.keepalive_interval;
        let serve = async move {
            match (self.listener, &self.tls) {
                (GrpcListener::Tcp(listener), Some(tls)) => {
                    let incoming = tls.incoming_with_keepalive(listener, Port::Grpc, keepalive);
                    router.serve_with_incoming_shutdown(incoming, shutdown).await
                }
                (GrpcListener::Tcp(listener), None) => {
                    let incoming = TcpIncoming::from(listener)
                        .with_nodelay(Some(true))
                        .with_keepalive(Some(keepalive))
                        .with_keepalive_interval(Some(keepalive))
                        .with_keepalive_retries(Some(KEEPALIVE_RETRIES));
                    router.serve_with_incoming_shutdown(incoming, shutdown).await
                }
                (GrpcListener::Unix(listener, _), _) => {
                    let incoming = UnixListenerStream::new(listener);
                    router.serve_with_incoming_shutdown(incoming, shutdown).await
                }
            }
        };
        let grace = self.config.shutdown_grace;
        let served = tokio::select! {
            served = serve => served,
            () = async {
                if stopping.await.is_err() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "drain deadline passed; dropping remaining connections");
                Ok(())
            }
        };
        prune_task.abort();
        for task in [warm_task, keys_task].into_iter().flatten() {
            task.abort();
        }
        for task in [key_watch, policy_watch].into_iter().flatten() {
            task.abort();
        }
        if let Some(task) = tls_watch {
            task.abort();
        }
        for path in [socket_path, pid_file].into_iter().flatten() {
            let _ = std::fs::remove_file(path);
        }
        let _ = stop_http.send(());
        if tokio::time::timeout(grace * 2, http_task).await.is_err() {
            tracing::warn!("HTTP server did not stop in time");
        }
        self.store.backend.close().await;
        if let Some(task) = feed_task {
            task.abort();
        }
        tracing::info!("stopped");
        served.map_err(|err| Error::Internal(Box::new(err)))
    }
}

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

/// How long the change listener may hear nothing before it reconnects: two leases (it
/// hears its own sync every 100 ms, so silence that long is no accident), at least 500 ms.
fn listener_silence(lease: Duration) -> Duration {
    (lease * 2).max(Duration::from_millis(500))
}

/// Applies the migrations and exits: `rolecheck migrate` (creating the Postgres
/// database first with `--create-database`).
pub async fn migrate(args: &crate::config::MigrateArgs) -> Result<()> {
    let config = args.config();
    config.validate()?;
    let application_id = TenantId::parse("application_id", &config.application_id)?;
    if args.create_database {
        // Straight to Postgres: a pooler knows only the databases that exist.
        let direct = config.listen_database_url.as_ref().or(config.database_url.as_ref());
        match direct.filter(|_| !config.embedded_store()) {
            Some(url) => {
                let within = config.db_acquire_timeout.max(config.db_query_timeout);
                let created =
                    retry_at_start(&config, || store::diagnose::create_database(&url.0, within))
                        .await?;
                tracing::info!(created, "the database is there");
            }
            None => tracing::info!("--create-database: the embedded store creates its own file"),
        }
    }
    let store = open_store(&config, &application_id, true).await?;
    store.backend.close().await;
    Ok(())
}

/// The follower's upstream, from the settings (checked by [`Config::validate`]).
fn follow(config: &Config, url: &str) -> Result<UpstreamStore> {
    UpstreamStore::connect(UpstreamOptions {
        url: url.to_owned(),
        key_file: config.upstream_key_file.clone(),
        ca: config.upstream_ca.clone(),
        cert: config.upstream_cert.clone().zip(config.upstream_cert_key.clone()),
        progress: (config.coherence_lease / 10).max(Duration::from_millis(10)),
        silence: config.coherence_lease * 2,
        lease: config.coherence_lease,
        timeout: config.db_query_timeout,
    })
}

/// Retries `call` while it is `UNAVAILABLE`, for `--db-startup-wait`.
async fn retry_at_start<T, F, Fut>(config: &Config, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + config.db_startup_wait;
    let mut backoff = Duration::from_millis(100);
    loop {
        match call().await {
            Err(Error::Unavailable(reason)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(%reason, retry_in = ?backoff, "not reachable yet; retrying (--db-startup-wait)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(Error::Unavailable(reason)) => {
                return Err(Error::Unavailable(format!(
                    "{reason} (gave up after --db-startup-wait {:?})",
                    config.db_startup_wait
                )));
            }
            other => return other,
        }
    }
}

/// Opens the store, retrying an unreachable database for `--db-startup-wait`.
async fn open_store(config: &Config, application_id: &TenantId, migrate: bool) -> Result<Store> {
    let options = StoreOptions {
        max_connections: config.db_max_connections,
        acquire_timeout: config.db_acquire_timeout,
        query_timeout: config.db_query_timeout,
        listener_silence: listener_silence(config.coherence_lease),
        fault_after_commit: config.fault_delay_after_commit,
        transaction_pooling: config.database_pool_mode == "transaction",
        listen_url: config.listen_database_url.as_ref().map(|url| url.0.clone()),
        read_url: config.read_database_url.as_ref().map(|url| url.0.clone()),
    };
    let url = config.database_url.as_ref().map(|url| url.0.as_str());
    retry_at_start(config, || store::open(url, &config.data_dir, application_id, &options, migrate))
        .await
}

/// Drops history older than `retention`, and purges the memberships of deleted tenants,
/// now and then (every tenth of the retention, between 1 s and 1 min). Neither is a write:
/// no revision.
async fn prune_history(store: Arc<dyn HistoryLog>, retention: Duration) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let cutoff = crate::domain::now_millis() - retention.as_millis() as i64;
        match store.prune_history(cutoff).await {
            Ok(0) => {}
            Ok(floor) => tracing::debug!(floor, "pruned history"),
            Err(err) => tracing::debug!(%err, "history pruning skipped"),
        }
        if let Err(err) = store.purge_deleted_tenants().await {
            tracing::warn!(%err, "purging deleted tenants failed; retried on the next round");
        }
        tokio::time::sleep(every).await;
    }
}

/// The services `grpc.health.v1` reports on ("" is the whole server).
const HEALTH_SERVICES: [&str; 3] = ["", "rolecheck.v1.RoleCheck", "rolecheck.v1.Tenants"];

/// Keeps `grpc.health.v1` and `/readyz` (through `ready`) in step with the store:
/// SERVING while it answers (and, on a follower, while its feed is current and once its
/// warm start is over). One probe every [`HEALTH_INTERVAL`] ([`HEALTH_RETRY`] while a
/// feed catches up or the cache warms), however many probes
/// hit the ports.
async fn watch_health(
    health: HealthReporter,
    store: Arc<dyn TenantReads>,
    feed: Option<Arc<Coherence>>,
    warmed: Arc<std::sync::atomic::AtomicBool>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    let services = HEALTH_SERVICES;
    let mut last = None;
    loop {
        let current = feed.as_ref().is_none_or(|coherence| coherence.is_current())
            && warmed.load(std::sync::atomic::Ordering::SeqCst);
        let answered = store.revision().await.is_ok();
        let status = match answered && current {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        ready.store(status == ServingStatus::Serving, std::sync::atomic::Ordering::SeqCst);
        if last != Some(status) {
            tracing::info!(?status, "health");
            for service in services {
                health.set_service_status(service, status).await;
            }
            last = Some(status);
        }
        // Only a feed still catching up (or a cache warming) is re-checked sooner; a store that does not
        // answer is not asked more often than usual.
        let next = if answered && !current { HEALTH_RETRY } else { HEALTH_INTERVAL };
        tokio::time::sleep(next).await;
    }
}

/// Resolves on SIGTERM or Ctrl-C.
///
/// The SIGTERM handler is installed when this is called, not when the future is first
/// polled, so a SIGTERM that arrives before serving starts is still a graceful stop (the
/// default action would kill the process). Call it from within the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let terminate = async {
            match terminate {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(err) => {
                    tracing::error!(%err, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            () = ctrl_c => {},
            () = terminate => {},
        }
        tracing::info!("shutdown requested; draining in-flight calls");
    }
}
