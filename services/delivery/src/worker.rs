//! The workers that empty delivery's queues into LINE.
//!
//! Each replica runs one dispatcher. It watches the set of queues with work
//! and takes a lease on each free one; the lease holder alone reads that
//! queue, so a channel's calls are coalesced in one place. Per queue:
//!
//! 1. A new owner first claims the calls a previous owner left pending
//!    (`XAUTOCLAIM`): a worker that died mid-call is reclaimed, and the
//!    call goes out again with the same retry key (LINE answers 409).
//! 2. Rich menu links to one menu are gathered into a bulk link as they
//!    are queued (`queue::ENQUEUE_LINK`): a full bulk link of 500 is queued
//!    by the link that fills it, and the owner seals a partial one a
//!    coalescing window after it opened, both on the merged stream, which
//!    is read before the ready queue. The bulk link has one progress
//!    record, which its jobs report, so draining a backlog costs Redis one
//!    entry and one record per 500 users.
//! 3. New calls are read in batches. Identical pushes to users, and
//!    unlinks, are coalesced into multicasts and bulk unlinks of up to 500
//!    users, waiting a few milliseconds for more to arrive; a merged call
//!    replaces its sources in one script, so it is retried as the unit that
//!    was sent.
//! 4. Each call waits for the channel's shared rate limit for its endpoint
//!    (GCRA in Redis, a little under LINE's numbers; the calls waiting at
//!    one limit reserve their times together, [`crate::pace`]), then is
//!    sent, and settled by LINE's answer: sent (2xx, 409), retried with
//!    backoff and jitter (5xx, timeout), paused without spending an attempt
//!    (429: the whole endpoint of the channel waits), or dead-lettered
//!    (other 4xx, or the last attempt).
//!
//! Every channel's queue runs on its own, with its own limits and at most
//! `channel_concurrency` calls in flight per LINE endpoint (the rest read
//! ahead and held in order, [`Lanes`]), so one tenant's backlog never holds
//! up another's taps, and replies held at LINE's reply limit never hold up
//! the same channel's rich-menu switches; bulk queues (segment broadcasts)
//! also share a small pool of send permits.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hibiki_line::api::{Endpoint, Limit, MAX_RECIPIENTS};
use hibiki_proto::delivery::v1::{
    Attempt, CallKind, DeliveryOutcome, DeliveryOutcomeRecord, QueuedCall,
};
use hibiki_runtime::channels::{Channels, Lookup};
use hibiki_runtime::redis::{redis, streams};
use hibiki_runtime::{Shutdown, telemetry, timestamp};
use prost::Message;
use rand::Rng;
use tokio::sync::Semaphore;

use crate::deadletters::DeadLetters;
use crate::keys;
use crate::line::{Answer, LineApi, Verdict, endpoint_of};
use crate::pace::{Pace, Pacers};
use crate::queue::{self, Class, GROUP, Keys, QueueId};

/// How the workers behave.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How long a queue's lease lasts without renewal (a dead worker's
    /// queues are taken over after this).
    pub lease: Duration,
    /// Attempts before a call is dead-lettered.
    pub max_attempts: usize,
    /// The first retry's delay; doubled per attempt, with jitter.
    pub backoff_base: Duration,
    /// The longest delay between attempts.
    pub backoff_cap: Duration,
    /// How long a channel's endpoint waits after LINE answered 429.
    pub pause_on_429: Duration,
    /// Calls in flight per channel queue and LINE endpoint; a queue reads
    /// up to 16 times this ahead. A tap's reply is a LINE call of its own,
    /// and a storm's replies wait at LINE's reply limit: at 128 calls per
    /// queue (all endpoints) they held the switches' bulk links back (the
    /// storm bench, 2026-12-02: link p50 15.1 s at 128, 8.8-9.4 s at 512).
    /// LINE's rate limits, not this, set the pace.
    pub channel_concurrency: usize,
    /// Calls in flight for all bulk queues of this worker.
    pub bulk_concurrency: usize,
    /// How long a bulk link is gathered after its first link, and how long
    /// a push or unlink waits for others to coalesce with.
    pub coalesce_window: Duration,
    /// The share of LINE's limit delivery uses (a little under 1, so that
    /// clocks and bursts never push a channel over).
    pub rate_share: f64,
    /// Limits other than LINE's.
    pub limits: BTreeMap<Endpoint, Limit>,
    /// How long jobs and idempotency keys are kept.
    pub job_ttl: Duration,
    /// How often the dispatcher looks for queues with work.
    pub poll: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
            max_attempts: 8,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(60),
            pause_on_429: Duration::from_secs(1),
            channel_concurrency: 512,
            bulk_concurrency: 16,
            coalesce_window: Duration::from_millis(5),
            rate_share: 0.98,
            limits: BTreeMap::new(),
            job_ttl: Duration::from_secs(7 * 24 * 3600),
            poll: Duration::from_millis(20),
        }
    }
}

impl WorkerConfig {
    /// The limit delivery keeps to for `endpoint`: LINE's (or the
    /// configured one) times the share.
    pub fn limit(&self, endpoint: Endpoint) -> Limit {
        self.limits
            .get(&endpoint)
            .copied()
            .unwrap_or_else(|| endpoint.default_limit())
    }

