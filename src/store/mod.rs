//! The membership store: one narrow async trait, one implementation per backend.
//!
//! Every write runs in one transaction that increments the single revision row as its
//! last statement; the row lock makes revisions follow commit order. Every read comes
//! from one statement, so the rows and the revision it reports are one snapshot.

mod measured;
mod postgres;
mod sql;

mod sql_store;
mod sqlite;

use std::{path::Path, sync::Arc, time::Duration};

use async_trait::async_trait;

use crate::{
    domain::{Revision, Role, TenantId, UnixSeconds, UserId, UserRoles},
    error::Result,
};

pub use measured::MeasuredStore;
pub use postgres::PgStore;
pub use sql::list_changes_sql;
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
    /// Who asked, for the audit trail.
    pub caller: String,
}

/// The membership store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Everything `user` holds, and the revision the answer reflects. An answer older
    /// than `min_revision` is never returned.
    async fn user_roles(&self, user: &UserId, min_revision: Revision) -> Result<Answer>;

    /// The answer to [`user_roles`](Self::user_roles) when it is in memory and current,
    /// without waiting or allocating; `None` means "ask `user_roles`". `user` must be a
    /// valid [`UserId`]. Only the cache answers; the hot path of `Check` and `CheckBatch`.
    /// The caller reports the answers it got with [`count_hits`](Self::count_hits).
    fn user_roles_in_memory(&self, _user: &str, _min_revision: Revision) -> Option<Answer> {
        None
    }

    /// Counts `n` answers from [`user_roles_in_memory`](Self::user_roles_in_memory), once
    /// per request rather than once per user (one shared counter, two cores).
    fn count_hits(&self, _n: u64) {}

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
    async fn create_tenant(&self, tenant: &Tenant, caller: &str) -> Result<Revision>;

    /// Reads a tenant; `NotFound` if absent.
    async fn get_tenant(&self, id: &TenantId) -> Result<Tenant>;

    /// Up to `limit` tenants with id after `after`, ordered by id.
    async fn list_tenants(&self, after: Option<&TenantId>, limit: u32) -> Result<Vec<Tenant>>;

    /// Deletes a tenant and every membership in it; `NotFound` if absent.
    async fn delete_tenant(&self, id: &TenantId, caller: &str) -> Result<Revision>;

    /// The current revision; doubles as the readiness probe.
    async fn revision(&self) -> Result<Revision>;

    /// Closes the connections, waiting for checked-out ones to come back.
    async fn close(&self);

    /// The feed of committed changes, in revision order. Called once, by the server.
    async fn subscribe(&self) -> Result<Feed>;

    /// Up to `limit` history entries after `after`, in revision order, and the revision
    /// through which history has been pruned.
    async fn changes_after(&self, after: Revision, limit: u32) -> Result<History>;

    /// Up to `limit` history entries after `after` that match `filter`, in revision order.
    async fn list_changes(
        &self,
        filter: &ChangeFilter,
        after: Revision,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>>;

    /// Drops history committed before `older_than_ms` (unix ms); returns the new floor.
    /// Not a write: no revision is committed.
    async fn prune_history(&self, older_than_ms: i64) -> Result<Revision>;
}

/// A user's roles as answered, and the revision the answer reflects (at least the
/// revision the roles were read at; a cache vouches for later revisions too).
#[derive(Clone, Debug)]
pub struct Answer {
    /// The roles.
    pub roles: Arc<UserRoles>,
    /// The revision the answer reflects.
    pub revision: Revision,
}

impl Answer {
    /// An answer reflecting exactly the revision the roles were read at.
    pub fn new(roles: Arc<UserRoles>) -> Self {
        let revision = roles.revision;
        Self { roles, revision }
    }
}

/// What a committed write changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A user's roles in a tenant.
    Membership,
    /// A tenant was created.
    TenantCreated,
    /// A tenant and all its memberships went away.
    TenantDeleted,
}

impl ChangeKind {
    /// The one-letter code stored in the history and sent in notifications.
    pub fn code(self) -> &'static str {
        match self {
            ChangeKind::Membership => "m",
            ChangeKind::TenantCreated => "c",
            ChangeKind::TenantDeleted => "d",
        }
    }

    /// The kind a code stands for.
    pub fn from_code(code: &str) -> Option<Self> {
        match code.trim() {
            "m" => Some(ChangeKind::Membership),
            "c" => Some(ChangeKind::TenantCreated),
            "d" => Some(ChangeKind::TenantDeleted),
            _ => None,
        }
    }
}

/// A change being committed.
#[derive(Clone, Copy, Debug)]
pub struct ChangeRef<'a> {
    /// What changed.
    pub kind: ChangeKind,
    /// The tenant.
    pub tenant: &'a str,
    /// The user; empty for tenant changes.
    pub user: &'a str,
    /// Who asked.
    pub caller: &'a str,
}

/// Which history entries `list_changes` returns; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct ChangeFilter {
    /// Only this tenant.
    pub tenant_id: String,
    /// Only this user.
    pub user_id: String,
    /// Only this caller.
    pub caller: String,
}

