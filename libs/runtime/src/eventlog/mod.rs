//! The event log: inbound LINE events on Redis streams, sharded by
//! (channel, source user), appended by the gateway and consumed by scenario.
//!
//! - A user's events all go to one shard (`shard_of`), so they keep their
//!   order; shards spread the load, and each shard's keys carry a hash tag
//!   (`…:events:{N}`) so that under Redis Cluster a shard's stream and its
//!   dedupe keys live in one slot.
//! - Appends are Lua scripts, atomic on their shard: an event id seen
//!   before is acknowledged and not appended again (`Duplicate`); a shard
//!   at its maximum length refuses (`Full`, back-pressure); otherwise the
//!   event is appended and its id remembered, together.
//! - Event ids are remembered in one hash per shard and day of the event's
//!   own timestamp (`…:events:{N}:seen:<day>`), kept until `dedupe_ttl`
//!   after that day ends. A redelivery carries the same timestamp, so it
//!   meets its id in the same hash; a hash field costs far less memory than
//!   a key with its own expiry, at a storm's millions of events a day.
//! - Appends from concurrent callers are coalesced: one writer task takes
//!   whatever calls are waiting and runs them as one pipeline (at most two
//!   in flight) of scripts (by hash, `EVALSHA`): one script for all on a
//!   single Redis, one per shard under Redis Cluster, where a script may
//!   only touch one hash slot. Each shard's events keep their order. Under
//!   load one round trip, and one script entry, carries many webhooks'
//!   events (entering a script costs Redis more than the appends in it);
//!   when idle, a call goes out at once.
//! - Consumers read it through [`Consumer`]: consumer groups, shards
//!   spread over a group's live consumers by leases, at-least-once delivery
//!   with an ack after processing, a dead consumer's unacknowledged entries
//!   taken over by whoever takes its shards, and each shard in order.
//! - A shard is trimmed up to the oldest entry some group still needs, so
//!   the log holds only what is not yet consumed.
//!
//! Entries have one field, `p`: the caller's encoded payload.

mod consumer;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use consumer::{Consumer, ConsumerConfig, Delivery};

use crate::redis::{Redis, redis};

/// The append script. KEYS = the streams, then the dedupe hashes; ARGV =
/// max length, number of streams, number of hashes, each hash's expiry
/// (Unix seconds), then per event: stream index, hash index (both 1-based
/// within their kind), dedupe field, payload. Returns per event the entry
/// id, "dup" or "full". Under Redis Cluster a call carries one shard (one
/// hash slot); on a single Redis, every shard of a pipeline at once.
const APPEND: &str = r#"
local max = tonumber(ARGV[1])
local streams = tonumber(ARGV[2])
local hashes = tonumber(ARGV[3])
local len = {}
local out = {}
local touched = {}
for i = 4 + hashes, #ARGV, 4 do
  local s = tonumber(ARGV[i])
  local h = streams + tonumber(ARGV[i + 1])
  if len[s] == nil then len[s] = redis.call('XLEN', KEYS[s]) end
  if len[s] >= max then
    out[#out + 1] = 'full'
  elseif redis.call('HSETNX', KEYS[h], ARGV[i + 2], 1) == 0 then
    out[#out + 1] = 'dup'
  else
    out[#out + 1] = redis.call('XADD', KEYS[s], '*', 'p', ARGV[i + 3])
    len[s] = len[s] + 1
    touched[h] = true
  end
end
for h, _ in pairs(touched) do
  redis.call('EXPIREAT', KEYS[h], ARGV[3 + h - streams], 'NX')
end
return out
"#;

const DAY_MS: i64 = 86_400_000;

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
    /// When the event happened (LINE's `timestamp`, ms since the epoch):
    /// picks the day whose dedupe hash remembers it. Out of range (before
    /// the dedupe window, more than a day ahead): the receive time is used.
    pub timestamp_ms: i64,
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
    /// `HIBIKI_EVENTLOG_FOLLOWERS`: consumer groups that follow the log
    /// without holding it (comma-separated). Default `analytics`.
    pub followers: Vec<String>,
    /// `HIBIKI_EVENTLOG_FOLLOWER_RETENTION_MS`: how long the log keeps, for
    /// a follower that lags or is stopped, entries the other groups have
    /// finished with. Default 120,000 (2 minutes): a follower stopped
    /// longer misses the older ones.
    pub follower_retention: Duration,
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
            followers: r
                .string("HIBIKI_EVENTLOG_FOLLOWERS", DEFAULT_FOLLOWER)
                .split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect(),
            follower_retention: r.millis(
                "HIBIKI_EVENTLOG_FOLLOWER_RETENTION_MS",
                DEFAULT_FOLLOWER_RETENTION,
            )?,
        })
    }
}

