//! The executor: reads the event log, applies each batch to contacts, starts
//! the runs whose triggers match, and walks each run's steps; a timer loop
//! continues waiting runs when they are due and takes over runs an executor
//! left behind.
//!
//! - **Order.** A batch from the log is handled user by user, side by side,
//!   and each user's events in order, each run walked to its first wait or
//!   its end before the user's next event: what a scenario did is visible to
//!   the user's next event. The batch is acknowledged after, so a crash
//!   replays it.
//! - **Once.** A run starts at most once per triggering event (a unique
//!   index), and every contacts or delivery call of a step carries
//!   `<run>:<step>` as its idempotency key: a replayed step changes nothing
//!   and sends nothing twice.
//! - **Steps:** tags, attributes and branch conditions through contacts;
//!   rich menus and messages through delivery (a reply while the event's
//!   reply token is fresh, falling back to a push; a push otherwise); waits
//!   as durable timers; stop.
//! - **Failures.** A step whose call is refused for good (INVALID_ARGUMENT,
//!   NOT_FOUND, FAILED_PRECONDITION, PERMISSION_DENIED) fails the run with
//!   the reason. Anything else leaves the run where it stands, and the timer
//!   loop takes it up again when its lease has passed.
//!
//! Quiet hours hold a send (as a push) to the end of the window, in the
//! tenant's time zone.
//!
//! Membership changes contacts reports (after an event, or after a step's
//! tags or attributes) start the scenarios triggered by entering or leaving
//! that segment; those runs are queued for the timer loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hibiki_proto::common::v1::{ContactRef, InboundEvent, inbound_event::Payload};
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{
    AddTagsRequest, ApplyEventsRequest, GetContactRequest, GetTenantRequest, MutationResponse,
    RemoveTagsRequest, SetAttributesRequest,
};
use hibiki_proto::delivery::v1::delivery_service_client::DeliveryServiceClient;
use hibiki_proto::delivery::v1::{
    LinkRichMenuRequest, SendRequest, link_rich_menu_request, send_request,
};
use hibiki_proto::scenario::v1::{ReentryPolicy, step, switch_rich_menu_action, wait_action};
use hibiki_runtime::eventlog::{Consumer, ConsumerConfig, EventLog};
use hibiki_runtime::grpc::ClientInterceptor;
use hibiki_runtime::{Shutdown, telemetry};
use prost::Message;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::conditions;
use crate::matching::Matcher;
use crate::program::{Op, Program};
use crate::runs::{Advance, NewRun, Recorder, Resume, RunRow, Runs, Started};
use crate::store::Scenarios;
use crate::submit::{Editor, Submitter};

type Intercepted =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientInterceptor>;

/// How long a reply token is used after its event (LINE's tokens are
/// short-lived; a later send pushes instead).
const REPLY_WINDOW: Duration = Duration::from_secs(50);
/// How long the enabled scenarios of a tenant are cached: an apply, enable
/// or disable takes effect within this.
const SCENARIO_CACHE: Duration = Duration::from_secs(1);

/// The peers the executor calls.
#[derive(Clone)]
pub struct Peers {
    pub contacts: ContactServiceClient<Intercepted>,
    pub tenants: TenantServiceClient<Intercepted>,
    pub segments:
        hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient<Intercepted>,
    pub delivery: DeliveryServiceClient<Intercepted>,
}

/// An enabled scenario at its current version.
struct Active {
    scenario_id: String,
    version: i64,
    matcher: Matcher,
    reentry: ReentryPolicy,
}

/// A tenant's enabled scenarios and when they were read.
type Cached = (Instant, Arc<Vec<Active>>);

/// The executor of one replica.
pub struct Executor {
    scenarios: Scenarios,
    runs: Runs,
    /// Writes the runs' advances, many in one statement under load.
    recorder: Recorder,
    peers: Peers,
    /// The steps' edits of contacts, many runs' in one RPC under load.
    edit: Editor,
    /// The steps' sends and rich menu links, many runs' in one RPC under
    /// load.
    submit: Submitter,
    active: Mutex<HashMap<String, Cached>>,
    programs: Mutex<HashMap<(String, i64), Arc<Program>>>,
    zones: Mutex<HashMap<String, String>>,
}

/// What a step came to.
enum Done<'p> {
    /// Done: the run goes on at `next`.
    Next {
        step_id: &'p str,
        next: usize,
        detail: String,
        reply_used: bool,
    },
    /// A wait: the run is parked (recorded by the wait).
    Parked,
    /// A stop: the run ends.
    Stopped { step_id: &'p str },
}

