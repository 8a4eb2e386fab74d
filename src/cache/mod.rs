//! The moka cache: a decorator of the store's [`RoleReads`] (answers from memory) and
//! [`Writes`] (forgets what a write touched before it returns); every other part of the
//! [`Store`] passes by it. The hot path of `Check` and `CheckBatch` asks
//! [`CachedStore::user_roles_in_memory`] first.
//!
//! Entries are per user (everything the user holds, at one revision), so a `Check` and
//! the user's `GetAuthorization` always agree; users share moka entries (see
//! [`CachedStore`]). Absent users are cached too (an empty snapshot). An entry is served
//! for at most `--cache-ttl`; reads filter expired roles by the clock, so expiry is exact
//! to the second whether or not an answer is cached.
//!
//! Writes through other processes arrive on the store's change feed (see
//! [`crate::coherence`]); while the feed cannot be trusted, reads bypass the cache.
//! A `min_revision` the feed has not applied yet waits briefly for it, then reads the
//! store. A cached answer reflects the feed's applied revision, not just its load.
//!
//! A load never reads older than what the cache already applied: it asks the store for
//! at least the feed's floor ([`Coherence::floor`]) and refuses an answer below it, so a
//! store (an upstream's cache) that lags the feed cannot bring back a revoked role.
//!
//! Staleness after a write through this process is impossible by construction: each
//! user hashes to one of [`SHARDS`] generation counters. A load records the counter
//! *before* reading the store; a write bumps the counter *after* its commit and before
//! its RPC returns. An entry is only served while its recorded generation is current, so
//! an entry whose store read may have preceded a write (including a load still in flight
//! when the write committed) is never served after the write returns.

mod bucket;
mod loads;
mod lookup;
pub mod model;
mod tombstones;

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use moka::sync::Cache;
use prometheus_client::metrics::counter::Counter;

use self::bucket::{BUCKET_LIMIT, Bucket, Lifetime, Slot, USERS_PER_BUCKET, find, with};
use self::loads::{Load, Loaded, Reader};
use self::tombstones::Tombstones;

pub use self::lookup::RoleLookup;
use crate::{
    coherence::{Coherence, Invalidate},
    domain::{Revision, TenantId, UserId},
    error::{Error, Result},
    store::{Answer, MembershipWrite, RoleReads, Stale, Store, Tenant, Writes},
};

/// Number of generation counters users are spread over.
const SHARDS: usize = 4096;

/// How often a read retries a load invalidated by concurrent writes before it reads the
/// store directly.
const LOAD_ATTEMPTS: usize = 2;

/// Where a user lives: its bucket, and its fingerprint there (whose low bits also pick
/// its generation counter).
struct Place {
    bucket: u64,
    fingerprint: u32,
}

