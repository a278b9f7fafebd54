//! The event log: inbound LINE events on Redis streams, sharded by
//! (channel, source user), appended by the gateway and consumed by scenario.
//!
//! - A user's events all go to one shard (`shard_of`), so they keep their
//!   order; shards spread the load, and each shard's keys carry a hash tag
//!   (`…:events:{N}`) so that under Redis Cluster a shard's stream and its
//!   dedupe keys live in one slot.
//! - An append is one Lua script per event, atomic on its shard: an event id
//!   seen before is acknowledged and not appended again (`Duplicate`); a
//!   shard at its maximum length refuses (`Full`, back-pressure); otherwise
//!   `XADD` and the dedupe key (kept `dedupe_ttl`) together. The events of
//!   one call go in one pipeline.
//!
//! - Consumers read it through [`Consumer`]: consumer groups, shards
//!   spread over a group's live consumers by leases, at-least-once delivery
//!   with an ack after processing, a dead consumer's unacknowledged entries
//!   taken over by whoever takes its shards, and each shard in order.
//! - A shard is trimmed up to the oldest entry some group still needs, so
//!   the log holds only what is not yet consumed.
//!
//! Entries have one field, `p`: the caller's encoded payload.

mod consumer;

use std::time::Duration;

pub use consumer::{Consumer, ConsumerConfig, Delivery};

use crate::redis::{Redis, redis};

/// The append script: KEYS = stream, dedupe key; ARGV = max length,
/// dedupe ttl in seconds, payload. Returns the entry id, "dup" or "full".
const APPEND: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 'dup' end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 'full' end
local id = redis.call('XADD', KEYS[1], '*', 'p', ARGV[3])
redis.call('SET', KEYS[2], id, 'EX', tonumber(ARGV[2]))
return id
"#;

/// What happened to one appended event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Appended as this stream entry id.
    Added(String),
    /// Its event id was appended before (within the dedupe window).
    Duplicate,
    /// Its shard is at its maximum length: try again later.
    Full,
}

/// One event to append.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    /// The channel the event came in on.
    pub channel_id: &'a str,
    /// The source user ("" when none: such events share a shard per channel).
    pub user_id: &'a str,
    /// The dedupe key within the channel (LINE's `webhookEventId`).
    pub event_id: &'a str,
    /// The encoded entry.
    pub payload: &'a [u8],
}

/// The event log could not be reached or answered in error; nothing of the
/// failed call can be assumed done.
#[derive(Debug, thiserror::Error)]
#[error("event log unavailable: {0}")]
pub struct EventLogError(String);

impl From<redis::RedisError> for EventLogError {
    fn from(e: redis::RedisError) -> Self {
        Self(e.to_string())
    }
}

impl From<crate::redis::RedisError> for EventLogError {
    fn from(e: crate::redis::RedisError) -> Self {
        Self(e.to_string())
    }
}

/// One shard's figures, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStats {
    /// The shard.
    pub shard: u32,
    /// Entries in its stream.
    pub length: u64,
    /// Per consumer group: (group, entries not yet delivered to it,
    /// delivered but not acknowledged).
    pub groups: Vec<GroupStats>,
}

/// A consumer group's position on one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStats {
    /// The group's name.
    pub group: String,
    /// Entries appended that the group has not read yet.
    pub lag: u64,
    /// Entries read and not yet acknowledged.
    pub pending: u64,
}

/// The stats script: KEYS = stream. Returns {length, {group, lag, pending}...}.
/// `lag` is Redis's own (7.0+) when it knows it, else counted from the
/// group's last delivered id, up to 10,000 (Redis loses count after
/// deletions inside the unread range).
const STATS: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local out = {redis.call('XLEN', KEYS[1])}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local lag = f['lag']
  if type(lag) ~= 'number' then
    lag = #redis.call('XRANGE', KEYS[1], '(' .. f['last-delivered-id'], '+', 'COUNT', 10000)
  end
  table.insert(out, {f['name'], lag, f['pending']})
end
return out
"#;

