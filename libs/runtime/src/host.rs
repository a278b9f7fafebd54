//! What every service's `Application` is built on: the bound listeners, the
//! PostgreSQL and Redis handles, the health reporter, and the run loop that
//! serves gRPC and `/metrics`, watches the dependencies, and drains on
//! shutdown.
//!
//! Health: a service reports SERVING only while every store it needs answers
//! (and, for PostgreSQL, once its migrations are applied) and its own
//! readiness checks pass ([`ServiceHost::add_check`]); NOT_SERVING
//! otherwise. A monitor re-checks twice a second, so a service recovers by
//! itself when a store comes back. The name [`LIVENESS`] answers SERVING
//! while the process runs, for liveness probes.

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::Authenticator;
use crate::config::RuntimeConfig;
use crate::grpc::{self, GrpcRoutes};
use crate::metrics;
use crate::postgres::{self, PostgresError};
use crate::redis::{Redis, RedisError};
use crate::shutdown::Shutdown;

/// The health name that answers SERVING for as long as the process runs,
/// whatever its stores say: Kubernetes' liveness probe asks for it, so a
/// PostgreSQL outage takes pods out of the load balancer (readiness, the
/// overall status "") without restarting them all.
pub const LIVENESS: &str = "liveness";

/// How often the dependency monitor checks the stores.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);
/// How long one check may take before it counts as a failure.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A service's own readiness check: `Err` says what is not ready yet.
pub type ReadinessCheck = std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The stores a service needs.
#[derive(Clone, Copy)]
pub struct Needs {
    /// PostgreSQL: the service's schema and the migrations to apply into it.
    pub postgres: Option<(&'static str, &'static sqlx::migrate::Migrator)>,
    /// Redis.
    pub redis: bool,
}

/// A service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// PostgreSQL settings are invalid.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// Redis settings are invalid.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The metrics server failed.
    #[error("metrics server: {0}")]
    Metrics(std::io::Error),
    /// A service's own HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    /// A service's own part could not be set up.
    #[error("cannot start: {0}")]
    Startup(String),
}

/// Completes once the service's migrations are applied (at once for a
/// service without PostgreSQL). Background workers that touch the service's
/// tables wait on it, so they do not run against a schema still being made.
#[derive(Clone)]
pub struct Migrated(tokio::sync::watch::Receiver<bool>);

impl Migrated {
    /// Waits until the migrations are applied.
    pub async fn wait(mut self) {
        // An error means the host is gone: nothing will run anyway.
        let _ = self.0.wait_for(|applied| *applied).await;
    }
}

/// A service's runtime: listeners bound, stores connected lazily.
pub struct ServiceHost {
    migrated: tokio::sync::watch::Sender<bool>,
    config: RuntimeConfig,
    needs: Needs,
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    postgres: Option<PgPool>,
    redis: Option<Redis>,
    health: HealthReporter,
    checks: Vec<ReadinessCheck>,
    health_server:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, HostError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HostError::Bind { what, addr, source })
}

impl ServiceHost {
    /// Binds the gRPC and metrics listeners (port 0 picks free ports) and
    /// prepares the stores. Does not wait for the stores: a service starts
    /// while they are down and reports NOT_SERVING.
    pub async fn bind(config: RuntimeConfig, needs: Needs) -> Result<Self, HostError> {
        let grpc_listener = bind("gRPC", config.server.grpc_addr).await?;
        let metrics_listener = bind("metrics", config.server.metrics_addr).await?;
        let postgres = match needs.postgres {
            Some((schema, _)) => Some(postgres::connect_lazy(&config.postgres, schema)?),
            None => None,
        };
        let redis = if needs.redis {
            Some(Redis::connect_lazy(&config.redis)?)
        } else {
            None
        };
        let health = HealthReporter::new();
        let health_server = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        let (migrated, _) = tokio::sync::watch::channel(needs.postgres.is_none());
        Ok(Self {
            migrated,
            config,
            needs,
            grpc_listener,
            metrics_listener,
            postgres,
            redis,
            health,
            checks: Vec::new(),
            health_server,
        })
    }

    /// Adds a readiness check of the service's own, evaluated with the
    /// stores' on every health round: while it fails the service reports
    /// NOT_SERVING, so that load balancers send it nothing it cannot take.
    pub fn add_check(&mut self, check: ReadinessCheck) {
        self.checks.push(check);
    }

    /// The settings.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The PostgreSQL pool, for services that need one.
    pub fn postgres(&self) -> Option<&PgPool> {
        self.postgres.as_ref()
    }

    /// Completes once the migrations are applied.
    pub fn migrated(&self) -> Migrated {
        Migrated(self.migrated.subscribe())
    }

