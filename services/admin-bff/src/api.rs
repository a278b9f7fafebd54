//! The dashboard's HTTP side: the embedded page, sign-in sessions, the
//! overview (JSON) and the live head counts (Server-Sent Events).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State as Extract};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt as _;
use hibiki_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use hibiki_proto::analytics::v1::{
    GetDeliveryStatsRequest, GetEventRatesRequest, GetScenarioFunnelRequest,
    GetSegmentCountsRequest, TimeRange,
};
use hibiki_proto::common::v1::PageRequest;
use hibiki_proto::contacts::v1::ListSegmentsRequest;
use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
use hibiki_proto::scenario::v1::ListScenariosRequest;
use hibiki_proto::scenario::v1::scenario_service_client::ScenarioServiceClient;
use hibiki_runtime::config::Secret;
use hibiki_runtime::grpc::ClientInterceptor;
use hibiki_runtime::timestamp;
use serde::{Deserialize, Serialize};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::feed::{Count, Feeds};
use crate::session::{Session, Sessions};

/// The page and its assets, embedded: nothing to build or deploy beside the
/// binary.
const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

/// The session cookie's name.
const COOKIE: &str = "hibiki_session";

/// The services the BFF reads.
#[derive(Clone)]
pub struct Backends {
    /// analytics: counts, rates, deliveries, funnels.
    pub analytics: Channel,
    /// contacts: segment names.
    pub contacts: Channel,
    /// scenario: the tenant's scenarios.
    pub scenario: Channel,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct State(Arc<Inner>);

struct Inner {
    backends: Backends,
    feeds: Feeds,
    sessions: Sessions,
}

impl State {
    /// The handlers' state.
    pub fn new(backends: Backends, feeds: Feeds, sessions: Sessions) -> Self {
        Self(Arc::new(Inner {
            backends,
            feeds,
            sessions,
        }))
    }
}

/// The routes.
pub fn router(state: State) -> axum::Router {
    axum::Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/app.css",
            get(|| asset("text/css; charset=utf-8", APP_CSS)),
        )
        .route(
            "/api/session",
            axum::routing::post(sign_in).delete(sign_out),
        )
        .route("/api/overview", get(overview))
        .route("/api/stream", get(stream))
        .with_state(state)
}

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// An answer with a status and `{"error": message}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        message: message.into(),
    }
}

/// A backend's refusal, as the browser should see it.
fn from_status(what: &str, status: &tonic::Status) -> ApiError {
    let code = match status.code() {
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    error(code, format!("{what}: {}", status.message()))
}

type Authorized = InterceptedService<Channel, ClientInterceptor>;

fn authorized(channel: &Channel, token: &Secret) -> Result<Authorized, ApiError> {
    let interceptor = ClientInterceptor::new(token).map_err(|_| {
        error(
            StatusCode::UNAUTHORIZED,
            "the token holds characters a header cannot carry",
        )
    })?;
    Ok(InterceptedService::new(channel.clone(), interceptor))
}

#[derive(Deserialize)]
struct SignIn {
    tenant: String,
    token: String,
}

async fn sign_in(
    Extract(state): Extract<State>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let Ok(SignIn { tenant, token }) = serde_json::from_slice::<SignIn>(&body) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "expected a JSON body {\"tenant\": \"...\", \"token\": \"...\"}",
        ));
    };
    if tenant.trim().is_empty() || token.trim().is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "tenant and token are both required",
        ));
    }
    let (tenant, token) = (tenant.trim().to_owned(), Secret::new(token.trim()));
    // analytics decides: the token must be one the mesh accepts for the tenant.
    let client = authorized(&state.0.backends.analytics, &token)?;
    let check = AnalyticsServiceClient::new(client)
        .get_segment_counts(GetSegmentCountsRequest {
            tenant_id: tenant.clone(),
            segment_ids: Vec::new(),
        })
        .await;
    if let Err(status) = check {
        return Err(match status.code() {
            tonic::Code::Unauthenticated => error(StatusCode::UNAUTHORIZED, "unknown token"),
            tonic::Code::PermissionDenied => {
                error(StatusCode::FORBIDDEN, "this token is not for this tenant")
            }
            _ => from_status("analytics", &status),
        });
    }
    let value = state.0.sessions.issue(&Session { tenant, token });
    let cookie = format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        state.0.sessions.ttl().as_secs()
    );
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("an ASCII cookie"),
    );
    Ok(response)
}

/// Signs out: the browser drops its cookie.
async fn sign_out() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("hibiki_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

#[derive(Deserialize)]
struct TenantParam {
    tenant: Option<String>,
}

/// Who is asking: the session of the cookie, or a bearer token with
/// `?tenant=`. The token itself is checked by the services it is sent to.
fn caller(state: &State, headers: &HeaderMap, query: &TenantParam) -> Result<Session, ApiError> {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        let Some(tenant) = query.tenant.as_deref().filter(|t| !t.is_empty()) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "a bearer token needs ?tenant=<tenant>",
            ));
        };
        return Ok(Session {
            tenant: tenant.to_owned(),
            token: Secret::new(bearer.trim()),
        });
    }
    let value =
        session_cookie(headers).ok_or_else(|| error(StatusCode::UNAUTHORIZED, "sign in first"))?;
    state.0.sessions.open(&value).ok_or_else(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "the session has ended: sign in again",
        )
    })
}

