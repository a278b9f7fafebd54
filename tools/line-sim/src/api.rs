//! The Messaging API as LINE serves it (`../shared/LINE.md`).
//!
//! Every request goes through the same steps, in LINE's order:
//! 1. `Authorization: Bearer <channel access token>`; unknown → 401.
//! 2. The channel's rate limit for the endpoint (token bucket, LINE's
//!    numbers unless configured); over it → 429 with LINE's body, no
//!    `Retry-After`, and nothing processed.
//! 3. The injected faults: latency, then maybe a 500/503 or no answer at
//!    all, before or after the request was processed.
//! 4. `X-Line-Retry-Key`: 400 on endpoints that do not take one or when it
//!    is not a UUID; 409 with `x-line-accepted-request-id` when the key was
//!    accepted in the last 24 hours.
//! 5. Validation (400 with `details` naming each bad property), then the
//!    work, recorded in the ledger.
//!
//! Every response carries `x-line-request-id`.

use std::collections::HashMap;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use hibiki_line::api::{
    ACCEPTED_REQUEST_ID_HEADER, Endpoint, ErrorBody, ErrorDetail, MAX_RECIPIENTS, QUOTA_EXHAUSTED,
    RATE_LIMITED, REQUEST_ID_HEADER, RETRY_KEY_HEADER, check_messages, is_push_target,
    is_retry_key, is_user_id,
};
use rand::Rng;
use serde_json::{Value, json};

use crate::Sim;
use crate::state::{
    AcceptedKey, Fault, MenuChange, SentMessage, State, new_request_id, new_rich_menu_id, now_ms,
};

/// The largest request body taken.
const MAX_BODY: usize = 2 * 1024 * 1024;

/// The API's routes.
pub fn router(sim: Sim) -> Router {
    Router::new()
        .route("/v2/bot/message/reply", post(reply))
        .route("/v2/bot/message/push", post(push))
        .route("/v2/bot/message/multicast", post(multicast))
        .route("/v2/bot/message/narrowcast", post(narrowcast))
        .route(
            "/v2/bot/message/progress/narrowcast",
            get(narrowcast_progress),
        )
        .route("/v2/bot/message/broadcast", post(broadcast))
        .route(
            "/v2/bot/user/{user_id}/richmenu/{rich_menu_id}",
            post(link_rich_menu),
        )
        .route("/v2/bot/user/{user_id}/richmenu", delete(unlink_rich_menu))
        .route("/v2/bot/richmenu/bulk/link", post(bulk_link))
        .route("/v2/bot/richmenu/bulk/unlink", post(bulk_unlink))
        .route("/v2/bot/richmenu", post(create_rich_menu))
        .route("/v2/bot/richmenu/list", get(list_rich_menus))
        .route("/v2/bot/richmenu/alias", post(create_alias))
        .route("/v2/bot/richmenu/alias/list", get(list_aliases))
        .route(
            "/v2/bot/richmenu/alias/{alias_id}",
            get(get_alias).delete(delete_alias),
        )
        .route("/v2/bot/profile/{user_id}", get(profile))
        .route("/v2/bot/message/quota", get(quota))
        .route("/v2/bot/message/quota/consumption", get(quota_consumption))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(sim)
}

/// An answer before the request id is added.
pub(crate) struct Answer {
    status: u16,
    body: Value,
    accepted_request_id: Option<String>,
}

impl Answer {
    fn ok(status: u16, body: Value) -> Self {
        Self {
            status,
            body,
            accepted_request_id: None,
        }
    }

    fn error(status: u16, body: ErrorBody) -> Self {
        Self::ok(
            status,
            serde_json::to_value(body).expect("an error body serialises"),
        )
    }

    fn invalid(details: Vec<ErrorDetail>) -> Self {
        Self::error(400, ErrorBody::invalid(details))
    }

    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn into_response(self, request_id: &str) -> Response {
        let mut response = (
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(self.body),
        )
            .into_response();
        let headers = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(request_id) {
            headers.insert(REQUEST_ID_HEADER, v);
        }
        if let Some(id) = self.accepted_request_id
            && let Ok(v) = HeaderValue::from_str(&id)
        {
            headers.insert(ACCEPTED_REQUEST_ID_HEADER, v);
        }
        response
    }
}

