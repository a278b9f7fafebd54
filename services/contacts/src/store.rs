//! The transactional core every contact mutation goes through:
//!
//! 1. lock the contacts (creating missing ones), always in `line_user_id`
//!    order so concurrent batches cannot deadlock;
//! 2. change them in Rust and write them back in one statement;
//! 3. re-evaluate only the segments whose rules read what changed (all of
//!    the tenant's segments for a created or erased contact): lock those
//!    segments `FOR KEY SHARE` (it holds off a rule change, nobody else)
//!    and flip the contact's memberships (the segment numbers in its `segs`,
//!    guarded by the contact's row lock);
//! 4. write the contacts back, memberships included;
//! 5. move each changed segment's count by the net change, as a row of
//!    `segment_count_deltas` (folded into `segments.member_count` every
//!    second), so that writers of a hot segment never queue on its row;
//! 6. write the membership changes to the outbox.
//!
//! All in the caller's transaction: the contact, its memberships, the counts
//! and the outbox commit together or not at all.
//!
//! # Key by key, whatever the statistics say
//!
//! A batch of contacts is found through the primary key, one probe per key,
//! each its own `LATERAL (… LIMIT 1)` subquery (an UPDATE then reaches the
//! row by the `ctid` the probe found; the row is already locked by this
//! transaction). Written as a plain join (`c.line_user_id =
//! u.line_user_id`), PostgreSQL chose by its statistics, and for a tenant
//! they did not know yet (a new tenant, a fresh database, statistics older
//! than the tenant's growth) it read every contact of the tenant per batch:
//! 30,000 of them in the storm bench (2026-12-01), tens of milliseconds a
//! batch. A probe's cost does not depend on statistics.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use hibiki_proto::common::v1::TraceContext;
use hibiki_proto::contacts::v1::{Contact, MembershipChange, MembershipChangeRecord, SegmentRule};
use hibiki_runtime::timestamp::{to_proto, to_proto_opt};
use prost::Message;
use sqlx::{PgConnection, Postgres, Transaction};

use crate::attrs::{self, Attributes};
use crate::error::{Error, Result};
use crate::rules::{ContactState, Rule};

/// One contact row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ContactRow {
    /// Tenant.
    pub tenant_id: String,
    /// LINE user id.
    pub line_user_id: String,
    /// `FollowState` number.
    pub follow_state: i16,
    /// First follow.
    pub first_followed_at: Option<DateTime<Utc>>,
    /// Latest follow.
    pub followed_at: Option<DateTime<Utc>>,
    /// Latest block.
    pub blocked_at: Option<DateTime<Utc>>,
    /// Re-follows after a block.
    pub refollow_count: i32,
    /// LINE time of the follow / unfollow event that set the state.
    pub follow_event_at: Option<DateTime<Utc>>,
    /// Display name.
    pub display_name: String,
    /// Latest event from the user.
    pub last_seen_at: Option<DateTime<Utc>>,
    /// Tags (kept sorted).
    pub tags: Vec<String>,
    /// Stored attributes.
    pub attributes: serde_json::Value,
    /// Numbers of the segments the contact is in, sorted.
    pub segs: Vec<i32>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// The columns of [`ContactRow`], for `SELECT`s.
pub const CONTACT_COLUMNS: &str = "tenant_id, line_user_id, follow_state, first_followed_at, \
     followed_at, blocked_at, refollow_count, follow_event_at, display_name, last_seen_at, tags, \
     attributes, segs, created_at, updated_at";

impl ContactRow {
    /// What segment rules see of this contact.
    pub fn state(&self) -> ContactState {
        ContactState {
            follow_state: i32::from(self.follow_state),
            tags: self.tags.iter().cloned().collect(),
            attributes: attrs::attributes_from_json(&self.attributes),
        }
    }

    /// The typed attributes.
    pub fn attributes(&self) -> Attributes {
        attrs::attributes_from_json(&self.attributes)
    }

    /// Sets the typed attributes.
    pub fn set_attributes(&mut self, a: &Attributes) {
        self.attributes = attrs::attributes_to_json(a);
    }

