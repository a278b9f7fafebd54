//! Freshness of a live segment count: from a membership change committed in
//! contacts to a watcher of analytics receiving the new count, while
//! `--rate` changes a second flow.
//!
//! Runs the release `hibiki-contacts` and `hibiki-analytics` binaries on a
//! fresh database and Redis key prefix. A segment holds the tenant's
//! followers; callers send contacts `ApplyEvents` batches of follow events
//! of new friends at `--rate` a second (each one enters the segment), for
//! `--seconds`. A `WatchSegmentCounts` stream measures each update it gets:
//! now minus the update's `as_of` (when the last change it counts committed
//! in contacts). At the end the count must equal contacts' count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hibiki_bench::{Latencies, ms};
use hibiki_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use hibiki_proto::analytics::v1::{GetSegmentCountsRequest, WatchSegmentCountsRequest};
use hibiki_proto::common::v1::{FollowEvent, InboundEvent, Source, SourceType, inbound_event};
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::segment_rule::Node;
use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{
    ApplyEventsRequest, CreateSegmentRequest, CreateTenantRequest, FollowState, SegmentRule,
};
use hibiki_testkit::{SERVICE_TOKEN, ServiceProcess, TestDatabase, authorized, service_env};

const TENANT: &str = "bench";

/// Measures how fresh a watched segment count is under load.
#[derive(Debug, Parser)]
struct Args {
    /// Membership changes a second.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// How long the changes flow.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Follow events per ApplyEvents call.
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// Concurrent ApplyEvents callers.
    #[arg(long, default_value_t = 4)]
    callers: usize,
    /// Seconds between the autovacuum stand-in's VACUUM (ANALYZE) runs.
    #[arg(long, default_value_t = 60)]
    autovacuum_secs: u64,
}