/// What the work of one request sees.
pub(crate) struct Ctx {
    channel_id: String,
    request_id: String,
    retry_key: Option<String>,
    traceparent: Option<String>,
    /// The JSON body (`Null` for requests without one).
    body: Value,
    /// Path parameters, in order.
    args: Vec<String>,
    query: HashMap<String, String>,
}

type Work = fn(&mut State, &Ctx) -> Answer;

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// One request, through LINE's steps (see the module's documentation).
async fn serve(
    sim: &Sim,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Option<&Bytes>,
    args: Vec<String>,
    query: HashMap<String, String>,
    work: Work,
) -> Response {
    let request_id = new_request_id();
    let token = header(headers, "authorization")
        .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_owned()));
    let draw = {
        let mut s = sim.lock();
        let Some(channel_id) = token.and_then(|t| s.channel_of_token(&t)) else {
            s.count(endpoint, 401);
            return Answer::error(
                401,
                ErrorBody::new(
                    "Authentication failed. Confirm that the access token in the authorization header is valid.",
                ),
            )
            .into_response(&request_id);
        };
        if !s.take(&channel_id, endpoint, Instant::now()) {
            s.count(endpoint, 429);
            return Answer::error(429, ErrorBody::new(RATE_LIMITED)).into_response(&request_id);
        }
        (channel_id, s.draw(endpoint))
    };
    let (channel_id, draw) = draw;
    if !draw.latency.is_zero() {
        tokio::time::sleep(draw.latency).await;
    }
    let answer = if draw.fault.is_some() && !draw.processed {
        None
    } else {
        let body = match body {
            None => Value::Null,
            Some(b) => match serde_json::from_slice::<Value>(b) {
                Ok(v) => v,
                Err(e) => {
                    let answer = Answer::error(
                        400,
                        ErrorBody::new(format!("The request body is not valid JSON: {e}")),
                    );
                    return finish(sim, endpoint, answer, draw.fault, &request_id).await;
                }
            },
        };
        let ctx = Ctx {
            channel_id,
            request_id: request_id.clone(),
            retry_key: header(headers, RETRY_KEY_HEADER),
            traceparent: header(headers, "traceparent"),
            body,
            args,
            query,
        };
        Some(with_retry_key(&mut sim.lock(), endpoint, &ctx, work))
    };
    match answer {
        Some(answer) => finish(sim, endpoint, answer, draw.fault, &request_id).await,
        None => {
            let answer = Answer::error(500, ErrorBody::new("Internal server error"));
            finish(sim, endpoint, answer, draw.fault, &request_id).await
        }
    }
}

/// Answers, unless a fault replaces the answer: a 5xx, or no answer until
/// the hold is over or line-sim stops.
async fn finish(
    sim: &Sim,
    endpoint: Endpoint,
    answer: Answer,
    fault: Option<Fault>,
    request_id: &str,
) -> Response {
    match fault {
        None => {
            sim.lock().count(endpoint, answer.status);
            answer.into_response(request_id)
        }
        Some(Fault::Error(status)) => {
            sim.lock().count(endpoint, status);
            let message = if status == 503 {
                "Service unavailable"
            } else {
                "Internal server error"
            };
            Answer::error(status, ErrorBody::new(message)).into_response(request_id)
        }
        Some(Fault::Timeout) => {
            sim.lock().count(endpoint, 0);
            let hold = sim.lock().config.timeout_hold;
            tokio::select! {
                _ = tokio::time::sleep(hold) => {}
                _ = sim.stopped() => {}
            }
            // The caller has given up long before; this answer is only for
            // one that waits longer than the hold.
            Answer::error(504, ErrorBody::new("Gateway timeout")).into_response(request_id)
        }
    }
}