/// The consumer group that follows the log by default (analytics).
pub const DEFAULT_FOLLOWER: &str = "analytics";
/// How long the log keeps entries for a follower by default.
pub const DEFAULT_FOLLOWER_RETENTION: Duration = Duration::from_secs(120);

/// The sharded event log on one Redis.
#[derive(Clone)]
pub struct EventLog {
    redis: Redis,
    shards: u32,
    max_len: u64,
    dedupe_ttl: Duration,
    followers: Arc<Vec<String>>,
    follower_retention: Duration,
    /// The writer task's queue, started by the first append.
    writer: Arc<OnceLock<mpsc::Sender<Pending>>>,
}

/// One caller's appends, waiting for the writer.
struct Pending {
    events: Vec<Item>,
    reply: oneshot::Sender<Result<Vec<Appended>, EventLogError>>,
}

/// One event, ready for its shard's script.
struct Item {
    shard: u32,
    /// The day (since the epoch) whose dedupe hash remembers it.
    day: i64,
    /// `<channel>:<event id>`.
    field: String,
    payload: Vec<u8>,
}

/// The most events the writer puts in one pipeline.
const MAX_PIPELINE: usize = 512;
/// Pipelines the writer has in flight at once.
const IN_FLIGHT: usize = 2;

impl EventLog {
    /// The log on `redis` with `shards` streams, each refusing appends at
    /// `max_len` entries, remembering event ids for `dedupe_ttl`.
    pub fn new(redis: Redis, shards: u32, max_len: u64, dedupe_ttl: Duration) -> Self {
        Self {
            redis,
            shards: shards.max(1),
            max_len,
            dedupe_ttl,
            followers: Arc::new(vec![DEFAULT_FOLLOWER.to_owned()]),
            follower_retention: DEFAULT_FOLLOWER_RETENTION,
            writer: Arc::default(),
        }
    }

    /// The log on `redis` as `config` describes it.
    pub fn from_config(redis: Redis, config: &EventLogConfig) -> Self {
        Self::new(redis, config.shards, config.max_len, config.dedupe_ttl)
            .with_followers(config.followers.clone(), config.follower_retention)
    }

    /// The same log, with `followers` (consumer groups that hold entries
    /// back at most `retention`).
    pub fn with_followers(mut self, followers: Vec<String>, retention: Duration) -> Self {
        self.followers = Arc::new(followers);
        self.follower_retention = retention;
        self
    }

