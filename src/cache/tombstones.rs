//! Deleted tenants, remembered while roles read before their deletion may be cached.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use moka::sync::Cache;

use crate::domain::{Revision, UserRoles};

/// Deleted tenants: roles read before the revision that deleted a tenant, naming it, are
/// stale. A tombstone is kept for `keep` after its deletion is heard of (no entry read
/// before it can still be cached after that). The read side takes no lock: while no
/// deletion was heard of within `keep` it looks no further than one atomic, and otherwise
/// asks a moka cache, whose reads are lock-free, and which expires each tombstone by
/// itself.
pub(super) struct Tombstones {
    /// When the last deletion was heard of, in ms after `epoch` (0: never).
    last_ms: AtomicU64,
    epoch: Instant,
    keep: Duration,
    /// Tenant -> the revision that deleted it.
    deleted: Cache<Box<str>, Revision>,
}

impl Tombstones {
    /// Tombstones kept for `keep` each.
    pub(super) fn new(keep: Duration) -> Self {
        Self {
            last_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            keep,
            deleted: Cache::builder().time_to_live(keep.max(Duration::from_millis(1))).build(),
        }
    }

    /// Whether `roles` were read before the deletion of a tenant they name.
    pub(super) fn buries(&self, roles: &UserRoles) -> bool {
        let last = self.last_ms.load(Ordering::Acquire);
        if last == 0 || self.now_ms() > last + self.keep.as_millis() as u64 {
            return false;
        }
        roles.names_tenant(|tenant| self.deleted.get(tenant).is_some_and(|at| roles.revision < at))
    }

    /// Records the deletion of `tenant` at `revision`.
    pub(super) fn bury(&self, tenant: &str, revision: Revision) {
        self.deleted
            .entry(tenant.into())
            .and_upsert_with(|kept| kept.map_or(revision, |kept| kept.into_value().max(revision)));
        self.last_ms.fetch_max(self.now_ms().max(1), Ordering::AcqRel);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}
