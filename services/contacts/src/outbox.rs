//! Publishes the outbox to Redis: membership change records, in commit
//! order, onto the stream `<prefix>:contacts:membership` (field `p`: an
//! encoded `MembershipChangeRecord`), where analytics and scenario read them.
//!
//! The records were written in the same transaction as the changes, so a
//! committed change is always published and a rolled-back one never is.
//! Publication is at-least-once (a crash between XADD and the outbox
//! DELETE publishes a batch again); consumers dedupe on `change_id`. Several
//! replicas share the outbox with `FOR UPDATE SKIP LOCKED`.

use std::sync::Arc;
use std::time::Duration;

use hibiki_runtime::postgres::QueueVacuum;
use hibiki_runtime::redis::{Redis, redis};
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

/// The stream's key under `redis`'s prefix.
pub fn stream_key(redis: &Redis) -> String {
    redis.key(&["contacts", "membership"])
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
    let mut pipe = redis::pipe();
    for (_, payload) in &rows {
        pipe.cmd("XADD")
            .arg(key)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_MAX_LEN)
            .arg("*")
            .arg("p")
            .arg(payload.as_slice())
            .ignore();
    }
    redis
        .pipeline::<()>(&pipe)
        .await
        .map_err(|e| Error::Unavailable(format!("redis: {e}")))?;
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
