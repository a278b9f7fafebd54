//! analytics: folds contacts' membership changes, delivery's outcomes and
//! the inbound event log into live counters and per-minute rollups in
//! PostgreSQL, and pushes segment counts to watchers.
//!
//! - **Sources.** `<prefix>:contacts:{membership}` (field `p`, a
//!   `MembershipChangeRecord`) and `<prefix>:delivery:outcomes` (field `o`,
//!   a `DeliveryOutcomeRecord`), each read in order by one replica at a
//!   time ([`hibiki_runtime::records`]); the event log through the shared
//!   consumer API (group `analytics`).
//! - **Exact.** Each batch is folded in one transaction that moves each
//!   stream's position past the entries it counted ([`fold`]): a replay, a
//!   crash before the acknowledgement, or a restart counts nothing twice; a
//!   stopped analytics catches up from the streams when it comes back.
//! - **Off the realtime path.** Nothing waits on analytics: the streams are
//!   written whether or not it reads them (each keeps about a million
//!   records).
//! - **Kept.** Rollups for `HIBIKI_ANALYTICS_KEEP_DAYS` (default 30).
#![forbid(unsafe_code)]

pub mod fold;
pub mod service;
pub mod watch;

use std::net::SocketAddr;
use std::time::Duration;

use hibiki_proto::analytics::v1::analytics_service_server::AnalyticsServiceServer;
use hibiki_proto::common::v1::InboundEvent;
use hibiki_proto::contacts::v1::MembershipChangeRecord;
use hibiki_proto::delivery::v1::DeliveryOutcomeRecord;
use hibiki_runtime::app::Service;
use hibiki_runtime::config::Reader;
use hibiki_runtime::eventlog::{Consumer, ConsumerConfig, EventLog, EventLogConfig};
use hibiki_runtime::grpc::GrpcRoutes;
use hibiki_runtime::records::RecordReader;
use hibiki_runtime::redis::{Redis, streams};
use hibiki_runtime::{
    ConfigError, Env, HostError, Migrated, Needs, RuntimeConfig, ServiceDefaults, ServiceHost,
    Shutdown,
};
use prost::Message;

/// Name and default ports (gRPC 50055, metrics 9105).
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "analytics",
    grpc_port: 50055,
    metrics_port: 9105,
};

/// The service's migrations (`migrations/`), applied into its own schema.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const NEEDS: Needs = Needs {
    postgres: Some(("analytics", &MIGRATOR)),
    redis: true,
};

/// Records read per round.
const BATCH: usize = 500;
/// How long a replica holds a stream it reads: a standby takes over within
/// it when the holder dies.
const LEASE: Duration = Duration::from_secs(5);
/// How long the holder's read waits in Redis for a new record (a blocking
/// read, on a single Redis) before it renews the lease and reads again.
const RECORD_WAIT: Duration = Duration::from_millis(200);

/// analytics' settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Settings shared by every service.
    pub runtime: RuntimeConfig,
    /// The event log it reads (`HIBIKI_EVENTLOG_*`, as the gateway).
    pub eventlog: EventLogConfig,
    /// `HIBIKI_ANALYTICS_KEEP_DAYS`: how long per-minute rollups are kept.
    /// Default 30 (at least 7).
    pub keep_days: u64,
    /// `HIBIKI_SCENARIO_URL`: scenario's gRPC URL, which counts funnels
    /// from its runs. Default http://127.0.0.1:50053.
    pub scenario_url: String,
}

impl Config {
    /// Reads the settings from `env`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let r = Reader::new(env);
        let keep_days = r.positive("HIBIKI_ANALYTICS_KEEP_DAYS", 30)? as u64;
        if keep_days < 7 {
            return Err(ConfigError::new(
                "HIBIKI_ANALYTICS_KEEP_DAYS",
                format!("{keep_days}: rollups are kept at least 7 days"),
            ));
        }
        Ok(Self {
            runtime: RuntimeConfig::from_env(env, DEFAULTS)?,
            eventlog: EventLogConfig::from_env(env)?,
            keep_days,
            scenario_url: r.url(
                "HIBIKI_SCENARIO_URL",
                "http://127.0.0.1:50053",
                &["http", "https"],
            )?,
        })
    }
}