/// The event log's settings, read by every service that appends to or
/// consumes it: they must agree on the number of shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLogConfig {
    /// `HIBIKI_EVENTLOG_SHARDS`: streams the log is spread over (at least
    /// 1). Default 16. Changing it moves users to other shards: drain the
    /// log first.
    pub shards: u32,
    /// `HIBIKI_EVENTLOG_MAX_LEN`: entries a shard may hold before appends
    /// are refused (the gateway answers 503 and LINE redelivers later).
    /// Default 100,000.
    pub max_len: u64,
    /// `HIBIKI_EVENTLOG_DEDUPE_HOURS`: how long an appended event id is
    /// remembered (at least 24: LINE redelivers for hours). Default 48.
    pub dedupe_ttl: Duration,
}

impl EventLogConfig {
    /// Reads the settings from `env`.
    pub fn from_env(env: &dyn crate::Env) -> Result<Self, crate::ConfigError> {
        let r = crate::config::Reader::new(env);
        let hours: u64 = r.parse("HIBIKI_EVENTLOG_DEDUPE_HOURS", 48)?;
        if hours < 24 {
            return Err(crate::ConfigError::new(
                "HIBIKI_EVENTLOG_DEDUPE_HOURS",
                format!("must be at least 24 (LINE redelivers for hours), got {hours}"),
            ));
        }
        let shards = r.positive("HIBIKI_EVENTLOG_SHARDS", 16)?;
        if shards > 4096 {
            return Err(crate::ConfigError::new(
                "HIBIKI_EVENTLOG_SHARDS",
                format!("must be at most 4096, got {shards}"),
            ));
        }
        Ok(Self {
            shards: shards as u32,
            max_len: r.positive("HIBIKI_EVENTLOG_MAX_LEN", 100_000)? as u64,
            dedupe_ttl: Duration::from_secs(hours * 3600),
        })
    }
}

/// The sharded event log on one Redis.
#[derive(Clone)]
pub struct EventLog {
    redis: Redis,
    shards: u32,
    max_len: u64,
    dedupe_ttl: Duration,
}

impl EventLog {
    /// The log on `redis` with `shards` streams, each refusing appends at
    /// `max_len` entries, remembering event ids for `dedupe_ttl`.
    pub fn new(redis: Redis, shards: u32, max_len: u64, dedupe_ttl: Duration) -> Self {
        Self {
            redis,
            shards: shards.max(1),
            max_len,
            dedupe_ttl,
        }
    }

    /// The log on `redis` as `config` describes it.
    pub fn from_config(redis: Redis, config: &EventLogConfig) -> Self {
        Self::new(redis, config.shards, config.max_len, config.dedupe_ttl)
    }

    /// How many shards the log has.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard of a (channel, user): FNV-1a, stable across processes and
    /// versions.
    pub fn shard_of(&self, channel_id: &str, user_id: &str) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in channel_id
            .bytes()
            .chain(std::iter::once(0))
            .chain(user_id.bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % u64::from(self.shards)) as u32
    }

    /// The stream of shard `shard`.
    pub fn stream_key(&self, shard: u32) -> String {
        format!("{}:events:{{{shard}}}", self.redis.prefix())
    }

    fn dedupe_key(&self, shard: u32, channel_id: &str, event_id: &str) -> String {
        format!(
            "{}:events:{{{shard}}}:seen:{channel_id}:{event_id}",
            self.redis.prefix()
        )
    }

    /// Appends `events` in one pipeline; one outcome per event, in order.
    /// Concurrent calls share one multiplexed connection, so their
    /// pipelines go out back to back on one socket.
    pub async fn append(&self, events: &[Event<'_>]) -> Result<Vec<Appended>, EventLogError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.redis.shared().await?;
        let mut pipe = redis::pipe();
        for e in events {
            let shard = self.shard_of(e.channel_id, e.user_id);
            // EVAL, not EVALSHA: Redis caches the compiled script by its
            // hash, and a restarted Redis needs nothing loaded again.
            pipe.cmd("EVAL")
                .arg(APPEND)
                .arg(2)
                .arg(self.stream_key(shard))
                .arg(self.dedupe_key(shard, e.channel_id, e.event_id))
                .arg(self.max_len)
                .arg(self.dedupe_ttl.as_secs().max(1))
                .arg(e.payload);
        }
        let replies: Vec<String> = match pipe.query_async(&mut conn).await {
            Ok(r) => r,
            Err(e) => {
                self.redis.reset_shared(&e).await;
                return Err(e.into());
            }
        };
        Ok(replies
            .into_iter()
            .map(|r| match r.as_str() {
                "dup" => Appended::Duplicate,
                "full" => Appended::Full,
                _ => Appended::Added(r),
            })
            .collect())
    }
}

