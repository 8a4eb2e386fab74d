//! Coherence: applies a store's change feed to this process's cache, tracks the highest
//! revision applied, and decides whether the cache may be trusted at all.
//!
//! The cache is trusted only while the feed is connected and, for a network feed, while
//! its last sync is younger than the lease. Otherwise every read goes to the store, and
//! if the store is down too, the caller gets `UNAVAILABLE` — never an answer that a
//! missed notification could have revoked.
//!
//! A store can start over: a follower's upstream restarted on a new embedded store, a
//! database restored from a dump, a failover to a standby that had not replayed the last
//! commits. Its revisions then repeat numbers this process already applied, and resuming
//! would skip the writes that reuse them. So each connection of the feed reports the
//! store's epoch (its identity, chosen when it was created) and revision: another epoch,
//! or a revision below what was applied, is a rewind. The cache is dropped (as at every
//! connection), the applied revision goes back to the store's, and every Watch stream
//! this process serves ends with `OUT_OF_RANGE`, so its own followers start over too.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    domain::Revision,
    store::{Feed, FeedEvent, Stale},
};

/// What the feed drives: a cache's invalidation.
#[async_trait]
pub trait Invalidate: Send + Sync + 'static {
    /// Drops what `stale` names.
    async fn invalidate(&self, stale: &Stale);
}

/// No cache: nothing to invalidate.
pub struct NoCache;

#[async_trait]
impl Invalidate for NoCache {
    async fn invalidate(&self, _stale: &Stale) {}
}

/// The coherence state shared by the cache, the Watch stream and metrics.
pub struct Coherence {
    applied: watch::Sender<Revision>,
    /// The highest revision the feed has begun to apply (its invalidation may still be
    /// under way); see [`Coherence::floor`].
    applying: AtomicU64,
    /// Fault injection for tests: each change waits this long before it is applied.
    fault_delay: Option<Duration>,
    connected: AtomicBool,
    needs_lease: AtomicBool,
    lease: Duration,
    epoch: Instant,
    last_sync_micros: AtomicU64,
    reconnects: AtomicU64,
    /// How many times the feed became connected (a first connection, or one after a
    /// loss or a pause).
    connections: AtomicU64,
    /// The epoch of the store the feed follows, once connected.
    store_epoch: std::sync::Mutex<Option<String>>,
    /// Counts rewinds (see the module docs); Watch streams end when it moves.
    rewinds: watch::Sender<u64>,
}

impl Coherence {
    /// A disconnected state; a network feed is trusted for `lease` after each sync.
    pub fn new(lease: Duration) -> Arc<Self> {
        Self::with_fault_delay(lease, None)
    }

