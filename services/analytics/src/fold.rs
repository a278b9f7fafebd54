//! Folding records into counters, exactly once: each batch is one
//! transaction that locks the position of every stream it read from (the
//! id of the last entry folded), folds only the entries after it, and moves
//! it on. A replayed entry (a crash between folding and acknowledging, a
//! lease handed to another replica) is at or before the position and
//! counts nothing. The producers put each record on its stream once:
//! contacts' relay skips what it published before, the gateway appends a
//! webhook event once, delivery publishes each call's outcome once (best
//! effort: a crash may lose one).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hibiki_proto::common::v1::InboundEvent;
use hibiki_proto::contacts::v1::MembershipChangeRecord;
use hibiki_proto::delivery::v1::{DeliveryOutcome, DeliveryOutcomeRecord};
use hibiki_runtime::error::ServiceError;
use hibiki_runtime::timestamp;
use sqlx::{PgConnection, PgPool};

/// Result of a fold.
pub type Result<T> = std::result::Result<T, ServiceError>;

/// A segment's count after a fold.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SegmentCount {
    pub tenant_id: String,
    pub segment_id: String,
    pub member_count: i64,
    pub as_of: DateTime<Utc>,
    pub deleted: bool,
    pub version: i64,
}

/// A record as read: the stream (its Redis key) and the entry's position in
/// it ([`hibiki_runtime::redis::streams::position`]).
#[derive(Debug, Clone)]
pub struct Read<T> {
    pub stream: String,
    pub at: (i64, i64),
    pub record: T,
}

/// A position not yet stored: nothing folded from the stream.
const NONE_YET: (i64, i64) = (-1, -1);

/// The counters in PostgreSQL.
#[derive(Clone)]
pub struct Fold {
    pool: PgPool,
}

impl Fold {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Folds membership records in stream order: changes (+1, -1) and bulk
    /// deltas as deltas, which commute, so the count equals contacts'
    /// whatever order they come in; a snapshot (a deletion) sets the count
    /// whole. Returns the counts that changed.
    pub async fn memberships(
        &self,
        reads: Vec<Read<MembershipChangeRecord>>,
    ) -> Result<Vec<SegmentCount>> {
        let mut tx = self.pool.begin().await?;
        let (records, moved) = fresh(&mut tx, reads, "membership", |r| {
            (&r.tenant_id, &r.change_id)
        })
        .await?;
        let mut changed = Vec::new();
        let mut run: Vec<&MembershipChangeRecord> = Vec::new();
        for r in &records {
            if r.snapshot.is_some() {
                changed.extend(deltas(&mut tx, &run).await?);
                run.clear();
                changed.extend(snapshot(&mut tx, r).await?);
            } else if r.change.is_some() || r.bulk.is_some() {
                run.push(r);
            }
        }
        changed.extend(deltas(&mut tx, &run).await?);
        moved.store(&mut tx).await?;
        tx.commit().await?;
        Ok(changed)
    }

