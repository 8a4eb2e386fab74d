//! The moka cache: a decorator of the store's [`RoleReads`] (answers from memory) and
//! [`Writes`] (forgets what a write touched before it returns); every other part of the
//! [`Store`] passes by it. The hot path of `Check` and `CheckBatch` asks
//! [`CachedStore::user_roles_in_memory`] first.
//!
//! Entries are per user (everything the user holds, at one revision), so a `Check` and
//! the user's `GetAuthorization` always agree. Absent users are cached too (an empty
//! snapshot). An entry lives at most `--cache-ttl` and never past the earliest expiry of
//! a role it holds; reads also filter expired roles by the clock, so expiry is exact to
//! the second whether or not an answer is cached.
//!
//! Writes through other processes arrive on the store's change feed (see
//! [`crate::coherence`]); while the feed cannot be trusted, reads bypass the cache.
//! A `min_revision` the feed has not applied yet waits briefly for it, then reads the
//! store. A cached answer reflects the feed's applied revision, not just its load.
//!
//! Staleness after a write through this process is impossible by construction: each
//! user hashes to one of [`SHARDS`] generation counters. A load records the counter
//! *before* reading the store; a write bumps the counter *after* its commit and before
//! its RPC returns. An entry is only served while its recorded generation is current, so
//! an entry whose store read may have preceded a write (including a load still in flight
//! when the write committed) is never served after the write returns.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures::FutureExt;
use moka::{Expiry, future::Cache};
use prometheus_client::metrics::counter::Counter;

use crate::{
    coherence::{Coherence, Invalidate},
    domain::{Revision, TenantId, UserId, UserRoles, now_unix},
    error::{Error, Result},
    store::{Answer, MembershipWrite, RoleReads, Stale, Store, Tenant, Writes},
};

/// Number of generation counters users are spread over.
const SHARDS: usize = 4096;

/// How often a read retries a load invalidated by concurrent writes before it reads the
/// store directly.
const LOAD_ATTEMPTS: usize = 2;

struct Entry {
    generation: u64,
    snapshot: Arc<UserRoles>,
}

struct EntryExpiry {
    ttl: Duration,
}

impl Expiry<UserId, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _user: &UserId,
        entry: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let now = now_unix();
        let until_role_expiry = entry
            .snapshot
            .earliest_expiry(now)
            .map(|at| Duration::from_secs(at.saturating_sub(now).max(0) as u64));
        Some(until_role_expiry.map_or(self.ttl, |left| left.min(self.ttl)))
    }
}

/// Deleted tenants: roles read before the revision that deleted a tenant, naming it, are
/// stale. Checked at read time only while any is kept, so a deletion costs the users of
/// other tenants nothing.
#[derive(Default)]
struct Tombstones {
    /// How many are kept: a read looks no further while this is 0.
    count: std::sync::atomic::AtomicUsize,
    /// Tenant -> (revision that deleted it, when it was heard of).
    deleted: std::sync::RwLock<std::collections::HashMap<Box<str>, (Revision, std::time::Instant)>>,
}

impl Tombstones {
    /// Whether `roles` were read before the deletion of a tenant they name.
    fn buries(&self, roles: &UserRoles) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let Ok(deleted) = self.deleted.read() else { return true };
        roles.names_tenant(|tenant| deleted.get(tenant).is_some_and(|(at, _)| roles.revision < *at))
    }

    /// Records a deletion; drops tombstones older than `keep` (no entry read before them
    /// can still be cached).
    fn bury(&self, tenant: &str, revision: Revision, keep: Duration) {
        let Ok(mut deleted) = self.deleted.write() else { return };
        let now = std::time::Instant::now();
        deleted.retain(|_, (_, heard)| now.duration_since(*heard) < keep);
        let entry = deleted.entry(tenant.into()).or_insert((revision, now));
        *entry = (entry.0.max(revision), now);
        self.count.store(deleted.len(), Ordering::Release);
    }
}

/// Answers `user_roles` from memory.
pub struct CachedStore {
    inner: Arc<dyn RoleReads>,
    writes: Arc<dyn Writes>,
    tombstones: Tombstones,
    /// How long a tombstone is kept: past it no entry read before it can remain.
    tombstone_life: Duration,
    cache: Cache<UserId, Arc<Entry>>,
    generations: Box<[AtomicU64]>,
    hasher: RandomState,
    coherence: Arc<Coherence>,
    min_revision_wait: Duration,
    hits: Counter,
    misses: Counter,
}

