//! Folding records into counters, idempotently: each batch is one
//! statement that remembers the records' ids (`folded`) and counts only
//! those it had not seen, so a replayed record never counts twice and a
//! crash between folding and acknowledging changes nothing.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use hibiki_proto::common::v1::InboundEvent;
use hibiki_proto::contacts::v1::MembershipChangeRecord;
use hibiki_proto::delivery::v1::{DeliveryOutcome, DeliveryOutcomeRecord};
use hibiki_runtime::error::ServiceError;
use hibiki_runtime::timestamp;
use sqlx::PgPool;

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

/// The counters in PostgreSQL.
#[derive(Clone)]
pub struct Fold {
    pool: PgPool,
}

/// Keeps the first record of each id: a batch may hold one twice.
fn first_of_each<T>(items: Vec<T>, id: impl Fn(&T) -> (String, String)) -> Vec<T> {
    let mut seen = HashSet::new();
    items.into_iter().filter(|i| seen.insert(id(i))).collect()
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
        records: Vec<MembershipChangeRecord>,
    ) -> Result<Vec<SegmentCount>> {
        let records = first_of_each(records, |r| (r.tenant_id.clone(), r.change_id.clone()));
        let mut changed = Vec::new();
        let mut run: Vec<&MembershipChangeRecord> = Vec::new();
        for r in &records {
            if r.snapshot.is_some() {
                changed.extend(self.deltas(&run).await?);
                run.clear();
                changed.extend(self.snapshot(r).await?);
            } else if r.change.is_some() || r.bulk.is_some() {
                run.push(r);
            }
        }
        changed.extend(self.deltas(&run).await?);
        Ok(changed)
    }

    async fn deltas(&self, records: &[&MembershipChangeRecord]) -> Result<Vec<SegmentCount>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut tenants = Vec::with_capacity(records.len());
        let mut ids = Vec::with_capacity(records.len());
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
            ids.push(r.change_id.as_str());
            segments.push(segment);
            deltas.push(delta);
            at.push(committed_at(r));
        }
        Ok(sqlx::query_as(
            "WITH input AS (
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[],
                                    $5::timestamptz[]) AS t(tenant_id, id, segment_id, delta, at)),
             fresh AS (
               INSERT INTO folded (tenant_id, source, id)
               SELECT tenant_id, 'membership', id FROM input
               ON CONFLICT DO NOTHING RETURNING tenant_id, id),
             counted AS (
               SELECT i.tenant_id, i.segment_id, sum(i.delta) AS delta, max(i.at) AS at
                 FROM input i JOIN fresh f ON f.tenant_id = i.tenant_id AND f.id = i.id
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
        .bind(&ids)
        .bind(&segments)
        .bind(&deltas)
        .bind(&at)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn snapshot(&self, r: &MembershipChangeRecord) -> Result<Option<SegmentCount>> {
        let s = r.snapshot.as_ref().expect("a snapshot");
        Ok(sqlx::query_as(
            "WITH fresh AS (
               INSERT INTO folded (tenant_id, source, id) VALUES ($1, 'membership', $2)
               ON CONFLICT DO NOTHING RETURNING tenant_id),
             up AS (
               INSERT INTO segment_counts AS s (tenant_id, segment_id, member_count, as_of,
                                                deleted)
               SELECT $1, $3, $4, $5, $6 FROM fresh
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
        .bind(&r.change_id)
        .bind(&s.segment_id)
        .bind(if s.deleted { 0 } else { s.member_count })
        .bind(committed_at(r))
        .bind(s.deleted)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Folds inbound events into per-minute counts by type.
    pub async fn events(&self, events: Vec<InboundEvent>) -> Result<u64> {
        let events = first_of_each(events, |e| {
            (e.tenant_id.clone(), e.webhook_event_id.clone())
        });
        let events: Vec<&InboundEvent> = events
            .iter()
            .filter(|e| !e.tenant_id.is_empty() && !e.webhook_event_id.is_empty())
            .collect();
        if events.is_empty() {
            return Ok(0);
        }
        let tenants: Vec<&str> = events.iter().map(|e| e.tenant_id.as_str()).collect();
        let ids: Vec<&str> = events.iter().map(|e| e.webhook_event_id.as_str()).collect();
        let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
        let at: Vec<DateTime<Utc>> = events
            .iter()
            .map(|e| timestamp::from_millis(e.timestamp_ms).unwrap_or_else(Utc::now))
            .collect();
        let counted = sqlx::query(
            "WITH input AS (
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
                 AS t(tenant_id, id, event_type, at)),
             fresh AS (
               INSERT INTO folded (tenant_id, source, id)
               SELECT tenant_id, 'event', id FROM input
               ON CONFLICT DO NOTHING RETURNING tenant_id, id)
             INSERT INTO event_minutes AS m (tenant_id, minute, event_type, count)
             SELECT i.tenant_id, date_trunc('minute', i.at), i.event_type, count(*)
               FROM input i JOIN fresh f ON f.tenant_id = i.tenant_id AND f.id = i.id
              GROUP BY 1, 2, 3
             ON CONFLICT (tenant_id, minute, event_type)
                DO UPDATE SET count = m.count + excluded.count",
        )
        .bind(&tenants)
        .bind(&ids)
        .bind(&types)
        .bind(&at)
        .execute(&self.pool)
        .await?;
        Ok(counted.rows_affected())
    }

    /// Folds delivery outcomes into per-minute counts by channel and
    /// endpoint.
    pub async fn outcomes(&self, records: Vec<DeliveryOutcomeRecord>) -> Result<u64> {
        let records = first_of_each(records, |r| (r.tenant_id.clone(), r.outcome_id.clone()));
        let records: Vec<&DeliveryOutcomeRecord> = records
            .iter()
            .filter(|r| !r.tenant_id.is_empty() && !r.outcome_id.is_empty())
            .collect();
        if records.is_empty() {
            return Ok(0);
        }
        let tenants: Vec<&str> = records.iter().map(|r| r.tenant_id.as_str()).collect();
        let ids: Vec<&str> = records.iter().map(|r| r.outcome_id.as_str()).collect();
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
        let counted = sqlx::query(
            "WITH input AS (
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[],
                                    $6::bigint[], $7::timestamptz[])
                 AS t(tenant_id, id, channel_id, endpoint, outcome, recipients, at)),
             fresh AS (
               INSERT INTO folded (tenant_id, source, id)
               SELECT tenant_id, 'delivery', id FROM input
               ON CONFLICT DO NOTHING RETURNING tenant_id, id)
             INSERT INTO delivery_minutes AS m (tenant_id, minute, channel_id, endpoint, accepted,
                                                already_accepted, retrying, dead_lettered,
                                                recipients)
             SELECT i.tenant_id, date_trunc('minute', i.at), i.channel_id, i.endpoint,
                    count(*) FILTER (WHERE outcome = $8),
                    count(*) FILTER (WHERE outcome = $9),
                    count(*) FILTER (WHERE outcome = $10),
                    count(*) FILTER (WHERE outcome = $11),
                    COALESCE(sum(recipients) FILTER (WHERE outcome IN ($8, $9)), 0)
               FROM input i JOIN fresh f ON f.tenant_id = i.tenant_id AND f.id = i.id
              GROUP BY 1, 2, 3, 4
             ON CONFLICT (tenant_id, minute, channel_id, endpoint) DO UPDATE
                SET accepted = m.accepted + excluded.accepted,
                    already_accepted = m.already_accepted + excluded.already_accepted,
                    retrying = m.retrying + excluded.retrying,
                    dead_lettered = m.dead_lettered + excluded.dead_lettered,
                    recipients = m.recipients + excluded.recipients",
        )
        .bind(&tenants)
        .bind(&ids)
        .bind(&channels)
        .bind(&endpoints)
        .bind(&outcomes)
        .bind(&recipients)
        .bind(&at)
        .bind(DeliveryOutcome::Accepted as i32)
        .bind(DeliveryOutcome::AlreadyAccepted as i32)
        .bind(DeliveryOutcome::Retrying as i32)
        .bind(DeliveryOutcome::DeadLettered as i32)
        .execute(&self.pool)
        .await?;
        Ok(counted.rows_affected())
    }

    /// Forgets folded ids and rollups past their keeping: ids after 8 days
    /// (no stream holds a record that long), rollups after `keep`.
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

fn committed_at(r: &MembershipChangeRecord) -> DateTime<Utc> {
    r.committed_at
        .as_ref()
        .and_then(timestamp::from_proto)
        .unwrap_or_else(Utc::now)
}
