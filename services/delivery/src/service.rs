//! `DeliveryService`: requests become jobs and queued calls; jobs and dead
//! letters are read back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hibiki_line::api::{MAX_RECIPIENTS, check_message, is_push_target, is_user_id};
use hibiki_proto::delivery::v1::delivery_service_server::DeliveryService;
use hibiki_proto::delivery::v1::{
    BatchItem, BatchResult, BroadcastRequest, CallKind, CallPart, GetJobRequest, Job, JobKind,
    JobStatus, LinkRichMenuRequest, ListDeadLettersRequest, ListDeadLettersResponse, QueuedCall,
    ReplayDeadLettersRequest, ReplayDeadLettersResponse, SendRequest, SubmitBatchRequest,
    SubmitBatchResponse, UnlinkRichMenuRequest, batch_item, batch_result, link_rich_menu_request,
    send_request,
};
use hibiki_runtime::batch;
use hibiki_runtime::channels::{Channels, Lookup};
use hibiki_runtime::redis::redis;
use hibiki_runtime::{Caller, telemetry, timestamp};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::deadletters::DeadLetters;
use crate::error::{Error, Result};
use crate::keys;
use crate::line::LineApi;
use crate::queue::{self, Class, Keys, QueueId};

/// The most items a batch takes.
const MAX_BATCH: usize = 500;
/// The longest idempotency key taken.
const MAX_IDEMPOTENCY_KEY: usize = 256;
/// How long a resolved rich menu alias is trusted.
const ALIAS_TTL: Duration = Duration::from_secs(60);

/// The service's settings.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Calls a channel's queue (ready and delayed) may hold before new
    /// requests get RESOURCE_EXHAUSTED.
    pub max_queue: u64,
    /// How long jobs and idempotency keys are kept.
    pub job_ttl: Duration,
}

/// Rich menu aliases resolved: (channel, alias) → (menu id, when).
type AliasCache = Arc<Mutex<HashMap<(String, String), (String, Instant)>>>;

/// The gRPC service.
pub struct Delivery {
    keys: Keys,
    channels: Channels,
    dead: DeadLetters,
    line: LineApi,
    segments: crate::worker::Segments,
    config: ServiceConfig,
    aliases: AliasCache,
}

impl Delivery {
    pub fn new(
        keys: Keys,
        channels: Channels,
        dead: DeadLetters,
        line: LineApi,
        segments: crate::worker::Segments,
        config: ServiceConfig,
    ) -> Self {
        Self {
            keys,
            channels,
            dead,
            line,
            segments,
            config,
            aliases: Arc::default(),
        }
    }

    /// The channel's access token, when it is the tenant's.
    fn channel(&self, tenant_id: &str, channel_id: &str) -> Result<String> {
        if channel_id.is_empty() {
            return Err(Error::invalid("channel_id", "must not be empty"));
        }
        match self.channels.lookup(channel_id) {
            Lookup::Found(keys) if keys.tenant_id == tenant_id => {
                Ok(keys.access_token.expose().to_owned())
            }
            Lookup::Found(_) | Lookup::Unknown => Err(Error::NotFound(format!(
                "channel {channel_id:?} of tenant {tenant_id:?}"
            ))),
            Lookup::NotLoaded => Err(Error::Unavailable(
                "the channel registry is not loaded from contacts yet".into(),
            )),
        }
    }