    /// [`Coherence::new`], with every change applied `fault_delay` late (tests only: the
    /// cache lags its feed, as a busy process's can).
    pub fn with_fault_delay(lease: Duration, fault_delay: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            applied: watch::Sender::new(0),
            applying: AtomicU64::new(0),
            fault_delay,
            connected: AtomicBool::new(false),
            needs_lease: AtomicBool::new(true),
            lease,
            epoch: Instant::now(),
            last_sync_micros: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            store_epoch: std::sync::Mutex::new(None),
            rewinds: watch::Sender::new(0),
        })
    }

    /// Every write at or below this revision has been applied to the cache.
    pub fn applied(&self) -> Revision {
        *self.applied.borrow()
    }

    /// The oldest revision a load may read from the store and still be cached: every
    /// change the feed has begun to apply. A load reads it after its generation (see
    /// `crate::cache`): a change whose invalidation the generation missed has already
    /// raised the floor, so the load cannot bring back what that change removed.
    pub fn floor(&self) -> Revision {
        self.applying.load(Ordering::SeqCst).max(self.applied())
    }

    /// How many times the feed became connected: it changes whenever the feed comes
    /// (back), even if it was never current in between.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// How many times the feed was lost.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Whether cached answers may be served: the feed is connected and, when it needs
    /// one, its lease is fresh.
    pub fn is_current(&self) -> bool {
        if !self.connected.load(Ordering::SeqCst) {
            return false;
        }
        if !self.needs_lease.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.epoch.elapsed().as_micros() as u64;
        let since_sync = now.saturating_sub(self.last_sync_micros.load(Ordering::SeqCst));
        since_sync < self.lease.as_micros() as u64
    }

    /// How much longer the feed's last proof of being current holds: the lease less the
    /// time since that proof (a full lease for a feed that needs none, zero when not
    /// current).
    pub fn lease_left(&self) -> Duration {
        if !self.is_current() {
            return Duration::ZERO;
        }
        if !self.needs_lease.load(Ordering::Relaxed) {
            return self.lease;
        }
        self.lease.saturating_sub(self.sync_age())
    }

    /// Time since the feed last proved it was current: how stale this replica could be.
    pub fn sync_age(&self) -> Duration {
        let now = self.epoch.elapsed().as_micros() as u64;
        Duration::from_micros(now.saturating_sub(self.last_sync_micros.load(Ordering::SeqCst)))
    }

    /// Waits up to `timeout` for `revision` to be applied; whether it was.
    pub async fn wait_for(&self, revision: Revision, timeout: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|applied| *applied >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The epoch of the store the feed follows; `None` before it first connects.
    pub fn store_epoch(&self) -> Option<String> {
        self.store_epoch.lock().map_or(None, |epoch| epoch.clone())
    }

    /// A receiver that changes at every rewind (see the module docs).
    pub fn watch_rewinds(&self) -> watch::Receiver<u64> {
        self.rewinds.subscribe()
    }

    /// Records the store's identity at a (re)connection; whether it is a rewind: another
    /// epoch than before, or a revision below what was applied.
    fn rewound(&self, revision: Revision, epoch: String) -> bool {
        let Ok(mut known) = self.store_epoch.lock() else { return true };
        let other = !epoch.is_empty() && known.as_ref().is_some_and(|was| *was != epoch);
        if !epoch.is_empty() {
            *known = Some(epoch);
        }
        other || revision < self.applied()
    }

    /// After a rewind: the store's history is the new one, from `revision`.
    fn restart_at(&self, revision: Revision) {
        self.applying.store(revision, Ordering::SeqCst);
        self.applied.send_replace(revision);
        self.rewinds.send_modify(|n| *n += 1);
    }

    /// A receiver that changes whenever the applied revision grows.
    pub fn watch_applied(&self) -> watch::Receiver<Revision> {
        self.applied.subscribe()
    }

    fn advance(&self, revision: Revision) {
        self.applied.send_if_modified(|applied| {
            let grew = revision > *applied;
            if grew {
                *applied = revision;
            }
            grew
        });
    }

    fn synced_at(&self, at: Instant) {
        let micros = at.saturating_duration_since(self.epoch).as_micros() as u64;
        self.last_sync_micros.fetch_max(micros, Ordering::SeqCst);
    }

    /// Applies `feed` to `sink` in order until the feed ends.
    pub fn run(self: &Arc<Self>, feed: Feed, sink: Arc<dyn Invalidate>) -> JoinHandle<()> {
        self.needs_lease.store(feed.needs_lease, Ordering::Relaxed);
        let this = self.clone();
        let mut events = feed.events;
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    FeedEvent::Connected { revision, epoch, at } => {
                        let was = this.applied();
                        let rewound = this.rewound(revision, epoch);
                        this.applying.fetch_max(revision, Ordering::SeqCst);
                        sink.invalidate(&Stale::Everyone).await;
                        if rewound {
                            tracing::warn!(
                                applied = was,
                                store = revision,
                                "the store started over (another epoch, or an older revision): \
                                 the cache is dropped and Watch streams end"
                            );
                            this.restart_at(revision);
                        }
                        this.synced_at(at);
                        this.advance(revision);
                        this.connected.store(true, Ordering::SeqCst);
                        this.connections.fetch_add(1, Ordering::SeqCst);
                    }
                    FeedEvent::Changed { revision, stale } => {
                        if let Some(delay) = this.fault_delay {
                            tokio::time::sleep(delay).await;
                        }
                        this.applying.fetch_max(revision, Ordering::SeqCst);
                        sink.invalidate(&stale).await;
                        this.advance(revision);
                    }
                    FeedEvent::Synced { revision, at } => {
                        this.applying.fetch_max(revision, Ordering::SeqCst);
                        this.advance(revision);
                        this.synced_at(at);
                    }
                    FeedEvent::Lost => {
                        if this.connected.swap(false, Ordering::SeqCst) {
                            this.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        sink.invalidate(&Stale::Everyone).await;
                    }
                    FeedEvent::Interrupted => {
                        if this.connected.swap(false, Ordering::SeqCst) {
                            this.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    FeedEvent::Resumed { revision, at } => {
                        this.applying.fetch_max(revision, Ordering::SeqCst);
                        this.synced_at(at);
                        this.advance(revision);
                        this.connected.store(true, Ordering::SeqCst);
                        this.connections.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            this.connected.store(false, Ordering::SeqCst);
        })
    }
}
