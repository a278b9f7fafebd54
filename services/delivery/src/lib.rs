//! delivery: every outbound call to the LINE Messaging API, through
//! per-channel Redis queues with shared rate limits, coalescing, retries with
//! backoff, and dead letters.
//!
//! - [`service`]: `DeliveryService` (jobs in, job progress and dead letters
//!   out).
//! - [`queue`]: the Redis queues and their scripts.
//! - [`worker`]: the workers that send, coalesce, retry and dead-letter.
//! - [`line`]: the Messaging API client; [`keys`]: retry keys and ids.
//! - [`deadletters`]: dead letters in PostgreSQL.
#![forbid(unsafe_code)]

pub mod deadletters;
pub mod error;
pub mod keys;
pub mod line;
pub mod pace;
pub mod queue;
pub mod service;
pub mod worker;

use std::net::SocketAddr;
use std::time::Duration;

use hibiki_proto::delivery::v1::delivery_service_server::DeliveryServiceServer;
use hibiki_runtime::app::Service;
use hibiki_runtime::config::Reader;
use hibiki_runtime::grpc::GrpcRoutes;
use hibiki_runtime::{
    ConfigError, Env, HostError, Needs, RuntimeConfig, ServiceDefaults, ServiceHost, Shutdown,
};

/// Name and default ports (gRPC 50054, metrics 9104).
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "delivery",
    grpc_port: 50054,
    metrics_port: 9104,
};

/// LINE's Messaging API.
pub const DEFAULT_LINE_API_URL: &str = "https://api.line.me";

/// The service's migrations (`migrations/`), applied into its own schema.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The stores delivery needs to report SERVING.
const NEEDS: Needs = Needs {
    postgres: Some(("delivery", &MIGRATOR)),
    redis: true,
};

/// delivery's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Settings shared by every service.
    pub runtime: RuntimeConfig,
    /// `HIBIKI_CONTACTS_URL`: contacts' gRPC URL, whose channel registry
    /// gives each channel's access token. Default http://127.0.0.1:50052.
    pub contacts_url: String,
    /// `HIBIKI_LINE_API_URL`: the Messaging API (line-sim in development).
    /// Default https://api.line.me.
    pub line_api_url: String,
    /// `HIBIKI_LINE_TIMEOUT_MS`: how long a call to LINE may take before
    /// it counts as a timeout (and is retried). Default 5000.
    pub line_timeout: Duration,
    /// The workers (see [`worker::WorkerConfig`]; variables in the README).
    pub worker: worker::WorkerConfig,
    /// `HIBIKI_DELIVERY_MAX_QUEUE`: calls a channel's queue may hold before
    /// requests get RESOURCE_EXHAUSTED. Default 1,000,000.
    pub max_queue: u64,
    /// `HIBIKI_DELIVERY_WORKERS`: whether this replica also sends (`true`,
    /// the default) or only takes requests (`false`: replicas that serve
    /// the API apart from the ones that send).
    pub workers: bool,
}

impl Config {
    /// Reads the settings from `env`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let r = Reader::new(env);
        let mut limits = std::collections::BTreeMap::new();
        if let Some(list) = r.optional("HIBIKI_DELIVERY_LIMITS") {
            for setting in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (endpoint, limit) = hibiki_line::api::parse_limit(setting)
                    .map_err(|e| ConfigError::new("HIBIKI_DELIVERY_LIMITS", e))?;
                limits.insert(endpoint, limit);
            }
        }
        let share = r.ratio("HIBIKI_DELIVERY_RATE_SHARE", 0.98)?;
        let hours: u64 = r.parse("HIBIKI_DELIVERY_JOB_TTL_HOURS", 168)?;
        if hours < 25 {
            return Err(ConfigError::new(
                "HIBIKI_DELIVERY_JOB_TTL_HOURS",
                format!(
                    "must be at least 25 (longer than LINE's 24 h retry-key window), got {hours}"
                ),
            ));
        }
        let worker = worker::WorkerConfig {
            lease: r.millis("HIBIKI_DELIVERY_LEASE_MS", Duration::from_secs(10))?,
            max_attempts: r.positive("HIBIKI_DELIVERY_MAX_ATTEMPTS", 8)?,
            backoff_base: r.millis("HIBIKI_DELIVERY_BACKOFF_MS", Duration::from_millis(500))?,
            backoff_cap: r.millis("HIBIKI_DELIVERY_BACKOFF_CAP_MS", Duration::from_secs(60))?,
            pause_on_429: r.millis("HIBIKI_DELIVERY_PAUSE_ON_429_MS", Duration::from_secs(1))?,
            channel_concurrency: r.positive("HIBIKI_DELIVERY_CHANNEL_CONCURRENCY", 512)?,
            bulk_concurrency: r.positive("HIBIKI_DELIVERY_BULK_CONCURRENCY", 16)?,
            coalesce_window: r.millis("HIBIKI_DELIVERY_COALESCE_MS", Duration::from_millis(5))?,
            rate_share: share,
            limits,
            job_ttl: Duration::from_secs(hours * 3600),
            poll: Duration::from_millis(20),
        };
        if worker.lease < Duration::from_millis(300) {
            return Err(ConfigError::new(
                "HIBIKI_DELIVERY_LEASE_MS",
                "must be at least 300",
            ));
        }
        Ok(Self {
            runtime: RuntimeConfig::from_env(env, DEFAULTS)?,
            contacts_url: r.url(
                "HIBIKI_CONTACTS_URL",
                hibiki_runtime::channels::DEFAULT_CONTACTS_URL,
                &["http", "https"],
            )?,
            line_api_url: r.url(
                "HIBIKI_LINE_API_URL",
                DEFAULT_LINE_API_URL,
                &["http", "https"],
            )?,
            line_timeout: r.millis("HIBIKI_LINE_TIMEOUT_MS", Duration::from_secs(5))?,
            max_queue: r.parse("HIBIKI_DELIVERY_MAX_QUEUE", 1_000_000u64)?,
            workers: r.parse("HIBIKI_DELIVERY_WORKERS", true)?,
            worker,
        })
    }
}