    /// Queues `call` as the first call of a new job (or returns the job the
    /// idempotency key already has).
    async fn enqueue(
        &self,
        call: QueuedCall,
        kind: JobKind,
        idempotency_key: &str,
        not_before_ms: i64,
    ) -> Result<Job> {
        let job_id = call.parts[0].job_id.clone();
        // A broadcast's pages wait behind taps and scenario messages.
        let (class, expanding) = if call.kind() == CallKind::ExpandSegment {
            (Class::Bulk, "1")
        } else {
            (Class::Realtime, "0")
        };
        let q = QueueId {
            channel_id: call.channel_id.clone(),
            class,
        };
        let recipients: usize = if expanding == "1" {
            0
        } else {
            call.parts.iter().map(|p| p.user_ids.len().max(1)).sum()
        };
        let keys = [
            self.keys
                .idem(&call.channel_id, &call.tenant_id, idempotency_key),
            self.keys.job(&call.channel_id, &job_id),
            self.keys.stream(&q),
            self.keys.delayed(&q),
        ];
        let bytes = call.encode_to_vec();
        let (ttl, max, due, kind_name, total) = (
            self.config.job_ttl.as_millis().to_string(),
            self.config.max_queue.to_string(),
            not_before_ms.to_string(),
            kind.as_str_name().to_owned(),
            recipients.to_string(),
        );
        let (status, existing, created_ms, updated_ms): (i64, String, i64, i64) = self
            .keys
            .redis()
            .script(
                &queue::ENQUEUE,
                &[&keys[0], &keys[1], &keys[2], &keys[3]],
                &[
                    job_id.as_bytes(),
                    ttl.as_bytes(),
                    max.as_bytes(),
                    &bytes,
                    due.as_bytes(),
                    call.tenant_id.as_bytes(),
                    kind_name.as_bytes(),
                    call.channel_id.as_bytes(),
                    idempotency_key.as_bytes(),
                    total.as_bytes(),
                    expanding.as_bytes(),
                ],
            )
            .await?;
        let created = NewJob {
            tenant_id: &call.tenant_id,
            channel_id: &call.channel_id,
            job_id: &job_id,
            kind,
            idempotency_key,
            recipients: recipients as i64,
            created_ms,
            updated_ms,
        };
        self.queued(status, &existing, &q, created).await
    }

    /// Queues a link job into its menu's bulk link being gathered
    /// ([`queue::ENQUEUE_LINK`]): at drain time a bulk link of 500 is one
    /// queue entry and one progress record, not 500.
    async fn enqueue_link(&self, call: QueuedCall, idempotency_key: &str) -> Result<Job> {
        let mut header = call;
        let part = header.parts.pop().expect("a link has its one part");
        let job_id = part.job_id.clone();
        header.batch_id = job_id.clone();
        header.merged = true;
        header.retry_key.clear();
        let q = QueueId {
            channel_id: header.channel_id.clone(),
            class: Class::Realtime,
        };
        let keys = [
            self.keys
                .idem(&header.channel_id, &header.tenant_id, idempotency_key),
            self.keys.job(&header.channel_id, &job_id),
            self.keys.stream(&q),
            self.keys.delayed(&q),
            self.keys.open_links(&q, &header.rich_menu_id),
            self.keys.open(&q),
            self.keys.opened(&q),
            self.keys.batch(&header.channel_id, &job_id),
            self.keys.merged(&q),
        ];
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        // The part as an encoded `parts` field: appended to the header's
        // encoding it makes the call.
        let part_field = QueuedCall {
            parts: vec![part],
            ..Default::default()
        }
        .encode_to_vec();
        let (ttl, max, batch_max) = (
            self.config.job_ttl.as_millis().to_string(),
            self.config.max_queue.to_string(),
            MAX_RECIPIENTS.to_string(),
        );
        let kind = JobKind::LinkRichMenu;
        let (status, existing, created_ms, updated_ms): (i64, String, i64, i64) = self
            .keys
            .redis()
            .script(
                &queue::ENQUEUE_LINK,
                &key_refs,
                &[
                    job_id.as_bytes(),
                    ttl.as_bytes(),
                    max.as_bytes(),
                    &header.encode_to_vec(),
                    &part_field,
                    header.rich_menu_id.as_bytes(),
                    batch_max.as_bytes(),
                    header.tenant_id.as_bytes(),
                    kind.as_str_name().as_bytes(),
                    header.channel_id.as_bytes(),
                    idempotency_key.as_bytes(),
                ],
            )
            .await?;
        if status == 1 {
            metrics::counter!("hibiki_delivery_coalesced_total").increment(1);
        }
        let created = NewJob {
            tenant_id: &header.tenant_id,
            channel_id: &header.channel_id,
            job_id: &job_id,
            kind,
            idempotency_key,
            recipients: 1,
            created_ms,
            updated_ms,
        };
        self.queued(status, &existing, &q, created).await
    }

