//! The membership store, as five narrow traits: [`RoleReads`] (one user's roles, what
//! the cache decorates), [`TenantReads`], [`Writes`], [`ChangeFeed`] and [`HistoryLog`].
//! A backend implements all five plus [`Backend::close`]: [`SqliteStore`] and [`PgStore`]
//! do, each plainly, sharing the statements, row folding and write ending of `sql.rs`.
//! The services hold a [`Store`], one trait object per part, so a decorator
//! ([`MeasuredStore`], the cache) replaces only the parts it changes.
//!
//! Every write runs in one transaction that takes the single revision row first (one
//! lock order, so writers never deadlock) and increments it once per change; the row
//! lock makes revisions follow commit order. A membership write's meaning is defined once,
//! by [`MembershipWrite::plan`]; each backend carries the plan out. Every read comes from
//! one statement, so the rows and the revision it reports are one snapshot.
//!
//! The store-level conformance suite every backend runs is `tests/api/store.rs`.

pub mod bulk;
mod inspect;
pub mod measured;
mod owner;
mod postgres;
mod shared;
mod sql;
mod sqlite;

use std::{path::Path, sync::Arc, time::Duration};

use async_trait::async_trait;

use crate::{
    domain::{Revision, Role, TenantId, UnixSeconds, UserId, UserRoles},
    error::Result,
};

pub use bulk::{ExportPage, ImportBatch, Imported, UserMemberships};
pub use inspect::{Inspection, inspect};
pub use measured::MeasuredStore;
pub use postgres::{PgStore, diagnose};
pub use shared::CHUNK as PURGE_CHUNK;
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

impl MembershipWrite {
    /// What this write does to the stored rows: the one definition of Grant, Revoke and
    /// SetRoles. Each backend carries a plan out as it is, with no meaning of its own (the
    /// embedded store in statements, Postgres in `rolecheck_apply_plans`, migration 0007).
    pub fn plan(&self) -> Plan<'_> {
        let remove = match self.kind {
            WriteKind::SetRoles => Remove::All,
            WriteKind::Revoke if self.roles.is_empty() => Remove::All,
            WriteKind::Revoke => Remove::These(&self.roles),
            WriteKind::Grant => Remove::Nothing,
        };
        let add: &[Role] = if self.kind == WriteKind::Revoke { &[] } else { &self.roles };
        Plan {
            tenant: &self.tenant,
            user: &self.user,
            remove,
            add,
            expires_at: self.expires_at,
            // A Revoke in a tenant that no longer exists changes nothing and succeeds (a
            // retry after DeleteTenant is not an error); anything else there is NOT_FOUND.
            missing_tenant_ok: self.kind == WriteKind::Revoke,
            caller: &self.caller,
        }
    }
}

/// A membership write as row changes, in this order: remove, then add.
#[derive(Clone, Copy, Debug)]
pub struct Plan<'a> {
    /// The tenant.
    pub tenant: &'a TenantId,
    /// The user.
    pub user: &'a UserId,
    /// Which of the user's roles in the tenant to remove first.
    pub remove: Remove<'a>,
    /// Roles to insert, or to give `expires_at` when already held.
    pub add: &'a [Role],
    /// Expiry for the added roles.
    pub expires_at: Option<UnixSeconds>,
    /// Whether a missing tenant is success with no change (else `NotFound`).
    pub missing_tenant_ok: bool,
    /// Who asked.
    pub caller: &'a str,
}

/// Which roles a [`Plan`] removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remove<'a> {
    /// None.
    Nothing,
    /// Every role the user holds in the tenant.
    All,
    /// These roles.
    These(&'a [Role]),
}

/// One user's roles: what `Check` asks. The cache decorates this trait alone.
#[async_trait]
pub trait RoleReads: Send + Sync + 'static {
    /// Everything `user` holds, and the revision the answer reflects. An answer older
    /// than `min_revision` is never returned.
    async fn user_roles(&self, user: &UserId, min_revision: Revision) -> Result<Answer>;

    /// [`user_roles`](Self::user_roles) for a cache that is current through `floor`: any
    /// copy of the store that has reached `floor` may answer (a standby, on Postgres with
    /// `--read-database-url`), since the cache learns of every later change itself.
    async fn user_roles_at_least(&self, user: &UserId, floor: Revision) -> Result<Answer> {
        self.user_roles(user, floor).await
    }
}