/// The delivery service, built and ready to run.
pub struct Application {
    host: ServiceHost,
    routes: GrpcRoutes,
    start_workers: Box<dyn FnOnce(Shutdown) -> tokio::task::JoinHandle<()> + Send>,
    /// Stops the registry follower and the workers.
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
        let token = config.runtime.auth.outbound_service_token().clone();
        let mut host = ServiceHost::bind(config.runtime, NEEDS).await?;
        let pool = host
            .postgres()
            .expect("delivery declares that it needs PostgreSQL")
            .clone();
        let redis = host
            .redis()
            .expect("delivery declares that it needs Redis")
            .clone();
        let tasks = Shutdown::new();
        let channels =
            hibiki_runtime::channels::Channels::watch(&config.contacts_url, &token, tasks.clone())
                .map_err(|e| HostError::Startup(e.to_string()))?;
        let loaded = channels.clone();
        host.add_check(std::sync::Arc::new(move || {
            if loaded.is_loaded() {
                Ok(())
            } else {
                Err("channel registry: not loaded from contacts yet".into())
            }
        }));
        let line = line::LineApi::new(&config.line_api_url, config.line_timeout)
            .map_err(|e| HostError::Startup(format!("an HTTP client for LINE: {e}")))?;
        let keys = queue::Keys::new(redis);
        let dead = deadletters::DeadLetters::new(pool);
        let segments = hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient::with_interceptor(
            hibiki_runtime::grpc::channel(&config.contacts_url)
                .map_err(|e| HostError::Startup(format!("HIBIKI_CONTACTS_URL: {e}")))?,
            hibiki_runtime::grpc::ClientInterceptor::new(&token)
                .map_err(|e| HostError::Startup(format!("HIBIKI_SERVICE_TOKENS: {e}")))?,
        );
        let mut routes = GrpcRoutes::new();
        routes.add(DeliveryServiceServer::new(service::Delivery::new(
            keys.clone(),
            channels.clone(),
            dead.clone(),
            line.clone(),
            segments.clone(),
            service::ServiceConfig {
                max_queue: config.max_queue,
                job_ttl: config.worker.job_ttl,
            },
        )));
        let worker_config = config.worker;
        let migrated = host.migrated();
        let workers = config.workers;
        let start_workers = Box::new(move |stop: Shutdown| {
            tokio::spawn(async move {
                if !workers {
                    tracing::info!(
                        "HIBIKI_DELIVERY_WORKERS=false: this replica takes requests and sends nothing"
                    );
                    return;
                }
                // Dead letters go to PostgreSQL: wait for its schema.
                migrated.wait().await;
                let _ =
                    worker::start(keys, line, channels, segments, dead, worker_config, stop).await;
            })
        });
        Ok(Self {
            host,
            routes,
            start_workers,
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
        let workers = (self.start_workers)(self.tasks.clone());
        let result = self.host.run(self.routes, shutdown).await;
        self.tasks.trigger();
        let _ = workers.await;
        result
    }
}
