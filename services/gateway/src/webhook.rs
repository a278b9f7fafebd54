//! `POST /line/webhook/{channel_id}`: the one route LINE calls.
//!
//! The answers (JSON `{"error": <code>, "message": <text>}` unless 200):
//!
//! | status | error | when |
//! |---|---|---|
//! | 200 | | every event appended, or already appended before (a redelivery); also `{"events": []}`, LINE's URL check |
//! | 400 | `malformed` | the signature is valid but the body is not a LINE webhook; the message names the bad event (`events[3]: has no webhookEventId`) |
//! | 401 | `bad_signature` | `x-line-signature` missing or not the body's HMAC under the channel secret |
//! | 404 | `unknown_channel` | no channel with this id is registered in contacts |
//! | 413 | `too_large` | the body is over `HIBIKI_WEBHOOK_MAX_BODY_BYTES` |
//! | 503 | `unavailable` | Redis is unreachable, or a shard is at its maximum length (back-pressure), or the channel registry has not been loaded yet; LINE redelivers later |
//! | 503 | `overloaded` | more than `HIBIKI_WEBHOOK_CONCURRENCY` requests in flight: shed at once |
//! | 503 | `timeout` | the request took longer than `HIBIKI_WEBHOOK_TIMEOUT_MS` |
//!
//! A 503 never loses an event: what was appended before it is remembered
//! by its `webhookEventId`, so LINE's redelivery appends only the rest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hibiki_proto::common::v1::InboundEvent;
use hibiki_runtime::eventlog::{Appended, Event, EventLog};
use hibiki_runtime::telemetry;
use prost::Message;
use tower::ServiceBuilder;
use tracing::Instrument;

use crate::line;
use hibiki_runtime::channels::{Channels, Lookup};

/// The HTTP edge's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest body accepted, in bytes.
    pub max_body: usize,
    /// Requests handled at once; one more is answered 503 at once.
    pub concurrency: usize,
    /// Longest a request may take before it is answered 503.
    pub timeout: Duration,
}

/// What every request needs.
#[derive(Clone)]
pub struct Webhooks {
    channels: Channels,
    log: EventLog,
}

impl Webhooks {
    /// Requests checked against `channels`, appended to `log`.
    pub fn new(channels: Channels, log: EventLog) -> Self {
        Self { channels, log }
    }
}

/// The gateway's HTTP routes behind one tower stack: load shedding, a
/// concurrency limit and a timeout, all answering 503.
pub fn router(webhooks: Webhooks, limits: &Limits) -> Router {
    Router::new()
        .route("/line/webhook/{channel_id}", post(receive))
        .layer(DefaultBodyLimit::max(limits.max_body))
        .with_state(Arc::new(webhooks))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(refused))
                .load_shed()
                .concurrency_limit(limits.concurrency)
                .timeout(limits.timeout),
        )
}

/// The tower stack refused or cut a request.
async fn refused(error: tower::BoxError) -> Response {
    if error.is::<tower::load_shed::error::Overloaded>() {
        answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many webhooks in flight; retry later",
        )
    } else if error.is::<tower::timeout::error::Elapsed>() {
        answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "the webhook was not handled in time; retry later",
        )
    } else {
        answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &error.to_string(),
        )
    }
}

/// A non-200 answer, counted by its error code.
fn answer(status: StatusCode, error: &'static str, message: &str) -> Response {
    metrics::counter!("hibiki_gateway_webhooks_total", "outcome" => error).increment(1);
    let body = serde_json::json!({ "error": error, "message": message });
    (status, axum::Json(body)).into_response()
}

fn accepted(outcome: &'static str) -> Response {
    metrics::counter!("hibiki_gateway_webhooks_total", "outcome" => outcome).increment(1);
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        "{}",
    )
        .into_response()
}

