//! analytics against the real contacts, Redis and PostgreSQL: segment counts
//! follow contacts' membership changes exactly (through replays and a
//! restart), watchers see them live and coalesced, and rollups of events and
//! delivery outcomes answer range queries.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hibiki_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use hibiki_proto::analytics::v1::{
    GetDeliveryStatsRequest, GetEventRatesRequest, GetSegmentCountsRequest, TimeRange,
    WatchSegmentCountsRequest,
};
use hibiki_proto::common::v1::{ContactRef, InboundEvent, Source, SourceType};
use hibiki_proto::contacts::v1::MembershipChangeRecord;
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::segment_rule::Node;
use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{
    AddTagsRequest, CreateSegmentRequest, CreateTenantRequest, HasTag, RemoveTagsRequest,
    SegmentRule,
};
use hibiki_proto::delivery::v1::{DeliveryOutcome, DeliveryOutcomeRecord};
use hibiki_runtime::Shutdown;
use hibiki_runtime::config::{RedisConfig, Secret};
use hibiki_runtime::eventlog::{Event, EventLog, EventLogConfig};
use hibiki_runtime::redis::{Redis, redis, streams};
use hibiki_testkit::{
    SERVICE_TOKEN, TestDatabase, authorized, lifecycle, service_env, wait_for_health,
};
use prost::Message;
use tonic::Code;
use tonic_health::ServingStatus;

const T: &str = "acme";

type Channel = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    hibiki_runtime::grpc::ClientInterceptor,
>;

struct Mesh {
    database: TestDatabase,
    env: HashMap<String, String>,
    contacts: String,
    analytics: String,
    redis: Redis,
    stops: Vec<Shutdown>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for s in &self.stops {
            s.trigger();
        }
    }
}

async fn mesh() -> Mesh {
    let database = TestDatabase::create().await;
    let env = service_env(&database, None);
    let (contacts, stop_contacts, _t) =
        lifecycle::start::<hibiki_contacts::Application>(&env).await;
    wait_for_health(&contacts, ServingStatus::Serving).await;
    TenantServiceClient::new(authorized(&contacts, SERVICE_TOKEN))
        .create_tenant(CreateTenantRequest {
            tenant_id: T.into(),
            display_name: "Acme".into(),
            time_zone: "Asia/Tokyo".into(),
        })
        .await
        .unwrap();
    let redis = Redis::connect_lazy(&RedisConfig {
        url: Secret::new(env["HIBIKI_REDIS_URL"].clone()),
        cluster: false,
        key_prefix: env["HIBIKI_REDIS_PREFIX"].clone(),
        pool_size: 2,
    })
    .unwrap();
    let mut mesh = Mesh {
        database,
        env,
        contacts,
        analytics: String::new(),
        redis,
        stops: vec![stop_contacts],
    };
    mesh.start_analytics().await;
    mesh
}

impl Mesh {
    async fn start_analytics(&mut self) {
        let (analytics, stop, _t) =
            lifecycle::start::<hibiki_analytics::Application>(&self.env).await;
        wait_for_health(&analytics, ServingStatus::Serving).await;
        self.analytics = analytics;
        self.stops.insert(0, stop);
    }

    fn stop_analytics(&mut self) {
        self.stops.remove(0).trigger();
    }

    fn analytics(&self) -> AnalyticsServiceClient<Channel> {
        AnalyticsServiceClient::new(authorized(&self.analytics, SERVICE_TOKEN))
    }

    fn contacts(&self) -> ContactServiceClient<Channel> {
        ContactServiceClient::new(authorized(&self.contacts, SERVICE_TOKEN))
    }

