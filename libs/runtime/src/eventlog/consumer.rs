//! The consuming side of the event log, shared by every service that reads
//! it (scenario first).
//!
//! - **Groups.** Each consumer belongs to a named group (one per service);
//!   every group sees every entry once. A group starts at the beginning of
//!   the log, so events accepted before the service first ran are not lost.
//! - **Shards spread by leases.** A group's live consumers register in a
//!   sorted set with a heartbeat; each aims at its fair share of the shards
//!   (`ceil(shards / live consumers)`) and holds each of its shards by a
//!   lease key (`…:events:{N}:lease:<group>`) renewed every third of the
//!   lease. A consumer over its share gives back shards with nothing in
//!   flight; one under it takes free shards. Only the lease holder reads a
//!   shard, so a shard is processed in order by one consumer at a time.
//! - **At-least-once.** Entries are read with `XREADGROUP` and stay pending
//!   until [`Consumer::ack`]. When a consumer dies, its leases run out and
//!   whoever takes its shards first takes over their pending entries
//!   (`XAUTOCLAIM`, in log order) and delivers them before anything new.
//! - **Trimming.** Each ack, and each lease tick, trims the shard up to the
//!   oldest entry any group still needs, so acknowledged entries leave the
//!   log and the gateway's back-pressure measures what is really
//!   unconsumed.
//!
//! A caller processes one batch's deliveries of a shard in the order given
//! and acknowledges them once their effects are durable. A batch should take
//! well under the lease to process: a consumer whose lease ran out keeps its
//! deliveries, but another consumer may then deliver them again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::{EventLog, EventLogError};
use crate::redis::redis;

/// Renews a lease the caller holds: KEYS = lease; ARGV = name, ttl ms.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Gives a lease back if the caller holds it: KEYS = lease; ARGV = name.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Trims a shard up to the oldest entry a group still needs: its oldest
/// pending entry, or else the first after its last delivered one. KEYS =
/// stream; ARGV = how long (ms) a follower group may hold entries back,
/// then the follower groups' names. A follower (analytics) holds the log
/// back at most that long, so a stopped follower never fills the log and
/// turns the gateway's back-pressure on; the other groups (scenario) hold
/// it as long as they need. Without groups nothing is trimmed (nobody has
/// read anything yet).
const TRIM: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '(%d+)-(%d+)')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local followers = {}
for i = 2, #ARGV do followers[ARGV[i]] = true end
local floor, follow = nil, nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local ms, seq = string.match(f['last-delivered-id'], '(%d+)-(%d+)')
  local need = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
  local pending = redis.call('XPENDING', KEYS[1], f['name'])
  if pending[1] > 0 then need = pending[2] end
  if followers[f['name']] then
    if follow == nil or less(need, follow) then follow = need end
  elseif floor == nil or less(need, floor) then
    floor = need
  end
end
if follow ~= nil then
  if floor ~= nil then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local oldest = string.format('%d', now - tonumber(ARGV[1])) .. '-0'
    if less(follow, oldest) then follow = oldest end
  end
  if floor == nil or less(follow, floor) then floor = follow end
end
if floor == nil then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"#;

/// How a consumer reads.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The consumer group, one per service (e.g. `scenario`).
    pub group: String,
    /// This consumer's name, unique among the group's live consumers.
    pub name: String,
    /// How long a shard stays with a consumer that stopped renewing: the
    /// longest a dead consumer's shards wait before another takes them.
    pub lease: Duration,
    /// Entries read per shard per round.
    pub batch: usize,
    /// How long to wait before looking again when nothing was read and
    /// the consumer cannot block on its shards (under Redis Cluster, or
    /// while taking a shard over).
    pub poll_interval: Duration,
    /// The longest [`Consumer::next`] waits before returning an empty batch.
    pub max_wait: Duration,
}

