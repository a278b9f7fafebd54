//! `ContactService`: contacts, inbound events, tag and attribute mutations.
//!
//! Every write runs in one transaction through `store`: the contact, its
//! segment memberships, the segment counts and the outbox change together.
//! Writes are idempotent: `ApplyEvents` per webhook event id, the others per
//! caller idempotency key (a repeat returns the first result, `replayed`).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use hibiki_proto::common::v1::{InboundEvent, PageResponse, inbound_event::Payload};
use hibiki_proto::contacts::v1::contact_service_server::ContactService;
use hibiki_proto::contacts::v1::{
    AddTagsRequest, ApplyEventsRequest, ApplyEventsResponse, Contact, DeleteContactRequest,
    DeleteContactResponse, EventOutcome, EventResult, FollowState, FollowTransition,
    GetContactRequest, GetImportRequest, ImportContactsRequest, ImportContactsResponse,
    ImportStatus, ListContactsRequest, ListContactsResponse, MembershipChange, MutationResponse,
    RemoveTagsRequest, SetAttributesRequest, UpsertContactRequest, UpsertContactResponse,
};
use hibiki_proto::contacts::v1::{
    EditBatchRequest, EditBatchResponse, EditItem, EditResult, edit_item, edit_result,
};
use hibiki_runtime::Caller;
use hibiki_runtime::batch;
use hibiki_runtime::telemetry::current_trace_context;
use hibiki_runtime::timestamp::from_millis;
use prost::Message;
use sqlx::PgPool;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::attrs::{self, AttrValue, MAX_ATTRIBUTES, MAX_TAGS};
use crate::error::{Error, Result};
use crate::import::Importer;
use crate::outbox::Relay;
use crate::page::Page;
use crate::store::{self, CONTACT_COLUMNS, ContactDelta, ContactRow};
use crate::tenants::require_tenant;
use crate::validate;

mod together;

/// The most events one `ApplyEvents` call takes.
pub const MAX_EVENTS_PER_BATCH: usize = 500;
/// The longest idempotency key.
const MAX_KEY_BYTES: usize = 256;
/// The most edits an EditBatch takes.
const MAX_BATCH: usize = 500;

/// Implements `hibiki.contacts.v1.ContactService`.
#[derive(Clone)]
pub struct Contacts {
    pool: PgPool,
    importer: Importer,
    relay: Relay,
    /// Tenants seen to exist. Tenants are never deleted, so the realtime
    /// calls (a webhook batch, a scenario step) skip the lookup once a
    /// tenant is known.
    known: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Single-contact edits, to the loop that writes them in groups.
    edits: tokio::sync::mpsc::UnboundedSender<together::Pending>,
}

impl Contacts {
    /// The service over `pool`, importing through `importer` and waking
    /// `relay` after each commit that wrote membership changes. Starts the
    /// loop that writes single-contact edits in groups (on the current
    /// tokio runtime).
    pub fn new(pool: PgPool, importer: Importer, relay: Relay) -> Self {
        let (edits, queue) = tokio::sync::mpsc::unbounded_channel();
        let contacts = Self {
            known: std::sync::Arc::default(),
            pool,
            importer,
            relay,
            edits,
        };
        tokio::spawn(together::run(contacts.clone(), queue));
        contacts
    }
}

