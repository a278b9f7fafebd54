//! line-sim's admin API: what tests, benchmarks and developers use to set
//! it up, break it, and see what it was sent. JSON in and out; errors are
//! `{"error": <code>, "message": <text>}` with 400 (`invalid`) or 404
//! (`not_found`).
//!
//! | route | what |
//! |---|---|
//! | `GET /health` | 200 while serving |
//! | `GET /channels`, `PUT /channels/{id}` `{access_token, secret}` | the channels and their tokens |
//! | `GET /faults`, `PUT /faults`, `DELETE /faults` | injected faults (see [`Faults`]) |
//! | `POST /throttle` `{for_ms}` | a 429 burst: every request answered 429 for that long |
//! | `GET /limits`, `PUT /limits` `{<endpoint>: {requests, per_ms}}` | rate limits per channel and endpoint |
//! | `GET /ledger/messages?channel_id&recipient&after&limit` | accepted messages, one per recipient, in order |
//! | `GET /ledger/rich-menus?channel_id&user_id&after&limit` | rich-menu links and unlinks, in order |
//! | `GET /rich-menus/{channel_id}/users/{user_id}` | a user's current rich menu |
//! | `GET /stats` | answers per endpoint and status; ledger sizes |
//! | `POST /reply-tokens` `{channel_id, user_id}` | a fresh reply token for that user |
//! | `POST /storms` (a [`StormSpec`]), `GET /storms/{id}` | a webhook storm and its report |
//! | `POST /reset` | forget everything sent, counted and remembered |

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, body::Bytes};
use hibiki_line::api::{Endpoint, Limit};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::storm::{StormReport, StormSpec};
use crate::{Faults, Sim, SimChannel};

/// The most ledger entries one page returns.
const MAX_PAGE: usize = 100_000;

/// The admin routes.
pub fn router(sim: Sim) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/channels", get(channels))
        .route("/channels/{channel_id}", put(put_channel))
        .route("/faults", get(faults).put(put_faults).delete(clear_faults))
        .route("/throttle", post(throttle))
        .route("/limits", get(limits).put(put_limits))
        .route("/ledger/messages", get(messages))
        .route("/ledger/rich-menus", get(menu_changes))
        .route("/rich-menus/{channel_id}/users/{user_id}", get(user_menu))
        .route("/stats", get(stats))
        .route("/reply-tokens", post(reply_token))
        .route("/storms", post(start_storm))
        .route("/storms/{id}", get(storm))
        .route("/reset", post(reset))
        .with_state(sim)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": code, "message": message.into()})),
    )
        .into_response()
}

fn invalid(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid", message)
}

/// A JSON body, or a 400 naming what is wrong with it.
fn body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, String> {
    payload.map(|Json(v)| v).map_err(|e| e.body_text())
}

async fn channels(State(sim): State<Sim>) -> Response {
    let list: Vec<Value> = sim
        .lock()
        .channels()
        .into_iter()
        .map(|c| json!({"channel_id": c.channel_id, "access_token": c.access_token}))
        .collect();
    Json(json!({ "channels": list })).into_response()
}

#[derive(Deserialize)]
struct ChannelBody {
    access_token: String,
    secret: String,
}

async fn put_channel(
    State(sim): State<Sim>,
    Path(channel_id): Path<String>,
    payload: Result<Json<ChannelBody>, JsonRejection>,
) -> Response {
    let b = match body(payload) {
        Ok(b) => b,
        Err(e) => return invalid(e),
    };
    if b.access_token.is_empty() || b.secret.is_empty() {
        return invalid("access_token and secret: must not be empty");
    }
    sim.lock().put_channel(SimChannel {
        channel_id,
        access_token: b.access_token,
        secret: b.secret,
    });
    StatusCode::NO_CONTENT.into_response()
}

async fn faults(State(sim): State<Sim>) -> Response {
    Json(sim.lock().config.faults.clone()).into_response()
}

async fn put_faults(
    State(sim): State<Sim>,
    payload: Result<Json<Faults>, JsonRejection>,
) -> Response {
    let f = match body(payload) {
        Ok(f) => f,
        Err(e) => return invalid(e),
    };
    if let Err(e) = f.check() {
        return invalid(e);
    }
    sim.lock().config.faults = f.clone();
    Json(f).into_response()
}

