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
//!
//! Trust is timed from the request, not from arrivals: each progress response says when
//! the upstream's own proof ends, counted from when it received the Watch request, and
//! the follower counts that from when it sent the request (see [`proved_at`]). A response
//! held up behind a backlog therefore buys no extra time. To keep the allowance for the
//! two clocks' rates small, a stream is renewed after [`stream_lifetime`]; the renewal
//! keeps the trust already proved, and resumes like any other.

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
        pb::ChangeKind::ModelChanged => Some(ChangeKind::ModelChanged),
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
/// response on a stream requested at `sent` says as it arrives now: trust then ends one
/// lease after that proof. Of the response's two bounds the earlier counts:
/// `lease_left_ms` runs from when the response was made, so counted from its arrival it
/// is late by however long the response waited behind a backlog; `lease_end_ms` runs from
/// when the upstream received the request, which was after `sent`, so counted from `sent`
/// it is never late (less [`CLOCK_RATE_SLACK`] of it). Neither given (an upstream that
/// does not say): now.
fn proved_at(lease: Duration, sent: Instant, response: &pb::WatchResponse) -> Instant {
    let now = Instant::now();
    let left = (response.lease_left_ms > 0)
        .then(|| now + Duration::from_millis(u64::from(response.lease_left_ms)).min(lease));
    let from_request = (response.lease_end_ms > 0).then(|| {
        let end = Duration::from_millis(response.lease_end_ms);
        sent + end.saturating_sub(end.mul_f64(CLOCK_RATE_SLACK))
    });
    let end = match (left, from_request) {
        (None, None) => return now,
        (Some(end), None) | (None, Some(end)) => end,
        (Some(a), Some(b)) => a.min(b),
    };
    // Only within one lease of the machine's start can this not be expressed.
    end.checked_sub(lease).unwrap_or(sent)
}

/// How much the upstream's clock and this follower's may differ in rate, as a fraction of
/// the time measured: 0.1 %, far more than two clocks kept by NTP (or even free-running
/// crystals) drift apart.
const CLOCK_RATE_SLACK: f64 = 0.001;

/// How long a Watch stream is kept before it is renewed: by then the clock-rate slack
/// taken off `lease_end_ms` reaches a quarter lease, and it grows with the stream's age.
fn stream_lifetime(lease: Duration) -> Duration {
    lease.mul_f64(0.25 / CLOCK_RATE_SLACK)
}

/// The feed: the upstream's Watch, resumed from the last applied revision after any
/// break; see the module docs. Ends when the feed's receiver is dropped.
///
/// One piece (past 80 lines) on purpose: what carries over between connections (the
/// applied revision, the epoch, the backoff, a renewal) and what each response decides
/// (caught up or not, which event) are read and written by the same few lines; split
/// apart, that state would travel through every call. Splitting it is #28, point 1.
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
        let mut renew = false;
        if let Some(start) = start {
            let sent = Instant::now();
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
                            let at = proved_at(upstream.options.lease, sent, &response);
                            let event = match (caught_up, applied) {
                                (true, _) => FeedEvent::Synced { revision, at },
                                (false, None) => {
                                    let epoch = response.epoch.clone();
                                    FeedEvent::Connected { revision, epoch, at }
                                }
                                (false, Some(_)) => FeedEvent::Resumed { revision, at },
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
                        if caught_up && sent.elapsed() > stream_lifetime(upstream.options.lease) {
                            renew = true;
                            break None;
                        }
                    };
                    match ended {
                        // A renewal keeps the trust the last proof gave until the new
                        // stream's first progress response renews it (`Resumed`).
                        None if renew => {}
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
        if renew {
            continue;
        }
        // Jittered (0.5 to 1.5 times): a fleet that lost its upstream together does not
        // come back in step.
        tokio::time::sleep(backoff.mul_f64(0.5 + rand::random::<f64>())).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
