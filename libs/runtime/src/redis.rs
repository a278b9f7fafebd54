//! Redis: one shared multiplexed connection for the hot path (many callers'
//! commands pipelined on one socket), a connection pool for blocking reads
//! and transactions, and the key prefix that keeps meshes (and tests) sharing
//! one Redis apart.
//!
//! Keys are built with [`Redis::key`]; keys that must live in the same Redis
//! Cluster slot put their shard in a `{hash tag}`.
//!
//! Under Redis Cluster (`HIBIKI_REDIS_CLUSTER=true`) the shared connection is
//! a cluster connection that sends each command to the node holding its
//! slot. Redis Cluster takes a pipeline only when all its keys share one
//! slot, and hibiki's pipelines span shards and channels, so there a
//! pipeline's commands go out one by one, all at once (the connection still
//! writes them back to back to each node), and their replies come back in
//! the pipeline's order. A script's keys always share one slot.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Config, Pool, PoolConfig, Runtime, Timeouts};

use crate::config::RedisConfig;

pub use deadpool_redis::redis;

/// A Redis operation of the runtime failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// `HIBIKI_REDIS_URL` or the pool settings are invalid.
    #[error("HIBIKI_REDIS_URL: {0}")]
    Config(#[from] deadpool_redis::CreatePoolError),
    /// The Redis settings contradict each other.
    #[error("{0}")]
    Settings(&'static str),
    /// No connection could be had from the pool.
    #[error("redis unreachable: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    /// A command failed.
    #[error("redis command failed: {0}")]
    Command(#[from] redis::RedisError),
}

/// How a service reaches Redis.
#[derive(Clone)]
enum Client {
    /// One Redis (a primary).
    Node(redis::Client),
    /// A Redis Cluster, from its seed nodes.
    Cluster(Box<redis::cluster::ClusterClient>),
}

/// The shared connection: to one Redis, or to a Redis Cluster.
#[derive(Clone)]
enum Shared {
    Node(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Shared {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Shared::Node(c) => c.req_packed_command(cmd),
            Shared::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Shared::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Shared::Cluster(c) => Box::pin(async move {
                if offset != 0 || count != pipeline.len() {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "transactions (MULTI) are not used on Redis Cluster",
                    )));
                }
                // Each command on its own, all at once: each goes to its
                // slot's node, in the pipeline's order.
                let replies = futures::future::join_all(pipeline.cmd_iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { c.req_packed_command(cmd).await }
                }))
                .await;
                replies.into_iter().collect()
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Shared::Node(c) => c.get_db(),
            Shared::Cluster(c) => c.get_db(),
        }
    }
}

/// A service's Redis handle.
#[derive(Clone)]
pub struct Redis {
    pool: Pool,
    prefix: String,
    client: Client,
    /// The shared connection. A plain mutex, never held across an await:
    /// callers only clone the handle, so a caller that is not being polled
    /// (one of many futures in a select or a `FuturesUnordered`) can never
    /// hold up the others, as it could by waiting its turn in a fair async
    /// lock.
    shared: Arc<std::sync::Mutex<Option<Shared>>>,
    /// Taken while (re)connecting, so that one caller connects at a time.
    connecting: Arc<tokio::sync::Mutex<()>>,
}

