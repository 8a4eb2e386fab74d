//! Postgres for the tests that run the real binary: the admin URL, a database's URL, and
//! a database of one test's own, dropped when the test ends.

use sqlx::{Connection, PgConnection};

/// The test Postgres (`DATABASE_URL`), as a role allowed to create databases.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// [`admin_url`] pointing at database `name` instead.
pub fn database_url(name: &str) -> String {
    let admin = admin_url();
    let base = admin.split('?').next().expect("url");
    format!("{}/{name}", &base[..base.rfind('/').expect("path")])
}

/// A database name of one test's own (by tag and process), dropped, if it was made, when
/// this goes.
pub struct Db(pub String);

impl Db {
    /// A name only: the test, or rolecheck, may create the database.
    pub fn named(tag: &str) -> Self {
        Self(format!("rc_{tag}_{}", std::process::id()))
    }

    /// A fresh, empty database.
    pub async fn create(tag: &str) -> Self {
        let db = Self::named(tag);
        let mut admin = PgConnection::connect(&admin_url()).await.expect("admin");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", db.0))
            .execute(&mut admin)
            .await
            .expect("drop");
        sqlx::query(&format!("CREATE DATABASE {}", db.0))
            .execute(&mut admin)
            .await
            .expect("create");
        db
    }

    /// Its URL.
    pub fn url(&self) -> String {
        database_url(&self.0)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&admin_url()).await.ok()?;
                sqlx::query(&sql).execute(&mut admin).await.ok()
            })
        })
        .join();
    }
}
