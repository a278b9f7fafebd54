//! delivery's one error type, and how each variant answers a gRPC caller.

use tonic::Status;

/// Why a delivery call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is invalid; `field` names it (e.g. `messages_json[2]`).
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The named thing does not exist (for this tenant).
    #[error("{0}")]
    NotFound(String),
    /// A bounded queue is full: retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Redis, PostgreSQL or LINE cannot be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else: INTERNAL without details to the caller.
    #[error("{0}")]
    Internal(String),
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
                Self::Unavailable(format!("PostgreSQL: {e}"))
            }
            other => Self::Internal(format!("PostgreSQL: {other}")),
        }
    }
}

impl From<hibiki_runtime::redis::redis::RedisError> for Error {
    fn from(e: hibiki_runtime::redis::redis::RedisError) -> Self {
        if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
            Self::Unavailable(format!("Redis: {e}"))
        } else {
            Self::Internal(format!("Redis: {e}"))
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            Error::NotFound(m) => Status::not_found(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Unavailable(m) => {
                tracing::warn!(error = %m, "store unavailable");
                Status::unavailable("a store is unavailable; retry with backoff")
            }
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// Result of a delivery operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