/// The retry key's rules, around the endpoint's work.
fn with_retry_key(s: &mut State, endpoint: Endpoint, ctx: &Ctx, work: Work) -> Answer {
    let Some(key) = &ctx.retry_key else {
        return work(s, ctx);
    };
    if !endpoint.takes_retry_key() {
        return Answer::error(
            400,
            ErrorBody::new("The X-Line-Retry-Key header is not supported on this endpoint"),
        );
    }
    if !is_retry_key(key) {
        return Answer::error(
            400,
            ErrorBody::new("The X-Line-Retry-Key header must be a UUID in hexadecimal format"),
        );
    }
    if let Some(accepted) = s.accepted_key(&ctx.channel_id, key) {
        let mut body = ErrorBody::new("The retry key is already accepted");
        body.sent_messages = accepted.sent_messages;
        let mut answer = Answer::error(409, body);
        answer.accepted_request_id = Some(accepted.request_id);
        return answer;
    }
    let answer = work(s, ctx);
    if answer.is_success() {
        let sent_messages = answer
            .body
            .get("sentMessages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        s.accept_key(
            &ctx.channel_id,
            key,
            AcceptedKey {
                request_id: ctx.request_id.clone(),
                at: Instant::now(),
                sent_messages,
            },
        );
    }
    answer
}

/// Sent-message ids for `n` messages, as LINE answers a push or reply.
fn sent_messages(n: usize) -> Vec<Value> {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| {
            let id: u64 = rng.random_range(100_000_000_000_000_000..999_999_999_999_999_999);
            let quote: [u8; 12] = rng.random();
            let quote = hex::encode(quote);
            json!({"id": id.to_string(), "quoteToken": quote})
        })
        .collect()
}

/// Counts `n` messages against the channel's monthly quota; false when it
/// would go over.
fn use_quota(s: &mut State, channel_id: &str, n: u64) -> bool {
    let Some(quota) = s.config.monthly_quota else {
        *s.usage.entry(channel_id.to_owned()).or_default() += n;
        return true;
    };
    let used = s.usage.entry(channel_id.to_owned()).or_default();
    if *used + n > quota {
        return false;
    }
    *used += n;
    true
}

/// Records `messages` sent to each of `recipients`.
fn record(s: &mut State, ctx: &Ctx, endpoint: Endpoint, recipients: &[String], messages: &Value) {
    let at_ms = now_ms();
    for r in recipients {
        s.record_sent(SentMessage {
            seq: 0,
            at_ms,
            channel_id: ctx.channel_id.clone(),
            endpoint,
            recipient: r.clone(),
            retry_key: ctx.retry_key.clone(),
            request_id: ctx.request_id.clone(),
            messages: messages.clone(),
            traceparent: ctx.traceparent.clone(),
        });
    }
}

fn push_work(s: &mut State, ctx: &Ctx) -> Answer {
    let mut details = Vec::new();
    let to = ctx.body.get("to").and_then(Value::as_str);
    match to {
        None => details.push(ErrorDetail::new("to", "Must not be null")),
        Some(to) if !is_push_target(to) => details.push(ErrorDetail::new(
            "to",
            "Must be a valid user, group or room id",
        )),
        Some(_) => {}
    }
    details.extend(check_messages(ctx.body.get("messages")));
    if !details.is_empty() {
        return Answer::invalid(details);
    }
    if !use_quota(s, &ctx.channel_id, 1) {
        return Answer::error(429, ErrorBody::new(QUOTA_EXHAUSTED));
    }
    let messages = &ctx.body["messages"];
    record(
        s,
        ctx,
        Endpoint::Push,
        &[to.unwrap_or_default().to_owned()],
        messages,
    );
    let n = messages.as_array().map_or(0, Vec::len);
    Answer::ok(200, json!({"sentMessages": sent_messages(n)}))
}

/// The user ids of `property`: 1 to 500 valid ids, or the problems.
fn user_ids(body: &Value, property: &str) -> Result<Vec<String>, Vec<ErrorDetail>> {
    let Some(list) = body.get(property).and_then(Value::as_array) else {
        return Err(vec![ErrorDetail::new(property, "Must be an array")]);
    };
    let mut details = Vec::new();
    if list.is_empty() || list.len() > MAX_RECIPIENTS {
        details.push(ErrorDetail::new(
            property,
            format!("Size must be between 1 and {MAX_RECIPIENTS}"),
        ));
    }
    let mut ids = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        match v.as_str() {
            Some(id) if is_user_id(id) => ids.push(id.to_owned()),
            _ => details.push(ErrorDetail::new(
                format!("{property}[{i}]"),
                "Must be a valid user id",
            )),
        }
    }
    if details.is_empty() {
        Ok(ids)
    } else {
        Err(details)
    }
}

