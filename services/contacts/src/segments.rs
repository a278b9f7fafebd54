//! `SegmentService`, and the worker that computes a segment's members
//! set-wise in SQL after it is created or its rule changes.
//!
//! A new or changed segment is stored as COMPUTING and the worker is woken.
//! The worker sweeps one COMPUTING segment at a time (a session advisory
//! lock on the segment's number, so replicas share the work and a crashed
//! sweep is taken over): it walks the tenant's contacts in `line_user_id`
//! order, a batch per transaction, and with one `UPDATE` puts into or takes
//! out of the segment every contact of the batch whose membership differs
//! from the rule's SQL predicate, recording the net change as a count
//! delta. Each batch holds only its own contacts' row locks and a
//! `FOR KEY SHARE` lock on the segment, so realtime mutations and the bulk
//! import go on meanwhile; they evaluate COMPUTING segments themselves, so
//! every membership flip is counted exactly once. A rule change during a
//! sweep starts it again. When the sweep reaches the end with the rule it
//! started with, the segment is READY. Create and update wait up to two
//! seconds for this, so small segments come back READY.
//!
//! The same worker folds count deltas into `member_count` every second and
//! publishes, per segment, the sum of the deltas that had no membership
//! record of their own (an import's, a computation's) as one bulk delta.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hibiki_proto::common::v1::PageResponse;
use hibiki_proto::contacts::v1::segment_service_server::SegmentService;
use hibiki_proto::contacts::v1::{
    CreateSegmentRequest, DeleteSegmentRequest, DeleteSegmentResponse, GetSegmentCountsRequest,
    GetSegmentCountsResponse, GetSegmentRequest, ListSegmentMembersRequest,
    ListSegmentMembersResponse, ListSegmentsRequest, ListSegmentsResponse, MembershipChangeRecord,
    Segment, SegmentCount, SegmentDelta, SegmentRule, SegmentSnapshot, SegmentStatus,
    UpdateSegmentRequest,
};
use hibiki_runtime::postgres::QueueVacuum;
use hibiki_runtime::timestamp::to_proto;
use hibiki_runtime::{Caller, Migrated, Shutdown};
use prost::Message;
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result, is_unique_violation};
use crate::page::Page;
use crate::rules::{Rule, SqlParams};
use crate::store::{COUNT_SQL, decode_rule};
use crate::tenants::require_tenant;
use crate::validate;

/// How long create and update wait for a computation before answering
/// COMPUTING.
const WAIT_FOR_READY: Duration = Duration::from_secs(2);

const COMPUTING: i16 = SegmentStatus::Computing as i16;
const READY: i16 = SegmentStatus::Ready as i16;

#[derive(sqlx::FromRow)]
struct SegmentRow {
    tenant_id: String,
    segment_id: String,
    name: String,
    description: String,
    rule: Vec<u8>,
    status: i16,
    member_count: i64,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// `SELECT`s segment rows (`segments s`) with their current counts.
fn select_segments(rest: &str) -> String {
    format!(
        "SELECT s.tenant_id, s.segment_id, s.name, s.description, s.rule, s.status, \
           {COUNT_SQL} AS member_count, s.version, s.created_at, s.updated_at \
         FROM segments s {rest}"
    )
}

impl SegmentRow {
    fn to_proto(&self) -> Segment {
        Segment {
            tenant_id: self.tenant_id.clone(),
            segment_id: self.segment_id.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            rule: SegmentRule::decode(self.rule.as_slice()).ok(),
            status: i32::from(self.status),
            member_count: self.member_count,
            version: self.version,
            created_at: Some(to_proto(self.created_at)),
            updated_at: Some(to_proto(self.updated_at)),
        }
    }
}

/// The segment's number (what contacts' `segs` hold); NOT_FOUND unless the
/// segment exists.
pub async fn segment_no(pool: &PgPool, tenant: &str, segment: &str) -> Result<i32> {
    sqlx::query_scalar("SELECT no FROM segments WHERE tenant_id = $1 AND segment_id = $2")
        .bind(tenant)
        .bind(segment)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| not_found(tenant, segment))
}

