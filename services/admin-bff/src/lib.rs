//! admin-bff: the dashboard a company's operators watch their campaigns on.
//!
//! An HTTP server (axum) in front of analytics: it serves the dashboard page
//! (HTML, CSS and JavaScript embedded in the binary, no build step) and the
//! JSON and Server-Sent-Events API the page reads. An operator signs in with
//! the tenant and its operator token (`HIBIKI_OPERATOR_TOKENS` of the mesh);
//! the token travels with every call the BFF makes on the operator's behalf,
//! so analytics, contacts and scenario themselves keep each operator to its
//! one tenant. Its one secret is the key that signs the session cookies
//! (`session`).
//!
//! HTTP API (JSON errors are `{"error": "..."}`):
//! - `POST /api/session` `{"tenant", "token"}`: 204 and an HttpOnly session
//!   cookie; 400 (malformed), 401 (unknown token), 403 (token of another
//!   tenant), 503 (analytics unreachable).
//! - `DELETE /api/session`: signs out.
//! - `GET /api/overview`: segment head counts with the last hour's history,
//!   inbound events per minute over the last hour, deliveries by endpoint
//!   and outcome over the last 24 hours, dead letters, scenario funnels.
//! - `GET /api/stream`: Server-Sent Events, one `count` event per change of
//!   a segment's head count (the current counts first).
//!
//! Both read the session cookie, or `Authorization: Bearer <token>` with
//! `?tenant=<tenant>` for scripts; without either: 401.
#![forbid(unsafe_code)]

pub mod api;
pub mod feed;
pub mod session;

use std::net::SocketAddr;
use std::time::Duration;

use hibiki_runtime::app::Service;
use hibiki_runtime::config::Reader;
use hibiki_runtime::grpc::GrpcRoutes;
use hibiki_runtime::{
    ConfigError, Env, HostError, Needs, RuntimeConfig, ServiceDefaults, ServiceHost, Shutdown,
};
use tokio::net::TcpListener;

/// Name and default ports (gRPC 50056 for health, metrics 9106; the
/// dashboard on HTTP 8070).
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "admin-bff",
    grpc_port: 50056,
    metrics_port: 9106,
};

/// Default address of the dashboard.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8070";

/// The BFF keeps no store: it reports SERVING while it runs.
const NEEDS: Needs = Needs {
    postgres: None,
    redis: false,
};

/// admin-bff's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Settings shared by every service.
    pub runtime: RuntimeConfig,
    /// `HIBIKI_HTTP_ADDR`: where the dashboard is served. Default
    /// 127.0.0.1:8070.
    pub http_addr: SocketAddr,
    /// `HIBIKI_ANALYTICS_URL`: analytics' gRPC URL. Default
    /// http://127.0.0.1:50055.
    pub analytics_url: String,
    /// `HIBIKI_CONTACTS_URL`: contacts' gRPC URL, for segment names.
    /// Default http://127.0.0.1:50052.
    pub contacts_url: String,
    /// `HIBIKI_SCENARIO_URL`: scenario's gRPC URL, for the scenarios whose
    /// funnels are shown. Default http://127.0.0.1:50053.
    pub scenario_url: String,
    /// `HIBIKI_DASHBOARD_SESSION_HOURS`: how long a sign-in lasts. Default
    /// 12.
    pub session_ttl: Duration,
    /// `HIBIKI_DASHBOARD_SESSION_KEY`: signs the session cookies (at least
    /// 32 characters; the same on every replica). Unset: a key of the
    /// process's own, fine for one replica.
    pub session_key: Option<hibiki_runtime::Secret>,
}