fn idempotency_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("idempotency_key", "is required"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::invalid(
            "idempotency_key",
            format!("is at most {MAX_KEY_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn contact_ref(contact: Option<&hibiki_proto::common::v1::ContactRef>) -> Result<(String, String)> {
    let c = contact.ok_or_else(|| Error::invalid("contact", "is required"))?;
    validate::tenant_id("contact.tenant_id", &c.tenant_id)?;
    validate::line_user_id("contact.line_user_id", &c.line_user_id)?;
    Ok((c.tenant_id.clone(), c.line_user_id.clone()))
}

/// Claims `key` for `operation`. `Ok(None)`: first use, go ahead (and call
/// [`store_result`] before committing). `Ok(Some(bytes))`: the key was used
/// before; `bytes` is the stored response. A concurrent first use holding
/// the key makes this wait until it commits or rolls back.
async fn claim_key(
    tx: &mut sqlx::PgConnection,
    tenant: &str,
    key: &str,
    operation: &str,
) -> Result<Option<Vec<u8>>> {
    let claimed = sqlx::query(
        "INSERT INTO mutation_results (tenant_id, idempotency_key, operation, response) \
         VALUES ($1, $2, $3, '') ON CONFLICT DO NOTHING",
    )
    .bind(tenant)
    .bind(key)
    .bind(operation)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if claimed {
        return Ok(None);
    }
    let (op, response): (String, Vec<u8>) = sqlx::query_as(
        "SELECT operation, response FROM mutation_results WHERE tenant_id = $1 AND idempotency_key = $2",
    )
    .bind(tenant)
    .bind(key)
    .fetch_one(&mut *tx)
    .await?;
    if op != operation {
        return Err(Error::invalid(
            "idempotency_key",
            format!("was already used for {op}"),
        ));
    }
    Ok(Some(response))
}

async fn store_result(
    tx: &mut sqlx::PgConnection,
    tenant: &str,
    key: &str,
    response: &[u8],
) -> Result<()> {
    sqlx::query(
        "UPDATE mutation_results SET response = $3 WHERE tenant_id = $1 AND idempotency_key = $2",
    )
    .bind(tenant)
    .bind(key)
    .bind(response)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A change to one contact's tags and attributes.
enum Edit {
    AddTags(Vec<String>),
    RemoveTags(Vec<String>),
    SetAttributes {
        set: BTreeMap<String, AttrValue>,
        unset: Vec<String>,
    },
}

fn check_tags(field: &str, tags: &[String]) -> Result<()> {
    if tags.is_empty() {
        return Err(Error::invalid(field, "at least one tag is required"));
    }
    for (i, t) in tags.iter().enumerate() {
        attrs::check_name(&format!("{field}[{i}]"), t)?;
    }
    Ok(())
}

fn parse_set(
    set: &std::collections::HashMap<String, hibiki_proto::common::v1::Value>,
    field: &str,
) -> Result<BTreeMap<String, AttrValue>> {
    set.iter()
        .map(|(k, v)| {
            let path = format!("{field}.{k}");
            attrs::check_name(&path, k)?;
            Ok((k.clone(), AttrValue::from_proto(&path, Some(v))?))
        })
        .collect()
}

/// Applies `edit` to `row`; INVALID_ARGUMENT when it would change an
/// attribute's type or exceed a limit.
fn apply_edit(row: &mut ContactRow, edit: &Edit, set_field: &str) -> Result<()> {
    match edit {
        Edit::AddTags(tags) => {
            let mut all: BTreeSet<String> = row.tags.iter().cloned().collect();
            all.extend(tags.iter().cloned());
            if all.len() > MAX_TAGS {
                return Err(Error::invalid(
                    "tags",
                    format!("a contact has at most {MAX_TAGS} tags"),
                ));
            }
            row.tags = all.into_iter().collect();
        }
        Edit::RemoveTags(tags) => {
            row.tags.retain(|t| !tags.contains(t));
        }
        Edit::SetAttributes { set, unset } => {
            let mut attributes = row.attributes();
            for (k, v) in set {
                if let Some(old) = attributes.get(k)
                    && old.kind() != v.kind()
                {
                    return Err(Error::invalid(
                        format!("{set_field}.{k}"),
                        format!(
                            "is a {} attribute; it cannot be set to a {}",
                            old.kind().name(),
                            v.kind().name()
                        ),
                    ));
                }
                attributes.insert(k.clone(), v.clone());
            }
            for k in unset {
                attributes.remove(k);
            }
            if attributes.len() > MAX_ATTRIBUTES {
                return Err(Error::invalid(
                    set_field,
                    format!("a contact has at most {MAX_ATTRIBUTES} attributes"),
                ));
            }
            row.set_attributes(&attributes);
        }
    }
    Ok(())
}

impl Contacts {
    /// NOT_FOUND unless `tenant` exists (looked up once per tenant).
    async fn require_tenant(&self, tenant: &str) -> Result<()> {
        if self.known.lock().expect("known tenants").contains(tenant) {
            return Ok(());
        }
        require_tenant(&self.pool, tenant).await?;
        self.known
            .lock()
            .expect("known tenants")
            .insert(tenant.to_owned());
        Ok(())
    }

    /// A transaction, the wait for its connection in a span of its own
    /// (`contacts.pool_wait`), so that a trace tells waiting for the pool
    /// from work in PostgreSQL.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self
            .pool
            .begin()
            .instrument(tracing::info_span!("contacts.pool_wait"))
            .await?)
    }

    /// One idempotent edit of one contact, written together with the edits
    /// of other contacts that arrive meanwhile (see [`together`]).
    async fn mutate(
        &self,
        tenant: &str,
        user: &str,
        key: &str,
        operation: &'static str,
        edit: Edit,
        create: bool,
    ) -> Result<MutationResponse> {
        let _realtime = self.importer.realtime().enter();
        idempotency_key(key)?;
        self.require_tenant(tenant).await?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = together::Pending {
            tenant: tenant.to_owned(),
            user: user.to_owned(),
            key: key.to_owned(),
            operation,
            edit,
            create,
            trace: current_trace_context(),
            reply,
        };
        if let Err(e) = self.edits.send(pending) {
            // The writer is gone (the service is stopping): write it here.
            let p = e.0;
            return self
                .mutate_alone(tenant, user, key, operation, &p.edit, create)
                .await;
        }
        answer.await.map_err(|_| {
            Error::Unavailable("the contact writer stopped before answering; retry".into())
        })?
    }

    /// One idempotent edit of one contact, in a transaction of its own.
    async fn mutate_alone(
        &self,
        tenant: &str,
        user: &str,
        key: &str,
        operation: &str,
        edit: &Edit,
        create: bool,
    ) -> Result<MutationResponse> {
        let mut tx = self.begin().await?;
        if let Some(previous) = claim_key(&mut tx, tenant, key, operation).await? {
            let mut response = MutationResponse::decode(previous.as_slice())
                .map_err(|e| Error::Database(sqlx::Error::Decode(e.into())))?;
            response.replayed = true;
            return Ok(response);
        }
        let ids = BTreeSet::from([user.to_owned()]);
        let mut locked = store::lock_contacts(&mut tx, tenant, &ids, create).await?;
        let Some(row) = locked.rows.get_mut(user) else {
            return Err(Error::NotFound(format!(
                "contact {user:?} does not exist in tenant {tenant:?}"
            )));
        };
        apply_edit(row, edit, "set")?;
        let before = locked.before.remove(user).flatten();
        let changes = store::write_contact(&mut tx, tenant, row, before).await?;
        let response = MutationResponse {
            membership_changes: changes,
            replayed: false,
        };
        store_result(&mut tx, tenant, key, &response.encode_to_vec()).await?;
        tx.commit().await?;
        self.relay.wake();
        Ok(response)
    }

    async fn fetch_contact(&self, tenant: &str, user: &str) -> Result<Contact> {
        let sql = format!(
            "SELECT {CONTACT_COLUMNS} FROM contacts WHERE tenant_id = $1 AND line_user_id = $2"
        );
        sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(sql))
            .bind(tenant)
            .bind(user)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.to_proto())
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "contact {user:?} does not exist in tenant {tenant:?}"
                ))
            })
    }

    async fn apply_events(
        &self,
        tenant: &str,
        events: &[InboundEvent],
    ) -> Result<Vec<EventResult>> {
        let _realtime = self.importer.realtime().enter();
        if events.len() > MAX_EVENTS_PER_BATCH {
            return Err(Error::invalid(
                "events",
                format!(
                    "at most {MAX_EVENTS_PER_BATCH} events per call, got {}",
                    events.len()
                ),
            ));
        }
        for (i, e) in events.iter().enumerate() {
            if e.tenant_id != tenant {
                return Err(Error::invalid(
                    format!("events[{i}].tenant_id"),
                    format!(
                        "{:?} differs from the request's tenant_id {tenant:?}",
                        e.tenant_id
                    ),
                ));
            }
            if e.webhook_event_id.is_empty() {
                return Err(Error::invalid(
                    format!("events[{i}].webhook_event_id"),
                    "is required",
                ));
            }
            let user = user_of(e);
            if !user.is_empty() {
                validate::line_user_id(&format!("events[{i}].source.user_id"), user)?;
            }
        }
        self.require_tenant(tenant).await?;
        let mut results: Vec<EventResult> = events
            .iter()
            .map(|e| EventResult {
                webhook_event_id: e.webhook_event_id.clone(),
                outcome: EventOutcome::Duplicate as i32,
                follow_transition: FollowTransition::None as i32,
                membership_changes: vec![],
            })
            .collect();
        if events.is_empty() {
            return Ok(results);
        }

        let mut tx = self.begin().await?;
        // Claim the event ids: those already applied (by an earlier call, or
        // by a concurrent one, which this waits for) come back absent.
        let ids: Vec<&str> = events.iter().map(|e| e.webhook_event_id.as_str()).collect();
        let fresh: BTreeSet<String> = sqlx::query_scalar(
            "INSERT INTO applied_events (tenant_id, webhook_event_id) \
             SELECT $1, id FROM unnest($2::text[]) AS id ORDER BY id \
             ON CONFLICT DO NOTHING RETURNING webhook_event_id",
        )
        .bind(tenant)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        // A redelivery inside the same batch counts once: its first copy.
        let mut taken: BTreeSet<&str> = BTreeSet::new();
        let mut apply: Vec<usize> = Vec::new();
        for (i, e) in events.iter().enumerate() {
            if fresh.contains(&e.webhook_event_id) && taken.insert(e.webhook_event_id.as_str()) {
                apply.push(i);
            }
        }
        let users: BTreeSet<String> = apply
            .iter()
            .map(|&i| user_of(&events[i]))
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        let mut locked = store::lock_contacts(&mut tx, tenant, &users, true).await?;
        for &i in &apply {
            let e = &events[i];
            let user = user_of(e);
            if user.is_empty() {
                results[i].outcome = EventOutcome::NoContact as i32;
                continue;
            }
            let row = locked
                .rows
                .get_mut(user)
                .expect("every user of the batch was locked");
            results[i].outcome = EventOutcome::Applied as i32;
            results[i].follow_transition = apply_event(row, e) as i32;
        }
        let mut deltas: Vec<ContactDelta> = locked
            .rows
            .values()
            .map(|r| ContactDelta::of(r, locked.before.get(&r.line_user_id).cloned().flatten()))
            .collect();
        let evaluated = store::evaluate_segments(&mut tx, tenant, &mut deltas).await?;
        for (row, delta) in locked.rows.values_mut().zip(deltas) {
            row.segs = delta.segs;
        }
        let changed: Vec<&ContactRow> = locked.rows.values().collect();
        store::save_contacts(&mut tx, tenant, &changed).await?;
        let changes = evaluated.count(&mut tx, tenant).await?;
        let all: Vec<MembershipChange> = changes.iter().map(|(_, c)| c.clone()).collect();
        store::write_outbox(&mut tx, tenant, &all, &current_trace_context()).await?;
        tx.commit().await?;
        if !all.is_empty() {
            self.relay.wake();
        }

        // Report each contact's changes on the last applied event of its
        // user in the batch: that event brought the contact to its new state.
        let mut last_of_user: BTreeMap<&str, usize> = BTreeMap::new();
        for &i in &apply {
            let u = user_of(&events[i]);
            if !u.is_empty() {
                last_of_user.insert(u, i);
            }
        }
        for (user, change) in changes {
            if let Some(&i) = last_of_user.get(user.as_str()) {
                results[i].membership_changes.push(change);
            }
        }
        Ok(results)
    }
}

