//! Publishes the outbox to Redis: membership change records, in commit
//! order, onto the stream `<prefix>:contacts:{membership}` (field `p`: an
//! encoded `MembershipChangeRecord`), where analytics and scenario read them.
//!
//! The records were written in the same transaction as the changes, so a
//! committed change is always published and a rolled-back one never is.
//! Each record goes on the stream once: a crash between XADD and the outbox
//! DELETE leaves the rows to be published again, and the script that
//! publishes them skips those it already put on the stream (a guard of
//! outbox ids and payload digests, kept a day, beside the stream; see
//! [`PUBLISH`]). Consumers then count each entry once by its stream
//! position. Several replicas share the outbox with `FOR UPDATE SKIP
//! LOCKED`.

use std::sync::Arc;
use std::time::Duration;

use hibiki_runtime::postgres::QueueVacuum;
use hibiki_runtime::redis::{Redis, Script};
use hibiki_runtime::{Migrated, Shutdown};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::error::{Error, Result};

/// The outbox is vacuumed after this many published records.
static OUTBOX_VACUUM: QueueVacuum = QueueVacuum::new("outbox", 50_000);

/// Records published per round trip.
const BATCH: i64 = 500;
/// The stream keeps about this many records (older ones are trimmed).
const STREAM_MAX_LEN: usize = 1_000_000;

/// How long the guard remembers a published record: longer than any
/// outage after which a relay could publish rows it had published before.
const GUARD_TTL_SECS: u64 = 86_400;
/// Outbox ids per guard hash (a guard key per block of ids, so that old
/// blocks expire whole).
const GUARD_BLOCK: i64 = 1 << 16;

/// Publishes records once. KEYS: the stream, then guard hashes. ARGV: the
/// stream's max length, the guards' TTL (s), then per record the index of
/// its guard in KEYS, its outbox id and its payload. A record whose id the
/// guard holds with the same payload digest was published before and is
/// skipped; a different digest (an id used again, after the database was
/// restored from a backup, say) is a new record. Returns how many were
/// added.
///
/// The guards are named `<stream>:published:<block>`, with the stream's hash
/// tag (`{membership}`), so under Redis Cluster they share its slot.
pub static PUBLISH: Script = Script::new(
    r#"
local added = 0
for i = 3, #ARGV, 3 do
  local guard = KEYS[tonumber(ARGV[i])]
  local digest = string.sub(redis.sha1hex(ARGV[i + 2]), 1, 16)
  if redis.call('HGET', guard, ARGV[i + 1]) ~= digest then
    redis.call('HSET', guard, ARGV[i + 1], digest)
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'p', ARGV[i + 2])
    added = added + 1
  end
end
for k = 2, #KEYS do redis.call('EXPIRE', KEYS[k], ARGV[2]) end
return added
"#,
);

/// The stream's key under `redis`'s prefix, hash-tagged so that its guards
/// share its Redis Cluster slot.
pub fn stream_key(redis: &Redis) -> String {
    redis.key(&["contacts", "{membership}"])
}

/// The guard of the outbox ids in `block` (see [`PUBLISH`]).
fn guard_key(stream: &str, block: i64) -> String {
    format!("{stream}:published:{block}")
}

/// Wakes the relay after a commit that wrote to the outbox.
#[derive(Clone, Default)]
pub struct Relay {
    wake: Arc<Notify>,
}

impl Relay {
    /// Starts relaying from `pool` to `redis`, once `migrated`, until
    /// `shutdown`.
    pub fn start(pool: PgPool, redis: Redis, migrated: Migrated, shutdown: Shutdown) -> Self {
        let relay = Self::default();
        let wake = relay.wake.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = migrated.wait() => run(pool, redis, wake, shutdown).await,
            }
        });
        relay
    }

    /// Publishes soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

async fn run(pool: PgPool, redis: Redis, wake: Arc<Notify>, shutdown: Shutdown) {
    let key = stream_key(&redis);
    loop {
        let wait = match publish_batch(&pool, &redis, &key).await {
            Ok(n) if n == BATCH as usize => continue,
            Ok(_) => Duration::from_millis(200),
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay: publishing failed; retrying");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Publishes up to one batch of outbox records; returns how many.
pub async fn publish_batch(pool: &PgPool, redis: &Redis, key: &str) -> Result<usize> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT id, payload FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut keys = vec![key.to_owned()];
    let mut blocks: Vec<i64> = Vec::new();
    let mut numbers: Vec<(String, String)> = Vec::with_capacity(rows.len());
    for (id, _) in &rows {
        let block = id.div_euclid(GUARD_BLOCK);
        let k = match blocks.iter().position(|b| *b == block) {
            Some(k) => k,
            None => {
                blocks.push(block);
                keys.push(guard_key(key, block));
                blocks.len() - 1
            }
        };
        // KEYS is 1-based in Lua, and the stream comes first.
        numbers.push(((k + 2).to_string(), id.to_string()));
    }
    let (max_len, ttl) = (STREAM_MAX_LEN.to_string(), GUARD_TTL_SECS.to_string());
    let mut args: Vec<&[u8]> = Vec::with_capacity(2 + 3 * rows.len());
    args.push(max_len.as_bytes());
    args.push(ttl.as_bytes());
    for ((guard, id), (_, payload)) in numbers.iter().zip(&rows) {
        args.extend([guard.as_bytes(), id.as_bytes(), payload.as_slice()]);
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let added: i64 = redis
        .script(&PUBLISH, &keys, &args)
        .await
        .map_err(|e| Error::Unavailable(format!("redis: {e}")))?;
    if added < rows.len() as i64 {
        metrics::counter!("hibiki_contacts_outbox_republished_total")
            .increment(rows.len() as u64 - added as u64);
    }
    let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    metrics::counter!("hibiki_contacts_outbox_published_total").increment(rows.len() as u64);
    OUTBOX_VACUUM.deleted(pool, rows.len() as u64).await?;
    Ok(rows.len())
}