/// Tenants, their members, and the store's revision.
#[async_trait]
pub trait TenantReads: Send + Sync + 'static {
    /// Up to `limit` members of `tenant` with user id after `after`, ordered by user id,
    /// with live roles at `now`; and the revision the page reflects.
    async fn list_members(
        &self,
        tenant: &TenantId,
        after: Option<&UserId>,
        limit: u32,
        now: UnixSeconds,
    ) -> Result<(Vec<Member>, Revision)>;

    /// Reads a tenant; `NotFound` if absent.
    async fn get_tenant(&self, id: &TenantId) -> Result<Tenant>;

    /// Up to `limit` tenants with id after `after`, ordered by id.
    async fn list_tenants(&self, after: Option<&TenantId>, limit: u32) -> Result<Vec<Tenant>>;

    /// The current revision; doubles as the readiness probe.
    async fn revision(&self) -> Result<Revision>;

    /// The model as set, and the revision that set it (empty, and 0, if never set).
    async fn get_model(&self) -> Result<StoredModel>;

    /// The current revision, read where it is decided: a store that only mirrors
    /// another (a follower's upstream) first waits, briefly, to have mirrored
    /// `at_least`, so a revision it has not heard of yet is not mistaken for one the
    /// store never reached. A store that decides its own revision answers as
    /// [`revision`](Self::revision) does.
    async fn revision_reaching(&self, at_least: Revision) -> Result<Revision> {
        let _ = at_least;
        self.revision().await
    }
}

/// Every write: each commits at a revision of its own, or not at all.
///
/// A write's outcome is decided once: either it never commits, or it commits *and* is
/// announced on the change feed, whatever its caller does meanwhile (see
/// [`sql::commit`]).
#[async_trait]
pub trait Writes: Send + Sync + 'static {
    /// Applies one membership write; returns the revision it committed at. An unknown
    /// tenant is `NotFound`, except for a Revoke (see [`MembershipWrite::plan`]).
    async fn write_membership(&self, write: &MembershipWrite) -> Result<Revision>;

    /// Creates a tenant; `AlreadyExists` if the id is taken. Returns the revision and the
    /// tenant as created (a follower's upstream sets `created_at` by its own clock).
    async fn create_tenant(&self, tenant: &Tenant, caller: &str) -> Result<(Revision, Tenant)>;

    /// Deletes a tenant and every membership in it; `NotFound` if absent.
    async fn delete_tenant(&self, id: &TenantId, caller: &str) -> Result<Revision>;

    /// Sets the model to `spec` (a model file, checked by the caller; empty removes the
    /// model); returns the revision it takes effect at.
    async fn set_model(&self, spec: &str, caller: &str) -> Result<Revision>;

    /// Applies a batch of an import at one revision (see [`bulk`]). A store that only
    /// relays writes (a follower's upstream) refuses: import into the upstream.
    async fn import_batch(&self, batch: &bulk::ImportBatch) -> Result<bulk::Imported> {
        let _ = batch;
        Err(crate::error::Error::FailedPrecondition(
            "a follower does not import: run the import against its upstream (--server)".into(),
        ))
    }
}

/// The feed of committed changes.
#[async_trait]
pub trait ChangeFeed: Send + Sync + 'static {
    /// The feed of committed changes, in revision order. Called once, by the server.
    async fn subscribe(&self) -> Result<Feed>;
}

/// The history of committed changes: what `Watch` catches up from and `ListChanges`
/// (the audit trail) pages through.
#[async_trait]
pub trait HistoryLog: Send + Sync + 'static {
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

    /// Deletes the memberships of tenants marked deleted (see `shared`); returns how many.
    /// Not a write: readers already treat them as gone. A store that marks none has none.
    async fn purge_deleted_tenants(&self) -> Result<u64> {
        Ok(0)
    }
}

