//! delivery's Redis queues.
//!
//! Every key of a channel carries the channel as its hash tag (`{<channel>}`),
//! so each script below touches one Cluster slot:
//!
//! | key | what |
//! |---|---|
//! | `<p>:dq:{ch}:q:<class>` | the ready queue: a stream of `QueuedCall`s (field `c`), read by the consumer group `delivery` |
//! | `<p>:dq:{ch}:q:<class>:merged` | calls coalesced from the ready queue, and gathered bulk links (same group), read first |
//! | `<p>:dq:{ch}:q:<class>:delayed` | retries and held sends: a sorted set of `QueuedCall`s by due time (ms) |
//! | `<p>:dq:{ch}:q:<class>:open`, `…:opened`, `…:open:<menu>` | bulk links being gathered as links are queued (see [`ENQUEUE_LINK`]) |
//! | `<p>:dq:{ch}:batch:<batch>` | a gathered bulk link's progress, which its jobs report |
//! | `<p>:dq:{ch}:q:<class>:lease` | the worker that owns the queue now (a lease, renewed while it works) |
//! | `<p>:dq:{ch}:job:<job>` | a job's progress (hash), with its last 100 LINE request ids |
//! | `<p>:dq:{ch}:idem:<tenant>:<key>` | idempotency key → job id |
//! | `<p>:dq:{ch}:rl:<endpoint>`, `…:pause:<endpoint>` | the shared rate limit (GCRA) and a 429 pause |
//! | `<p>:dq:active` | the queues with work (`<channel>\|<class>`), which workers look for |
//! | `<p>:delivery:outcomes` | every call's outcome (`DeliveryOutcomeRecord`), for analytics |
//!
//! Two classes per channel: `rt` (scenario messages, replies, rich-menu
//! switches) and `bulk` (segment broadcasts), so a broadcast never stands
//! in front of a tap's answer.
//!
//! A call leaves the ready queue only in the same script that settles it:
//! acknowledged and deleted with its job updated (sent, or dead-lettered),
//! or moved to the delayed set (a retry, a 429 pause). A worker that dies
//! holding calls leaves them pending in the group; the next owner of the
//! queue claims them first.

use hibiki_proto::delivery::v1::QueuedCall;
use hibiki_runtime::redis::{Redis, Script, redis};

/// The consumer group every worker reads the queues through.
pub const GROUP: &str = "delivery";

/// A queue's class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Realtime: replies, scenario messages, rich-menu switches.
    Realtime,
    /// Bulk: segment broadcasts.
    Bulk,
}

impl Class {
    /// Its name in keys.
    pub fn name(self) -> &'static str {
        match self {
            Class::Realtime => "rt",
            Class::Bulk => "bulk",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "rt" => Some(Class::Realtime),
            "bulk" => Some(Class::Bulk),
            _ => None,
        }
    }
}

/// One channel's queue of one class.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId {
    pub channel_id: String,
    pub class: Class,
}

impl QueueId {
    /// The member of the active set naming this queue.
    pub fn member(&self) -> String {
        format!("{}|{}", self.channel_id, self.class.name())
    }

    /// The queue a member of the active set names.
    pub fn from_member(member: &str) -> Option<Self> {
        let (channel, class) = member.rsplit_once('|')?;
        Some(Self {
            channel_id: channel.to_owned(),
            class: Class::from_name(class)?,
        })
    }
}

/// The key layout under a Redis prefix.
#[derive(Clone)]
pub struct Keys {
    redis: Redis,
}

impl Keys {
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn channel(&self, channel_id: &str, rest: &str) -> String {
        format!("{}:dq:{{{channel_id}}}:{rest}", self.redis.prefix())
    }

    pub fn stream(&self, q: &QueueId) -> String {
        self.channel(&q.channel_id, &format!("q:{}", q.class.name()))
    }

    /// Calls coalesced from the ready queue, read before it: a merged call
    /// leaves at once instead of behind the backlog it was taken from.
    pub fn merged(&self, q: &QueueId) -> String {
        self.channel(&q.channel_id, &format!("q:{}:merged", q.class.name()))
    }

    pub fn delayed(&self, q: &QueueId) -> String {
        self.channel(&q.channel_id, &format!("q:{}:delayed", q.class.name()))
    }

    /// The open bulk links being gathered: menu id → batch id.
    pub fn open(&self, q: &QueueId) -> String {
        self.channel(&q.channel_id, &format!("q:{}:open", q.class.name()))
    }

    /// When each open bulk link was opened: a sorted set of menu ids by ms.
    pub fn opened(&self, q: &QueueId) -> String {
        self.channel(&q.channel_id, &format!("q:{}:opened", q.class.name()))
    }