impl ConsumerConfig {
    /// Defaults for group `group`: a name from the host, process and start
    /// time, a 10 s lease, 100 entries per shard, polling every 10 ms where
    /// it cannot block, returning at least every 500 ms.
    pub fn new(group: impl Into<String>) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "hibiki".into());
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self {
            group: group.into(),
            name: format!("{host}-{}-{:x}", std::process::id(), started & 0xffff_ffff),
            lease: Duration::from_secs(10),
            batch: 100,
            poll_interval: Duration::from_millis(10),
            max_wait: Duration::from_millis(500),
        }
    }
}

/// One entry handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The shard it was read from.
    pub shard: u32,
    /// Its stream entry id.
    pub id: String,
    /// The appended payload.
    pub payload: Vec<u8>,
}

/// A shard this consumer holds.
#[derive(Debug)]
struct Owned {
    /// While taking over a shard: the `XAUTOCLAIM` cursor through the
    /// entries other consumers left pending. `None` once they are all
    /// delivered and new entries are read.
    backlog: Option<String>,
    /// Delivered and not yet acknowledged.
    in_flight: usize,
}

type Shards = Arc<Mutex<BTreeMap<u32, Owned>>>;

/// The longest one blocking read waits for new entries. It bounds how long
/// a consumer may still read a shard it just gave up (another consumer
/// then takes over only what was pending before): the same race a poll
/// has, kept short.
const MAX_BLOCK: Duration = Duration::from_millis(200);

