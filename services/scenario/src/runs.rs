//! Runs in PostgreSQL: started under the re-entry policy (and at most once
//! per triggering event), advanced step by step, parked on durable timers,
//! and claimed by one executor at a time (`FOR UPDATE SKIP LOCKED`, with a
//! lease, so several replicas share them and none runs a step twice at
//! once).

use std::time::Duration;

use chrono::{DateTime, Utc};
use hibiki_proto::scenario::v1::{ReentryPolicy, Run, RunStatus, StepExecution};
use hibiki_runtime::error::ServiceError;
use hibiki_runtime::timestamp;
use sqlx::PgPool;

/// Result of a run store operation.
pub type Result<T> = std::result::Result<T, ServiceError>;

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

macro_rules! select_runs {
    ($rest:literal) => {
        concat!(
            "SELECT tenant_id, run_id, scenario_id, version, line_user_id, channel_id, status, pc,
                    current_step_id, lease_until, trigger_event_id, reply_token, reply_until,
                    traceparent, error, started_at, finished_at
               FROM runs ",
            $rest
        )
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

    /// Starts a run under `policy`, at most once per triggering event.
    pub async fn start(&self, new: &NewRun, policy: ReentryPolicy) -> Result<Started> {
        let mut tx = self.pool.begin().await?;
        // One start at a time per (scenario, contact): the policy's check
        // and the insert are one step.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!(
                "{}/{}/{}",
                new.tenant_id, new.scenario_id, new.line_user_id
            ))
            .execute(&mut *tx)
            .await?;
        if !new.trigger_event_id.is_empty() {
            let before: Option<RunRow> = sqlx::query_as(select_runs!(
                "WHERE tenant_id = $1 AND scenario_id = $2 AND trigger_event_id = $3"
            ))
            .bind(&new.tenant_id)
            .bind(&new.scenario_id)
            .bind(&new.trigger_event_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(run) = before {
                return Ok(Started::Before(run));
            }
        }
        let blocking: Option<(String,)> = match policy {
            ReentryPolicy::EveryTime => None,
            ReentryPolicy::Once => {
                sqlx::query_as(
                    "SELECT run_id FROM runs
                      WHERE tenant_id = $1 AND scenario_id = $2 AND line_user_id = $3 LIMIT 1",
                )
                .bind(&new.tenant_id)
                .bind(&new.scenario_id)
                .bind(&new.line_user_id)
                .fetch_optional(&mut *tx)
                .await?
            }
            ReentryPolicy::NotWhileRunning => {
                sqlx::query_as(
                    "SELECT run_id FROM runs
                      WHERE tenant_id = $1 AND scenario_id = $2 AND line_user_id = $3
                        AND status IN ('running', 'waiting') LIMIT 1",
                )
                .bind(&new.tenant_id)
                .bind(&new.scenario_id)
                .bind(&new.line_user_id)
                .fetch_optional(&mut *tx)
                .await?
            }
        };
        if let Some((other,)) = blocking {
            let why = match policy {
                ReentryPolicy::Once => {
                    format!("re-entry policy ONCE: the contact ran it before ({other})")
                }
                _ => format!("re-entry policy NOT_WHILE_RUNNING: run {other} is active"),
            };
            return Ok(Started::Skipped(why));
        }
        let run: RunRow = sqlx::query_as(
            "INSERT INTO runs (tenant_id, run_id, scenario_id, version, line_user_id, channel_id,
                               status, lease_until, trigger_event_id, reply_token, reply_until,
                               traceparent)
             VALUES ($1, $2, $3, $4, $5, $6,
                     CASE WHEN $12 THEN 'waiting' ELSE 'running' END,
                     CASE WHEN $12 THEN now() ELSE now() + make_interval(secs => $7) END,
                     $8, $9, $10, $11)
             RETURNING tenant_id, run_id, scenario_id, version, line_user_id, channel_id, status,
                       pc, current_step_id, lease_until, trigger_event_id, reply_token,
                       reply_until, traceparent, error, started_at, finished_at",
        )
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
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Started::New(run))
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
                  WHERE tenant_id = $1 AND scenario_id = $2 AND trigger_event_id = $3",
            )
            .bind(tenant_id)
            .bind(scenario_id)
            .bind(trigger_event_id)
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
              WHERE tenant_id = $1 AND scenario_id = $2 AND line_user_id = $3
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
        Ok(sqlx::query_as(
            "UPDATE runs SET status = 'running', lease_until = now() + make_interval(secs => $3)
              WHERE tenant_id = $1 AND run_id = $2 AND status IN ('running', 'waiting')
                AND lease_until <= now()
             RETURNING tenant_id, run_id, scenario_id, version, line_user_id, channel_id, status,
                       pc, current_step_id, lease_until, trigger_event_id, reply_token,
                       reply_until, traceparent, error, started_at, finished_at",
        )
        .bind(tenant_id)
        .bind(run_id)
        .bind(self.lease_secs())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Claims up to `limit` runs that are due (waits over, or abandoned by
    /// a stopped executor), skipping those another executor is claiming.
    pub async fn claim_due(&self, limit: i64) -> Result<Vec<RunRow>> {
        Ok(sqlx::query_as(
            "UPDATE runs SET status = 'running', lease_until = now() + make_interval(secs => $2)
              WHERE (tenant_id, run_id) IN (
                    SELECT tenant_id, run_id FROM runs
                     WHERE status IN ('running', 'waiting') AND lease_until <= now()
                     ORDER BY lease_until LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING tenant_id, run_id, scenario_id, version, line_user_id, channel_id, status,
                       pc, current_step_id, lease_until, trigger_event_id, reply_token,
                       reply_until, traceparent, error, started_at, finished_at",
        )
        .bind(limit)
        .bind(self.lease_secs())
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records a step and moves the run to `pc`; `reply_used` forgets the
    /// reply token (it works once).
    pub async fn step_done(
        &self,
        run: &RunRow,
        pc: usize,
        step_id: &str,
        detail: &str,
        reply_used: bool,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE runs SET pc = $3, current_step_id = $4,
                    reply_token = CASE WHEN $5 THEN '' ELSE reply_token END,
                    lease_until = now() + make_interval(secs => $6)
              WHERE tenant_id = $1 AND run_id = $2",
        )
        .bind(&run.tenant_id)
        .bind(&run.run_id)
        .bind(pc as i32)
        .bind(step_id)
        .bind(reply_used)
        .bind(self.lease_secs())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO run_steps (tenant_id, run_id, seq, step_id, detail, ok)
             SELECT $1, $2, COALESCE(max(seq), 0) + 1, $3, $4, true
               FROM run_steps WHERE tenant_id = $1 AND run_id = $2",
        )
        .bind(&run.tenant_id)
        .bind(&run.run_id)
        .bind(step_id)
        .bind(detail)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Parks the run until `resume`, to continue at `pc`. Returns when.
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
        let mut tx = self.pool.begin().await?;
        let (until,): (DateTime<Utc>,) = sqlx::query_as(
            "UPDATE runs SET status = 'waiting', pc = $3, current_step_id = $4,
                    lease_until = CASE WHEN $6 < 0 THEN now() + make_interval(secs => $5)
                      ELSE (SELECT CASE WHEN t > now() THEN t ELSE t + interval '1 day' END
                              FROM (SELECT (date_trunc('day', now() AT TIME ZONE $8)
                                            + make_interval(hours => $6, mins => $7))
                                           AT TIME ZONE $8 AS t) AS next)
                    END
              WHERE tenant_id = $1 AND run_id = $2
             RETURNING lease_until",
        )
        .bind(&run.tenant_id)
        .bind(&run.run_id)
        .bind(pc as i32)
        .bind(step_id)
        .bind(secs)
        .bind(hour)
        .bind(minute)
        .bind(zone)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO run_steps (tenant_id, run_id, seq, step_id, detail, ok)
             SELECT $1, $2, COALESCE(max(seq), 0) + 1, $3, $4, true
               FROM run_steps WHERE tenant_id = $1 AND run_id = $2",
        )
        .bind(&run.tenant_id)
        .bind(&run.run_id)
        .bind(step_id)
        .bind(format!("waiting until {}", until.to_rfc3339()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
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
        let row: Option<RunRow> =
            sqlx::query_as(select_runs!("WHERE tenant_id = $1 AND run_id = $2"))
                .bind(tenant_id)
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?;
        let Some(row) = row else {
            return Err(ServiceError::NotFound(format!(
                "run {run_id:?} of tenant {tenant_id:?}"
            )));
        };
        let steps: Vec<(String, DateTime<Utc>, String, bool)> = sqlx::query_as(
            "SELECT step_id, executed_at, detail, ok FROM run_steps
              WHERE tenant_id = $1 AND run_id = $2 ORDER BY seq",
        )
        .bind(tenant_id)
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        let mut run = row.to_proto();
        run.history = steps
            .into_iter()
            .map(|(step_id, at, detail, ok)| StepExecution {
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
}
