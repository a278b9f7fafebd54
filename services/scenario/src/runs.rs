//! Runs in PostgreSQL: started under the re-entry policy (and at most once
//! per triggering event), advanced step by step, parked on durable timers,
//! and claimed by one executor at a time (`FOR UPDATE SKIP LOCKED`, with a
//! lease, so several replicas share them and none runs a step twice at
//! once).
//!
//! # Plans that hold while the table grows
//!
//! A campaign starts tens of thousands of runs a minute, faster than
//! statistics are refreshed, and its scenario is new to them. Looked up by
//! scenario and contact, a contact's earlier runs of the scenario were
//! found through `runs_of_scenario` (stale statistics call a new scenario
//! rare) and filtered by contact: every start walked every run of the
//! campaign (the storm bench, 2026-12-01). They are looked up by contact
//! (`runs_of_contact`: a contact has few runs) and filtered by scenario,
//! written `scenario_id || '' = …` so that no index on the scenario can
//! serve the lookup; so is the run an event started before (the event is
//! its contact's).
//!
//! Statements over a batch go further: each run or contact is its own
//! `LATERAL (… LIMIT 1)` probe, so that no plan can trade a batch's probes
//! for one scan of a table it believes small (the storm, 2026-12-01: with
//! statistics older than the campaign, a quarter of the slow starts and
//! advances read all of `runs`). An advance then updates the row at the
//! `ctid` its probe found.
//!
//! # History on the run
//!
//! A run's executed steps are kept on its own row (`steps`, a JSON array,
//! migration 0005): an advance rewrites the row anyway, while a row per
//! step cost an insert, an index entry and a foreign-key check each.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hibiki_proto::scenario::v1::{ReentryPolicy, Run, RunStatus, StepExecution};
use hibiki_runtime::error::ServiceError;
use hibiki_runtime::timestamp;
use sqlx::PgPool;

/// Result of a run store operation.
pub type Result<T> = std::result::Result<T, ServiceError>;

/// A run with its step history, as `GetRun` shows it.
#[derive(sqlx::FromRow)]
struct RunWithHistory {
    #[sqlx(flatten)]
    run: RunRow,
    step_ids: Vec<String>,
    at: Vec<DateTime<Utc>>,
    details: Vec<String>,
    ok: Vec<bool>,
}

/// A run as the executor holds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunRow {
    pub tenant_id: String,
    pub run_id: String,
    pub scenario_id: String,
    pub version: i64,
    pub line_user_id: String,
    pub channel_id: String,
    pub status: String,
    pub pc: i32,
    pub current_step_id: String,
    pub lease_until: Option<DateTime<Utc>>,
    pub trigger_event_id: String,
    pub reply_token: String,
    pub reply_until: Option<DateTime<Utc>>,
    pub traceparent: String,
    pub error: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl RunRow {
    /// The run as the API shows it (without history).
    pub fn to_proto(&self) -> Run {
        let status = match self.status.as_str() {
            "running" => RunStatus::Running,
            "waiting" => RunStatus::Waiting,
            "completed" => RunStatus::Completed,
            "stopped" => RunStatus::Stopped,
            "failed" => RunStatus::Failed,
            _ => RunStatus::Unspecified,
        };
        Run {
            tenant_id: self.tenant_id.clone(),
            run_id: self.run_id.clone(),
            scenario_id: self.scenario_id.clone(),
            version: self.version,
            line_user_id: self.line_user_id.clone(),
            status: status as i32,
            current_step_id: self.current_step_id.clone(),
            resume_at: (status == RunStatus::Waiting)
                .then_some(self.lease_until)
                .flatten()
                .map(timestamp::to_proto),
            trigger_event_id: self.trigger_event_id.clone(),
            started_at: Some(timestamp::to_proto(self.started_at)),
            finished_at: timestamp::to_proto_opt(self.finished_at),
            history: Vec::new(),
            error: self.error.clone(),
        }
    }

    /// Whether the reply token can still be used.
    pub fn can_reply(&self) -> bool {
        !self.reply_token.is_empty() && self.reply_until.is_some_and(|t| t > Utc::now())
    }
}

/// A run to start.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub tenant_id: String,
    pub run_id: String,
    pub scenario_id: String,
    pub version: i64,
    pub line_user_id: String,
    pub channel_id: String,
    pub trigger_event_id: String,
    pub reply_token: String,
    pub reply_until: Option<DateTime<Utc>>,
    pub traceparent: String,
    /// Queue it for the timer loop instead of walking it now (runs started
    /// by membership changes and manual starts).
    pub queued: bool,
}

/// What starting a run came to.
/// Steps to record for a run, and where it goes next (see
/// [`Runs::advance_many`]).
#[derive(Debug, Clone)]
pub struct Advance {
    pub tenant_id: String,
    pub run_id: String,
    pub pc: usize,
    /// (step id, detail), in order.
    pub steps: Vec<(String, String)>,
    pub reply_used: bool,
    /// `completed` or `stopped` to end the run there.
    pub end: Option<String>,
}

struct PendingAdvance {
    advance: Advance,
    reply: tokio::sync::oneshot::Sender<Result<()>>,
}

/// Records advances of runs, those that arrive while others are written
/// together in one statement (group commit, [`hibiki_runtime::group`]): a
/// storm's walks end by the thousand, each with one advance.
#[derive(Clone)]
pub struct Recorder {
    queue: tokio::sync::mpsc::UnboundedSender<PendingAdvance>,
}

/// The most advances written in one statement.
const MAX_ADVANCES_TOGETHER: usize = 200;