fn multicast_work(s: &mut State, ctx: &Ctx) -> Answer {
    let to = user_ids(&ctx.body, "to");
    let mut details = to.as_ref().err().cloned().unwrap_or_default();
    details.extend(check_messages(ctx.body.get("messages")));
    let to = match to {
        Ok(to) if details.is_empty() => to,
        _ => return Answer::invalid(details),
    };
    if !use_quota(s, &ctx.channel_id, to.len() as u64) {
        return Answer::error(429, ErrorBody::new(QUOTA_EXHAUSTED));
    }
    record(s, ctx, Endpoint::Multicast, &to, &ctx.body["messages"]);
    Answer::ok(200, json!({}))
}

fn reply_work(s: &mut State, ctx: &Ctx) -> Answer {
    let mut details = Vec::new();
    let token = ctx.body.get("replyToken").and_then(Value::as_str);
    if token.is_none_or(str::is_empty) {
        details.push(ErrorDetail::new("replyToken", "Must not be empty"));
    }
    details.extend(check_messages(ctx.body.get("messages")));
    if !details.is_empty() {
        return Answer::invalid(details);
    }
    let Some(user) = s.use_reply_token(&ctx.channel_id, token.unwrap_or_default()) else {
        return Answer::error(400, ErrorBody::new("Invalid reply token"));
    };
    let messages = &ctx.body["messages"];
    record(s, ctx, Endpoint::Reply, &[user], messages);
    let n = messages.as_array().map_or(0, Vec::len);
    Answer::ok(200, json!({"sentMessages": sent_messages(n)}))
}

fn broadcast_work(s: &mut State, ctx: &Ctx) -> Answer {
    let details = check_messages(ctx.body.get("messages"));
    if !details.is_empty() {
        return Answer::invalid(details);
    }
    record(
        s,
        ctx,
        Endpoint::Broadcast,
        &["*".to_owned()],
        &ctx.body["messages"],
    );
    Answer::ok(200, json!({}))
}

fn narrowcast_work(s: &mut State, ctx: &Ctx) -> Answer {
    let details = check_messages(ctx.body.get("messages"));
    if !details.is_empty() {
        return Answer::invalid(details);
    }
    record(
        s,
        ctx,
        Endpoint::Narrowcast,
        &["*".to_owned()],
        &ctx.body["messages"],
    );
    s.narrowcasts.insert(ctx.request_id.clone(), now_ms());
    Answer::ok(202, json!({}))
}

fn narrowcast_progress_work(s: &mut State, ctx: &Ctx) -> Answer {
    let Some(id) = ctx.query.get("requestId") else {
        return Answer::invalid(vec![ErrorDetail::new("requestId", "Must not be null")]);
    };
    match s.narrowcasts.get(id) {
        Some(at) => Answer::ok(
            200,
            json!({
                "phase": "succeeded",
                "successCount": 0,
                "failureCount": 0,
                "targetCount": 0,
                "acceptedTime": at,
                "completedTime": at,
            }),
        ),
        None => Answer::error(404, ErrorBody::new("Not found")),
    }
}

/// Links (or unlinks, with `menu` None) the rich menu of each user.
fn change_menus(
    s: &mut State,
    ctx: &Ctx,
    endpoint: Endpoint,
    users: &[String],
    menu: Option<&str>,
) {
    let at_ms = now_ms();
    for user in users {
        s.record_menu(MenuChange {
            seq: 0,
            at_ms,
            channel_id: ctx.channel_id.clone(),
            user_id: user.clone(),
            rich_menu_id: menu.map(str::to_owned),
            endpoint,
            request_id: ctx.request_id.clone(),
            traceparent: ctx.traceparent.clone(),
        });
    }
}

fn menu_exists(s: &State, channel_id: &str, menu: &str) -> bool {
    s.rich_menus
        .get(channel_id)
        .is_some_and(|m| m.contains_key(menu))
}

