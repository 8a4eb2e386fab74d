//! A look at a store without opening it for serving: where it is, whether it answers,
//! and how far its schema is migrated. Nothing is written or migrated (`rolecheck doctor`).

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::{
    Connection,
    sqlite::{SqliteConnectOptions, SqliteConnection},
};

use super::{owner::Owner, postgres::diagnose, sql, sqlite};
use crate::error::{Error, Result};

/// What a look at a store found.
#[derive(Debug)]
pub struct Inspection {
    /// Where the store is: `postgres host:port/database` or the SQLite file.
    pub place: String,
    /// The newest migration applied (`None`: a fresh store, migrated at first start).
    pub applied: Option<i64>,
    /// The newest migration this binary knows.
    pub known: i64,
}

impl Inspection {
    /// Whether `serve` can use the store (`migrates`: it applies migrations at start):
    /// a note for the operator, or what is wrong.
    pub fn verdict(&self, migrates: bool) -> Result<String> {
        match self.applied {
            Some(v) if v == self.known => Ok(format!("{}, schema at migration {v}", self.place)),
            Some(v) if v > self.known => {
                sql::check_version(Some(v), self.known).map(|()| String::new())
            }
            applied if migrates => Ok(format!(
                "{}, schema at migration {} of {}: serve applies the rest at start",
                self.place,
                applied.unwrap_or(0),
                self.known
            )),
            applied => sql::check_version(applied, self.known).map(|()| String::new()),
        }
    }
}

/// Looks at the store `database_url` names (or the embedded file in `data_dir`).
pub async fn inspect(
    database_url: Option<&str>,
    data_dir: &Path,
    within: Duration,
) -> Result<Inspection> {
    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let connect: sqlx::postgres::PgConnectOptions = url
                .parse()
                .map_err(|_| Error::invalid("database_url", "not a valid postgres:// URL"))?;
            let mut conn = diagnose::probe(&connect, within).await?;
            let applied = sqlx::query_as(sql::APPLIED_SCHEMA).fetch_one(&mut conn).await;
            let _ = conn.close().await;
            Ok(Inspection {
                place: format!(
                    "postgres {}/{}",
                    diagnose::place(&connect),
                    diagnose::database(&connect)
                ),
                applied: sql::applied_version(applied)?,
                known: known(sqlx::migrate!("./migrations/postgres")),
            })
        }
        other => {
            let path = match other {
                Some(url) => sqlite::path_from_url(url)?,
                None => data_dir.join("rolecheck.db"),
            };
            let known = known(sqlx::migrate!("./migrations/sqlite"));
            let place = path.display().to_string();
            if !path.exists() {
                return Ok(Inspection {
                    place: format!("{place} (created at first start)"),
                    applied: None,
                    known,
                });
            }
            // Free, or held by a running rolecheck: the lock says (and is let go at once).
            drop(Owner::take(&path)?);
            let connect = SqliteConnectOptions::from_str("sqlite:")
                .map_err(|err| Error::Internal(Box::new(err)))?
                .filename(&path)
                .read_only(true);
            let mut conn = SqliteConnection::connect_with(&connect)
                .await
                .map_err(|err| Error::FailedPrecondition(format!("cannot open {place}: {err}")))?;
            let applied = sqlx::query_as(sql::APPLIED_SCHEMA).fetch_one(&mut conn).await;
            let _ = conn.close().await;
            Ok(Inspection { place, applied: sql::applied_version(applied)?, known })
        }
    }
}

fn known(migrator: sqlx::migrate::Migrator) -> i64 {
    migrator.iter().map(|m| m.version).max().unwrap_or(0)
}