/// Why a step did not complete.
enum StepError {
    /// Refused for good: the run fails with this.
    Permanent(String),
    /// Try again later (the run keeps its place).
    Transient(String),
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Permanent(why) | StepError::Transient(why) => f.write_str(why),
        }
    }
}

impl From<tonic::Status> for StepError {
    fn from(s: tonic::Status) -> Self {
        let text = format!("{:?}: {}", s.code(), s.message());
        match s.code() {
            tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition
            | tonic::Code::PermissionDenied => StepError::Permanent(text),
            _ => StepError::Transient(text),
        }
    }
}

impl From<hibiki_runtime::error::ServiceError> for StepError {
    fn from(e: hibiki_runtime::error::ServiceError) -> Self {
        StepError::Transient(e.to_string())
    }
}

/// What a batch worked out for the first event of each user: the runs each
/// event triggers (by event id) and those started together (by run id),
/// each taken once by its event.
#[derive(Default)]
struct StartedTogether(Mutex<Together>);

#[derive(Default)]
struct Together {
    planned: HashMap<String, Vec<(NewRun, ReentryPolicy)>>,
    started: HashMap<String, RunRow>,
}

impl StartedTogether {
    fn planned(&self, event_id: &str) -> Option<Vec<(NewRun, ReentryPolicy)>> {
        self.0
            .lock()
            .expect("batch starts")
            .planned
            .remove(event_id)
    }

    fn take(&self, run_id: &str) -> Option<RunRow> {
        self.0.lock().expect("batch starts").started.remove(run_id)
    }
}

/// Retries a step (or a run's start or record) that failed for a moment in
/// place, instead of leaving the run to wait out its lease (tens of
/// seconds).
async fn quick_retries<T, E, F, Fut>(transient: fn(&E) -> bool, attempt: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    hibiki_runtime::retry::quickly("hibiki_scenario_quick_retries_total", transient, attempt).await
}

fn transient_step(e: &StepError) -> bool {
    matches!(e, StepError::Transient(_))
}

/// A run's start fails only when its store does: worth a quick retry unless
/// the request itself was wrong.
fn transient_store(e: &hibiki_runtime::error::ServiceError) -> bool {
    use hibiki_runtime::error::ServiceError as E;
    matches!(
        e,
        E::Unavailable(_) | E::Aborted(_) | E::ResourceExhausted(_) | E::Internal(_)
    )
}

/// A run id derived from what started it, so a replay finds the same run.
pub fn run_id(tenant_id: &str, scenario_id: &str, event_id: &str) -> String {
    let mut h = Sha256::new();
    for p in [tenant_id, scenario_id, event_id] {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    format!("run_{}", hex::encode(&d[..12]))
}

/// Consumer batches a log consumer works on at once (see `consume`).
const PIPELINE: usize = 4;

/// A batch being handled: the (tenant, user) pairs it holds, and its task.
type InFlight = (
    std::collections::HashSet<(String, String)>,
    tokio::task::JoinHandle<()>,
);

/// Which in-flight batches (oldest first) a new batch holding `users` must
/// wait for: through the newest one that holds one of its users (so each
/// user's events stay in order), or the oldest when PIPELINE are in flight.
/// `None`: it starts now.
fn wait_until<'a>(
    in_flight: impl ExactSizeIterator<Item = &'a std::collections::HashSet<(String, String)>>,
    users: &std::collections::HashSet<(String, String)>,
) -> Option<usize> {
    let len = in_flight.len();
    let mut newest_sharing = None;
    for (k, held) in in_flight.enumerate() {
        if !held.is_disjoint(users) {
            newest_sharing = Some(k);
        }
    }
    newest_sharing.or((len >= PIPELINE).then_some(0))
}

fn user_of(event: &InboundEvent) -> Option<&str> {
    event
        .source
        .as_ref()
        .map(|s| s.user_id.as_str())
        .filter(|u| !u.is_empty())
}

impl Executor {
    pub fn new(scenarios: Scenarios, runs: Runs, peers: Peers) -> Arc<Self> {
        Arc::new(Self {
            scenarios,
            recorder: Recorder::start(runs.clone()),
            runs,
            edit: Editor::start(peers.contacts.clone()),
            submit: Submitter::start(peers.delivery.clone()),
            peers,
            active: Mutex::default(),
            programs: Mutex::default(),
            zones: Mutex::default(),
        })
    }