/// The analytics service, built and ready to run.
pub struct Application {
    host: ServiceHost,
    routes: GrpcRoutes,
    fold: fold::Fold,
    redis: Redis,
    log: EventLog,
    keep: chrono::Duration,
    migrated: Migrated,
    watches_stop: Shutdown,
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
        let interceptor = hibiki_runtime::grpc::ClientInterceptor::new(&token)
            .map_err(|e| HostError::Startup(format!("HIBIKI_SERVICE_TOKENS: {e}")))?;
        let scenario = hibiki_runtime::grpc::channel(&config.scenario_url)
            .map_err(|e| HostError::Startup(format!("HIBIKI_SCENARIO_URL: {e}")))?;
        let scenario =
            hibiki_proto::scenario::v1::scenario_service_client::ScenarioServiceClient::with_interceptor(
                scenario,
                interceptor,
            );
        let pool = host
            .postgres()
            .expect("analytics declares that it needs PostgreSQL")
            .clone();
        let redis = host
            .redis()
            .expect("analytics declares that it needs Redis")
            .clone();
        let watches_stop = Shutdown::new();
        let watches = watch::Watches::new(pool.clone(), watches_stop.clone());
        let mut routes = GrpcRoutes::new();
        routes.add(AnalyticsServiceServer::new(service::AnalyticsApi::new(
            pool.clone(),
            watches,
            scenario,
        )));
        let log = EventLog::from_config(redis.clone(), &config.eventlog);
        let migrated = host.migrated();
        Ok(Self {
            host,
            routes,
            fold: fold::Fold::new(pool),
            redis,
            log,
            keep: chrono::Duration::days(config.keep_days as i64),
            migrated,
            watches_stop,
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
        // Watch streams end (UNAVAILABLE) as the server begins to drain, so
        // they do not hold the drain open.
        let watches_stop = self.watches_stop.clone();
        let on_shutdown = shutdown.clone();
        tokio::spawn(async move {
            on_shutdown.cancelled().await;
            watches_stop.trigger();
        });
        let name = ConsumerConfig::new("analytics").name;
        let membership = RecordReader::new(
            self.redis.clone(),
            self.redis.key(&["contacts", "{membership}"]),
            "analytics",
            &name,
            "p",
            LEASE,
        )
        .waiting(RECORD_WAIT);
        let outcomes = RecordReader::new(
            self.redis.clone(),
            self.redis.key(&["delivery", "outcomes"]),
            "analytics",
            &name,
            "o",
            LEASE,
        )
        .waiting(RECORD_WAIT);
        let migrated = self.migrated.clone();
        let handles = vec![
            tokio::spawn(records(
                membership,
                self.fold.clone(),
                Source::Membership,
                migrated.clone(),
                tasks.clone(),
            )),
            tokio::spawn(records(
                outcomes,
                self.fold.clone(),
                Source::Outcomes,
                migrated.clone(),
                tasks.clone(),
            )),
            tokio::spawn(events(
                self.log.clone(),
                self.fold.clone(),
                migrated.clone(),
                tasks.clone(),
            )),
            tokio::spawn(expire(
                self.fold.clone(),
                self.keep,
                migrated,
                tasks.clone(),
            )),
        ];
        let result = self.host.run(self.routes, shutdown).await;
        tasks.trigger();
        for h in handles {
            let _ = h.await;
        }
        result
    }
}

#[derive(Clone, Copy)]
enum Source {
    Membership,
    Outcomes,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Membership => "membership",
            Source::Outcomes => "delivery",
        }
    }
}

/// Folds one record stream until `stop`.
async fn records(
    mut reader: RecordReader,
    fold: fold::Fold,
    source: Source,
    migrated: Migrated,
    stop: Shutdown,
) {
    tokio::select! {
        () = stop.cancelled() => return,
        () = migrated.wait() => {}
    }
    // After an empty read (a wait in Redis that ran out, a standby, or
    // Redis Cluster), a short pause.
    let idle = Duration::from_millis(20);
    loop {
        if stop.is_triggered() {
            reader.release().await;
            return;
        }
        let entries = match reader.read(BATCH).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(source = source.name(), error = %e, "records unreadable; retrying");
                pause(&stop, Duration::from_millis(500)).await;
                continue;
            }
        };
        if entries.is_empty() {
            pause(&stop, idle).await;
            continue;
        }
        let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        let folded = match source {
            Source::Membership => {
                let reads =
                    decode::<MembershipChangeRecord>(reader.stream(), &entries, source.name());
                let traces: Vec<_> = reads
                    .iter()
                    .filter_map(|r| r.record.trace.clone())
                    .collect();
                let folded = fold.memberships(reads).await;
                if folded.is_ok() {
                    counted_in_traces(&traces);
                }
                folded.map(|c| c.len() as u64)
            }
            Source::Outcomes => {
                let reads =
                    decode::<DeliveryOutcomeRecord>(reader.stream(), &entries, source.name());
                fold.outcomes(reads).await
            }
        };
        match folded {
            Ok(_) => {
                metrics::counter!("hibiki_analytics_records_total", "source" => source.name())
                    .increment(ids.len() as u64);
                if let Err(e) = reader.ack(&ids).await {
                    // Read again later, and counted once.
                    tracing::warn!(source = source.name(), error = %e, "records not acknowledged");
                }
            }
            Err(e) => {
                // Left pending: read again after the lease passes to a
                // reader that starts with the pending ones (this one, on
                // its next take).
                tracing::warn!(source = source.name(), error = %e, "records not folded; retrying");
                reader.release().await;
                pause(&stop, Duration::from_millis(500)).await;
            }
        }
    }
}