    /// The open bulk link to `menu`: its call's header, then its parts, as
    /// encoded pieces of one `QueuedCall`.
    pub fn open_links(&self, q: &QueueId, menu: &str) -> String {
        self.channel(&q.channel_id, &format!("q:{}:open:{menu}", q.class.name()))
    }

    /// A batch's progress (a hash shaped like a job's).
    pub fn batch(&self, channel_id: &str, batch_id: &str) -> String {
        self.channel(channel_id, &format!("batch:{batch_id}"))
    }

    pub fn lease(&self, q: &QueueId) -> String {
        self.channel(&q.channel_id, &format!("q:{}:lease", q.class.name()))
    }

    pub fn job(&self, channel_id: &str, job_id: &str) -> String {
        self.channel(channel_id, &format!("job:{job_id}"))
    }

    pub fn idem(&self, channel_id: &str, tenant_id: &str, key: &str) -> String {
        self.channel(channel_id, &format!("idem:{tenant_id}:{key}"))
    }

    pub fn rate(&self, channel_id: &str, endpoint: &str) -> String {
        self.channel(channel_id, &format!("rl:{endpoint}"))
    }

    pub fn pause(&self, channel_id: &str, endpoint: &str) -> String {
        self.channel(channel_id, &format!("pause:{endpoint}"))
    }

    pub fn active(&self) -> String {
        self.redis.key(&["dq", "active"])
    }

    pub fn outcomes(&self) -> String {
        self.redis.key(&["delivery", "outcomes"])
    }
}

/// Queues a new job's call, unless the idempotency key has a job already.
/// KEYS: idem, job, stream, delayed. ARGV: job id, ttl ms, max queue length,
/// call, due ms (0: now), then the job's fields (tenant, kind, channel,
/// idempotency key, recipients, whether its recipients are still being
/// listed (1/0): a broadcast's). Returns {status, job id, created ms,
/// updated ms}: 1 queued (the new job, made at Redis's clock), 0 a repeat
/// (the existing job), 2 the queue is full.
pub static ENQUEUE: Script = Script::new(
    r#"
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing, 0, 0} end
if redis.call('XLEN', KEYS[3]) + redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[3]) then
  return {2, '', 0, 0}
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'tenant', ARGV[6], 'kind', ARGV[7], 'channel', ARGV[8],
  'idem', ARGV[9], 'total', ARGV[10], 'succeeded', 0, 'failed', 0, 'attempts', 0,
  'created', now, 'updated', now, 'expanding', ARGV[11])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local due = tonumber(ARGV[5])
if due > now then
  redis.call('ZADD', KEYS[4], due, ARGV[4])
else
  redis.call('XADD', KEYS[3], '*', 'c', ARGV[4])
end
return {1, ARGV[1], now, now}
"#,
);

/// Queues a new link job into the bulk link being gathered for its menu,
/// unless the idempotency key has a job already. A link's call is never
/// queued alone: it joins the menu's open bulk link, which is queued as one
/// call when it holds `ARGV[7]` users (or when a worker seals it, a
/// coalescing window after it opened, see [`SEAL`]). The first link of a
/// bulk link opens it, and its job id becomes the batch id; each job names
/// its batch, and the batch's progress record is made with it.
///
/// The open bulk link is a list of encoded pieces of one `QueuedCall`: the
/// header (every field but the parts), then each part as an encoded
/// `parts` field. Concatenated, they are the call.
///
/// A bulk link is queued on the merged stream, which the queue's owner reads
/// before the ready queue: a storm's switches go ahead of the replies and
/// pushes waiting there for their own limit.
///
/// KEYS: idem, job, stream, delayed, open links (this menu), open, opened,
/// the batch (as if this job opens it), merged stream. ARGV: job id, ttl
/// ms, max queue length (ready, merged and delayed together), header, part,
/// menu id, most users in a bulk link, then the job's fields (tenant, kind, channel, idempotency key). Returns {status,
/// job id, created ms, updated ms} as [`ENQUEUE`] does; a link's progress is
/// its bulk link's, so it was last updated when the bulk link opened.
pub static ENQUEUE_LINK: Script = Script::new(
    r#"
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing, 0, 0} end
if redis.call('XLEN', KEYS[3]) + redis.call('ZCARD', KEYS[4]) + redis.call('XLEN', KEYS[9])
  >= tonumber(ARGV[3]) then
  return {2, '', 0, 0}
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local batch = redis.call('HGET', KEYS[6], ARGV[6])
local opened = now
if batch then
  opened = tonumber(redis.call('ZSCORE', KEYS[7], ARGV[6]))
