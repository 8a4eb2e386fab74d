//! Deleted tenants, remembered while roles read before their deletion may be cached.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use crate::domain::{Revision, UserRoles};

/// Deleted tenants: roles read before the revision that deleted a tenant, naming it, are
/// stale. Checked at read time only while any is kept, so a deletion costs the users of
/// other tenants nothing.
#[derive(Default)]
pub(super) struct Tombstones {
    /// How many are kept: a read looks no further while this is 0.
    count: AtomicUsize,
    /// Tenant -> (revision that deleted it, when it was heard of).
    deleted: std::sync::RwLock<HashMap<Box<str>, (Revision, Instant)>>,
}

impl Tombstones {
    /// Whether `roles` were read before the deletion of a tenant they name.
    pub(super) fn buries(&self, roles: &UserRoles) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let Ok(deleted) = self.deleted.read() else { return true };
        roles.names_tenant(|tenant| deleted.get(tenant).is_some_and(|(at, _)| roles.revision < *at))
    }

    /// Records a deletion; drops tombstones older than `keep` (no entry read before them
    /// can still be cached).
    pub(super) fn bury(&self, tenant: &str, revision: Revision, keep: Duration) {
        let Ok(mut deleted) = self.deleted.write() else { return };
        let now = Instant::now();
        deleted.retain(|_, (_, heard)| now.duration_since(*heard) < keep);
        let entry = deleted.entry(tenant.into()).or_insert((revision, now));
        *entry = (entry.0.max(revision), now);
        self.count.store(deleted.len(), Ordering::Release);
    }
}
