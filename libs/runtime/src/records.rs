//! Reading a record stream: one Redis stream another service publishes to
//! (contacts' membership changes, delivery's outcomes), read by a group in
//! stream order, one reader of the group at a time.
//!
//! - **One reader.** A group's readers (one per replica) compete for a lease
//!   key (`<stream>:lease:<group>`, `SET NX PX`, renewed on every read); only
//!   the holder reads, so records are folded in the order they were
//!   published, and a standby takes over within a lease when the holder
//!   dies.
//! - **At-least-once.** Records stay pending in the group until
//!   [`RecordReader::ack`]; a reader that takes the lease first hands out
//!   the group's pending records (those a dead reader never acknowledged),
//!   then new ones. A consumer counts each entry once by remembering, with
//!   its effects, the id of the last entry it took (analytics'
//!   `stream_positions`).
//! - **Waiting in Redis.** A reader made [`RecordReader::waiting`] waits
//!   for new records in a blocking read (`XREADGROUP … BLOCK`) on a
//!   connection of its own, which Redis answers as soon as a record is
//!   published: a quiet stream is not polled, and a record does not wait
//!   for the next poll. Other reads, and every read under Redis Cluster,
//!   go on the shared connection and return at once.

use std::time::Duration;

use crate::redis::streams::{self, Entry};
use crate::redis::{Redis, redis};

/// Renews the lease if the caller holds it, or takes it if it is free:
/// KEYS = lease; ARGV = name, ttl ms. 1 when held after the call.
const HOLD: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

static HOLD_SCRIPT: crate::redis::Script = crate::redis::Script::new(HOLD);

/// Gives the lease back if the caller holds it: KEYS = lease; ARGV = name.
static RELEASE_SCRIPT: crate::redis::Script = crate::redis::Script::new(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
);

/// A group's reader of one record stream.
pub struct RecordReader {
    redis: Redis,
    stream: String,
    group: String,
    name: String,
    field: &'static str,
    lease: Duration,
    /// Where the next read starts: "0" (this reader's pending records)
    /// after taking the lease, ">" (new records) once those are handed out.
    cursor: String,
    held: bool,
    /// How long a read of new records may wait for one (zero: not at all).
    wait: Duration,
    /// The connection blocking reads wait on, made on first use.
    blocking: Option<redis::aio::MultiplexedConnection>,
}

impl RecordReader {
    /// A reader named `name` in `group` of `stream` (a full key), handing
    /// out the value of each entry's `field`; the lease lasts `lease`.
    pub fn new(
        redis: Redis,
        stream: String,
        group: &str,
        name: &str,
        field: &'static str,
        lease: Duration,
    ) -> Self {
        Self {
            redis,
            stream,
            group: group.to_owned(),
            name: name.to_owned(),
            field,
            lease,
            cursor: "0".into(),
            held: false,
            wait: Duration::ZERO,
            blocking: None,
        }
    }

    /// Lets a read of new records wait up to `wait` for one to be
    /// published, on a single Redis (keep it well under the lease, which a
    /// read renews).
    pub fn waiting(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The stream read (its full key).
    pub fn stream(&self) -> &str {
        &self.stream
    }

    fn lease_key(&self) -> String {
        format!("{}:lease:{}", self.stream, self.group)
    }

    /// Up to `count` records: empty when another reader holds the lease or
    /// nothing is new.
    pub async fn read(&mut self, count: usize) -> Result<Vec<Entry>, redis::RedisError> {
        let ttl = self.lease.as_millis().to_string();
        let held: i64 = self
            .redis
            .script(
                &HOLD_SCRIPT,
                &[&self.lease_key()],
                &[self.name.as_bytes(), ttl.as_bytes()],
            )
            .await?;
        if held != 1 {
            self.held = false;
            return Ok(Vec::new());
        }
        if !self.held {
            // Newly held: the group may not exist yet, and what the
            // previous holder left pending comes first.
            self.create_group().await?;
            self.claim_pending().await?;
            self.cursor = "0".into();
            self.held = true;
        }
        let reply = self.read_group(count).await?;
        let entries = streams::read_reply(reply, self.field)?;
        if entries.is_empty() && self.cursor != ">" {
            // Pending ones handed out: new records from here on.
            self.cursor = ">".into();
            return Box::pin(self.read(count)).await;
        }
        if self.cursor != ">"
            && let Some((last, _)) = entries.last()
        {
            // Pending records are read by id: go on after the last one.
            self.cursor = last.clone();
        }
        Ok(entries)
    }

    /// One `XREADGROUP` from the cursor: for new records, a blocking read
    /// on this reader's own connection where it may wait.
    async fn read_group(&mut self, count: usize) -> Result<redis::Value, redis::RedisError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(count);
        if self.cursor == ">" && !self.wait.is_zero() {
            if self.blocking.is_none() {
                self.blocking = self.redis.dedicated(self.wait).await?;
            }
            if let Some(conn) = self.blocking.as_mut() {
                cmd.arg("BLOCK")
                    .arg(self.wait.as_millis().max(1) as u64)
                    .arg("STREAMS")
                    .arg(&self.stream)
                    .arg(">");
                let reply = cmd.query_async(conn).await;
                if reply.is_err() {
                    // A new connection next time.
                    self.blocking = None;
                }
                return reply;
            }
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(&self.cursor);
        self.redis.command(&cmd).await
    }

    /// Acknowledges folded records.
    pub async fn ack(&self, ids: &[String]) -> Result<(), redis::RedisError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.redis
            .command::<i64>(
                redis::cmd("XACK")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(ids),
            )
            .await?;
        Ok(())
    }

    /// Gives the lease back (on shutdown), so a standby takes over at once.
    pub async fn release(&self) {
        let _ = self
            .redis
            .script::<i64>(
                &RELEASE_SCRIPT,
                &[&self.lease_key()],
                &[self.name.as_bytes()],
            )
            .await;
    }

    async fn create_group(&self) -> Result<(), redis::RedisError> {
        // From the start of the stream: records published before the
        // reader first ran are folded too.
        let created: Result<(), _> = self
            .redis
            .command(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg("0")
                    .arg("MKSTREAM"),
            )
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Moves every pending record of the group to this reader.
    async fn claim_pending(&self) -> Result<(), redis::RedisError> {
        let mut cursor = "0-0".to_owned();
        loop {
            let reply: redis::Value = self
                .redis
                .command(
                    redis::cmd("XAUTOCLAIM")
                        .arg(&self.stream)
                        .arg(&self.group)
                        .arg(&self.name)
                        .arg(0)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .arg("JUSTID"),
                )
                .await?;
            let redis::Value::Array(parts) = reply else {
                return Ok(());
            };
            let next: String = match parts.into_iter().next() {
                Some(v) => redis::from_redis_value(v)?,
                None => return Ok(()),
            };
            if next == "0-0" {
                return Ok(());
            }
            cursor = next;
        }
    }
}