    /// The retry delay after `attempts` failed attempts: exponential, capped,
    /// with full jitter over its upper half.
    pub fn backoff(&self, attempts: usize) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        let d = exp.min(self.backoff_cap);
        d.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

/// contacts' segment service, called with delivery's service token.
pub type Segments = hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        hibiki_runtime::grpc::ClientInterceptor,
    >,
>;

/// What every queue task shares.
struct Ctx {
    keys: Keys,
    line: LineApi,
    channels: Channels,
    segments: Segments,
    dead: DeadLetters,
    config: WorkerConfig,
    /// This worker's name in leases and the consumer group.
    name: String,
    bulk: Semaphore,
    /// This replica's turns at the shared rate limits.
    pacers: Pacers,
    shutdown: Shutdown,
}

/// Starts this replica's dispatcher; it runs until `shutdown`.
pub fn start(
    keys: Keys,
    line: LineApi,
    channels: Channels,
    segments: Segments,
    dead: DeadLetters,
    config: WorkerConfig,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    let b: [u8; 6] = rand::rng().random();
    let name = format!("{}-{}", std::process::id(), hex::encode(b));
    let ctx = Arc::new(Ctx {
        keys,
        line,
        channels,
        segments,
        dead,
        bulk: Semaphore::new(config.bulk_concurrency.max(1)),
        config,
        name,
        pacers: Pacers::default(),
        shutdown,
    });
    tokio::spawn(dispatch(ctx))
}

/// Takes the lease of every queue with work that nobody holds, and runs it.
async fn dispatch(ctx: Arc<Ctx>) {
    let mut owned: HashMap<QueueId, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut warned = false;
    let mut last_backlog = std::time::Instant::now() - BACKLOG_EVERY;
    loop {
        owned.retain(|_, task| !task.is_finished());
        match active_queues(&ctx).await {
            Ok(queues) => {
                warned = false;
                for q in queues {
                    if owned.contains_key(&q) {
                        continue;
                    }
                    match take_lease(&ctx, &q).await {
                        Ok(true) => {
                            let task = tokio::spawn(run_queue(ctx.clone(), q.clone()));
                            owned.insert(q, task);
                        }
                        Ok(false) => {}
                        Err(e) => tracing::debug!(error = %e, "lease not taken"),
                    }
                }
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "delivery queues unreadable; retrying");
            }
            Err(_) => {}
        }
        metrics::gauge!("hibiki_delivery_queues_owned").set(owned.len() as f64);
        if last_backlog.elapsed() >= BACKLOG_EVERY {
            last_backlog = std::time::Instant::now();
            record_backlog(&ctx, owned.keys()).await;
        }
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            () = tokio::time::sleep(ctx.config.poll) => {}
        }
    }
    for (_, task) in owned {
        let _ = task.await;
    }
}

/// How often a replica measures the backlog of the queues it runs.
const BACKLOG_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Sets `hibiki_delivery_backlog{class}`: the calls waiting in the queues
/// this replica runs (ready, coalesced and delayed). Summed over replicas it
/// is the work delivery is behind by, what KEDA scales delivery on
/// (`k8s/components/keda`).
async fn record_backlog<'q>(ctx: &Ctx, owned: impl Iterator<Item = &'q QueueId>) {
    let owned: Vec<&QueueId> = owned.collect();
    let mut pipe = redis::pipe();
    for q in &owned {
        pipe.cmd("XLEN").arg(ctx.keys.stream(q));
        pipe.cmd("XLEN").arg(ctx.keys.merged(q));
        pipe.cmd("ZCARD").arg(ctx.keys.delayed(q));
    }
    let counts: Vec<u64> = if owned.is_empty() {
        Vec::new()
    } else {
        match ctx.keys.redis().pipeline(&pipe).await {
            Ok(counts) => counts,
            // The dispatcher's own reads report Redis trouble.
            Err(_) => return,
        }
    };
    for class in [Class::Realtime, Class::Bulk] {
        let waiting: u64 = owned
            .iter()
            .zip(counts.chunks(3))
            .filter(|(q, _)| q.class == class)
            .map(|(_, c)| c.iter().sum::<u64>())
            .sum();
        metrics::gauge!("hibiki_delivery_backlog", "class" => class.name()).set(waiting as f64);
    }
}

async fn active_queues(ctx: &Ctx) -> Result<Vec<QueueId>, redis::RedisError> {
    let members: Vec<String> = ctx
        .keys
        .redis()
        .command(redis::cmd("SMEMBERS").arg(ctx.keys.active()))
        .await?;
    let mut queues: Vec<QueueId> = members
        .iter()
        .filter_map(|m| QueueId::from_member(m))
        .collect();
    // Realtime queues first.
    queues.sort_by_key(|q| q.class);
    Ok(queues)
}

async fn take_lease(ctx: &Ctx, q: &QueueId) -> Result<bool, redis::RedisError> {
    let taken: Option<String> = ctx
        .keys
        .redis()
        .command(
            redis::cmd("SET")
                .arg(ctx.keys.lease(q))
                .arg(&ctx.name)
                .arg("NX")
                .arg("PX")
                .arg(ctx.config.lease.as_millis() as u64),
        )
        .await?;
    Ok(taken.is_some())
}

/// A call read from a queue, with its entry id.
type Read = (String, QueuedCall);

/// What to do with what was read.
#[derive(Debug)]
pub enum Action {
    /// Replace these entries with one merged call.
    Merge(Vec<String>, QueuedCall),
    /// Send this call.
    Send(String, QueuedCall),
}

/// Whether a call may be coalesced: new (never attempted, merged or
/// replayed), a link, an unlink, or a push to a user.
fn coalescable(call: &QueuedCall) -> bool {
    if call.merged || !call.attempts.is_empty() || call.replay_count > 0 {
        return false;
    }
    match call.kind() {
        CallKind::LinkRichMenu | CallKind::UnlinkRichMenu => true,
        CallKind::Push => call
            .parts
            .iter()
            .all(|p| p.user_ids.iter().all(|u| hibiki_line::api::is_user_id(u))),
        _ => false,
    }
}

/// The group a coalescable call joins: calls in one group can leave as one.
fn group_key(call: &QueuedCall) -> String {
    match call.kind() {
        CallKind::LinkRichMenu => format!("link\u{0}{}", call.rich_menu_id),
        CallKind::UnlinkRichMenu => "unlink".to_owned(),
        _ => format!(
            "push\u{0}{}\u{0}{}",
            call.notification_disabled,
            call.messages_json.join("\u{0}")
        ),
    }
}

fn users_of(call: &QueuedCall) -> usize {
    call.parts.iter().map(|p| p.user_ids.len()).sum()
}