    /// After an enqueue script: the job, or why there is none. A new job is
    /// answered as the script made it (queued, nothing sent yet), without
    /// reading it back: one Redis round trip less per call, two for a link.
    async fn queued(
        &self,
        status: i64,
        existing: &str,
        q: &QueueId,
        created: NewJob<'_>,
    ) -> Result<Job> {
        let kind = created.kind;
        match status {
            2 => {
                return Err(Error::ResourceExhausted(format!(
                    "channel {}: its queue holds {} calls; retry later",
                    q.channel_id, self.config.max_queue
                )));
            }
            0 => {
                return self.job(created.tenant_id, existing).await;
            }
            _ => {}
        }
        let _: i64 = self
            .keys
            .redis()
            .command(redis::cmd("SADD").arg(self.keys.active()).arg(q.member()))
            .await?;
        metrics::counter!("hibiki_delivery_jobs_total", "kind" => kind.as_str_name()).increment(1);
        Ok(created.job())
    }

    /// A job of the tenant.
    async fn job(&self, tenant_id: &str, job_id: &str) -> Result<Job> {
        let not_found = || Error::NotFound(format!("job {job_id:?} of tenant {tenant_id:?}"));
        let channel_id = keys::channel_of_job(job_id).ok_or_else(not_found)?;
        let mut fields: HashMap<String, String> = self
            .keys
            .redis()
            .command(redis::cmd("HGETALL").arg(self.keys.job(channel_id, job_id)))
            .await?;
        if fields.get("tenant").map(String::as_str) != Some(tenant_id) {
            return Err(not_found());
        }
        // A link gathered into a bulk link has the bulk link's progress: all
        // of its users succeed or fail together.
        if let Some(batch) = fields.get("batch").filter(|b| !b.is_empty()) {
            let progress: HashMap<String, String> = self
                .keys
                .redis()
                .command(redis::cmd("HGETALL").arg(self.keys.batch(channel_id, batch)))
                .await?;
            let total = fields.get("total").cloned().unwrap_or_default();
            let done = |f: &str| progress.get(f).is_some_and(|v| v != "0");
            let (succeeded, failed) = match (done("succeeded"), done("failed")) {
                (true, _) => (total.clone(), "0".to_owned()),
                (false, true) => ("0".to_owned(), total.clone()),
                (false, false) => ("0".to_owned(), "0".to_owned()),
            };
            fields.insert("succeeded".into(), succeeded);
            fields.insert("failed".into(), failed);
            for f in ["attempts", "rids", "last_error", "updated"] {
                match progress.get(f) {
                    Some(v) => fields.insert(f.into(), v.clone()),
                    None => fields.remove(f),
                };
            }
        }
        let num = |f: &str| -> i64 { fields.get(f).and_then(|v| v.parse().ok()).unwrap_or(0) };
        let (total, succeeded, failed, attempts) = (
            num("total"),
            num("succeeded"),
            num("failed"),
            num("attempts"),
        );
        let expanding = fields.get("expanding").map(String::as_str) == Some("1");
        let status = if expanding || succeeded + failed < total {
            if attempts > 0 {
                JobStatus::Running
            } else {
                JobStatus::Queued
            }
        } else if failed == 0 {
            JobStatus::Succeeded
        } else if succeeded == 0 {
            JobStatus::Failed
        } else {
            JobStatus::Partial
        };
        let at = |f: &str| timestamp::from_millis(num(f)).map(timestamp::to_proto);
        Ok(Job {
            tenant_id: tenant_id.to_owned(),
            job_id: job_id.to_owned(),
            kind: fields
                .get("kind")
                .and_then(|k| JobKind::from_str_name(k))
                .unwrap_or_default() as i32,
            status: status as i32,
            channel_id: channel_id.to_owned(),
            idempotency_key: fields.get("idem").cloned().unwrap_or_default(),
            recipients_total: total,
            recipients_succeeded: succeeded,
            recipients_failed: failed,
            attempts,
            line_request_ids: fields
                .get("rids")
                .map(|r| r.split(' ').map(str::to_owned).collect())
                .unwrap_or_default(),
            last_error: fields.get("last_error").cloned().unwrap_or_default(),
            created_at: at("created"),
            updated_at: at("updated"),
        })
    }