    /// Folds inbound events into per-minute counts by type.
    pub async fn events(&self, reads: Vec<Read<InboundEvent>>) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let (events, moved) = fresh(&mut tx, reads, "event", |e| {
            (&e.tenant_id, &e.webhook_event_id)
        })
        .await?;
        let events: Vec<&InboundEvent> =
            events.iter().filter(|e| !e.tenant_id.is_empty()).collect();
        let mut counted = 0;
        if !events.is_empty() {
            let tenants: Vec<&str> = events.iter().map(|e| e.tenant_id.as_str()).collect();
            let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
            let at: Vec<DateTime<Utc>> = events
                .iter()
                .map(|e| timestamp::from_millis(e.timestamp_ms).unwrap_or_else(Utc::now))
                .collect();
            sqlx::query(
                "INSERT INTO event_minutes AS m (tenant_id, minute, event_type, count)
                 SELECT tenant_id, date_trunc('minute', at), event_type, count(*)
                   FROM unnest($1::text[], $2::text[], $3::timestamptz[])
                        AS t(tenant_id, event_type, at)
                  GROUP BY 1, 2, 3
                 ON CONFLICT (tenant_id, minute, event_type)
                    DO UPDATE SET count = m.count + excluded.count",
            )
            .bind(&tenants)
            .bind(&types)
            .bind(&at)
            .execute(&mut *tx)
            .await?;
            counted = events.len() as u64;
        }
        moved.store(&mut tx).await?;
        tx.commit().await?;
        Ok(counted)
    }

    /// Folds delivery outcomes into per-minute counts by channel and
    /// endpoint.
    pub async fn outcomes(&self, reads: Vec<Read<DeliveryOutcomeRecord>>) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let (records, moved) = fresh(&mut tx, reads, "delivery", |r| {
            (&r.tenant_id, &r.outcome_id)
        })
        .await?;
        let records: Vec<&DeliveryOutcomeRecord> =
            records.iter().filter(|r| !r.tenant_id.is_empty()).collect();
        let mut counted = 0;
        if !records.is_empty() {
            let tenants: Vec<&str> = records.iter().map(|r| r.tenant_id.as_str()).collect();
            let channels: Vec<&str> = records.iter().map(|r| r.channel_id.as_str()).collect();
            let endpoints: Vec<&str> = records.iter().map(|r| r.endpoint.as_str()).collect();
            let outcomes: Vec<i32> = records.iter().map(|r| r.outcome).collect();
            let recipients: Vec<i64> = records.iter().map(|r| r.recipients).collect();
            let at: Vec<DateTime<Utc>> = records
                .iter()
                .map(|r| {
                    r.at.as_ref()
                        .and_then(timestamp::from_proto)
                        .unwrap_or_else(Utc::now)
                })
                .collect();
            sqlx::query(
                "INSERT INTO delivery_minutes AS m (tenant_id, minute, channel_id, endpoint,
                                                   accepted, already_accepted, retrying,
                                                   dead_lettered, recipients)
                 SELECT tenant_id, date_trunc('minute', at), channel_id, endpoint,
                        count(*) FILTER (WHERE outcome = $7),
                        count(*) FILTER (WHERE outcome = $8),
                        count(*) FILTER (WHERE outcome = $9),
                        count(*) FILTER (WHERE outcome = $10),
                        COALESCE(sum(recipients) FILTER (WHERE outcome IN ($7, $8)), 0)
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[],
                               $6::timestamptz[])
                        AS t(tenant_id, channel_id, endpoint, outcome, recipients, at)
                  GROUP BY 1, 2, 3, 4
                 ON CONFLICT (tenant_id, minute, channel_id, endpoint) DO UPDATE
                    SET accepted = m.accepted + excluded.accepted,
                        already_accepted = m.already_accepted + excluded.already_accepted,
                        retrying = m.retrying + excluded.retrying,
                        dead_lettered = m.dead_lettered + excluded.dead_lettered,
                        recipients = m.recipients + excluded.recipients",
            )
            .bind(&tenants)
            .bind(&channels)
            .bind(&endpoints)
            .bind(&outcomes)
            .bind(&recipients)
            .bind(&at)
            .bind(DeliveryOutcome::Accepted as i32)
            .bind(DeliveryOutcome::AlreadyAccepted as i32)
            .bind(DeliveryOutcome::Retrying as i32)
            .bind(DeliveryOutcome::DeadLettered as i32)
            .execute(&mut *tx)
            .await?;
            counted = records.len() as u64;
        }
        moved.store(&mut tx).await?;
        tx.commit().await?;
        Ok(counted)
    }

    /// Forgets old rollups (after `keep`) and what remains of `folded`, the
    /// ids counted before stream positions (after 8 days).
    pub async fn expire(&self, keep: chrono::Duration) -> Result<()> {
        sqlx::query("DELETE FROM folded WHERE folded_at < now() - interval '8 days'")
            .execute(&self.pool)
            .await?;
        let before = Utc::now() - keep;
        for table in ["segment_minutes", "event_minutes", "delivery_minutes"] {
            let sql = format!("DELETE FROM {table} WHERE minute < $1");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(before)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }
}