    /// The API form.
    pub fn to_proto(&self) -> Contact {
        Contact {
            tenant_id: self.tenant_id.clone(),
            line_user_id: self.line_user_id.clone(),
            follow_state: i32::from(self.follow_state),
            first_followed_at: to_proto_opt(self.first_followed_at),
            followed_at: to_proto_opt(self.followed_at),
            blocked_at: to_proto_opt(self.blocked_at),
            refollow_count: self.refollow_count.max(0) as u32,
            display_name: self.display_name.clone(),
            last_seen_at: to_proto_opt(self.last_seen_at),
            tags: self.tags.clone(),
            attributes: self
                .attributes()
                .into_iter()
                .map(|(k, v)| (k, v.to_proto()))
                .collect(),
            created_at: Some(to_proto(self.created_at)),
            updated_at: Some(to_proto(self.updated_at)),
            // Filled by GetContact alone.
            segment_ids: Vec::new(),
        }
    }
}

/// Contacts locked for update in a transaction, by LINE user id.
pub struct Locked {
    /// The rows as they are now (to be changed by the caller).
    pub rows: BTreeMap<String, ContactRow>,
    /// The state each had before this transaction; `None` for contacts this
    /// transaction created.
    pub before: BTreeMap<String, Option<ContactState>>,
}

/// Locks the contacts `ids` of `tenant`, creating the missing ones when
/// `create` is set (otherwise they are simply absent from the result).
pub async fn lock_contacts(
    tx: &mut PgConnection,
    tenant: &str,
    ids: &BTreeSet<String>,
    create: bool,
) -> Result<Locked> {
    let ids: Vec<String> = ids.iter().cloned().collect();
    let mut created: BTreeSet<String> = BTreeSet::new();
    if create {
        // Sorted, so concurrent inserters take row locks in the same order.
        let new: Vec<String> = sqlx::query_scalar(
            "INSERT INTO contacts (tenant_id, line_user_id) \
             SELECT $1, id FROM unnest($2::text[]) AS id ORDER BY id \
             ON CONFLICT DO NOTHING RETURNING line_user_id",
        )
        .bind(tenant)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        created.extend(new);
    }
    // Key by key (the module's docs say why), locked in `line_user_id`
    // order.
    let sql = format!(
        "SELECT c.* FROM (SELECT id FROM unnest($2::text[]) AS id ORDER BY id) AS k \
           CROSS JOIN LATERAL (SELECT {CONTACT_COLUMNS} FROM contacts \
                                WHERE tenant_id = $1 AND line_user_id = k.id \
                                LIMIT 1 FOR UPDATE) AS c"
    );
    let rows: Vec<ContactRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenant)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
    let before = rows
        .iter()
        .map(|r| {
            let state = (!created.contains(&r.line_user_id)).then(|| r.state());
            (r.line_user_id.clone(), state)
        })
        .collect();
    Ok(Locked {
        rows: rows
            .into_iter()
            .map(|r| (r.line_user_id.clone(), r))
            .collect(),
        before,
    })
}

/// Writes changed contacts back, in one statement.
pub async fn save_contacts(
    tx: &mut PgConnection,
    tenant: &str,
    rows: &[&ContactRow],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.line_user_id.as_str()).collect();
    let follow: Vec<i16> = rows.iter().map(|r| r.follow_state).collect();
    let first: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.first_followed_at).collect();
    let followed: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.followed_at).collect();
    let blocked: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.blocked_at).collect();
    let refollows: Vec<i32> = rows.iter().map(|r| r.refollow_count).collect();
    let follow_event: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.follow_event_at).collect();
    let names: Vec<&str> = rows.iter().map(|r| r.display_name.as_str()).collect();
    let seen: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.last_seen_at).collect();
    // Tag and segment lists differ in length, and PostgreSQL arrays must be
    // rectangular: each travels as an array literal and is cast back.
    let tags: Vec<String> = rows.iter().map(|r| text_array_literal(&r.tags)).collect();
    let attributes: Vec<&serde_json::Value> = rows.iter().map(|r| &r.attributes).collect();
    let segs: Vec<String> = rows.iter().map(|r| segs_literal(&r.segs)).collect();
    // Key by key (the module's docs say why).
    sqlx::query(
        "UPDATE contacts c SET \
           follow_state = u.follow_state, first_followed_at = u.first_followed_at, \
           followed_at = u.followed_at, blocked_at = u.blocked_at, \
           refollow_count = u.refollow_count, follow_event_at = u.follow_event_at, \
           display_name = u.display_name, last_seen_at = u.last_seen_at, \
           tags = u.tags::text[], \
           attributes = u.attributes, segs = u.segs::int[], updated_at = now() \
         FROM unnest($2::text[], $3::smallint[], $4::timestamptz[], $5::timestamptz[], \
                     $6::timestamptz[], $7::int[], $8::timestamptz[], $9::text[], \
                     $10::timestamptz[], $11::text[], $12::jsonb[], $13::text[]) \
           AS u(line_user_id, follow_state, first_followed_at, followed_at, blocked_at, \
                refollow_count, follow_event_at, display_name, last_seen_at, tags, attributes, \
                segs) \
           CROSS JOIN LATERAL (SELECT ctid AS loc FROM contacts \
                                WHERE tenant_id = $1 AND line_user_id = u.line_user_id \
                                LIMIT 1) AS k \
         WHERE c.ctid = k.loc",
    )
    .bind(tenant)
    .bind(&ids)
    .bind(&follow)
    .bind(&first)
    .bind(&followed)
    .bind(&blocked)
    .bind(&refollows)
    .bind(&follow_event)
    .bind(&names)
    .bind(&seen)
    .bind(&tags)
    .bind(&attributes)
    .bind(&segs)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A segment list as a PostgreSQL array literal, `{1,4,9}`.