    /// A rich menu alias's menu id, from LINE (cached for a minute).
    async fn resolve_alias(&self, channel_id: &str, alias: &str, token: &str) -> Result<String> {
        let key = (channel_id.to_owned(), alias.to_owned());
        if let Some((id, at)) = self.aliases.lock().expect("alias cache").get(&key)
            && at.elapsed() < ALIAS_TTL
        {
            return Ok(id.clone());
        }
        match self.line.rich_menu_of_alias(alias, token).await {
            Ok(Some(id)) => {
                self.aliases
                    .lock()
                    .expect("alias cache")
                    .insert(key, (id.clone(), Instant::now()));
                Ok(id)
            }
            Ok(None) => Err(Error::NotFound(format!(
                "rich menu alias {alias:?} of channel {channel_id:?} (LINE does not know it)"
            ))),
            Err(e) => Err(Error::Unavailable(format!("LINE: {e}"))),
        }
    }
}

impl Delivery {
    /// Queues a send for `caller` (Send, or a batch's item).
    async fn send_one(&self, caller: &Caller, r: &SendRequest) -> std::result::Result<Job, Status> {
        authorize(caller, &r.tenant_id)?;
        self.channel(&r.tenant_id, &r.channel_id)?;
        check_idempotency_key(&r.idempotency_key)?;
        check_messages(&r.messages_json, "messages_json")?;
        let part_key = keys::retry_key(&r.tenant_id, &r.channel_id, &r.idempotency_key);
        let job_id = keys::job_id(&r.tenant_id, &r.channel_id, &r.idempotency_key);
        let (kind, job_kind, users) = match &r.target {
            None => {
                return Err(Error::invalid(
                    "target",
                    "one of push_to, multicast_to or reply_token must be set",
                )
                .into());
            }
            Some(send_request::Target::PushTo(to)) => {
                if !is_push_target(to) {
                    return Err(Error::invalid(
                        "push_to",
                        format!("{to:?} is not a LINE user, group or room id"),
                    )
                    .into());
                }
                (CallKind::Push, JobKind::Push, vec![to.clone()])
            }
            Some(send_request::Target::MulticastTo(to)) => {
                if to.user_ids.is_empty() || to.user_ids.len() > MAX_RECIPIENTS {
                    return Err(Error::invalid(
                        "multicast_to.user_ids",
                        format!(
                            "must hold 1 to {MAX_RECIPIENTS} user ids, got {}",
                            to.user_ids.len()
                        ),
                    )
                    .into());
                }
                for (i, u) in to.user_ids.iter().enumerate() {
                    check_user(u, &format!("multicast_to.user_ids[{i}]"))?;
                }
                (CallKind::Multicast, JobKind::Multicast, to.user_ids.clone())
            }
            Some(send_request::Target::ReplyToken(token)) => {
                if token.is_empty() {
                    return Err(Error::invalid("reply_token", "must not be empty").into());
                }
                if !r.reply_fallback_to.is_empty() {
                    check_user(&r.reply_fallback_to, "reply_fallback_to")?;
                }
                (CallKind::Reply, JobKind::Reply, Vec::new())
            }
        };
        let mut call = base_call(&r.tenant_id, &r.channel_id, kind);
        call.messages_json = r.messages_json.clone();
        call.notification_disabled = r.notification_disabled;
        call.parts = vec![CallPart {
            job_id,
            user_ids: users,
            retry_key: part_key.clone(),
        }];
        if kind == CallKind::Reply {
            call.reply_token = match &r.target {
                Some(send_request::Target::ReplyToken(t)) => t.clone(),
                _ => String::new(),
            };
            call.reply_fallback_to = r.reply_fallback_to.clone();
            call.fallback_retry_key = part_key;
        } else {
            call.retry_key = part_key;
        }
        let not_before = r
            .not_before
            .as_ref()
            .and_then(timestamp::from_proto)
            .map_or(0, |t| t.timestamp_millis());
        Ok(self
            .enqueue(call, job_kind, &r.idempotency_key, not_before)
            .await?)
    }

