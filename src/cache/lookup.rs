//! How every reader gets a user's roles: from the cache's memory when it holds them, else
//! through the store (which fills the cache).

use std::sync::Arc;

use super::CachedStore;
use crate::{
    domain::{Revision, UserId},
    error::Result,
    store::{Answer, RoleReads},
};

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
