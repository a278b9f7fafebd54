//! The error type services share, and how each kind answers a gRPC caller:
//! a field-level INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
//! FAILED_PRECONDITION, ABORTED, RESOURCE_EXHAUSTED, UNAVAILABLE (a store is
//! away: the details are logged, the caller is told to retry), INTERNAL
//! (logged, never detailed to the caller).

use tonic::Status;

/// Why a service call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A request field is invalid; `field` names it (e.g. `steps[2].id`).
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The named thing does not exist (for this tenant).
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state where the call can succeed.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A concurrent change won: the same call can be retried.
    #[error("{0}")]
    Aborted(String),
    /// A bounded resource is full: retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A store or a peer cannot be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// An INVALID_ARGUMENT about `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<sqlx::Error> for ServiceError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::Unavailable(format!("PostgreSQL: {e}"))
            }
            sqlx::Error::Database(ref d)
                if matches!(d.code().as_deref(), Some("40P01") | Some("40001")) =>
            {
                Self::Aborted("a concurrent change conflicted; retry the call".into())
            }
            other => Self::Internal(format!("PostgreSQL: {other}")),
        }
    }
}

impl From<crate::redis::redis::RedisError> for ServiceError {
    fn from(e: crate::redis::redis::RedisError) -> Self {
        if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
            Self::Unavailable(format!("Redis: {e}"))
        } else {
            Self::Internal(format!("Redis: {e}"))
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            ServiceError::NotFound(m) => Status::not_found(m),
            ServiceError::AlreadyExists(m) => Status::already_exists(m),
            ServiceError::FailedPrecondition(m) => Status::failed_precondition(m),
            ServiceError::Aborted(m) => Status::aborted(m),
            ServiceError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ServiceError::Unavailable(m) => {
                tracing::warn!(error = %m, "store unavailable");
                Status::unavailable("a store is unavailable; retry with backoff")
            }
            ServiceError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// Whether a database error is a unique violation (SQLSTATE 23505).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}
