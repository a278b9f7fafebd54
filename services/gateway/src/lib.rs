//! gateway: the HTTP edge for LINE webhooks. It verifies each webhook's signature with the channel secret (kept in memory from contacts' WatchChannels), dedupes on webhookEventId, and appends every event to the Redis event log before answering 200.
#![forbid(unsafe_code)]

pub mod line;
pub mod webhook;

use std::net::SocketAddr;
use std::time::Duration;

use hibiki_runtime::app::Service;
use hibiki_runtime::config::Reader;
use hibiki_runtime::eventlog::{EventLog, EventLogConfig};
use hibiki_runtime::grpc::GrpcRoutes;
use hibiki_runtime::{
    ConfigError, Env, HostError, Needs, RuntimeConfig, ServiceDefaults, ServiceHost, Shutdown,
};
use tokio::net::TcpListener;

/// Name and default ports (gRPC 50051, metrics 9101; webhooks on HTTP 8080).
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "gateway",
    grpc_port: 50051,
    metrics_port: 9101,
};

/// Default address of the webhook listener.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
/// Default address of contacts, whose channel registry the gateway follows.
pub use hibiki_runtime::channels::DEFAULT_CONTACTS_URL;

/// The stores the gateway needs to report SERVING.
const NEEDS: Needs = Needs {
    postgres: None,
    redis: true,
};

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Settings shared by every service.
    pub runtime: RuntimeConfig,
    /// The event log (shards, maximum length, dedupe window).
    pub eventlog: EventLogConfig,
    /// `HIBIKI_HTTP_ADDR`: where LINE's webhooks are received. Default
    /// 127.0.0.1:8080.
    pub http_addr: SocketAddr,
    /// `HIBIKI_CONTACTS_URL`: contacts' gRPC URL. Default
    /// http://127.0.0.1:50052.
    pub contacts_url: String,
    /// `HIBIKI_WEBHOOK_MAX_BODY_BYTES` (default 1 MiB),
    /// `HIBIKI_WEBHOOK_CONCURRENCY` (default 1024) and
    /// `HIBIKI_WEBHOOK_TIMEOUT_MS` (default 1000, below LINE's 2 s).
    pub limits: webhook::Limits,
    /// `HIBIKI_EVENTLOG_STATS_MS`: how often shard length and lag are
    /// published as metrics. Default 2000.
    pub stats_interval: Duration,
}

impl Config {
    /// Reads the settings from `env`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let r = Reader::new(env);
        let timeout = r.millis("HIBIKI_WEBHOOK_TIMEOUT_MS", Duration::from_secs(1))?;
        if timeout.is_zero() || timeout >= Duration::from_secs(2) {
            return Err(ConfigError::new(
                "HIBIKI_WEBHOOK_TIMEOUT_MS",
                format!(
                    "must be above 0 and below 2000 (LINE gives up after 2 s), got {}",
                    timeout.as_millis()
                ),
            ));
        }
        Ok(Self {
            runtime: RuntimeConfig::from_env(env, DEFAULTS)?,
            eventlog: EventLogConfig::from_env(env)?,
            http_addr: r.addr(
                "HIBIKI_HTTP_ADDR",
                DEFAULT_HTTP_ADDR.parse().expect("a valid default"),
            )?,
            contacts_url: r.url(
                "HIBIKI_CONTACTS_URL",
                DEFAULT_CONTACTS_URL,
                &["http", "https"],
            )?,
            limits: webhook::Limits {
                max_body: r.positive("HIBIKI_WEBHOOK_MAX_BODY_BYTES", 1 << 20)?,
                concurrency: r.positive("HIBIKI_WEBHOOK_CONCURRENCY", 1024)?,
                timeout,
            },
            stats_interval: r.millis("HIBIKI_EVENTLOG_STATS_MS", Duration::from_secs(2))?,
        })
    }
}

/// The gateway, built and ready to run.
pub struct Application {
    host: ServiceHost,
    http: TcpListener,
    router: axum::Router,
    log: EventLog,
    stats_interval: Duration,
    /// Stops the registry follower; triggered by the shutdown
    /// `run_until_stopped` is given.
    tasks: Shutdown,
}

