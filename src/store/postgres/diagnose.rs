//! The first connection to Postgres, explained: a failure says what went wrong, where
//! (host and port, database, user) and what to do, instead of a pool timeout or
//! "internal error".
//!
//! An address that does not answer yet is `UNAVAILABLE` (the caller retries it for
//! `--db-startup-wait`: a pod may start before its database); a mistake of the
//! operator's (no such database, a refused password, a pooler refusing a startup
//! parameter) is `FAILED_PRECONDITION` at once, since waiting cannot fix it.

use std::{io::ErrorKind, time::Duration};

use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};

use crate::error::Error;

/// Where `connect` points, for messages: `host:port` or the socket path.
pub fn place(connect: &PgConnectOptions) -> String {
    match connect.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", connect.get_host(), connect.get_port()),
    }
}

/// The database `connect` names (Postgres defaults it to the user's name).
pub fn database(connect: &PgConnectOptions) -> &str {
    connect.get_database().unwrap_or(connect.get_username())
}

/// Opens one connection to `connect` within `within`, or explains why it cannot.
pub async fn probe(connect: &PgConnectOptions, within: Duration) -> Result<PgConnection, Error> {
    match tokio::time::timeout(within, PgConnection::connect_with(connect)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(explain(err, connect)),
        Err(_) => Err(Error::Unavailable(format!(
            "Postgres at {} did not answer within {within:?}: is the host right, and does a \
             firewall drop the packets?",
            place(connect)
        ))),
    }
}

/// The error a failed connection attempt to `connect` means for the operator.
pub fn explain(err: sqlx::Error, connect: &PgConnectOptions) -> Error {
    let at = place(connect);
    match &err {
        sqlx::Error::Database(db) => {
            let (code, message) = (db.code(), db.message());
            let code = code.as_deref();
            if code == Some("3D000") {
                Error::FailedPrecondition(format!(
                    "Postgres at {at} has no database \"{db}\": create it with `rolecheck migrate \
                     --create-database` (same --database-url), or `createdb {db}`",
                    db = database(connect)
                ))
            } else if matches!(code, Some("28P01" | "28000"))
                // PgBouncer says it with 08P01, which would read as a network fault.
                || message.contains("authentication failed")
            {
                Error::FailedPrecondition(format!(
                    "Postgres at {at} refused user \"{user}\" ({message}): check the user and \
                     password in --database-url, and the server's pg_hba.conf",
                    user = connect.get_username()
                ))
            } else if message.contains("startup parameter") {
                Error::FailedPrecondition(format!(
                    "the server at {at} refused a connection parameter ({message}): it is a \
                     pooler such as PgBouncer. In transaction mode (`pool_mode = transaction`) \
                     set --database-pool-mode transaction and --listen-database-url to \
                     Postgres itself: rolecheck then sends no such parameter. In session mode \
                     set `ignore_startup_parameters = extra_float_digits, options` in its \
                     pgbouncer.ini. Or point --database-url at Postgres itself"
                ))
            } else if matches!(code, Some("3F000" | "42501")) {
                Error::FailedPrecondition(format!(
                    "Postgres at {at}, database \"{db}\": {message}: grant user \"{user}\" what \
                     rolecheck needs (CREATE on the database for migrations)",
                    db = database(connect),
                    user = connect.get_username()
                ))
            } else {
                err.into()
            }
        }
        sqlx::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => Error::Unavailable(format!(
                "connection refused at {at}: is Postgres running there, and are the host and \
                 port in --database-url right?"
            )),
            ErrorKind::TimedOut => Error::Unavailable(format!(
                "Postgres at {at} did not answer: is the host right, and does a firewall drop \
                 the packets?"
            )),
            ErrorKind::NotFound if connect.get_socket().is_some() => Error::Unavailable(format!(
                "no Postgres socket at {at}: is Postgres running, and is the socket directory \
                 right?"
            )),
            ErrorKind::UnexpectedEof => Error::Unavailable(format!(
                "the server at {at} closed the connection or does not speak the Postgres \
                 protocol ({io}): is that Postgres's port?"
            )),
            _ if io.to_string().contains("lookup") => Error::Unavailable(format!(
                "cannot resolve the host \"{host}\" of --database-url ({io})",
                host = connect.get_host()
            )),
            _ => Error::Unavailable(format!("cannot reach Postgres at {at}: {io}")),
        },
        sqlx::Error::Tls(tls) => Error::FailedPrecondition(format!(
            "TLS to Postgres at {at} failed ({tls}): check sslmode and sslrootcert in \
             --database-url"
        )),
        sqlx::Error::Protocol(message) => Error::FailedPrecondition(format!(
            "the server at {at} does not speak the Postgres protocol ({message}): is that \
             Postgres's port?"
        )),
        sqlx::Error::Configuration(config) => Error::invalid("database_url", format!("{config}")),
        _ => err.into(),
    }
}

/// Creates the database `url` names when it does not exist, connected as its user to
/// the `postgres` maintenance database: whether it was created.
pub async fn create_database(url: &str, within: Duration) -> Result<bool, Error> {
    let connect: PgConnectOptions =
        url.parse().map_err(|_| Error::invalid("database_url", "not a valid postgres:// URL"))?;
    let name = database(&connect).to_owned();
    let maintenance = connect.clone().database("postgres");
    let mut conn = probe(&maintenance, within).await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut conn)
        .await?;
    if exists.is_some() {
        let _ = conn.close().await;
        return Ok(false);
    }
    let quoted = name.replace('"', "\"\"");
    let created = sqlx::query(&format!("CREATE DATABASE \"{quoted}\"")).execute(&mut conn).await;
    let _ = conn.close().await;
    match created {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => Ok(false),
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => {
            Err(Error::FailedPrecondition(format!(
                "user \"{user}\" may not create databases on {at} ({message}): create \
                 \"{name}\" as a superuser (`createdb -O {user} {name}`), or grant CREATEDB",
                user = connect.get_username(),
                at = place(&connect),
                message = db.message(),
            )))
        }
        Err(err) => Err(err.into()),
    }
}