fn link_work(s: &mut State, ctx: &Ctx) -> Answer {
    let (user, menu) = (&ctx.args[0], &ctx.args[1]);
    if !is_user_id(user) {
        return Answer::invalid(vec![ErrorDetail::new("userId", "Must be a valid user id")]);
    }
    if !menu_exists(s, &ctx.channel_id, menu) {
        return Answer::error(400, ErrorBody::new("The rich menu was not found"));
    }
    change_menus(
        s,
        ctx,
        Endpoint::LinkRichMenu,
        std::slice::from_ref(user),
        Some(menu),
    );
    Answer::ok(200, json!({}))
}

fn unlink_work(s: &mut State, ctx: &Ctx) -> Answer {
    let user = &ctx.args[0];
    if !is_user_id(user) {
        return Answer::invalid(vec![ErrorDetail::new("userId", "Must be a valid user id")]);
    }
    change_menus(
        s,
        ctx,
        Endpoint::UnlinkRichMenu,
        std::slice::from_ref(user),
        None,
    );
    Answer::ok(200, json!({}))
}

fn bulk_link_work(s: &mut State, ctx: &Ctx) -> Answer {
    let users = user_ids(&ctx.body, "userIds");
    let menu = ctx.body.get("richMenuId").and_then(Value::as_str);
    let mut details = users.as_ref().err().cloned().unwrap_or_default();
    if menu.is_none() {
        details.push(ErrorDetail::new("richMenuId", "Must not be null"));
    }
    let (Ok(users), Some(menu)) = (users, menu) else {
        return Answer::invalid(details);
    };
    if !details.is_empty() {
        return Answer::invalid(details);
    }
    if !menu_exists(s, &ctx.channel_id, menu) {
        return Answer::error(400, ErrorBody::new("The rich menu was not found"));
    }
    change_menus(s, ctx, Endpoint::BulkLinkRichMenu, &users, Some(menu));
    Answer::ok(202, json!({}))
}

fn bulk_unlink_work(s: &mut State, ctx: &Ctx) -> Answer {
    match user_ids(&ctx.body, "userIds") {
        Ok(users) => {
            change_menus(s, ctx, Endpoint::BulkUnlinkRichMenu, &users, None);
            Answer::ok(202, json!({}))
        }
        Err(details) => Answer::invalid(details),
    }
}

fn create_rich_menu_work(s: &mut State, ctx: &Ctx) -> Answer {
    let details: Vec<ErrorDetail> = ["size", "selected", "name", "chatBarText", "areas"]
        .iter()
        .filter(|p| ctx.body.get(**p).is_none_or(Value::is_null))
        .map(|p| ErrorDetail::new(*p, "Must not be null"))
        .collect();
    if !details.is_empty() {
        return Answer::invalid(details);
    }
    let id = new_rich_menu_id();
    let mut menu = ctx.body.clone();
    menu["richMenuId"] = json!(id);
    s.rich_menus
        .entry(ctx.channel_id.clone())
        .or_default()
        .insert(id.clone(), menu);
    Answer::ok(200, json!({"richMenuId": id}))
}

fn list_rich_menus_work(s: &mut State, ctx: &Ctx) -> Answer {
    let menus: Vec<Value> = s
        .rich_menus
        .get(&ctx.channel_id)
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    Answer::ok(200, json!({"richmenus": menus}))
}

fn create_alias_work(s: &mut State, ctx: &Ctx) -> Answer {
    let alias = ctx.body.get("richMenuAliasId").and_then(Value::as_str);
    let menu = ctx.body.get("richMenuId").and_then(Value::as_str);
    let mut details = Vec::new();
    if alias.is_none_or(str::is_empty) {
        details.push(ErrorDetail::new("richMenuAliasId", "Must not be empty"));
    }
    if menu.is_none() {
        details.push(ErrorDetail::new("richMenuId", "Must not be null"));
    }
    let (Some(alias), Some(menu)) = (alias, menu) else {
        return Answer::invalid(details);
    };
    if !details.is_empty() {
        return Answer::invalid(details);
    }
    if !menu_exists(s, &ctx.channel_id, menu) {
        return Answer::error(400, ErrorBody::new("The rich menu was not found"));
    }
    let aliases = s.aliases.entry(ctx.channel_id.clone()).or_default();
    if aliases.contains_key(alias) {
        return Answer::error(400, ErrorBody::new("conflict richmenu alias id"));
    }
    aliases.insert(alias.to_owned(), menu.to_owned());
    Answer::ok(200, json!({}))
}

