//! Dead letters in PostgreSQL: LINE calls that failed for good, each with
//! LINE's last status and body, every attempt, and the whole call for a
//! replay with the same retry key.

use chrono::{DateTime, Utc};
use hibiki_proto::delivery::v1::{DeadLetter, QueuedCall};
use hibiki_runtime::{page, timestamp};
use prost::Message;
use sqlx::PgPool;

use crate::error::{Error, Result};
use crate::keys;

/// The dead letters of every tenant.
#[derive(Clone)]
pub struct DeadLetters {
    pool: PgPool,
}

/// The key of a call, from which its dead letter's id is derived.
pub fn call_key(call: &QueuedCall) -> String {
    let mut parts: Vec<&str> = call
        .parts
        .iter()
        .map(|p| {
            if p.retry_key.is_empty() {
                p.job_id.as_str()
            } else {
                p.retry_key.as_str()
            }
        })
        .collect();
    parts.sort_unstable();
    format!("{}|{}|{}", call.channel_id, call.kind, parts.join(","))
}

#[derive(sqlx::FromRow)]
struct Row {
    tenant_id: String,
    dead_letter_id: String,
    channel_id: String,
    job_ids: Vec<String>,
    endpoint: String,
    recipients: i64,
    line_status: i32,
    line_body: String,
    call: Vec<u8>,
    dead_at: DateTime<Utc>,
    replay_count: i32,
}

impl Row {
    fn into_proto(self) -> DeadLetter {
        let attempts = QueuedCall::decode(self.call.as_slice())
            .map(|c| c.attempts)
            .unwrap_or_default();
        DeadLetter {
            tenant_id: self.tenant_id,
            dead_letter_id: self.dead_letter_id,
            job_id: self.job_ids.first().cloned().unwrap_or_default(),
            channel_id: self.channel_id,
            endpoint: self.endpoint,
            line_status: self.line_status,
            line_body: self.line_body,
            attempts,
            dead_at: Some(timestamp::to_proto(self.dead_at)),
            replay_count: self.replay_count,
            job_ids: self.job_ids,
            recipients: self.recipients,
        }
    }
}

/// A page of dead letters continues after this (time, id).
fn encode_token(at: DateTime<Utc>, id: &str) -> String {
    page::encode_token(&format!("{}:{id}", at.timestamp_micros()))
}

fn decode_token(token: &str) -> Option<(DateTime<Utc>, String)> {
    let text = page::decode_token(token)?;
    let (micros, id) = text.split_once(':')?;
    Some((
        DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        id.to_owned(),
    ))
}

impl DeadLetters {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Records `call` as dead with LINE's last answer (the same call again
    /// updates its row and lists it again). Returns the dead letter's id.
    pub async fn put(
        &self,
        call: &QueuedCall,
        endpoint: &str,
        status: u16,
        body: &str,
    ) -> Result<String> {
        let id = keys::dead_letter_id(&call_key(call));
        let job_ids: Vec<String> = call.parts.iter().map(|p| p.job_id.clone()).collect();
        let recipients: i64 = call.parts.iter().map(|p| p.user_ids.len() as i64).sum();
        sqlx::query(
            "INSERT INTO dead_letters
                 (tenant_id, dead_letter_id, channel_id, job_ids, endpoint, recipients,
                  line_status, line_body, call, replay_count)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (tenant_id, dead_letter_id) DO UPDATE SET
                 line_status = EXCLUDED.line_status, line_body = EXCLUDED.line_body,
                 call = EXCLUDED.call, dead_at = now(), replayed_at = NULL,
                 replay_count = EXCLUDED.replay_count",
        )
        .bind(&call.tenant_id)
        .bind(&id)
        .bind(&call.channel_id)
        .bind(&job_ids)
        .bind(endpoint)
        .bind(recipients.max(1))
        .bind(i32::from(status))
        .bind(body)
        .bind(call.encode_to_vec())
        .bind(call.replay_count)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// A page of a tenant's dead letters not replayed, newest first.
    pub async fn list(
        &self,
        tenant_id: &str,
        channel_id: Option<&str>,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<DeadLetter>, String)> {
        let size = page::size(page_size);
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode_token(page_token).ok_or_else(|| {
                Error::invalid("page.page_token", "not a token issued by this listing")
            })?)
        };
        let (after_at, after_id) = match &after {
            Some((at, id)) => (Some(*at), id.as_str()),
            None => (None, ""),
        };
        let mut rows: Vec<Row> = sqlx::query_as(
            "SELECT tenant_id, dead_letter_id, channel_id, job_ids, endpoint, recipients,
                    line_status, line_body, call, dead_at, replay_count
               FROM dead_letters
              WHERE tenant_id = $1 AND replayed_at IS NULL
                AND ($2::text IS NULL OR channel_id = $2)
                AND ($3::timestamptz IS NULL OR (dead_at, dead_letter_id) < ($3, $4))
              ORDER BY dead_at DESC, dead_letter_id DESC
              LIMIT $5",
        )
        .bind(tenant_id)
        .bind(channel_id)
        .bind(after_at)
        .bind(after_id)
        .bind(size + 1)
        .fetch_all(&self.pool)
        .await?;
        let next = if rows.len() as i64 > size {
            rows.truncate(size as usize);
            rows.last()
                .map(|r| encode_token(r.dead_at, &r.dead_letter_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows.into_iter().map(Row::into_proto).collect(), next))
    }

