//! The embedded store: one SQLite file in WAL mode, so `cargo run` works anywhere.
//!
//! SQLite allows one writer at a time, so writes go through a one-connection pool (they
//! queue in-process instead of failing with `SQLITE_BUSY`) while reads use their own pool.
//! A write holds the store's write lock from `BEGIN` until it has announced its
//! commit on the in-process change feed, so the feed is in revision order. The file
//! belongs to one process: the feed only knows this process's writes.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{
    QueryBuilder, Sqlite, SqlitePool, Transaction,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use tokio::sync::{Mutex, OwnedMutexGuard, Semaphore, mpsc};

mod bulk;

use crate::{
    domain::{Revision, TenantId, UserId},
    error::{Error, Result},
    store::{
        Announcer, Answer, Backend, ChangeFeed, ChangeKind, ChangeRef, Feed, FeedEvent,
        MAX_QUEUED_WRITES, MembershipWrite, Remove, RoleReads, StoreOptions, Tenant, Writes,
        check_min_revision,
        shared::{self, Bind},
        sql,
    },
};

/// Memberships in an embedded SQLite file.
pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    application_id: TenantId,
    serial: Arc<Mutex<()>>,
    /// Writes waiting for `serial`, bounded by [`MAX_QUEUED_WRITES`].
    waiting: Semaphore,
    fault_after_commit: Option<Duration>,
    feed_tx: mpsc::Sender<FeedEvent>,
    /// Whether the feed has its subscriber: before, writes announce nothing (the
    /// subscription's `Connected` covers them), so a store nobody follows (a test, a
    /// migration) never fills the bounded feed. Set and read under `serial`.
    subscribed: std::sync::atomic::AtomicBool,
    feed_rx: std::sync::Mutex<Option<mpsc::Receiver<FeedEvent>>>,
    /// The file is this process's until the store is closed (see `super::owner`).
    owner: std::sync::Mutex<Option<super::owner::Owner>>,
}

/// The file path in a `sqlite:` URL (`sqlite://path/to/file.db` or `sqlite:file.db`).
///
/// An in-memory database (`sqlite::memory:`, `mode=memory`) is refused: the store reads
/// and writes through two pools, and each in-memory connection would be a database of
/// its own, so writes would never be seen. A file on a tmpfs is the throwaway store.
pub fn path_from_url(url: &str) -> Result<PathBuf> {
    if url.contains(":memory:") || url.contains("mode=memory") {
        return Err(Error::invalid(
            "database_url",
            "an in-memory SQLite database is not supported (each connection would see its \
             own); use sqlite:PATH, e.g. a file under /dev/shm for a throwaway store",
        ));
    }
    url.strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| Error::invalid("database_url", "must start with postgres:// or sqlite:"))
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(
        path: &Path,
        application_id: &TenantId,
        options: &StoreOptions,
    ) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| {
                Error::FailedPrecondition(format!("cannot create {}: {err}", dir.display()))
            })?;
        }
        let owner = super::owner::Owner::take(path)?;
        tracing::debug!(lock = %owner.path().display(), "embedded store locked");
        let connect = SqliteConnectOptions::from_str("sqlite:")
            .map_err(|err| Error::Internal(Box::new(err)))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout.max(Duration::from_secs(5)))
            .connect_with(connect.clone())
            .await?;
        let read = SqlitePoolOptions::new()
            .max_connections(options.max_connections.clamp(1, 8))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        let (feed_tx, feed_rx) = super::feed_channel();
        Ok(Self {
            read,
            write,
            application_id: application_id.clone(),
            serial: Arc::new(Mutex::new(())),
            waiting: Semaphore::new(MAX_QUEUED_WRITES),
            fault_after_commit: options.fault_after_commit,
            feed_tx,
            subscribed: std::sync::atomic::AtomicBool::new(false),
            feed_rx: std::sync::Mutex::new(Some(feed_rx)),
            owner: std::sync::Mutex::new(Some(owner)),
        })
    }

    /// Applies the embedded migrations. Refuses a schema newer than this binary knows.
    pub async fn migrate(&self) -> Result<()> {
        self.migrator().run(&self.write).await?;
        Ok(())
    }

    fn migrator(&self) -> sqlx::migrate::Migrator {
        sqlx::migrate!("./migrations/sqlite")
    }

    /// Without migrating: refuses a schema newer than this binary knows, or one that
    /// still needs `rolecheck migrate`.
    pub async fn check_schema(&self) -> Result<()> {
        let known = self.migrator().iter().map(|m| m.version).max().unwrap_or(0);
        let applied = sqlx::query_as(sql::APPLIED_SCHEMA).fetch_one(&self.read).await;
        sql::schema_status(applied, known)
    }

    /// Creates the application tenant if it does not exist yet. Not a write: the
    /// application tenant is part of the schema's starting state.
    pub async fn ensure_application_tenant(&self, id: &TenantId) -> Result<()> {
        sqlx::query(sql::ENSURE_TENANT)
            .bind(id.as_str())
            .bind("Application")
            .bind(crate::domain::now_millis())
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Begins a write: one at a time, at most [`MAX_QUEUED_WRITES`] waiting for their
    /// turn (past that, `UNAVAILABLE` at once). The lock is held until the write is
    /// announced ([`sql::commit`]).
    async fn begin(&self) -> Result<(Transaction<'static, Sqlite>, OwnedMutexGuard<()>)> {
        let serial = {
            let _waiting = self.waiting.try_acquire().map_err(|_| {
                Error::Unavailable("store unavailable: too many writes queued, retry".into())
            })?;
            self.serial.clone().lock_owned().await
        };
        Ok((self.write.begin().await?, serial))
    }

    /// Records `change` in the open write (the next revision, the history row), then
    /// commits and announces it.
    async fn commit(
        &self,
        mut tx: Transaction<'static, Sqlite>,
        serial: OwnedMutexGuard<()>,
        change: ChangeRef<'_>,
    ) -> Result<Revision> {
        // The roles after this change, for the history row (none for a tenant change).
        let roles = if change.kind == ChangeKind::Membership {
            let rows: Vec<(String,)> = sqlx::query_as(sql::ROLES_AFTER)
                .bind(change.tenant)
                .bind(change.user)
                .bind(crate::domain::now_unix())
                .fetch_all(&mut *tx)
                .await?;
            rows.into_iter().map(|(role,)| role).collect::<Vec<_>>().join(",")
        } else {
            String::new()
        };
        let (revision,): (i64,) = sqlx::query_as(sql::BUMP_REVISION).fetch_one(&mut *tx).await?;
        sqlx::query(sql::INSERT_CHANGE)
            .bind(revision)
            .bind(change.kind.code())
            .bind(change.tenant)
            .bind(change.user)
            .bind(roles)
            .bind(crate::domain::now_millis())
            .bind(change.caller)
            .execute(&mut *tx)
            .await?;
        let announcement = self.announcement(vec![(change.kind, change.subject().to_owned())]);
        sql::commit(tx, revision as Revision, announcement, Some(serial)).await
    }

    /// How a write announces `changes` once committed: on the in-process feed, once it
    /// has its subscriber. Called under the write lock.
    fn announcement(&self, changes: Vec<(ChangeKind, String)>) -> sql::Announcement {
        sql::Announcement {
            announcer: match self.subscribed.load(std::sync::atomic::Ordering::SeqCst) {
                true => Announcer::on(self.feed_tx.clone()),
                false => Announcer::database(),
            },
            changes,
            fault_after_commit: self.fault_after_commit,
        }
    }
}