/// The LINE user an event is about ("" when none).
fn user_of(e: &InboundEvent) -> &str {
    e.source.as_ref().map(|s| s.user_id.as_str()).unwrap_or("")
}

/// Applies one event to its contact: last-seen always; follow state only
/// from an event no older than the one that set it (LINE may deliver out of
/// order).
fn apply_event(row: &mut ContactRow, e: &InboundEvent) -> FollowTransition {
    let at: DateTime<Utc> = from_millis(e.timestamp_ms).unwrap_or_else(Utc::now);
    row.last_seen_at = Some(row.last_seen_at.map_or(at, |seen| seen.max(at)));
    let newer = row.follow_event_at.is_none_or(|t| at >= t);
    let following = FollowState::Following as i16;
    let blocked = FollowState::Blocked as i16;
    match &e.payload {
        Some(Payload::Follow(f)) if newer => {
            row.follow_event_at = Some(at);
            let transition = if row.follow_state == following {
                FollowTransition::None
            } else if row.follow_state == blocked || f.is_unblocked {
                row.refollow_count += 1;
                FollowTransition::Refollowed
            } else {
                FollowTransition::Followed
            };
            if transition != FollowTransition::None {
                row.follow_state = following;
                row.followed_at = Some(at);
                row.first_followed_at.get_or_insert(at);
            }
            transition
        }
        Some(Payload::Unfollow(_)) if newer => {
            row.follow_event_at = Some(at);
            if row.follow_state == blocked {
                FollowTransition::None
            } else {
                row.follow_state = blocked;
                row.blocked_at = Some(at);
                FollowTransition::Blocked
            }
        }
        _ => FollowTransition::None,
    }
}