    /// The Redis handle, for services that need one.
    pub fn redis(&self) -> Option<&Redis> {
        self.redis.as_ref()
    }

    /// Serves `routes` until `shutdown` is triggered, then drains: health
    /// goes NOT_SERVING, the listeners stop accepting, in-flight calls get
    /// up to the configured grace period to finish.
    pub async fn run(self, routes: GrpcRoutes, shutdown: Shutdown) -> Result<(), HostError> {
        let service = self.config.service;
        let names: Vec<String> = routes
            .service_names()
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        // Install the recorder before anything records.
        metrics::recorder();
        let monitor = tokio::spawn(monitor(
            service,
            self.needs,
            self.migrated.clone(),
            self.postgres.clone(),
            self.redis.clone(),
            self.health.clone(),
            self.checks.clone(),
            names.clone(),
            shutdown.clone(),
        ));

        let metrics_task = tokio::spawn(metrics::serve(self.metrics_listener, shutdown.wait()));

        let routes = routes.finish(self.health_server);
        let authenticator = Authenticator::new(&self.config.auth);
        let grace = self.config.server.shutdown_grace;
        let health = self.health.clone();
        let stop = shutdown.clone();
        // Before the listener closes, tell load balancers to stop sending.
        let drain_signal = async move {
            stop.cancelled().await;
            set_all(&health, &names, ServingStatus::NotServing).await;
        };
        let server = grpc::serve(
            self.grpc_listener,
            routes,
            &self.config.server,
            authenticator,
            service,
            grpc::Readiness::when(self.migrated.subscribe()),
            drain_signal,
        );
        tokio::pin!(server);
        let result = tokio::select! {
            r = &mut server => r.map_err(HostError::from),
            () = shutdown.cancelled() => {
                // Shutdown started: the server is draining; give it the grace
                // period, then cut off what is still running.
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(r) => r.map_err(HostError::from),
                    Err(_) => {
                        tracing::warn!(service, grace_ms = grace.as_millis() as u64, "grace period over: cutting off calls still in flight");
                        Ok(())
                    }
                }
            }
        };
        shutdown.trigger();
        let _ = monitor.await;
        if let Ok(Err(e)) = metrics_task.await {
            return Err(HostError::Metrics(e));
        }
        tracing::info!(service, "stopped");
        result
    }
}

async fn set_all(health: &HealthReporter, names: &[String], status: ServingStatus) {
    health.set_service_status("", status).await;
    for name in names {
        health.set_service_status(name, status).await;
    }
}

/// Checks the stores until shutdown and keeps the health status in step.
#[allow(clippy::too_many_arguments)] // one task's whole context, passed once
async fn monitor(
    service: &'static str,
    needs: Needs,
    migrated_tx: tokio::sync::watch::Sender<bool>,
    postgres: Option<PgPool>,
    redis: Option<Redis>,
    health: HealthReporter,
    checks: Vec<ReadinessCheck>,
    names: Vec<String>,
    shutdown: Shutdown,
) {
    let mut migrated = false;
    let mut serving: Option<bool> = None;
    loop {
        let mut problems: Vec<String> = Vec::new();
        if let (Some(pool), Some((schema, migrator))) = (&postgres, needs.postgres) {
            let check = async {
                if !migrated {
                    postgres::migrate(pool, schema, migrator).await?;
                    migrated = true;
                    migrated_tx.send_replace(true);
                    tracing::info!(service, schema, "migrations applied");
                }
                postgres::ping(pool).await.map_err(PostgresError::from)
            };
            match tokio::time::timeout(CHECK_TIMEOUT, check).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => problems.push(format!("postgres: {e}")),
                Err(_) => problems.push("postgres: no answer within 2 s".into()),
            }
        }
        if let Some(redis) = &redis {
            match tokio::time::timeout(CHECK_TIMEOUT, redis.ping()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => problems.push(format!("redis: {e}")),
                Err(_) => problems.push("redis: no answer within 2 s".into()),
            }
        }
        for check in &checks {
            if let Err(e) = check() {
                problems.push(e);
            }
        }
        let ok = problems.is_empty();
        if shutdown.is_triggered() {
            return;
        }
        if serving != Some(ok) {
            if ok {
                tracing::info!(service, "dependencies reachable: SERVING");
                set_all(&health, &names, ServingStatus::Serving).await;
            } else {
                tracing::warn!(service, problems = ?problems, "dependencies unreachable: NOT_SERVING");
                set_all(&health, &names, ServingStatus::NotServing).await;
            }
            ::metrics::gauge!("hibiki_serving", "service" => service).set(if ok {
                1.0
            } else {
                0.0
            });
            serving = Some(ok);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
}