/// Cache settings.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// Most users cached.
    pub capacity: u64,
    /// Longest an entry lives.
    pub ttl: Duration,
    /// How long a read with a `min_revision` not applied yet waits for the feed before
    /// it reads the store.
    pub min_revision_wait: Duration,
    /// Counts answers from memory.
    pub hits: Counter,
    /// Counts loads from the store.
    pub misses: Counter,
}

impl CachedStore {
    /// `store` with its role reads and writes going through a new cache, and the cache;
    /// `coherence` says when the cache may be trusted.
    pub fn wrap(
        store: Store,
        options: &CacheOptions,
        coherence: Arc<Coherence>,
    ) -> (Store, Arc<Self>) {
        let cache = Arc::new(Self::new(store.roles, store.writes, options, coherence));
        let store = Store { roles: cache.clone(), writes: cache.clone(), ..store };
        (store, cache)
    }

    /// Caches `inner`'s answers, forgetting what `writes` touch.
    pub fn new(
        inner: Arc<dyn RoleReads>,
        writes: Arc<dyn Writes>,
        options: &CacheOptions,
        coherence: Arc<Coherence>,
    ) -> Self {
        let (capacity, ttl) = (options.capacity, options.ttl);
        let cache =
            Cache::builder().max_capacity(capacity).expire_after(EntryExpiry { ttl }).build();
        Self {
            inner,
            writes,
            tombstones: Tombstones::default(),
            tombstone_life: ttl * 2 + Duration::from_secs(60),
            cache,
            generations: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            coherence,
            min_revision_wait: options.min_revision_wait,
            hits: options.hits.clone(),
            misses: options.misses.clone(),
        }
    }

    /// Number of cached users (approximate, for metrics and tests).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    fn generation(&self, user: &str) -> &AtomicU64 {
        let shard = self.hasher.hash_one(user) as usize % SHARDS;
        &self.generations[shard]
    }

    async fn forget(&self, user: &UserId) {
        self.generation(user.as_str()).fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate(user).await;
    }

    async fn forget_all(&self) {
        for generation in self.generations.iter() {
            generation.fetch_add(1, Ordering::SeqCst);
        }
        self.cache.invalidate_all();
    }

    /// The answer to `user_roles` when it is in memory and current, without waiting or
    /// allocating; `None` means "ask `user_roles`". `user` must be a valid [`UserId`]. The
    /// hot path of `Check` and `CheckBatch`; the caller reports the answers it got with
    /// [`count_hits`](Self::count_hits).
    pub fn user_roles_in_memory(&self, user: &str, min_revision: Revision) -> Option<Answer> {
        if !self.coherence.is_current() {
            return None;
        }
        // Read before the generation check, as in `user_roles`.
        let applied = self.coherence.applied();
        if min_revision > applied {
            return None;
        }
        // A hit completes on its first poll; moka only waits when its read log needs
        // housekeeping first, and then `user_roles` waits for it.
        let entry = self.cache.get(user).now_or_never()??;
        let revision = entry.snapshot.revision.max(applied);
        if entry.generation != self.generation(user).load(Ordering::SeqCst)
            || self.tombstones.buries(&entry.snapshot)
        {
            return None;
        }
        Some(Answer { roles: entry.snapshot.clone(), revision })
    }

    /// Up to `limit` users held in memory, in no particular order: those asked about
    /// recently (moka's admission keeps the frequently asked ones).
    pub fn active_users(&self, limit: usize) -> Vec<String> {
        self.cache.iter().take(limit).map(|(user, _)| user.as_str().to_owned()).collect()
    }

    /// Counts `n` answers from [`user_roles_in_memory`](Self::user_roles_in_memory), once
    /// per request rather than once per user (one shared counter, two cores).
    pub fn count_hits(&self, n: u64) {
        if n > 0 {
            self.hits.inc_by(n);
        }
    }
}

/// One user's roles as every reader gets them (Check, CheckBatch, proxy decisions): from
/// memory when the cache holds them, else through the store (which fills the cache).
#[derive(Clone)]
pub struct RoleLookup {
    store: Arc<dyn RoleReads>,
    cache: Option<Arc<CachedStore>>,
}

impl RoleLookup {
    /// Reads through `store`, asking `cache` first when there is one.
    pub fn new(store: Arc<dyn RoleReads>, cache: Option<Arc<CachedStore>>) -> Self {
        Self { store, cache }
    }

    /// `user`'s answer, from memory or the store. `user` must be a valid [`UserId`].
    pub async fn answer(&self, user: &str, min_revision: Revision) -> Result<Answer> {
        match self.in_memory(user, min_revision) {
            Some(answer) => {
                self.count_hits(1);
                Ok(answer)
            }
            None => self.load(&UserId::trusted(user.to_owned()), min_revision).await,
        }
    }