/// One committed change, from the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The revision it committed at.
    pub revision: Revision,
    /// What changed.
    pub kind: ChangeKind,
    /// The tenant.
    pub tenant_id: String,
    /// The user; empty for tenant changes.
    pub user_id: String,
    /// The user's live roles in the tenant after the change.
    pub roles: Vec<String>,
    /// Who made the change.
    pub caller: String,
    /// When it committed, unix milliseconds.
    pub committed_at_ms: i64,
}

/// A page of history.
#[derive(Clone, Debug)]
pub struct History {
    /// Entries in revision order.
    pub entries: Vec<HistoryEntry>,
    /// History at or below this revision was pruned.
    pub pruned_through: Revision,
}

/// An event on a store's change feed, in revision order.
#[derive(Clone, Debug)]
pub enum FeedEvent {
    /// The feed is (again) complete from here on; everything up to `revision` is in the
    /// store. Caches must flush what they hold from before.
    Connected {
        /// The store's revision once listening.
        revision: Revision,
    },
    /// A write committed at `revision`.
    Changed {
        /// The revision.
        revision: Revision,
        /// Whose cached roles it makes stale.
        stale: Stale,
    },
    /// Every write up to `revision` has been delivered, as of `at`.
    Synced {
        /// The store's revision when the sync was sent.
        revision: Revision,
        /// When the sync was sent.
        at: std::time::Instant,
    },
    /// The feed lost its connection: changes may be missed until `Connected`.
    Lost,
}

/// Whose cached roles a change makes stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stale {
    /// Nobody's (a tenant was created).
    Nobody,
    /// One user's.
    User(String),
    /// Every member's of a tenant deleted at a revision: roles read before it that name
    /// the tenant.
    Tenant {
        /// The deleted tenant.
        tenant: String,
        /// The revision that deleted it.
        revision: Revision,
    },
    /// Anyone's (the feed was lost or restarted).
    Everyone,
}

impl Stale {
    /// Who a change at `revision` makes stale: for a membership, `subject` is the user;
    /// for a deleted tenant, the tenant.
    pub fn of(kind: ChangeKind, subject: &str, revision: Revision) -> Self {
        match kind {
            ChangeKind::Membership => Stale::User(subject.to_owned()),
            ChangeKind::TenantCreated => Stale::Nobody,
            // An announcement from an older replica names no tenant.
            ChangeKind::TenantDeleted if subject.is_empty() => Stale::Everyone,
            ChangeKind::TenantDeleted => Stale::Tenant { tenant: subject.to_owned(), revision },
        }
    }
}

/// A store's change feed.
#[derive(Debug)]
pub struct Feed {
    /// The events.
    pub events: tokio::sync::mpsc::UnboundedReceiver<FeedEvent>,
    /// Whether the feed can go silent without saying so (a network listener): then the
    /// cache trusts it only while a `Synced` event is recent.
    pub needs_lease: bool,
}

/// Connection settings shared by both backends.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Maximum pooled connections.
    pub max_connections: u32,
    /// How long a call waits for a connection before answering `UNAVAILABLE`.
    pub acquire_timeout: Duration,
    /// Longest one database call may take, client side and server side
    /// (`statement_timeout`); past it, `UNAVAILABLE`.
    pub query_timeout: Duration,
    /// Postgres: the change listener reconnects when it has heard nothing, not even its
    /// own sync notification, for this long.
    pub listener_silence: Duration,
    /// A fault point for tests: every write waits this long right after its COMMIT,
    /// before it is announced and answered.
    pub fault_after_commit: Option<Duration>,
}

/// Most writes waiting for their turn (the Postgres writer's queue, the SQLite write
/// lock's waiters); past it a write is `UNAVAILABLE` at once rather than queued without
/// bound.
pub const MAX_QUEUED_WRITES: usize = 4096;

/// Announces committed writes on an in-process change feed (the embedded store);
/// Postgres announces with `NOTIFY`, delivered at COMMIT, so its announcer is silent.
#[derive(Clone, Debug)]
pub struct Announcer(Option<tokio::sync::mpsc::UnboundedSender<FeedEvent>>);

impl Announcer {
    /// Announces on `feed`.
    pub fn on(feed: tokio::sync::mpsc::UnboundedSender<FeedEvent>) -> Self {
        Self(Some(feed))
    }

    /// Announces nothing (the database does).
    pub fn database() -> Self {
        Self(None)
    }

    /// The write that changed `kind` for `subject` (the user of a membership, the
    /// tenant of a tenant change) committed at `revision`.
    pub fn committed(&self, revision: Revision, kind: ChangeKind, subject: &str) {
        if let Some(feed) = &self.0 {
            let stale = Stale::of(kind, subject, revision);
            let _ = feed.send(FeedEvent::Changed { revision, stale });
        }
    }
}

impl StoreOptions {
    /// `max_connections` and `acquire_timeout`, with a 5 s query timeout and a 2 s
    /// listener silence.
    pub fn new(max_connections: u32, acquire_timeout: Duration) -> Self {
        Self {
            max_connections,
            acquire_timeout,
            query_timeout: Duration::from_secs(5),
            listener_silence: Duration::from_secs(2),
            fault_after_commit: None,
        }
    }
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
            } else {
                store.check_schema().await?;
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
            } else {
                store.check_schema().await?;
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