/// A storage backend: every part, and a way to close it. SQLite and Postgres are two;
/// a third joins by implementing these traits.
#[async_trait]
pub trait Backend: RoleReads + TenantReads + Writes + ChangeFeed + HistoryLog {
    /// Closes the connections, waiting for checked-out ones to come back.
    async fn close(&self);

    /// Sends every live membership, read in one snapshot, to `out` as pages of whole
    /// users in user order (see [`bulk`]); returns the snapshot's revision. Stops early,
    /// without error, when `out` closes. A follower's upstream refuses: export from the
    /// upstream.
    async fn export(&self, out: tokio::sync::mpsc::Sender<bulk::ExportPage>) -> Result<Revision> {
        let _ = out;
        Err(crate::error::Error::FailedPrecondition(
            "a follower does not export: run the export against its upstream (--server)".into(),
        ))
    }
}

/// The store as the services use it: each part behind its own trait object, so a
/// decorator (the metrics, the cache) replaces only the parts it changes.
#[derive(Clone)]
pub struct Store {
    /// One user's roles.
    pub roles: Arc<dyn RoleReads>,
    /// Tenants, members, the revision.
    pub tenants: Arc<dyn TenantReads>,
    /// Every write.
    pub writes: Arc<dyn Writes>,
    /// History and the audit trail.
    pub history: Arc<dyn HistoryLog>,
    /// The backend under every decorator: its change feed, and `close`.
    pub backend: Arc<dyn Backend>,
}

