//! contacts' one error type, and how each variant answers a gRPC caller.

use tonic::Status;

/// Why a contacts call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is invalid; `field` names it (e.g. `rule.all[2].tag`).
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The offending field's path.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state where the call can succeed.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A concurrent change won (optimistic concurrency).
    #[error("{0}")]
    Aborted(String),
    /// A bounded resource is full: retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// PostgreSQL or Redis cannot be reached.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else: reported to the caller as INTERNAL without details.
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl Error {
    /// An INVALID_ARGUMENT about `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::Unavailable(e.to_string())
            }
            // A deadlock victim or a serialization failure: nothing was
            // applied, and the same call can simply be retried.
            sqlx::Error::Database(ref d)
                if matches!(d.code().as_deref(), Some("40P01") | Some("40001")) =>
            {
                Self::Aborted("a concurrent change conflicted; retry the call".into())
            }
            other => Self::Database(other),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::Aborted(m) => Status::aborted(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Unavailable(m) => {
                tracing::warn!(error = %m, "store unavailable");
                Status::unavailable("a store is unavailable; retry with backoff")
            }
            Error::Database(e) => {
                tracing::error!(error = %e, "database error");
                Status::internal("internal error")
            }
        }
    }
}

/// Whether a database error is a unique violation (SQLSTATE 23505).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

/// Whether a database error is a foreign-key violation (SQLSTATE 23503).
pub fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23503"))
}

/// Result of a contacts operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