/// How long connecting, or waiting for one reply on the shared connection,
/// may take before the command fails: well inside LINE's 2 s webhook limit.
const SHARED_TIMEOUT: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Redis {
    /// A pool that connects on first use (a service starts while Redis is
    /// down and reports NOT_SERVING until it is back).
    pub fn connect_lazy(config: &RedisConfig) -> Result<Self, RedisError> {
        let urls: Vec<&str> = config.url.expose().split(',').map(str::trim).collect();
        // The pool serves a single Redis; under Redis Cluster it is not used.
        let mut cfg = Config::from_url(urls[0]);
        let mut pool_cfg = PoolConfig::new(config.pool_size);
        // Fail fast when Redis is down instead of queueing callers.
        pool_cfg.timeouts = Timeouts {
            wait: Some(Duration::from_secs(2)),
            create: Some(Duration::from_secs(2)),
            recycle: Some(Duration::from_secs(2)),
        };
        cfg.pool = Some(pool_cfg);
        let pool = cfg.create_pool(Some(Runtime::Tokio1))?;
        let client = if config.cluster {
            Client::Cluster(Box::new(
                redis::cluster::ClusterClient::builder(urls)
                    .connection_timeout(SHARED_TIMEOUT)
                    .response_timeout(SHARED_TIMEOUT)
                    .build()?,
            ))
        } else {
            if urls.len() > 1 {
                return Err(RedisError::Settings(
                    "HIBIKI_REDIS_URL lists several nodes: set HIBIKI_REDIS_CLUSTER=true for a \
                     Redis Cluster",
                ));
            }
            Client::Node(redis::Client::open(urls[0])?)
        };
        Ok(Self {
            pool,
            prefix: config.key_prefix.clone(),
            client,
            shared: Arc::new(std::sync::Mutex::new(None)),
            connecting: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The shared multiplexed connection, connecting first if there is none:
    /// concurrent callers' commands go out pipelined on one socket.
    async fn shared(&self) -> Result<Shared, redis::RedisError> {
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let conn = match &self.client {
            Client::Node(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(SHARED_TIMEOUT))
                    .set_response_timeout(Some(SHARED_TIMEOUT));
                Shared::Node(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
            Client::Cluster(client) => Shared::Cluster(client.get_async_connection().await?),
        };
        *self.slot() = Some(conn.clone());
        Ok(conn)
    }

    /// A connection of the caller's own to a single Redis, for a blocking
    /// command (`XREADGROUP … BLOCK`) that on the shared connection would
    /// hold up every other caller; its replies may take `longest` more than
    /// the shared connection's. `None` under Redis Cluster, where a blocking
    /// read could wait on one node only.
    pub async fn dedicated(
        &self,
        longest: Duration,
    ) -> Result<Option<redis::aio::MultiplexedConnection>, redis::RedisError> {
        let Client::Node(client) = &self.client else {
            return Ok(None);
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(SHARED_TIMEOUT))
            .set_response_timeout(Some(SHARED_TIMEOUT + longest));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map(Some)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Shared>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Option<Shared> {
        self.slot().clone()
    }

    /// Drops the shared connection after `error`, if the error means the
    /// connection is no longer usable (Redis restarted, network cut, no
    /// reply in time); the next call connects again.
    async fn reset_shared(&self, error: &redis::RedisError) {
        if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout()
            || error.is_unrecoverable_error()
        {
            *self.slot() = None;
        }
    }

    /// Runs `pipe` on the shared connection (the hot path: concurrent
    /// callers' pipelines go out back to back on one socket; never a
    /// blocking command). An error that broke the connection drops it, so
    /// the next call connects again; the error is returned as Redis gave it.
    pub async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, redis::RedisError> {
        let mut conn = self.shared().await?;
        let result = pipe.query_async(&mut conn).await;
        if let Err(e) = &result {
            self.reset_shared(e).await;
        }
        result
    }

    /// Runs one command on the shared connection, as [`Redis::pipeline`].
    pub async fn command<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, redis::RedisError> {
        let mut conn = self.shared().await?;
        let result = cmd.query_async(&mut conn).await;
        if let Err(e) = &result {
            self.reset_shared(e).await;
        }
        result
    }

    /// Runs `script` with `keys` and `args` on the shared connection, by
    /// its hash (`EVALSHA`), loading it first when Redis does not have it
    /// (after a restart or a `SCRIPT FLUSH`).
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, redis::RedisError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.hash()).arg(keys.len()).arg(keys);
        for a in args {
            cmd.arg(*a);
        }
        match self.command(&cmd).await {
            Err(e) if e.kind() == redis::ServerErrorKind::NoScript.into() => {
                let _: String = self
                    .command(redis::cmd("SCRIPT").arg("LOAD").arg(script.source))
                    .await?;
                self.command(&cmd).await
            }
            other => other,
        }
    }

    /// The connection pool of a single Redis (not for Redis Cluster; the
    /// services use [`Redis::command`], [`Redis::pipeline`] and
    /// [`Redis::script`], which work on both).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Whether this is a Redis Cluster (`HIBIKI_REDIS_CLUSTER`).
    pub fn is_cluster(&self) -> bool {
        matches!(self.client, Client::Cluster(_))
    }

    /// The configured key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `prefix:part1:part2...`.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for p in parts {
            key.push(':');
            key.push_str(p);
        }
        key
    }

    /// Checks that Redis answers PING.
    pub async fn ping(&self) -> Result<(), RedisError> {
        if self.is_cluster() {
            // Every primary answers: a cluster missing one cannot serve.
            let _: String = self.command(&redis::cmd("PING")).await?;
            return Ok(());
        }
        let mut conn = self.pool.get().await?;
        let _: String = redis::cmd("PING").query_async(&mut *conn).await?;
        Ok(())
    }
}

/// Replies of the stream commands, as `(entry id, payload)` pairs.
pub mod streams {
    use super::redis;

    /// A stream entry's id and the payload of its one field.
    pub type Entry = (String, Vec<u8>);
    /// A stream entry as Redis sends it: id and fields (none once deleted).
    type RawEntry = (String, Option<Vec<(String, Vec<u8>)>>);

    fn unexpected(what: &str, value: &redis::Value) -> redis::RedisError {
        redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected stream reply",
            format!("{what}: {value:?}"),
        ))
    }

    /// An entry id (`<ms>-<seq>`) as two numbers, which order as the
    /// stream does; `None` for anything else.
    pub fn position(id: &str) -> Option<(i64, i64)> {
        let (ms, seq) = id.split_once('-')?;
        Some((ms.parse().ok()?, seq.parse().ok()?))
    }

    /// Entries' (id, value of `field`); entries without it (deleted while
    /// pending) are skipped.
    pub fn entries(value: redis::Value, field: &str) -> Result<Vec<Entry>, redis::RedisError> {
        let items: Vec<redis::Value> = match value {
            redis::Value::Nil => return Ok(Vec::new()),
            other => redis::from_redis_value(other)?,
        };
        let mut entries = Vec::with_capacity(items.len());
        for item in items {
            let (id, fields): RawEntry = redis::from_redis_value(item)?;
            if let Some(payload) = fields
                .into_iter()
                .flatten()
                .find_map(|(f, v)| (f == field).then_some(v))
            {
                entries.push((id, payload));
            }
        }
        Ok(entries)
    }

    /// An `XREADGROUP` reply on one stream: nil or [[key, entries]].
    pub fn read_reply(value: redis::Value, field: &str) -> Result<Vec<Entry>, redis::RedisError> {
        let streams: Option<Vec<(String, redis::Value)>> = redis::from_redis_value(value)?;
        match streams.and_then(|s| s.into_iter().next()) {
            Some((_, entries)) => self::entries(entries, field),
            None => Ok(Vec::new()),
        }
    }

    /// An `XAUTOCLAIM` reply: [next cursor, entries, deleted ids].
    pub fn autoclaim_reply(
        value: redis::Value,
        field: &str,
    ) -> Result<(String, Vec<Entry>), redis::RedisError> {
        let redis::Value::Array(mut parts) = value else {
            return Err(unexpected("XAUTOCLAIM", &value));
        };
        if parts.len() < 2 {
            return Err(unexpected("XAUTOCLAIM", &redis::Value::Array(parts)));
        }
        let entries = self::entries(parts.swap_remove(1), field)?;
        let cursor: String = redis::from_redis_value(parts.swap_remove(0))?;
        Ok((cursor, entries))
    }
}