    async fn segment(&self, tag: &str) -> String {
        SegmentServiceClient::new(authorized(&self.contacts, SERVICE_TOKEN))
            .create_segment(CreateSegmentRequest {
                tenant_id: T.into(),
                name: tag.into(),
                description: String::new(),
                rule: Some(SegmentRule {
                    node: Some(Node::HasTag(HasTag { tag: tag.into() })),
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .segment_id
    }

    async fn tag(&self, n: u64, tag: &str, add: bool) {
        let contact = Some(ContactRef {
            tenant_id: T.into(),
            line_user_id: user(n),
        });
        let key = format!("{tag}-{n}-{add}");
        if add {
            self.contacts()
                .add_tags(AddTagsRequest {
                    contact,
                    tags: vec![tag.into()],
                    idempotency_key: key,
                })
                .await
                .unwrap();
        } else {
            self.contacts()
                .remove_tags(RemoveTagsRequest {
                    contact,
                    tags: vec![tag.into()],
                    idempotency_key: key,
                })
                .await
                .unwrap();
        }
    }

    async fn contacts_count(&self, segment: &str) -> i64 {
        SegmentServiceClient::new(authorized(&self.contacts, SERVICE_TOKEN))
            .get_segment_counts(hibiki_proto::contacts::v1::GetSegmentCountsRequest {
                tenant_id: T.into(),
                segment_ids: vec![segment.into()],
            })
            .await
            .unwrap()
            .into_inner()
            .counts[0]
            .member_count
    }

    async fn analytics_count(&self, segment: &str) -> Option<i64> {
        self.analytics()
            .get_segment_counts(GetSegmentCountsRequest {
                tenant_id: T.into(),
                segment_ids: vec![segment.into()],
            })
            .await
            .unwrap()
            .into_inner()
            .counts
            .first()
            .map(|c| c.member_count)
    }

    /// Waits until analytics' count is `want`, then checks it stays.
    async fn settles_at(&self, segment: &str, want: i64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.analytics_count(segment).await;
            if got == Some(want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "analytics counts {got:?}, contacts {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Nothing more arrives later to change it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(self.analytics_count(segment).await, Some(want));
    }

    /// Sets analytics' group on `stream` back to its start (as if no
    /// acknowledgement had reached Redis) and waits until it has read every
    /// entry again.
    async fn read_again(&self, stream: &str) {
        let _: () = self
            .redis
            .command(
                redis::cmd("XGROUP")
                    .arg("SETID")
                    .arg(stream)
                    .arg("analytics")
                    .arg("0"),
            )
            .await
            .unwrap();
        let last: Vec<(String, HashMap<String, Vec<u8>>)> = self
            .redis
            .command(
                redis::cmd("XREVRANGE")
                    .arg(stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await
            .unwrap();
        self.read_through(stream, &last[0].0).await;
    }

    /// Waits until analytics' group has read `stream` through `last` (or
    /// beyond) and acknowledged all it read.
    async fn read_through(&self, stream: &str, last: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let groups: Vec<HashMap<String, redis::Value>> = self
                .redis
                .command(redis::cmd("XINFO").arg("GROUPS").arg(stream))
                .await
                .unwrap();
            let group = groups
                .iter()
                .find(|g| g.get("name") == Some(&redis::Value::BulkString(b"analytics".to_vec())))
                .expect("analytics' group");
            let delivered: String =
                redis::from_redis_value(group["last-delivered-id"].clone()).unwrap();
            let pending: i64 = redis::from_redis_value(group["pending"].clone()).unwrap();
            if streams::position(&delivered) >= streams::position(last) && pending == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "analytics read {stream} through {delivered} ({pending} pending), not {last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn membership_stream(&self) -> String {
        self.redis.key(&["contacts", "{membership}"])
    }
}

fn user(n: u64) -> String {
    format!("U{n:032x}")
}

#[tokio::test]
async fn segment_counts_stay_exact_through_replays_and_a_restart_mid_stream() {
    let mut mesh = mesh().await;
    let spring = mesh.segment("campaign:spring").await;
    for n in 0..40 {
        mesh.tag(n, "campaign:spring", true).await;
    }
    for n in 0..5 {
        mesh.tag(n, "campaign:spring", false).await;
    }
    assert_eq!(mesh.contacts_count(&spring).await, 35);
    mesh.settles_at(&spring, 35).await;

    // The relay finds its rows again (as after a crash between putting them
    // on the stream and deleting them): none goes on the stream twice.
    let stream = mesh.membership_stream();
    let entries: Vec<(String, HashMap<String, Vec<u8>>)> = mesh
        .redis
        .command(redis::cmd("XRANGE").arg(&stream).arg("-").arg("+"))
        .await
        .unwrap();
    assert!(entries.len() >= 45, "{} records", entries.len());
    let contacts_db = sqlx::PgPool::connect(mesh.database.url()).await.unwrap();
    for (_, fields) in &entries {
        let record = MembershipChangeRecord::decode(fields["p"].as_slice()).unwrap();
        let id: i64 = record.change_id.trim_start_matches('m').parse().unwrap();
        sqlx::query("INSERT INTO contacts.outbox (tenant_id, id, payload) VALUES ($1, $2, $3)")
            .bind(T)
            .bind(id)
            .bind(&fields["p"])
            .execute(&contacts_db)
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts.outbox")
            .fetch_one(&contacts_db)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the relay left {left} rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after: Vec<(String, HashMap<String, Vec<u8>>)> = mesh
        .redis
        .command(redis::cmd("XRANGE").arg(&stream).arg("-").arg("+"))
        .await
        .unwrap();
    let mut ids: Vec<String> = after
        .iter()
        .map(|(_, f)| {
            MembershipChangeRecord::decode(f["p"].as_slice())
                .unwrap()
                .change_id
        })
        .collect();
    let published = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), published, "a record published again");

    // Every entry read again (the group set back to the stream's start, as
    // if no acknowledgement had reached Redis): nothing counts twice.
    mesh.read_again(&stream).await;
    assert_eq!(mesh.analytics_count(&spring).await, Some(35));

    // analytics stops; changes go on; it comes back and catches up.
    mesh.stop_analytics();
    for n in 40..70 {
        mesh.tag(n, "campaign:spring", true).await;
    }
    for n in 10..20 {
        mesh.tag(n, "campaign:spring", false).await;
    }
    mesh.start_analytics().await;
    assert_eq!(mesh.contacts_count(&spring).await, 55);
    mesh.settles_at(&spring, 55).await;
}

#[tokio::test]
async fn a_watcher_gets_the_counts_then_each_change_coalesced_and_a_slow_one_only_the_latest() {
    let mesh = mesh().await;
    let spring = mesh.segment("campaign:spring").await;
    let other = mesh.segment("vip").await;
    mesh.tag(1, "vip", true).await;
    mesh.settles_at(&other, 1).await;

    let mut watch = mesh
        .analytics()
        .watch_segment_counts(WatchSegmentCountsRequest {
            tenant_id: T.into(),
            segment_ids: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    // The current values first.
    let mut first = HashMap::new();
    while first.len() < 2 {
        let u = watch.message().await.unwrap().unwrap();
        first.insert(u.segment_id.clone(), u.member_count);
    }
    assert_eq!(first[&spring], 0);
    assert_eq!(first[&other], 1);

    // A slow watcher, subscribed now, reads nothing while 150 changes
    // happen.
    let mut slow = mesh
        .analytics()
        .watch_segment_counts(WatchSegmentCountsRequest {
            tenant_id: T.into(),
            segment_ids: vec![spring.clone()],
        })
        .await
        .unwrap()
        .into_inner();

    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(Ok(u)) = watch.next().await {
            if u.segment_id == spring {
                seen.push((Instant::now(), u.member_count));
                if u.member_count == 150 {
                    break;
                }
            }
        }
        seen
    });
    for n in 100..250 {
        mesh.tag(n, "campaign:spring", true).await;
    }
    let seen = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the watcher sees the count reach 150")
        .unwrap();
    let took = started.elapsed();
    assert_eq!(seen.last().unwrap().1, 150);
    assert!(
        seen.windows(2).all(|w| w[0].1 < w[1].1),
        "the count only rises: {seen:?}"
    );
    // Coalesced: updates of one segment come at most every 100 ms.
    let most = (took.as_millis() / 100 + 2) as usize;
    assert!(
        seen.len() <= most,
        "{} updates in {took:?} (150 changes)",
        seen.len()
    );
    assert!(seen.len() < 150, "changes were coalesced");

    // The slow watcher now reads. Its updates were coalesced like the
    // others (what the connection's flow-control window took while it did
    // not read), never the 150 changes one by one, and the fast watcher
    // above was not held back by it.
    let mut slow_seen = Vec::new();
    loop {
        let u = tokio::time::timeout(Duration::from_secs(5), slow.message())
            .await
            .expect("the slow watcher gets the latest count")
            .unwrap()
            .unwrap();
        slow_seen.push(u.member_count);
        if u.member_count == 150 {
            break;
        }
    }
    assert!(
        slow_seen.len() <= most + 1,
        "the slow watcher got a backlog: {slow_seen:?}"
    );
    assert!(slow_seen.windows(2).all(|w| w[0] < w[1]), "{slow_seen:?}");
}

#[tokio::test]
async fn event_rates_and_delivery_stats_roll_up_by_minute_and_answer_ranges() {
    let mesh = mesh().await;
    let log = EventLog::from_config(
        mesh.redis.clone(),
        &EventLogConfig::from_env(&hibiki_runtime::ProcessEnv).unwrap(),
    );
    // Events two minutes ago and now, as the gateway appends them.
    let now = chrono::Utc::now();
    let earlier = now - chrono::Duration::minutes(2);
    let this_minute = chrono::DateTime::from_timestamp(now.timestamp() / 60 * 60, 0).unwrap();
    let mut events = Vec::new();
    for (i, (at, kind)) in [
        (earlier, "postback"),
        (earlier, "postback"),
        (earlier, "follow"),
        (now, "postback"),
    ]
    .iter()
    .enumerate()
    {
        events.push(InboundEvent {
            tenant_id: T.into(),
            channel_id: "1000000001".into(),
            webhook_event_id: format!("01RATE{i:020}"),
            r#type: (*kind).into(),
            timestamp_ms: at.timestamp_millis(),
            source: Some(Source {
                r#type: SourceType::User as i32,
                user_id: user(i as u64),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    for e in &events {
        let payload = e.encode_to_vec();
        let user = e.source.as_ref().unwrap().user_id.clone();
        log.append(&[Event {
            channel_id: &e.channel_id,
            user_id: &user,
            event_id: &e.webhook_event_id,
            timestamp_ms: e.timestamp_ms,
            payload: &payload,
        }])
        .await
        .unwrap();
    }
    // Outcomes as delivery publishes them.
    let outcomes = mesh.redis.key(&["delivery", "outcomes"]);
    for (i, outcome, recipients) in [
        (1, DeliveryOutcome::Accepted, 1),
        (2, DeliveryOutcome::Accepted, 1),
        (3, DeliveryOutcome::Retrying, 1),
        (4, DeliveryOutcome::DeadLettered, 1),
    ] {
        let record = DeliveryOutcomeRecord {
            tenant_id: T.into(),
            channel_id: "1000000001".into(),
            job_id: format!("job{i}"),
            endpoint: "POST /v2/bot/message/push".into(),
            outcome: outcome as i32,
            recipients,
            at: Some(hibiki_runtime::timestamp::to_proto(now)),
            outcome_id: format!("job{i}:0:{}", outcome as i32),
            trace: None,
        };
        let _: String = mesh
            .redis
            .command(
                redis::cmd("XADD")
                    .arg(&outcomes)
                    .arg("*")
                    .arg("o")
                    .arg(record.encode_to_vec()),
            )
            .await
            .unwrap();
    }

    // Six whole minutes, this one last.
    let range = TimeRange {
        start: Some(hibiki_runtime::timestamp::to_proto(
            this_minute - chrono::Duration::minutes(5),
        )),
        end: Some(hibiki_runtime::timestamp::to_proto(
            this_minute + chrono::Duration::minutes(1),
        )),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let points = loop {
        let points = mesh
            .analytics()
            .get_event_rates(GetEventRatesRequest {
                tenant_id: T.into(),
                range: Some(range),
                step: None,
                event_types: vec![],
            })
            .await
            .unwrap()
            .into_inner()
            .points;
        let total: i64 = points.iter().flat_map(|p| p.counts.values()).sum();
        if total >= 4 {
            break points;
        }
        assert!(Instant::now() < deadline, "events not counted: {points:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(points.len(), 6, "one bucket a minute, empty ones included");
    let minute = |t: chrono::DateTime<chrono::Utc>| t.timestamp() / 60 * 60;
    let at = |p: &hibiki_proto::analytics::v1::RatePoint| p.bucket_start.unwrap().seconds;
    let before = points.iter().find(|p| at(p) == minute(earlier)).unwrap();
    assert_eq!(before.counts["postback"], 2);
    assert_eq!(before.counts["follow"], 1);
    let last = points.iter().find(|p| at(p) == minute(now)).unwrap();
    assert_eq!(last.counts["postback"], 1);
    let total: i64 = points.iter().flat_map(|p| p.counts.values()).sum();
    assert_eq!(total, 4);

    // Five-minute buckets, postbacks only.
    let wide = mesh
        .analytics()
        .get_event_rates(GetEventRatesRequest {
            tenant_id: T.into(),
            range: Some(range),
            step: Some(prost_types::Duration {
                seconds: 300,
                nanos: 0,
            }),
            event_types: vec!["postback".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .points;
    assert_eq!(wide.len(), 2);
    let postbacks: i64 = wide.iter().flat_map(|p| p.counts.values()).sum();
    assert_eq!(postbacks, 3);
    assert!(wide.iter().all(|p| !p.counts.contains_key("follow")));

    let deadline = Instant::now() + Duration::from_secs(20);
    let stats = loop {
        let stats = mesh
            .analytics()
            .get_delivery_stats(GetDeliveryStatsRequest {
                tenant_id: T.into(),
                range: Some(range),
                channel_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .endpoints;
        if stats.first().is_some_and(|s| s.dead_lettered == 1) {
            break stats;
        }
        assert!(Instant::now() < deadline, "outcomes not counted: {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].endpoint, "POST /v2/bot/message/push");
    assert_eq!(
        (
            stats[0].accepted,
            stats[0].retrying,
            stats[0].dead_lettered,
            stats[0].recipients
        ),
        (2, 1, 1, 2),
    );
    // Every outcome read again: nothing counts twice.
    mesh.read_again(&outcomes).await;
    let again = mesh
        .analytics()
        .get_delivery_stats(GetDeliveryStatsRequest {
            tenant_id: T.into(),
            range: Some(range),
            channel_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    assert_eq!(again, stats, "outcomes read again counted again");
    // Another channel has none.
    let none = mesh
        .analytics()
        .get_delivery_stats(GetDeliveryStatsRequest {
            tenant_id: T.into(),
            range: Some(range),
            channel_id: "2000000002".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    assert!(none.is_empty());

    // Bad ranges and steps are refused with the field named.
    let backwards = TimeRange {
        start: range.end,
        end: range.start,
    };
    let e = mesh
        .analytics()
        .get_delivery_stats(GetDeliveryStatsRequest {
            tenant_id: T.into(),
            range: Some(backwards),
            channel_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("range.end"), "{}", e.message());
    let long = TimeRange {
        start: Some(hibiki_runtime::timestamp::to_proto(
            now - chrono::Duration::days(8),
        )),
        end: range.end,
    };
    let e = mesh
        .analytics()
        .get_delivery_stats(GetDeliveryStatsRequest {
            tenant_id: T.into(),
            range: Some(long),
            channel_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = mesh
        .analytics()
        .get_event_rates(GetEventRatesRequest {
            tenant_id: T.into(),
            range: Some(range),
            step: Some(prost_types::Duration {
                seconds: 90,
                nanos: 0,
            }),
            event_types: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("step"), "{}", e.message());
}