async fn receive(
    State(webhooks): State<Arc<Webhooks>>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!("webhook", channel = channel_id.as_str());
    // LINE sends no trace context; a caller that does (line-sim, a proxy)
    // is continued.
    telemetry::set_parent(&span, telemetry::extract_headers(&headers));
    handle(&webhooks, &channel_id, &headers, body)
        .instrument(span)
        .await
}

async fn handle(
    webhooks: &Webhooks,
    channel_id: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let received_at = hibiki_runtime::timestamp::to_proto(chrono::Utc::now());
    let body = match body {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the body is over the gateway's limit (HIBIKI_WEBHOOK_MAX_BODY_BYTES)",
            );
        }
        Err(rejection) => {
            return answer(StatusCode::BAD_REQUEST, "malformed", &rejection.body_text());
        }
    };
    let keys = match webhooks.channels.lookup(channel_id) {
        Lookup::Found(keys) => keys,
        Lookup::Unknown => {
            return answer(
                StatusCode::NOT_FOUND,
                "unknown_channel",
                &format!("no channel {channel_id:?} is registered"),
            );
        }
        Lookup::NotLoaded => {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the channel registry is not loaded yet; retry later",
            );
        }
    };
    let signature = headers
        .get(line::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok());
    let Some(signature) = signature else {
        return answer(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            "x-line-signature is missing",
        );
    };
    if !line::signature_is_valid(keys.secret.expose().as_bytes(), &body, signature) {
        return answer(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            "x-line-signature does not match the body under the channel secret",
        );
    }
    let webhook = match line::parse(&body) {
        Ok(w) => w,
        Err(e) => return answer(StatusCode::BAD_REQUEST, "malformed", &e.to_string()),
    };
    if webhook.events.is_empty() {
        return accepted("empty");
    }
    let trace = telemetry::current_trace_context();
    let entries: Vec<(InboundEvent, Vec<u8>)> = webhook
        .events
        .into_iter()
        .map(|mut e| {
            e.tenant_id = keys.tenant_id.clone();
            e.channel_id = channel_id.to_owned();
            e.received_at = Some(received_at);
            e.trace = Some(trace.clone());
            let payload = e.encode_to_vec();
            (e, payload)
        })
        .collect();
    let events: Vec<Event<'_>> = entries
        .iter()
        .map(|(e, payload)| Event {
            channel_id,
            user_id: shard_key(e),
            event_id: &e.webhook_event_id,
            timestamp_ms: e.timestamp_ms,
            payload,
        })
        .collect();
    let started = Instant::now();
    let outcomes = webhooks.log.append(&events).await;
    metrics::histogram!("hibiki_eventlog_append_seconds").record(started.elapsed().as_secs_f64());
    let outcomes = match outcomes {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "event log unreachable: answering 503");
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the event log is unreachable; retry later",
            );
        }
    };
    let (mut added, mut duplicates, mut refused) = (0u64, 0u64, 0u64);
    for o in &outcomes {
        match o {
            Appended::Added(_) => added += 1,
            Appended::Duplicate => duplicates += 1,
            Appended::Full => refused += 1,
        }
    }
    for (result, n) in [
        ("appended", added),
        ("duplicate", duplicates),
        ("refused", refused),
    ] {
        if n > 0 {
            metrics::counter!("hibiki_gateway_events_total", "result" => result).increment(n);
        }
    }
    if refused > 0 {
        tracing::warn!(
            refused,
            added,
            "event log shard at its maximum length: answering 503"
        );
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the event log is full (back-pressure); retry later",
        );
    }
    accepted(if added == 0 { "duplicate" } else { "accepted" })
}

/// What keeps an event's order: its user, else its group or room (events
/// without a source share one shard per channel).
fn shard_key(e: &InboundEvent) -> &str {
    match &e.source {
        Some(s) if !s.user_id.is_empty() => &s.user_id,
        Some(s) if !s.group_id.is_empty() => &s.group_id,
        Some(s) => &s.room_id,
        None => "",
    }
}