/// The streams' positions a fold moves, written with its counters.
struct Moved(HashMap<String, (i64, i64)>);

impl Moved {
    async fn store(self, tx: &mut PgConnection) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut streams = Vec::with_capacity(self.0.len());
        let mut ms = Vec::with_capacity(self.0.len());
        let mut seq = Vec::with_capacity(self.0.len());
        for (stream, (m, s)) in self.0 {
            streams.push(stream);
            ms.push(m);
            seq.push(s);
        }
        sqlx::query(
            "UPDATE stream_positions p SET ms = u.ms, seq = u.seq, updated_at = now()
               FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(stream, ms, seq)
              WHERE p.stream = u.stream",
        )
        .bind(&streams)
        .bind(&ms)
        .bind(&seq)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Locks the positions of the streams `reads` come from (in the caller's
/// transaction, so a replica folding the same entries waits, then sees
/// them folded) and keeps the records after them, in the order read.
/// Returns those and the positions they move the streams to.
///
/// A stream's first fold also skips the records `folded` names: the ids
/// counted before positions were kept (`source` and `id` as written then).
async fn fresh<T>(
    tx: &mut PgConnection,
    reads: Vec<Read<T>>,
    source: &str,
    id: impl Fn(&T) -> (&String, &String),
) -> Result<(Vec<T>, Moved)> {
    let mut streams: Vec<&str> = reads.iter().map(|r| r.stream.as_str()).collect();
    streams.sort_unstable();
    streams.dedup();
    if streams.is_empty() {
        return Ok((Vec::new(), Moved(HashMap::new())));
    }
    sqlx::query(
        "INSERT INTO stream_positions (stream, ms, seq)
         SELECT s, $2, $3 FROM unnest($1::text[]) AS s ON CONFLICT DO NOTHING",
    )
    .bind(&streams)
    .bind(NONE_YET.0)
    .bind(NONE_YET.1)
    .execute(&mut *tx)
    .await?;
    // In key order, so two folds over the same streams cannot deadlock.
    let stored: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT stream, ms, seq FROM stream_positions WHERE stream = ANY($1)
          ORDER BY stream FOR UPDATE",
    )
    .bind(&streams)
    .fetch_all(&mut *tx)
    .await?;
    let stored: HashMap<String, (i64, i64)> = stored
        .into_iter()
        .map(|(s, ms, seq)| (s, (ms, seq)))
        .collect();
    let mut at = stored.clone();
    let mut kept = Vec::with_capacity(reads.len());
    let mut first_folds = false;
    for read in reads {
        let Some(position) = at.get_mut(&read.stream) else {
            continue;
        };
        if read.at > *position {
            *position = read.at;
            first_folds |= stored.get(&read.stream) == Some(&NONE_YET);
            kept.push((read.stream, read.record));
        }
    }
    let moved = Moved(
        at.into_iter()
            .filter(|(s, p)| stored.get(s) != Some(p))
            .collect(),
    );
    if first_folds {
        let fresh_streams: Vec<&String> = stored
            .iter()
            .filter(|(_, p)| **p == NONE_YET)
            .map(|(s, _)| s)
            .collect();
        let (tenants, ids): (Vec<&str>, Vec<&str>) = kept
            .iter()
            .filter(|(s, _)| fresh_streams.contains(&s))
            .map(|(_, r)| {
                let (t, i) = id(r);
                (t.as_str(), i.as_str())
            })
            .unzip();
        let counted: Vec<(String, String)> = sqlx::query_as(
            "SELECT f.tenant_id, f.id FROM folded f
               JOIN unnest($1::text[], $2::text[]) AS t(tenant_id, id)
                 ON f.tenant_id = t.tenant_id AND f.source = $3 AND f.id = t.id",
        )
        .bind(&tenants)
        .bind(&ids)
        .bind(source)
        .fetch_all(&mut *tx)
        .await?;
        if !counted.is_empty() {
            kept.retain(|(s, r)| {
                let (t, i) = id(r);
                !(fresh_streams.contains(&s) && counted.iter().any(|(ct, ci)| ct == t && ci == i))
            });
        }
    }
    Ok((kept.into_iter().map(|(_, r)| r).collect(), moved))
}

async fn deltas(
    tx: &mut PgConnection,
    records: &[&MembershipChangeRecord],
) -> Result<Vec<SegmentCount>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let mut tenants = Vec::with_capacity(records.len());
    let mut segments = Vec::with_capacity(records.len());
    let mut deltas = Vec::with_capacity(records.len());
    let mut at = Vec::with_capacity(records.len());
    for r in records {
        let (segment, delta) = match (&r.change, &r.bulk) {
            (Some(c), _) => (c.segment_id.as_str(), if c.entered { 1i64 } else { -1 }),
            (None, Some(b)) => (b.segment_id.as_str(), b.delta),
            (None, None) => continue,
        };
        tenants.push(r.tenant_id.as_str());
        segments.push(segment);
        deltas.push(delta);
        at.push(committed_at(r));
    }
    Ok(sqlx::query_as(
        "WITH counted AS (
               SELECT tenant_id, segment_id, sum(delta) AS delta, max(at) AS at
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[])
                      AS t(tenant_id, segment_id, delta, at)
                GROUP BY 1, 2),
             up AS (
               INSERT INTO segment_counts AS s (tenant_id, segment_id, member_count, as_of)
               SELECT tenant_id, segment_id, delta, at FROM counted
               ON CONFLICT (tenant_id, segment_id) DO UPDATE
                  SET member_count = s.member_count + excluded.member_count,
                      as_of = greatest(s.as_of, excluded.as_of),
                      deleted = false,
                      version = nextval('segment_counts_version')
               RETURNING tenant_id, segment_id, member_count, as_of, deleted, version),
             minutes AS (
               INSERT INTO segment_minutes AS m (tenant_id, segment_id, minute, member_count)
               SELECT tenant_id, segment_id, date_trunc('minute', as_of), member_count FROM up
               ON CONFLICT (tenant_id, segment_id, minute)
                  DO UPDATE SET member_count = excluded.member_count)
             SELECT * FROM up",
    )
    .bind(&tenants)
    .bind(&segments)
    .bind(&deltas)
    .bind(&at)
    .fetch_all(&mut *tx)
    .await?)
}