async fn clear_faults(State(sim): State<Sim>) -> Response {
    sim.lock().config.faults = Faults::default();
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct ThrottleBody {
    for_ms: u64,
}

async fn throttle(
    State(sim): State<Sim>,
    payload: Result<Json<ThrottleBody>, JsonRejection>,
) -> Response {
    match body(payload) {
        Ok(b) => {
            sim.lock().throttle_for(Duration::from_millis(b.for_ms));
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => invalid(e),
    }
}

fn all_limits(sim: &Sim) -> BTreeMap<&'static str, Limit> {
    let s = sim.lock();
    Endpoint::ALL
        .iter()
        .map(|e| (e.name(), s.limit(*e)))
        .collect()
}

async fn limits(State(sim): State<Sim>) -> Response {
    Json(all_limits(&sim)).into_response()
}

async fn put_limits(
    State(sim): State<Sim>,
    payload: Result<Json<BTreeMap<String, Limit>>, JsonRejection>,
) -> Response {
    let changes = match body(payload) {
        Ok(c) => c,
        Err(e) => return invalid(e),
    };
    let mut parsed = Vec::new();
    for (name, limit) in changes {
        let Some(e) = Endpoint::from_name(&name) else {
            return invalid(format!("{name}: not an endpoint"));
        };
        if limit.requests == 0 || limit.per.is_zero() {
            return invalid(format!("{name}: requests and per_ms must be above 0"));
        }
        parsed.push((e, limit));
    }
    sim.lock().config.limits.extend(parsed);
    Json(all_limits(&sim)).into_response()
}

#[derive(Deserialize)]
struct LedgerQuery {
    channel_id: Option<String>,
    recipient: Option<String>,
    user_id: Option<String>,
    /// Entries after this sequence number.
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn messages(State(sim): State<Sim>, Query(q): Query<LedgerQuery>) -> Response {
    let limit = q.limit.unwrap_or(1000).min(MAX_PAGE);
    let s = sim.lock();
    let page: Vec<_> = s
        .sent
        .iter()
        .skip(q.after as usize)
        .filter(|m| q.channel_id.as_ref().is_none_or(|c| *c == m.channel_id))
        .filter(|m| q.recipient.as_ref().is_none_or(|r| *r == m.recipient))
        .take(limit)
        .collect();
    let next = page.last().map_or(q.after, |m| m.seq);
    Json(json!({"messages": page, "next_after": next})).into_response()
}

async fn menu_changes(State(sim): State<Sim>, Query(q): Query<LedgerQuery>) -> Response {
    let limit = q.limit.unwrap_or(1000).min(MAX_PAGE);
    let s = sim.lock();
    let page: Vec<_> = s
        .menu_changes
        .iter()
        .skip(q.after as usize)
        .filter(|m| q.channel_id.as_ref().is_none_or(|c| *c == m.channel_id))
        .filter(|m| q.user_id.as_ref().is_none_or(|u| *u == m.user_id))
        .take(limit)
        .collect();
    let next = page.last().map_or(q.after, |m| m.seq);
    Json(json!({"changes": page, "next_after": next})).into_response()
}

async fn user_menu(
    State(sim): State<Sim>,
    Path((channel_id, user_id)): Path<(String, String)>,
) -> Response {
    let menu = sim.lock().user_menus.get(&(channel_id, user_id)).cloned();
    Json(json!({ "richMenuId": menu })).into_response()
}

async fn stats(State(sim): State<Sim>) -> Response {
    let s = sim.lock();
    let requests: BTreeMap<&str, BTreeMap<String, u64>> = s
        .counts
        .iter()
        .map(|(e, by)| {
            (
                e.name(),
                by.iter().map(|(st, n)| (st.to_string(), *n)).collect(),
            )
        })
        .collect();
    Json(json!({
        "requests": requests,
        "messages": s.sent.len(),
        "menu_changes": s.menu_changes.len(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ReplyTokenBody {
    channel_id: String,
    user_id: String,
}

async fn reply_token(
    State(sim): State<Sim>,
    payload: Result<Json<ReplyTokenBody>, JsonRejection>,
) -> Response {
    match body(payload) {
        Ok(b) => {
            let token = sim.lock().issue_reply_token(&b.channel_id, &b.user_id);
            Json(json!({ "replyToken": token })).into_response()
        }
        Err(e) => invalid(e),
    }
}

async fn start_storm(State(sim): State<Sim>, raw: Bytes) -> Response {
    let mut spec: StormSpec = match serde_json::from_slice(&raw) {
        Ok(s) => s,
        Err(e) => return invalid(format!("not a storm: {e}")),
    };
    if spec.secret.is_empty() {
        match sim.lock().channel(&spec.channel_id) {
            Some(c) => spec.secret = c.secret.clone(),
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!(
                        "channel {:?}: unknown, and no secret given",
                        spec.channel_id
                    ),
                );
            }
        }
    }
    if let Err(e) = spec.check() {
        return invalid(e);
    }
    let id = {
        let mut s = sim.lock();
        let id = s.storms.keys().next_back().map_or(1, |k| k + 1);
        s.storms.insert(id, StormReport::default());
        s.storm_chains
            .insert(id, crate::storm::StormChain::default());
        id
    };
    let channel = spec.channel_id.clone();
    let tokens = sim.clone();
    let issue: Arc<dyn Fn(&str) -> String + Send + Sync> =
        Arc::new(move |user: &str| tokens.lock().issue_reply_token(&channel, user));
    let posts = sim.clone();
    let on_accepted: crate::storm::OnAccepted = Arc::new(move |user: &str, at: u64| {
        if let Some(chain) = posts.lock().storm_chains.get_mut(&id) {
            chain.post(user, at);
        }
    });
    let done = sim.clone();
    tokio::spawn(async move {
        let report = crate::storm::run(spec, issue, on_accepted)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "storm failed");
                StormReport {
                    done: true,
                    ..StormReport::default()
                }
            });
        let mut s = done.lock();
        if let Some(chain) = s.storm_chains.get_mut(&id) {
            chain.close();
        }
        s.storms.insert(id, report);
    });
    (StatusCode::ACCEPTED, Json(json!({ "storm_id": id }))).into_response()
}

async fn storm(State(sim): State<Sim>, Path(id): Path<u64>) -> Response {
    let found = {
        let s = sim.lock();
        s.storms.get(&id).map(|r| {
            let chain = s.storm_chains.get(&id).map(|c| c.snapshot());
            (r.clone(), chain.unwrap_or_default())
        })
    };
    match found {
        Some((mut report, chain)) => {
            report.chain = Some(chain.report());
            Json(report).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "not_found", format!("storm {id}")),
    }
}

async fn reset(State(sim): State<Sim>) -> Response {
    sim.lock().reset();
    StatusCode::NO_CONTENT.into_response()
}
