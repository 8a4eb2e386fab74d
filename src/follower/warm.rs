//! Warm starts (`--warm-users`): before a new follower reports ready, it loads the users
//! its upstream answered about recently into its own cache, so a rollout of N followers
//! does not send N cold caches' worth of misses upstream while they take traffic.
//!
//! The loads go through the cache's ordinary loader (`RoleLookup::load`), so a preloaded
//! entry is exactly as coherent as one loaded by a Check: a change the feed applies while
//! a load is in flight discards it (see [`crate::cache`]). Warming starts once the feed is
//! current, is bounded by `--warm-users` and `--warm-timeout`, and never fails a start:
//! whatever is loaded when the time is up stays, and the follower reports ready.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;

use crate::{cache::RoleLookup, coherence::Coherence, domain::UserId, follower::UpstreamStore};

/// How often the wait for a current feed looks again.
const POLL: Duration = Duration::from_millis(10);

/// Loads in flight at once.
const CONCURRENCY: usize = 32;

/// What a warm start did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Warmed {
    /// Users the upstream listed.
    pub listed: usize,
    /// Users loaded into the cache.
    pub loaded: usize,
}

/// Loads up to `limit` of the upstream's active users into `roles`' cache, within
/// `within` (counted from the call, the wait for a current feed included).
pub async fn warm(
    upstream: &UpstreamStore,
    roles: &RoleLookup,
    coherence: &Arc<Coherence>,
    limit: u32,
    within: Duration,
) -> Warmed {
    let mut warmed = Warmed::default();
    let _ = tokio::time::timeout(within, async {
        // Loads while the feed is not current would bypass the cache. Trust is a lease
        // on the clock, not an event: poll it.
        while !coherence.is_current() {
            tokio::time::sleep(POLL).await;
        }
        let users = match upstream.active_users(limit).await {
            Ok(users) => users,
            Err(err) => {
                tracing::warn!(%err, "warm start: the upstream did not list its active users");
                return;
            }
        };
        warmed.listed = users.len();
        let users = users.into_iter().filter_map(|user| UserId::parse("user_id", &user).ok());
        let mut loads = futures::stream::iter(users)
            .map(|user| async move { roles.load(&user, 0).await.is_ok() })
            .buffer_unordered(CONCURRENCY);
        while let Some(ok) = loads.next().await {
            warmed.loaded += usize::from(ok);
        }
    })
    .await;
    warmed
}