else
  batch = ARGV[1]
  redis.call('HSET', KEYS[6], ARGV[6], batch)
  redis.call('ZADD', KEYS[7], now, ARGV[6])
  redis.call('DEL', KEYS[5])
  redis.call('RPUSH', KEYS[5], ARGV[4])
  redis.call('HSET', KEYS[8], 'tenant', ARGV[8], 'kind', ARGV[9], 'channel', ARGV[10],
    'succeeded', 0, 'failed', 0, 'attempts', 0, 'created', now, 'updated', now)
  redis.call('PEXPIRE', KEYS[8], ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'tenant', ARGV[8], 'kind', ARGV[9], 'channel', ARGV[10],
  'idem', ARGV[11], 'total', 1, 'succeeded', 0, 'failed', 0, 'attempts', 0,
  'created', now, 'updated', now, 'expanding', 0, 'batch', batch)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if redis.call('RPUSH', KEYS[5], ARGV[5]) - 1 >= tonumber(ARGV[7]) then
  redis.call('XADD', KEYS[9], '*', 'c', table.concat(redis.call('LRANGE', KEYS[5], 0, -1)))
  redis.call('DEL', KEYS[5])
  redis.call('HDEL', KEYS[6], ARGV[6])
  redis.call('ZREM', KEYS[7], ARGV[6])
end
return {1, ARGV[1], now, opened}
"#,
);

/// Queues the open bulk link to one menu as one call (on the merged stream,
/// as [`ENQUEUE_LINK`] does), if it opened at least ARGV[2] ms ago. KEYS:
/// open links (the menu), open, opened, merged stream. ARGV:
/// menu id, window ms. Returns the users queued (0: not due or none).
pub static SEAL: Script = Script::new(
    r#"
local opened = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not opened then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if tonumber(opened) + tonumber(ARGV[2]) > now then return 0 end
local n = redis.call('LLEN', KEYS[1]) - 1
if n > 0 then
  redis.call('XADD', KEYS[4], '*', 'c', table.concat(redis.call('LRANGE', KEYS[1], 0, -1)))
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return math.max(n, 0)
"#,
);

/// The progress records a call's outcome updates, each with the recipients
/// it counts: a gathered bulk link's batch, else each part's job.
pub fn progress_of(keys: &Keys, call: &QueuedCall) -> Vec<(String, usize)> {
    if call.batch_id.is_empty() {
        call.parts
            .iter()
            .map(|p| {
                (
                    keys.job(&call.channel_id, &p.job_id),
                    p.user_ids.len().max(1),
                )
            })
            .collect()
    } else {
        let users = call.parts.iter().map(|p| p.user_ids.len().max(1)).sum();
        vec![(keys.batch(&call.channel_id, &call.batch_id), users)]
    }
}