async fn snapshot(
    tx: &mut PgConnection,
    r: &MembershipChangeRecord,
) -> Result<Option<SegmentCount>> {
    let s = r.snapshot.as_ref().expect("a snapshot");
    Ok(sqlx::query_as(
        "WITH up AS (
               INSERT INTO segment_counts AS s (tenant_id, segment_id, member_count, as_of,
                                                deleted)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (tenant_id, segment_id) DO UPDATE
                  SET member_count = excluded.member_count, as_of = excluded.as_of,
                      deleted = excluded.deleted,
                      version = nextval('segment_counts_version')
               RETURNING tenant_id, segment_id, member_count, as_of, deleted, version),
             minutes AS (
               INSERT INTO segment_minutes AS m (tenant_id, segment_id, minute, member_count)
               SELECT tenant_id, segment_id, date_trunc('minute', as_of), member_count FROM up
               ON CONFLICT (tenant_id, segment_id, minute)
                  DO UPDATE SET member_count = excluded.member_count)
             SELECT * FROM up",
    )
    .bind(&r.tenant_id)
    .bind(&s.segment_id)
    .bind(if s.deleted { 0 } else { s.member_count })
    .bind(committed_at(r))
    .bind(s.deleted)
    .fetch_optional(&mut *tx)
    .await?)
}

fn committed_at(r: &MembershipChangeRecord) -> DateTime<Utc> {
    r.committed_at
        .as_ref()
        .and_then(timestamp::from_proto)
        .unwrap_or_else(Utc::now)
}