impl EventLog {
    /// Length, lag and pending entries of every shard.
    pub async fn stats(&self) -> Result<Vec<ShardStats>, EventLogError> {
        let mut conn = self.redis.shared().await?;
        let mut pipe = redis::pipe();
        for shard in 0..self.shards {
            pipe.cmd("EVAL")
                .arg(STATS)
                .arg(1)
                .arg(self.stream_key(shard));
        }
        let replies: Vec<redis::Value> = match pipe.query_async(&mut conn).await {
            Ok(r) => r,
            Err(e) => {
                self.redis.reset_shared(&e).await;
                return Err(e.into());
            }
        };
        replies
            .into_iter()
            .zip(0..)
            .map(|(reply, shard)| {
                let redis::Value::Array(mut items) = reply else {
                    return Err(EventLogError(format!("stats of shard {shard}: {reply:?}")));
                };
                let length: u64 = redis::from_redis_value(items.remove(0))
                    .map_err(|e| EventLogError(e.to_string()))?;
                let groups = items
                    .into_iter()
                    .map(|g| {
                        let (group, lag, pending): (String, u64, u64) =
                            redis::from_redis_value(g).map_err(|e| EventLogError(e.to_string()))?;
                        Ok(GroupStats {
                            group,
                            lag,
                            pending,
                        })
                    })
                    .collect::<Result<_, EventLogError>>()?;
                Ok(ShardStats {
                    shard,
                    length,
                    groups,
                })
            })
            .collect()
    }

    /// The Redis the log is on.
    pub(crate) fn redis(&self) -> &Redis {
        &self.redis
    }

    /// A shard's lease key for consumer group `group`.
    pub(crate) fn lease_key(&self, shard: u32, group: &str) -> String {
        format!("{}:events:{{{shard}}}:lease:{group}", self.redis.prefix())
    }

    /// The live consumers of group `group` (a sorted set scored by when each
    /// one's heartbeat runs out).
    pub(crate) fn members_key(&self, group: &str) -> String {
        format!("{}:eventlog:consumers:{group}", self.redis.prefix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_events_share_a_shard_and_shards_spread() {
        let redis = Redis::connect_lazy(&crate::config::RedisConfig {
            url: crate::config::Secret::new("redis://127.0.0.1:6379"),
            key_prefix: "shards".into(),
            pool_size: 1,
        })
        .expect("a lazy pool");
        let log = EventLog::new(redis, 8, 100, Duration::from_secs(60));
        assert_eq!(log.shard_of("1", "Ua"), log.shard_of("1", "Ua"));
        let used: std::collections::BTreeSet<u32> = (0..200)
            .map(|n| log.shard_of("1000000001", &format!("U{n:032x}")))
            .collect();
        assert_eq!(used.len(), 8, "200 users over 8 shards use them all");
        assert!(log.stream_key(3).ends_with(":events:{3}"));
    }

    #[test]
    fn settings_have_defaults_and_bounds() {
        let c = EventLogConfig::from_env(&std::collections::HashMap::new()).unwrap();
        assert_eq!(c.shards, 16);
        assert_eq!(c.max_len, 100_000);
        assert_eq!(c.dedupe_ttl, Duration::from_secs(48 * 3600));
        for (var, bad) in [
            ("HIBIKI_EVENTLOG_DEDUPE_HOURS", "23"),
            ("HIBIKI_EVENTLOG_SHARDS", "0"),
            ("HIBIKI_EVENTLOG_SHARDS", "5000"),
            ("HIBIKI_EVENTLOG_MAX_LEN", "0"),
        ] {
            let err = EventLogConfig::from_env(&[(var, bad)]).unwrap_err();
            assert_eq!(err.var, var, "{bad}");
        }
    }
}