fn not_found(tenant: &str, segment: &str) -> Error {
    Error::NotFound(format!(
        "segment {segment:?} does not exist in tenant {tenant:?}"
    ))
}

fn new_segment_id() -> String {
    let bytes: [u8; 8] = rand::rng().random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("seg_{hex}")
}

fn check_name(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::invalid("name", "is required"));
    }
    validate::display_name("name", name, 128)
}

/// Implements `hibiki.contacts.v1.SegmentService`.
#[derive(Clone)]
pub struct Segments {
    pool: PgPool,
    computer: Computer,
}

impl Segments {
    /// The service over `pool`, waking `computer` for new rules.
    pub fn new(pool: PgPool, computer: Computer) -> Self {
        Self { pool, computer }
    }

    async fn fetch(&self, tenant: &str, segment: &str) -> Result<SegmentRow> {
        let sql = select_segments("WHERE s.tenant_id = $1 AND s.segment_id = $2");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant)
            .bind(segment)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| not_found(tenant, segment))
    }

    /// Wakes the computer and waits (briefly) for the segment to be READY.
    async fn computed(&self, tenant: &str, segment: &str) -> Result<SegmentRow> {
        self.computer.wake();
        let deadline = tokio::time::Instant::now() + WAIT_FOR_READY;
        loop {
            let row = self.fetch(tenant, segment).await?;
            if row.status == READY || tokio::time::Instant::now() >= deadline {
                return Ok(row);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tonic::async_trait]
impl SegmentService for Segments {
    #[tracing::instrument(name = "contacts.create_segment", skip_all, fields(tenant_id = %request.get_ref().tenant_id))]
    async fn create_segment(
        &self,
        request: Request<CreateSegmentRequest>,
    ) -> Result<Response<Segment>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        validate::tenant_id("tenant_id", &r.tenant_id)?;
        caller.authorize_tenant(&r.tenant_id)?;
        check_name(&r.name)?;
        validate::display_name("description", &r.description, 1000)?;
        let rule = Rule::parse(r.rule.as_ref(), "rule")?;
        let refs = rule.refs();
        require_tenant(&self.pool, &r.tenant_id).await?;
        let segment_id = new_segment_id();
        sqlx::query(
            "INSERT INTO segments (tenant_id, segment_id, name, description, rule, ref_tags, \
               ref_attributes, ref_follow, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&r.tenant_id)
        .bind(&segment_id)
        .bind(&r.name)
        .bind(&r.description)
        .bind(
            r.rule
                .as_ref()
                .map(Message::encode_to_vec)
                .unwrap_or_default(),
        )
        .bind(refs.tags.into_iter().collect::<Vec<_>>())
        .bind(refs.attributes.into_iter().collect::<Vec<_>>())
        .bind(refs.follow)
        .bind(COMPUTING)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::AlreadyExists(format!(
                    "a segment named {:?} exists in tenant {:?}",
                    r.name, r.tenant_id
                ))
            } else {
                e.into()
            }
        })?;
        tracing::info!(segment_id, "segment created");
        Ok(Response::new(
            self.computed(&r.tenant_id, &segment_id).await?.to_proto(),
        ))
    }

    #[tracing::instrument(name = "contacts.update_segment", skip_all, fields(tenant_id = %request.get_ref().tenant_id, segment_id = %request.get_ref().segment_id))]
    async fn update_segment(
        &self,
        request: Request<UpdateSegmentRequest>,
    ) -> Result<Response<Segment>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        if let Some(name) = &r.name {
            check_name(name)?;
        }
        if let Some(d) = &r.description {
            validate::display_name("description", d, 1000)?;
        }
        let rule = match &r.rule {
            Some(proto) => Some((Rule::parse(Some(proto), "rule")?, proto.encode_to_vec())),
            None => None,
        };
        let mut tx = self.pool.begin().await.map_err(Error::from)?;
        let version: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM segments WHERE tenant_id = $1 AND segment_id = $2 FOR UPDATE",
        )
        .bind(&r.tenant_id)
        .bind(&r.segment_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(Error::from)?;
        let version = version.ok_or_else(|| not_found(&r.tenant_id, &r.segment_id))?;
        if r.expected_version != 0 && r.expected_version != version {
            return Err(Error::Aborted(format!(
                "expected_version {} is stale: the segment is at version {version}",
                r.expected_version
            ))
            .into());
        }
        let (bytes, tags, attributes, follow) = match &rule {
            Some((rule, bytes)) => {
                let refs = rule.refs();
                (
                    Some(bytes.clone()),
                    Some(refs.tags.into_iter().collect::<Vec<_>>()),
                    Some(refs.attributes.into_iter().collect::<Vec<_>>()),
                    Some(refs.follow),
                )
            }
            None => (None, None, None, None),
        };
        sqlx::query(
            "UPDATE segments SET name = COALESCE($3, name), description = COALESCE($4, description), \
               rule = COALESCE($5, rule), ref_tags = COALESCE($6, ref_tags), \
               ref_attributes = COALESCE($7, ref_attributes), ref_follow = COALESCE($8, ref_follow), \
               status = CASE WHEN $5 IS NULL THEN status ELSE $9 END, \
               version = version + 1, updated_at = now() \
             WHERE tenant_id = $1 AND segment_id = $2",
        )
        .bind(&r.tenant_id)
        .bind(&r.segment_id)
        .bind(&r.name)
        .bind(&r.description)
        .bind(bytes)
        .bind(tags)
        .bind(attributes)
        .bind(follow)
        .bind(COMPUTING)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::AlreadyExists(format!("a segment named {:?} exists", r.name.clone().unwrap_or_default()))
            } else {
                e.into()
            }
        })?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(
            self.computed(&r.tenant_id, &r.segment_id).await?.to_proto(),
        ))
    }

    #[tracing::instrument(name = "contacts.delete_segment", skip_all, fields(tenant_id = %request.get_ref().tenant_id, segment_id = %request.get_ref().segment_id))]
    async fn delete_segment(
        &self,
        request: Request<DeleteSegmentRequest>,
    ) -> Result<Response<DeleteSegmentResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        let mut tx = self.pool.begin().await.map_err(Error::from)?;
        let deleted = sqlx::query("DELETE FROM segments WHERE tenant_id = $1 AND segment_id = $2")
            .bind(&r.tenant_id)
            .bind(&r.segment_id)
            .execute(&mut *tx)
            .await
            .map_err(Error::from)?
            .rows_affected();
        if deleted == 0 {
            return Err(not_found(&r.tenant_id, &r.segment_id).into());
        }
        // The segment's number lingers in its members' `segs` until each is
        // next rewritten; numbers are never reused, so nothing reads it.
        write_snapshot(&mut tx, &r.tenant_id, &r.segment_id, 0, true).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(DeleteSegmentResponse {}))
    }

    async fn get_segment(
        &self,
        request: Request<GetSegmentRequest>,
    ) -> Result<Response<Segment>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        Ok(Response::new(
            self.fetch(&r.tenant_id, &r.segment_id).await?.to_proto(),
        ))
    }

    async fn list_segments(
        &self,
        request: Request<ListSegmentsRequest>,
    ) -> Result<Response<ListSegmentsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        let page = Page::from_request(r.page.as_ref(), "page")?;
        let sql =
            select_segments("WHERE s.tenant_id = $1 AND s.name > $2 ORDER BY s.name LIMIT $3");
        let rows: Vec<SegmentRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&r.tenant_id)
            .bind(page.after())
            .bind(page.fetch_limit())
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)?;
        let (rows, next) = page.split(rows, |s| s.name.clone());
        Ok(Response::new(ListSegmentsResponse {
            segments: rows.iter().map(SegmentRow::to_proto).collect(),
            page: Some(PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn get_segment_counts(
        &self,
        request: Request<GetSegmentCountsRequest>,
    ) -> Result<Response<GetSegmentCountsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        // The maintained counts: never a COUNT over members.
        let sql = format!(
            "SELECT s.segment_id, {COUNT_SQL}, s.status FROM segments s \
             WHERE s.tenant_id = $1 AND (cardinality($2::text[]) = 0 OR s.segment_id = ANY($2)) \
             ORDER BY s.segment_id"
        );
        let rows: Vec<(String, i64, i16)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&r.tenant_id)
            .bind(&r.segment_ids)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)?;
        if let Some(missing) = r
            .segment_ids
            .iter()
            .find(|id| !rows.iter().any(|(s, _, _)| s == *id))
        {
            return Err(not_found(&r.tenant_id, missing).into());
        }
        Ok(Response::new(GetSegmentCountsResponse {
            counts: rows
                .into_iter()
                .map(|(segment_id, member_count, status)| SegmentCount {
                    segment_id,
                    member_count,
                    status: i32::from(status),
                })
                .collect(),
        }))
    }

    async fn list_segment_members(
        &self,
        request: Request<ListSegmentMembersRequest>,
    ) -> Result<Response<ListSegmentMembersResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        let page = Page::from_request(r.page.as_ref(), "page")?;
        let segment: Option<(i16, i32)> = sqlx::query_as(
            "SELECT status, no FROM segments WHERE tenant_id = $1 AND segment_id = $2",
        )
        .bind(&r.tenant_id)
        .bind(&r.segment_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)?;
        let no = match segment {
            None => return Err(not_found(&r.tenant_id, &r.segment_id).into()),
            Some((COMPUTING, _)) => {
                return Err(Error::FailedPrecondition(format!(
                    "segment {:?} is still computing its members",
                    r.segment_id
                ))
                .into());
            }
            Some((_, no)) => no,
        };
        // In `line_user_id` order along the primary key: paging through a
        // whole segment reads the tenant's contacts once, however sparse
        // the segment is.
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT line_user_id FROM contacts WHERE tenant_id = $1 AND segs @> ARRAY[$2::int] \
             AND line_user_id > $3 ORDER BY line_user_id LIMIT $4",
        )
        .bind(&r.tenant_id)
        .bind(no)
        .bind(page.after())
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)?;
        let (ids, next) = page.split(ids, Clone::clone);
        Ok(Response::new(ListSegmentMembersResponse {
            line_user_ids: ids,
            page: Some(PageResponse {
                next_page_token: next,
            }),
        }))
    }
}