/// A segment on the dashboard.
#[derive(Serialize)]
struct SegmentView {
    id: String,
    name: String,
    count: i64,
    /// The last hour: [Unix ms, count], oldest first.
    history: Vec<(i64, i64)>,
}

/// One minute of inbound events.
#[derive(Serialize)]
struct RateView {
    t: i64,
    total: i64,
    by_type: HashMap<String, i64>,
}

/// One endpoint's outcomes.
#[derive(Serialize)]
struct DeliveryView {
    endpoint: String,
    accepted: i64,
    already_accepted: i64,
    retrying: i64,
    dead_lettered: i64,
    recipients: i64,
}

/// One scenario's funnel.
#[derive(Serialize)]
struct FunnelView {
    scenario_id: String,
    name: String,
    enabled: bool,
    entered: i64,
    steps: Vec<(String, i64)>,
    completed: i64,
    ended_early: i64,
}

#[derive(Serialize)]
struct Overview {
    tenant: String,
    segments: Vec<SegmentView>,
    events: Vec<RateView>,
    /// Events per second over about the last 60 seconds.
    events_per_second: f64,
    deliveries: Vec<DeliveryView>,
    dead_letters: i64,
    funnels: Vec<FunnelView>,
    /// Whatever could not be shown, and why (a backend away).
    notes: Vec<String>,
}

fn range(span: chrono::Duration) -> Option<TimeRange> {
    let end = chrono::Utc::now();
    Some(TimeRange {
        start: Some(timestamp::to_proto(end - span)),
        end: Some(timestamp::to_proto(end)),
    })
}

async fn overview(
    Extract(state): Extract<State>,
    headers: HeaderMap,
    Query(query): Query<TenantParam>,
) -> Result<Response, ApiError> {
    let session = caller(&state, &headers, &query)?;
    let view = build_overview(&state, &session).await?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(view)).into_response())
}

async fn build_overview(state: &State, session: &Session) -> Result<Overview, ApiError> {
    let backends = &state.0.backends;
    let tenant = session.tenant.clone();
    let mut analytics =
        AnalyticsServiceClient::new(authorized(&backends.analytics, &session.token)?);
    let mut segments_client =
        SegmentServiceClient::new(authorized(&backends.contacts, &session.token)?);
    let mut scenarios_client =
        ScenarioServiceClient::new(authorized(&backends.scenario, &session.token)?);
    let feed = state.0.feeds.feed(&tenant, &session.token);

    let (mut a1, mut a2, mut a3) = (analytics.clone(), analytics.clone(), analytics.clone());
    let (counts, rates, deliveries, names, scenarios) = tokio::join!(
        a1.get_segment_counts(GetSegmentCountsRequest {
            tenant_id: tenant.clone(),
            segment_ids: Vec::new(),
        }),
        a2.get_event_rates(GetEventRatesRequest {
            tenant_id: tenant.clone(),
            range: range(chrono::Duration::hours(1)),
            step: None,
            event_types: Vec::new(),
        }),
        a3.get_delivery_stats(GetDeliveryStatsRequest {
            tenant_id: tenant.clone(),
            range: range(chrono::Duration::hours(24)),
            channel_id: String::new(),
        }),
        segments_client.list_segments(ListSegmentsRequest {
            tenant_id: tenant.clone(),
            page: Some(PageRequest {
                page_size: 1000,
                page_token: String::new(),
            }),
        }),
        scenarios_client.list_scenarios(ListScenariosRequest {
            tenant_id: tenant.clone(),
            page: Some(PageRequest {
                page_size: 100,
                page_token: String::new(),
            }),
        }),
    );
    let counts = counts
        .map_err(|s| from_status("analytics", &s))?
        .into_inner()
        .counts;
    let rates = rates
        .map_err(|s| from_status("analytics", &s))?
        .into_inner()
        .points;
    let deliveries = deliveries
        .map_err(|s| from_status("analytics", &s))?
        .into_inner()
        .endpoints;
    let mut notes = Vec::new();

    // Segments: every one contacts knows (by name), with analytics' count.
    let history = feed.history();
    let live: HashMap<String, i64> = counts
        .into_iter()
        .map(|c| (c.segment_id, c.member_count))
        .collect();
    let mut segments: Vec<SegmentView> = match names {
        Ok(list) => list
            .into_inner()
            .segments
            .into_iter()
            .map(|s| SegmentView {
                count: live.get(&s.segment_id).copied().unwrap_or(0),
                history: history.get(&s.segment_id).cloned().unwrap_or_default(),
                id: s.segment_id,
                name: s.name,
            })
            .collect(),
        Err(status) => {
            notes.push(format!("segment names unavailable: {}", status.message()));
            live.iter()
                .map(|(id, count)| SegmentView {
                    id: id.clone(),
                    name: id.clone(),
                    count: *count,
                    history: history.get(id).cloned().unwrap_or_default(),
                })
                .collect()
        }
    };
    segments.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));

    let events: Vec<RateView> = rates
        .into_iter()
        .map(|p| RateView {
            t: p.bucket_start
                .as_ref()
                .and_then(timestamp::from_proto)
                .map_or(0, |t| t.timestamp_millis()),
            total: p.counts.values().sum(),
            by_type: p.counts,
        })
        .collect();
    let events_per_second = recent_rate(&events, chrono::Utc::now().timestamp_millis());

    let dead_letters = deliveries.iter().map(|e| e.dead_lettered).sum();
    let deliveries = deliveries
        .into_iter()
        .map(|e| DeliveryView {
            endpoint: e.endpoint,
            accepted: e.accepted,
            already_accepted: e.already_accepted,
            retrying: e.retrying,
            dead_lettered: e.dead_lettered,
            recipients: e.recipients,
        })
        .collect();

    let mut funnels = Vec::new();
    match scenarios {
        Ok(list) => {
            for s in list.into_inner().scenarios {
                let name = s
                    .definition
                    .as_ref()
                    .map(|d| d.name.clone())
                    .unwrap_or_default();
                match analytics
                    .get_scenario_funnel(GetScenarioFunnelRequest {
                        tenant_id: tenant.clone(),
                        scenario_id: s.scenario_id.clone(),
                        version: 0,
                        range: None,
                    })
                    .await
                {
                    Ok(f) => {
                        let f = f.into_inner();
                        funnels.push(FunnelView {
                            scenario_id: s.scenario_id,
                            name,
                            enabled: s.enabled,
                            entered: f.entered,
                            steps: f
                                .steps
                                .into_iter()
                                .map(|s| (s.step_id, s.reached))
                                .collect(),
                            completed: f.completed,
                            ended_early: f.ended_early,
                        });
                    }
                    Err(status) => notes.push(format!("funnel of {name}: {}", status.message())),
                }
            }
        }
        Err(status) => notes.push(format!("scenarios unavailable: {}", status.message())),
    }

    Ok(Overview {
        tenant,
        segments,
        events,
        events_per_second,
        deliveries,
        dead_letters,
        funnels,
        notes,
    })
}

