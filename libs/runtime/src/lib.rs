//! What every hibiki service stands on, in one place: typed configuration,
//! telemetry (logs, traces, trace-context propagation), Prometheus metrics,
//! the gRPC server stack with authentication, graceful shutdown, and the
//! PostgreSQL and Redis handles. A service's `Application` is a
//! [`host::ServiceHost`] plus its own RPC services.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod batch;
pub mod channels;
pub mod config;
pub mod error;
pub mod eventlog;
pub mod group;
pub mod grpc;
pub mod host;
pub mod metrics;
pub mod otlp;
pub mod page;
pub mod postgres;
pub mod records;
pub mod redis;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
pub mod timestamp;

pub use auth::Caller;
pub use config::{
    ConfigError, Env, Overlay, ProcessEnv, Recording, RuntimeConfig, Secret, ServiceDefaults,
};
pub use host::{HostError, Migrated, Needs, ServiceHost};
pub use shutdown::Shutdown;