impl Store {
    /// Every part straight from `backend`.
    pub fn new<B: Backend>(backend: Arc<B>) -> Self {
        Self {
            roles: backend.clone(),
            tenants: backend.clone(),
            writes: backend.clone(),
            history: backend.clone(),
            backend,
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
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
    /// The model (role hierarchy and permissions) was set.
    ModelChanged,
}

impl ChangeKind {
    /// The one-letter code stored in the history and sent in notifications.
    pub fn code(self) -> &'static str {
        match self {
            ChangeKind::Membership => "m",
            ChangeKind::TenantCreated => "c",
            ChangeKind::TenantDeleted => "d",
            ChangeKind::ModelChanged => "M",
        }
    }

    /// The kind a code stands for.
    pub fn from_code(code: &str) -> Option<Self> {
        match code.trim() {
            "m" => Some(ChangeKind::Membership),
            "c" => Some(ChangeKind::TenantCreated),
            "d" => Some(ChangeKind::TenantDeleted),
            "M" => Some(ChangeKind::ModelChanged),
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

impl<'a> ChangeRef<'a> {
    /// A membership write's change.
    pub fn membership(tenant: &'a TenantId, user: &'a UserId, caller: &'a str) -> Self {
        Self { kind: ChangeKind::Membership, tenant: tenant.as_str(), user: user.as_str(), caller }
    }

    /// A tenant's creation or deletion.
    pub fn tenant(kind: ChangeKind, tenant: &'a TenantId, caller: &'a str) -> Self {
        Self { kind, tenant: tenant.as_str(), user: "", caller }
    }

    /// The model's change.
    pub fn model(caller: &'a str) -> Self {
        Self { kind: ChangeKind::ModelChanged, tenant: "", user: "", caller }
    }

    /// Whom it concerns: the user of a membership change, the tenant of a tenant change,
    /// no one in particular for the model (what the feed's [`Stale`] is made of).
    pub fn subject(&self) -> &'a str {
        match self.kind {
            ChangeKind::Membership => self.user,
            ChangeKind::TenantCreated | ChangeKind::TenantDeleted | ChangeKind::ModelChanged => {
                self.tenant
            }
        }
    }
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

impl ChangeFilter {
    /// Each field with the history column it filters, in the order they are bound.
    pub fn columns(&self) -> [(&'static str, &str); 3] {
        [("tenant_id", &self.tenant_id), ("user_id", &self.user_id), ("caller", &self.caller)]
    }

    /// The non-empty fields, in the order [`list_changes_sql`] binds them.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.columns().into_iter().map(|(_, value)| value).filter(|value| !value.is_empty())
    }
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
        /// The store's epoch (its identity): another than before means the store started
        /// over, as does a revision below what was applied (see `crate::coherence`).
        epoch: String,
        /// When the store last proved the feed complete through `revision`.
        at: std::time::Instant,
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
    /// The feed paused and will replay what it misses (a follower's Watch resumes from its
    /// last revision): the cache is not trusted, but kept, until `Resumed`.
    Interrupted,
    /// After `Interrupted`, every change through `revision` has been replayed: the cache
    /// is trusted again.
    Resumed {
        /// The revision caught up to.
        revision: Revision,
        /// When the upstream last proved it was current through `revision`.
        at: std::time::Instant,
    },
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
            // Every answer was read under the old model: none is kept.
            ChangeKind::ModelChanged => Stale::Everyone,
        }
    }
}

/// The model as a store holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredModel {
    /// The model file as set (empty: no model).
    pub spec: String,
    /// The revision that set it; 0 if it was never set.
    pub revision: Revision,
}

/// A store's change feed.
#[derive(Debug)]
pub struct Feed {
    /// The events.
    pub events: tokio::sync::mpsc::Receiver<FeedEvent>,
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
    /// Postgres: the URL goes through a pooler in transaction mode (see
    /// `postgres::Session`).
    pub transaction_pooling: bool,
    /// Postgres: a URL straight to Postgres for the change listener, its heartbeat and
    /// migrations; `None`: the store's own URL.
    pub listen_url: Option<String>,
    /// Postgres: a hot standby that answers a current cache's misses once it has replayed
    /// the revision they need (the primary answers otherwise).
    pub read_url: Option<String>,
}

/// Most writes waiting for their turn (the Postgres writer's queue, the SQLite write
/// lock's waiters); past it a write is `UNAVAILABLE` at once rather than queued without
/// bound.
pub const MAX_QUEUED_WRITES: usize = 4096;

/// Announces committed writes on an in-process change feed (the embedded store);
/// Postgres announces with `NOTIFY`, delivered at COMMIT, so its announcer is silent.
#[derive(Clone, Debug)]
pub struct Announcer(Option<tokio::sync::mpsc::Sender<FeedEvent>>);

/// Events a change feed holds for its consumer before the producer waits: a feed whose
/// consumer falls behind slows its producer (a write's announcement, the listener's reads)
/// instead of growing; meanwhile its syncs age and the cache stops being trusted.
pub const FEED_BUFFER: usize = 4096;

/// A bounded feed channel ([`FEED_BUFFER`]).
pub fn feed_channel()
-> (tokio::sync::mpsc::Sender<FeedEvent>, tokio::sync::mpsc::Receiver<FeedEvent>) {
    tokio::sync::mpsc::channel(FEED_BUFFER)
}

impl Announcer {
    /// Announces on `feed`.
    pub fn on(feed: tokio::sync::mpsc::Sender<FeedEvent>) -> Self {
        Self(Some(feed))
    }

    /// Announces nothing (the database does).
    pub fn database() -> Self {
        Self(None)
    }

    /// The write that changed `kind` for each subject (the user of a membership, the
    /// tenant of a tenant change) committed at `revision`.
    pub async fn committed(&self, revision: Revision, changes: &[(ChangeKind, String)]) {
        if let Some(feed) = &self.0 {
            for (kind, subject) in changes {
                let stale = Stale::of(*kind, subject, revision);
                let _ = feed.send(FeedEvent::Changed { revision, stale }).await;
            }
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
            transaction_pooling: false,
            listen_url: None,
            read_url: None,
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
) -> Result<Store> {
    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = PgStore::connect(url, application_id, options).await?;
            if migrate {
                store.migrate().await?;
            } else {
                store.check_schema().await?;
            }
            store.ensure_application_tenant(application_id).await?;
            Ok(Store::new(Arc::new(store)))
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
            Ok(Store::new(Arc::new(store)))
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
