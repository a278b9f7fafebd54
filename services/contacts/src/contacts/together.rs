//! Edits of single contacts (`AddTags`, `RemoveTags`, `SetAttributes`) that
//! arrive while others are being written share one transaction.
//!
//! Under a campaign storm every tap tags one contact, and written one by one
//! each edit takes a connection for eleven round trips (claim the key, lock
//! and write the contact, its segments, counts and outbox, store the
//! result, commit). Here a loop takes the edits waiting and writes up to
//! [`MAX_TOGETHER`] of them with the same round trips, each statement over
//! all of them: a group commit. Nothing waits to fill a group: a group is
//! what queued while the previous ones were written, so an edit alone is
//! written at once.
//!
//! One group holds one tenant's edits, at most one per contact and per
//! idempotency key (the others wait for the next group), so each edit's
//! membership changes and stored response are its own, exactly as when
//! written alone. If anything in a group fails, the group is rolled back
//! and each of its edits is written alone, so an edit's error is its own.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use hibiki_proto::common::v1::TraceContext;
use hibiki_proto::contacts::v1::{MembershipChange, MutationResponse};
use hibiki_runtime::group::{group_commit, take_admitted};
use hibiki_runtime::telemetry;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::{Contacts, Edit, apply_edit};
use crate::error::{Error, Result};
use crate::store::{self, ContactDelta};

/// The most edits written in one transaction.
pub const MAX_TOGETHER: usize = 200;
/// Groups written at once (each on its own connection).
const GROUPS_AT_ONCE: usize = 4;

/// One edit waiting to be written.
pub struct Pending {
    pub tenant: String,
    pub user: String,
    pub key: String,
    pub operation: &'static str,
    pub edit: Edit,
    pub create: bool,
    /// The caller's trace, carried by the edit's membership change records.
    pub trace: TraceContext,
    pub reply: oneshot::Sender<Result<MutationResponse>>,
}

/// Takes the edits waiting and writes them in groups, until every sender
/// is gone.
pub async fn run(contacts: Contacts, edits: mpsc::UnboundedReceiver<Pending>) {
    group_commit(
        edits,
        GROUPS_AT_ONCE,
        4 * MAX_TOGETHER,
        take_group,
        move |group| {
            let contacts = contacts.clone();
            async move { contacts.write_group(group).await }
        },
    )
    .await;
}

/// The first waiting edit's tenant and kind, with every other waiting edit
/// that can share its transaction (up to [`MAX_TOGETHER`]); the rest stay
/// waiting, in order.
fn take_group(waiting: &mut VecDeque<Pending>) -> Vec<Pending> {
    let Some(first) = waiting.front() else {
        return Vec::new();
    };
    let (tenant, create) = (first.tenant.clone(), first.create);
    let mut users: HashSet<String> = HashSet::new();
    let mut keys: HashSet<String> = HashSet::new();
    take_admitted(waiting, |p| {
        let fits = users.len() < MAX_TOGETHER
            && p.tenant == tenant
            && p.create == create
            && !users.contains(&p.user)
            && !keys.contains(&p.key);
        if fits {
            users.insert(p.user.clone());
            keys.insert(p.key.clone());
        }
        fits
    })
}

impl Contacts {
    /// Writes a group, or each of its edits alone if the group fails.
    async fn write_group(&self, group: Vec<Pending>) {
        if group.len() > 1 {
            match self.try_group(&group).await {
                Ok(results) => {
                    metrics::histogram!("hibiki_contacts_edits_per_transaction")
                        .record(group.len() as f64);
                    for (p, result) in group.into_iter().zip(results) {
                        let _ = p.reply.send(result);
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, edits = group.len(), "group of edits rolled back; writing each alone");
                }
            }
        }
        for p in group {
            use tracing::Instrument;
            metrics::histogram!("hibiki_contacts_edits_per_transaction").record(1.0);
            // In the caller's trace, which the edit's records carry on.
            let span = tracing::info_span!("contacts.write_alone");
            telemetry::set_parent(&span, telemetry::context_from_payload(&p.trace));
            let result = self
                .mutate_alone(&p.tenant, &p.user, &p.key, p.operation, &p.edit, p.create)
                .instrument(span)
                .await;
            let _ = p.reply.send(result);
        }
    }