#[tonic::async_trait]
impl ContactService for Contacts {
    async fn get_contact(
        &self,
        request: Request<GetContactRequest>,
    ) -> Result<Response<Contact>, Status> {
        let caller = Caller::of(&request)?;
        let (tenant, user) = contact_ref(request.get_ref().contact.as_ref())?;
        caller.authorize_tenant(&tenant)?;
        let mut contact = self.fetch_contact(&tenant, &user).await?;
        // The segments it is in: the numbers on its row, as ids (a deleted
        // segment's number may linger on the row; it matches nothing).
        let ids: Vec<(String,)> = sqlx::query_as(
            "SELECT s.segment_id FROM contacts c
               JOIN segments s ON s.tenant_id = c.tenant_id AND s.no = ANY(c.segs)
              WHERE c.tenant_id = $1 AND c.line_user_id = $2
              ORDER BY s.segment_id",
        )
        .bind(&tenant)
        .bind(&user)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::from)?;
        contact.segment_ids = ids.into_iter().map(|(id,)| id).collect();
        Ok(Response::new(contact))
    }

    async fn list_contacts(
        &self,
        request: Request<ListContactsRequest>,
    ) -> Result<Response<ListContactsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        let page = Page::from_request(r.page.as_ref(), "page")?;
        if !r.tag.is_empty() && !r.segment_id.is_empty() {
            return Err(
                Error::invalid("segment_id", "filter by a tag or a segment, not both").into(),
            );
        }
        let columns = CONTACT_COLUMNS
            .split(", ")
            .map(|c| format!("c.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let rows: Vec<ContactRow> = if r.segment_id.is_empty() {
            let sql = format!(
                "SELECT {columns} FROM contacts c WHERE c.tenant_id = $1 AND c.line_user_id > $2 \
                 AND ($3 = '' OR c.tags @> ARRAY[$3]::text[]) ORDER BY c.line_user_id LIMIT $4"
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(&r.tenant_id)
                .bind(page.after())
                .bind(&r.tag)
                .bind(page.fetch_limit())
                .fetch_all(&self.pool)
                .await
                .map_err(Error::from)?
        } else {
            let no = crate::segments::segment_no(&self.pool, &r.tenant_id, &r.segment_id).await?;
            let sql = format!(
                "SELECT {columns} FROM contacts c \
                 WHERE c.tenant_id = $1 AND c.segs @> ARRAY[$2::int] AND c.line_user_id > $3 \
                 ORDER BY c.line_user_id LIMIT $4"
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(&r.tenant_id)
                .bind(no)
                .bind(page.after())
                .bind(page.fetch_limit())
                .fetch_all(&self.pool)
                .await
                .map_err(Error::from)?
        };
        let (rows, next) = page.split(rows, |c| c.line_user_id.clone());
        Ok(Response::new(ListContactsResponse {
            contacts: rows.iter().map(ContactRow::to_proto).collect(),
            page: Some(PageResponse {
                next_page_token: next,
            }),
        }))
    }

    #[tracing::instrument(name = "contacts.upsert_contact", skip_all)]
    async fn upsert_contact(
        &self,
        request: Request<UpsertContactRequest>,
    ) -> Result<Response<UpsertContactResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let (tenant, user) = contact_ref(r.contact.as_ref())?;
        caller.authorize_tenant(&tenant)?;
        if let Some(name) = &r.display_name {
            validate::display_name("display_name", name, 200)?;
        }
        if !r.add_tags.is_empty() {
            check_tags("add_tags", &r.add_tags)?;
        }
        let set = parse_set(&r.set_attributes, "set_attributes")?;
        require_tenant(&self.pool, &tenant).await?;
        let mut tx = self.pool.begin().await.map_err(Error::from)?;
        if !r.idempotency_key.is_empty() {
            idempotency_key(&r.idempotency_key)?;
            if let Some(previous) =
                claim_key(&mut tx, &tenant, &r.idempotency_key, "UpsertContact").await?
            {
                let response = UpsertContactResponse::decode(previous.as_slice())
                    .map_err(|e| Error::Database(sqlx::Error::Decode(e.into())))?;
                return Ok(Response::new(response));
            }
        }
        let ids = BTreeSet::from([user.clone()]);
        let mut locked = store::lock_contacts(&mut tx, &tenant, &ids, true).await?;
        let row = locked.rows.get_mut(&user).expect("created if missing");
        if let Some(name) = r.display_name {
            row.display_name = name;
        }
        if !r.add_tags.is_empty() {
            apply_edit(row, &Edit::AddTags(r.add_tags), "add_tags")?;
        }
        if !set.is_empty() {
            apply_edit(
                row,
                &Edit::SetAttributes { set, unset: vec![] },
                "set_attributes",
            )?;
        }
        let before = locked.before.remove(&user).flatten();
        let created = before.is_none();
        let changes = store::write_contact(&mut tx, &tenant, row, before).await?;
        let response = UpsertContactResponse {
            contact: Some(row.to_proto()),
            created,
            membership_changes: changes,
        };
        if !r.idempotency_key.is_empty() {
            store_result(
                &mut tx,
                &tenant,
                &r.idempotency_key,
                &response.encode_to_vec(),
            )
            .await?;
        }
        tx.commit().await.map_err(Error::from)?;
        self.relay.wake();
        Ok(Response::new(response))
    }

    #[tracing::instrument(name = "contacts.delete_contact", skip_all)]
    async fn delete_contact(
        &self,
        request: Request<DeleteContactRequest>,
    ) -> Result<Response<DeleteContactResponse>, Status> {
        let caller = Caller::of(&request)?;
        let (tenant, user) = contact_ref(request.get_ref().contact.as_ref())?;
        caller.authorize_tenant(&tenant)?;
        let mut tx = self.pool.begin().await.map_err(Error::from)?;
        let ids = BTreeSet::from([user.clone()]);
        let mut locked = store::lock_contacts(&mut tx, &tenant, &ids, false).await?;
        let Some(row) = locked.rows.remove(&user) else {
            return Err(Error::NotFound(format!(
                "contact {user:?} does not exist in tenant {tenant:?}"
            ))
            .into());
        };
        // Every segment is re-evaluated for an erased contact: it leaves
        // each one it was in, and the counts drop with it.
        let mut delta = [ContactDelta {
            after: None,
            ..ContactDelta::of(&row, locked.before.remove(&user).flatten())
        }];
        let evaluated = store::evaluate_segments(&mut tx, &tenant, &mut delta).await?;
        sqlx::query("DELETE FROM contacts WHERE tenant_id = $1 AND line_user_id = $2")
            .bind(&tenant)
            .bind(&user)
            .execute(&mut *tx)
            .await
            .map_err(Error::from)?;
        let changes: Vec<MembershipChange> = evaluated
            .count(&mut tx, &tenant)
            .await?
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        store::write_outbox(&mut tx, &tenant, &changes, &current_trace_context()).await?;
        tx.commit().await.map_err(Error::from)?;
        self.relay.wake();
        tracing::info!(tenant_id = %tenant, "contact erased");
        Ok(Response::new(DeleteContactResponse {
            membership_changes: changes,
        }))
    }

    #[tracing::instrument(name = "contacts.apply_events", skip_all, fields(tenant_id = %request.get_ref().tenant_id, events = request.get_ref().events.len()))]
    async fn apply_events(
        &self,
        request: Request<ApplyEventsRequest>,
    ) -> Result<Response<ApplyEventsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        validate::tenant_id("tenant_id", &r.tenant_id)?;
        caller.authorize_tenant(&r.tenant_id)?;
        let results = Contacts::apply_events(self, &r.tenant_id, &r.events).await?;
        Ok(Response::new(ApplyEventsResponse { results }))
    }

    async fn add_tags(
        &self,
        request: Request<AddTagsRequest>,
    ) -> Result<Response<MutationResponse>, Status> {
        let caller = Caller::of(&request)?;
        Ok(Response::new(
            self.add_tags_one(&caller, request.into_inner()).await?,
        ))
    }

    async fn remove_tags(
        &self,
        request: Request<RemoveTagsRequest>,
    ) -> Result<Response<MutationResponse>, Status> {
        let caller = Caller::of(&request)?;
        Ok(Response::new(
            self.remove_tags_one(&caller, request.into_inner()).await?,
        ))
    }

    async fn set_attributes(
        &self,
        request: Request<SetAttributesRequest>,
    ) -> Result<Response<MutationResponse>, Status> {
        let caller = Caller::of(&request)?;
        Ok(Response::new(
            self.set_attributes_one(&caller, request.into_inner())
                .await?,
        ))
    }

    async fn edit_batch(
        &self,
        request: Request<EditBatchRequest>,
    ) -> Result<Response<EditBatchResponse>, Status> {
        let caller = Caller::of(&request)?;
        let items = request.into_inner().items;
        batch::check(
            &items,
            MAX_BATCH,
            |i| i.request.is_some(),
            "add_tags, remove_tags or set_attributes",
        )?;
        // Side by side: edits that arrive together share transactions.
        let answers =
            futures::future::join_all(items.into_iter().map(|item| self.edit_item(&caller, item)))
                .await;
        let results = answers
            .into_iter()
            .map(|answer| EditResult {
                result: Some(match answer {
                    Ok(response) => edit_result::Result::Response(response),
                    Err(status) => edit_result::Result::Error(batch::error(&status)),
                }),
            })
            .collect();
        Ok(Response::new(EditBatchResponse { results }))
    }

    async fn import_contacts(
        &self,
        request: Request<Streaming<ImportContactsRequest>>,
    ) -> Result<Response<ImportContactsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let response = self.importer.run(caller, request.into_inner()).await?;
        self.relay.wake();
        Ok(Response::new(response))
    }

    async fn get_import(
        &self,
        request: Request<GetImportRequest>,
    ) -> Result<Response<ImportStatus>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        Ok(Response::new(
            crate::import::status(&self.pool, &r.tenant_id, &r.import_id).await?,
        ))
    }
}