/// Events per second over the last full minute and the one still filling:
/// the newest bucket alone would read low early in its minute.
fn recent_rate(minutes: &[RateView], now_ms: i64) -> f64 {
    let Some(current) = minutes.last() else {
        return 0.0;
    };
    let into_current = ((now_ms - current.t) as f64 / 1000.0).clamp(0.0, 60.0);
    let previous = minutes.len().checked_sub(2).map(|i| &minutes[i]);
    match previous {
        Some(p) if current.t - p.t == 60_000 => {
            (p.total + current.total) as f64 / (60.0 + into_current).max(1.0)
        }
        _ => current.total as f64 / into_current.max(1.0),
    }
}

async fn stream(
    Extract(state): Extract<State>,
    headers: HeaderMap,
    Query(query): Query<TenantParam>,
) -> Result<Response, ApiError> {
    let session = caller(&state, &headers, &query)?;
    let feed = state.0.feeds.feed(&session.tenant, &session.token);
    let (now, updates) = feed.subscribe();
    let first = futures::stream::iter(now);
    // A watcher that falls behind skips to the next value: counts are
    // absolute, so nothing is lost by skipping.
    let rest =
        tokio_stream::wrappers::BroadcastStream::new(updates).filter_map(|u| async move { u.ok() });
    let events = first.chain(rest).map(|c: Count| {
        Ok::<_, Infallible>(
            Event::default()
                .event("count")
                .json_data(&c)
                .expect("a count serializes"),
        )
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minute(t: i64, total: i64) -> RateView {
        RateView {
            t,
            total,
            by_type: HashMap::new(),
        }
    }

    #[test]
    fn the_rate_spans_the_last_minute_and_the_current_one() {
        assert_eq!(recent_rate(&[], 0), 0.0);
        // 600 in the last minute, 300 in the 30 s of this one: 10 a second.
        let minutes = [minute(0, 600), minute(60_000, 300)];
        assert_eq!(recent_rate(&minutes, 90_000), 10.0);
        // No previous minute: the current one alone.
        assert_eq!(recent_rate(&minutes[1..], 80_000), 15.0);
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; hibiki_session=abc123; lang=ja"),
        );
        assert_eq!(session_cookie(&headers).as_deref(), Some("abc123"));
        assert_eq!(session_cookie(&HeaderMap::new()), None);
    }
}