fn get_alias_work(s: &mut State, ctx: &Ctx) -> Answer {
    let alias = &ctx.args[0];
    match s.aliases.get(&ctx.channel_id).and_then(|a| a.get(alias)) {
        Some(menu) => Answer::ok(200, json!({"richMenuAliasId": alias, "richMenuId": menu})),
        None => Answer::error(404, ErrorBody::new("richmenu alias not found")),
    }
}

fn list_aliases_work(s: &mut State, ctx: &Ctx) -> Answer {
    let aliases: Vec<Value> = s
        .aliases
        .get(&ctx.channel_id)
        .map(|a| {
            a.iter()
                .map(|(alias, menu)| json!({"richMenuAliasId": alias, "richMenuId": menu}))
                .collect()
        })
        .unwrap_or_default();
    Answer::ok(200, json!({"aliases": aliases}))
}

fn delete_alias_work(s: &mut State, ctx: &Ctx) -> Answer {
    let removed = s
        .aliases
        .get_mut(&ctx.channel_id)
        .and_then(|a| a.remove(&ctx.args[0]));
    match removed {
        Some(_) => Answer::ok(200, json!({})),
        None => Answer::error(404, ErrorBody::new("richmenu alias not found")),
    }
}

fn profile_work(_: &mut State, ctx: &Ctx) -> Answer {
    let user = &ctx.args[0];
    if !is_user_id(user) {
        return Answer::error(404, ErrorBody::new("Not found"));
    }
    Answer::ok(
        200,
        json!({
            "userId": user,
            "displayName": format!("Friend {}", &user[user.len() - 6..]),
            "pictureUrl": format!("https://profile.line-scdn.net/{user}"),
            "statusMessage": "",
            "language": "ja",
        }),
    )
}

fn quota_work(s: &mut State, _: &Ctx) -> Answer {
    match s.config.monthly_quota {
        Some(q) => Answer::ok(200, json!({"type": "limited", "value": q})),
        None => Answer::ok(200, json!({"type": "none"})),
    }
}

fn quota_consumption_work(s: &mut State, ctx: &Ctx) -> Answer {
    let used = s.usage.get(&ctx.channel_id).copied().unwrap_or(0);
    Answer::ok(200, json!({"totalUsage": used}))
}

type Shared = AxumState<Sim>;

async fn reply(AxumState(sim): Shared, h: HeaderMap, body: Bytes) -> Response {
    serve(
        &sim,
        Endpoint::Reply,
        &h,
        Some(&body),
        vec![],
        HashMap::new(),
        reply_work,
    )
    .await
}

async fn push(AxumState(sim): Shared, h: HeaderMap, body: Bytes) -> Response {
    serve(
        &sim,
        Endpoint::Push,
        &h,
        Some(&body),
        vec![],
        HashMap::new(),
        push_work,
    )
    .await
}

async fn multicast(AxumState(sim): Shared, h: HeaderMap, body: Bytes) -> Response {
    let work = multicast_work;
    serve(
        &sim,
        Endpoint::Multicast,
        &h,
        Some(&body),
        vec![],
        HashMap::new(),
        work,
    )
    .await
}

async fn narrowcast(AxumState(sim): Shared, h: HeaderMap, body: Bytes) -> Response {
    let work = narrowcast_work;
    serve(
        &sim,
        Endpoint::Narrowcast,
        &h,
        Some(&body),
        vec![],
        HashMap::new(),
        work,
    )
    .await
}

async fn narrowcast_progress(
    AxumState(sim): Shared,
    h: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let work = narrowcast_progress_work;
    serve(
        &sim,
        Endpoint::NarrowcastProgress,
        &h,
        None,
        vec![],
        q,
        work,
    )
    .await
}

