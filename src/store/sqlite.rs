//! The embedded store: one SQLite file in WAL mode, so `cargo run` works anywhere.
//!
//! SQLite allows one writer at a time, so writes go through a one-connection pool (they
//! queue in-process instead of failing with `SQLITE_BUSY`) while reads use their own pool.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use sqlx::{
    SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use crate::{
    domain::TenantId,
    error::{Error, Result},
    store::StoreOptions,
};

/// Memberships in an embedded SQLite file.
pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    application_id: TenantId,
}

/// The file path in a `sqlite:` URL (`sqlite://path/to/file.db` or `sqlite:file.db`).
pub fn path_from_url(url: &str) -> Result<PathBuf> {
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
        Ok(Self { read, write, application_id: application_id.clone() })
    }

    /// Applies the embedded migrations. Refuses a schema newer than this binary knows.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/sqlite").run(&self.write).await?;
        Ok(())
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
}

super::sql::sql_store!(SqliteStore, sqlx::Sqlite);