/// A member of a consumer group, holding its share of the shards.
pub struct Consumer {
    log: EventLog,
    config: Arc<ConsumerConfig>,
    owned: Shards,
    stop: CancellationToken,
    leases: Option<tokio::task::JoinHandle<()>>,
    /// The connection of this consumer's own that blocking reads wait on
    /// (single Redis only), made on first use.
    blocking: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl Consumer {
    /// Joins the group and starts holding shards (the first share is taken
    /// at once, in the background).
    pub fn start(log: EventLog, config: ConsumerConfig) -> Self {
        let config = Arc::new(config);
        let owned: Shards = Arc::default();
        let stop = CancellationToken::new();
        let leases = tokio::spawn(keep_leases(
            log.clone(),
            config.clone(),
            owned.clone(),
            stop.clone(),
        ));
        Self {
            log,
            config,
            owned,
            stop,
            leases: Some(leases),
            blocking: tokio::sync::Mutex::new(None),
        }
    }

    /// This consumer's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The shards this consumer holds now.
    pub fn shards(&self) -> Vec<u32> {
        held(&self.owned)
    }

    /// The next deliveries from this consumer's shards, each shard's in log
    /// order (a taken-over shard's leftover entries first). Waits up to the
    /// configured `max_wait`, then returns an empty batch, so a caller can
    /// check for shutdown between calls.
    ///
    /// On a single Redis an idle consumer waits in a blocking read
    /// (`XREADGROUP … BLOCK`) on a connection of its own, which Redis
    /// answers as soon as an entry is appended: no polling while the log is
    /// quiet, and no poll interval added to an event's way. Under Redis
    /// Cluster, and while taking a shard over, it polls every
    /// `poll_interval`.
    pub async fn next(&self) -> Result<Vec<Delivery>, EventLogError> {
        let deadline = Instant::now() + self.config.max_wait;
        loop {
            let batch = self.read_once().await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            // Wait in Redis while it can; each blocking read asks for the
            // shards held at that moment.
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Vec::new());
                }
                match self.read_blocking(left.min(MAX_BLOCK)).await? {
                    Some(batch) if !batch.is_empty() => return Ok(batch),
                    Some(_) => {}
                    None => {
                        tokio::time::sleep(self.config.poll_interval).await;
                        break;
                    }
                }
            }
        }
    }

    /// Waits up to `wait` for new entries on the shards this consumer
    /// holds and reads them, as [`Consumer::read_once`] does. `None` when
    /// it cannot block: under Redis Cluster, holding no shard, or while
    /// delivering a taken-over shard's leftovers.
    async fn read_blocking(&self, wait: Duration) -> Result<Option<Vec<Delivery>>, EventLogError> {
        let shards: Vec<u32> = {
            let owned = self.owned.lock().expect("shard map lock");
            if owned.is_empty() || owned.values().any(|o| o.backlog.is_some()) {
                return Ok(None);
            }
            owned.keys().copied().collect()
        };
        let mut slot = self.blocking.lock().await;
        if slot.is_none() {
            *slot = self.log.redis().dedicated(MAX_BLOCK).await?;
        }
        let Some(conn) = slot.as_mut() else {
            return Ok(None);
        };
        let keys: Vec<String> = shards.iter().map(|s| self.log.stream_key(*s)).collect();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.config.name)
            .arg("COUNT")
            .arg(self.config.batch)
            .arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&keys);
        for _ in &keys {
            cmd.arg(">");
        }
        let reply: Option<Vec<(String, redis::Value)>> = match cmd.query_async(conn).await {
            Ok(reply) => reply,
            Err(e) => {
                // A new connection next time; the polling read recreates a
                // group that is gone (NOGROUP).
                *slot = None;
                return Err(e.into());
            }
        };
        drop(slot);
        let mut deliveries = Vec::new();
        let mut owned = self.owned.lock().expect("shard map lock");
        for (key, entries) in reply.unwrap_or_default() {
            let Some(shard) = shards
                .iter()
                .zip(&keys)
                .find_map(|(shard, k)| (*k == key).then_some(*shard))
            else {
                return Err(EventLogError(format!(
                    "a blocking read answered for {key}, which it did not ask for"
                )));
            };
            let entries = crate::redis::streams::entries(entries, "p")
                .map_err(|e| EventLogError(e.to_string()))?;
            // A shard given up while the read waited has no count to keep;
            // its entries are delivered here all the same.
            deliver(&mut owned, shard, entries, &mut deliveries);
        }
        Ok(Some(deliveries))
    }

    async fn read_once(&self) -> Result<Vec<Delivery>, EventLogError> {
        let plan: Vec<(u32, Option<String>)> = self
            .owned
            .lock()
            .expect("shard map lock")
            .iter()
            .map(|(shard, o)| (*shard, o.backlog.clone()))
            .collect();
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let group = &self.config.group;
        let name = &self.config.name;
        let mut pipe = redis::pipe();
        for (shard, backlog) in &plan {
            let key = self.log.stream_key(*shard);
            match backlog {
                Some(cursor) => pipe
                    .cmd("XAUTOCLAIM")
                    .arg(key)
                    .arg(group)
                    .arg(name)
                    .arg(0)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(self.config.batch),
                None => pipe
                    .cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(group)
                    .arg(name)
                    .arg("COUNT")
                    .arg(self.config.batch)
                    .arg("STREAMS")
                    .arg(key)
                    .arg(">"),
            };
        }
        let replies: Vec<redis::Value> = match self.log.redis().pipeline(&pipe).await {
            Ok(r) => r,
            Err(e) => {
                if e.code() == Some("NOGROUP") {
                    // The stream was deleted under us (a flushed Redis):
                    // make the groups again; the next round reads.
                    for (shard, _) in &plan {
                        create_group(&self.log, &self.config.group, *shard).await?;
                    }
                }
                return Err(e.into());
            }
        };
        let mut deliveries = Vec::new();
        let mut owned = self.owned.lock().expect("shard map lock");
        for ((shard, backlog), reply) in plan.into_iter().zip(replies) {
            let entries = match backlog {
                Some(cursor) => {
                    let (next, entries) = parse_autoclaim(reply)?;
                    if let Some(o) = owned.get_mut(&shard)
                        && o.backlog.as_deref() == Some(cursor.as_str())
                    {
                        o.backlog = (next != "0-0").then_some(next);
                    }
                    entries
                }
                None => parse_read(reply)?,
            };
            deliver(&mut owned, shard, entries, &mut deliveries);
        }
        Ok(deliveries)
    }

    /// Acknowledges processed deliveries: they are not delivered again, to
    /// this consumer or any other of its group. The shards are trimmed of
    /// what every group has acknowledged.
    pub async fn ack(&self, deliveries: &[Delivery]) -> Result<(), EventLogError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut by_shard: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        for d in deliveries {
            by_shard.entry(d.shard).or_default().push(&d.id);
        }
        let mut pipe = redis::pipe();
        for (shard, ids) in &by_shard {
            let key = self.log.stream_key(*shard);
            pipe.cmd("XACK")
                .arg(&key)
                .arg(&self.config.group)
                .arg(ids)
                .ignore();
            // Trim in the same round trip, so the shard's length (the
            // gateway's back-pressure) follows the slowest group at once.
            pipe.cmd("EVAL")
                .arg(TRIM)
                .arg(1)
                .arg(key)
                .arg(self.log.trim_args())
                .ignore();
        }
        self.log.redis().pipeline::<()>(&pipe).await?;
        let mut owned = self.owned.lock().expect("shard map lock");
        for (shard, ids) in by_shard {
            if let Some(o) = owned.get_mut(&shard) {
                o.in_flight = o.in_flight.saturating_sub(ids.len());
            }
        }
        Ok(())
    }

    /// Leaves the group: stops renewing and gives every shard back at once,
    /// so the others take them without waiting for the leases to run out.
    /// Unacknowledged deliveries are delivered again by the next holder.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.leases.take() {
            let _ = task.await;
        }
        let shards: Vec<u32> = std::mem::take(&mut *self.owned.lock().expect("shard map lock"))
            .into_keys()
            .collect();
        let result: Result<(), EventLogError> = async {
            let mut pipe = redis::pipe();
            for shard in shards {
                pipe.cmd("EVAL")
                    .arg(RELEASE)
                    .arg(1)
                    .arg(self.log.lease_key(shard, &self.config.group))
                    .arg(&self.config.name)
                    .ignore();
            }
            pipe.cmd("ZREM")
                .arg(self.log.members_key(&self.config.group))
                .arg(&self.config.name)
                .ignore();
            self.log.redis().pipeline::<()>(&pipe).await?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(group = %self.config.group, consumer = %self.config.name, error = %e, "could not give the shards back; they move when the leases run out");
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Dropped without `stop`: the leases run out by themselves.
        self.stop.cancel();
    }
}

