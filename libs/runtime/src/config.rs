//! Typed configuration from `HIBIKI_*` variables.
//!
//! Every value has a local-development default, so `hibiki dev` and a
//! service started by hand work with no set-up. Values are read through the
//! [`Env`] trait, so a test builds a config from a map without touching the
//! process environment, and parsing has no side effects. A bad value is
//! rejected with a [`ConfigError`] that names the variable.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// Where configuration values come from.
pub trait Env {
    /// The value of `key`, if set.
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, key: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (*v).to_owned())
    }
}

/// An [`Env`] that remembers every variable asked for. A service binary reads
/// its settings through one, so that it can list the settings it reads
/// (`hibiki-contacts settings`) and warn about a `HIBIKI_*` variable that is
/// set but read by nothing: a misspelt name, or another service's setting,
/// would otherwise be ignored silently and the default used instead.
pub struct Recording<'a> {
    env: &'a dyn Env,
    asked: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl<'a> Recording<'a> {
    /// Reads through `env`, remembering the names.
    pub fn new(env: &'a dyn Env) -> Self {
        Self {
            env,
            asked: std::sync::Mutex::default(),
        }
    }

    /// Every variable asked for so far, in order of name.
    pub fn asked(&self) -> Vec<String> {
        self.asked
            .lock()
            .expect("the set is never left half-updated")
            .iter()
            .cloned()
            .collect()
    }

    /// The names in `set` that start with `HIBIKI_` and were never asked for.
    pub fn unread<'n>(&self, set: impl IntoIterator<Item = &'n str>) -> Vec<String> {
        let asked = self
            .asked
            .lock()
            .expect("the set is never left half-updated");
        let mut unread: Vec<String> = set
            .into_iter()
            .filter(|name| name.starts_with("HIBIKI_") && !asked.contains(*name))
            .map(str::to_owned)
            .collect();
        unread.sort();
        unread.dedup();
        unread
    }
}

impl Env for Recording<'_> {
    fn var(&self, key: &str) -> Option<String> {
        self.asked
            .lock()
            .expect("the set is never left half-updated")
            .insert(key.to_owned());
        self.env.var(key)
    }
}

/// Values that take precedence over another [`Env`]: lets `hibiki dev` give
/// each in-process service its own ports, and tests point a service at their
/// own database and Redis prefix.
#[derive(Debug, Clone, Default)]
pub struct Overlay<E> {
    base: E,
    overrides: HashMap<String, String>,
}

impl<E: Env> Overlay<E> {
    /// `base`, with nothing overridden yet.
    pub fn new(base: E) -> Self {
        Self {
            base,
            overrides: HashMap::new(),
        }
    }

    /// Sets `key` to `value`, whatever `base` says.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.overrides.insert(key.to_owned(), value.into());
        self
    }
}

impl<E: Env> Env for Overlay<E> {
    fn var(&self, key: &str) -> Option<String> {
        self.overrides
            .get(key)
            .cloned()
            .or_else(|| self.base.var(key))
    }
}

/// A variable holds a value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ConfigError {
    /// The variable, e.g. `HIBIKI_GRPC_ADDR`.
    pub var: String,
    /// What is wrong, including the rejected value unless it is secret.
    pub reason: String,
}

impl ConfigError {
    /// A new error about `var`.
    pub fn new(var: &str, reason: impl Into<String>) -> Self {
        Self {
            var: var.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A secret string (token, password, channel secret). Its `Debug` and
/// `Display` print `[redacted]`, so it cannot leak into logs or errors by
/// accident; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value. Call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Reads typed values from an [`Env`].
pub struct Reader<'a> {
    env: &'a dyn Env,
}

impl<'a> Reader<'a> {
    /// Reads from `env`.
    pub fn new(env: &'a dyn Env) -> Self {
        Self { env }
    }

    /// The raw value of `key`, treating an empty value as unset.
    pub fn raw(&self, key: &str) -> Option<String> {
        self.env.var(key).filter(|v| !v.trim().is_empty())
    }

    /// A string, or `default` when unset.
    pub fn string(&self, key: &str, default: &str) -> String {
        self.raw(key).unwrap_or_else(|| default.to_owned())
    }

    /// An optional string.
    pub fn optional(&self, key: &str) -> Option<String> {
        self.raw(key)
    }

    /// A value parsed with `FromStr`, or `default` when unset.
    pub fn parse<T>(&self, key: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|e| ConfigError::new(key, format!("invalid value {v:?}: {e}"))),
        }
    }

    /// A socket address such as `127.0.0.1:50051`.
    pub fn addr(&self, key: &str, default: SocketAddr) -> Result<SocketAddr, ConfigError> {
        self.parse(key, default)
    }