    /// Queues a rich menu link for `caller`.
    async fn link_one(
        &self,
        caller: &Caller,
        r: &LinkRichMenuRequest,
    ) -> std::result::Result<Job, Status> {
        authorize(caller, &r.tenant_id)?;
        let token = self.channel(&r.tenant_id, &r.channel_id)?;
        check_idempotency_key(&r.idempotency_key)?;
        check_user(&r.user_id, "user_id")?;
        let menu = match &r.menu {
            Some(link_rich_menu_request::Menu::RichMenuId(id)) if !id.is_empty() => id.clone(),
            Some(link_rich_menu_request::Menu::Alias(alias)) if !alias.is_empty() => {
                self.resolve_alias(&r.channel_id, alias, &token).await?
            }
            _ => {
                return Err(Error::invalid("menu", "rich_menu_id or alias must be set").into());
            }
        };
        let mut call = base_call(&r.tenant_id, &r.channel_id, CallKind::LinkRichMenu);
        call.rich_menu_id = menu;
        call.parts = vec![CallPart {
            job_id: keys::job_id(&r.tenant_id, &r.channel_id, &r.idempotency_key),
            user_ids: vec![r.user_id.clone()],
            retry_key: keys::retry_key(&r.tenant_id, &r.channel_id, &r.idempotency_key),
        }];
        Ok(self.enqueue_link(call, &r.idempotency_key).await?)
    }

    /// Queues a rich menu unlink for `caller`.
    async fn unlink_one(
        &self,
        caller: &Caller,
        r: &UnlinkRichMenuRequest,
    ) -> std::result::Result<Job, Status> {
        authorize(caller, &r.tenant_id)?;
        self.channel(&r.tenant_id, &r.channel_id)?;
        check_idempotency_key(&r.idempotency_key)?;
        check_user(&r.user_id, "user_id")?;
        let mut call = base_call(&r.tenant_id, &r.channel_id, CallKind::UnlinkRichMenu);
        call.parts = vec![CallPart {
            job_id: keys::job_id(&r.tenant_id, &r.channel_id, &r.idempotency_key),
            user_ids: vec![r.user_id.clone()],
            retry_key: keys::retry_key(&r.tenant_id, &r.channel_id, &r.idempotency_key),
        }];
        Ok(self
            .enqueue(call, JobKind::UnlinkRichMenu, &r.idempotency_key, 0)
            .await?)
    }

    /// One item of a batch, as its own RPC would do it
    /// ([`hibiki_runtime::batch::item`]).
    async fn item(&self, caller: &Caller, item: &BatchItem) -> std::result::Result<Job, Status> {
        use batch_item::Request as R;
        let trace = item.trace.as_ref();
        match &item.request {
            Some(R::Send(r)) => batch::item(SERVICE, SEND, trace, self.send_one(caller, r)).await,
            Some(R::LinkRichMenu(r)) => {
                batch::item(SERVICE, LINK, trace, self.link_one(caller, r)).await
            }
            Some(R::UnlinkRichMenu(r)) => {
                batch::item(SERVICE, UNLINK, trace, self.unlink_one(caller, r)).await
            }
            None => Err(Status::invalid_argument("request: must be set")),
        }
    }
}

/// The service and the RPCs a batch item is done as, named as the gRPC
/// layer names them.
const SERVICE: &str = "delivery";
const SEND: &str = "/hibiki.delivery.v1.DeliveryService/Send";
const LINK: &str = "/hibiki.delivery.v1.DeliveryService/LinkRichMenu";
const UNLINK: &str = "/hibiki.delivery.v1.DeliveryService/UnlinkRichMenu";

fn check_idempotency_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("idempotency_key", "must not be empty"));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(Error::invalid(
            "idempotency_key",
            format!("must be at most {MAX_IDEMPOTENCY_KEY} bytes"),
        ));
    }
    Ok(())
}

fn check_messages(messages: &[String], field: &str) -> Result<()> {
    if messages.is_empty() || messages.len() > hibiki_line::api::MAX_MESSAGES {
        return Err(Error::invalid(
            field,
            format!(
                "must hold 1 to {} messages, got {}",
                hibiki_line::api::MAX_MESSAGES,
                messages.len()
            ),
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let value: serde_json::Value =
            serde_json::from_str(m).map_err(|e| Error::invalid(&at, format!("not JSON: {e}")))?;
        if let Some(d) = check_message(&at, &value).into_iter().next() {
            return Err(Error::invalid(d.property, d.message.to_lowercase()));
        }
    }
    Ok(())
}

fn check_user(user: &str, field: &str) -> Result<()> {
    if is_user_id(user) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{user:?} is not a LINE user id (U and 32 hex digits)"),
        ))
    }
}