impl Config {
    /// Reads the settings from `env`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let r = Reader::new(env);
        let web = ["http", "https"];
        Ok(Self {
            runtime: RuntimeConfig::from_env(env, DEFAULTS)?,
            http_addr: r.addr(
                "HIBIKI_HTTP_ADDR",
                DEFAULT_HTTP_ADDR.parse().expect("a valid default"),
            )?,
            analytics_url: r.url("HIBIKI_ANALYTICS_URL", "http://127.0.0.1:50055", &web)?,
            contacts_url: r.url(
                "HIBIKI_CONTACTS_URL",
                hibiki_runtime::channels::DEFAULT_CONTACTS_URL,
                &web,
            )?,
            scenario_url: r.url("HIBIKI_SCENARIO_URL", "http://127.0.0.1:50053", &web)?,
            session_ttl: Duration::from_secs(
                3600 * r.positive("HIBIKI_DASHBOARD_SESSION_HOURS", 12)? as u64,
            ),
            session_key: match r.optional("HIBIKI_DASHBOARD_SESSION_KEY") {
                Some(k) if k.len() < session::MIN_KEY_LEN => {
                    return Err(ConfigError::new(
                        "HIBIKI_DASHBOARD_SESSION_KEY",
                        format!("must be at least {} characters", session::MIN_KEY_LEN),
                    ));
                }
                other => other.map(hibiki_runtime::Secret::new),
            },
        })
    }
}

/// The BFF, built and ready to run.
pub struct Application {
    host: ServiceHost,
    http: TcpListener,
    router: axum::Router,
    tasks: Shutdown,
}

impl Application {
    /// The bound dashboard address.
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
                what: "dashboard (HTTP)",
                addr: config.http_addr,
                source,
            })?;
        let channel = |what: &str, url: &str| {
            hibiki_runtime::grpc::channel(url)
                .map_err(|e| HostError::Startup(format!("{what}: {e}")))
        };
        let tasks = Shutdown::new();
        let backends = api::Backends {
            analytics: channel("HIBIKI_ANALYTICS_URL", &config.analytics_url)?,
            contacts: channel("HIBIKI_CONTACTS_URL", &config.contacts_url)?,
            scenario: channel("HIBIKI_SCENARIO_URL", &config.scenario_url)?,
        };
        let feeds = feed::Feeds::new(backends.analytics.clone(), tasks.clone());
        if config.session_key.is_none() {
            tracing::info!(
                service = "admin-bff",
                "HIBIKI_DASHBOARD_SESSION_KEY is unset: sign-ins hold for this process only; \
                 set it (the same on every replica) to run more than one"
            );
        }
        let sessions = session::Sessions::new(config.session_key.as_ref(), config.session_ttl);
        let router = api::router(api::State::new(backends, feeds, sessions));
        let host = ServiceHost::bind(config.runtime, NEEDS).await?;
        Ok(Self {
            host,
            http,
            router,
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
        let addr = self.http_addr();
        let stop = shutdown.clone();
        let http = tokio::spawn(async move {
            axum::serve(self.http, self.router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        tracing::info!(service = "admin-bff", dashboard = %format!("http://{addr}/"), "serving the dashboard");
        let result = self.host.run(GrpcRoutes::new(), shutdown).await;
        self.tasks.trigger();
        match http.await {
            Ok(Ok(())) => result,
            Ok(Err(e)) => Err(HostError::Http(e)),
            Err(e) => Err(HostError::Http(std::io::Error::other(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bad_values() {
        let c = Config::from_env(&std::collections::HashMap::new()).unwrap();
        assert_eq!(c.http_addr, DEFAULT_HTTP_ADDR.parse().unwrap());
        assert_eq!(c.analytics_url, "http://127.0.0.1:50055");
        assert_eq!(c.session_ttl, Duration::from_secs(12 * 3600));
        for (var, bad) in [
            ("HIBIKI_HTTP_ADDR", "localhost"),
            ("HIBIKI_ANALYTICS_URL", "analytics:50055"),
            ("HIBIKI_DASHBOARD_SESSION_HOURS", "0"),
            ("HIBIKI_DASHBOARD_SESSION_KEY", "short"),
        ] {
            let err = Config::from_env(&[(var, bad)]).unwrap_err();
            assert_eq!(err.var, var, "{err}");
        }
    }
}