    /// A count that must be at least 1.
    pub fn positive(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        let n: usize = self.parse(key, default)?;
        if n == 0 {
            return Err(ConfigError::new(key, "must be at least 1"));
        }
        Ok(n)
    }

    /// A duration in milliseconds (variables holding one end in `_MS`).
    pub fn millis(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        let ms: u64 = self.parse(key, default.as_millis() as u64)?;
        Ok(Duration::from_millis(ms))
    }

    /// A fraction between 0 and 1 inclusive.
    pub fn ratio(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        let r: f64 = self.parse(key, default)?;
        if !(0.0..=1.0).contains(&r) {
            return Err(ConfigError::new(
                key,
                format!("must be between 0 and 1, got {r}"),
            ));
        }
        Ok(r)
    }

    /// A URL whose scheme is one of `schemes`.
    pub fn url(&self, key: &str, default: &str, schemes: &[&str]) -> Result<String, ConfigError> {
        let url = self.string(key, default);
        let scheme_ok = schemes.iter().any(|s| url.starts_with(&format!("{s}://")));
        if !scheme_ok {
            // The URL may hold a password: name the expected schemes, not the value.
            return Err(ConfigError::new(
                key,
                format!(
                    "must be a URL starting with {}",
                    schemes.join("://, ") + "://"
                ),
            ));
        }
        Ok(url)
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable when stderr is a terminal, JSON otherwise.
    Auto,
    /// Human-readable, coloured.
    Pretty,
    /// One JSON object per line, for clusters.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "pretty" | "text" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            _ => Err("expected auto, pretty or json".to_owned()),
        }
    }
}

/// Logging and tracing settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// `service.name` of exported spans, e.g. `hibiki-contacts`.
    pub service_name: String,
    /// `HIBIKI_LOG_FORMAT`: auto, pretty or json. Default auto.
    pub log_format: LogFormat,
    /// `HIBIKI_LOG`: a tracing filter such as `info,hibiki_contacts=debug`.
    /// Default `info`.
    pub log_filter: String,
    /// `HIBIKI_OTLP_ENDPOINT`: where to export spans over OTLP/gRPC, e.g.
    /// `http://127.0.0.1:4317`. Unset: spans are not exported (trace context
    /// still propagates).
    pub otlp_endpoint: Option<String>,
    /// `HIBIKI_TRACE_SAMPLE_RATIO`: the fraction of new traces sampled
    /// (0 to 1); a trace continued from a caller follows the caller's
    /// decision. Default 1.
    pub sample_ratio: f64,
}

impl TelemetryConfig {
    /// Reads the telemetry settings of `service_name`.
    pub fn from_env(env: &dyn Env, service_name: &str) -> Result<Self, ConfigError> {
        let r = Reader::new(env);
        let log_filter = r.string("HIBIKI_LOG", "info");
        tracing_subscriber::EnvFilter::try_new(&log_filter)
            .map_err(|e| ConfigError::new("HIBIKI_LOG", format!("invalid filter: {e}")))?;
        let otlp_endpoint = match r.optional("HIBIKI_OTLP_ENDPOINT") {
            Some(e) if !(e.starts_with("http://") || e.starts_with("https://")) => {
                return Err(ConfigError::new(
                    "HIBIKI_OTLP_ENDPOINT",
                    format!("must start with http:// or https://, got {e:?}"),
                ));
            }
            other => other,
        };
        Ok(Self {
            service_name: service_name.to_owned(),
            log_format: r.parse("HIBIKI_LOG_FORMAT", LogFormat::Auto)?,
            log_filter,
            otlp_endpoint,
            sample_ratio: r.ratio("HIBIKI_TRACE_SAMPLE_RATIO", 1.0)?,
        })
    }
}

/// Bearer tokens the mesh accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// `HIBIKI_SERVICE_TOKENS`: comma-separated tokens of the mesh's own
    /// services. All are accepted (so a token can be rotated); the first is the
    /// one this process presents when it calls another service.
    pub service_tokens: Vec<Secret>,
    /// `HIBIKI_OPERATOR_TOKENS`: comma-separated `tenant=token` pairs; each
    /// token may act only on its tenant.
    pub operator_tokens: Vec<(String, Secret)>,
}

/// The service token `hibiki dev` and local runs use when none is configured.
/// Production manifests always set `HIBIKI_SERVICE_TOKENS` from a Secret.
pub const DEV_SERVICE_TOKEN: &str = "hibiki-dev-service-token";