/// Marks, in each change's trace, that the live count now includes it: the
/// last hop of a tap's trace (webhook → … → contacts → analytics).
fn counted_in_traces(traces: &[hibiki_proto::common::v1::TraceContext]) {
    for trace in traces.iter().filter(|t| !t.traceparent.is_empty()) {
        let span = tracing::info_span!("analytics.count");
        hibiki_runtime::telemetry::set_parent(
            &span,
            hibiki_runtime::telemetry::context_from_payload(trace),
        );
        span.in_scope(|| {});
    }
}

/// The records of `stream`'s entries, each with its position; an entry
/// that cannot be read is logged and skipped (the next one's position
/// passes it).
fn decode<M: Message + Default>(
    stream: &str,
    entries: &[(String, Vec<u8>)],
    source: &str,
) -> Vec<fold::Read<M>> {
    entries
        .iter()
        .filter_map(|(id, payload)| {
            let Some(at) = streams::position(id) else {
                tracing::error!(source, entry = %id, "entry with an unreadable id skipped");
                return None;
            };
            match M::decode(payload.as_slice()) {
                Ok(record) => Some(fold::Read {
                    stream: stream.to_owned(),
                    at,
                    record,
                }),
                Err(e) => {
                    tracing::error!(source, entry = %id, error = %e, "undecodable record skipped");
                    None
                }
            }
        })
        .collect()
}

/// Folds the event log until `stop`.
async fn events(log: EventLog, fold: fold::Fold, migrated: Migrated, stop: Shutdown) {
    tokio::select! {
        () = stop.cancelled() => return,
        () = migrated.wait() => {}
    }
    let consumer = Consumer::start(log.clone(), ConsumerConfig::new("analytics"));
    loop {
        let batch = tokio::select! {
            () = stop.cancelled() => break,
            batch = consumer.next() => batch,
        };
        let deliveries = match batch {
            Ok(d) if d.is_empty() => continue,
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "event log unreadable; retrying");
                pause(&stop, Duration::from_millis(500)).await;
                continue;
            }
        };
        let events: Vec<fold::Read<InboundEvent>> = deliveries
            .iter()
            .filter_map(|d| {
                let at = streams::position(&d.id)?;
                let record = InboundEvent::decode(d.payload.as_slice()).ok()?;
                Some(fold::Read {
                    stream: log.stream_key(d.shard),
                    at,
                    record,
                })
            })
            .collect();
        let mut wait = Duration::from_millis(100);
        while let Err(e) = fold.events(events.clone()).await {
            if stop.is_triggered() {
                consumer.stop().await;
                return;
            }
            tracing::warn!(error = %e, "events not folded; retrying");
            pause(&stop, wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        metrics::counter!("hibiki_analytics_records_total", "source" => "event")
            .increment(events.len() as u64);
        if let Err(e) = consumer.ack(&deliveries).await {
            tracing::warn!(error = %e, "events not acknowledged");
        }
    }
    consumer.stop().await;
}

/// Forgets folded ids and old rollups every hour.
async fn expire(fold: fold::Fold, keep: chrono::Duration, migrated: Migrated, stop: Shutdown) {
    tokio::select! {
        () = stop.cancelled() => return,
        () = migrated.wait() => {}
    }
    loop {
        if let Err(e) = fold.expire(keep).await {
            tracing::warn!(error = %e, "old rollups not removed");
        }
        pause(&stop, Duration::from_secs(3600)).await;
        if stop.is_triggered() {
            return;
        }
    }
}

async fn pause(stop: &Shutdown, d: Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(d) => {}
    }
}
