//! The membership store: one narrow async trait, one implementation per backend.
//!
//! Every write runs in one transaction that increments the single revision row as its
//! last statement; the row lock makes revisions follow commit order. Every read comes
//! from one statement, so the rows and the revision it reports are one snapshot.

mod postgres;
mod sql;
mod sqlite;

use std::{path::Path, sync::Arc, time::Duration};

use async_trait::async_trait;

use crate::{
    domain::{Revision, Role, TenantId, UnixSeconds, UserId, UserRoles},
    error::Result,
};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// A tenant as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    /// The tenant's id.
    pub id: TenantId,
    /// Display name.
    pub name: String,
    /// Creation time, unix milliseconds.
    pub created_at_ms: i64,
}

/// One member of a tenant and their live roles, sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The user.
    pub user_id: String,
    /// Live roles in the tenant, sorted.
    pub roles: Vec<String>,
}

/// How a membership write changes a user's roles in one tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// Add the roles (updating the expiry of those already held).
    Grant,
    /// Remove the roles; with no roles, remove every role.
    Revoke,
    /// Replace the user's roles with exactly these.
    SetRoles,
}

/// One membership write: the user's roles in one tenant change.
#[derive(Clone, Debug)]
pub struct MembershipWrite {
    /// What kind of change.
    pub kind: WriteKind,
    /// The tenant.
    pub tenant: TenantId,
    /// The user.
    pub user: UserId,
    /// Sorted, deduplicated roles.
    pub roles: Vec<Role>,
    /// Expiry for granted roles (unix seconds); `None` never expires.
    pub expires_at: Option<UnixSeconds>,
}

/// The membership store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Everything `user` holds, with the revision it was read at. A snapshot older than
    /// `min_revision` is never returned.
    async fn user_roles(&self, user: &UserId, min_revision: Revision) -> Result<Arc<UserRoles>>;

    /// Applies one membership write; returns the revision it committed at.
    /// An unknown tenant is `NotFound`.
    async fn write_membership(&self, write: &MembershipWrite) -> Result<Revision>;

    /// Up to `limit` members of `tenant` with user id after `after`, ordered by user id,
    /// with live roles at `now`; and the revision the page reflects.
    async fn list_members(
        &self,
        tenant: &TenantId,
        after: Option<&UserId>,
        limit: u32,
        now: UnixSeconds,
    ) -> Result<(Vec<Member>, Revision)>;

    /// Creates a tenant; `AlreadyExists` if the id is taken.
    async fn create_tenant(&self, tenant: &Tenant) -> Result<Revision>;

    /// Reads a tenant; `NotFound` if absent.
    async fn get_tenant(&self, id: &TenantId) -> Result<Tenant>;

    /// Up to `limit` tenants with id after `after`, ordered by id.
    async fn list_tenants(&self, after: Option<&TenantId>, limit: u32) -> Result<Vec<Tenant>>;

    /// Deletes a tenant and every membership in it; `NotFound` if absent.
    async fn delete_tenant(&self, id: &TenantId) -> Result<Revision>;

    /// The current revision; doubles as the readiness probe.
    async fn revision(&self) -> Result<Revision>;

    /// Closes the connections, waiting for checked-out ones to come back.
    async fn close(&self);
}

/// Connection settings shared by both backends.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Maximum pooled connections.
    pub max_connections: u32,
    /// How long a call waits for a connection before answering `UNAVAILABLE`.
    pub acquire_timeout: Duration,
}

/// Opens the store `database_url` names (or the embedded SQLite file in `data_dir`),
/// applies migrations when `migrate` is set, and makes sure the application tenant exists.
pub async fn open(
    database_url: Option<&str>,
    data_dir: &Path,
    application_id: &TenantId,
    options: &StoreOptions,
    migrate: bool,
) -> Result<Arc<dyn Store>> {
    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = PgStore::connect(url, application_id, options).await?;
            if migrate {
                store.migrate().await?;
            }
            store.ensure_application_tenant(application_id).await?;
            Ok(Arc::new(store))
        }
        other => {
            let path = match other {
                Some(url) => sqlite::path_from_url(url)?,
                None => data_dir.join("rolecheck.db"),
            };
            let store = SqliteStore::open(&path, application_id, options).await?;
            if migrate {
                store.migrate().await?;
            }
            store.ensure_application_tenant(application_id).await?;
            Ok(Arc::new(store))
        }
    }
}

/// `OutOfRange` when a snapshot at `revision` cannot satisfy `min_revision`: the caller
/// names a revision the store has not reached, which no committed write returned.
pub(crate) fn check_min_revision(revision: Revision, min_revision: Revision) -> Result<()> {
    if revision < min_revision {
        return Err(crate::error::Error::OutOfRange(format!(
            "min_revision {min_revision} is ahead of the store (at revision {revision})"
        )));
    }
    Ok(())
}

pub(crate) fn tenant_from_row((id, name, created_at_ms): (String, String, i64)) -> Tenant {
    Tenant { id: TenantId::trusted(id), name, created_at_ms }
}
