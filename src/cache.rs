//! The moka cache: a decorator with the same [`Store`] interface as what it wraps.
//!
//! Entries are per user (everything the user holds, at one revision), so a `Check` and
//! the user's `GetAuthorization` always agree. Absent users are cached too (an empty
//! snapshot). An entry lives at most `--cache-ttl` and never past the earliest expiry of
//! a role it holds; reads also filter expired roles by the clock, so expiry is exact to
//! the second whether or not an answer is cached.
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
use moka::{Expiry, future::Cache};

use crate::{
    domain::{Revision, TenantId, UnixSeconds, UserId, UserRoles, now_unix},
    error::{Error, Result},
    store::{Member, MembershipWrite, Store, Tenant},
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

/// A [`Store`] that answers `user_roles` from memory.
pub struct CachedStore {
    inner: Arc<dyn Store>,
    cache: Cache<UserId, Arc<Entry>>,
    generations: Box<[AtomicU64]>,
    hasher: RandomState,
}

impl CachedStore {
    /// Wraps `inner` with a cache of at most `capacity` users, each kept at most `ttl`.
    pub fn new(inner: Arc<dyn Store>, capacity: u64, ttl: Duration) -> Self {
        let cache = Cache::builder()
            .max_capacity(capacity)
            .expire_after(EntryExpiry { ttl })
            .build();
        Self {
            inner,
            cache,
            generations: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
        }
    }

    /// Number of cached users (approximate, for metrics and tests).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    fn generation(&self, user: &UserId) -> &AtomicU64 {
        let shard = self.hasher.hash_one(user) as usize % SHARDS;
        &self.generations[shard]
    }

    async fn forget(&self, user: &UserId) {
        self.generation(user).fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate(user).await;
    }

    async fn forget_all(&self) {
        for generation in self.generations.iter() {
            generation.fetch_add(1, Ordering::SeqCst);
        }
        self.cache.invalidate_all();
    }
}

#[async_trait]
impl Store for CachedStore {
    async fn user_roles(&self, user: &UserId, min_revision: Revision) -> Result<Arc<UserRoles>> {
        let generation = self.generation(user);
        for _ in 0..LOAD_ATTEMPTS {
            let entry = self
                .cache
                .try_get_with_by_ref(user, async {
                    let seen = generation.load(Ordering::SeqCst);
                    let snapshot = self.inner.user_roles(user, 0).await?;
                    Ok::<_, Error>(Arc::new(Entry {
                        generation: seen,
                        snapshot,
                    }))
                })
                .await
                .map_err(Error::unshare)?;
            if entry.generation == generation.load(Ordering::SeqCst)
                && entry.snapshot.revision >= min_revision
            {
                return Ok(entry.snapshot.clone());
            }
            self.cache.invalidate(user).await;
        }
        self.inner.user_roles(user, min_revision).await
    }

    async fn write_membership(&self, write: &MembershipWrite) -> Result<Revision> {
        // Forget even on error: a failed COMMIT may still have committed.
        let result = self.inner.write_membership(write).await;
        self.forget(&write.user).await;
        result
    }

    async fn list_members(
        &self,
        tenant: &TenantId,
        after: Option<&UserId>,
        limit: u32,
        now: UnixSeconds,
    ) -> Result<(Vec<Member>, Revision)> {
        self.inner.list_members(tenant, after, limit, now).await
    }

    async fn create_tenant(&self, tenant: &Tenant) -> Result<Revision> {
        self.inner.create_tenant(tenant).await
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Tenant> {
        self.inner.get_tenant(id).await
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: u32) -> Result<Vec<Tenant>> {
        self.inner.list_tenants(after, limit).await
    }

    async fn delete_tenant(&self, id: &TenantId) -> Result<Revision> {
        let result = self.inner.delete_tenant(id).await;
        self.forget_all().await;
        result
    }

    async fn revision(&self) -> Result<Revision> {
        self.inner.revision().await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}
