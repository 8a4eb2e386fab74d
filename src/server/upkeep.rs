//! The upkeep task: history pruning and the purge of deleted tenants.

use std::{sync::Arc, time::Duration};

use crate::store::HistoryLog;

/// Drops history older than `retention`, and purges the memberships of deleted tenants,
/// now and then (every tenth of the retention, between 1 s and 1 min). Neither is a write:
/// no revision.
pub(super) async fn upkeep(store: Arc<dyn HistoryLog>, retention: Duration) {
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
