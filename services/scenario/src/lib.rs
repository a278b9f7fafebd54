//! scenario: consumes the event log, matches tenants' scenario triggers, and
//! runs their steps (tags, attributes, rich menu switches, messages, waits,
//! branches) idempotently under (run, step), with durable timers in
//! PostgreSQL.
//!
//! Built so far: [`definition`] (YAML, checks), [`store`] (versions in
//! PostgreSQL), [`service`] (Apply, GetScenario, ListScenarios,
//! ListVersions, Enable, Disable), and the pieces the executor will use:
//! [`matching`] (which events start a scenario) and [`conditions`] (branch
//! conditions on a contact). The executor is next.
#![forbid(unsafe_code)]

pub mod conditions;
pub mod definition;
pub mod executor;
pub mod matching;
pub mod program;
pub mod runs;
pub mod service;
pub mod store;
pub mod submit;

use std::net::SocketAddr;

use hibiki_proto::scenario::v1::scenario_service_server::ScenarioServiceServer;
use hibiki_runtime::app::Service;
use hibiki_runtime::config::Reader;
use hibiki_runtime::grpc::GrpcRoutes;
use hibiki_runtime::{
    ConfigError, Env, HostError, Needs, RuntimeConfig, ServiceDefaults, ServiceHost, Shutdown,
};

/// Name and default ports (gRPC 50053, metrics 9103).
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "scenario",
    grpc_port: 50053,
    metrics_port: 9103,
};

/// The service's migrations (`migrations/`), applied into its own schema.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const NEEDS: Needs = Needs {
    postgres: Some(("scenario", &MIGRATOR)),
    redis: true,
};

/// scenario's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Settings shared by every service.
    pub runtime: RuntimeConfig,
    /// `HIBIKI_CONTACTS_URL`: contacts' gRPC URL. Default
    /// http://127.0.0.1:50052.
    pub contacts_url: String,
    /// `HIBIKI_DELIVERY_URL`: delivery's gRPC URL. Default
    /// http://127.0.0.1:50054.
    pub delivery_url: String,
    /// The event log it consumes (`HIBIKI_EVENTLOG_*`, as the gateway).
    pub eventlog: hibiki_runtime::eventlog::EventLogConfig,
    /// `HIBIKI_SCENARIO_LEASE_MS`: how long an executor holds a run it
    /// works on; a run of an executor that stopped is taken up after it.
    /// Default 30,000.
    pub lease: std::time::Duration,
    /// `HIBIKI_SCENARIO_CONSUMERS`: event-log consumers per replica, working
    /// side by side on the shards they hold. Default 16 (one per shard of
    /// the default log).
    pub consumers: usize,
}

impl Config {
    /// Reads the settings from `env`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let r = Reader::new(env);
        Ok(Self {
            runtime: RuntimeConfig::from_env(env, DEFAULTS)?,
            contacts_url: r.url(
                "HIBIKI_CONTACTS_URL",
                hibiki_runtime::channels::DEFAULT_CONTACTS_URL,
                &["http", "https"],
            )?,
            delivery_url: r.url(
                "HIBIKI_DELIVERY_URL",
                "http://127.0.0.1:50054",
                &["http", "https"],
            )?,
            eventlog: hibiki_runtime::eventlog::EventLogConfig::from_env(env)?,
            lease: r.millis(
                "HIBIKI_SCENARIO_LEASE_MS",
                std::time::Duration::from_secs(30),
            )?,
            consumers: r.positive("HIBIKI_SCENARIO_CONSUMERS", 16)?,
        })
    }
}

/// The scenario service, built and ready to run.
pub struct Application {
    host: ServiceHost,
    routes: GrpcRoutes,
    executor: std::sync::Arc<executor::Executor>,
    log: hibiki_runtime::eventlog::EventLog,
    consumers: usize,
    migrated: hibiki_runtime::Migrated,
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
        let token = config.runtime.auth.outbound_service_token().clone();
        let host = ServiceHost::bind(config.runtime, NEEDS).await?;
        let pool = host
            .postgres()
            .expect("scenario declares that it needs PostgreSQL")
            .clone();
        let redis = host
            .redis()
            .expect("scenario declares that it needs Redis")
            .clone();
        let interceptor = hibiki_runtime::grpc::ClientInterceptor::new(&token)
            .map_err(|e| HostError::Startup(format!("HIBIKI_SERVICE_TOKENS: {e}")))?;
        let contacts = hibiki_runtime::grpc::channel(&config.contacts_url)
            .map_err(|e| HostError::Startup(format!("HIBIKI_CONTACTS_URL: {e}")))?;
        let delivery = hibiki_runtime::grpc::channel(&config.delivery_url)
            .map_err(|e| HostError::Startup(format!("HIBIKI_DELIVERY_URL: {e}")))?;
        let peers = executor::Peers {
            contacts: hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient::with_interceptor(
                contacts.clone(),
                interceptor.clone(),
            ),
            tenants: hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient::with_interceptor(
                contacts.clone(),
                interceptor.clone(),
            ),
            segments: hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient::with_interceptor(
                contacts,
                interceptor.clone(),
            ),
            delivery: hibiki_proto::delivery::v1::delivery_service_client::DeliveryServiceClient::with_interceptor(
                delivery,
                interceptor,
            ),
        };
        let scenarios = store::Scenarios::new(pool.clone());
        let runs = runs::Runs::new(pool, config.lease);
        let mut routes = GrpcRoutes::new();
        routes.add(ScenarioServiceServer::new(service::ScenarioApi::new(
            scenarios.clone(),
            runs.clone(),
            peers.clone(),
        )));
        let executor = executor::Executor::new(scenarios, runs, peers);
        let log = hibiki_runtime::eventlog::EventLog::from_config(redis, &config.eventlog);
        let migrated = host.migrated();
        Ok(Self {
            host,
            routes,
            executor,
            log,
            consumers: config.consumers,
            migrated,
        })
    }

    fn grpc_addr(&self) -> SocketAddr {
        self.host.grpc_addr()
    }

    fn metrics_addr(&self) -> SocketAddr {
        self.host.metrics_addr()
    }

    async fn run_until_stopped(self, shutdown: Shutdown) -> Result<(), HostError> {
        let tasks = shutdown.child();
        let (executor, log, migrated, stop) =
            (self.executor, self.log, self.migrated, tasks.clone());
        let consumers = self.consumers;
        let started = tokio::spawn(async move {
            // Runs live in PostgreSQL: wait for the schema.
            migrated.wait().await;
            executor.start(log, consumers, stop)
        });
        let result = self.host.run(self.routes, shutdown).await;
        tasks.trigger();
        if let Ok(handles) = started.await {
            for h in handles {
                let _ = h.await;
            }
        }
        result
    }
}