fn follow(n: u64) -> InboundEvent {
    InboundEvent {
        tenant_id: TENANT.into(),
        channel_id: "1000000001".into(),
        webhook_event_id: format!("01FRESH{n:019}"),
        r#type: "follow".into(),
        timestamp_ms: chrono::Utc::now().timestamp_millis(),
        source: Some(Source {
            r#type: SourceType::User as i32,
            user_id: format!("U{n:032x}"),
            ..Default::default()
        }),
        reply_token: String::new(),
        payload: Some(inbound_event::Payload::Follow(FollowEvent {
            is_unblocked: false,
        })),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let release = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    let database = TestDatabase::create().await;
    let _autovacuum = hibiki_bench::autovacuum(
        database.url(),
        Duration::from_secs(args.autovacuum_secs.max(1)),
    );
    let mut env = service_env(&database, None);
    env.insert("HIBIKI_LOG".into(), "error".into());
    let contacts = ServiceProcess::spawn(&release.join("hibiki-contacts"), env.clone());
    hibiki_testkit::wait_for_health(&contacts.url, tonic_health::ServingStatus::Serving).await;
    let analytics = ServiceProcess::spawn(&release.join("hibiki-analytics"), env.clone());
    hibiki_testkit::wait_for_health(&analytics.url, tonic_health::ServingStatus::Serving).await;
    TenantServiceClient::new(authorized(&contacts.url, SERVICE_TOKEN))
        .create_tenant(CreateTenantRequest {
            tenant_id: TENANT.into(),
            display_name: "Bench".into(),
            time_zone: "Asia/Tokyo".into(),
        })
        .await
        .expect("the tenant");
    let segment = SegmentServiceClient::new(authorized(&contacts.url, SERVICE_TOKEN))
        .create_segment(CreateSegmentRequest {
            tenant_id: TENANT.into(),
            name: "followers".into(),
            description: String::new(),
            rule: Some(SegmentRule {
                node: Some(Node::FollowState(FollowState::Following as i32)),
            }),
        })
        .await
        .expect("the segment")
        .into_inner()
        .segment_id;
    println!(
        "analytics bench: {} membership changes a second for {} s ({} callers, {} follow events a call); contacts → analytics → a watcher (release binaries, one machine)\n",
        args.rate, args.seconds, args.callers, args.batch
    );

    // The watcher: freshness of every update after the first (the
    // current value when it subscribed).
    let mut stream = AnalyticsServiceClient::new(authorized(&analytics.url, SERVICE_TOKEN))
        .watch_segment_counts(WatchSegmentCountsRequest {
            tenant_id: TENANT.into(),
            segment_ids: vec![segment.clone()],
        })
        .await
        .expect("the watch")
        .into_inner();
    let seen = Arc::new(AtomicU64::new(0));
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut freshness = Latencies::default();
            let mut updates = 0u64;
            while let Ok(Some(u)) = stream.message().await {
                updates += 1;
                seen.store(u.member_count as u64, Ordering::Relaxed);
                if updates == 1 {
                    continue;
                }
                if let Some(at) = u
                    .as_of
                    .as_ref()
                    .and_then(hibiki_runtime::timestamp::from_proto)
                {
                    let age = (chrono::Utc::now() - at).to_std().unwrap_or_default();
                    freshness.record(age);
                }
            }
            (freshness, updates)
        })
    };

    // The changes, paced: batch k leaves at k * batch / rate seconds.
    let total_batches = args.rate * args.seconds / args.batch;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let callers: Vec<_> = (0..args.callers)
        .map(|_| {
            let (next, url) = (next.clone(), contacts.url.clone());
            let (rate, batch) = (args.rate, args.batch);
            tokio::spawn(async move {
                let mut client = ContactServiceClient::new(authorized(&url, SERVICE_TOKEN));
                let mut calls = Latencies::default();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= total_batches {
                        return calls;
                    }
                    let due = started + Duration::from_secs_f64((k * batch) as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                    let events = (k * batch..(k + 1) * batch).map(follow).collect();
                    let t = Instant::now();
                    client
                        .apply_events(ApplyEventsRequest {
                            tenant_id: TENANT.into(),
                            events,
                        })
                        .await
                        .expect("contacts takes the events");
                    calls.record(t.elapsed());
                }
            })
        })
        .collect();
    let mut calls = Latencies::default();
    for c in callers {
        calls.merge(c.await.unwrap());
    }
    let sent = total_batches * args.batch;
    let elapsed = started.elapsed();
    println!(
        "changes: {sent} in {:.1} s ({:.0}/s); ApplyEvents p50 {}, p99 {}",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        ms(calls.quantile(0.5)),
        ms(calls.quantile(0.99))
    );

    // The count converges on contacts' count.
    let converge = Instant::now();
    while seen.load(Ordering::Relaxed) < sent {
        if converge.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let converged = converge.elapsed();
    let counted = AnalyticsServiceClient::new(authorized(&analytics.url, SERVICE_TOKEN))
        .get_segment_counts(GetSegmentCountsRequest {
            tenant_id: TENANT.into(),
            segment_ids: vec![segment.clone()],
        })
        .await
        .expect("the count")
        .into_inner()
        .counts
        .first()
        .map(|c| c.member_count)
        .unwrap_or(0);
    let truth = SegmentServiceClient::new(authorized(&contacts.url, SERVICE_TOKEN))
        .get_segment_counts(hibiki_proto::contacts::v1::GetSegmentCountsRequest {
            tenant_id: TENANT.into(),
            segment_ids: vec![segment],
        })
        .await
        .expect("contacts' count")
        .into_inner()
        .counts[0]
        .member_count;
    drop(analytics);
    let (mut freshness, updates) = watcher.await.unwrap();
    println!(
        "freshness, change committed in contacts → watcher has the count: p50 {}, p99 {}, max {} ({} updates, {:.1}/s)",
        ms(freshness.quantile(0.5)),
        ms(freshness.quantile(0.99)),
        ms(freshness.quantile(1.0)),
        updates,
        updates as f64 / elapsed.as_secs_f64()
    );
    println!(
        "after the last change the watcher had the final count in {}",
        ms(converged)
    );
    let exact = counted == truth && truth == sent as i64;
    println!(
        "check: analytics counts {counted}, contacts {truth}, changes sent {sent}: {}",
        if exact { "exact" } else { "NOT EXACT" }
    );
    if !exact {
        std::process::exit(1);
    }
}