    /// The trim script's arguments: the followers' retention (ms) and
    /// names.
    pub(crate) fn trim_args(&self) -> Vec<String> {
        std::iter::once(self.follower_retention.as_millis().to_string())
            .chain(self.followers.iter().cloned())
            .collect()
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

    /// The dedupe hash of shard `shard` for events of day `day`.
    fn dedupe_key(&self, shard: u32, day: i64) -> String {
        format!("{}:events:{{{shard}}}:seen:{day}", self.redis.prefix())
    }

    /// The day whose dedupe hash remembers an event of `timestamp_ms`.
    fn dedupe_day(&self, timestamp_ms: i64, now_ms: i64) -> i64 {
        let window = self.dedupe_ttl.as_millis() as i64;
        let ts = if (now_ms - window..=now_ms + DAY_MS).contains(&timestamp_ms) {
            timestamp_ms
        } else {
            now_ms
        };
        ts.div_euclid(DAY_MS)
    }

    /// Appends `events`; one outcome per event, in order. Concurrent calls
    /// share the writer's pipelines (see the module's documentation).
    pub async fn append(&self, events: &[Event<'_>]) -> Result<Vec<Appended>, EventLogError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let events = events
            .iter()
            .map(|e| Item {
                shard: self.shard_of(e.channel_id, e.user_id),
                day: self.dedupe_day(e.timestamp_ms, now_ms),
                field: format!("{}:{}", e.channel_id, e.event_id),
                payload: e.payload.to_vec(),
            })
            .collect();
        let (reply, answer) = oneshot::channel();
        let writer = self.writer.get_or_init(|| {
            let (tx, rx) = mpsc::channel(4096);
            // The writer's own copy has no queue of its own, so the queue
            // closes (and the writer ends) when the last caller's copy goes.
            let own = EventLog {
                writer: Arc::default(),
                ..self.clone()
            };
            tokio::spawn(write_appends(own, rx));
            tx
        });
        writer
            .send(Pending { events, reply })
            .await
            .map_err(|_| EventLogError("the event log writer stopped".into()))?;
        answer
            .await
            .map_err(|_| EventLogError("the event log writer stopped".into()))?
    }

    /// One pipeline for `batch`: one script per shard under Redis Cluster
    /// (`per_shard`), else one script for all, each shard's events in
    /// order. Returns the pipeline and, per script, which (caller, event)
    /// each of its replies belongs to.
    fn pipeline(
        &self,
        batch: &[Pending],
        per_shard: bool,
    ) -> (redis::Pipeline, Vec<Vec<(usize, usize)>>) {
        let mut groups: std::collections::BTreeMap<u32, Vec<(usize, usize)>> =
            std::collections::BTreeMap::new();
        for (caller, p) in batch.iter().enumerate() {
            for (index, item) in p.events.iter().enumerate() {
                let group = if per_shard { item.shard } else { 0 };
                groups.entry(group).or_default().push((caller, index));
            }
        }
        let ttl = self.dedupe_ttl.as_secs() as i64;
        let mut pipe = redis::pipe();
        let mut owners = Vec::with_capacity(groups.len());
        for members in groups.into_values() {
            let item = |&(c, i): &(usize, usize)| &batch[c].events[i];
            let mut shards: Vec<u32> = members.iter().map(|m| item(m).shard).collect();
            shards.sort_unstable();
            shards.dedup();
            let mut hashes: Vec<(u32, i64)> = members
                .iter()
                .map(|m| (item(m).shard, item(m).day))
                .collect();
            hashes.sort_unstable();
            hashes.dedup();
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(append_script_hash())
                .arg(shards.len() + hashes.len());
            for shard in &shards {
                cmd.arg(self.stream_key(*shard));
            }
            for (shard, day) in &hashes {
                cmd.arg(self.dedupe_key(*shard, *day));
            }
            cmd.arg(self.max_len).arg(shards.len()).arg(hashes.len());
            for (_, day) in &hashes {
                cmd.arg((day + 1) * (DAY_MS / 1000) + ttl);
            }
            for m in &members {
                let e = item(m);
                let s = shards
                    .binary_search(&e.shard)
                    .expect("every shard is listed")
                    + 1;
                let h = hashes
                    .binary_search(&(e.shard, e.day))
                    .expect("every hash is listed")
                    + 1;
                cmd.arg(s).arg(h).arg(&e.field).arg(&e.payload);
            }
            owners.push(members);
        }
        (pipe, owners)
    }
}

/// The append script's SHA-1, as `EVALSHA` names it.
fn append_script_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        use sha1::Digest;
        sha1::Sha1::digest(APPEND.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })
}

