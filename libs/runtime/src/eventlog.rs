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
//! Entries have one field, `p`: the caller's encoded payload.

use std::time::Duration;

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

/// Why an append failed as a whole.
#[derive(Debug, thiserror::Error)]
#[error("event log unavailable: {0}")]
pub struct AppendError(String);

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
    pub async fn append(&self, events: &[Event<'_>]) -> Result<Vec<Appended>, AppendError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self
            .redis
            .pool()
            .get()
            .await
            .map_err(|e| AppendError(e.to_string()))?;
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
        let replies: Vec<String> = pipe
            .query_async(&mut *conn)
            .await
            .map_err(|e| AppendError(e.to_string()))?;
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
}