impl AuthConfig {
    /// Reads the token settings.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let r = Reader::new(env);
        let service_tokens: Vec<Secret> = r
            .string("HIBIKI_SERVICE_TOKENS", DEV_SERVICE_TOKEN)
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(Secret::new)
            .collect();
        if let Some(short) = service_tokens.iter().position(|t| t.expose().len() < 16) {
            return Err(ConfigError::new(
                "HIBIKI_SERVICE_TOKENS",
                format!("token #{} is shorter than 16 characters", short + 1),
            ));
        }
        let mut operator_tokens = Vec::new();
        if let Some(raw) = r.optional("HIBIKI_OPERATOR_TOKENS") {
            for (i, pair) in raw.split(',').map(str::trim).enumerate() {
                if pair.is_empty() {
                    continue;
                }
                let Some((tenant, token)) = pair.split_once('=') else {
                    return Err(ConfigError::new(
                        "HIBIKI_OPERATOR_TOKENS",
                        format!("entry #{} is not of the form tenant=token", i + 1),
                    ));
                };
                let (tenant, token) = (tenant.trim(), token.trim());
                if tenant.is_empty() || token.len() < 16 {
                    return Err(ConfigError::new(
                        "HIBIKI_OPERATOR_TOKENS",
                        format!(
                            "entry #{} needs a tenant and a token of at least 16 characters",
                            i + 1
                        ),
                    ));
                }
                operator_tokens.push((tenant.to_owned(), Secret::new(token)));
            }
        }
        Ok(Self {
            service_tokens,
            operator_tokens,
        })
    }

    /// The token this process presents to other services.
    pub fn outbound_service_token(&self) -> &Secret {
        &self.service_tokens[0]
    }
}

/// gRPC server settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// `HIBIKI_GRPC_ADDR`: the gRPC listen address (port 0 picks a free port).
    pub grpc_addr: SocketAddr,
    /// `HIBIKI_METRICS_ADDR`: the Prometheus `/metrics` listen address.
    pub metrics_addr: SocketAddr,
    /// `HIBIKI_GRPC_TIMEOUT_MS`: the longest a unary RPC may run. Default
    /// 10,000. A shorter `grpc-timeout` from the caller wins.
    pub request_timeout: Duration,
    /// `HIBIKI_GRPC_CONCURRENCY`: RPCs served at once by this process;
    /// beyond it calls are shed at once with RESOURCE_EXHAUSTED. Default 1024.
    pub concurrency_limit: usize,
    /// `HIBIKI_SHUTDOWN_GRACE_MS`: how long in-flight work may take to finish
    /// after SIGTERM before it is cut off. Default 10,000.
    pub shutdown_grace: Duration,
}

/// PostgreSQL settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresConfig {
    /// `HIBIKI_DATABASE_URL`, default `postgres://root@127.0.0.1:5432/hibiki`.
    pub url: Secret,
    /// `HIBIKI_DATABASE_MAX_CONNECTIONS`, default 10.
    pub max_connections: u32,
}

/// Redis settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// `HIBIKI_REDIS_URL`, default `redis://127.0.0.1:6379`. Under Redis
    /// Cluster, one or more of its nodes, comma-separated (the others are
    /// found from them).
    pub url: Secret,
    /// `HIBIKI_REDIS_CLUSTER`: whether Redis is a Redis Cluster. Default
    /// false.
    pub cluster: bool,
    /// `HIBIKI_REDIS_PREFIX`: the first part of every key, so several meshes
    /// (or tests) can share one Redis. Default `hibiki`.
    pub key_prefix: String,
    /// `HIBIKI_REDIS_POOL_SIZE`: connections for blocking reads and
    /// transactions (hot-path writes use one shared multiplexed connection).
    /// Default 16.
    pub pool_size: usize,
}

/// Default listen ports of one service.
#[derive(Debug, Clone, Copy)]
pub struct ServiceDefaults {
    /// The service's short name, e.g. `contacts`.
    pub name: &'static str,
    /// Default gRPC port.
    pub grpc_port: u16,
    /// Default metrics port.
    pub metrics_port: u16,
}

/// Settings every hibiki service reads.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// The service's short name.
    pub service: &'static str,
    /// Server settings.
    pub server: ServerConfig,
    /// Telemetry settings.
    pub telemetry: TelemetryConfig,
    /// Accepted tokens.
    pub auth: AuthConfig,
    /// PostgreSQL.
    pub postgres: PostgresConfig,
    /// Redis.
    pub redis: RedisConfig,
}