impl Recorder {
    /// Starts the loop that writes through `runs` (on the current tokio
    /// runtime).
    pub fn start(runs: Runs) -> Self {
        let (queue, waiting) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(hibiki_runtime::group::group_commit(
            waiting,
            2,
            4 * MAX_ADVANCES_TOGETHER,
            take_advances,
            move |group| {
                let runs = runs.clone();
                async move { runs.write_advances(group).await }
            },
        ));
        Self { queue }
    }

    /// Records `advance`, once it is durable.
    pub async fn advance(&self, advance: Advance) -> Result<()> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue
            .send(PendingAdvance { advance, reply })
            .map_err(|_| ServiceError::Unavailable("the run recorder stopped".into()))?;
        answer.await.map_err(|_| {
            ServiceError::Unavailable("the run recorder stopped before answering".into())
        })?
    }
}

/// Up to [`MAX_ADVANCES_TOGETHER`] waiting advances, one per run.
fn take_advances(waiting: &mut std::collections::VecDeque<PendingAdvance>) -> Vec<PendingAdvance> {
    let mut runs: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
    hibiki_runtime::group::take_admitted(waiting, |p| {
        runs.len() < MAX_ADVANCES_TOGETHER
            && runs.insert((p.advance.tenant_id.clone(), p.advance.run_id.clone()))
    })
}

#[derive(Debug)]
pub enum Started {
    /// A new run, claimed by the caller.
    New(RunRow),
    /// This event started the run before (a redelivery).
    Before(RunRow),
    /// The re-entry policy forbids it; why.
    Skipped(String),
}

/// When a waiting run resumes.
#[derive(Debug, Clone)]
pub enum Resume {
    /// After this long.
    After(Duration),
    /// At the next hour:minute in this IANA time zone.
    At {
        hour: u32,
        minute: u32,
        zone: String,
    },
}

/// The runs of every tenant.
#[derive(Clone)]
pub struct Runs {
    pool: PgPool,
    lease: Duration,
}

/// The columns of a [`RunRow`], as SELECT and RETURNING lists name them.
macro_rules! run_columns {
    () => {
        "tenant_id, run_id, scenario_id, version, line_user_id, channel_id, status, pc,
         current_step_id, lease_until, trigger_event_id, reply_token, reply_until,
         traceparent, error, started_at, finished_at"
    };
}

/// The advisory lock that makes a start's policy check and its insert one
/// step: one start at a time per (tenant, scenario, contact).
fn lock_key(new: &NewRun) -> String {
    format!("{}/{}/{}", new.tenant_id, new.scenario_id, new.line_user_id)
}

/// What the re-entry policy checks before a start: (any run of the
/// scenario for the contact, a running or waiting one).
fn policy_checks(policy: ReentryPolicy) -> (bool, bool) {
    match policy {
        ReentryPolicy::EveryTime => (false, false),
        ReentryPolicy::Once => (true, false),
        ReentryPolicy::NotWhileRunning => (false, true),
    }
}

macro_rules! select_runs {
    ($rest:literal) => {
        concat!("SELECT ", run_columns!(), " FROM runs ", $rest)
    };
}

impl Runs {
    /// Runs in `pool`; an executor holds a run for `lease` at a time.
    pub fn new(pool: PgPool, lease: Duration) -> Self {
        Self { pool, lease }
    }

    fn lease_secs(&self) -> f64 {
        self.lease.as_secs_f64()
    }

