//! Forgets idempotency records once no retry can still carry them: applied
//! webhook event ids (LINE redelivers within hours; hibiki keeps them
//! `HIBIKI_DEDUPE_RETENTION_HOURS`, default 7 days, never less than 24 h) and
//! mutation results by idempotency key (the same window). Deletes in small
//! batches so the purge never holds long locks.

use std::time::Duration;

use hibiki_runtime::{Migrated, Shutdown};
use sqlx::PgPool;

use crate::error::Result;

/// Rows deleted per statement.
const BATCH: i64 = 10_000;

/// Deletes idempotency records older than `keep`; returns how many.
pub async fn purge(pool: &PgPool, keep: Duration) -> Result<u64> {
    let seconds = keep.as_secs_f64();
    let mut total = 0;
    for sql in [
        "DELETE FROM applied_events WHERE ctid IN (SELECT ctid FROM applied_events \
         WHERE applied_at < now() - make_interval(secs => $1) LIMIT $2)",
        "DELETE FROM mutation_results WHERE ctid IN (SELECT ctid FROM mutation_results \
         WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)",
    ] {
        loop {
            let deleted = sqlx::query(sql)
                .bind(seconds)
                .bind(BATCH)
                .execute(pool)
                .await?
                .rows_affected();
            total += deleted;
            if deleted < BATCH as u64 {
                break;
            }
        }
    }
    Ok(total)
}

/// Purges once an hour, once `migrated`, until `shutdown`.
pub fn start(pool: PgPool, keep: Duration, migrated: Migrated, shutdown: Shutdown) {
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = migrated.wait() => {}
        }
        loop {
            match purge(&pool, keep).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "idempotency records purged"),
                Err(e) => tracing::warn!(error = %e, "purging idempotency records failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(3600)) => {}
            }
        }
    });
}