/// Decides, for a batch read from one queue, which calls merge and which
/// leave as they are. Groups of coalescable calls become merged calls of
/// at most `max_users` users (a group of one is sent as it is).
pub fn coalesce(batch: Vec<Read>, max_users: usize) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut groups: BTreeMap<String, Vec<Read>> = BTreeMap::new();
    for (id, call) in batch {
        if coalescable(&call) && users_of(&call) < max_users {
            groups.entry(group_key(&call)).or_default().push((id, call));
        } else {
            actions.push(Action::Send(id, call));
        }
    }
    for (_, members) in groups {
        let mut chunk: Vec<Read> = Vec::new();
        let mut users = 0;
        let flush = |chunk: &mut Vec<Read>, actions: &mut Vec<Action>| match chunk.len() {
            0 => {}
            1 => {
                let (id, call) = chunk.pop().expect("one");
                actions.push(Action::Send(id, call));
            }
            _ => {
                let taken = std::mem::take(chunk);
                actions.push(merged(taken));
            }
        };
        for (id, call) in members {
            let n = users_of(&call);
            if users + n > max_users {
                flush(&mut chunk, &mut actions);
                users = 0;
            }
            users += n;
            chunk.push((id, call));
        }
        flush(&mut chunk, &mut actions);
    }
    actions
}

fn merged(sources: Vec<Read>) -> Action {
    let ids: Vec<String> = sources.iter().map(|(id, _)| id.clone()).collect();
    let mut calls = sources.into_iter().map(|(_, c)| c);
    let mut call = calls.next().expect("a merge has sources");
    for other in calls {
        call.queued_at_ms = call.queued_at_ms.min(other.queued_at_ms);
        call.parts.extend(other.parts);
    }
    if call.kind() == CallKind::Push {
        call.set_kind(CallKind::Multicast);
        let part_keys: Vec<&str> = call.parts.iter().map(|p| p.retry_key.as_str()).collect();
        call.retry_key = keys::merged_retry_key(&part_keys);
    }
    call.merged = true;
    Action::Merge(ids, call)
}

