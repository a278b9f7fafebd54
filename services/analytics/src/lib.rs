//! analytics: folds membership changes, delivery outcomes and inbound events into live counters and per-minute rollups, and pushes segment counts to watchers.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use hibiki_runtime::app::Service;
use hibiki_runtime::grpc::GrpcRoutes;
use hibiki_runtime::{
    ConfigError, Env, HostError, Needs, RuntimeConfig, ServiceDefaults, ServiceHost, Shutdown,
};

/// Name and default ports (gRPC 50055, metrics 9105).
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "analytics",
    grpc_port: 50055,
    metrics_port: 9105,
};

/// The service's migrations (`migrations/`), applied into its own schema.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The stores this service needs to report SERVING.
const NEEDS: Needs = Needs {
    postgres: Some(("analytics", &MIGRATOR)),
    redis: true,
};

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Settings shared by every service.
    pub runtime: RuntimeConfig,
}

impl Config {
    /// Reads the settings from `env`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        Ok(Self {
            runtime: RuntimeConfig::from_env(env, DEFAULTS)?,
        })
    }
}

/// The analytics service, built and ready to run.
pub struct Application {
    host: ServiceHost,
    routes: GrpcRoutes,
}

impl Service for Application {
    type Config = Config;

    const DEFAULTS: ServiceDefaults = DEFAULTS;

    fn config_from_env(env: &dyn Env) -> Result<Config, ConfigError> {
        Config::from_env(env)
    }

    async fn build(config: Config) -> Result<Self, HostError> {
        let host = ServiceHost::bind(config.runtime, NEEDS).await?;
        Ok(Self {
            host,
            routes: GrpcRoutes::new(),
        })
    }

    fn grpc_addr(&self) -> SocketAddr {
        self.host.grpc_addr()
    }

    fn metrics_addr(&self) -> SocketAddr {
        self.host.metrics_addr()
    }

    async fn run_until_stopped(self, shutdown: Shutdown) -> Result<(), HostError> {
        self.host.run(self.routes, shutdown).await
    }
}