/// The writer: takes every call waiting (up to [`MAX_PIPELINE`] events),
/// sends them in one pipeline, and answers each caller with its part of
/// the replies. Ends when every [`EventLog`] sharing its queue is gone.
async fn write_appends(log: EventLog, mut queue: mpsc::Receiver<Pending>) {
    use futures::StreamExt;
    // The pipelines in flight run inside this task (no task, and no wake-up
    // of another worker thread, per batch).
    let mut in_flight = futures::stream::FuturesUnordered::new();
    // Whether Redis runs as a cluster, once known; until then, one script
    // per shard (right either way).
    let mut cluster: Option<bool> = None;
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            next = queue.recv(), if open && in_flight.len() < IN_FLIGHT => {
                let Some(first) = next else {
                    open = false;
                    continue;
                };
                let mut events = first.events.len();
                let mut batch = vec![first];
                while events < MAX_PIPELINE {
                    match queue.try_recv() {
                        Ok(p) => {
                            events += p.events.len();
                            batch.push(p);
                        }
                        Err(_) => break,
                    }
                }
                if cluster.is_none() {
                    cluster = if log.redis.is_cluster() {
                        Some(true)
                    } else {
                        is_cluster(&log.redis).await
                    };
                }
                let (pipe, owners) = log.pipeline(&batch, cluster.unwrap_or(true));
                let redis = log.redis.clone();
                in_flight.push(async move {
                    let result = run_appends(&redis, &pipe).await;
                    answer(batch, &owners, result);
                });
            }
            else => return,
        }
    }
}

/// Hands each caller of `batch` its outcomes from the scripts' replies.
fn answer(
    batch: Vec<Pending>,
    owners: &[Vec<(usize, usize)>],
    result: Result<Vec<Vec<String>>, EventLogError>,
) {
    let mut answers: Vec<Vec<Appended>> = batch
        .iter()
        .map(|p| vec![Appended::Full; p.events.len()])
        .collect();
    let result = result.and_then(|scripts| {
        if scripts.len() != owners.len()
            || scripts.iter().zip(owners).any(|(r, m)| r.len() != m.len())
        {
            return Err(EventLogError(
                "the append scripts answered for other events than sent".into(),
            ));
        }
        for (replies, members) in scripts.into_iter().zip(owners) {
            for (reply, &(c, i)) in replies.into_iter().zip(members) {
                answers[c][i] = match reply.as_str() {
                    "dup" => Appended::Duplicate,
                    "full" => Appended::Full,
                    _ => Appended::Added(reply),
                };
            }
        }
        Ok(())
    });
    for (p, outcomes) in batch.into_iter().zip(answers) {
        let _ = p.reply.send(match &result {
            Ok(()) => Ok(outcomes),
            Err(e) => Err(EventLogError(e.0.clone())),
        });
    }
}

/// Whether the Redis is a cluster node (`None` when it cannot be asked).
async fn is_cluster(redis: &Redis) -> Option<bool> {
    let info: String = redis
        .command(redis::cmd("INFO").arg("cluster"))
        .await
        .ok()?;
    Some(info.lines().any(|l| l.trim() == "cluster_enabled:1"))
}

/// Runs a pipeline of append scripts; loads the script and runs it again
/// when Redis does not know it (restarted, or `SCRIPT FLUSH`): every
/// script of the pipeline failed alike then, so nothing ran twice.
async fn run_appends(
    redis: &Redis,
    pipe: &redis::Pipeline,
) -> Result<Vec<Vec<String>>, EventLogError> {
    match redis.pipeline(pipe).await {
        Err(e) if e.kind() == redis::ServerErrorKind::NoScript.into() => {
            let _: String = redis
                .command(redis::cmd("SCRIPT").arg("LOAD").arg(APPEND))
                .await?;
            Ok(redis.pipeline(pipe).await?)
        }
        other => Ok(other?),
    }
}