    /// Starts many runs in one transaction: the whole batch's advisory
    /// locks (taken in one order, so two batches never deadlock), then one
    /// guarded INSERT for all of them. Returns, in input order, the run each
    /// start created, or `None` where the guard held it back (a run of the
    /// same event from before, or the re-entry policy): ask [`Runs::start`]
    /// for those, which says why. At most one start per (tenant, scenario,
    /// contact) may be in one call: within one statement they would not see
    /// each other.
    pub async fn start_many(
        &self,
        starts: &[(NewRun, ReentryPolicy)],
    ) -> Result<Vec<Option<RunRow>>> {
        use sqlx::Acquire;
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys: Vec<String> = starts.iter().map(|(n, _)| lock_key(n)).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.len() != starts.len() {
            return Err(ServiceError::Internal(
                "start_many: two starts of the same scenario for one contact".into(),
            ));
        }
        let column =
            |f: fn(&NewRun) -> &str| -> Vec<&str> { starts.iter().map(|(n, _)| f(n)).collect() };
        let tenants = column(|n| &n.tenant_id);
        let run_ids = column(|n| &n.run_id);
        let scenarios = column(|n| &n.scenario_id);
        let users = column(|n| &n.line_user_id);
        let channels = column(|n| &n.channel_id);
        let events = column(|n| &n.trigger_event_id);
        let tokens = column(|n| &n.reply_token);
        let traceparents = column(|n| &n.traceparent);
        let versions: Vec<i64> = starts.iter().map(|(n, _)| n.version).collect();
        let reply_until: Vec<Option<DateTime<Utc>>> =
            starts.iter().map(|(n, _)| n.reply_until).collect();
        let queued: Vec<bool> = starts.iter().map(|(n, _)| n.queued).collect();
        let (check_any, check_active): (Vec<bool>, Vec<bool>) =
            starts.iter().map(|(_, p)| policy_checks(*p)).unzip();

        let mut conn = self.connection().await?;
        let mut tx = conn.begin().await?;
        sqlx::query(
            "SELECT count(pg_advisory_xact_lock(h))
               FROM (SELECT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY 1) AS l",
        )
        .bind(&keys)
        .execute(&mut *tx)
        .await?;
        let started: Vec<RunRow> = sqlx::query_as(concat!(
            "INSERT INTO runs (tenant_id, run_id, scenario_id, version, line_user_id, channel_id,
                               status, lease_until, trigger_event_id, reply_token, reply_until,
                               traceparent)
             SELECT n.tenant_id, n.run_id, n.scenario_id, n.version, n.line_user_id, n.channel_id,
                    CASE WHEN n.queued THEN 'waiting' ELSE 'running' END,
                    CASE WHEN n.queued THEN now() ELSE now() + make_interval(secs => $14) END,
                    n.trigger_event_id, n.reply_token, n.reply_until, n.traceparent
               FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[],
                           $7::text[], $8::text[], $9::timestamptz[], $10::text[], $11::bool[],
                           $12::bool[], $13::bool[])
                    AS n(tenant_id, run_id, scenario_id, version, line_user_id, channel_id,
                         trigger_event_id, reply_token, reply_until, traceparent, queued,
                         check_any, check_active)
                    LEFT JOIN LATERAL (
                      SELECT true AS found FROM runs r
                       WHERE r.tenant_id = n.tenant_id AND r.line_user_id = n.line_user_id
                         AND r.scenario_id || '' = n.scenario_id
                         AND ((n.trigger_event_id <> '' AND r.trigger_event_id = n.trigger_event_id)
                              OR n.check_any
                              OR (n.check_active AND r.status IN ('running', 'waiting')))
                       LIMIT 1) AS earlier ON true
              WHERE earlier.found IS NULL
             RETURNING ",
            run_columns!()
        ))
        .bind(&tenants)
        .bind(&run_ids)
        .bind(&scenarios)
        .bind(&versions)
        .bind(&users)
        .bind(&channels)
        .bind(&events)
        .bind(&tokens)
        .bind(&reply_until)
        .bind(&traceparents)
        .bind(&queued)
        .bind(&check_any)
        .bind(&check_active)
        .bind(self.lease_secs())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut by_id: std::collections::HashMap<String, RunRow> =
            started.into_iter().map(|r| (r.run_id.clone(), r)).collect();
        Ok(run_ids.iter().map(|id| by_id.remove(*id)).collect())
    }

    /// Starts a run under `policy`, at most once per triggering event.
    ///
    /// Under an advisory lock per (scenario, contact), one guarded INSERT
    /// starts the run unless this event started one before or the policy
    /// forbids it; only then is the reason looked up.
    pub async fn start(&self, new: &NewRun, policy: ReentryPolicy) -> Result<Started> {
        use sqlx::Acquire;
        let mut conn = self.connection().await?;
        let mut tx = conn.begin().await?;
        // One start at a time per (scenario, contact): the policy's check
        // and the insert are one step.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(lock_key(new))
            .execute(&mut *tx)
            .await?;
        let (check_any, check_active) = policy_checks(policy);
        let started: Option<RunRow> = sqlx::query_as(concat!(
            "INSERT INTO runs (tenant_id, run_id, scenario_id, version, line_user_id, channel_id,
                               status, lease_until, trigger_event_id, reply_token, reply_until,
                               traceparent)
             SELECT $1, $2, $3, $4, $5, $6,
                    CASE WHEN $12 THEN 'waiting' ELSE 'running' END,
                    CASE WHEN $12 THEN now() ELSE now() + make_interval(secs => $7) END,
                    $8, $9, $10, $11
              WHERE NOT EXISTS (
                      SELECT 1 FROM runs
                       WHERE tenant_id = $1 AND line_user_id = $5 AND scenario_id || '' = $3
                         AND (($8 <> '' AND trigger_event_id = $8)
                              OR $13
                              OR ($14 AND status IN ('running', 'waiting'))))
             RETURNING ",
            run_columns!()
        ))
        .bind(&new.tenant_id)
        .bind(&new.run_id)
        .bind(&new.scenario_id)
        .bind(new.version)
        .bind(&new.line_user_id)
        .bind(&new.channel_id)
        .bind(self.lease_secs())
        .bind(&new.trigger_event_id)
        .bind(&new.reply_token)
        .bind(new.reply_until)
        .bind(&new.traceparent)
        .bind(new.queued)
        .bind(check_any)
        .bind(check_active)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(run) = started {
            tx.commit().await?;
            return Ok(Started::New(run));
        }
        // Not started: this event's run from before, or the policy.
        if !new.trigger_event_id.is_empty() {
            let before: Option<RunRow> = sqlx::query_as(select_runs!(
                "WHERE tenant_id = $1 AND line_user_id = $4 AND scenario_id || '' = $2
                   AND trigger_event_id = $3"
            ))
            .bind(&new.tenant_id)
            .bind(&new.scenario_id)
            .bind(&new.trigger_event_id)
            .bind(&new.line_user_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(run) = before {
                return Ok(Started::Before(run));
            }
        }
        let (other,): (String,) = sqlx::query_as(
            "SELECT run_id FROM runs
              WHERE tenant_id = $1 AND line_user_id = $3 AND scenario_id || '' = $2
                AND (NOT $4 OR status IN ('running', 'waiting'))
              ORDER BY started_at DESC LIMIT 1",
        )
        .bind(&new.tenant_id)
        .bind(&new.scenario_id)
        .bind(&new.line_user_id)
        .bind(check_active)
        .fetch_one(&mut *tx)
        .await?;
        Ok(Started::Skipped(if check_active {
            format!("re-entry policy NOT_WHILE_RUNNING: run {other} is active")
        } else {
            format!("re-entry policy ONCE: the contact ran it before ({other})")
        }))
    }

    /// Why `policy` (or an earlier run of this event) would keep a new run
    /// from starting; `None` when it would start. Reads only.
    pub async fn would_not_start(
        &self,
        tenant_id: &str,
        scenario_id: &str,
        line_user_id: &str,
        trigger_event_id: &str,
        policy: ReentryPolicy,
    ) -> Result<Option<String>> {
        if !trigger_event_id.is_empty() {
            let before: Option<(String,)> = sqlx::query_as(
                "SELECT run_id FROM runs
                  WHERE tenant_id = $1 AND line_user_id = $4 AND scenario_id || '' = $2
                    AND trigger_event_id = $3",
            )
            .bind(tenant_id)
            .bind(scenario_id)
            .bind(trigger_event_id)
            .bind(line_user_id)
            .fetch_optional(&self.pool)
            .await?;
            if let Some((run,)) = before {
                return Ok(Some(format!("this event started run {run} before")));
            }
        }
        let active_only = match policy {
            ReentryPolicy::EveryTime => return Ok(None),
            ReentryPolicy::Once => false,
            ReentryPolicy::NotWhileRunning => true,
        };
        let other: Option<(String,)> = sqlx::query_as(
            "SELECT run_id FROM runs
              WHERE tenant_id = $1 AND line_user_id = $3 AND scenario_id || '' = $2
                AND (NOT $4 OR status IN ('running', 'waiting')) LIMIT 1",
        )
        .bind(tenant_id)
        .bind(scenario_id)
        .bind(line_user_id)
        .bind(active_only)
        .fetch_optional(&self.pool)
        .await?;
        Ok(other.map(|(run,)| {
            if active_only {
                format!("re-entry policy NOT_WHILE_RUNNING: run {run} is active")
            } else {
                format!("re-entry policy ONCE: the contact ran it before ({run})")
            }
        }))
    }

    /// Takes over a run this executor may continue: one whose lease has
    /// passed (a waiting run that is due, or a running one whose executor
    /// stopped), claimed for a new lease. `None` when another holds it.
    pub async fn claim(&self, tenant_id: &str, run_id: &str) -> Result<Option<RunRow>> {
        Ok(sqlx::query_as(concat!(
            "UPDATE runs SET status = 'running', lease_until = now() + make_interval(secs => $3)
              WHERE tenant_id = $1 AND run_id = $2 AND status IN ('running', 'waiting')
                AND lease_until <= now()
             RETURNING ",
            run_columns!()
        ))
        .bind(tenant_id)
        .bind(run_id)
        .bind(self.lease_secs())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Claims up to `limit` runs that are due (waits over, or abandoned by
    /// a stopped executor), skipping those another executor is claiming.
    pub async fn claim_due(&self, limit: i64) -> Result<Vec<RunRow>> {
        Ok(sqlx::query_as(concat!(
            "UPDATE runs SET status = 'running', lease_until = now() + make_interval(secs => $2)
              WHERE (tenant_id, run_id) IN (
                    SELECT tenant_id, run_id FROM runs
                     WHERE status IN ('running', 'waiting') AND lease_until <= now()
                     ORDER BY lease_until LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING ",
            run_columns!()
        ))
        .bind(limit)
        .bind(self.lease_secs())
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records each run's steps (id, detail) in order after its earlier ones
    /// and moves it to its `pc`, forgetting the reply token when it was used
    /// (it works once); with `end` (`completed` or `stopped`) the run ends
    /// there too. One statement for all of them; at most one advance per
    /// run.
    ///
    /// Each run is found key by key (a `LATERAL (… LIMIT 1)` probe of the
    /// primary key) and updated at the `ctid` the probe found, whatever the
    /// statistics say (the module's docs say why). A run whose row another
    /// statement moved between the probe and the update (a timer claiming
    /// it, say) is not updated by it, so those are probed again.
    pub async fn advance_many(&self, advances: &[Advance]) -> Result<()> {
        let mut pending: Vec<&Advance> = advances.iter().collect();
        for _ in 0..3 {
            if pending.is_empty() {
                break;
            }
            let updated = self.advance_where_found(&pending).await?;
            let mut k = 0;
            pending.retain(|_| {
                k += 1;
                updated.binary_search(&(k as i64)).is_err()
            });
        }
        // Whatever is left has no row: a run of a tenant erased meanwhile.
        Ok(())
    }

    /// One statement of [`Runs::advance_many`]: the positions (from 1) of
    /// the advances written.
    async fn advance_where_found(&self, advances: &[&Advance]) -> Result<Vec<i64>> {
        let tenants: Vec<&str> = advances.iter().map(|a| a.tenant_id.as_str()).collect();
        let run_ids: Vec<&str> = advances.iter().map(|a| a.run_id.as_str()).collect();
        let pcs: Vec<i32> = advances.iter().map(|a| a.pc as i32).collect();
        let reply_used: Vec<bool> = advances.iter().map(|a| a.reply_used).collect();
        let ends: Vec<Option<&str>> = advances.iter().map(|a| a.end.as_deref()).collect();
        let mut step_of: Vec<i64> = Vec::new();
        let mut step_ids: Vec<&str> = Vec::new();
        let mut details: Vec<&str> = Vec::new();
        for (k, a) in advances.iter().enumerate() {
            for (id, detail) in &a.steps {
                step_of.push(k as i64 + 1);
                step_ids.push(id);
                details.push(detail);
            }
        }
        let mut updated: Vec<i64> = sqlx::query_scalar(
            "WITH input AS (
               SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bool[], $5::text[])
                        WITH ORDINALITY AS x(tenant_id, run_id, pc, reply_used, end_status, k)),
             steps AS (
               SELECT s.k,
                      jsonb_agg(jsonb_build_object('step', s.step_id, 'at', now(),
                                                   'detail', s.detail, 'ok', true)
                                ORDER BY s.n) AS entries,
                      (array_agg(s.step_id ORDER BY s.n DESC))[1] AS last_step
                 FROM unnest($6::int8[], $7::text[], $8::text[])
                      WITH ORDINALITY AS s(k, step_id, detail, n)
                GROUP BY s.k),
             target AS (
               SELECT i.*, st.entries, st.last_step, p.loc
                 FROM input i
                 LEFT JOIN steps st ON st.k = i.k
                 CROSS JOIN LATERAL (SELECT ctid AS loc FROM runs
                                      WHERE tenant_id = i.tenant_id AND run_id = i.run_id
                                      LIMIT 1) AS p)
             UPDATE runs r SET pc = t.pc,
                    current_step_id = COALESCE(t.last_step, r.current_step_id),
                    steps = r.steps || COALESCE(t.entries, '[]'::jsonb),
                    reply_token = CASE WHEN t.reply_used THEN '' ELSE r.reply_token END,
                    status = COALESCE(t.end_status, r.status),
                    finished_at = CASE WHEN t.end_status IS NULL THEN NULL ELSE now() END,
                    lease_until = CASE WHEN t.end_status IS NULL
                                       THEN now() + make_interval(secs => $9) END
               FROM target t
              WHERE r.ctid = t.loc
             RETURNING t.k",
        )
        .bind(&tenants)
        .bind(&run_ids)
        .bind(&pcs)
        .bind(&reply_used)
        .bind(&ends)
        .bind(&step_of)
        .bind(&step_ids)
        .bind(&details)
        .bind(self.lease_secs())
        .fetch_all(&mut *self.connection().await?)
        .await?;
        updated.sort_unstable();
        Ok(updated)
    }

    /// Writes a group of advances in one statement, or each alone if the
    /// group fails; answers each.
    async fn write_advances(&self, group: Vec<PendingAdvance>) {
        if group.len() > 1 {
            let advances: Vec<Advance> = group.iter().map(|p| p.advance.clone()).collect();
            match self.advance_many(&advances).await {
                Ok(()) => {
                    metrics::histogram!("hibiki_scenario_advances_per_statement")
                        .record(group.len() as f64);
                    for p in group {
                        let _ = p.reply.send(Ok(()));
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, runs = group.len(), "group of advances failed; writing each alone");
                }
            }
        }
        for p in group {
            metrics::histogram!("hibiki_scenario_advances_per_statement").record(1.0);
            let result = self.advance_many(std::slice::from_ref(&p.advance)).await;
            let _ = p.reply.send(result);
        }
    }

    /// A connection from the pool, the wait for it in a span of its own
    /// (`scenario.pool_wait`), so that a trace tells waiting for the pool
    /// from work in PostgreSQL.
    async fn connection(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        use tracing::Instrument;
        Ok(self
            .pool
            .acquire()
            .instrument(tracing::info_span!("scenario.pool_wait"))
            .await?)
    }

    /// Parks the run until `resume`, to continue at `pc`, in one
    /// statement. Returns when.
    pub async fn wait(
        &self,
        run: &RunRow,
        pc: usize,
        step_id: &str,
        resume: &Resume,
    ) -> Result<DateTime<Utc>> {
        let (secs, hour, minute, zone) = match resume {
            Resume::After(d) => (d.as_secs_f64(), -1i32, 0i32, "UTC".to_owned()),
            Resume::At { hour, minute, zone } => (0.0, *hour as i32, *minute as i32, zone.clone()),
        };
        let (until,): (DateTime<Utc>,) = sqlx::query_as(
            "WITH next AS (
               SELECT CASE WHEN $7 < 0 THEN now() + make_interval(secs => $6)
                        ELSE (SELECT CASE WHEN t > now() THEN t ELSE t + interval '1 day' END
                                FROM (SELECT (date_trunc('day', now() AT TIME ZONE $9)
                                              + make_interval(hours => $7, mins => $8))
                                             AT TIME ZONE $9 AS t) AS local)
                      END AS until)
             UPDATE runs SET status = 'waiting', pc = $5, current_step_id = $3,
                    lease_until = next.until,
                    steps = steps || jsonb_build_array(jsonb_build_object(
                      'step', $3::text, 'at', now(), 'ok', true,
                      'detail', $4 || to_char(next.until AT TIME ZONE 'UTC',
                                              'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')))
               FROM next
              WHERE tenant_id = $1 AND run_id = $2
             RETURNING lease_until",
        )
        .bind(&run.tenant_id)
        .bind(&run.run_id)
        .bind(step_id)
        .bind("waiting until ")
        .bind(pc as i32)
        .bind(secs)
        .bind(hour)
        .bind(minute)
        .bind(zone)
        .fetch_one(&self.pool)
        .await?;
        Ok(until)
    }

    /// When a send now is held to, if now is inside the daily quiet window
    /// `start`–`end` ("HH:MM", may wrap midnight) in time zone `zone`.
    pub async fn quiet_until(
        &self,
        zone: &str,
        start: &str,
        end: &str,
    ) -> Result<Option<DateTime<Utc>>> {
        let (until,): (Option<DateTime<Utc>>,) = sqlx::query_as(
            "WITH l AS (SELECT now() AT TIME ZONE $1 AS local)
             SELECT CASE
               WHEN $2::time < $3::time AND local::time >= $2::time AND local::time < $3::time
                 THEN (date_trunc('day', local) + $3::time) AT TIME ZONE $1
               WHEN $2::time > $3::time AND local::time >= $2::time
                 THEN (date_trunc('day', local) + interval '1 day' + $3::time) AT TIME ZONE $1
               WHEN $2::time > $3::time AND local::time < $3::time
                 THEN (date_trunc('day', local) + $3::time) AT TIME ZONE $1
             END FROM l",
        )
        .bind(zone)
        .bind(start)
        .bind(end)
        .fetch_one(&self.pool)
        .await?;
        Ok(until)
    }

    /// Ends the run: `completed`, `stopped` or `failed` (with `error`).
    pub async fn finish(&self, run: &RunRow, status: &str, error: &str) -> Result<()> {
        sqlx::query(
            "UPDATE runs SET status = $3, error = $4, finished_at = now(), lease_until = NULL
              WHERE tenant_id = $1 AND run_id = $2",
        )
        .bind(&run.tenant_id)
        .bind(&run.run_id)
        .bind(status)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One run with its history.
    pub async fn get(&self, tenant_id: &str, run_id: &str) -> Result<Run> {
        // The run and its history in one read, so they are of one moment.
        let row: Option<RunWithHistory> = sqlx::query_as(concat!(
            "SELECT ",
            run_columns!(),
            ", history.* FROM runs, LATERAL (SELECT COALESCE(array_agg(e->>'step' ORDER BY n), '{}') AS step_ids,
                                COALESCE(array_agg((e->>'at')::timestamptz ORDER BY n), '{}') AS at,
                                COALESCE(array_agg(e->>'detail' ORDER BY n), '{}') AS details,
                                COALESCE(array_agg((e->>'ok')::bool ORDER BY n), '{}') AS ok
                           FROM jsonb_array_elements(steps) WITH ORDINALITY AS h(e, n)) AS history
              WHERE tenant_id = $1 AND run_id = $2"
        ))
        .bind(tenant_id)
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(ServiceError::NotFound(format!(
                "run {run_id:?} of tenant {tenant_id:?}"
            )));
        };
        let mut run = row.run.to_proto();
        run.history = row
            .step_ids
            .into_iter()
            .zip(row.at)
            .zip(row.details.into_iter().zip(row.ok))
            .map(|((step_id, at), (detail, ok))| StepExecution {
                step_id,
                executed_at: Some(timestamp::to_proto(at)),
                detail,
                ok,
            })
            .collect();
        Ok(run)
    }

    /// Runs of a contact or of a scenario, newest first, started before
    /// `before` (a page's cursor), at most `limit`.
    pub async fn list(
        &self,
        tenant_id: &str,
        line_user_id: Option<&str>,
        scenario_id: Option<&str>,
        before: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<RunRow>> {
        let (at, id) = match before {
            Some((at, id)) => (Some(at), id),
            None => (None, String::new()),
        };
        Ok(sqlx::query_as(select_runs!(
            "WHERE tenant_id = $1
               AND ($2::text IS NULL OR line_user_id = $2)
               AND ($3::text IS NULL OR scenario_id = $3)
               AND ($4::timestamptz IS NULL OR (started_at, run_id) < ($4, $5))
             ORDER BY started_at DESC, run_id DESC LIMIT $6"
        ))
        .bind(tenant_id)
        .bind(line_user_id)
        .bind(scenario_id)
        .bind(at)
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Counts a scenario's runs (of `version`, or all when 0) started in
    /// `[from, before)`: (entered, completed, ended early) and per step the
    /// runs that executed it.
    pub async fn funnel(
        &self,
        tenant_id: &str,
        scenario_id: &str,
        version: i64,
        from: Option<DateTime<Utc>>,
        before: Option<DateTime<Utc>>,
    ) -> Result<((i64, i64, i64), Vec<(String, i64)>)> {
        let totals: (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*),
                    count(*) FILTER (WHERE status = 'completed'),
                    count(*) FILTER (WHERE status IN ('stopped', 'failed'))
               FROM runs
              WHERE tenant_id = $1 AND scenario_id = $2 AND ($3 = 0 OR version = $3)
                AND ($4::timestamptz IS NULL OR started_at >= $4)
                AND ($5::timestamptz IS NULL OR started_at < $5)",
        )
        .bind(tenant_id)
        .bind(scenario_id)
        .bind(version)
        .bind(from)
        .bind(before)
        .fetch_one(&self.pool)
        .await?;
        let steps: Vec<(String, i64)> = sqlx::query_as(
            "SELECT h.e->>'step', count(DISTINCT r.run_id)
               FROM runs r CROSS JOIN LATERAL jsonb_array_elements(r.steps) AS h(e)
              WHERE r.tenant_id = $1 AND r.scenario_id = $2 AND ($3 = 0 OR r.version = $3)
                AND ($4::timestamptz IS NULL OR r.started_at >= $4)
                AND ($5::timestamptz IS NULL OR r.started_at < $5)
              GROUP BY 1",
        )
        .bind(tenant_id)
        .bind(scenario_id)
        .bind(version)
        .bind(from)
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        Ok((totals, steps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hibiki_runtime::config::{PostgresConfig, Secret};
    use hibiki_testkit::TestDatabase;

    /// The scenario schema's pool of `connections`, migrated.
    async fn pool(database: &TestDatabase, connections: u32) -> PgPool {
        let pool = hibiki_runtime::postgres::connect_lazy(
            &PostgresConfig {
                url: Secret::new(database.url().to_owned()),
                max_connections: connections,
            },
            "scenario",
        )
        .unwrap();
        hibiki_runtime::postgres::migrate(&pool, "scenario", &crate::MIGRATOR)
            .await
            .unwrap();
        pool
    }

    async fn runs(database: &TestDatabase) -> Runs {
        Runs::new(pool(database, 2).await, Duration::from_secs(60))
    }

    fn new(scenario: &str, user: &str, event: &str) -> NewRun {
        NewRun {
            tenant_id: "acme".into(),
            run_id: format!("{scenario}-{event}"),
            scenario_id: scenario.into(),
            version: 1,
            line_user_id: user.into(),
            channel_id: "1000000001".into(),
            trigger_event_id: event.into(),
            reply_token: String::new(),
            reply_until: None,
            traceparent: String::new(),
            queued: false,
        }
    }

    #[tokio::test]
    async fn starts_together_keep_the_guards_of_a_start_alone() {
        let database = TestDatabase::create().await;
        let runs = runs(&database).await;
        let once = ReentryPolicy::Once;
        let every = ReentryPolicy::EveryTime;

        // Three new runs start, in input order.
        let first = [
            (new("spring", "U1", "E1"), once),
            (new("spring", "U2", "E2"), once),
            (new("autumn", "U1", "E3"), every),
        ];
        let started = runs.start_many(&first).await.unwrap();
        let ids: Vec<Option<&str>> = started
            .iter()
            .map(|r| r.as_ref().map(|r| r.run_id.as_str()))
            .collect();
        assert_eq!(
            ids,
            [Some("spring-E1"), Some("spring-E2"), Some("autumn-E3")]
        );
        assert!(started.iter().flatten().all(|r| r.status == "running"));

        // Again, with a redelivered event, a second tap under ONCE, a new
        // tap under EVERY_TIME and a new contact: only the last two start.
        let second = [
            (new("spring", "U2", "E2"), once),
            (new("spring", "U1", "E4"), once),
            (new("autumn", "U1", "E5"), every),
            (new("spring", "U3", "E6"), once),
        ];
        let started = runs.start_many(&second).await.unwrap();
        let ids: Vec<Option<&str>> = started
            .iter()
            .map(|r| r.as_ref().map(|r| r.run_id.as_str()))
            .collect();
        assert_eq!(ids, [None, None, Some("autumn-E5"), Some("spring-E6")]);
        // The single start says why the others were held back.
        assert!(matches!(
            runs.start(&second[0].0, once).await.unwrap(),
            Started::Before(r) if r.run_id == "spring-E2"
        ));
        assert!(matches!(
            runs.start(&second[1].0, once).await.unwrap(),
            Started::Skipped(_)
        ));

        // Two starts of one scenario for one contact cannot share a call.
        let twice = [
            (new("summer", "U1", "E7"), every),
            (new("summer", "U1", "E8"), every),
        ];
        assert!(runs.start_many(&twice).await.is_err());
        assert!(runs.start_many(&[]).await.unwrap().is_empty());
    }

    /// Rows of `runs` that the pool's one connection has read, by index or
    /// by sequential scan, as PostgreSQL's statistics count them (flushed
    /// first: the connection reports them when it goes idle).
    async fn rows_read(pool: &PgPool) -> i64 {
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query_scalar(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
               FROM pg_stat_user_tables WHERE schemaname = 'scenario' AND relname = 'runs'",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_start_reads_the_contacts_runs_not_the_campaigns_whatever_the_statistics_say() {
        let database = TestDatabase::create().await;
        // One connection: the statements measured and the counters read
        // are the same backend's.
        let pool = pool(&database, 1).await;
        let runs = Runs::new(pool.clone(), Duration::from_secs(60));
        let insert = "INSERT INTO runs (tenant_id, run_id, scenario_id, version, line_user_id,
                                        channel_id, status, trigger_event_id)
                      SELECT 'acme', $1 || i, $1, 1, $1 || '-U' || i, '1000000001', 'completed',
                             $1 || '-E' || i
                        FROM generate_series(1, $2) AS i";
        // First with no statistics at all (a fresh database, as `hibiki
        // dev` starts), then with statistics taken before the campaign.
        for (campaign, analyze_first) in [("spring", false), ("summer", true)] {
            if analyze_first {
                sqlx::query("ANALYZE runs").execute(&pool).await.unwrap();
            }
            // The campaign's first 40,000 runs.
            sqlx::query(insert)
                .bind(campaign)
                .bind(40_000)
                .execute(&pool)
                .await
                .unwrap();

            let before = rows_read(&pool).await;
            let starts: Vec<(NewRun, ReentryPolicy)> = (0..50)
                .map(|i| {
                    (
                        new(campaign, &format!("N{i}"), &format!("T{i}")),
                        ReentryPolicy::Once,
                    )
                })
                .collect();
            let started = runs.start_many(&starts).await.unwrap();
            assert!(started.iter().all(Option::is_some));
            // A redelivered tap, and a contact who joined before: held
            // back, and asked why.
            assert!(matches!(
                runs.start(&starts[3].0, ReentryPolicy::Once).await.unwrap(),
                Started::Before(_)
            ));
            let again = new(campaign, &format!("{campaign}-U7"), "T-again");
            assert!(matches!(
                runs.start(&again, ReentryPolicy::Once).await.unwrap(),
                Started::Skipped(_)
            ));
            let read = rows_read(&pool).await - before;
            // Each start reads its contact's runs (none, or one); a plan
            // that walks the campaign's runs reads 40,000 or more.
            assert!(
                read < 1_000,
                "{campaign}: 52 starts read {read} rows of runs: they walked the campaign's runs"
            );
        }
    }

    fn advance(run_id: &str, pc: usize, steps: &[&str], end: Option<&str>) -> Advance {
        Advance {
            tenant_id: "acme".into(),
            run_id: run_id.into(),
            pc,
            steps: steps
                .iter()
                .map(|s| ((*s).to_owned(), format!("{s} done")))
                .collect(),
            reply_used: end.is_some(),
            end: end.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn advances_together_record_each_run_as_if_alone() {
        let database = TestDatabase::create().await;
        let runs = runs(&database).await;
        let once = ReentryPolicy::Once;
        let started = runs
            .start_many(&[
                (new("spring", "U1", "E1"), once),
                (new("spring", "U2", "E2"), once),
                (new("spring", "U3", "E3"), once),
            ])
            .await
            .unwrap();
        assert!(started.iter().all(Option::is_some));

        // One statement: a run that ends after three steps, one that goes
        // on after one, one with nothing to record yet.
        runs.advance_many(&[
            advance(
                "spring-E1",
                3,
                &["tag", "menu", "thanks"],
                Some("completed"),
            ),
            advance("spring-E2", 1, &["tag"], None),
            advance("spring-E3", 0, &[], None),
        ])
        .await
        .unwrap();
        // Then the second run goes on, its steps after its first.
        runs.advance_many(&[advance(
            "spring-E2",
            3,
            &["menu", "thanks"],
            Some("stopped"),
        )])
        .await
        .unwrap();

        let history =
            |run: &Run| -> Vec<String> { run.history.iter().map(|s| s.step_id.clone()).collect() };
        let one = runs.get("acme", "spring-E1").await.unwrap();
        assert_eq!(history(&one), ["tag", "menu", "thanks"]);
        assert_eq!(one.status, RunStatus::Completed as i32);
        assert_eq!(one.current_step_id, "thanks");
        assert!(one.finished_at.is_some());
        let two = runs.get("acme", "spring-E2").await.unwrap();
        assert_eq!(history(&two), ["tag", "menu", "thanks"]);
        assert_eq!(two.status, RunStatus::Stopped as i32);
        let three = runs.get("acme", "spring-E3").await.unwrap();
        assert!(three.history.is_empty());
        assert_eq!(three.status, RunStatus::Running as i32);
        assert_eq!(three.current_step_id, "");

        // Through the recorder, from many callers at once.
        let recorder = Recorder::start(runs.clone());
        let more: Vec<(NewRun, ReentryPolicy)> = (10..60)
            .map(|n| (new("autumn", &format!("U{n}"), &format!("E{n}")), once))
            .collect();
        runs.start_many(&more).await.unwrap();
        let calls = more.iter().map(|(n, _)| {
            let recorder = recorder.clone();
            let id = n.run_id.clone();
            async move {
                recorder
                    .advance(advance(&id, 2, &["a", "b"], Some("completed")))
                    .await
            }
        });
        for result in futures::future::join_all(calls).await {
            result.unwrap();
        }
        for (n, _) in &more {
            let run = runs.get("acme", &n.run_id).await.unwrap();
            assert_eq!(history(&run), ["a", "b"], "{}", n.run_id);
            assert_eq!(run.status, RunStatus::Completed as i32);
        }
    }

    #[tokio::test]
    async fn migration_0005_moves_each_runs_history_onto_its_row_in_order() {
        let database = TestDatabase::create().await;
        let pool = PgPool::connect(database.url()).await.unwrap();
        for sql in [
            include_str!("../migrations/0001_scenarios.sql"),
            include_str!("../migrations/0002_runs.sql"),
            include_str!("../migrations/0003_runs_per_contact_and_scenario.sql"),
            include_str!("../migrations/0004_starts_look_up_the_contact.sql"),
        ] {
            sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        }
        // Two runs with history, written out of order, and one without.
        sqlx::raw_sql(
            "INSERT INTO runs (tenant_id, run_id, scenario_id, version, line_user_id, channel_id, status)
             VALUES ('acme', 'r1', 's', 1, 'U1', '1', 'completed'),
                    ('acme', 'r2', 's', 1, 'U2', '1', 'waiting'),
                    ('acme', 'r3', 's', 1, 'U3', '1', 'running');
             INSERT INTO run_steps (tenant_id, run_id, seq, step_id, executed_at, detail, ok)
             VALUES ('acme', 'r1', 2, 'menu', '2026-12-01T10:00:01Z', 'linked', true),
                    ('acme', 'r1', 1, 'tag', '2026-12-01T10:00:00Z', 'tagged', true),
                    ('acme', 'r1', 3, 'thanks', '2026-12-01T10:00:02Z', 'refused', false),
                    ('acme', 'r2', 1, 'wait', '2026-12-01T11:00:00Z', 'waiting until …', true);",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::raw_sql(include_str!("../migrations/0005_history_on_the_run.sql"))
            .execute(&pool)
            .await
            .unwrap();

        let runs = Runs::new(pool.clone(), Duration::from_secs(60));
        let history = |run: &Run| -> Vec<(String, String, bool, i64)> {
            run.history
                .iter()
                .map(|s| {
                    (
                        s.step_id.clone(),
                        s.detail.clone(),
                        s.ok,
                        s.executed_at.as_ref().unwrap().seconds,
                    )
                })
                .collect()
        };
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap().timestamp();
        let r1 = runs.get("acme", "r1").await.unwrap();
        assert_eq!(
            history(&r1),
            [
                (
                    "tag".into(),
                    "tagged".into(),
                    true,
                    at("2026-12-01T10:00:00Z")
                ),
                (
                    "menu".into(),
                    "linked".into(),
                    true,
                    at("2026-12-01T10:00:01Z")
                ),
                (
                    "thanks".into(),
                    "refused".into(),
                    false,
                    at("2026-12-01T10:00:02Z")
                ),
            ]
        );
        let r2 = runs.get("acme", "r2").await.unwrap();
        assert_eq!(
            history(&r2),
            [(
                "wait".into(),
                "waiting until …".into(),
                true,
                at("2026-12-01T11:00:00Z")
            )]
        );
        assert!(runs.get("acme", "r3").await.unwrap().history.is_empty());
        let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('run_steps')::text")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(table, None, "run_steps is dropped");
    }
}