/// Creates the group on a shard's stream (and the stream), reading from the
/// start; an existing group is left as it is.
async fn create_group(log: &EventLog, group: &str, shard: u32) -> Result<(), EventLogError> {
    let created: Result<(), redis::RedisError> = log
        .redis()
        .command(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(log.stream_key(shard))
                .arg(group)
                .arg("0")
                .arg("MKSTREAM"),
        )
        .await;
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
        _ => Ok(()),
    }
}

/// A stream entry's id and payload.
type Entry = crate::redis::streams::Entry;

/// Hands out `entries` read from `shard`, counting them in flight while
/// the shard is held.
fn deliver(
    owned: &mut BTreeMap<u32, Owned>,
    shard: u32,
    entries: Vec<Entry>,
    deliveries: &mut Vec<Delivery>,
) {
    if let Some(o) = owned.get_mut(&shard) {
        o.in_flight += entries.len();
    }
    deliveries.extend(
        entries
            .into_iter()
            .map(|(id, payload)| Delivery { shard, id, payload }),
    );
}

fn parse_read(value: redis::Value) -> Result<Vec<Entry>, EventLogError> {
    crate::redis::streams::read_reply(value, "p").map_err(|e| EventLogError(e.to_string()))
}

fn parse_autoclaim(value: redis::Value) -> Result<(String, Vec<Entry>), EventLogError> {
    crate::redis::streams::autoclaim_reply(value, "p").map_err(|e| EventLogError(e.to_string()))
}

