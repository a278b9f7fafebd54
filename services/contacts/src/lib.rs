//! contacts: the source of truth for tenants, LINE channels, contacts, tags, typed attributes, segments, segment membership and exact segment counts, plus the bulk contact sync.
#![forbid(unsafe_code)]

pub mod attrs;
pub mod contacts;
pub mod error;
pub mod import;
pub mod outbox;
pub mod page;
pub mod registry;
pub mod retention;
pub mod rules;
pub mod segments;
pub mod store;
pub mod tenants;
pub mod validate;

use std::net::SocketAddr;

use hibiki_proto::contacts::v1::contact_service_server::ContactServiceServer;
use hibiki_proto::contacts::v1::segment_service_server::SegmentServiceServer;
use hibiki_proto::contacts::v1::tenant_service_server::TenantServiceServer;
use hibiki_runtime::app::Service;
use hibiki_runtime::grpc::GrpcRoutes;
use hibiki_runtime::{
    ConfigError, Env, HostError, Needs, RuntimeConfig, ServiceDefaults, ServiceHost, Shutdown,
};

/// Name and default ports (gRPC 50052, metrics 9102).
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "contacts",
    grpc_port: 50052,
    metrics_port: 9102,
};

/// The service's migrations (`migrations/`), applied into its own schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The stores this service needs to report SERVING.
const NEEDS: Needs = Needs {
    postgres: Some(("contacts", &MIGRATOR)),
    redis: true,
};

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Settings shared by every service.
    pub runtime: RuntimeConfig,
    /// The bulk import.
    pub import: import::ImportConfig,
    /// `HIBIKI_DEDUPE_RETENTION_HOURS`: how long applied webhook event ids
    /// and mutation results are kept (at least 24). Default 168.
    pub dedupe_retention: std::time::Duration,
    /// `HIBIKI_SEGMENT_SWEEP_BATCH`: contacts per transaction when a new or
    /// changed rule is swept over the tenant's contacts. Default 5,000.
    pub sweep_batch: i64,
}

impl Config {
    /// Reads the settings from `env`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        Ok(Self {
            runtime: RuntimeConfig::from_env(env, DEFAULTS)?,
            import: import::ImportConfig::from_env(env)?,
            dedupe_retention: {
                let hours: u64 = hibiki_runtime::config::Reader::new(env)
                    .parse("HIBIKI_DEDUPE_RETENTION_HOURS", 168)?;
                if hours < 24 {
                    return Err(ConfigError::new(
                        "HIBIKI_DEDUPE_RETENTION_HOURS",
                        format!("must be at least 24 (LINE redelivers for hours), got {hours}"),
                    ));
                }
                std::time::Duration::from_secs(hours * 3600)
            },
            sweep_batch: hibiki_runtime::config::Reader::new(env)
                .positive("HIBIKI_SEGMENT_SWEEP_BATCH", 5000)? as i64,
        })
    }
}

/// The contacts service, built and ready to run.
pub struct Application {
    host: ServiceHost,
    routes: GrpcRoutes,
    /// Stops the service's own background tasks; triggered by the shutdown
    /// `run_until_stopped` is given.
    tasks: Shutdown,
}

impl Service for Application {
    type Config = Config;

    const DEFAULTS: ServiceDefaults = DEFAULTS;
    const NEEDS: Needs = NEEDS;

    fn config_from_env(env: &dyn Env) -> Result<Config, ConfigError> {
        Config::from_env(env)
    }

    fn runtime_config(config: &Config) -> &RuntimeConfig {
        &config.runtime
    }

    async fn build(config: Config) -> Result<Self, HostError> {
        let postgres_config = config.runtime.postgres.clone();
        let host = ServiceHost::bind(config.runtime, NEEDS).await?;
        let pool = host
            .postgres()
            .expect("contacts declares that it needs PostgreSQL")
            .clone();
        let redis = host
            .redis()
            .expect("contacts declares that it needs Redis")
            .clone();
        let tasks = Shutdown::new();
        let registry = registry::Registry::start(pool.clone(), tasks.clone());
        let relay = outbox::Relay::start(pool.clone(), redis, host.migrated(), tasks.clone());
        let computer = segments::Computer::start(
            pool.clone(),
            config.sweep_batch,
            host.migrated(),
            tasks.clone(),
        );
        retention::start(
            pool.clone(),
            config.dedupe_retention,
            host.migrated(),
            tasks.clone(),
        );
        let importer = import::Importer::new(&postgres_config, config.import)?;
        let mut routes = GrpcRoutes::new();
        routes.add(TenantServiceServer::new(tenants::Tenants::new(
            pool.clone(),
            registry,
            tasks.clone(),
        )));
        routes.add(ContactServiceServer::new(contacts::Contacts::new(
            pool.clone(),
            importer,
            relay,
        )));
        routes.add(SegmentServiceServer::new(segments::Segments::new(
            pool, computer,
        )));
        Ok(Self {
            host,
            routes,
            tasks,
        })
    }

    fn grpc_addr(&self) -> SocketAddr {
        self.host.grpc_addr()
    }

    fn metrics_addr(&self) -> SocketAddr {
        self.host.metrics_addr()
    }

    async fn run_until_stopped(self, shutdown: Shutdown) -> Result<(), HostError> {
        shutdown.forward_to(&self.tasks);
        let result = self.host.run(self.routes, shutdown).await;
        self.tasks.trigger();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dedupe_window_is_at_least_a_day() {
        let ok = Config::from_env(&[("HIBIKI_DEDUPE_RETENTION_HOURS", "48")]).unwrap();
        assert_eq!(
            ok.dedupe_retention,
            std::time::Duration::from_secs(48 * 3600)
        );
        let err = Config::from_env(&[("HIBIKI_DEDUPE_RETENTION_HOURS", "12")]).unwrap_err();
        assert_eq!(err.var, "HIBIKI_DEDUPE_RETENTION_HOURS");
        let err = Config::from_env(&[("HIBIKI_IMPORT_CHUNK_ROWS", "0")]).unwrap_err();
        assert_eq!(err.var, "HIBIKI_IMPORT_CHUNK_ROWS");
        for bad in ["0", "1.5", "-0.2", "half"] {
            let err = Config::from_env(&[("HIBIKI_IMPORT_BUSY_SHARE", bad)]).unwrap_err();
            assert_eq!(err.var, "HIBIKI_IMPORT_BUSY_SHARE", "{bad}");
        }
        let ok = Config::from_env(&[("HIBIKI_IMPORT_BUSY_SHARE", "1")]).unwrap();
        assert_eq!(ok.import.busy_share, 1.0);
    }
}