/// Reads and sends one queue's calls while this worker holds its lease.
async fn run_queue(ctx: Arc<Ctx>, q: QueueId) {
    let stream = ctx.keys.stream(&q);
    let merged = ctx.keys.merged(&q);
    let redis = ctx.keys.redis().clone();
    for key in [&stream, &merged] {
        let mut create = redis::cmd("XGROUP");
        create
            .arg("CREATE")
            .arg(key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        if let Err(e) = redis.command::<()>(&create).await
            && !queue::is_busy_group(&e)
        {
            tracing::warn!(queue = %q.member(), error = %e, "queue group not created");
            release(&ctx, &q).await;
            return;
        }
    }
    // Each call is its own task: a call waiting for the limit or for LINE
    // never stands in the way of this loop, nor this loop in its way.
    let mut lanes = Lanes::new(ctx.clone(), q.clone());
    // Calls a previous owner left pending, claimed first (merged ones
    // before the rest): each stream with its XAUTOCLAIM cursor.
    let mut reclaim: Vec<(String, String)> = vec![
        (merged.clone(), "0-0".to_owned()),
        (stream.clone(), "0-0".to_owned()),
    ];
    let mut renewed = Instant::now();
    let mut requeued = Instant::now() - Duration::from_secs(1);
    let mut sealed = Instant::now()
        .checked_sub(ctx.config.coalesce_window)
        .unwrap_or_else(Instant::now);
    let mut idle_since: Option<Instant> = None;
    let mut nap = Duration::from_millis(2);
    // A read takes up to a bulk link's worth, so that a backlog merges into
    // full bulk links, and never more than the read-ahead has room for.
    let read_ahead = ctx.config.channel_concurrency * READ_AHEAD;
    let room = |lanes: &Lanes| MAX_RECIPIENTS.min(read_ahead.saturating_sub(lanes.len()));
    loop {
        if ctx.shutdown.is_triggered() {
            break;
        }
        if renewed.elapsed() >= ctx.config.lease / 3 {
            match renew(&ctx, &q).await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    tracing::warn!(queue = %q.member(), "queue lease lost; another worker has it");
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "lease not renewed; retrying"),
            }
        }
        if requeued.elapsed() >= Duration::from_millis(20) {
            requeued = Instant::now();
            let _: Result<i64, _> = redis
                .script(
                    &queue::REQUEUE_DUE,
                    &[&stream, &ctx.keys.delayed(&q)],
                    &[b"1000"],
                )
                .await;
        }
        lanes.reap();
        let batch = room(&lanes);
        if batch == 0 {
            lanes.join_next().await;
            continue;
        }
        if let Some((key, cursor)) = reclaim.first().cloned() {
            match read_pending(&ctx, &key, &cursor, batch).await {
                Ok((next, calls)) => {
                    if next == "0-0" {
                        reclaim.remove(0);
                    } else {
                        reclaim[0].1 = next;
                    }
                    for (id, call) in calls {
                        lanes.push(&key, id, call);
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %q.member(), error = %e, "queue unreadable; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            continue;
        }
        // Open bulk links are looked at once per coalescing window, not on
        // every read: under load the loop reads far more often than that.
        if q.class == Class::Realtime && sealed.elapsed() >= ctx.config.coalesce_window {
            sealed = Instant::now();
            seal_due(&ctx, &q).await;
        }
        let ready = match read_new(&ctx, &merged, batch).await {
            Ok(ready) => ready,
            Err(e) => {
                tracing::warn!(queue = %q.member(), error = %e, "queue unreadable; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let had_merged = !ready.is_empty();
        for (id, call) in ready {
            lanes.push(&merged, id, call);
        }
        let batch = room(&lanes);
        if batch == 0 {
            continue;
        }
        let mut calls = match read_new(&ctx, &stream, batch).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(queue = %q.member(), error = %e, "queue unreadable; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if calls.is_empty() {
            if had_merged {
                continue;
            }
            if lanes.is_empty() {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(1) && release_if_empty(&ctx, &q).await {
                    return;
                }
            }
            tokio::select! {
                () = lanes.join_next(), if !lanes.is_empty() => {}
                () = tokio::time::sleep(nap) => {}
            }
            nap = (nap * 2).min(Duration::from_millis(20));
            continue;
        }
        idle_since = None;
        nap = Duration::from_millis(2);
        // Let more links and pushes arrive to coalesce with.
        if calls.len() < batch
            && !ctx.config.coalesce_window.is_zero()
            && calls.iter().any(|(_, c)| coalescable(c))
        {
            tokio::time::sleep(ctx.config.coalesce_window).await;
            if let Ok(more) = read_new(&ctx, &stream, batch - calls.len()).await {
                calls.extend(more);
            }
        }
        for action in coalesce(calls, MAX_RECIPIENTS) {
            match action {
                Action::Merge(ids, call) => {
                    let bytes = call.encode_to_vec();
                    let mut args: Vec<&[u8]> = vec![&bytes];
                    args.extend(ids.iter().map(|i| i.as_bytes()));
                    if let Err(e) = redis
                        .script::<i64>(&queue::MERGE, &[&stream, &merged], &args)
                        .await
                    {
                        // The sources stay pending under this worker; the
                        // next owner of the queue sends them.
                        tracing::warn!(queue = %q.member(), error = %e, "calls not merged");
                    } else {
                        metrics::counter!("hibiki_delivery_coalesced_total")
                            .increment(ids.len() as u64);
                    }
                }
                Action::Send(id, call) => lanes.push(&stream, id, call),
            }
        }
    }
    // Stopping: let the calls in flight finish and settle, then hand the
    // queue over at once. Calls held behind their endpoint's bound stay
    // pending in the group: the queue's next owner claims them.
    lanes.drain().await;
    release(&ctx, &q).await;
}

/// How many calls a channel queue reads ahead of those it sends, as a
/// multiple of `channel_concurrency`.
const READ_AHEAD: usize = 16;

/// A call read from a queue and held until its endpoint has room.
struct Held {
    from: String,
    id: String,
    call: QueuedCall,
}

/// A channel queue's calls between reading and settling, in one lane per
/// LINE endpoint: at most `channel_concurrency` calls of an endpoint in
/// flight (waiting at its rate limit, or for LINE), the rest held in order.
/// Calls held at one endpoint's limit (a storm's replies, at LINE's 2,000
/// a second) so never hold back another endpoint's (the storm's switches,
/// which leave as bulk links under a limit of their own).
struct Lanes {
    ctx: Arc<Ctx>,
    q: QueueId,
    inflight: tokio::task::JoinSet<()>,
    /// The endpoint of each call in flight, by its task.
    lane_of: HashMap<tokio::task::Id, Endpoint>,
    running: HashMap<Endpoint, usize>,
    held: HashMap<Endpoint, std::collections::VecDeque<Held>>,
    held_count: usize,
}

impl Lanes {
    fn new(ctx: Arc<Ctx>, q: QueueId) -> Self {
        Self {
            ctx,
            q,
            inflight: tokio::task::JoinSet::new(),
            lane_of: HashMap::new(),
            running: HashMap::new(),
            held: HashMap::new(),
            held_count: 0,
        }
    }

    /// Calls read and not yet settled.
    fn len(&self) -> usize {
        self.inflight.len() + self.held_count
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends `call` (read from the stream `from`) now if its endpoint has
    /// room, else holds it behind that endpoint's other calls.
    fn push(&mut self, from: &str, id: String, call: QueuedCall) {
        let endpoint = endpoint_of(&call);
        let running = self.running.entry(endpoint).or_default();
        if *running >= self.ctx.config.channel_concurrency {
            let held = Held {
                from: from.to_owned(),
                id,
                call,
            };
            self.held.entry(endpoint).or_default().push_back(held);
            self.held_count += 1;
            return;
        }
        *running += 1;
        self.spawn(endpoint, from.to_owned(), id, call);
    }

    fn spawn(&mut self, endpoint: Endpoint, from: String, id: String, call: QueuedCall) {
        let (ctx, q) = (self.ctx.clone(), self.q.clone());
        let task = if call.kind() == CallKind::ExpandSegment {
            self.inflight.spawn(expand(ctx, q, from, id, call))
        } else {
            self.inflight.spawn(traced_send(ctx, q, from, id, call))
        };
        self.lane_of.insert(task.id(), endpoint);
    }

    /// A call of `endpoint` settled: the next one held there goes.
    fn finished(&mut self, endpoint: Endpoint) {
        if let Some(next) = self.held.get_mut(&endpoint).and_then(|h| h.pop_front()) {
            self.held_count -= 1;
            self.spawn(endpoint, next.from, next.id, next.call);
        } else if let Some(running) = self.running.get_mut(&endpoint) {
            *running = running.saturating_sub(1);
        }
    }

    /// Takes note of the calls that settled since last asked.
    fn reap(&mut self) {
        while let Some(done) = self.inflight.try_join_next_with_id() {
            self.settled(done);
        }
    }

    /// Waits for one call to settle (forever, with none in flight).
    async fn join_next(&mut self) {
        match self.inflight.join_next_with_id().await {
            Some(done) => self.settled(done),
            None => std::future::pending().await,
        }
    }

    fn settled(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let task = match done {
            Ok((task, ())) => task,
            // The call's entry stays pending and is claimed again.
            Err(e) => {
                tracing::error!(queue = %self.q.member(), error = %e, "a call's task failed");
                e.id()
            }
        };
        if let Some(endpoint) = self.lane_of.remove(&task) {
            self.finished(endpoint);
        }
    }

    /// Lets the calls in flight finish and settle; the held ones are left.
    async fn drain(&mut self) {
        self.held.clear();
        self.held_count = 0;
        while self.inflight.join_next().await.is_some() {}
        self.lane_of.clear();
        self.running.clear();
    }
}

fn decode(entries: Vec<streams::Entry>) -> Vec<Read> {
    entries
        .into_iter()
        .filter_map(|(id, bytes)| match QueuedCall::decode(bytes.as_slice()) {
            Ok(call) => Some((id, call)),
            Err(e) => {
                tracing::error!(entry = %id, error = %e, "undecodable queued call left pending");
                None
            }
        })
        .collect()
}

async fn read_new(ctx: &Ctx, stream: &str, count: usize) -> Result<Vec<Read>, redis::RedisError> {
    let value: redis::Value = ctx
        .keys
        .redis()
        .command(
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&ctx.name)
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS")
                .arg(stream)
                .arg(">"),
        )
        .await?;
    Ok(decode(streams::read_reply(value, "c")?))
}

async fn read_pending(
    ctx: &Ctx,
    stream: &str,
    cursor: &str,
    count: usize,
) -> Result<(String, Vec<Read>), redis::RedisError> {
    let value: redis::Value = ctx
        .keys
        .redis()
        .command(
            redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(GROUP)
                .arg(&ctx.name)
                .arg(0)
                .arg(cursor)
                .arg("COUNT")
                .arg(count),
        )
        .await?;
    let (next, entries) = streams::autoclaim_reply(value, "c")?;
    Ok((next, decode(entries)))
}

async fn renew(ctx: &Ctx, q: &QueueId) -> Result<bool, redis::RedisError> {
    let ms = ctx.config.lease.as_millis().to_string();
    let renewed: i64 = ctx
        .keys
        .redis()
        .script(
            &queue::RENEW,
            &[&ctx.keys.lease(q)],
            &[ctx.name.as_bytes(), ms.as_bytes()],
        )
        .await?;
    Ok(renewed == 1)
}

async fn release(ctx: &Ctx, q: &QueueId) {
    let _: Result<i64, _> = ctx
        .keys
        .redis()
        .script(
            &queue::RELEASE,
            &[&ctx.keys.lease(q)],
            &[ctx.name.as_bytes()],
        )
        .await;
}

/// Gives the queue up when it is empty; takes it off the active set (and
/// puts it back if a call arrived meanwhile). True when given up.
async fn release_if_empty(ctx: &Ctx, q: &QueueId) -> bool {
    let redis = ctx.keys.redis();
    let (stream, delayed, merged) = (ctx.keys.stream(q), ctx.keys.delayed(q), ctx.keys.merged(q));
    let released: Result<i64, _> = redis
        .script(
            &queue::RELEASE_IF_EMPTY,
            &[
                &ctx.keys.lease(q),
                &stream,
                &delayed,
                &merged,
                &ctx.keys.open(q),
            ],
            &[ctx.name.as_bytes()],
        )
        .await;
    if released.ok() != Some(1) {
        return false;
    }
    let member = q.member();
    let _: Result<i64, _> = redis
        .command(redis::cmd("SREM").arg(ctx.keys.active()).arg(&member))
        .await;
    // An enqueue between the check and SREM added its call and then its
    // SADD, which SREM may have undone: look again.
    let mut pipe = redis::pipe();
    pipe.cmd("XLEN")
        .arg(&stream)
        .cmd("ZCARD")
        .arg(&delayed)
        .cmd("XLEN")
        .arg(&merged)
        .cmd("HLEN")
        .arg(ctx.keys.open(q));
    if let Ok((ready, later, coalesced, gathering)) =
        redis.pipeline::<(i64, i64, i64, i64)>(&pipe).await
        && ready + later + coalesced + gathering > 0
    {
        let _: Result<i64, _> = redis
            .command(redis::cmd("SADD").arg(ctx.keys.active()).arg(&member))
            .await;
    }
    true
}

/// Queues the bulk links gathered for a coalescing window since they
/// opened ([`queue::SEAL`]); a full one was queued by the link that filled
/// it.
async fn seal_due(ctx: &Ctx, q: &QueueId) {
    let redis = ctx.keys.redis();
    let opened = ctx.keys.opened(q);
    let menus: Vec<String> = match redis
        .command(redis::cmd("ZRANGE").arg(&opened).arg(0).arg(-1))
        .await
    {
        Ok(menus) => menus,
        Err(e) => {
            tracing::debug!(queue = %q.member(), error = %e, "open bulk links unreadable");
            return;
        }
    };
    let (open, merged) = (ctx.keys.open(q), ctx.keys.merged(q));
    let window = ctx.config.coalesce_window.as_millis().to_string();
    for menu in menus {
        let links = ctx.keys.open_links(q, &menu);
        if let Err(e) = redis
            .script::<i64>(
                &queue::SEAL,
                &[&links, &open, &opened, &merged],
                &[menu.as_bytes(), window.as_bytes()],
            )
            .await
        {
            tracing::debug!(queue = %q.member(), error = %e, "bulk link not sealed");
        }
    }
}

/// Waits until the channel's limit for `endpoint` lets one call through
/// ([`Pacer::acquire`]).
async fn acquire(ctx: &Ctx, channel_id: &str, endpoint: Endpoint) {
    let pace = Pace::new(ctx.config.limit(endpoint), ctx.config.rate_share);
    let keys = [
        ctx.keys.rate(channel_id, endpoint.name()),
        ctx.keys.pause(channel_id, endpoint.name()),
    ];
    let started = Instant::now();
    ctx.pacers
        .get(channel_id, endpoint)
        .acquire(ctx.keys.redis(), [&keys[0], &keys[1]], pace)
        .await;
    metrics::histogram!("hibiki_delivery_rate_wait_seconds", "endpoint" => endpoint.name())
        .record(started.elapsed().as_secs_f64());
}

/// The most members one broadcast page lists (one multicast).
const PAGE: u32 = MAX_RECIPIENTS as u32;

/// Lists one page of a broadcast's segment and queues its multicast and
/// the next page.
async fn expand(ctx: Arc<Ctx>, q: QueueId, from: String, id: String, call: QueuedCall) {
    let at = Entry {
        q: q.clone(),
        from: from.clone(),
        id: id.clone(),
    };
    use hibiki_proto::common::v1::PageRequest;
    use hibiki_proto::contacts::v1::ListSegmentMembersRequest;
    let listed = ctx
        .segments
        .clone()
        .list_segment_members(ListSegmentMembersRequest {
            tenant_id: call.tenant_id.clone(),
            segment_id: call.segment_id.clone(),
            page: Some(PageRequest {
                page_size: PAGE,
                page_token: call.page_token.clone(),
            }),
        })
        .await;
    let page = match listed {
        Ok(r) => r.into_inner(),
        Err(status) => {
            let answer = Answer {
                status: 0,
                body: format!(
                    "segment {:?} not listed by contacts: {} ({:?})",
                    call.segment_id,
                    status.message(),
                    status.code()
                ),
                request_id: String::new(),
            };
            let permanent = matches!(
                status.code(),
                tonic::Code::NotFound
                    | tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
            );
            let mut call = call;
            call.attempts.push(Attempt {
                at: Some(timestamp::to_proto(chrono::Utc::now())),
                status: 0,
                error: answer.body.clone(),
                line_request_id: String::new(),
            });
            if permanent || call.attempts.len() >= ctx.config.max_attempts {
                dead_letter(&ctx, &at, call, Endpoint::Multicast, &answer).await;
            } else {
                let after = ctx.config.backoff(call.attempts.len());
                let later = Settle::Later {
                    after,
                    call: Box::new(call.clone()),
                    attempt: false,
                };
                settle(&ctx, &at, &call, later, &answer, &answer.body).await;
            }
            return;
        }
    };
    let Some(part) = call.parts.first() else {
        tracing::error!(entry = %id, "a broadcast page without its job");
        return;
    };
    let users = page.line_user_ids;
    let multicast = (!users.is_empty()).then(|| {
        let key = keys::retry_key(
            &call.tenant_id,
            &call.channel_id,
            &format!("{}#page{}", part.retry_key, call.page),
        );
        QueuedCall {
            kind: CallKind::Multicast as i32,
            parts: vec![hibiki_proto::delivery::v1::CallPart {
                job_id: part.job_id.clone(),
                user_ids: users.clone(),
                retry_key: key.clone(),
            }],
            retry_key: key,
            segment_id: String::new(),
            page_token: String::new(),
            ..call.clone()
        }
        .encode_to_vec()
    });
    let next_token = page.page.map(|p| p.next_page_token).unwrap_or_default();
    let next = (!next_token.is_empty()).then(|| {
        QueuedCall {
            page_token: next_token,
            page: call.page + 1,
            ..call.clone()
        }
        .encode_to_vec()
    });
    let n = users.len().to_string();
    let keys = [from.clone(), ctx.keys.job(&call.channel_id, &part.job_id)];
    let (multicast, next) = (multicast.unwrap_or_default(), next.unwrap_or_default());
    let mut wait = Duration::from_millis(50);
    loop {
        match ctx
            .keys
            .redis()
            .script::<i64>(
                &queue::EXPAND,
                &[&keys[0], &keys[1]],
                &[id.as_bytes(), &multicast, &next, n.as_bytes()],
            )
            .await
        {
            Ok(_) => return,
            Err(e) if !ctx.shutdown.is_triggered() => {
                tracing::warn!(error = %e, "broadcast page not queued; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(_) => return,
        }
    }
}

/// Where a call read from a queue sits: its queue, the stream it was read
/// from (ready or merged), its entry id.
struct Entry {
    q: QueueId,
    from: String,
    id: String,
}

/// How a call settles in Redis.
enum Settle {
    /// Sent: the parts' recipients succeeded.
    Sent,
    /// Failed for good: the parts' recipients failed.
    Dead,
    /// Back to the delayed set for `after`, as `call`.
    Later {
        after: Duration,
        call: Box<QueuedCall>,
        attempt: bool,
    },
}

/// Sends one call and settles it.
/// [`send`] in a span continuing the trace of the request that queued the
/// call (across the queue), whose context the call to LINE carries.
async fn traced_send(ctx: Arc<Ctx>, q: QueueId, from: String, id: String, mut call: QueuedCall) {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "delivery.line_call",
        channel_id = %call.channel_id,
        recipients = users_of(&call)
    );
    if let Some(trace) = call.trace.as_ref().filter(|t| !t.traceparent.is_empty()) {
        telemetry::set_parent(&span, telemetry::context_from_payload(trace));
        // LINE sees this span as the caller.
        let own = span.in_scope(telemetry::current_trace_context);
        if !own.traceparent.is_empty() {
            call.trace = Some(own);
        }
    }
    send(ctx, q, from, id, call).instrument(span).await
}

async fn send(ctx: Arc<Ctx>, q: QueueId, from: String, id: String, mut call: QueuedCall) {
    let at = Entry { q, from, id };
    let endpoint = endpoint_of(&call);
    let token = loop {
        match ctx.channels.lookup(&call.channel_id) {
            Lookup::Found(keys) => break Some(keys.access_token.expose().to_owned()),
            Lookup::Unknown => break None,
            Lookup::NotLoaded => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let Some(token) = token else {
        let answer = Answer {
            status: 0,
            body: format!(
                "channel {} is no longer registered in contacts",
                call.channel_id
            ),
            request_id: String::new(),
        };
        dead_letter(&ctx, &at, call, endpoint, &answer).await;
        return;
    };
    acquire(&ctx, &call.channel_id, endpoint).await;
    let _permit = match at.q.class {
        Class::Bulk => ctx.bulk.acquire().await.ok(),
        Class::Realtime => None,
    };
    let started = Instant::now();
    let answer = ctx.line.send(&call, &token).await;
    let verdict = answer.verdict();
    metrics::histogram!("hibiki_delivery_call_seconds", "endpoint" => endpoint.name())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("hibiki_delivery_calls_total", "endpoint" => endpoint.name(), "status" => answer.status.to_string())
        .increment(1);
    match verdict {
        Verdict::Accepted | Verdict::AlreadyAccepted => {
            let outcome = if verdict == Verdict::Accepted {
                DeliveryOutcome::Accepted
            } else {
                DeliveryOutcome::AlreadyAccepted
            };
            settle(&ctx, &at, &call, Settle::Sent, &answer, "").await;
            publish(&ctx, &call, endpoint, outcome).await;
        }
        Verdict::RateLimited => {
            // LINE processed nothing: the whole endpoint of the channel
            // waits, and the call goes back without spending an attempt.
            let pause = ctx.config.pause_on_429;
            let _: Result<(), _> = ctx
                .keys
                .redis()
                .command(
                    redis::cmd("SET")
                        .arg(ctx.keys.pause(&call.channel_id, endpoint.name()))
                        .arg(1)
                        .arg("PX")
                        .arg(pause.as_millis() as u64),
                )
                .await;
            ctx.pacers.get(&call.channel_id, endpoint).pause(pause);
            metrics::counter!("hibiki_delivery_rate_limited_total", "endpoint" => endpoint.name())
                .increment(1);
            let later = Settle::Later {
                after: pause,
                call: Box::new(call.clone()),
                attempt: false,
            };
            settle(&ctx, &at, &call, later, &answer, "429 from LINE: paused").await;
            publish(&ctx, &call, endpoint, DeliveryOutcome::Retrying).await;
        }
        Verdict::Dead
            if call.kind() == CallKind::Reply
                && answer.status == 400
                && !call.reply_fallback_to.is_empty() =>
        {
            // The reply token is spent or expired: push instead.
            let mut push = call.clone();
            push.set_kind(CallKind::Push);
            push.reply_token.clear();
            push.retry_key = push.fallback_retry_key.clone();
            for p in &mut push.parts {
                p.user_ids = vec![push.reply_fallback_to.clone()];
            }
            let later = Settle::Later {
                after: Duration::ZERO,
                call: Box::new(push),
                attempt: false,
            };
            settle(
                &ctx,
                &at,
                &call,
                later,
                &answer,
                "reply token invalid: pushing",
            )
            .await;
        }
        Verdict::Dead => dead_letter(&ctx, &at, call, endpoint, &answer).await,
        Verdict::Retry => {
            call.attempts.push(Attempt {
                at: Some(timestamp::to_proto(chrono::Utc::now())),
                status: i32::from(answer.status),
                error: answer.body.chars().take(500).collect(),
                line_request_id: answer.request_id.clone(),
            });
            if call.attempts.len() >= ctx.config.max_attempts {
                dead_letter(&ctx, &at, call, endpoint, &answer).await;
                return;
            }
            metrics::counter!("hibiki_delivery_retries_total", "endpoint" => endpoint.name())
                .increment(1);
            let after = ctx.config.backoff(call.attempts.len());
            let error = format!("LINE answered {}: retrying", answer.status);
            let later = Settle::Later {
                after,
                call: Box::new(call.clone()),
                attempt: true,
            };
            settle(&ctx, &at, &call, later, &answer, &error).await;
            publish(&ctx, &call, endpoint, DeliveryOutcome::Retrying).await;
        }
    }
}

async fn dead_letter(
    ctx: &Ctx,
    at: &Entry,
    mut call: QueuedCall,
    endpoint: Endpoint,
    answer: &Answer,
) {
    if call.attempts.is_empty() || answer.status != 0 && answer.verdict() == Verdict::Dead {
        call.attempts.push(Attempt {
            at: Some(timestamp::to_proto(chrono::Utc::now())),
            status: i32::from(answer.status),
            error: answer.body.chars().take(500).collect(),
            line_request_id: answer.request_id.clone(),
        });
    }
    let mut wait = Duration::from_millis(100);
    loop {
        match ctx
            .dead
            .put(&call, endpoint.name(), answer.status, &answer.body)
            .await
        {
            Ok(_) => break,
            Err(e) if !ctx.shutdown.is_triggered() => {
                tracing::warn!(error = %e, "dead letter not stored; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            // Left pending: the next owner sends it again and gets the same
            // answer.
            Err(_) => return,
        }
    }
    metrics::counter!("hibiki_delivery_dead_letters_total", "endpoint" => endpoint.name())
        .increment(1);
    let error = format!("LINE answered {}: dead-lettered", answer.status);
    settle(ctx, at, &call, Settle::Dead, answer, &error).await;
    publish(ctx, &call, endpoint, DeliveryOutcome::DeadLettered).await;
}

/// Settles a call in Redis, retrying while Redis is away (the call stays
/// pending meanwhile; if this worker stops first, the next owner sends it
/// again under the same retry key).
async fn settle(
    ctx: &Ctx,
    at: &Entry,
    call: &QueuedCall,
    how: Settle,
    answer: &Answer,
    error: &str,
) {
    let (q, id) = (&at.q, at.id.as_str());
    let progress = queue::progress_of(&ctx.keys, call);
    let mut keys: Vec<String> = vec![at.from.clone(), ctx.keys.delayed(q)];
    keys.extend(progress.iter().map(|(k, _)| k.clone()));
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let (mode, delay, back, attempt) = match &how {
        Settle::Sent => ("ok", 0, Vec::new(), true),
        Settle::Dead => ("dead", 0, Vec::new(), true),
        Settle::Later {
            after,
            call,
            attempt,
        } => (
            "delay",
            after.as_millis() as u64,
            call.encode_to_vec(),
            *attempt,
        ),
    };
    let delay = delay.to_string();
    let counts: Vec<String> = progress.iter().map(|(_, n)| n.to_string()).collect();
    let request_id = if matches!(how, Settle::Sent) {
        answer.request_id.as_str()
    } else {
        ""
    };
    let mut args: Vec<&[u8]> = vec![
        id.as_bytes(),
        mode.as_bytes(),
        delay.as_bytes(),
        &back,
        request_id.as_bytes(),
        error.as_bytes(),
        if attempt { b"1" } else { b"0" },
    ];
    args.extend(counts.iter().map(|c| c.as_bytes()));
    let mut wait = Duration::from_millis(50);
    loop {
        match ctx
            .keys
            .redis()
            .script::<i64>(&queue::SETTLE, &key_refs, &args)
            .await
        {
            Ok(_) => return,
            Err(e) if !ctx.shutdown.is_triggered() => {
                tracing::warn!(error = %e, "call not settled; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(_) => return,
        }
    }
}

/// Publishes the call's outcome for analytics: one record per LINE call,
/// with the recipients it covered (best effort: an outcome lost here loses
/// a counter, never a message).
async fn publish(ctx: &Ctx, call: &QueuedCall, endpoint: Endpoint, outcome: DeliveryOutcome) {
    let record = outcome_record(call, endpoint, outcome, chrono::Utc::now());
    let mut xadd = redis::cmd("XADD");
    xadd.arg(ctx.keys.outcomes())
        .arg("MAXLEN")
        .arg("~")
        .arg(1_000_000)
        .arg("*")
        .arg("o")
        .arg(record.encode_to_vec());
    if let Err(e) = ctx.keys.redis().command::<()>(&xadd).await {
        tracing::debug!(error = %e, "delivery outcome not published");
    }
}

/// The record of one call's outcome. Its job is the call's one job, or
/// empty for a call coalesced from several; its id is the same for the
/// same call, attempt and outcome, so that analytics counts it once.
fn outcome_record(
    call: &QueuedCall,
    endpoint: Endpoint,
    outcome: DeliveryOutcome,
    at: chrono::DateTime<chrono::Utc>,
) -> DeliveryOutcomeRecord {
    let job_id = match call.parts.as_slice() {
        [first, rest @ ..] if rest.iter().all(|p| p.job_id == first.job_id) => first.job_id.clone(),
        _ => String::new(),
    };
    let part_keys: Vec<&str> = call.parts.iter().map(|p| p.retry_key.as_str()).collect();
    let call_key = match part_keys.as_slice() {
        [one] => (*one).to_owned(),
        many => keys::merged_retry_key(many),
    };
    DeliveryOutcomeRecord {
        tenant_id: call.tenant_id.clone(),
        channel_id: call.channel_id.clone(),
        job_id,
        endpoint: endpoint.name().to_owned(),
        outcome: outcome as i32,
        recipients: call
            .parts
            .iter()
            .map(|p| p.user_ids.len().max(1) as i64)
            .sum(),
        at: Some(timestamp::to_proto(at)),
        outcome_id: format!(
            "{}:{call_key}:{}:{}",
            endpoint.name(),
            call.attempts.len(),
            outcome as i32
        ),
        trace: call.trace.clone(),
    }
}

#[cfg(test)]
mod tests {
    use hibiki_proto::delivery::v1::CallPart;

    use super::*;

    fn link(job: &str, user: &str, menu: &str) -> Read {
        let call = QueuedCall {
            kind: CallKind::LinkRichMenu as i32,
            rich_menu_id: menu.into(),
            parts: vec![CallPart {
                job_id: job.into(),
                user_ids: vec![user.into()],
                retry_key: String::new(),
            }],
            ..Default::default()
        };
        (format!("{job}-0"), call)
    }

    fn push(job: &str, user: &str, text: &str) -> Read {
        let call = QueuedCall {
            kind: CallKind::Push as i32,
            messages_json: vec![format!(r#"{{"type":"text","text":"{text}"}}"#)],
            retry_key: keys::retry_key("t", "c", job),
            parts: vec![CallPart {
                job_id: job.into(),
                user_ids: vec![user.into()],
                retry_key: keys::retry_key("t", "c", job),
            }],
            ..Default::default()
        };
        (format!("{job}-0"), call)
    }

    fn user(n: u32) -> String {
        format!("U{n:032x}")
    }

    #[test]
    fn links_to_one_menu_merge_into_bulk_links_of_at_most_500() {
        let mut batch: Vec<Read> = (0..1200)
            .map(|i| link(&format!("j{i}"), &user(i), "richmenu-a"))
            .collect();
        batch.push(link("other", &user(9999), "richmenu-b"));
        let actions = coalesce(batch, 500);
        let mut sizes: Vec<usize> = actions
            .iter()
            .map(|a| match a {
                Action::Merge(ids, call) => {
                    assert_eq!(ids.len(), users_of(call));
                    assert!(call.merged);
                    users_of(call)
                }
                Action::Send(_, call) => users_of(call),
            })
            .collect();
        sizes.sort_unstable();
        // 1,200 links to menu a: 500 + 500 + 200; menu b's one link alone.
        assert_eq!(sizes, [1, 200, 500, 500]);
    }

    #[test]
    fn identical_pushes_become_a_multicast_with_a_key_of_their_own() {
        let batch = vec![
            push("a", &user(1), "hello"),
            push("b", &user(2), "hello"),
            push("c", &user(3), "other"),
        ];
        let actions = coalesce(batch, 500);
        let merged: Vec<&QueuedCall> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Merge(_, c) => Some(c),
                Action::Send(..) => None,
            })
            .collect();
        assert_eq!(merged.len(), 1);
        let m = merged[0];
        assert_eq!(m.kind(), CallKind::Multicast);
        assert_eq!(users_of(m), 2);
        assert_eq!(
            m.retry_key,
            keys::merged_retry_key(&[
                &keys::retry_key("t", "c", "a"),
                &keys::retry_key("t", "c", "b")
            ])
        );
        assert_eq!(actions.len(), 2, "the different push leaves alone");
    }

    #[test]
    fn attempted_merged_or_replayed_calls_are_never_merged_again() {
        let (id, mut tried) = push("a", &user(1), "hello");
        tried.attempts.push(Attempt::default());
        let (id2, mut replayed) = push("b", &user(2), "hello");
        replayed.replay_count = 1;
        let batch = vec![(id, tried), (id2, replayed), push("c", &user(3), "hello")];
        let actions = coalesce(batch, 500);
        assert!(actions.iter().all(|a| matches!(a, Action::Send(..))));
    }

    #[test]
    fn a_call_has_one_outcome_with_all_its_recipients() {
        let at = chrono::Utc::now();
        let single = push("a", &user(1), "hi").1;
        let one = outcome_record(&single, Endpoint::Push, DeliveryOutcome::Accepted, at);
        assert_eq!((one.job_id.as_str(), one.recipients), ("a", 1));

        let reads: Vec<Read> = (0..3)
            .map(|n| push(&format!("j{n}"), &user(n), "hi"))
            .collect();
        let Action::Merge(_, multicast) = merged(reads) else {
            panic!("pushes merge")
        };
        let m = outcome_record(
            &multicast,
            Endpoint::Multicast,
            DeliveryOutcome::Accepted,
            at,
        );
        assert_eq!((m.job_id.as_str(), m.recipients), ("", 3));
        // The same call and attempt always has the same id; another
        // attempt, outcome, endpoint or set of parts has another.
        assert_eq!(
            m.outcome_id,
            outcome_record(
                &multicast,
                Endpoint::Multicast,
                DeliveryOutcome::Accepted,
                at
            )
            .outcome_id
        );
        let ids: std::collections::HashSet<String> = [
            m.outcome_id.clone(),
            one.outcome_id.clone(),
            outcome_record(&single, Endpoint::Reply, DeliveryOutcome::Accepted, at).outcome_id,
            outcome_record(&single, Endpoint::Push, DeliveryOutcome::Retrying, at).outcome_id,
            outcome_record(
                &QueuedCall {
                    attempts: vec![Attempt::default()],
                    ..single.clone()
                },
                Endpoint::Push,
                DeliveryOutcome::Accepted,
                at,
            )
            .outcome_id,
        ]
        .into();
        assert_eq!(ids.len(), 5, "{ids:?}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = WorkerConfig {
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(1),
            ..WorkerConfig::default()
        };
        for _ in 0..50 {
            let first = c.backoff(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = c.backoff(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            assert!(c.backoff(30) <= Duration::from_secs(1));
        }
    }
}
