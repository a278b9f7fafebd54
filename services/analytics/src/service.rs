//! `AnalyticsService`: counts, rates and stats read from the folded
//! counters; watches from [`crate::watch`].

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Duration, DurationRound, Utc};
use hibiki_proto::analytics::v1::FunnelStep;
use hibiki_proto::analytics::v1::analytics_service_server::AnalyticsService;
use hibiki_proto::analytics::v1::{
    EndpointStats, GetDeliveryStatsRequest, GetDeliveryStatsResponse, GetEventRatesRequest,
    GetEventRatesResponse, GetScenarioFunnelRequest, GetScenarioFunnelResponse,
    GetSegmentCountsRequest, GetSegmentCountsResponse, RatePoint, SegmentCountUpdate, TimeRange,
    WatchSegmentCountsRequest,
};
use hibiki_proto::scenario::v1::GetFunnelRequest;
use hibiki_proto::scenario::v1::scenario_service_client::ScenarioServiceClient;
use hibiki_runtime::auth::Caller;
use hibiki_runtime::error::ServiceError;
use hibiki_runtime::timestamp;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::fold::SegmentCount;
use crate::watch::{Watches, update};

/// The longest range GetDeliveryStats sums over.
const MAX_STATS_RANGE: i64 = 7 * 24 * 60;
/// The most buckets GetEventRates returns.
const MAX_BUCKETS: i64 = 10_000;

/// scenario's client.
pub type ScenarioClient = ScenarioServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        hibiki_runtime::grpc::ClientInterceptor,
    >,
>;

/// The RPCs.
pub struct AnalyticsApi {
    pool: PgPool,
    watches: Arc<Watches>,
    scenario: ScenarioClient,
}

impl AnalyticsApi {
    pub fn new(pool: PgPool, watches: Arc<Watches>, scenario: ScenarioClient) -> Self {
        Self {
            pool,
            watches,
            scenario,
        }
    }
}

fn db(e: sqlx::Error) -> Status {
    ServiceError::from(e).into()
}

/// A request's range, `[start, end)`: `end` unset is now, `start` unset is
/// `default_span` before `end`. INVALID_ARGUMENT when the end is before the
/// start.
fn range(
    r: Option<&TimeRange>,
    default_span: Duration,
) -> Result<(DateTime<Utc>, DateTime<Utc>), Status> {
    let end = match r.and_then(|r| r.end.as_ref()) {
        Some(t) => timestamp::from_proto(t)
            .ok_or_else(|| Status::invalid_argument("range.end: not a valid time"))?,
        None => Utc::now(),
    };
    let start = match r.and_then(|r| r.start.as_ref()) {
        Some(t) => timestamp::from_proto(t)
            .ok_or_else(|| Status::invalid_argument("range.start: not a valid time"))?,
        None => end - default_span,
    };
    if end < start {
        return Err(Status::invalid_argument(
            "range.end: before range.start".to_owned(),
        ));
    }
    Ok((start, end))
}

type WatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<SegmentCountUpdate, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AnalyticsService for AnalyticsApi {
    async fn get_segment_counts(
        &self,
        request: Request<GetSegmentCountsRequest>,
    ) -> Result<Response<GetSegmentCountsResponse>, Status> {
        Caller::authorize_request(&request, &request.get_ref().tenant_id)?;
        let r = request.into_inner();
        let rows: Vec<SegmentCount> = sqlx::query_as(
            "SELECT tenant_id, segment_id, member_count, as_of, deleted, version
               FROM segment_counts
              WHERE tenant_id = $1 AND (cardinality($2::text[]) = 0 OR segment_id = ANY($2))
                AND NOT deleted
              ORDER BY segment_id",
        )
        .bind(&r.tenant_id)
        .bind(&r.segment_ids)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(Response::new(GetSegmentCountsResponse {
            counts: rows.iter().map(update).collect(),
        }))
    }

    type WatchSegmentCountsStream = WatchStream;

    async fn watch_segment_counts(
        &self,
        request: Request<WatchSegmentCountsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        Caller::authorize_request(&request, &request.get_ref().tenant_id)?;
        let r = request.into_inner();
        Ok(Response::new(Box::pin(
            self.watches.watch(&r.tenant_id, r.segment_ids),
        )))
    }

    async fn get_delivery_stats(
        &self,
        request: Request<GetDeliveryStatsRequest>,
    ) -> Result<Response<GetDeliveryStatsResponse>, Status> {
        Caller::authorize_request(&request, &request.get_ref().tenant_id)?;
        let r = request.into_inner();
        let (start, end) = range(r.range.as_ref(), Duration::hours(24))?;
        if (end - start).num_minutes() > MAX_STATS_RANGE {
            return Err(Status::invalid_argument("range: at most 7 days".to_owned()));
        }
        let rows: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT endpoint, sum(accepted)::bigint, sum(already_accepted)::bigint,
                    sum(retrying)::bigint, sum(dead_lettered)::bigint, sum(recipients)::bigint
               FROM delivery_minutes
              WHERE tenant_id = $1 AND minute >= date_trunc('minute', $2::timestamptz)
                AND minute < $3 AND ($4 = '' OR channel_id = $4)
              GROUP BY endpoint ORDER BY endpoint",
        )
        .bind(&r.tenant_id)
        .bind(start)
        .bind(end)
        .bind(&r.channel_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(Response::new(GetDeliveryStatsResponse {
            endpoints: rows
                .into_iter()
                .map(
                    |(
                        endpoint,
                        accepted,
                        already_accepted,
                        retrying,
                        dead_lettered,
                        recipients,
                    )| {
                        EndpointStats {
                            endpoint,
                            accepted,
                            already_accepted,
                            retrying,
                            dead_lettered,
                            recipients,
                        }
                    },
                )
                .collect(),
        }))
    }

    async fn get_event_rates(
        &self,
        request: Request<GetEventRatesRequest>,
    ) -> Result<Response<GetEventRatesResponse>, Status> {
        Caller::authorize_request(&request, &request.get_ref().tenant_id)?;
        let r = request.into_inner();
        let step = match &r.step {
            None => 60,
            Some(d) if d.nanos == 0 && d.seconds > 0 && d.seconds % 60 == 0 => d.seconds,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "step: must be a whole number of minutes",
                ));
            }
        };
        let (start, end) = range(r.range.as_ref(), Duration::hours(1))?;
        let start = start
            .duration_trunc(Duration::minutes(1))
            .map_err(|e| Status::invalid_argument(format!("range.start: {e}")))?;
        let span = (end - start).num_seconds();
        let buckets = (span + step - 1) / step;
        if buckets > MAX_BUCKETS {
            return Err(Status::invalid_argument(format!(
                "step: {buckets} buckets over the range, at most {MAX_BUCKETS}"
            )));
        }
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT floor(extract(epoch FROM minute - $2) / $4)::bigint AS bucket, event_type,
                    sum(count)::bigint
               FROM event_minutes
              WHERE tenant_id = $1 AND minute >= $2 AND minute < $3
                AND (cardinality($5::text[]) = 0 OR event_type = ANY($5))
              GROUP BY 1, 2",
        )
        .bind(&r.tenant_id)
        .bind(start)
        .bind(end)
        .bind(step as f64)
        .bind(&r.event_types)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut per: BTreeMap<i64, BTreeMap<String, i64>> = BTreeMap::new();
        for (bucket, event_type, count) in rows {
            per.entry(bucket).or_default().insert(event_type, count);
        }
        let points = (0..buckets)
            .map(|k| RatePoint {
                bucket_start: Some(timestamp::to_proto(start + Duration::seconds(k * step))),
                counts: per.remove(&k).unwrap_or_default().into_iter().collect(),
            })
            .collect();
        Ok(Response::new(GetEventRatesResponse { points }))
    }

    async fn get_scenario_funnel(
        &self,
        request: Request<GetScenarioFunnelRequest>,
    ) -> Result<Response<GetScenarioFunnelResponse>, Status> {
        Caller::authorize_request(&request, &request.get_ref().tenant_id)?;
        let r = request.into_inner();
        if r.scenario_id.is_empty() {
            return Err(Status::invalid_argument("scenario_id: must not be empty"));
        }
        let (from, before) = match r.range.as_ref() {
            Some(range) => {
                let (start, end) = self::range(Some(range), Duration::days(7))?;
                (Some(start), range.end.as_ref().map(|_| end))
            }
            None => (None, None),
        };
        // scenario owns its runs and counts them; analytics serves the
        // funnel beside the other figures of a dashboard.
        let funnel = self
            .scenario
            .clone()
            .get_funnel(GetFunnelRequest {
                tenant_id: r.tenant_id,
                scenario_id: r.scenario_id,
                version: r.version,
                started_from: from.map(timestamp::to_proto),
                started_before: before.map(timestamp::to_proto),
            })
            .await?
            .into_inner();
        Ok(Response::new(GetScenarioFunnelResponse {
            entered: funnel.entered,
            steps: funnel
                .steps
                .into_iter()
                .map(|s| FunnelStep {
                    step_id: s.step_id,
                    reached: s.reached,
                })
                .collect(),
            completed: funnel.completed,
            ended_early: funnel.ended_early,
        }))
    }
}
