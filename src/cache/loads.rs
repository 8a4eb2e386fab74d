//! Loads from the store: a miss joins the load running for its user (one store read
//! however many reads miss at once), a load never reads older than the feed's floor, and
//! a load whose every reader went away is removed and so cancelled.

use std::{
    sync::{Arc, PoisonError},
    time::Duration,
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};

use super::{CachedStore, Place};
use crate::{
    domain::{UserId, UserRoles},
    error::Error,
};

/// A read waiting on a load in flight; when it goes (done, or its caller gone) it leaves
/// the load (see [`CachedStore::leave_load`]).
pub(super) struct Reader<'a> {
    pub(super) cache: &'a CachedStore,
    pub(super) user: &'a str,
    pub(super) load: Load,
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        self.cache.leave_load(self.user, &self.load);
    }
}

/// How often a load asks again for a store that is behind the cache's floor, and how
/// long it waits in between (see [`Coherence::floor`]).
const FLOOR_ATTEMPTS: usize = 5;
/// See [`FLOOR_ATTEMPTS`].
const FLOOR_RETRY: Duration = Duration::from_millis(10);

/// A load from the store shared by every read of the user that misses while it runs.
pub(super) type Load = Shared<BoxFuture<'static, std::result::Result<Loaded, Arc<Error>>>>;

#[derive(Clone)]
pub(super) struct Loaded {
    /// The user's generation read before the store was.
    pub(super) generation: u64,
    pub(super) roles: Arc<UserRoles>,
}

impl CachedStore {
    /// The load running for `user`, or a new one; the caller is one more of its readers
    /// (see [`Reader`]). A load is never served stale: its generation was read before its
    /// store read ran, however late that is.
    pub(super) fn join_load(&self, user: &UserId, place: &Place) -> Load {
        let mut loading = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((load, readers)) = loading.get_mut(user.as_str()) {
            *readers += 1;
            return load.clone();
        }
        self.misses.inc();
        // Read before the store is: see the module's comment. The floor after the
        // generation: see `Coherence::floor`.
        let generation = self.generation_of(place.fingerprint);
        let floor = self.coherence.floor();
        let (inner, owned) = (self.inner.clone(), user.clone());
        let load = async move {
            // A floor a moment ahead of what the store shows (a notification can arrive
            // before its transaction is visible to other sessions) is waited out briefly.
            for _ in 0..FLOOR_ATTEMPTS {
                match inner.user_roles_at_least(&owned, floor).await {
                    Ok(answer) if answer.revision >= floor => {
                        return Ok(Loaded { generation, roles: answer.roles });
                    }
                    Ok(_) | Err(Error::OutOfRange(_)) => {
                        tokio::time::sleep(FLOOR_RETRY).await;
                    }
                    Err(err) => return Err(Arc::new(err)),
                }
            }
            Err(Arc::new(Error::Unavailable(format!(
                "the store has not reached revision {floor}, which this cache already applied"
            ))))
        }
        .boxed()
        .shared();
        loading.insert(user.as_str().into(), (load.clone(), 1));
        load
    }

    /// How many loads are in flight (a gauge: it returns to 0 when reads stop).
    pub fn loads_in_flight(&self) -> usize {
        self.loading.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether `load` is still the load in flight for `user`.
    pub(super) fn is_loading(&self, user: &str, load: &Load) -> bool {
        let loading = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        loading.get(user).is_some_and(|(running, _)| running.ptr_eq(load))
    }

    /// Removes `load` from the loads in flight (if no other read sharing it has).
    pub(super) fn finish_load(&self, user: &str, load: &Load) {
        let mut loading = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        if loading.get(user).is_some_and(|(running, _)| running.ptr_eq(load)) {
            loading.remove(user);
        }
    }

    /// One read leaves `load`; the last one out of a load still in flight removes it
    /// (and so drops and cancels it): a caller that gives up mid-load leaves nothing.
    fn leave_load(&self, user: &str, load: &Load) {
        let mut loading = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((running, readers)) = loading.get_mut(user)
            && running.ptr_eq(load)
        {
            *readers -= 1;
            if *readers == 0 {
                loading.remove(user);
            }
        }
    }
}
