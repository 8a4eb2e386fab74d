//! Serving a bound [`Server`]: its background tasks started under the supervisor, the
//! gRPC and HTTP listeners served, and, on shutdown, everything stopped in order.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::TcpIncoming;
use tonic_health::{ServingStatus, server::HealthReporter};

use super::{
    Server,
    health::{HEALTH_SERVICES, watch_health},
    supervisor::Supervisor,
    upkeep::upkeep,
};
use crate::{
    api::{RoleCheckApi, TenantsApi, WatchHub},
    auth::AuthLayer,
    authz::envoy::{AuthorizationServer, EnvoyAuthz},
    authzen::AuthZen,
    cache::RoleLookup,
    codec::FramingFaultLayer,
    error::{Error, Result},
    listen::GrpcListener,
    metrics::RequestLayer,
    pb::{self, role_check_server::RoleCheckServer, tenants_server::TenantsServer},
    tls::Port,
};

/// TCP keepalive probes unanswered before the kernel drops a gRPC connection.
const KEEPALIVE_RETRIES: u32 = 3;

impl Server {
    /// Serves until `shutdown` resolves, then drains and stops, in this order:
    /// 1. not ready (health NOT_SERVING, `/readyz` 503), still serving for
    ///    `--shutdown-delay`; Watch streams end;
    /// 2. no new calls; in-flight calls finish, for at most `--shutdown-grace`;
    /// 3. the background tasks stop (the supervisor's, newest first);
    /// 4. the socket and pid files go, and the HTTP server stops;
    /// 5. the store's connections close, and last the change feed stops.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let http_addr = self.http_addr();
        let feed_task = self.feed.take().map(|(feed, sink)| self.coherence.run(feed, sink));
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut background = Supervisor::default();
        let (ready, health_task) = self.start_background(&mut background, &health).await;
        let (role_check, tenants, watch_hub) = self.services();
        let draining = Arc::new(AtomicBool::new(false));
        let (stop_http, http_task) = self.serve_http(ready, draining.clone());
        if let Some(path) = &self.config.pid_file {
            std::fs::write(path, format!("{}\n", std::process::id())).map_err(|err| {
                Error::FailedPrecondition(format!(
                    "cannot write --pid-file {}: {err}",
                    path.display()
                ))
            })?;
        }
        tracing::info!(%http_addr, "serving HTTP");
        match self.listener.as_ref().and_then(GrpcListener::local_addr) {
            Some(addr) => tracing::info!(%addr, "serving gRPC"),
            None => tracing::info!(addr = %self.config.listen, "serving gRPC"),
        }
        let (stopping_tx, stopping) = oneshot::channel::<()>();
        let delay = self.config.shutdown_delay;
        let drain = async move {
            shutdown.await;
            draining.store(true, Ordering::SeqCst);
            health_task.abort();
            for service in HEALTH_SERVICES {
                health.set_service_status(service, ServingStatus::NotServing).await;
            }
            if !delay.is_zero() {
                tracing::info!(?delay, "not ready; serving until the delay ends");
                tokio::time::sleep(delay).await;
            }
            watch_hub.close();
            let _ = stopping_tx.send(());
        };
        let socket_path = match &self.listener {
            Some(GrpcListener::Unix(_, path)) => Some(path.clone()),
            _ => None,
        };
        let grace = self.config.shutdown_grace;
        let served = tokio::select! {
            served = self.serve_grpc(health_service, role_check, tenants, drain) => served,
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
        background.stop();
        for path in [socket_path, self.config.pid_file.clone()].into_iter().flatten() {
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
        served
    }

    /// Starts the background tasks under `background`: the warm start and key sync of a
    /// follower, upkeep, and the reloads of keys, policy and certificates; and the health
    /// task, returned apart (it stops as draining begins) with the readiness it keeps.
    async fn start_background(
        &self,
        background: &mut Supervisor,
        health: &HealthReporter,
    ) -> (Arc<AtomicBool>, JoinHandle<()>) {
        // A follower is ready once its feed is connected and caught up, and its cache
        // warm (see `crate::follower::warm`).
        let feed = self.upstream.is_some().then(|| self.coherence.clone());
        let warming = self.upstream.clone().filter(|_| self.config.warm_users > 0);
        let warmed = Arc::new(AtomicBool::new(warming.is_none()));
        if let Some(upstream) = warming {
            let roles = RoleLookup::new(self.store.roles.clone(), self.cache.clone());
            let (coherence, warmed) = (self.coherence.clone(), warmed.clone());
            let (limit, within) = (self.config.warm_users, self.config.warm_timeout);
            background.spawn("warm start", async move {
                let started = std::time::Instant::now();
                let done =
                    crate::follower::warm(&upstream, &roles, &coherence, limit, within).await;
                let elapsed = started.elapsed();
                tracing::info!(listed = done.listed, loaded = done.loaded, ?elapsed, "warm start");
                warmed.store(true, Ordering::SeqCst);
            });
        }
        if let Some(upstream) = self.upstream.clone() {
            let (keys, coherence) = (self.tokens.keys().clone(), self.coherence.clone());
            background.spawn("key sync", crate::follower::follow_keys(upstream, keys, coherence));
        }
        // One probe before serving, so readiness and gRPC health are known from the start.
        let initially = self.store.tenants.revision().await.is_ok()
            && feed.as_ref().is_none_or(|coherence| coherence.is_current())
            && warmed.load(Ordering::SeqCst);
        let ready = Arc::new(AtomicBool::new(initially));
        let status = if initially { ServingStatus::Serving } else { ServingStatus::NotServing };
        for service in HEALTH_SERVICES {
            health.set_service_status(service, status).await;
        }
        let store = self.store.tenants.clone();
        let health_task =
            tokio::spawn(watch_health(health.clone(), store, feed, warmed, ready.clone()));
        background
            .spawn("upkeep", upkeep(self.store.history.clone(), self.config.history_retention));
        if let Some(task) = self.keys.watch(Duration::from_secs(2)) {
            background.adopt("api keys reload", task);
        }
        if let Some(authz) = &self.authz {
            background.adopt("policy reload", authz.watch(Duration::from_secs(2)));
        }
        if let Some(tls) = &self.tls {
            background.adopt("certificate reload", tls.watch(Duration::from_secs(2)));
        }
        (ready, health_task)
    }

    /// The RoleCheck and Tenants services, and the Watch hub that ends their streams.
    fn services(
        &self,
    ) -> (RoleCheckServer<RoleCheckApi>, TenantsServer<TenantsApi>, Arc<WatchHub>) {
        let issuing: Arc<dyn crate::api::Issuing> = match &self.upstream {
            Some(upstream) => Arc::new(upstream.clone()),
            None => Arc::new(crate::api::SignHere {
                tokens: self.tokens.clone(),
                roles: RoleLookup::new(self.store.roles.clone(), self.cache.clone()),
                application_id: self.application_id.clone(),
                models: self.models.clone(),
            }),
        };
        let role_check = RoleCheckApi::new(
            self.store.clone(),
            self.cache.clone(),
            issuing,
            self.application_id.clone(),
            (self.coherence.clone(), self.models.clone()),
            crate::api::WatchLimits::new(
                self.config.max_watch_streams,
                self.config.max_watch_streams_per_caller,
            ),
        );
        let watch_hub = role_check.watch_hub();
        let max = self.config.max_message_bytes;
        let role_check = RoleCheckServer::new(role_check).max_decoding_message_size(max);
        let tenants =
            TenantsServer::new(TenantsApi::new(self.store.clone())).max_decoding_message_size(max);
        (role_check, tenants, watch_hub)
    }

    /// AuthZEN on the HTTP port, answering from the same roles, model and policy as gRPC.
    fn authzen(&self) -> Arc<AuthZen> {
        let open = self.config.http_listen.ip().is_loopback() || self.config.insecure_no_auth;
        if !self.keys.enabled() && !open {
            tracing::warn!(
                "AuthZEN (/access/v1/*) answers no one: the HTTP listener is not loopback and \
                 no API keys are configured"
            );
        }
        let sources = crate::authzen::Sources {
            roles: RoleLookup::new(self.store.roles.clone(), self.cache.clone()),
            models: self.models.clone(),
            tenants: self.store.tenants.clone(),
            authz: self.authz.clone(),
        };
        let callers = crate::authzen::Callers {
            keys: self.keys.clone(),
            open,
            tls: self.tls.is_some(),
            rate_per_second: std::num::NonZeroU32::new(self.config.rate_limit),
        };
        AuthZen::new(sources, self.application_id.clone(), callers, self.metrics.clone())
    }

    /// Serves the HTTP port (JWKS, probes, metrics, forward-auth, AuthZEN) until told to
    /// stop.
    fn serve_http(
        &mut self,
        ready: Arc<AtomicBool>,
        draining: Arc<AtomicBool>,
    ) -> (oneshot::Sender<()>, JoinHandle<()>) {
        let (stop, stopping) = oneshot::channel::<()>();
        let mut router =
            crate::http::router(self.tokens.keys().clone(), ready, self.metrics.clone(), draining);
        if let Some(authz) = &self.authz {
            router = router.merge(
                axum::Router::new()
                    .route("/authz", axum::routing::any(crate::authz::forward::handle))
                    .with_state(authz.clone()),
            );
        }
        router = router.merge(self.authzen().router());
        let stopped = async {
            let _ = stopping.await;
        };
        let grace = self.config.shutdown_grace;
        let task = match (self.http_listener.take(), &self.tls) {
            (Some(listener), Some(tls)) => {
                let incoming = tls.incoming(listener, Port::Http);
                tokio::spawn(crate::http::serve(incoming, router, stopped, grace))
            }
            (Some(listener), None) => {
                tokio::spawn(crate::http::serve(listener, router, stopped, grace))
            }
            (None, _) => tokio::spawn(async {}),
        };
        (stop, task)
    }

    /// Serves gRPC (the services behind the metrics, framing and credential layers, with
    /// health and reflection) on the listener until `shutdown` resolves and in-flight
    /// calls end.
    async fn serve_grpc(
        &mut self,
        health: tonic_health::pb::health_server::HealthServer<
            impl tonic_health::pb::health_server::Health,
        >,
        role_check: RoleCheckServer<RoleCheckApi>,
        tenants: TenantsServer<TenantsApi>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let internal = |err| Error::Internal(Box::new(err));
        let reflection_v1 = reflection().build_v1().map_err(internal)?;
        let reflection_v1alpha = reflection().build_v1alpha().map_err(internal)?;
        let config = &self.config;
        let max = config.max_message_bytes;
        let rate = std::num::NonZeroU32::new(config.rate_limit);
        let router = tonic::transport::Server::builder()
            .timeout(config.request_timeout)
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .max_concurrent_streams(config.max_concurrent_streams)
            .layer(RequestLayer(self.metrics.clone()))
            .layer(FramingFaultLayer { max_message_bytes: max })
            .layer(
                AuthLayer::new(self.keys.clone(), rate)
                    .private_authz(config.authz_private_listener),
            )
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(role_check)
            .add_service(tenants)
            .add_optional_service(self.authz.clone().map(|authz| {
                AuthorizationServer::new(EnvoyAuthz::new(authz)).max_decoding_message_size(max)
            }));
        let keepalive = config.keepalive_interval;
        let served = match (self.listener.take(), &self.tls) {
            (None, _) => return Ok(()),
            (Some(GrpcListener::Tcp(listener)), Some(tls)) => {
                let incoming = tls.incoming_with_keepalive(listener, Port::Grpc, keepalive);
                router.serve_with_incoming_shutdown(incoming, shutdown).await
            }
            (Some(GrpcListener::Tcp(listener)), None) => {
                let incoming = TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(keepalive))
                    .with_keepalive_interval(Some(keepalive))
                    .with_keepalive_retries(Some(KEEPALIVE_RETRIES));
                router.serve_with_incoming_shutdown(incoming, shutdown).await
            }
            (Some(GrpcListener::Unix(listener, _)), _) => {
                let incoming = UnixListenerStream::new(listener);
                router.serve_with_incoming_shutdown(incoming, shutdown).await
            }
        };
        served.map_err(|err| Error::Internal(Box::new(err)))
    }
}