/// Queues a whole-count record for a segment (its deletion).
pub(crate) async fn write_snapshot(
    tx: &mut sqlx::PgConnection,
    tenant: &str,
    segment: &str,
    count: i64,
    deleted: bool,
) -> Result<()> {
    write_record(
        tx,
        tenant,
        Some(SegmentSnapshot {
            segment_id: segment.to_owned(),
            member_count: count,
            deleted,
        }),
        None,
    )
    .await
}

/// Queues a bulk delta record for a segment: members that entered or left
/// without a record each.
pub(crate) async fn write_bulk(
    tx: &mut sqlx::PgConnection,
    tenant: &str,
    segment: &str,
    delta: i64,
) -> Result<()> {
    write_record(
        tx,
        tenant,
        None,
        Some(SegmentDelta {
            segment_id: segment.to_owned(),
            delta,
        }),
    )
    .await
}

async fn write_record(
    tx: &mut sqlx::PgConnection,
    tenant: &str,
    snapshot: Option<SegmentSnapshot>,
    bulk: Option<SegmentDelta>,
) -> Result<()> {
    let id: i64 = sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('outbox', 'id'))")
        .fetch_one(&mut *tx)
        .await?;
    let record = MembershipChangeRecord {
        tenant_id: tenant.to_owned(),
        change: None,
        committed_at: Some(to_proto(Utc::now())),
        change_id: format!("m{id}"),
        trace: Some(hibiki_runtime::telemetry::current_trace_context()),
        snapshot,
        bulk,
    };
    sqlx::query("INSERT INTO outbox (tenant_id, id, payload) VALUES ($1, $2, $3)")
        .bind(tenant)
        .bind(id)
        .bind(record.encode_to_vec())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The background computation of segment members.