/// A Lua script run by its SHA-1 ([`Redis::script`]).
pub struct Script {
    source: &'static str,
    hash: std::sync::OnceLock<String>,
}

impl Script {
    /// The script `source` (usually a `const`).
    pub const fn new(source: &'static str) -> Self {
        Self {
            source,
            hash: std::sync::OnceLock::new(),
        }
    }

    /// Its SHA-1, as `EVALSHA` names it.
    pub fn hash(&self) -> &str {
        self.hash.get_or_init(|| {
            use sha1::Digest;
            sha1::Sha1::digest(self.source.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn keys_start_with_the_prefix() {
        let r = Redis::connect_lazy(&RedisConfig {
            url: Secret::new("redis://127.0.0.1:1"),
            cluster: false,
            key_prefix: "t1".into(),
            pool_size: 1,
        })
        .unwrap();
        assert_eq!(r.key(&["events", "{3}"]), "t1:events:{3}");
    }

    #[test]
    fn stream_positions_order_as_the_stream_does() {
        let p = streams::position;
        assert_eq!(p("1700000000000-7"), Some((1_700_000_000_000, 7)));
        assert!(p("1700000000000-10") > p("1700000000000-9"));
        assert!(p("1700000000001-0") > p("1700000000000-99"));
        for bad in ["", "12", "12-", "-3", "a-1", "1-b", "1-2-3"] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }

    #[test]
    fn several_nodes_mean_a_cluster_and_must_be_said_so() {
        let config = |cluster| RedisConfig {
            url: Secret::new("redis://127.0.0.1:7000, redis://127.0.0.1:7001"),
            cluster,
            key_prefix: "t1".into(),
            pool_size: 1,
        };
        let err = Redis::connect_lazy(&config(false)).unwrap_err();
        assert!(
            err.to_string().contains("HIBIKI_REDIS_CLUSTER=true"),
            "{err}"
        );
        let cluster = Redis::connect_lazy(&config(true)).expect("a lazy cluster handle");
        assert!(cluster.is_cluster());
    }
}