async fn broadcast(AxumState(sim): Shared, h: HeaderMap, body: Bytes) -> Response {
    let work = broadcast_work;
    serve(
        &sim,
        Endpoint::Broadcast,
        &h,
        Some(&body),
        vec![],
        HashMap::new(),
        work,
    )
    .await
}

async fn link_rich_menu(
    AxumState(sim): Shared,
    Path((user, menu)): Path<(String, String)>,
    h: HeaderMap,
) -> Response {
    let args = vec![user, menu];
    serve(
        &sim,
        Endpoint::LinkRichMenu,
        &h,
        None,
        args,
        HashMap::new(),
        link_work,
    )
    .await
}

async fn unlink_rich_menu(
    AxumState(sim): Shared,
    Path(user): Path<String>,
    h: HeaderMap,
) -> Response {
    let args = vec![user];
    serve(
        &sim,
        Endpoint::UnlinkRichMenu,
        &h,
        None,
        args,
        HashMap::new(),
        unlink_work,
    )
    .await
}

async fn bulk_link(AxumState(sim): Shared, h: HeaderMap, body: Bytes) -> Response {
    let (e, work) = (Endpoint::BulkLinkRichMenu, bulk_link_work);
    serve(&sim, e, &h, Some(&body), vec![], HashMap::new(), work).await
}

async fn bulk_unlink(AxumState(sim): Shared, h: HeaderMap, body: Bytes) -> Response {
    let (e, work) = (Endpoint::BulkUnlinkRichMenu, bulk_unlink_work);
    serve(&sim, e, &h, Some(&body), vec![], HashMap::new(), work).await
}

async fn create_rich_menu(AxumState(sim): Shared, h: HeaderMap, body: Bytes) -> Response {
    let (e, work) = (Endpoint::CreateRichMenu, create_rich_menu_work);
    serve(&sim, e, &h, Some(&body), vec![], HashMap::new(), work).await
}

async fn list_rich_menus(AxumState(sim): Shared, h: HeaderMap) -> Response {
    let (e, work) = (Endpoint::ListRichMenus, list_rich_menus_work);
    serve(&sim, e, &h, None, vec![], HashMap::new(), work).await
}

async fn create_alias(AxumState(sim): Shared, h: HeaderMap, body: Bytes) -> Response {
    let (e, work) = (Endpoint::CreateRichMenuAlias, create_alias_work);
    serve(&sim, e, &h, Some(&body), vec![], HashMap::new(), work).await
}

async fn list_aliases(AxumState(sim): Shared, h: HeaderMap) -> Response {
    let (e, work) = (Endpoint::ListRichMenuAliases, list_aliases_work);
    serve(&sim, e, &h, None, vec![], HashMap::new(), work).await
}

async fn get_alias(AxumState(sim): Shared, Path(alias): Path<String>, h: HeaderMap) -> Response {
    let (e, work) = (Endpoint::GetRichMenuAlias, get_alias_work);
    serve(&sim, e, &h, None, vec![alias], HashMap::new(), work).await
}

async fn delete_alias(AxumState(sim): Shared, Path(alias): Path<String>, h: HeaderMap) -> Response {
    let (e, work) = (Endpoint::DeleteRichMenuAlias, delete_alias_work);
    serve(&sim, e, &h, None, vec![alias], HashMap::new(), work).await
}

async fn profile(AxumState(sim): Shared, Path(user): Path<String>, h: HeaderMap) -> Response {
    serve(
        &sim,
        Endpoint::Profile,
        &h,
        None,
        vec![user],
        HashMap::new(),
        profile_work,
    )
    .await
}

async fn quota(AxumState(sim): Shared, h: HeaderMap) -> Response {
    serve(
        &sim,
        Endpoint::Quota,
        &h,
        None,
        vec![],
        HashMap::new(),
        quota_work,
    )
    .await
}

async fn quota_consumption(AxumState(sim): Shared, h: HeaderMap) -> Response {
    let (e, work) = (Endpoint::QuotaConsumption, quota_consumption_work);
    serve(&sim, e, &h, None, vec![], HashMap::new(), work).await
}

async fn not_found() -> Response {
    Answer::error(404, ErrorBody::new("Not found")).into_response(&new_request_id())
}
