//! Readiness: the health task that keeps `grpc.health.v1` and `/readyz` in step with the
//! store and the feed.

use std::{sync::Arc, time::Duration};

use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{coherence::Coherence, store::TenantReads};

/// How often the health service re-checks the store while serving.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How often it re-checks while the store answers but the feed is not current yet (a
/// follower catching up), so it is ready soon after it can be.
const HEALTH_RETRY: Duration = Duration::from_millis(100);

/// The services `grpc.health.v1` reports on ("" is the whole server).
pub(super) const HEALTH_SERVICES: [&str; 3] =
    ["", "rolecheck.v1.RoleCheck", "rolecheck.v1.Tenants"];

/// Keeps `grpc.health.v1` and `/readyz` (through `ready`) in step with the store:
/// SERVING while it answers (and, on a follower, while its feed is current and once its
/// warm start is over). One probe every [`HEALTH_INTERVAL`] ([`HEALTH_RETRY`] while a
/// feed catches up or the cache warms), however many probes
/// hit the ports.
pub(super) async fn watch_health(
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