#[derive(Clone)]
pub struct Computer {
    wake: std::sync::Arc<Notify>,
}

impl Computer {
    /// Starts the worker on `pool`, once `migrated`, until `shutdown`,
    /// sweeping `batch` contacts per transaction.
    pub fn start(pool: PgPool, batch: i64, migrated: Migrated, shutdown: Shutdown) -> Self {
        let wake = std::sync::Arc::new(Notify::new());
        let notify = wake.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = migrated.wait() => run(pool, batch, notify, shutdown).await,
            }
        });
        Self { wake }
    }

    /// Asks the worker to look for segments to compute now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

async fn run(pool: PgPool, batch: i64, wake: std::sync::Arc<Notify>, shutdown: Shutdown) {
    loop {
        loop {
            match compute_one(&pool, batch).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "segment computation failed; retrying");
                    break;
                }
            }
        }
        if let Err(e) = fold_counts(&pool).await {
            tracing::warn!(error = %e, "folding segment counts failed; retrying");
        }
        // Also poll: a computation another replica left unfinished (it
        // crashed) is taken over within a second, and counts fold.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The advisory lock class of segment sweeps (the key is the segment's number).
const SWEEP_LOCK: i32 = 0x6869_6273; // "hibs"

/// Sweeps one COMPUTING segment that no one else is sweeping, if any, in
/// batches of `batch` contacts. Returns whether it found one.
pub async fn compute_one(pool: &PgPool, batch: i64) -> Result<bool> {
    let candidates: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT tenant_id, segment_id, no FROM segments WHERE status = $1 ORDER BY updated_at",
    )
    .bind(COMPUTING)
    .fetch_all(pool)
    .await?;
    if candidates.is_empty() {
        return Ok(false);
    }
    let mut conn = pool.acquire().await?;
    for (tenant, segment, no) in candidates {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(SWEEP_LOCK)
            .bind(no)
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            continue;
        }
        let swept = sweep(&mut conn, &tenant, &segment, no, batch).await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(SWEEP_LOCK)
            .bind(no)
            .execute(&mut *conn)
            .await;
        if swept.is_err() || unlocked.is_err() {
            // Never return a connection that may still hold the lock.
            conn.close_on_drop();
        }
        swept?;
        fold_counts(pool).await?;
        return Ok(true);
    }
    Ok(false)
}