/// The edits, for a single RPC or a batch's item.
impl Contacts {
    #[tracing::instrument(name = "contacts.add_tags", skip_all)]
    async fn add_tags_one(
        &self,
        caller: &Caller,
        r: AddTagsRequest,
    ) -> Result<MutationResponse, Status> {
        let (tenant, user) = contact_ref(r.contact.as_ref())?;
        caller.authorize_tenant(&tenant)?;
        check_tags("tags", &r.tags)?;
        let edit = Edit::AddTags(r.tags);
        let response = self
            .mutate(&tenant, &user, &r.idempotency_key, "AddTags", edit, true)
            .await?;
        Ok(response)
    }

    #[tracing::instrument(name = "contacts.remove_tags", skip_all)]
    async fn remove_tags_one(
        &self,
        caller: &Caller,
        r: RemoveTagsRequest,
    ) -> Result<MutationResponse, Status> {
        let (tenant, user) = contact_ref(r.contact.as_ref())?;
        caller.authorize_tenant(&tenant)?;
        check_tags("tags", &r.tags)?;
        let edit = Edit::RemoveTags(r.tags);
        let response = self
            .mutate(
                &tenant,
                &user,
                &r.idempotency_key,
                "RemoveTags",
                edit,
                false,
            )
            .await?;
        Ok(response)
    }