    /// One transaction for the whole group. The outer error rolls it back;
    /// the inner ones are edits answered without writing (a key used before
    /// for another operation).
    async fn try_group(&self, group: &[Pending]) -> Result<Vec<Result<MutationResponse>>> {
        let tenant = group[0].tenant.as_str();
        let create = group[0].create;
        let mut tx = self.begin().await?;

        // Claim the keys; those claimed before answer with what they
        // answered then.
        let keys: Vec<&str> = group.iter().map(|p| p.key.as_str()).collect();
        let operations: Vec<&str> = group.iter().map(|p| p.operation).collect();
        let claimed: HashSet<String> = sqlx::query_scalar(
            "INSERT INTO mutation_results (tenant_id, idempotency_key, operation, response) \
             SELECT $1, k, o, '' FROM unnest($2::text[], $3::text[]) AS x(k, o) ORDER BY k \
             ON CONFLICT DO NOTHING RETURNING idempotency_key",
        )
        .bind(tenant)
        .bind(&keys)
        .bind(&operations)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut results: Vec<Option<Result<MutationResponse>>> =
            group.iter().map(|_| None).collect();
        let before: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| !claimed.contains(*k))
            .collect();
        if !before.is_empty() {
            let stored: HashMap<String, (String, Vec<u8>)> =
                sqlx::query_as::<_, (String, String, Vec<u8>)>(
                    "SELECT idempotency_key, operation, response FROM mutation_results \
                     WHERE tenant_id = $1 AND idempotency_key = ANY($2)",
                )
                .bind(tenant)
                .bind(&before)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|(k, op, response)| (k, (op, response)))
                .collect();
            for (i, p) in group.iter().enumerate() {
                if claimed.contains(&p.key) {
                    continue;
                }
                let (op, response) = stored.get(&p.key).ok_or_else(|| {
                    Error::Database(sqlx::Error::Protocol(format!(
                        "idempotency key {:?} neither claimed nor stored",
                        p.key
                    )))
                })?;
                results[i] = Some(if op != p.operation {
                    Err(Error::invalid(
                        "idempotency_key",
                        format!("was already used for {op}"),
                    ))
                } else {
                    MutationResponse::decode(response.as_slice())
                        .map(|mut r| {
                            r.replayed = true;
                            r
                        })
                        .map_err(|e| Error::Database(sqlx::Error::Decode(e.into())))
                });
            }
        }

        // The edits to write: lock their contacts and apply them.
        let work: Vec<usize> = (0..group.len()).filter(|&i| results[i].is_none()).collect();
        let mut changes_of: HashMap<String, Vec<MembershipChange>> = HashMap::new();
        if !work.is_empty() {
            let users: BTreeSet<String> = work.iter().map(|&i| group[i].user.clone()).collect();
            let mut locked = store::lock_contacts(&mut tx, tenant, &users, create).await?;
            for &i in &work {
                let p = &group[i];
                let row = locked.rows.get_mut(&p.user).ok_or_else(|| {
                    Error::NotFound(format!(
                        "contact {:?} does not exist in tenant {tenant:?}",
                        p.user
                    ))
                })?;
                apply_edit(row, &p.edit, "set")?;
            }
            let mut deltas: Vec<ContactDelta> = work
                .iter()
                .map(|&i| {
                    let user = &group[i].user;
                    ContactDelta::of(
                        &locked.rows[user],
                        locked.before.get(user).cloned().flatten(),
                    )
                })
                .collect();
            let evaluated = store::evaluate_segments(&mut tx, tenant, &mut deltas).await?;
            for delta in deltas {
                if let Some(row) = locked.rows.get_mut(&delta.line_user_id) {
                    row.segs = delta.segs;
                }
            }
            let rows: Vec<&store::ContactRow> = locked.rows.values().collect();
            store::save_contacts(&mut tx, tenant, &rows).await?;
            let trace_of: HashMap<&str, &TraceContext> = work
                .iter()
                .map(|&i| (group[i].user.as_str(), &group[i].trace))
                .collect();
            let mut traced: Vec<(MembershipChange, TraceContext)> = Vec::new();
            for (user, change) in evaluated.count(&mut tx, tenant).await? {
                let trace = trace_of
                    .get(user.as_str())
                    .map(|t| (*t).clone())
                    .unwrap_or_default();
                traced.push((change.clone(), trace));
                changes_of.entry(user).or_default().push(change);
            }
            store::write_outbox_traced(&mut tx, tenant, &traced).await?;
            let mut written_keys = Vec::with_capacity(work.len());
            let mut responses = Vec::with_capacity(work.len());
            for &i in &work {
                let response = MutationResponse {
                    membership_changes: changes_of.remove(&group[i].user).unwrap_or_default(),
                    replayed: false,
                };
                written_keys.push(group[i].key.as_str());
                responses.push(response.encode_to_vec());
                results[i] = Some(Ok(response));
            }
            // Key by key through the primary key, whatever the statistics
            // say (the docs of `store` say why); the rows are this
            // transaction's own.
            sqlx::query(
                "UPDATE mutation_results m SET response = x.r \
                 FROM unnest($2::text[], $3::bytea[]) AS x(k, r) \
                   CROSS JOIN LATERAL (SELECT ctid AS loc FROM mutation_results \
                                        WHERE tenant_id = $1 AND idempotency_key = x.k \
                                        LIMIT 1) AS p \
                 WHERE m.ctid = p.loc",
            )
            .bind(tenant)
            .bind(&written_keys)
            .bind(&responses)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if !work.is_empty() {
            self.relay.wake();
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every edit answered"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(tenant: &str, user: &str, key: &str, create: bool) -> Pending {
        Pending {
            tenant: tenant.into(),
            user: user.into(),
            key: key.into(),
            operation: "AddTags",
            edit: Edit::AddTags(vec!["t".into()]),
            create,
            trace: TraceContext::default(),
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn a_group_takes_one_tenant_one_kind_and_each_contact_and_key_once() {
        let mut waiting: VecDeque<Pending> = [
            pending("acme", "U1", "k1", true),
            pending("acme", "U2", "k2", true),
            pending("globex", "U3", "k3", true),
            pending("acme", "U1", "k4", true),
            pending("acme", "U5", "k2", true),
            pending("acme", "U6", "k6", false),
            pending("acme", "U7", "k7", true),
        ]
        .into();
        let keys = |g: &[Pending]| g.iter().map(|p| p.key.clone()).collect::<Vec<_>>();
        let group = take_group(&mut waiting);
        assert_eq!(keys(&group), ["k1", "k2", "k7"]);
        // The rest wait, in their order.
        let rest: Vec<&str> = waiting.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(rest, ["k3", "k4", "k2", "k6"]);
        assert_eq!(keys(&take_group(&mut waiting)), ["k3"]);
        assert_eq!(keys(&take_group(&mut waiting)), ["k4", "k2"]);
        assert_eq!(keys(&take_group(&mut waiting)), ["k6"]);
        assert!(take_group(&mut waiting).is_empty());
    }

    #[test]
    fn a_group_holds_at_most_max_together() {
        let mut waiting: VecDeque<Pending> = (0..MAX_TOGETHER + 5)
            .map(|i| pending("acme", &format!("U{i}"), &format!("k{i}"), true))
            .collect();
        assert_eq!(take_group(&mut waiting).len(), MAX_TOGETHER);
        assert_eq!(waiting.len(), 5);
    }
}