/// Answers `user_roles` from memory.
///
/// Users are grouped into moka entries ("buckets", by a hash of the id; about
/// [`USERS_PER_BUCKET`] each when the cache is full), because a moka entry's own
/// bookkeeping (about 300 bytes) outweighs a user's roles: moka weighs each bucket by
/// its users, evicts and expires whole buckets (see [`Bucket`]), and a bucket is replaced
/// whole when a user is loaded into it. Each user in a bucket carries its own
/// generation. The cache is moka's synchronous one: nothing here waits on moka (a miss
/// waits on the load it shares with the other misses of its user, see `join_load`).
pub struct CachedStore {
    inner: Arc<dyn RoleReads>,
    writes: Arc<dyn Writes>,
    /// Deleted tenants, each kept until no entry read before its deletion can remain.
    tombstones: Tombstones,
    cache: Cache<u64, Bucket>,
    buckets: u64,
    bucket_limit: usize,
    generations: Box<[AtomicU64]>,
    hasher: RandomState,
    /// Loads in flight, by user: a miss joins the one running for its user.
    /// Loads in flight by user, with how many reads wait on each (the last to leave
    /// before it is done removes it: see [`Reader`]).
    loading: Mutex<HashMap<Box<str>, (Load, usize)>>,
    lifetime: Lifetime,
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
        let (capacity, ttl) = (options.capacity.max(1), options.ttl);
        let lifetime = Lifetime::new(ttl);
        let cache = Cache::builder()
            .max_capacity(capacity)
            .weigher(|_, bucket: &Bucket| bucket.len() as u32)
            .expire_after(lifetime)
            .build();
        Self {
            inner,
            writes,
            // Kept well past the longest an entry read before a deletion can be cached.
            tombstones: Tombstones::new(ttl * 2 + Duration::from_secs(60)),
            cache,
            buckets: (capacity / USERS_PER_BUCKET).max(1),
            bucket_limit: BUCKET_LIMIT.min(capacity as usize),
            generations: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            loading: Mutex::default(),
            lifetime,
            coherence,
            min_revision_wait: options.min_revision_wait,
            hits: options.hits.clone(),
            misses: options.misses.clone(),
        }
    }

    /// Number of cached users (approximate, for metrics and tests).
    pub fn entry_count(&self) -> u64 {
        self.cache.weighted_size()
    }

    fn place(&self, user: &str) -> Place {
        let hash = self.hasher.hash_one(user);
        Place { bucket: (hash >> 32) % self.buckets, fingerprint: hash as u32 }
    }

    /// The generation of the users with this fingerprint.
    fn generation_of(&self, fingerprint: u32) -> u64 {
        self.counter(fingerprint).load(Ordering::SeqCst)
    }

    /// The generation counter of the users with this fingerprint (its low bits pick it).
    fn counter(&self, fingerprint: u32) -> &AtomicU64 {
        &self.generations[fingerprint as usize % SHARDS]
    }

    /// Whether `slot` may be kept: loaded after every write to its user, within the TTL.
    fn is_current(&self, slot: &Slot, generation: u64, now_ms: u64) -> bool {
        slot.generation == generation as u32 && self.lifetime.holds(slot, now_ms)
    }

    /// `user`'s answer from `bucket`, if it holds a current one. moka does not hand out a
    /// bucket past its deadline, so no slot read here is older than the TTL.
    fn serve(
        &self,
        bucket: &[Slot],
        place: &Place,
        user: &str,
        applied: Revision,
    ) -> Option<Answer> {
        let slot = find(bucket, user, place.fingerprint)?;
        if slot.generation != self.generation_of(place.fingerprint) as u32
            || self.tombstones.buries(&slot.roles)
        {
            return None;
        }
        let revision = slot.roles.revision.max(applied);
        Some(Answer { roles: slot.roles.clone(), revision })
    }

    fn forget(&self, user: &str) {
        self.counter(self.place(user).fingerprint).fetch_add(1, Ordering::SeqCst);
    }

    fn forget_all(&self) {
        for generation in self.generations.iter() {
            generation.fetch_add(1, Ordering::SeqCst);
        }
        self.cache.invalidate_all();
    }

    /// Puts `loaded` into its user's bucket, dropping the slots that can no longer be served.
    fn insert(&self, place: &Place, loaded: &Loaded) {
        let now_ms = self.lifetime.now_ms();
        let slot = Slot {
            roles: loaded.roles.clone(),
            loaded_ms: now_ms,
            fingerprint: place.fingerprint,
            generation: loaded.generation as u32,
        };
        let keep = |old: &Slot| self.is_current(old, self.generation_of(old.fingerprint), now_ms);
        self.cache.entry(place.bucket).and_upsert_with(|current| {
            let current = current.map(|entry| entry.into_value());
            with(current.as_deref().unwrap_or_default(), slot, keep, self.bucket_limit)
        });
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
        let place = self.place(user);
        let bucket = self.cache.get(&place.bucket)?;
        self.serve(&bucket, &place, user, applied)
    }

    /// Up to `limit` users held in memory, in no particular order: those asked about
    /// recently (moka's admission keeps the frequently asked ones).
    pub fn active_users(&self, limit: usize) -> Vec<String> {
        let now_ms = self.lifetime.now_ms();
        let mut users = Vec::new();
        for (_, bucket) in self.cache.iter() {
            let live = bucket.iter().filter(|slot| self.lifetime.holds(slot, now_ms));
            users.extend(live.map(|slot| slot.roles.user().to_owned()).take(limit - users.len()));
            if users.len() >= limit {
                break;
            }
        }
        users
    }

    /// Counts `n` answers from [`user_roles_in_memory`](Self::user_roles_in_memory), once
    /// per request rather than once per user (one shared counter, two cores).
    pub fn count_hits(&self, n: u64) {
        if n > 0 {
            self.hits.inc_by(n);
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
        let place = self.place(user.as_str());
        for _ in 0..LOAD_ATTEMPTS {
            let bucket = self.cache.get(&place.bucket);
            let cached =
                bucket.and_then(|bucket| self.serve(&bucket, &place, user.as_str(), applied));
            if let Some(answer) = cached.filter(|answer| answer.revision >= min_revision) {
                self.hits.inc();
                return Ok(answer);
            }
            let reader =
                Reader { cache: self, user: user.as_str(), load: self.join_load(user, &place) };
            let load = &reader.load;
            let result = load.clone().await;
            let current = result.as_ref().is_ok_and(|loaded| {
                loaded.generation == self.generation_of(place.fingerprint)
                    && !self.tombstones.buries(&loaded.roles)
            });
            // Into the bucket before out of the loads in flight: a read in between finds
            // one or the other, never neither (it would start a second load).
            if self.is_loading(user.as_str(), load) {
                if let (true, Ok(loaded)) = (current, &result) {
                    self.insert(&place, loaded);
                }
                self.finish_load(user.as_str(), load);
            }
            let loaded = result.map_err(Error::unshare)?;
            let revision = loaded.roles.revision.max(applied);
            if current && revision >= min_revision {
                return Ok(Answer { roles: loaded.roles, revision });
            }
        }
        self.inner.user_roles(user, min_revision).await
    }
}