/// Brings every contact's membership of one segment in line with its rule,
/// then marks it READY.
async fn sweep(
    conn: &mut sqlx::PgConnection,
    tenant: &str,
    segment: &str,
    no: i32,
    batch: i64,
) -> Result<()> {
    'restart: loop {
        let started = std::time::Instant::now();
        let Some(version) = sqlx::query_scalar::<_, i64>(
            "SELECT version FROM segments WHERE tenant_id = $1 AND segment_id = $2",
        )
        .bind(tenant)
        .bind(segment)
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(());
        };
        let mut after = String::new();
        let mut members_seen: i64 = 0;
        loop {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            // The rule, held steady for this batch.
            let current: Option<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT version, rule FROM segments WHERE tenant_id = $1 AND segment_id = $2 \
                 FOR KEY SHARE",
            )
            .bind(tenant)
            .bind(segment)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((v, rule)) = current else {
                return Ok(());
            };
            if v != version {
                continue 'restart;
            }
            let rule = decode_rule(segment, &rule)?;
            let upto: Option<String> = sqlx::query_scalar(
                "SELECT line_user_id FROM contacts WHERE tenant_id = $1 AND line_user_id > $2 \
                 ORDER BY line_user_id OFFSET $3 LIMIT 1",
            )
            .bind(tenant)
            .bind(&after)
            .bind(batch - 1)
            .fetch_optional(&mut *tx)
            .await?;
            let mut params = SqlParams::starting_at(5);
            let matches = format!("COALESCE(({}), false)", rule.to_sql(&mut params));
            let sql = format!(
                "UPDATE contacts c SET segs = CASE WHEN {matches} \
                   THEN ARRAY(SELECT DISTINCT n FROM unnest(c.segs || $4::int) AS n ORDER BY n) \
                   ELSE array_remove(c.segs, $4::int) END \
                 WHERE c.tenant_id = $1 AND c.line_user_id > $2 \
                   AND ($3::text IS NULL OR c.line_user_id <= $3) \
                   AND {matches} <> (c.segs @> ARRAY[$4::int]) \
                 RETURNING {matches}"
            );
            let flips: Vec<bool> = params
                .bind(
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(tenant)
                        .bind(&after)
                        .bind(&upto)
                        .bind(no),
                )
                .fetch_all(&mut *tx)
                .await
                .map(|rows| {
                    use sqlx::Row;
                    rows.iter().map(|r| r.get::<bool, _>(0)).collect()
                })?;
            let net: i64 = flips.iter().map(|&e| if e { 1 } else { -1 }).sum();
            if net != 0 {
                sqlx::query(
                    "INSERT INTO segment_count_deltas (tenant_id, segment_id, delta) \
                     VALUES ($1, $2, $3)",
                )
                .bind(tenant)
                .bind(segment)
                .bind(net)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            members_seen += net;
            match upto {
                Some(u) => after = u,
                None => break,
            }
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let sql = format!(
            "UPDATE segments s SET status = $3, computed_version = version, updated_at = now() \
             WHERE s.tenant_id = $1 AND s.segment_id = $2 AND s.version = $4 RETURNING {COUNT_SQL}"
        );
        let count: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(tenant)
            .bind(segment)
            .bind(READY)
            .bind(version)
            .fetch_optional(&mut *tx)
            .await?;
        if count.is_none() {
            continue 'restart;
        }
        // The computation's own changes reach consumers as bulk deltas when
        // they are folded; this one (of 0) tells them the segment exists.
        write_bulk(&mut tx, tenant, segment, 0).await?;
        tx.commit().await?;
        tracing::info!(
            tenant_id = %tenant,
            segment_id = %segment,
            net_change = members_seen,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "segment computed"
        );
        return Ok(());
    }
}