    #[tracing::instrument(name = "contacts.set_attributes", skip_all)]
    async fn set_attributes_one(
        &self,
        caller: &Caller,
        r: SetAttributesRequest,
    ) -> Result<MutationResponse, Status> {
        let (tenant, user) = contact_ref(r.contact.as_ref())?;
        caller.authorize_tenant(&tenant)?;
        let set = parse_set(&r.set, "set")?;
        for (i, k) in r.unset.iter().enumerate() {
            attrs::check_name(&format!("unset[{i}]"), k)?;
        }
        if set.is_empty() && r.unset.is_empty() {
            return Err(Error::invalid("set", "set or unset at least one attribute").into());
        }
        let edit = Edit::SetAttributes {
            set,
            unset: r.unset,
        };
        let response = self
            .mutate(
                &tenant,
                &user,
                &r.idempotency_key,
                "SetAttributes",
                edit,
                true,
            )
            .await?;
        Ok(response)
    }

    /// One item of a batch, as its own RPC would do it
    /// ([`hibiki_runtime::batch::item`]).
    async fn edit_item(&self, caller: &Caller, item: EditItem) -> Result<MutationResponse, Status> {
        use edit_item::Request as R;
        let trace = item.trace.as_ref();
        match item.request {
            Some(R::AddTags(r)) => {
                batch::item(SERVICE, ADD_TAGS, trace, self.add_tags_one(caller, r)).await
            }
            Some(R::RemoveTags(r)) => {
                batch::item(SERVICE, REMOVE_TAGS, trace, self.remove_tags_one(caller, r)).await
            }
            Some(R::SetAttributes(r)) => {
                batch::item(
                    SERVICE,
                    SET_ATTRIBUTES,
                    trace,
                    self.set_attributes_one(caller, r),
                )
                .await
            }
            None => Err(Status::invalid_argument("request: must be set")),
        }
    }
}

/// The service and the RPCs a batch item is done as, named as the gRPC
/// layer names them.
const SERVICE: &str = "contacts";
const ADD_TAGS: &str = "/hibiki.contacts.v1.ContactService/AddTags";
const REMOVE_TAGS: &str = "/hibiki.contacts.v1.ContactService/RemoveTags";
const SET_ATTRIBUTES: &str = "/hibiki.contacts.v1.ContactService/SetAttributes";