#[async_trait]
impl shared::Run for SqliteStore {
    /// On the read pool.
    async fn rows<O: shared::Row>(&self, statement: &str, binds: &[Bind<'_>]) -> Result<Vec<O>> {
        let mut query = sqlx::query_as::<Sqlite, O>(statement);
        for bind in binds {
            query = match *bind {
                Bind::Text(text) => query.bind(text),
                Bind::Int(int) => query.bind(int),
            };
        }
        Ok(query.fetch_all(&self.read).await?)
    }

    /// On the write connection, between writes (it takes no turn among them: it announces
    /// nothing, so it needs no place in their order).
    async fn execute(&self, statement: &str, binds: &[Bind<'_>]) -> Result<u64> {
        let mut query = sqlx::query::<Sqlite>(statement);
        for bind in binds {
            query = match *bind {
                Bind::Text(text) => query.bind(text),
                Bind::Int(int) => query.bind(int),
            };
        }
        Ok(query.execute(&self.write).await?.rows_affected())
    }
}

#[async_trait]
impl RoleReads for SqliteStore {
    async fn user_roles(&self, user: &UserId, min_revision: Revision) -> Result<Answer> {
        let snapshot = shared::user_roles(self, user).await?;
        check_min_revision(snapshot.revision, min_revision)?;
        Ok(Answer::new(Arc::new(snapshot)))
    }
}

#[async_trait]
impl Writes for SqliteStore {
    /// Carries out the write's [`plan`](MembershipWrite::plan) as single statements.
    async fn write_membership(&self, write: &MembershipWrite) -> Result<Revision> {
        let plan = write.plan();
        let (mut tx, serial) = self.begin().await?;
        let exists: Option<(i32,)> = sqlx::query_as(sql::TENANT_EXISTS)
            .bind(plan.tenant.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            if plan.missing_tenant_ok {
                let (revision,): (i64,) = sqlx::query_as(sql::REVISION).fetch_one(&mut *tx).await?;
                return Ok(revision as Revision);
            }
            return Err(Error::NotFound(format!("tenant {} not found", plan.tenant)));
        }
        match plan.remove {
            Remove::Nothing => {}
            Remove::All => {
                sqlx::query(sql::DELETE_MEMBER)
                    .bind(plan.tenant.as_str())
                    .bind(plan.user.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            Remove::These(roles) => {
                let mut query = QueryBuilder::<Sqlite>::new(sql::DELETE_ROLES_PREFIX);
                query.push_bind(plan.tenant.as_str());
                query.push(" AND user_id = ").push_bind(plan.user.as_str());
                query.push(" AND role IN (");
                let mut list = query.separated(", ");
                for role in roles {
                    list.push_bind(role.as_str());
                }
                query.push(")");
                query.build().execute(&mut *tx).await?;
            }
        }
        if !plan.add.is_empty() {
            let mut query = QueryBuilder::<Sqlite>::new(sql::UPSERT_ROLES_PREFIX);
            query.push_values(plan.add, |mut row, role| {
                row.push_bind(plan.tenant.as_str())
                    .push_bind(plan.user.as_str())
                    .push_bind(role.as_str())
                    .push_bind(plan.expires_at);
            });
            query.push(sql::UPSERT_ROLES_SUFFIX);
            query.build().execute(&mut *tx).await?;
        }
        let change = ChangeRef::membership(plan.tenant, plan.user, plan.caller);
        self.commit(tx, serial, change).await
    }

    async fn create_tenant(&self, tenant: &Tenant, caller: &str) -> Result<(Revision, Tenant)> {
        let (mut tx, serial) = self.begin().await?;
        let inserted = sqlx::query(sql::INSERT_TENANT)
            .bind(tenant.id.as_str())
            .bind(tenant.name.as_str())
            .bind(tenant.created_at_ms)
            .execute(&mut *tx)
            .await;
        if let Err(err) = inserted {
            drop((tx, serial));
            return Err(shared::taken(self, &tenant.id, sql::tenant_taken(&tenant.id, err)).await);
        }
        let change = ChangeRef::tenant(ChangeKind::TenantCreated, &tenant.id, caller);
        Ok((self.commit(tx, serial, change).await?, tenant.clone()))
    }

    async fn delete_tenant(&self, id: &TenantId, caller: &str) -> Result<Revision> {
        sql::deletable(id, &self.application_id)?;
        let (mut tx, serial) = self.begin().await?;
        let (size,): (i64,) = sqlx::query_as(sql::TENANT_SIZE)
            .bind(id.as_str())
            .bind(shared::CHUNK + 1)
            .fetch_one(&mut *tx)
            .await?;
        // A big tenant is marked deleted here and purged in chunks (see `shared`).
        let deleted = if size > shared::CHUNK {
            sqlx::query(sql::MARK_TENANT_DELETED)
                .bind(id.as_str())
                .bind(crate::domain::now_millis())
                .execute(&mut *tx)
                .await?
        } else {
            sqlx::query(sql::DELETE_TENANT_MEMBERS).bind(id.as_str()).execute(&mut *tx).await?;
            sqlx::query(sql::DELETE_TENANT).bind(id.as_str()).execute(&mut *tx).await?
        };
        if deleted.rows_affected() == 0 {
            return Err(Error::NotFound(format!("tenant {id} not found")));
        }
        self.commit(tx, serial, ChangeRef::tenant(ChangeKind::TenantDeleted, id, caller)).await
    }

    async fn set_model(&self, spec: &str, caller: &str) -> Result<Revision> {
        let (mut tx, serial) = self.begin().await?;
        sqlx::query(sql::PUT_MODEL).bind(spec).execute(&mut *tx).await?;
        sqlx::query(sql::MODEL_SET_NOW).execute(&mut *tx).await?;
        self.commit(tx, serial, ChangeRef::model(caller)).await
    }

    async fn import_batch(
        &self,
        batch: &crate::store::ImportBatch,
    ) -> Result<crate::store::Imported> {
        self.import(batch).await
    }
}

#[async_trait]
impl ChangeFeed for SqliteStore {
    /// The in-process feed: this process's writes, announced in revision order.
    async fn subscribe(&self) -> Result<Feed> {
        let _serial = self.serial.lock().await;
        let events = self
            .feed_rx
            .lock()
            .map_err(|_| Error::Internal("feed lock poisoned".into()))?
            .take()
            .ok_or_else(|| Error::Internal("the change feed has one subscriber".into()))?;
        let at = std::time::Instant::now();
        let (revision, epoch): (i64, String) =
            sqlx::query_as(sql::IDENTITY).fetch_one(&self.read).await?;
        self.subscribed.store(true, std::sync::atomic::Ordering::SeqCst);
        let revision = revision as Revision;
        let _ = self.feed_tx.send(FeedEvent::Connected { revision, epoch, at }).await;
        Ok(Feed { events, needs_lease: false })
    }
}

#[async_trait]
impl Backend for SqliteStore {
    async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
        // Closed: another process (or a restart in this one) may open the file now.
        self.owner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    }

    async fn export(&self, out: mpsc::Sender<crate::store::ExportPage>) -> Result<Revision> {
        SqliteStore::export(self, out).await
    }
}