/// The count deltas are vacuumed after this many were folded.
static DELTAS_VACUUM: QueueVacuum = QueueVacuum::new("segment_count_deltas", 20_000);

/// Folds the pending count deltas into `member_count`, one segment per
/// short transaction, and publishes each folded segment's count.
pub async fn fold_counts(pool: &PgPool) -> Result<()> {
    let pending: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT tenant_id, segment_id FROM segment_count_deltas ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    for (tenant, segment) in pending {
        let mut tx = pool.begin().await?;
        let folded: Option<(i64, i64)> = sqlx::query_as(
            "WITH d AS (DELETE FROM segment_count_deltas WHERE tenant_id = $1 AND segment_id = $2 \
                        RETURNING delta, announced) \
             UPDATE segments SET member_count = member_count + (SELECT COALESCE(sum(delta), 0) FROM d) \
             WHERE tenant_id = $1 AND segment_id = $2 \
             RETURNING (SELECT COALESCE(sum(delta) FILTER (WHERE NOT announced), 0) FROM d)::bigint, \
                       (SELECT count(*) FROM d)",
        )
        .bind(&tenant)
        .bind(&segment)
        .fetch_optional(&mut *tx)
        .await?;
        let mut deleted = 0;
        if let Some((silent, rows)) = folded {
            // Changes published one by one are not published again.
            if silent != 0 {
                write_bulk(&mut tx, &tenant, &segment, silent).await?;
            }
            deleted = rows as u64;
        }
        tx.commit().await?;
        DELTAS_VACUUM.deleted(pool, deleted).await?;
    }
    Ok(())
}