/// Coalesces calls: adds the merged call to the merged stream and removes
/// its sources from the ready queue, at once. KEYS: stream, merged stream.
/// ARGV: merged call, then the sources' entry ids (at most 500: one XACK
/// and one XDEL take them all).
pub static MERGE: Script = Script::new(
    r#"
redis.call('XADD', KEYS[2], '*', 'c', ARGV[1])
redis.call('XACK', KEYS[1], 'delivery', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
return 1
"#,
);

/// Settles one call. KEYS: stream, delayed, then the progress records the
/// call updates ([`progress_of`]: each part's job, or its batch).
/// ARGV: entry id, mode (`ok`, `dead`, `delay`), delay ms, the call as it
/// goes back (for `delay`), LINE request id, error, whether this counts as
/// an attempt (1/0), then per record its recipients. `ok` and `dead` add the
/// recipients to the jobs' succeeded or failed; `delay` puts the call in
/// the delayed set; every mode removes the entry from the ready queue.
///
/// A job's LINE request ids are its field `rids` (space-separated, the last
/// 100, counted in `rid_n`). Each record costs one read and one write: a
/// multicast of 500 settles 500 jobs, a gathered bulk link its one batch.
pub static SETTLE: Script = Script::new(
    r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local mode = ARGV[2]
local rid = ARGV[5]
local err = ARGV[6]
for i = 3, #KEYS do
  local job = KEYS[i]
  local f = redis.call('HMGET', job, 'tenant', 'succeeded', 'failed', 'attempts', 'rids', 'rid_n')
  if f[1] then
    local n = tonumber(ARGV[7 + i - 2])
    local set = {'updated', now}
    if mode == 'ok' then
      set[#set + 1] = 'succeeded'; set[#set + 1] = (tonumber(f[2]) or 0) + n
    elseif mode == 'dead' then
      set[#set + 1] = 'failed'; set[#set + 1] = (tonumber(f[3]) or 0) + n
    end
    if ARGV[7] == '1' then
      set[#set + 1] = 'attempts'; set[#set + 1] = (tonumber(f[4]) or 0) + 1
    end
    if err ~= '' then set[#set + 1] = 'last_error'; set[#set + 1] = err end
    if rid ~= '' then
      local rids, count = f[5], tonumber(f[6]) or 0
      if rids and rids ~= '' then rids = rids .. ' ' .. rid else rids = rid end
      count = count + 1
      if count > 100 then
        rids = string.sub(rids, string.find(rids, ' ', 1, true) + 1)
        count = 100
      end
      set[#set + 1] = 'rids'; set[#set + 1] = rids
      set[#set + 1] = 'rid_n'; set[#set + 1] = count
    end
    redis.call('HSET', job, unpack(set))
  end
end
if mode == 'delay' then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
end
redis.call('XACK', KEYS[1], 'delivery', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"#,
);

/// Moves due calls from the delayed set back to the ready queue.
/// KEYS: stream, delayed. ARGV: the most to move. Returns how many moved.
pub static REQUEUE_DUE: Script = Script::new(
    r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, c in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'c', c)
  redis.call('ZREM', KEYS[2], c)
end
return #due
"#,
);

/// Reserves up to ARGV[3] requests at a GCRA limit, each at its own time
/// from now on, so that one round trip paces many calls. KEYS: state,
/// pause. ARGV: emission interval (µs), tolerance (µs), wanted, horizon
/// (µs: no request is reserved further ahead than this).
///
/// Returns {reserved, offset}: request i (from 0) may go `offset + i *
/// interval` µs after the script ran (a negative time means at once); with
/// nothing reserved, `offset` is how long to wait before asking again (µs:
/// the channel's endpoint is paused after a 429, or reserved beyond the
/// horizon by other callers).
pub static RESERVE: Script = Script::new(
    r#"
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return {0, paused * 1000} end
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local horizon = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local first = tat - tolerance - now
local room = math.floor((horizon - first) / interval) + 1
local n = math.min(tonumber(ARGV[3]), room)
if n < 1 then return {0, first - horizon} end
tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {n, first}
"#,
);

/// Renews a lease held by ARGV[1] for ARGV[2] ms; 0 when it is not held.
pub static RENEW: Script = Script::new(
    r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#,
);

/// Releases a lease held by ARGV[1] if the queue is empty (ready, merged,
/// delayed, and no bulk link being gathered). KEYS: lease, stream, delayed,
/// merged, open. Returns 1 when released.
pub static RELEASE_IF_EMPTY: Script = Script::new(
    r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('XLEN', KEYS[2]) > 0 or redis.call('ZCARD', KEYS[3]) > 0
  or redis.call('XLEN', KEYS[4]) > 0 or redis.call('HLEN', KEYS[5]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#,
);

/// Releases a lease held by ARGV[1], whatever the queue holds.
pub static RELEASE: Script = Script::new(
    r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
);

/// Whether a Redis error is "the group exists already".
pub fn is_busy_group(e: &redis::RedisError) -> bool {
    e.code() == Some("BUSYGROUP")
}

/// Puts a replayed dead letter back on the ready queue and takes its
/// recipients off the jobs' failed counts. KEYS: stream, then the call's
/// progress records ([`progress_of`]). ARGV: the call, then per record its
/// recipients.
pub static REPLAY: Script = Script::new(
    r#"
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local failed = tonumber(redis.call('HGET', KEYS[i], 'failed') or '0')
    local n = math.min(failed, tonumber(ARGV[i]))
    redis.call('HINCRBY', KEYS[i], 'failed', -n)
  end
end
redis.call('XADD', KEYS[1], '*', 'c', ARGV[1])
return 1
"#,
);

/// One page of a segment broadcast: queues the page's multicast (when the
/// page has members) and the next page (when there is one), adds the page's
/// members to the job, and removes the page's entry, at once.
/// KEYS: stream, job. ARGV: entry id, multicast (or empty), next page (or
/// empty), members on the page.
pub static EXPAND: Script = Script::new(
    r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'total', tonumber(ARGV[4]))
  if ARGV[3] == '' then redis.call('HSET', KEYS[2], 'expanding', 0) end
  redis.call('HSET', KEYS[2], 'updated', now)
end
if ARGV[2] ~= '' then redis.call('XADD', KEYS[1], '*', 'c', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('XADD', KEYS[1], '*', 'c', ARGV[3]) end
redis.call('XACK', KEYS[1], 'delivery', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"#,
);