pub fn segs_literal(segs: &[i32]) -> String {
    let mut out = String::with_capacity(2 + segs.len() * 4);
    out.push('{');
    for (i, n) in segs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&n.to_string());
    }
    out.push('}');
    out
}

/// Text values as a PostgreSQL array literal, every element quoted:
/// `{"a","b \"c\""}`.
pub fn text_array_literal(values: &[String]) -> String {
    let mut out = String::with_capacity(2 + values.iter().map(|v| v.len() + 3).sum::<usize>());
    out.push('{');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for ch in v.chars() {
            if ch == '"' || ch == '\\' {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// Puts `no` into or out of a sorted segment list; whether it changed.
pub fn set_membership(segs: &mut Vec<i32>, no: i32, member: bool) -> bool {
    match (segs.binary_search(&no), member) {
        (Err(at), true) => {
            segs.insert(at, no);
            true
        }
        (Ok(at), false) => {
            segs.remove(at);
            true
        }
        _ => false,
    }
}

/// What changed about one contact in a transaction.
#[derive(Debug, Clone)]
pub struct ContactDelta {
    /// LINE user id.
    pub line_user_id: String,
    /// State before; `None` when the contact was created.
    pub before: Option<ContactState>,
    /// State after; `None` when the contact was erased.
    pub after: Option<ContactState>,
    /// The contact's segment numbers: as stored when passed to
    /// [`maintain_segments`], as they must be stored when it returns.
    pub segs: Vec<i32>,
}

impl ContactDelta {
    /// The delta of a locked contact: its state before the transaction
    /// (`None` if it was created) against `row` as it is now.
    pub fn of(row: &ContactRow, before: Option<ContactState>) -> Self {
        Self {
            line_user_id: row.line_user_id.clone(),
            before,
            after: Some(row.state()),
            segs: row.segs.clone(),
        }
    }

    /// Whether anything a rule can read changed.
    pub fn is_change(&self) -> bool {
        self.before != self.after
    }
}

/// A segment locked for maintenance.
struct LockedSegment {
    segment_id: String,
    no: i32,
    rule: Rule,
    ref_tags: BTreeSet<String>,
    ref_attributes: BTreeSet<String>,
    ref_follow: bool,
}

impl LockedSegment {
    /// Whether the rule reads anything that changed between `a` and `b`.
    fn affected_by(&self, a: &ContactState, b: &ContactState) -> bool {
        (self.ref_follow && a.follow_state != b.follow_state)
            || a.tags
                .symmetric_difference(&b.tags)
                .any(|t| self.ref_tags.contains(t))
            || self
                .ref_attributes
                .iter()
                .any(|k| a.attributes.get(k) != b.attributes.get(k))
    }
}

/// Decodes a stored rule. Stored rules were validated when written, so a
/// failure here is corruption, not bad input.
pub fn decode_rule(segment_id: &str, bytes: &[u8]) -> Result<Rule> {
    let proto = SegmentRule::decode(bytes).map_err(|e| {
        Error::Database(sqlx::Error::Decode(
            format!("segment {segment_id}: stored rule does not decode: {e}").into(),
        ))
    })?;
    Rule::parse(Some(&proto), "rule").map_err(|e| {
        Error::Database(sqlx::Error::Decode(
            format!("segment {segment_id}: stored rule is invalid: {e}").into(),
        ))
    })
}

/// The SQL for a segment's count: the maintained count plus the deltas the
/// bulk import and the background computation have not had folded in yet.
/// `s` is the `segments` row.
pub const COUNT_SQL: &str = "(s.member_count + COALESCE((SELECT sum(d.delta) FROM segment_count_deltas d \
     WHERE d.tenant_id = s.tenant_id AND d.segment_id = s.segment_id), 0))::bigint";

/// Membership changes decided but not yet counted: see [`evaluate_segments`].
#[derive(Debug, Default)]
#[must_use = "the counts move only in Evaluated::count"]
pub struct Evaluated {
    /// (segment, user, entered), in the order of the deltas, then by segment.
    changes: Vec<(String, String, bool)>,
}

/// Re-evaluates the segments `deltas` can affect and flips the memberships
/// in each delta's `segs`; the caller stores them with the contacts, then
/// moves the counts with [`Evaluated::count`].
///
/// The segments are read `FOR KEY SHARE`: a rule change waits for this
/// transaction; other writers, the bulk import and the count fold do not.
pub async fn evaluate_segments(
    tx: &mut PgConnection,
    tenant: &str,
    deltas: &mut [ContactDelta],
) -> Result<Evaluated> {
    if !deltas.iter().any(ContactDelta::is_change) {
        return Ok(Evaluated::default());
    }
    // Which segments can be affected: for created or erased contacts, all;
    // otherwise those reading a changed tag, attribute or the follow state.
    let empty = ContactState::default();
    let mut tags: BTreeSet<&str> = BTreeSet::new();
    let mut keys: BTreeSet<&str> = BTreeSet::new();
    let mut follow = false;
    let mut all = false;
    for d in deltas.iter().filter(|d| d.is_change()) {
        match (&d.before, &d.after) {
            (Some(a), Some(b)) => {
                tags.extend(a.tags.symmetric_difference(&b.tags).map(String::as_str));
                keys.extend(
                    a.attributes
                        .keys()
                        .chain(b.attributes.keys())
                        .filter(|k| a.attributes.get(*k) != b.attributes.get(*k))
                        .map(String::as_str),
                );
                follow |= a.follow_state != b.follow_state;
            }
            _ => all = true,
        }
    }
    /// segment_id, no, rule, ref_tags, ref_attributes, ref_follow.
    type SegmentRefsRow = (String, i32, Vec<u8>, Vec<String>, Vec<String>, bool);
    let rows: Vec<SegmentRefsRow> = sqlx::query_as(
        "SELECT segment_id, no, rule, ref_tags, ref_attributes, ref_follow FROM segments \
         WHERE tenant_id = $1 AND ($2 OR ref_tags && $3 OR ref_attributes && $4 OR (ref_follow AND $5)) \
         ORDER BY segment_id FOR KEY SHARE",
    )
    .bind(tenant)
    .bind(all)
    .bind(tags.iter().copied().collect::<Vec<_>>())
    .bind(keys.iter().copied().collect::<Vec<_>>())
    .bind(follow)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(Evaluated::default());
    }
    let segments = rows
        .into_iter()
        .map(|(segment_id, no, rule, t, a, f)| {
            Ok(LockedSegment {
                rule: decode_rule(&segment_id, &rule)?,
                segment_id,
                no,
                ref_tags: t.into_iter().collect(),
                ref_attributes: a.into_iter().collect(),
                ref_follow: f,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    // (segment, user, entered)
    let mut changes: Vec<(String, String, bool)> = Vec::new();
    for d in deltas.iter_mut().filter(|d| d.is_change()) {
        let before = d.before.as_ref().unwrap_or(&empty);
        let after = d.after.as_ref().unwrap_or(&empty);
        let whole = d.before.is_none() || d.after.is_none();
        for s in &segments {
            if !whole && !s.affected_by(before, after) {
                continue;
            }
            let should = d.after.as_ref().is_some_and(|c| s.rule.matches(c));
            if set_membership(&mut d.segs, s.no, should) {
                changes.push((s.segment_id.clone(), d.line_user_id.clone(), should));
            }
        }
    }
    Ok(Evaluated { changes })
}

impl Evaluated {
    /// Moves each changed segment's count by its net change and returns the
    /// changes per contact, each with the segment's count right after it.
    pub async fn count(
        self,
        tx: &mut PgConnection,
        tenant: &str,
    ) -> Result<Vec<(String, MembershipChange)>> {
        let changes = self.changes;
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let mut net: BTreeMap<&str, i64> = BTreeMap::new();
        for (s, _, entered) in &changes {
            *net.entry(s.as_str()).or_default() += if *entered { 1 } else { -1 };
        }
        // A count delta row, not an update of the segment row: a hot
        // segment's writers do not queue on its row lock (nor behind each
        // other's commits). The count each change reports is the count this
        // transaction sees: committed changes plus its own.
        let sql = format!(
            "WITH moved AS ( \
               INSERT INTO segment_count_deltas (tenant_id, segment_id, delta, announced) \
               SELECT $1, id, d, true FROM unnest($2::text[], $3::bigint[]) AS x(id, d)) \
             SELECT s.segment_id, {COUNT_SQL} + x.d \
             FROM segments s JOIN unnest($2::text[], $3::bigint[]) AS x(id, d) ON s.segment_id = x.id \
             WHERE s.tenant_id = $1"
        );
        let finals: HashMap<String, i64> =
            sqlx::query_as::<_, (String, i64)>(sqlx::AssertSqlSafe(sql))
                .bind(tenant)
                .bind(net.keys().copied().collect::<Vec<_>>())
                .bind(net.values().copied().collect::<Vec<_>>())
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();

        // Each change's count_after: walk back from the final count.
        let mut running: HashMap<&str, i64> =
            finals.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let mut out: Vec<(String, MembershipChange)> = Vec::with_capacity(changes.len());
        for (s, u, entered) in changes.iter().rev() {
            let count = running
                .get_mut(s.as_str())
                .expect("every changed segment was updated");
            out.push((
                u.clone(),
                MembershipChange {
                    segment_id: s.clone(),
                    line_user_id: u.clone(),
                    entered: *entered,
                    count_after: *count,
                },
            ));
            *count -= if *entered { 1 } else { -1 };
        }
        out.reverse();
        Ok(out)
    }
}

/// Writes one locked contact as the caller changed it: re-evaluates its
/// segments, stores it with its memberships, moves the counts and queues
/// the membership changes on the outbox. Returns the changes.
pub async fn write_contact(
    tx: &mut PgConnection,
    tenant: &str,
    row: &mut ContactRow,
    before: Option<ContactState>,
) -> Result<Vec<MembershipChange>> {
    let mut delta = [ContactDelta::of(row, before)];
    let evaluated = evaluate_segments(tx, tenant, &mut delta).await?;
    let [delta] = delta;
    row.segs = delta.segs;
    save_contacts(tx, tenant, &[&*row]).await?;
    let changes: Vec<MembershipChange> = evaluated
        .count(tx, tenant)
        .await?
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    write_outbox(
        tx,
        tenant,
        &changes,
        &hibiki_runtime::telemetry::current_trace_context(),
    )
    .await?;
    Ok(changes)
}

/// Queues membership change records for publication, in the caller's
/// transaction.
pub async fn write_outbox(
    tx: &mut PgConnection,
    tenant: &str,
    changes: &[MembershipChange],
    trace: &TraceContext,
) -> Result<()> {
    let traced: Vec<(MembershipChange, TraceContext)> =
        changes.iter().map(|c| (c.clone(), trace.clone())).collect();
    write_outbox_traced(tx, tenant, &traced).await
}

/// Queues membership change records for publication, each carrying the
/// trace of the call that made it (edits written together come from
/// different calls).
pub async fn write_outbox_traced(
    tx: &mut PgConnection,
    tenant: &str,
    changes: &[(MembershipChange, TraceContext)],
) -> Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let now = to_proto(Utc::now());
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT nextval(pg_get_serial_sequence('outbox', 'id')) FROM generate_series(1, $1)",
    )
    .bind(changes.len() as i64)
    .fetch_all(&mut *tx)
    .await?;
    let payloads: Vec<Vec<u8>> = changes
        .iter()
        .zip(&ids)
        .map(|((c, trace), id)| {
            MembershipChangeRecord {
                tenant_id: tenant.to_owned(),
                change: Some(c.clone()),
                committed_at: Some(now),
                change_id: format!("m{id}"),
                trace: Some(trace.clone()),
                snapshot: None,
                bulk: None,
            }
            .encode_to_vec()
        })
        .collect();
    sqlx::query(
        "INSERT INTO outbox (tenant_id, id, payload) SELECT $1, i, p FROM unnest($2::bigint[], $3::bytea[]) AS x(i, p)",
    )
    .bind(tenant)
    .bind(&ids)
    .bind(&payloads)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A transaction on the service's pool.
pub type Tx<'a> = Transaction<'a, Postgres>;