fn authorize(caller: &Caller, tenant_id: &str) -> std::result::Result<(), Status> {
    if tenant_id.is_empty() {
        return Err(Status::invalid_argument("tenant_id: must not be empty"));
    }
    caller.authorize_tenant(tenant_id)
}

/// A job an enqueue script has just made: queued, no attempt yet.
struct NewJob<'a> {
    tenant_id: &'a str,
    channel_id: &'a str,
    job_id: &'a str,
    kind: JobKind,
    idempotency_key: &'a str,
    recipients: i64,
    /// When the script made it, by Redis's clock.
    created_ms: i64,
    /// When its progress was last updated: when it was made, or for a
    /// gathered link when its bulk link opened.
    updated_ms: i64,
}

impl NewJob<'_> {
    /// The job as [`Delivery::job`] would read it back.
    fn job(&self) -> Job {
        let at = |ms| timestamp::from_millis(ms).map(timestamp::to_proto);
        Job {
            tenant_id: self.tenant_id.to_owned(),
            job_id: self.job_id.to_owned(),
            kind: self.kind as i32,
            status: JobStatus::Queued as i32,
            channel_id: self.channel_id.to_owned(),
            idempotency_key: self.idempotency_key.to_owned(),
            recipients_total: self.recipients,
            created_at: at(self.created_ms),
            updated_at: at(self.updated_ms),
            ..Default::default()
        }
    }
}

