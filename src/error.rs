//! The one domain error type and the single table from errors to gRPC status codes.

use tonic::{Code, Status};

/// Everything that can go wrong in rolecheck, classified by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the offending field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault.
        field: String,
        /// What the field must be.
        reason: String,
    },
    /// The thing named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the system is not in a state to perform it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A revision outside what the store can answer for.
    #[error("{0}")]
    OutOfRange(String),
    /// The store cannot be reached, or the answer could not be proven current.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected store failure; the detail is logged, never sent.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// An invalid-argument error naming `field`.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument { field: field.to_owned(), reason: reason.into() }
    }

    /// This error with `prefix` before the field it names (for fields of a nested message,
    /// such as `checks[3].`); other errors unchanged. Lets the happy path validate with
    /// static field names and pay for the full name only on failure.
    pub fn in_field(self, prefix: impl FnOnce() -> String) -> Self {
        match self {
            Error::InvalidArgument { field, reason } => {
                Error::InvalidArgument { field: prefix() + &field, reason }
            }
            other => other,
        }
    }
}

impl Error {
    /// A copy of a shared error (moka hands one error to every waiter of a load).
    pub fn unshare(shared: std::sync::Arc<Error>) -> Self {
        std::sync::Arc::try_unwrap(shared).unwrap_or_else(|shared| match &*shared {
            Error::InvalidArgument { field, reason } => {
                Error::InvalidArgument { field: field.clone(), reason: reason.clone() }
            }
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::AlreadyExists(m) => Error::AlreadyExists(m.clone()),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(m.clone()),
            Error::OutOfRange(m) => Error::OutOfRange(m.clone()),
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            Error::Internal(source) => Error::Internal(source.to_string().into()),
        })
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &err {
            E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => {
                tracing::warn!(error = &err as &dyn std::error::Error, "store unavailable");
                Error::Unavailable("store unavailable".into())
            }
            E::Database(db) if db.is_unique_violation() => {
                Error::AlreadyExists("already exists".into())
            }
            E::Database(db) if db.is_foreign_key_violation() => {
                Error::NotFound("tenant not found".into())
            }
            E::Database(db) if is_transient(db.code().as_deref()) => {
                tracing::warn!(
                    error = &err as &dyn std::error::Error,
                    "store temporarily unavailable"
                );
                Error::Unavailable("store unavailable, retry".into())
            }
            _ => {
                tracing::error!(error = &err as &dyn std::error::Error, "store error");
                Error::Internal(Box::new(err))
            }
        }
    }
}

/// Database error codes that mean "try again": Postgres connection exceptions (08…),
/// operator intervention (57P…), insufficient resources (53…), serialization failure and
/// deadlock, a statement or idle transaction over its timeout; SQLite busy and locked.
fn is_transient(code: Option<&str>) -> bool {
    code.is_some_and(|c| {
        c.starts_with("08")
            || c.starts_with("57P")
            || c.starts_with("53")
            || matches!(c, "40001" | "40P01" | "57014" | "25P03" | "5" | "6" | "261" | "517")
    })
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        match err {
            sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(db))
                if db.code().as_deref() == Some("42501") =>
            {
                Error::FailedPrecondition(format!(
                    "the database user may not create rolecheck's tables ({}): run `rolecheck \
                     migrate` as the database's owner, or grant CREATE on it",
                    db.message()
                ))
            }
            sqlx::migrate::MigrateError::Execute(inner) => inner.into(),
            sqlx::migrate::MigrateError::VersionMissing(version) => {
                Error::FailedPrecondition(format!(
                    "the database schema has migration {version}, which this rolecheck does not \
                     know: it was migrated by a newer rolecheck; upgrade this one"
                ))
            }
            other => Error::Internal(Box::new(other)),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

/// Shorthand for results in rolecheck.
pub type Result<T, E = Error> = std::result::Result<T, E>;