/// Keeps this consumer's share of the shards until `stop`: heartbeat,
/// renew, give back what is over the share, take what is free, trim.
async fn keep_leases(
    log: EventLog,
    config: Arc<ConsumerConfig>,
    owned: Shards,
    stop: CancellationToken,
) {
    let tick = (config.lease / 3).max(Duration::from_millis(10));
    loop {
        if let Err(e) = balance(&log, &config, &owned).await {
            tracing::warn!(group = %config.group, consumer = %config.name, error = %e, "event log leases not renewed; retrying");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
    }
}

async fn balance(
    log: &EventLog,
    config: &ConsumerConfig,
    owned: &Shards,
) -> Result<(), EventLogError> {
    let redis = log.redis();
    let lease_ms = config.lease.as_millis() as u64;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let members = log.members_key(&config.group);

    // Heartbeat, and count the live members.
    let mut pipe = redis::pipe();
    pipe.cmd("ZADD")
        .arg(&members)
        .arg(now_ms + lease_ms)
        .arg(&config.name)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(&members)
        .arg("-inf")
        .arg(now_ms)
        .ignore()
        .cmd("ZCARD")
        .arg(&members);
    let live: (u64,) = redis.pipeline(&pipe).await?;
    let live = live.0.max(1) as u32;
    let share = log.shards().div_ceil(live) as usize;

    // Renew what is held; forget what was lost.
    let renewing = held(owned);
    if !renewing.is_empty() {
        let mut pipe = redis::pipe();
        for shard in &renewing {
            pipe.cmd("EVAL")
                .arg(RENEW)
                .arg(1)
                .arg(log.lease_key(*shard, &config.group))
                .arg(&config.name)
                .arg(lease_ms);
        }
        let renewed: Vec<i64> = redis.pipeline(&pipe).await?;
        let mut map = owned.lock().expect("shard map lock");
        for (shard, ok) in renewing.iter().zip(renewed) {
            if ok == 0 && map.remove(shard).is_some() {
                tracing::warn!(group = %config.group, consumer = %config.name, shard, "lease lost: another consumer holds the shard now");
            }
        }
    }

    // Give back what is over the share, idle shards only.
    let surplus: Vec<u32> = {
        let mut map = owned.lock().expect("shard map lock");
        let over = map.len().saturating_sub(share);
        let idle: Vec<u32> = map
            .iter()
            .rev()
            .filter(|(_, o)| o.in_flight == 0 && o.backlog.is_none())
            .map(|(shard, _)| *shard)
            .take(over)
            .collect();
        for shard in &idle {
            map.remove(shard);
        }
        idle
    };
    if !surplus.is_empty() {
        let mut pipe = redis::pipe();
        for shard in &surplus {
            pipe.cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(log.lease_key(*shard, &config.group))
                .arg(&config.name)
                .ignore();
        }
        redis.pipeline::<()>(&pipe).await?;
    }

    // Take free shards up to the share, starting at a place of this
    // consumer's own so that consumers starting together spread out.
    let held_now = owned.lock().expect("shard map lock").len();
    if held_now < share {
        let start = log.shard_of(&config.group, &config.name);
        let mut wanted = share - held_now;
        for i in 0..log.shards() {
            if wanted == 0 {
                break;
            }
            let shard = (start + i) % log.shards();
            if owned.lock().expect("shard map lock").contains_key(&shard) {
                continue;
            }
            let taken: Option<String> = redis
                .command(
                    redis::cmd("SET")
                        .arg(log.lease_key(shard, &config.group))
                        .arg(&config.name)
                        .arg("NX")
                        .arg("PX")
                        .arg(lease_ms),
                )
                .await?;
            if taken.is_none() {
                continue;
            }
            create_group(log, &config.group, shard).await?;
            owned.lock().expect("shard map lock").insert(
                shard,
                Owned {
                    backlog: Some("0-0".into()),
                    in_flight: 0,
                },
            );
            tracing::debug!(group = %config.group, consumer = %config.name, shard, "shard taken");
            wanted -= 1;
        }
    }

    // Trim what every group has finished with.
    let trimming = held(owned);
    if !trimming.is_empty() {
        let mut pipe = redis::pipe();
        for shard in trimming {
            pipe.cmd("EVAL")
                .arg(TRIM)
                .arg(1)
                .arg(log.stream_key(shard))
                .arg(log.trim_args())
                .ignore();
        }
        redis.pipeline::<()>(&pipe).await?;
    }
    Ok(())
}

/// The shards held now.
fn held(owned: &Shards) -> Vec<u32> {
    owned
        .lock()
        .expect("shard map lock")
        .keys()
        .copied()
        .collect()
}
