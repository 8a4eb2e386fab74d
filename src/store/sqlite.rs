//! The embedded store: one SQLite file in WAL mode, so `cargo run` works anywhere.
//!
//! SQLite allows one writer at a time, so writes go through a one-connection pool (they
//! queue in-process instead of failing with `SQLITE_BUSY`) while reads use their own pool.
//! A write holds [`SqliteStore::write_guard`] from `BEGIN` until it has announced its
//! commit on the in-process change feed, so the feed is in revision order. The file
//! belongs to one process: the feed only knows this process's writes.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use sqlx::{
    SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use std::sync::Arc;

use tokio::sync::{
    Mutex, OwnedMutexGuard, Semaphore,
    mpsc::{UnboundedReceiver, UnboundedSender},
};

use crate::{
    domain::{Revision, TenantId},
    error::{Error, Result},
    store::{Announcer, ChangeRef, Feed, FeedEvent, MAX_QUEUED_WRITES, StoreOptions, sql},
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
    feed_tx: UnboundedSender<FeedEvent>,
    feed_rx: std::sync::Mutex<Option<UnboundedReceiver<FeedEvent>>>,
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
        let (feed_tx, feed_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Self {
            read,
            write,
            application_id: application_id.clone(),
            serial: Arc::new(Mutex::new(())),
            waiting: Semaphore::new(MAX_QUEUED_WRITES),
            fault_after_commit: options.fault_after_commit,
            feed_tx,
            feed_rx: std::sync::Mutex::new(Some(feed_rx)),
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

    /// One user's roles, in one statement (one snapshot).
    async fn read_user(&self, user: &crate::domain::UserId) -> Result<crate::domain::UserRoles> {
        let rows: Vec<sql::UserRoleRow> =
            sqlx::query_as(sql::USER_ROLES).bind(user.as_str()).fetch_all(&self.read).await?;
        Ok(sql::user_roles_from(rows))
    }

    fn read_pool(&self) -> &SqlitePool {
        &self.read
    }

    fn write_pool(&self) -> &SqlitePool {
        &self.write
    }

    fn application_id(&self) -> &TenantId {
        &self.application_id
    }

    /// One write at a time; at most [`MAX_QUEUED_WRITES`] wait for their turn, past
    /// that a write is `UNAVAILABLE` at once.
    async fn write_guard(&self) -> Result<Option<OwnedMutexGuard<()>>> {
        let _waiting = self.waiting.try_acquire().map_err(|_| {
            Error::Unavailable("store unavailable: too many writes queued, retry".into())
        })?;
        Ok(Some(self.serial.clone().lock_owned().await))
    }

    /// Membership writes run one at a time under the write guard.
    async fn write_member(&self, write: &crate::store::MembershipWrite) -> Result<Revision> {
        self.write_in_steps(write).await
    }

    /// Takes the next revision and records the change; the feed hears of it in
    /// `committed`.
    async fn record(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        change: &ChangeRef<'_>,
        roles: String,
    ) -> Result<Revision> {
        let (revision,): (i64,) = sqlx::query_as(sql::BUMP_REVISION).fetch_one(&mut **tx).await?;
        sqlx::query(sql::INSERT_CHANGE)
            .bind(revision)
            .bind(change.kind.code())
            .bind(change.tenant)
            .bind(change.user)
            .bind(roles)
            .bind(crate::domain::now_millis())
            .bind(change.caller)
            .execute(&mut **tx)
            .await?;
        Ok(revision as Revision)
    }

    /// Writes are serialized by the write guard already.
    async fn lock_first(&self, _tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>) -> Result<()> {
        Ok(())
    }

    /// Announces on the in-process feed, after COMMIT with the write guard still held, so
    /// events are in order.
    fn announcer(&self) -> Announcer {
        Announcer::on(self.feed_tx.clone())
    }

    fn fault_after_commit(&self) -> Option<Duration> {
        self.fault_after_commit
    }

    async fn feed(&self) -> Result<Feed> {
        let _serial = self.serial.lock().await;
        let events = self
            .feed_rx
            .lock()
            .map_err(|_| Error::Internal("feed lock poisoned".into()))?
            .take()
            .ok_or_else(|| Error::Internal("the change feed has one subscriber".into()))?;
        let (revision,): (i64,) = sqlx::query_as(sql::REVISION).fetch_one(&self.read).await?;
        let _ = self.feed_tx.send(FeedEvent::Connected { revision: revision as Revision });
        Ok(Feed { events, needs_lease: false })
    }
}

super::sql_store::sql_store!(SqliteStore, sqlx::Sqlite);