    /// Through the store (and the cache's loader), never from memory alone.
    pub async fn load(&self, user: &UserId, min_revision: Revision) -> Result<Answer> {
        self.store.user_roles(user, min_revision).await
    }

    /// See [`CachedStore::user_roles_in_memory`].
    pub fn in_memory(&self, user: &str, min_revision: Revision) -> Option<Answer> {
        self.cache.as_ref()?.user_roles_in_memory(user, min_revision)
    }

    /// See [`CachedStore::active_users`]; none without a cache.
    pub fn active_users(&self, limit: usize) -> Vec<String> {
        self.cache.as_ref().map_or_else(Vec::new, |cache| cache.active_users(limit))
    }

    /// See [`CachedStore::count_hits`].
    pub fn count_hits(&self, n: u64) {
        if let Some(cache) = &self.cache {
            cache.count_hits(n);
        }
    }
}

#[async_trait]
impl RoleReads for CachedStore {
    async fn user_roles(&self, user: &UserId, min_revision: Revision) -> Result<Answer> {
        if !self.coherence.is_current() {
            self.misses.inc();
            return self.inner.user_roles(user, min_revision).await;
        }
        if min_revision > self.coherence.applied()
            && !self.coherence.wait_for(min_revision, self.min_revision_wait).await
        {
            self.misses.inc();
            return self.inner.user_roles(user, min_revision).await;
        }
        // Read before the generation check: every write at or below `applied` has bumped
        // the generation of the users it touched by now.
        let applied = self.coherence.applied();
        let generation = self.generation(user.as_str());
        let loaded = std::sync::atomic::AtomicBool::new(false);
        for _ in 0..LOAD_ATTEMPTS {
            let entry = self
                .cache
                .try_get_with_by_ref(user, async {
                    self.misses.inc();
                    loaded.store(true, Ordering::Relaxed);
                    let seen = generation.load(Ordering::SeqCst);
                    let snapshot = self.inner.user_roles(user, 0).await?.roles;
                    Ok::<_, Error>(Arc::new(Entry { generation: seen, snapshot }))
                })
                .await
                .map_err(Error::unshare)?;
            let revision = entry.snapshot.revision.max(applied);
            if entry.generation == generation.load(Ordering::SeqCst)
                && revision >= min_revision
                && !self.tombstones.buries(&entry.snapshot)
            {
                if !loaded.load(Ordering::Relaxed) {
                    self.hits.inc();
                }
                return Ok(Answer { roles: entry.snapshot.clone(), revision });
            }
            self.cache.invalidate(user).await;
        }
        self.inner.user_roles(user, min_revision).await
    }
}

#[async_trait]
impl Writes for CachedStore {
    async fn write_membership(&self, write: &MembershipWrite) -> Result<Revision> {
        // Forget even on error: a failed COMMIT may still have committed.
        let result = self.writes.write_membership(write).await;
        self.forget(&write.user).await;
        result
    }

    async fn create_tenant(&self, tenant: &Tenant, caller: &str) -> Result<(Revision, Tenant)> {
        self.writes.create_tenant(tenant, caller).await
    }

    async fn delete_tenant(&self, id: &TenantId, caller: &str) -> Result<Revision> {
        // The caller reads its own deletion here at once; the change feed announces it
        // too (to every replica, and here when this caller went away after the COMMIT).
        let revision = self.writes.delete_tenant(id, caller).await?;
        self.tombstones.bury(id.as_str(), revision, self.tombstone_life);
        Ok(revision)
    }
}

