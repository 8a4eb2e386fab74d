//! The follower's change feed: the upstream's `Watch` with progress responses, which the
//! cache leases its trust on as it does on Postgres's sync notifications.
//!
//! The feed resumes by itself: when the stream breaks (an error, the end, or silence
//! longer than two leases) the cache is kept but not trusted (`Interrupted`), and the
//! follower watches again from the last revision it applied; once the replay has caught
//! up (its first progress response) the cache is trusted again (`Resumed`). If the
//! upstream cannot resume from there (`OUT_OF_RANGE`: that revision was pruned from its
//! history, or its store started over), the cache is dropped and the follower starts over
//! from the upstream's current revision.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use tonic::{Code, Status};

use super::UpstreamStore;
use crate::{
    domain::Revision,
    error::Result,
    pb,
    store::{ChangeFeed, ChangeKind, Feed, FeedEvent, Stale, TenantReads},
};

#[async_trait]
impl ChangeFeed for UpstreamStore {
    async fn subscribe(&self) -> Result<Feed> {
        let (tx, events) = crate::store::feed_channel();
        tokio::spawn(follow(self.clone(), tx));
        Ok(Feed { events, needs_lease: true })
    }
}

/// A change's kind on the wire; `None` for one this follower does not know.
pub(super) fn kind_from(kind: pb::ChangeKind) -> Option<ChangeKind> {
    match kind {
        pb::ChangeKind::Membership => Some(ChangeKind::Membership),
        pb::ChangeKind::TenantCreated => Some(ChangeKind::TenantCreated),
        pb::ChangeKind::TenantDeleted => Some(ChangeKind::TenantDeleted),
        pb::ChangeKind::Unspecified => None,
    }
}

/// Who a change makes stale, as the upstream's Watch tells it.
fn stale_of(change: &pb::Change, revision: Revision) -> Stale {
    // A kind this follower does not know: trust nothing cached.
    let Some(kind) = kind_from(change.kind()) else { return Stale::Everyone };
    let subject = match kind {
        ChangeKind::Membership => &change.user_id,
        _ => &change.tenant_id,
    };
    Stale::of(kind, subject, revision)
}

/// When, for a lease of `lease`, the upstream last proved it was current, as a progress
/// response that says `left_ms` of its own lease is left arrives now: trust then ends one
/// lease after that proof, not one lease after the response arrived (which, behind a slow
/// stream, would be nearly two). `0` is an upstream that does not say: now.
fn proved_at(lease: Duration, left_ms: u32) -> Instant {
    let now = Instant::now();
    if left_ms == 0 {
        return now;
    }
    let left = Duration::from_millis(u64::from(left_ms)).min(lease);
    now.checked_sub(lease - left).unwrap_or(now)
}

/// The feed: the upstream's Watch, resumed from the last applied revision after any
/// break; see the module docs. Ends when the feed's receiver is dropped.
async fn follow(upstream: UpstreamStore, tx: tokio::sync::mpsc::Sender<FeedEvent>) {
    let mut applied: Option<Revision> = None;
    // The upstream store's epoch, from its progress responses: resuming sends it, and an
    // upstream whose store started over refuses the resume (`OUT_OF_RANGE`).
    let mut epoch: Option<String> = None;
    let mut backoff = Duration::from_millis(50);
    while !tx.is_closed() {
        let start = match applied {
            Some(revision) => Some(revision),
            None => upstream.revision().await.ok(),
        };
        if let Some(start) = start {
            match upstream.watch(start, epoch.as_deref()).await {
                Ok(mut stream) => {
                    let mut caught_up = false;
                    let ended = loop {
                        let next =
                            tokio::time::timeout(upstream.options.silence, stream.message()).await;
                        let response = match next {
                            Ok(Ok(Some(response))) => response,
                            Ok(Ok(None)) => break None,
                            Ok(Err(status)) => break Some(status),
                            Err(_) => {
                                tracing::warn!("the upstream's Watch went silent; reconnecting");
                                break None;
                            }
                        };
                        backoff = Duration::from_millis(50);
                        let revision = response.revision;
                        if response.changes.is_empty() {
                            if !response.epoch.is_empty() {
                                if epoch.as_ref().is_some_and(|known| *known != response.epoch) {
                                    break Some(Status::out_of_range(
                                        "the upstream's store started over",
                                    ));
                                }
                                epoch = Some(response.epoch.clone());
                            }
                            let event = match (caught_up, applied) {
                                (true, _) => FeedEvent::Synced {
                                    revision,
                                    at: proved_at(upstream.options.lease, response.lease_left_ms),
                                },
                                (false, None) => {
                                    FeedEvent::Connected { revision, epoch: response.epoch.clone() }
                                }
                                (false, Some(_)) => FeedEvent::Resumed { revision },
                            };
                            caught_up = true;
                            let _ = tx.send(event).await;
                        } else {
                            for change in &response.changes {
                                let stale = stale_of(change, revision);
                                let _ = tx.send(FeedEvent::Changed { revision, stale }).await;
                            }
                        }
                        // Before the first progress response the start revision is where a
                        // resumed stream picks up; after it, whatever was applied.
                        if caught_up || applied.is_some() {
                            applied = Some(applied.unwrap_or(0).max(revision));
                        }
                    };
                    match ended {
                        Some(status) if status.code() == Code::OutOfRange => {
                            tracing::warn!(after = ?applied, reason = status.message(), "the upstream cannot resume this follower's history (pruned, or its store started over); dropping the cache");
                            (applied, epoch) = (None, None);
                            let _ = tx.send(FeedEvent::Lost).await;
                        }
                        other => {
                            if let Some(status) = other {
                                tracing::warn!(code = ?status.code(), message = status.message(), "the upstream's Watch ended");
                            }
                            let _ = tx.send(FeedEvent::Interrupted).await;
                        }
                    }
                }
                Err(status) if status.code() == Code::OutOfRange => {
                    tracing::warn!(after = ?applied, reason = status.message(), "the upstream cannot resume this follower's history (pruned, or its store started over); dropping the cache");
                    (applied, epoch) = (None, None);
                    let _ = tx.send(FeedEvent::Lost).await;
                }
                Err(status) => {
                    tracing::debug!(code = ?status.code(), "cannot watch the upstream yet");
                    let _ = tx.send(FeedEvent::Interrupted).await;
                }
            }
        }
        // Jittered (0.5 to 1.5 times): a fleet that lost its upstream together does not
        // come back in step.
        tokio::time::sleep(backoff.mul_f64(0.5 + rand::random::<f64>())).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