impl EventLog {
    /// Length, lag and pending entries of every shard.
    pub async fn stats(&self) -> Result<Vec<ShardStats>, EventLogError> {
        let mut pipe = redis::pipe();
        for shard in 0..self.shards {
            pipe.cmd("EVAL")
                .arg(STATS)
                .arg(1)
                .arg(self.stream_key(shard));
        }
        let replies: Vec<redis::Value> = self.redis.pipeline(&pipe).await?;
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
            cluster: false,
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

    /// Runs `events` (channel 1, users and ids as given) through one
    /// pipeline built as under Redis Cluster (`per_shard`) or not.
    async fn run(log: &EventLog, events: &[(&str, &str)], per_shard: bool) -> Vec<Appended> {
        let now = chrono::Utc::now().timestamp_millis();
        let (reply, answer) = oneshot::channel();
        let batch = vec![Pending {
            events: events
                .iter()
                .map(|(user, id)| Item {
                    shard: log.shard_of("1", user),
                    day: log.dedupe_day(now, now),
                    field: format!("1:{id}"),
                    payload: format!("{user}/{id}").into_bytes(),
                })
                .collect(),
            reply,
        }];
        let (pipe, owners) = log.pipeline(&batch, per_shard);
        assert_eq!(
            owners.len(),
            if per_shard {
                events
                    .iter()
                    .map(|(u, _)| log.shard_of("1", u))
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            } else {
                1
            }
        );
        let result = run_appends(&log.redis, &pipe).await;
        super::answer(batch, &owners, result);
        answer.await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn one_script_for_all_shards_and_one_per_shard_append_alike() {
        for per_shard in [false, true] {
            let prefix = format!("unit-{}", hibiki_testkit::random_id());
            let _keys = hibiki_testkit::RedisKeys::new("redis://127.0.0.1:6379", &prefix);
            let redis = Redis::connect_lazy(&crate::config::RedisConfig {
                url: crate::config::Secret::new("redis://127.0.0.1:6379"),
                cluster: false,
                key_prefix: prefix,
                pool_size: 1,
            })
            .unwrap();
            let log = EventLog::new(redis.clone(), 4, 3, Duration::from_secs(3600));
            let users: Vec<String> = (0..12).map(|n| format!("U{n}")).collect();
            let events: Vec<(&str, String)> = users
                .iter()
                .flat_map(|u| {
                    [
                        (u.as_str(), format!("{u}-a")),
                        (u.as_str(), format!("{u}-b")),
                    ]
                })
                .collect();
            let borrowed: Vec<(&str, &str)> =
                events.iter().map(|(u, id)| (*u, id.as_str())).collect();
            let first = run(&log, &borrowed, per_shard).await;
            // Each shard takes three (its maximum), in order; the rest are
            // refused, and not remembered.
            let mut taken: std::collections::BTreeMap<u32, usize> = Default::default();
            for ((user, _), outcome) in borrowed.iter().zip(&first) {
                let n = taken.entry(log.shard_of("1", user)).or_default();
                if *n < 3 {
                    assert!(
                        matches!(outcome, Appended::Added(_)),
                        "{per_shard}: {first:?}"
                    );
                    *n += 1;
                } else {
                    assert_eq!(*outcome, Appended::Full, "{per_shard}");
                }
            }
            // With room again, LINE's redelivery of everything appends what
            // was refused, and only that.
            let roomy = EventLog::new(redis.clone(), 4, 100, Duration::from_secs(3600));
            let again = run(&roomy, &borrowed, per_shard).await;
            for (a, b) in first.iter().zip(&again) {
                match a {
                    Appended::Added(_) => assert_eq!(*b, Appended::Duplicate, "{per_shard}"),
                    _ => assert!(matches!(b, Appended::Added(_)), "{per_shard}: {b:?}"),
                }
            }
        }
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