#[async_trait]
impl Invalidate for CachedStore {
    async fn invalidate(&self, stale: &Stale) {
        match stale {
            Stale::Nobody => {}
            Stale::User(user) => self.forget(&UserId::trusted(user.clone())).await,
            Stale::Tenant { tenant, revision } => {
                // Loads in flight may have read before the deletion: the tombstone catches
                // what they insert, as it does every entry already cached.
                self.tombstones.bury(tenant, *revision, self.tombstone_life);
            }
            Stale::Everyone => self.forget_all().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::{
        domain::Role,
        store::{ChangeFeed, SqliteStore, StoreOptions, WriteKind},
    };

    /// A real SQLite store that counts `user_roles` loads and, when armed, holds each load
    /// after its read until the test releases it.
    struct Counting {
        inner: Arc<SqliteStore>,
        loads: AtomicUsize,
        armed: std::sync::atomic::AtomicBool,
        release: Semaphore,
    }

    #[async_trait]
    impl RoleReads for Counting {
        async fn user_roles(&self, user: &UserId, min: Revision) -> Result<Answer> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            let snapshot = self.inner.user_roles(user, min).await?;
            if self.armed.load(Ordering::SeqCst) {
                self.release.acquire().await.expect("semaphore").forget();
            }
            Ok(snapshot)
        }
    }

    async fn fixture(dir: &tempfile::TempDir, capacity: u64) -> (Arc<Counting>, Arc<CachedStore>) {
        let app = TenantId::parse("app", "app").expect("id");
        let options = StoreOptions::new(4, Duration::from_secs(5));
        let inner =
            SqliteStore::open(&dir.path().join("t.db"), &app, &options).await.expect("open");
        inner.migrate().await.expect("migrate");
        inner.ensure_application_tenant(&app).await.expect("app tenant");
        let inner = Arc::new(inner);
        let counting = Arc::new(Counting {
            inner: inner.clone(),
            loads: AtomicUsize::new(0),
            armed: false.into(),
            release: Semaphore::new(0),
        });
        let coherence = Coherence::new(Duration::from_secs(1));
        let options = CacheOptions {
            capacity,
            ttl: Duration::from_secs(60),
            min_revision_wait: Duration::from_millis(100),
            hits: Counter::default(),
            misses: Counter::default(),
        };
        let cached = Arc::new(CachedStore::new(
            counting.clone(),
            inner.clone(),
            &options,
            coherence.clone(),
        ));
        coherence.run(inner.subscribe().await.expect("feed"), cached.clone());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !coherence.is_current() {
            assert!(Instant::now() < deadline, "feed never connected");
            tokio::task::yield_now().await;
        }
        (counting, cached)
    }

    fn user(id: &str) -> UserId {
        UserId::parse("user_id", id).expect("user")
    }

    fn grant(user_id: &str, role: &str) -> MembershipWrite {
        MembershipWrite {
            kind: WriteKind::Grant,
            tenant: TenantId::parse("t", "app").expect("tenant"),
            user: user(user_id),
            roles: vec![Role::parse("r", role).expect("role")],
            expires_at: None,
            caller: "test".into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_for_one_user_load_once() {
        let dir = tempfile::tempdir().expect("dir");
        let (counting, cached) = fixture(&dir, 100).await;
        counting.armed.store(true, Ordering::SeqCst);
        let callers: Vec<_> = (0..32)
            .map(|_| {
                let cached = cached.clone();
                tokio::spawn(async move { cached.user_roles(&user("u1"), 0).await })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while counting.loads.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no load started");
            tokio::task::yield_now().await;
        }
        counting.release.add_permits(1);
        for caller in callers {
            caller.await.expect("task").expect("load");
        }
        assert_eq!(counting.loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn capacity_bounds_the_entries() {
        let dir = tempfile::tempdir().expect("dir");
        let (_, cached) = fixture(&dir, 10).await;
        for i in 0..100 {
            cached.user_roles(&user(&format!("u{i}")), 0).await.expect("load");
        }
        cached.cache.run_pending_tasks().await;
        assert!(cached.entry_count() <= 10, "{} entries", cached.entry_count());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_in_flight_during_a_write_is_never_served_after_it() {
        let dir = tempfile::tempdir().expect("dir");
        let (counting, cached) = fixture(&dir, 100).await;
        counting.armed.store(true, Ordering::SeqCst);
        let early = {
            let cached = cached.clone();
            tokio::spawn(async move { cached.user_roles(&user("u1"), 0).await })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while counting.loads.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no load started");
            tokio::task::yield_now().await;
        }
        // The early load has read the old state; now a write commits and returns.
        cached.write_membership(&grant("u1", "admin")).await.expect("grant");
        counting.armed.store(false, Ordering::SeqCst);
        let late = {
            let cached = cached.clone();
            tokio::spawn(async move { cached.user_roles(&user("u1"), 0).await })
        };
        counting.release.add_permits(1);
        early.await.expect("task").expect("load");
        let late = late.await.expect("task").expect("load").roles;
        let (t, r) =
            (TenantId::parse("t", "app").expect("t"), Role::parse("r", "admin").expect("r"));
        assert!(counting.loads.load(Ordering::SeqCst) >= 2, "the stale load was read again");
        assert!(late.allows(&t, &r, now_unix()), "a read after the write sees it");
        let again = cached.user_roles(&user("u1"), 0).await.expect("load").roles;
        assert!(again.allows(&t, &r, now_unix()), "the cache now holds the new state");
    }
}