/// `HIBIKI_REDIS_URL`: one URL, or several comma-separated (Redis
/// Cluster's seed nodes), each `redis://` or `rediss://`.
fn redis_urls(r: &Reader<'_>) -> Result<String, ConfigError> {
    let urls = r.string("HIBIKI_REDIS_URL", DEFAULT_REDIS_URL);
    for url in urls.split(',').map(str::trim) {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            // The URL may hold a password: name the schemes, not the value.
            return Err(ConfigError::new(
                "HIBIKI_REDIS_URL",
                "must be a URL starting with redis:// or rediss:// (several, comma-separated, \
                 for Redis Cluster)",
            ));
        }
    }
    Ok(urls)
}

/// Default PostgreSQL URL: the local server with trust auth.
pub const DEFAULT_DATABASE_URL: &str = "postgres://root@127.0.0.1:5432/hibiki";
/// Default Redis URL.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

impl RuntimeConfig {
    /// Reads the settings of the service described by `defaults`.
    pub fn from_env(env: &dyn Env, defaults: ServiceDefaults) -> Result<Self, ConfigError> {
        let r = Reader::new(env);
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let key_prefix = r.string("HIBIKI_REDIS_PREFIX", "hibiki");
        if key_prefix.contains(['{', '}', ' ']) {
            return Err(ConfigError::new(
                "HIBIKI_REDIS_PREFIX",
                format!("must not contain braces or spaces, got {key_prefix:?}"),
            ));
        }
        let redis_url = redis_urls(&r)?;
        let redis_cluster: bool = r.parse("HIBIKI_REDIS_CLUSTER", false)?;
        if redis_url.contains(',') && !redis_cluster {
            return Err(ConfigError::new(
                "HIBIKI_REDIS_URL",
                "lists several nodes: set HIBIKI_REDIS_CLUSTER=true for a Redis Cluster",
            ));
        }
        Ok(Self {
            service: defaults.name,
            server: ServerConfig {
                grpc_addr: r.addr("HIBIKI_GRPC_ADDR", local(defaults.grpc_port))?,
                metrics_addr: r.addr("HIBIKI_METRICS_ADDR", local(defaults.metrics_port))?,
                request_timeout: r.millis("HIBIKI_GRPC_TIMEOUT_MS", Duration::from_secs(10))?,
                concurrency_limit: r.positive("HIBIKI_GRPC_CONCURRENCY", 1024)?,
                shutdown_grace: r.millis("HIBIKI_SHUTDOWN_GRACE_MS", Duration::from_secs(10))?,
            },
            telemetry: TelemetryConfig::from_env(env, &format!("hibiki-{}", defaults.name))?,
            auth: AuthConfig::from_env(env)?,
            postgres: PostgresConfig {
                url: Secret::new(r.url(
                    "HIBIKI_DATABASE_URL",
                    DEFAULT_DATABASE_URL,
                    &["postgres", "postgresql"],
                )?),
                max_connections: r.positive("HIBIKI_DATABASE_MAX_CONNECTIONS", 10)? as u32,
            },
            redis: RedisConfig {
                url: Secret::new(redis_url),
                cluster: redis_cluster,
                key_prefix,
                pool_size: r.positive("HIBIKI_REDIS_POOL_SIZE", 16)?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTACTS: ServiceDefaults = ServiceDefaults {
        name: "contacts",
        grpc_port: 50052,
        metrics_port: 9102,
    };

    #[test]
    fn defaults_point_at_local_services() {
        let c = RuntimeConfig::from_env(&HashMap::new(), CONTACTS).unwrap();
        assert_eq!(c.server.grpc_addr, "127.0.0.1:50052".parse().unwrap());
        assert_eq!(c.server.metrics_addr, "127.0.0.1:9102".parse().unwrap());
        assert_eq!(c.postgres.url.expose(), DEFAULT_DATABASE_URL);
        assert_eq!(c.redis.url.expose(), DEFAULT_REDIS_URL);
        assert_eq!(c.redis.key_prefix, "hibiki");
        assert_eq!(c.telemetry.service_name, "hibiki-contacts");
        assert_eq!(c.telemetry.otlp_endpoint, None);
        assert_eq!(c.telemetry.sample_ratio, 1.0);
        assert_eq!(c.server.request_timeout, Duration::from_secs(10));
        assert_eq!(c.auth.outbound_service_token().expose(), DEV_SERVICE_TOKEN);
        assert!(c.auth.operator_tokens.is_empty());
    }

    #[test]
    fn variables_override_defaults() {
        let env = [
            ("HIBIKI_GRPC_ADDR", "0.0.0.0:7000"),
            ("HIBIKI_GRPC_TIMEOUT_MS", "1500"),
            ("HIBIKI_TRACE_SAMPLE_RATIO", "0.01"),
            ("HIBIKI_OTLP_ENDPOINT", "http://collector:4317"),
            ("HIBIKI_LOG_FORMAT", "json"),
            ("HIBIKI_REDIS_PREFIX", "t42"),
            (
                "HIBIKI_SERVICE_TOKENS",
                "new-token-0123456789, old-token-0123456789",
            ),
            ("HIBIKI_OPERATOR_TOKENS", "acme=acme-token-0123456789"),
        ];
        let c = RuntimeConfig::from_env(&env, CONTACTS).unwrap();
        assert_eq!(c.server.grpc_addr, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(c.server.request_timeout, Duration::from_millis(1500));
        assert_eq!(c.telemetry.sample_ratio, 0.01);
        assert_eq!(
            c.telemetry.otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
        assert_eq!(c.telemetry.log_format, LogFormat::Json);
        assert_eq!(c.redis.key_prefix, "t42");
        assert_eq!(c.auth.service_tokens.len(), 2);
        assert_eq!(
            c.auth.outbound_service_token().expose(),
            "new-token-0123456789"
        );
        assert_eq!(c.auth.operator_tokens[0].0, "acme");
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let cases: &[(&str, &str)] = &[
            ("HIBIKI_GRPC_ADDR", "localhost"),
            ("HIBIKI_GRPC_TIMEOUT_MS", "soon"),
            ("HIBIKI_GRPC_CONCURRENCY", "0"),
            ("HIBIKI_TRACE_SAMPLE_RATIO", "1.5"),
            ("HIBIKI_OTLP_ENDPOINT", "collector:4317"),
            ("HIBIKI_LOG_FORMAT", "xml"),
            ("HIBIKI_LOG", "info,=="),
            ("HIBIKI_DATABASE_URL", "mysql://root@db/hibiki"),
            ("HIBIKI_REDIS_URL", "127.0.0.1:6379"),
            ("HIBIKI_REDIS_URL", "redis://a:6379,b:6379"),
            ("HIBIKI_REDIS_URL", "redis://a:6379,redis://b:6379"),
            ("HIBIKI_REDIS_CLUSTER", "yes"),
            ("HIBIKI_REDIS_PREFIX", "{bad}"),
            ("HIBIKI_SERVICE_TOKENS", "short"),
            ("HIBIKI_OPERATOR_TOKENS", "acme"),
        ];
        for (var, value) in cases {
            let env = [(*var, *value)];
            let err = RuntimeConfig::from_env(&env, CONTACTS)
                .expect_err(&format!("{var}={value} must be rejected"));
            assert_eq!(err.var, *var, "{err}");
            assert!(err.to_string().starts_with(var), "{err}");
        }
    }

    #[test]
    fn a_redis_cluster_is_named_by_some_of_its_nodes() {
        let env = [
            (
                "HIBIKI_REDIS_URL",
                "redis://:pw@redis-0:6379, redis://:pw@redis-1:6379",
            ),
            ("HIBIKI_REDIS_CLUSTER", "true"),
        ];
        let c = RuntimeConfig::from_env(&env, CONTACTS).unwrap();
        assert!(c.redis.cluster);
        assert!(
            !RuntimeConfig::from_env(&[], CONTACTS)
                .unwrap()
                .redis
                .cluster
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let env = [("HIBIKI_DATABASE_URL", "postgres://u:hunter2@db/hibiki")];
        let c = RuntimeConfig::from_env(&env, CONTACTS).unwrap();
        let printed = format!("{c:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains(DEV_SERVICE_TOKEN), "{printed}");
    }

    #[test]
    fn recording_lists_what_was_read_and_what_was_set_but_not_read() {
        let env = [
            ("HIBIKI_GRPC_ADDR", "0.0.0.0:9090"),
            ("HIBIKI_DATABSE_URL", "postgres://db/hibiki"),
        ];
        let recording = Recording::new(&env);
        RuntimeConfig::from_env(&recording, CONTACTS).unwrap();
        let asked = recording.asked();
        for name in ["HIBIKI_GRPC_ADDR", "HIBIKI_DATABASE_URL", "HIBIKI_LOG"] {
            assert!(asked.iter().any(|a| a == name), "{name} not in {asked:?}");
        }
        assert_eq!(
            recording.unread(["HIBIKI_GRPC_ADDR", "HIBIKI_DATABSE_URL", "PATH"]),
            vec!["HIBIKI_DATABSE_URL".to_owned()]
        );
    }

    #[test]
    fn a_rejected_url_does_not_echo_its_password() {
        let env = [("HIBIKI_DATABASE_URL", "mysql://u:hunter2@db/hibiki")];
        let err = RuntimeConfig::from_env(&env, CONTACTS).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
