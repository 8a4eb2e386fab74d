//! A follower's published keys follow its upstream's.

use std::{sync::Arc, time::Duration};

use super::UpstreamStore;
use crate::{coherence::Coherence, token::KeySet};

/// How often a follower fetches its upstream's JWK Set again.
const UPSTREAM_KEYS_REFRESH: Duration = Duration::from_secs(30);

/// Keeps a follower's published keys (`/.well-known/jwks.json`, the proxy verifier's
/// `"self"`) its upstream's. An upstream's keys change only when it restarts, which
/// breaks the feed: so the set is fetched again each time the feed (re)connects, once it
/// is current (until a fetch succeeds), and every [`UPSTREAM_KEYS_REFRESH`] in any case
/// (replicas behind one address may list keys in a different order mid-rollout). The
/// first connection counts too: an upstream may restart between the fetch at start and
/// the feed's first connection, when no loss of a connected feed is ever seen. A failed
/// fetch keeps the set held. An upstream publishes a new key before it signs with it (see
/// the key rotation of docs/tokens.md), so a follower knows a key before any token it verifies
/// uses it.
pub async fn follow_keys(upstream: UpstreamStore, keys: Arc<KeySet>, coherence: Arc<Coherence>) {
    // The connections whose keys were fetched: none yet (the fetch at start preceded
    // every connection).
    let mut fetched_for = 0;
    let mut fetched = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Fetch once the feed is current: the upstream that went away may still answer
        // while it drains, with the keys it is about to stop using.
        let connections = coherence.connections();
        let owed = connections != fetched_for && coherence.is_current();
        if !owed && fetched.elapsed() < UPSTREAM_KEYS_REFRESH {
            continue;
        }
        fetched = tokio::time::Instant::now();
        match upstream.keys().await {
            Ok(jwks) => {
                if owed {
                    fetched_for = connections;
                }
                if keys.publish(jwks) {
                    tracing::info!("the upstream's keys changed");
                }
            }
            Err(err) => tracing::debug!(%err, "the upstream's keys were not fetched; kept"),
        }
    }
}