#[async_trait]
impl Writes for CachedStore {
    async fn write_membership(&self, write: &MembershipWrite) -> Result<Revision> {
        // Forget even on error: a failed COMMIT may still have committed.
        let result = self.writes.write_membership(write).await;
        self.forget(write.user.as_str());
        result
    }

    async fn create_tenant(&self, tenant: &Tenant, caller: &str) -> Result<(Revision, Tenant)> {
        self.writes.create_tenant(tenant, caller).await
    }

    async fn delete_tenant(&self, id: &TenantId, caller: &str) -> Result<Revision> {
        // The caller reads its own deletion here at once; the change feed announces it
        // too (to every replica, and here when this caller went away after the COMMIT).
        let revision = self.writes.delete_tenant(id, caller).await?;
        self.tombstones.bury(id.as_str(), revision);
        Ok(revision)
    }

    /// The feed announces it, and every cached answer goes (see [`Stale::of`]); a check
    /// meanwhile never judges roles under another model than they were read under (see
    /// `model`).
    async fn set_model(&self, spec: &str, caller: &str) -> Result<Revision> {
        self.writes.set_model(spec, caller).await
    }

    /// Forgets every user of the batch, applied or not (even on error: a failed COMMIT
    /// may still have committed).
    async fn import_batch(
        &self,
        batch: &crate::store::ImportBatch,
    ) -> Result<crate::store::Imported> {
        let result = self.writes.import_batch(batch).await;
        for user in &batch.users {
            self.forget(&user.user);
        }
        result
    }
}

#[async_trait]
impl Invalidate for CachedStore {
    async fn invalidate(&self, stale: &Stale) {
        match stale {
            Stale::Nobody => {}
            Stale::User(user) => self.forget(user),
            Stale::Tenant { tenant, revision } => {
                // Loads in flight may have read before the deletion: the tombstone catches
                // what they insert, as it does every entry already cached.
                self.tombstones.bury(tenant, *revision);
            }
            Stale::Everyone => self.forget_all(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicUsize, time::Instant};

    use tokio::sync::Semaphore;

    use super::*;
    use crate::{
        domain::{Role, now_unix},
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
        fixture_with_ttl(dir, capacity, Duration::from_secs(60)).await
    }

    async fn fixture_with_ttl(
        dir: &tempfile::TempDir,
        capacity: u64,
        ttl: Duration,
    ) -> (Arc<Counting>, Arc<CachedStore>) {
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
            ttl,
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
            // A second load would wait for a permit that never comes.
            let done = tokio::time::timeout(Duration::from_secs(5), caller).await;
            done.expect("every caller answered by the one load").expect("task").expect("load");
        }
        assert_eq!(counting.loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_is_served_for_at_most_the_ttl() {
        let dir = tempfile::tempdir().expect("dir");
        let ttl = Duration::from_millis(300);
        let (counting, cached) = fixture_with_ttl(&dir, 100, ttl).await;
        let loaded = Instant::now();
        cached.user_roles(&user("u1"), 0).await.expect("load");
        let served = cached.user_roles_in_memory("u1", 0).is_some();
        assert!(loaded.elapsed() < ttl, "too slow to tell");
        assert!(served, "served while younger than the TTL");
        // Another user loaded into the same bucket later does not extend u1's life.
        tokio::time::sleep(ttl / 2).await;
        cached.user_roles(&user("u2"), 0).await.expect("load");
        tokio::time::sleep(ttl.saturating_sub(loaded.elapsed()) + Duration::from_millis(20)).await;
        assert!(cached.user_roles_in_memory("u1", 0).is_none(), "not served past the TTL");
        let loads = counting.loads.load(Ordering::SeqCst);
        cached.user_roles(&user("u1"), 0).await.expect("load");
        assert_eq!(counting.loads.load(Ordering::SeqCst), loads + 1, "loaded again");
    }

    #[tokio::test]
    async fn capacity_bounds_the_entries() {
        let dir = tempfile::tempdir().expect("dir");
        let (_, cached) = fixture(&dir, 10).await;
        for i in 0..100 {
            cached.user_roles(&user(&format!("u{i}")), 0).await.expect("load");
        }
        cached.cache.run_pending_tasks();
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