impl Application {
    /// The bound webhook address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .expect("a bound listener has an address")
    }
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
        let http = TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| HostError::Bind {
                what: "webhooks (HTTP)",
                addr: config.http_addr,
                source,
            })?;
        let token = config.runtime.auth.outbound_service_token().clone();
        let mut host = ServiceHost::bind(config.runtime, NEEDS).await?;
        let redis = host
            .redis()
            .expect("the gateway declares that it needs Redis")
            .clone();
        let log = EventLog::from_config(redis, &config.eventlog);
        let tasks = Shutdown::new();
        let channels =
            hibiki_runtime::channels::Channels::watch(&config.contacts_url, &token, tasks.clone())
                .map_err(|e| HostError::Startup(e.to_string()))?;
        // Until the channels are loaded every webhook would get 503: report
        // NOT_SERVING so that no traffic is sent here yet. Once loaded, the
        // gateway stays ready while contacts is away (it serves what it
        // knows).
        let loaded = channels.clone();
        host.add_check(std::sync::Arc::new(move || {
            if loaded.is_loaded() {
                Ok(())
            } else {
                Err("channel registry: not loaded from contacts yet".into())
            }
        }));
        let router = webhook::router(
            webhook::Webhooks::new(channels, log.clone()),
            &config.limits,
        );
        Ok(Self {
            host,
            http,
            router,
            log,
            stats_interval: config.stats_interval,
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
        use axum::serve::ListenerExt;
        shutdown.forward_to(&self.tasks);
        tokio::spawn(publish_stats(
            self.log.clone(),
            self.stats_interval,
            self.tasks.clone(),
        ));
        let addr = self.http_addr();
        let listener = self.http.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let stop = shutdown.clone();
        let http = tokio::spawn(async move {
            axum::serve(listener, self.router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        tracing::info!(service = "gateway", webhooks = %format!("http://{addr}/line/webhook/{{channel_id}}"), "receiving LINE webhooks");
        let result = self.host.run(GrpcRoutes::new(), shutdown).await;
        self.tasks.trigger();
        match http.await {
            Ok(Ok(())) => result,
            Ok(Err(e)) => Err(HostError::Http(e)),
            Err(e) => Err(HostError::Http(std::io::Error::other(e))),
        }
    }
}

/// Publishes each shard's length, and each consumer group's lag and
/// pending entries on it, every `interval` until `stop`.
async fn publish_stats(log: EventLog, interval: Duration, stop: Shutdown) {
    loop {
        match log.stats().await {
            Ok(shards) => {
                for s in shards {
                    let shard = s.shard.to_string();
                    metrics::gauge!("hibiki_eventlog_length", "shard" => shard.clone())
                        .set(s.length as f64);
                    for g in s.groups {
                        metrics::gauge!("hibiki_eventlog_lag", "shard" => shard.clone(), "group" => g.group.clone())
                            .set(g.lag as f64);
                        metrics::gauge!("hibiki_eventlog_pending", "shard" => shard.clone(), "group" => g.group)
                            .set(g.pending as f64);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "event log stats unavailable"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_have_defaults_and_bounds() {
        let c = Config::from_env(&std::collections::HashMap::new()).unwrap();
        assert_eq!(c.http_addr, DEFAULT_HTTP_ADDR.parse().unwrap());
        assert_eq!(c.contacts_url, DEFAULT_CONTACTS_URL);
        assert_eq!(c.limits.max_body, 1 << 20);
        assert_eq!(c.limits.timeout, Duration::from_secs(1));
        for (var, bad) in [
            ("HIBIKI_WEBHOOK_TIMEOUT_MS", "2000"),
            ("HIBIKI_WEBHOOK_TIMEOUT_MS", "0"),
            ("HIBIKI_WEBHOOK_MAX_BODY_BYTES", "0"),
            ("HIBIKI_CONTACTS_URL", "contacts:50052"),
            ("HIBIKI_HTTP_ADDR", "localhost"),
            ("HIBIKI_EVENTLOG_SHARDS", "0"),
        ] {
            let err = Config::from_env(&[(var, bad)]).unwrap_err();
            assert_eq!(err.var, var, "{bad}");
        }
    }
}