    /// Runs `consumers` log consumers (the group spreads the log's shards
    /// over them: each shard is read by one, in order, and the consumers
    /// work side by side) and the timer loop, until `shutdown`.
    pub fn start(
        self: &Arc<Self>,
        log: EventLog,
        consumers: usize,
        shutdown: Shutdown,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let base = ConsumerConfig::new("scenario");
        let mut tasks: Vec<_> = (0..consumers.max(1))
            .map(|i| {
                let config = ConsumerConfig {
                    name: format!("{}-{i}", base.name),
                    ..base.clone()
                };
                tokio::spawn(self.clone().consume(log.clone(), config, shutdown.clone()))
            })
            .collect();
        tasks.push(tokio::spawn(self.clone().timers(shutdown)));
        tasks
    }

    async fn consume(self: Arc<Self>, log: EventLog, config: ConsumerConfig, shutdown: Shutdown) {
        let consumer = Arc::new(Consumer::start(log, config));
        // Batches in flight, oldest first, with the users each holds. A
        // batch starts while earlier ones are still walking (one slow walk
        // no longer holds up the shard), except behind a batch that holds
        // one of its users: each user's events stay in order.
        let mut in_flight: std::collections::VecDeque<InFlight> = std::collections::VecDeque::new();
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => break,
                batch = consumer.next() => batch,
            };
            let deliveries = match batch {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "event log unreadable; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if deliveries.is_empty() {
                continue;
            }
            let events: Vec<InboundEvent> = deliveries
                .iter()
                .filter_map(|d| match InboundEvent::decode(d.payload.as_slice()) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::error!(entry = %d.id, error = %e, "undecodable event skipped");
                        None
                    }
                })
                .collect();
            let users: std::collections::HashSet<(String, String)> = events
                .iter()
                .map(|e| {
                    (
                        e.tenant_id.clone(),
                        user_of(e).unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            while in_flight
                .front()
                .is_some_and(|(_, task)| task.is_finished())
            {
                in_flight.pop_front();
            }
            // Behind the batches that hold one of its users, and never more
            // than PIPELINE batches at once.
            while let Some(k) = wait_until(in_flight.iter().map(|(held, _)| held), &users) {
                for (_, task) in in_flight.drain(..=k) {
                    let _ = task.await;
                }
            }
            metrics::gauge!("hibiki_scenario_batches_in_flight").set((in_flight.len() + 1) as f64);
            let (executor, consumer, stop) = (self.clone(), consumer.clone(), shutdown.clone());
            let task = tokio::spawn(async move {
                // Until contacts has taken the batch, nothing else happens
                // to it: the batch is retried, then acknowledged.
                let mut wait = Duration::from_millis(100);
                while let Err(e) = executor.handle(&events).await {
                    if stop.is_triggered() {
                        return;
                    }
                    tracing::warn!(error = %e, "events not applied; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                if let Err(e) = consumer.ack(&deliveries).await {
                    // Not acknowledged: they come again, and change nothing twice.
                    tracing::warn!(error = %e, "events not acknowledged");
                }
            });
            in_flight.push_back((users, task));
        }
        for (_, task) in in_flight {
            let _ = task.await;
        }
        match Arc::try_unwrap(consumer) {
            Ok(consumer) => consumer.stop().await,
            Err(_) => tracing::warn!("event log consumer still shared at shutdown"),
        }
    }

    /// Applies a batch to contacts, then starts and walks the runs it
    /// triggers, event by event.
    pub async fn handle(&self, events: &[InboundEvent]) -> Result<(), String> {
        // ApplyEvents takes one tenant's events at a time, up to 500.
        let mut i = 0;
        while i < events.len() {
            let tenant = &events[i].tenant_id;
            let mut j = i;
            while j < events.len() && events[j].tenant_id == *tenant && j - i < 500 {
                j += 1;
            }
            let applied = self
                .peers
                .contacts
                .clone()
                .apply_events(ApplyEventsRequest {
                    tenant_id: tenant.clone(),
                    events: events[i..j].to_vec(),
                })
                .await;
            let (refused, results) = match applied {
                Ok(r) => (Vec::new(), r.into_inner().results),
                // One event contacts will never take (a malformed user id,
                // say) must not hold up the others: apply them one by one
                // and leave out the refused ones.
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    (self.apply_one_by_one(&events[i..j]).await?, Vec::new())
                }
                Err(s) => return Err(format!("contacts ApplyEvents: {}", s.message())),
            };
            // Users go on side by side; each user's events in order.
            let mut per_user: Vec<(&str, Vec<&InboundEvent>)> = Vec::new();
            for (k, event) in events[i..j].iter().enumerate() {
                if refused.contains(&k) {
                    continue;
                }
                let user = user_of(event).unwrap_or("");
                match per_user.iter_mut().find(|(u, _)| *u == user) {
                    Some((_, list)) => list.push(event),
                    None => per_user.push((user, vec![event])),
                }
            }
            let firsts: Vec<&InboundEvent> = per_user.iter().map(|(_, list)| list[0]).collect();
            let together = &self.start_firsts(&firsts).await;
            let results = &results;
            let work = per_user.into_iter().map(|(_, list)| async move {
                for event in list {
                    self.trigger(event, together)
                        .await
                        .map_err(|e| e.to_string())?;
                    if let Some(result) = results
                        .iter()
                        .find(|r| r.webhook_event_id == event.webhook_event_id)
                    {
                        self.membership(
                            &event.tenant_id,
                            &event.channel_id,
                            &event.webhook_event_id,
                            &result.membership_changes,
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    }
                }
                Ok::<(), String>(())
            });
            for outcome in futures::future::join_all(work).await {
                outcome?;
            }
            i = j;
        }
        Ok(())
    }

    /// Applies events one at a time; returns the positions of those
    /// contacts refused for good (logged and counted, then left out).
    async fn apply_one_by_one(&self, events: &[InboundEvent]) -> Result<Vec<usize>, String> {
        let mut refused = Vec::new();
        for (k, event) in events.iter().enumerate() {
            match self
                .peers
                .contacts
                .clone()
                .apply_events(ApplyEventsRequest {
                    tenant_id: event.tenant_id.clone(),
                    events: vec![event.clone()],
                })
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    tracing::error!(
                        tenant = %event.tenant_id, event = %event.webhook_event_id, error = %s.message(),
                        "event refused by contacts; it starts no scenario"
                    );
                    metrics::counter!("hibiki_scenario_events_refused_total").increment(1);
                    refused.push(k);
                }
                Err(s) => return Err(format!("contacts ApplyEvents: {}", s.message())),
            }
        }
        Ok(refused)
    }

    /// The enabled scenarios of a tenant (cached briefly).
    async fn active(
        &self,
        tenant_id: &str,
    ) -> Result<Arc<Vec<Active>>, hibiki_runtime::error::ServiceError> {
        if let Some((at, list)) = self.active.lock().expect("cache").get(tenant_id)
            && at.elapsed() < SCENARIO_CACHE
        {
            return Ok(list.clone());
        }
        let mut list = Vec::new();
        for s in self.scenarios.enabled(tenant_id).await? {
            let Some(definition) = s.definition.as_ref() else {
                continue;
            };
            match Matcher::new(definition) {
                Ok(matcher) => list.push(Active {
                    scenario_id: s.scenario_id.clone(),
                    version: s.version,
                    matcher,
                    reentry: definition
                        .options
                        .as_ref()
                        .map(|o| o.reentry())
                        .unwrap_or_default(),
                }),
                Err(e) => {
                    tracing::error!(scenario = %s.scenario_id, error = %e, "scenario skipped")
                }
            }
        }
        let list = Arc::new(list);
        self.active
            .lock()
            .expect("cache")
            .insert(tenant_id.to_owned(), (Instant::now(), list.clone()));
        Ok(list)
    }

    /// Starts the runs `event` triggers and walks them, in a span that
    /// continues the event's trace (from the webhook, across the log).
    async fn trigger(
        &self,
        event: &InboundEvent,
        together: &StartedTogether,
    ) -> Result<(), hibiki_runtime::error::ServiceError> {
        let span = tracing::info_span!(
            "scenario.event",
            tenant_id = %event.tenant_id,
            event_type = %event.r#type
        );
        if let Some(trace) = event.trace.as_ref() {
            telemetry::set_parent(&span, telemetry::context_from_payload(trace));
        }
        self.trigger_traced(event, together).instrument(span).await
    }

    /// The runs `event` would start: one per enabled scenario it matches.
    async fn new_runs(
        &self,
        event: &InboundEvent,
    ) -> Result<Vec<(NewRun, ReentryPolicy)>, hibiki_runtime::error::ServiceError> {
        let Some(user) = user_of(event) else {
            return Ok(Vec::new());
        };
        let active = self.active(&event.tenant_id).await?;
        let mut runs = Vec::new();
        for a in active.iter().filter(|a| a.matcher.matches(event)) {
            let reply_token = match &event.payload {
                Some(Payload::Message(_) | Payload::Follow(_) | Payload::Postback(_)) => {
                    event.reply_token.clone()
                }
                _ => String::new(),
            };
            let received = hibiki_runtime::timestamp::from_millis(event.timestamp_ms)
                .unwrap_or_else(chrono::Utc::now);
            let new = NewRun {
                tenant_id: event.tenant_id.clone(),
                run_id: run_id(&event.tenant_id, &a.scenario_id, &event.webhook_event_id),
                scenario_id: a.scenario_id.clone(),
                version: a.version,
                line_user_id: user.to_owned(),
                channel_id: event.channel_id.clone(),
                trigger_event_id: event.webhook_event_id.clone(),
                reply_until: (!reply_token.is_empty()).then(|| {
                    received + chrono::Duration::from_std(REPLY_WINDOW).expect("a short window")
                }),
                reply_token,
                traceparent: event
                    .trace
                    .as_ref()
                    .map(|t| t.traceparent.clone())
                    .unwrap_or_default(),
                queued: false,
            };
            runs.push((new, a.reentry));
        }
        Ok(runs)
    }

    /// Starts together, in one transaction, the runs that the first event
    /// of each user in a batch triggers: under a storm the batch's starts
    /// take one connection for four round trips instead of one for four
    /// round trips each. Returns each event's planned runs and the runs
    /// started. A failure starts nothing here; each event then starts its
    /// runs on its own.
    async fn start_firsts(&self, firsts: &[&InboundEvent]) -> StartedTogether {
        let mut together = Together::default();
        let mut starts = Vec::new();
        for event in firsts {
            match self.new_runs(event).await {
                Ok(runs) => {
                    starts.extend(runs.iter().cloned());
                    together
                        .planned
                        .insert(event.webhook_event_id.clone(), runs);
                }
                Err(_) => return StartedTogether::default(),
            }
        }
        if starts.len() >= 2 {
            let started = quick_retries(transient_store, || {
                self.runs
                    .start_many(&starts)
                    .instrument(tracing::info_span!(
                        "scenario.start_runs",
                        runs = starts.len()
                    ))
            })
            .await;
            match started {
                Ok(rows) => {
                    together.started = rows
                        .into_iter()
                        .flatten()
                        .map(|r| (r.run_id.clone(), r))
                        .collect();
                }
                Err(e) => {
                    tracing::warn!(error = %e, runs = starts.len(), "batch start failed; starting one by one");
                }
            }
        }
        StartedTogether(Mutex::new(together))
    }

    async fn trigger_traced(
        &self,
        event: &InboundEvent,
        together: &StartedTogether,
    ) -> Result<(), hibiki_runtime::error::ServiceError> {
        let runs = match together.planned(&event.webhook_event_id) {
            Some(runs) => runs,
            None => self.new_runs(event).await?,
        };
        for (new, reentry) in runs {
            let started = match together.take(&new.run_id) {
                Some(run) => Started::New(run),
                None => {
                    quick_retries(transient_store, || {
                        self.runs
                            .start(&new, reentry)
                            .instrument(tracing::info_span!("scenario.start_run"))
                    })
                    .await?
                }
            };
            let run = match started {
                Started::New(run) => run,
                // A redelivered event: continue its run if nobody holds it.
                Started::Before(run) => match self.runs.claim(&run.tenant_id, &run.run_id).await? {
                    Some(run) => run,
                    None => continue,
                },
                Started::Skipped(why) => {
                    tracing::debug!(scenario = %new.scenario_id, user = %new.line_user_id, why, "run not started");
                    continue;
                }
            };
            self.walk(run).await;
        }
        Ok(())
    }

    /// Queues the runs that contacts' membership `changes` start: scenarios
    /// triggered by entering or leaving a segment. `origin` (the event, or
    /// the run and step that changed the contact) keys them, so a replay
    /// starts nothing twice.
    async fn membership(
        &self,
        tenant_id: &str,
        channel_id: &str,
        origin: &str,
        changes: &[hibiki_proto::contacts::v1::MembershipChange],
    ) -> Result<(), hibiki_runtime::error::ServiceError> {
        if changes.is_empty() {
            return Ok(());
        }
        let active = self.active(tenant_id).await?;
        for change in changes {
            for a in active.iter().filter(|a| {
                a.matcher
                    .matches_membership(&change.segment_id, change.entered)
            }) {
                let trigger = format!(
                    "{origin}:{}:{}",
                    change.segment_id,
                    if change.entered { "entered" } else { "exited" }
                );
                let channel = if a.matcher.channel_id().is_empty() {
                    channel_id
                } else {
                    a.matcher.channel_id()
                };
                let new = NewRun {
                    tenant_id: tenant_id.to_owned(),
                    run_id: run_id(tenant_id, &a.scenario_id, &trigger),
                    scenario_id: a.scenario_id.clone(),
                    version: a.version,
                    line_user_id: change.line_user_id.clone(),
                    channel_id: channel.to_owned(),
                    trigger_event_id: trigger,
                    reply_token: String::new(),
                    reply_until: None,
                    traceparent: String::new(),
                    queued: true,
                };
                if let Started::Skipped(why) = self.runs.start(&new, a.reentry).await? {
                    tracing::debug!(scenario = %a.scenario_id, why, "run not started");
                }
            }
        }
        Ok(())
    }

    async fn timers(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            match self.runs.claim_due(50).await {
                Ok(runs) if !runs.is_empty() => {
                    for run in runs {
                        // A resumed run continues the trace it started in.
                        let span = tracing::info_span!(
                            "scenario.resume",
                            tenant_id = %run.tenant_id,
                            run_id = %run.run_id
                        );
                        if !run.traceparent.is_empty() {
                            let trace = hibiki_proto::common::v1::TraceContext {
                                traceparent: run.traceparent.clone(),
                                tracestate: String::new(),
                            };
                            telemetry::set_parent(&span, telemetry::context_from_payload(&trace));
                        }
                        self.walk(run).instrument(span).await;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "due runs not claimed; retrying"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// The compiled program of a scenario version.
    async fn program(
        &self,
        run: &RunRow,
    ) -> Result<Arc<Program>, hibiki_runtime::error::ServiceError> {
        let key = (run.scenario_id.clone(), run.version);
        if let Some(p) = self.programs.lock().expect("programs").get(&key) {
            return Ok(p.clone());
        }
        let scenario = self
            .scenarios
            .get(&run.tenant_id, &run.scenario_id, run.version)
            .await?;
        let program = Arc::new(Program::compile(&scenario.definition.unwrap_or_default()));
        self.programs
            .lock()
            .expect("programs")
            .insert(key, program.clone());
        Ok(program)
    }

    /// Walks a claimed run from its counter to its first wait or its end.
    ///
    /// Steps are recorded together, in one statement, when the run parks,
    /// ends or cannot go on: a crash before that replays them, and their
    /// idempotency keys make the replay change and send nothing twice.
    async fn walk(&self, mut run: RunRow) {
        let program = match self.program(&run).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(run = %run.run_id, error = %e, "run's program not loaded; it is taken up again later");
                return;
            }
        };
        let mut pc = run.pc.max(0) as usize;
        let mut done: Vec<(String, String)> = Vec::new();
        let mut reply_used = false;
        loop {
            let Some(op) = program.ops.get(pc) else {
                self.record(&run, pc, &done, reply_used, Some("completed"))
                    .await;
                return;
            };
            let result = match op {
                Op::Jump(to) => {
                    pc = *to;
                    continue;
                }
                Op::Branch {
                    step_id,
                    condition,
                    otherwise,
                } => match quick_retries(transient_step, || self.branch(&run, condition)).await {
                    Ok(holds) => {
                        let next = if holds { pc + 1 } else { *otherwise };
                        let detail = if holds {
                            "condition held"
                        } else {
                            "condition did not hold"
                        };
                        Ok(Done::Next {
                            step_id,
                            next,
                            detail: detail.to_owned(),
                            reply_used: false,
                        })
                    }
                    Err(e) => Err(e),
                },
                Op::Step(s) => {
                    if matches!(s.action, Some(step::Action::Wait(_))) && !done.is_empty() {
                        // The wait records itself; what came before first.
                        if !self.record(&run, pc, &done, reply_used, None).await {
                            return;
                        }
                        done.clear();
                    }
                    quick_retries(transient_step, || self.step(&run, &program, pc, s)).await
                }
            };
            match result {
                Ok(Done::Next {
                    step_id,
                    next,
                    detail,
                    reply_used: used,
                }) => {
                    done.push((step_id.to_owned(), detail));
                    if used {
                        reply_used = true;
                        run.reply_token.clear();
                    }
                    if program.ends_at(next) {
                        self.record(&run, next, &done, reply_used, Some("completed"))
                            .await;
                        return;
                    }
                    pc = next;
                }
                Ok(Done::Stopped { step_id }) => {
                    done.push((step_id.to_owned(), "stopped".to_owned()));
                    self.record(&run, pc + 1, &done, reply_used, Some("stopped"))
                        .await;
                    return;
                }
                Ok(Done::Parked) => return,
                Err(StepError::Permanent(why)) => {
                    if self.record(&run, pc, &done, reply_used, None).await {
                        self.end(&run, "failed", &why).await;
                    }
                    return;
                }
                Err(StepError::Transient(why)) => {
                    self.record(&run, pc, &done, reply_used, None).await;
                    tracing::warn!(run = %run.run_id, error = %why, "step not done; the run is taken up again when its lease has passed");
                    return;
                }
            }
        }
    }

    /// Records `done` steps and moves the run to `pc` (ending it with
    /// `end`); false when that failed (the run is taken up again later and
    /// replays them).
    async fn record(
        &self,
        run: &RunRow,
        pc: usize,
        done: &[(String, String)],
        reply_used: bool,
        end: Option<&str>,
    ) -> bool {
        let advance = Advance {
            tenant_id: run.tenant_id.clone(),
            run_id: run.run_id.clone(),
            pc,
            steps: done.to_vec(),
            reply_used,
            end: end.map(str::to_owned),
        };
        let recorded = quick_retries(transient_store, || {
            self.recorder
                .advance(advance.clone())
                .instrument(tracing::info_span!("scenario.record_steps"))
        })
        .await;
        match recorded {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(run = %run.run_id, error = %e, "steps not recorded; the run is taken up again later");
                false
            }
        }
    }

    async fn end(&self, run: &RunRow, status: &str, error: &str) {
        if let Err(e) = self.runs.finish(run, status, error).await {
            tracing::warn!(run = %run.run_id, error = %e, "run end not recorded; it is taken up again later");
        }
    }

    fn contact(run: &RunRow) -> Option<ContactRef> {
        Some(ContactRef {
            tenant_id: run.tenant_id.clone(),
            line_user_id: run.line_user_id.clone(),
        })
    }

    async fn branch(
        &self,
        run: &RunRow,
        c: &hibiki_proto::scenario::v1::Condition,
    ) -> Result<bool, StepError> {
        let contact = self
            .peers
            .contacts
            .clone()
            .get_contact(GetContactRequest {
                contact: Self::contact(run),
            })
            .await?
            .into_inner();
        let segments = contact.segment_ids.iter().cloned().collect();
        Ok(conditions::holds(c, &contact, &segments))
    }

    /// Runs one step's action; the caller records it.
    async fn step<'p>(
        &self,
        run: &RunRow,
        program: &Program,
        pc: usize,
        s: &'p hibiki_proto::scenario::v1::Step,
    ) -> Result<Done<'p>, StepError> {
        let key = format!("{}:{}", run.run_id, s.id);
        let mut reply_used = false;
        let detail = match &s.action {
            None => return Err(StepError::Permanent(format!("step {} has no action", s.id))),
            Some(step::Action::AddTags(t)) => {
                let answer = self
                    .edit
                    .add_tags(AddTagsRequest {
                        contact: Self::contact(run),
                        tags: t.tags.clone(),
                        idempotency_key: key.clone(),
                    })
                    .await;
                self.changed(run, &key, answer).await?;
                format!("tags added: {}", t.tags.join(", "))
            }
            Some(step::Action::RemoveTags(t)) => {
                let answer = self
                    .edit
                    .remove_tags(RemoveTagsRequest {
                        contact: Self::contact(run),
                        tags: t.tags.clone(),
                        idempotency_key: key.clone(),
                    })
                    .await;
                self.changed(run, &key, answer).await?;
                format!("tags removed: {}", t.tags.join(", "))
            }
            Some(step::Action::SetAttributes(a)) => {
                let answer = self
                    .edit
                    .set_attributes(SetAttributesRequest {
                        contact: Self::contact(run),
                        set: a.set.clone(),
                        unset: Vec::new(),
                        idempotency_key: key.clone(),
                    })
                    .await;
                self.changed(run, &key, answer).await?;
                let mut keys: Vec<&str> = a.set.keys().map(String::as_str).collect();
                keys.sort_unstable();
                format!("attributes set: {}", keys.join(", "))
            }
            Some(step::Action::SwitchRichMenu(m)) => {
                let menu = match &m.menu {
                    Some(switch_rich_menu_action::Menu::Alias(a)) => {
                        link_rich_menu_request::Menu::Alias(a.clone())
                    }
                    Some(switch_rich_menu_action::Menu::RichMenuId(id)) => {
                        link_rich_menu_request::Menu::RichMenuId(id.clone())
                    }
                    None => return Err(StepError::Permanent("no rich menu".into())),
                };
                let job = self
                    .submit
                    .link_rich_menu(LinkRichMenuRequest {
                        tenant_id: run.tenant_id.clone(),
                        channel_id: run.channel_id.clone(),
                        idempotency_key: key,
                        user_id: run.line_user_id.clone(),
                        menu: Some(menu),
                    })
                    .await?;
                format!("rich menu link queued: delivery job {}", job.job_id)
            }
            Some(step::Action::SendMessages(send)) => {
                // Quiet hours: held to the end of the window (as a push:
                // the reply token will have expired by then).
                let held = match &program.quiet_hours {
                    Some(q) => {
                        let hhmm = |t: &Option<hibiki_proto::scenario::v1::TimeOfDay>| {
                            t.as_ref()
                                .map(|t| format!("{:02}:{:02}", t.hour, t.minute))
                                .unwrap_or_default()
                        };
                        let zone = self.zone(&run.tenant_id).await?;
                        self.runs
                            .quiet_until(&zone, &hhmm(&q.start), &hhmm(&q.end))
                            .await?
                    }
                    None => None,
                };
                let target = if held.is_none() && run.can_reply() {
                    reply_used = true;
                    send_request::Target::ReplyToken(run.reply_token.clone())
                } else {
                    send_request::Target::PushTo(run.line_user_id.clone())
                };
                let job = self
                    .submit
                    .send(SendRequest {
                        tenant_id: run.tenant_id.clone(),
                        channel_id: run.channel_id.clone(),
                        idempotency_key: key,
                        target: Some(target),
                        reply_fallback_to: run.line_user_id.clone(),
                        messages_json: send.messages_json.clone(),
                        notification_disabled: send.notification_disabled,
                        not_before: held.map(hibiki_runtime::timestamp::to_proto),
                    })
                    .await?;
                match held {
                    Some(t) => format!(
                        "messages queued, held for quiet hours until {}: delivery job {}",
                        t.to_rfc3339(),
                        job.job_id
                    ),
                    None => format!("messages queued: delivery job {}", job.job_id),
                }
            }
            Some(step::Action::Wait(w)) => {
                let resume = match &w.until {
                    Some(wait_action::Until::Duration(d)) => {
                        Resume::After(Duration::from_secs(d.seconds.max(0) as u64))
                    }
                    Some(wait_action::Until::TimeOfDay(t)) => Resume::At {
                        hour: t.hour,
                        minute: t.minute,
                        zone: self.zone(&run.tenant_id).await?,
                    },
                    None => return Err(StepError::Permanent("a wait without its time".into())),
                };
                self.runs.wait(run, pc + 1, &s.id, &resume).await?;
                return Ok(Done::Parked);
            }
            Some(step::Action::Branch(_)) => {
                return Err(StepError::Permanent("a branch outside the program".into()));
            }
            Some(step::Action::Stop(_)) => return Ok(Done::Stopped { step_id: &s.id }),
        };
        Ok(Done::Next {
            step_id: &s.id,
            next: pc + 1,
            detail,
            reply_used,
        })
    }

    /// Takes contacts' answer to a step's edit of the contact: the
    /// scenarios its membership changes start are queued, keyed by the step.
    async fn changed(
        &self,
        run: &RunRow,
        key: &str,
        answer: Result<MutationResponse, tonic::Status>,
    ) -> Result<(), StepError> {
        let changes = answer?.membership_changes;
        self.membership(&run.tenant_id, &run.channel_id, key, &changes)
            .await?;
        Ok(())
    }

    /// The tenant's IANA time zone (from contacts, cached).
    async fn zone(&self, tenant_id: &str) -> Result<String, StepError> {
        if let Some(z) = self.zones.lock().expect("zones").get(tenant_id) {
            return Ok(z.clone());
        }
        let tenant = self
            .peers
            .tenants
            .clone()
            .get_tenant(GetTenantRequest {
                tenant_id: tenant_id.to_owned(),
            })
            .await?
            .into_inner();
        let zone = if tenant.time_zone.is_empty() {
            "UTC".to_owned()
        } else {
            tenant.time_zone
        };
        self.zones
            .lock()
            .expect("zones")
            .insert(tenant_id.to_owned(), zone.clone());
        Ok(zone)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::{PIPELINE, wait_until};

    fn users(names: &[&str]) -> HashSet<(String, String)> {
        names
            .iter()
            .map(|u| ("acme".to_owned(), (*u).to_owned()))
            .collect()
    }

    #[test]
    fn a_batch_waits_only_behind_batches_that_hold_its_users_or_a_full_pipeline() {
        let in_flight = [users(&["a", "b"]), users(&["c"]), users(&["b", "d"])];
        // Strangers start at once.
        assert_eq!(wait_until(in_flight.iter(), &users(&["x", "y"])), None);
        // b is in the first and the third: through the third.
        assert_eq!(wait_until(in_flight.iter(), &users(&["b"])), Some(2));
        assert_eq!(wait_until(in_flight.iter(), &users(&["c", "z"])), Some(1));
        // Another tenant's "a" is another user.
        let other: HashSet<(String, String)> = [("globex".to_owned(), "a".to_owned())].into();
        assert_eq!(wait_until(in_flight.iter(), &other), None);
        // A full pipeline: the oldest first.
        let full: Vec<_> = (0..PIPELINE).map(|k| users(&[&k.to_string()])).collect();
        assert_eq!(wait_until(full.iter(), &users(&["x"])), Some(0));
    }
}
