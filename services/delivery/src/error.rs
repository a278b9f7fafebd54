//! delivery's errors: the runtime's shared [`ServiceError`].

pub use hibiki_runtime::error::ServiceError as Error;

/// Result of a delivery operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
