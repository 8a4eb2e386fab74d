//! The production store: Postgres.

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{domain::TenantId, error::Result, store::StoreOptions};

/// Memberships in Postgres. One pool serves reads and writes.
pub struct PgStore {
    pool: PgPool,
    application_id: TenantId,
}

impl PgStore {
    /// Connects to `url`. The URL may hold a password: it is never logged.
    pub async fn connect(
        url: &str,
        application_id: &TenantId,
        options: &StoreOptions,
    ) -> Result<Self> {
        let connect: PgConnectOptions = url.parse().map_err(|_| {
            crate::error::Error::invalid("database_url", "not a valid postgres:// URL")
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.application_name("rolecheck"))
            .await?;
        Ok(Self { pool, application_id: application_id.clone() })
    }

    /// Applies the embedded migrations. Refuses a schema newer than this binary knows.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/postgres").run(&self.pool).await?;
        Ok(())
    }

    /// The pool, for callers that need raw access (tests, benches).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn read_pool(&self) -> &PgPool {
        &self.pool
    }

    fn write_pool(&self) -> &PgPool {
        &self.pool
    }

    fn application_id(&self) -> &TenantId {
        &self.application_id
    }
}

super::sql::sql_store!(PgStore, sqlx::Postgres);