    /// Replays dead letters: `ids` (every one must exist), or all of the
    /// tenant's (of `channel_id` when given). `requeue` puts each call back
    /// on its queue; a row is marked replayed only once that succeeded, in
    /// one transaction holding the rows, so two replays never both take one.
    pub async fn replay<F, Fut>(
        &self,
        tenant_id: &str,
        ids: &[String],
        channel_id: Option<&str>,
        mut requeue: F,
    ) -> Result<i64>
    where
        F: FnMut(QueuedCall) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(String, Vec<u8>)> = if ids.is_empty() {
            sqlx::query_as(
                "SELECT dead_letter_id, call FROM dead_letters
                  WHERE tenant_id = $1 AND replayed_at IS NULL
                    AND ($2::text IS NULL OR channel_id = $2)
                  ORDER BY dead_at FOR UPDATE",
            )
            .bind(tenant_id)
            .bind(channel_id)
            .fetch_all(&mut *tx)
            .await?
        } else {
            let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
                "SELECT dead_letter_id, call FROM dead_letters
                  WHERE tenant_id = $1 AND dead_letter_id = ANY($2) AND replayed_at IS NULL
                  ORDER BY dead_at FOR UPDATE",
            )
            .bind(tenant_id)
            .bind(ids)
            .fetch_all(&mut *tx)
            .await?;
            if let Some(missing) = ids.iter().find(|id| !rows.iter().any(|(r, _)| r == *id)) {
                return Err(Error::NotFound(format!(
                    "dead letter {missing:?} of tenant {tenant_id:?} (or it was replayed already)"
                )));
            }
            rows
        };
        let mut replayed = 0;
        for (id, bytes) in &rows {
            let mut call = QueuedCall::decode(bytes.as_slice())
                .map_err(|e| Error::Internal(format!("dead letter {id}: {e}")))?;
            call.attempts.clear();
            call.replay_count += 1;
            requeue(call).await?;
            sqlx::query(
                "UPDATE dead_letters SET replayed_at = now(), replay_count = replay_count + 1
                  WHERE tenant_id = $1 AND dead_letter_id = $2",
            )
            .bind(tenant_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            replayed += 1;
        }
        tx.commit().await?;
        Ok(replayed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip() {
        let at = DateTime::from_timestamp_micros(1_767_000_000_123_456).unwrap();
        let token = encode_token(at, "dl-abc");
        assert_eq!(decode_token(&token), Some((at, "dl-abc".to_owned())));
        assert_eq!(decode_token("zz"), None);
        assert_eq!(decode_token("abc"), None);
    }
}