fn base_call(tenant_id: &str, channel_id: &str, kind: CallKind) -> QueuedCall {
    QueuedCall {
        tenant_id: tenant_id.to_owned(),
        channel_id: channel_id.to_owned(),
        kind: kind as i32,
        trace: Some(telemetry::current_trace_context()),
        queued_at_ms: chrono::Utc::now().timestamp_millis(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl DeliveryService for Delivery {
    async fn send(
        &self,
        request: Request<SendRequest>,
    ) -> std::result::Result<Response<Job>, Status> {
        let caller = Caller::of(&request)?;
        Ok(Response::new(
            self.send_one(&caller, request.get_ref()).await?,
        ))
    }

    async fn link_rich_menu(
        &self,
        request: Request<LinkRichMenuRequest>,
    ) -> std::result::Result<Response<Job>, Status> {
        let caller = Caller::of(&request)?;
        Ok(Response::new(
            self.link_one(&caller, request.get_ref()).await?,
        ))
    }

    async fn unlink_rich_menu(
        &self,
        request: Request<UnlinkRichMenuRequest>,
    ) -> std::result::Result<Response<Job>, Status> {
        let caller = Caller::of(&request)?;
        Ok(Response::new(
            self.unlink_one(&caller, request.get_ref()).await?,
        ))
    }

    async fn submit_batch(
        &self,
        request: Request<SubmitBatchRequest>,
    ) -> std::result::Result<Response<SubmitBatchResponse>, Status> {
        let caller = Caller::of(&request)?;
        let items = &request.get_ref().items;
        batch::check(
            items,
            MAX_BATCH,
            |i| i.request.is_some(),
            "send, link_rich_menu or unlink_rich_menu",
        )?;
        // Side by side: the enqueue scripts of the items share Redis round
        // trips on the multiplexed connection.
        let answers =
            futures::future::join_all(items.iter().map(|item| self.item(&caller, item))).await;
        let results = answers
            .into_iter()
            .map(|answer| BatchResult {
                result: Some(match answer {
                    Ok(job) => batch_result::Result::Job(job),
                    Err(status) => batch_result::Result::Error(batch::error(&status)),
                }),
            })
            .collect();
        Ok(Response::new(SubmitBatchResponse { results }))
    }

    async fn broadcast(
        &self,
        request: Request<BroadcastRequest>,
    ) -> std::result::Result<Response<Job>, Status> {
        let r = request.get_ref();
        Caller::authorize_request(&request, &r.tenant_id)?;
        self.channel(&r.tenant_id, &r.channel_id)?;
        check_idempotency_key(&r.idempotency_key)?;
        if r.segment_id.is_empty() {
            return Err(Error::invalid("segment_id", "must not be empty").into());
        }
        check_messages(&r.messages_json, "messages_json")?;
        // The segment exists and is computed: contacts answers its first
        // member (NOT_FOUND and FAILED_PRECONDITION pass through).
        self.segments
            .clone()
            .list_segment_members(hibiki_proto::contacts::v1::ListSegmentMembersRequest {
                tenant_id: r.tenant_id.clone(),
                segment_id: r.segment_id.clone(),
                page: Some(hibiki_proto::common::v1::PageRequest {
                    page_size: 1,
                    page_token: String::new(),
                }),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
                    Status::new(s.code(), format!("segment_id: {}", s.message()))
                }
                _ => Status::unavailable(format!("contacts: {}", s.message())),
            })?;
        let mut call = base_call(&r.tenant_id, &r.channel_id, CallKind::ExpandSegment);
        call.segment_id = r.segment_id.clone();
        call.messages_json = r.messages_json.clone();
        call.notification_disabled = r.notification_disabled;
        call.parts = vec![CallPart {
            job_id: keys::job_id(&r.tenant_id, &r.channel_id, &r.idempotency_key),
            user_ids: Vec::new(),
            retry_key: keys::retry_key(&r.tenant_id, &r.channel_id, &r.idempotency_key),
        }];
        let job = self
            .enqueue(call, JobKind::Broadcast, &r.idempotency_key, 0)
            .await?;
        Ok(Response::new(job))
    }

    async fn get_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> std::result::Result<Response<Job>, Status> {
        let r = request.get_ref();
        Caller::authorize_request(&request, &r.tenant_id)?;
        if r.job_id.is_empty() {
            return Err(Error::invalid("job_id", "must not be empty").into());
        }
        Ok(Response::new(self.job(&r.tenant_id, &r.job_id).await?))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> std::result::Result<Response<ListDeadLettersResponse>, Status> {
        let r = request.get_ref();
        Caller::authorize_request(&request, &r.tenant_id)?;
        let channel = (!r.channel_id.is_empty()).then_some(r.channel_id.as_str());
        if let Some(c) = channel {
            self.channel(&r.tenant_id, c)?;
        }
        let (size, token) = r
            .page
            .as_ref()
            .map_or((0, ""), |p| (p.page_size, p.page_token.as_str()));
        let (dead_letters, next) = self.dead.list(&r.tenant_id, channel, size, token).await?;
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters,
            page: Some(hibiki_proto::common::v1::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<ReplayDeadLettersRequest>,
    ) -> std::result::Result<Response<ReplayDeadLettersResponse>, Status> {
        let r = request.get_ref();
        Caller::authorize_request(&request, &r.tenant_id)?;
        let channel = (!r.channel_id.is_empty()).then_some(r.channel_id.as_str());
        if let Some(c) = channel {
            self.channel(&r.tenant_id, c)?;
        }
        let keys = self.keys.clone();
        let replayed = self
            .dead
            .replay(&r.tenant_id, &r.dead_letter_ids, channel, |call| {
                let keys = keys.clone();
                async move {
                    let q = QueueId {
                        channel_id: call.channel_id.clone(),
                        class: Class::Realtime,
                    };
                    let progress = queue::progress_of(&keys, &call);
                    let mut script_keys = vec![keys.stream(&q)];
                    script_keys.extend(progress.iter().map(|(k, _)| k.clone()));
                    let refs: Vec<&str> = script_keys.iter().map(String::as_str).collect();
                    let bytes = call.encode_to_vec();
                    let counts: Vec<String> = progress.iter().map(|(_, n)| n.to_string()).collect();
                    let mut args: Vec<&[u8]> = vec![&bytes];
                    args.extend(counts.iter().map(|c| c.as_bytes()));
                    let _: i64 = keys.redis().script(&queue::REPLAY, &refs, &args).await?;
                    let _: i64 = keys
                        .redis()
                        .command(redis::cmd("SADD").arg(keys.active()).arg(q.member()))
                        .await?;
                    Ok(())
                }
            })
            .await?;
        metrics::counter!("hibiki_delivery_replayed_total").increment(replayed as u64);
        Ok(Response::new(ReplayDeadLettersResponse { replayed }))
    }
}
