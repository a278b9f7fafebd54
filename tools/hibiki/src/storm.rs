//! `hibiki storm`: the campaign storm against a running mesh (`hibiki
//! dev`). line-sim's webhook generator posts signed postbacks for `--users`
//! new friends at `--rate` a second to the gateway; this waits for the
//! chain to finish and reports:
//! - throughput (webhooks accepted, rich menus linked, per second);
//! - latency from webhook to the rich-menu link LINE accepted (p50, p99,
//!   max);
//! - how long analytics' segment count took to equal contacts' after the
//!   last webhook;
//! - any error.
//!
//! It fails loudly (exit 1, naming users) if any friend ends without the
//! tag, the campaign menu or exactly one message.
//!
//! ```text
//! hibiki storm --users 100000 --rate 2000
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hibiki_line_sim::storm::{EventKind, StormReport, StormSpec, user_id};
use hibiki_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use hibiki_proto::common::v1::{ContactRef, PageRequest};
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
use hibiki_proto::contacts::v1::{GetContactRequest, GetSegmentCountsRequest, ListSegmentsRequest};
use hibiki_runtime::config::{DEV_SERVICE_TOKEN, Secret};
use hibiki_runtime::grpc::{self, ClientInterceptor};

/// Options of `hibiki storm` (defaults: the demo of `hibiki dev`).
#[derive(Debug, clap::Args)]
pub struct StormArgs {
    /// New friends, one tap each.
    #[arg(long, default_value_t = 1_000)]
    users: u64,
    /// Webhooks a second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Webhooks in flight at most.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// The tenant.
    #[arg(long, default_value = "demo")]
    tenant: String,
    /// The LINE channel the taps come from.
    #[arg(long, default_value = "1000000001")]
    channel: String,
    /// The tap's postback data.
    #[arg(long, default_value = "action=join&campaign=spring")]
    postback_data: String,
    /// The tag every friend must end with.
    #[arg(long, default_value = "campaign:spring")]
    tag: String,
    /// The segment (name or id) whose count analytics must converge on.
    #[arg(long, default_value = "spring campaign")]
    segment: String,
    /// The gateway's webhook base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    gateway: String,
    /// line-sim's admin API.
    #[arg(long, default_value = "http://127.0.0.1:8091")]
    line_sim_admin: String,
    /// contacts.
    #[arg(
        long,
        env = "HIBIKI_CONTACTS_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    contacts: String,
    /// analytics.
    #[arg(
        long,
        env = "HIBIKI_ANALYTICS_URL",
        default_value = "http://127.0.0.1:50055"
    )]
    analytics: String,
    /// Bearer token (a service token, or an operator token of the tenant).
    #[arg(long, env = "HIBIKI_TOKEN", default_value = DEV_SERVICE_TOKEN, hide_default_value = true)]
    token: String,
    /// Give up when nothing moves for this many seconds.
    #[arg(long, default_value_t = 30)]
    stall_secs: u64,
}

type Intercepted =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientInterceptor>;

fn channel(
    url: &str,
    flag: &str,
    token: &str,
) -> Result<(tonic::transport::Channel, ClientInterceptor), String> {
    let channel = grpc::channel(url).map_err(|e| format!("--{flag} {url}: {e}"))?;
    let interceptor = ClientInterceptor::new(&Secret::new(token.to_owned()))
        .map_err(|e| format!("--token: {e}"))?;
    Ok((channel, interceptor))
}

/// The segment's id, from a name or an id.
async fn segment_id(
    segments: &mut SegmentServiceClient<Intercepted>,
    tenant: &str,
    wanted: &str,
) -> Result<String, String> {
    let mut token = String::new();
    loop {
        let page = segments
            .list_segments(ListSegmentsRequest {
                tenant_id: tenant.into(),
                page: Some(PageRequest {
                    page_size: 500,
                    page_token: token,
                }),
            })
            .await
            .map_err(|s| format!("contacts ListSegments: {}", s.message()))?
            .into_inner();
        if let Some(s) = page
            .segments
            .iter()
            .find(|s| s.segment_id == wanted || s.name == wanted)
        {
            return Ok(s.segment_id.clone());
        }
        token = page.page.map(|p| p.next_page_token).unwrap_or_default();
        if token.is_empty() {
            return Err(format!(
                "--segment {wanted:?}: no such segment in tenant {tenant:?}"
            ));
        }
    }
}

async fn counts(
    segments: &mut SegmentServiceClient<Intercepted>,
    analytics: &mut AnalyticsServiceClient<Intercepted>,
    tenant: &str,
    segment: &str,
) -> Result<(i64, Option<i64>), String> {
    let truth = segments
        .get_segment_counts(GetSegmentCountsRequest {
            tenant_id: tenant.into(),
            segment_ids: vec![segment.into()],
        })
        .await
        .map_err(|s| format!("contacts GetSegmentCounts: {}", s.message()))?
        .into_inner()
        .counts
        .first()
        .map(|c| c.member_count)
        .unwrap_or(0);
    let live = analytics
        .get_segment_counts(hibiki_proto::analytics::v1::GetSegmentCountsRequest {
            tenant_id: tenant.into(),
            segment_ids: vec![segment.into()],
        })
        .await
        .map_err(|s| format!("analytics GetSegmentCounts: {}", s.message()))?
        .into_inner()
        .counts
        .first()
        .map(|c| c.member_count);
    Ok((truth, live))
}

async fn storm(args: &StormArgs) -> Result<Vec<String>, String> {
    let (contacts_channel, interceptor) = channel(&args.contacts, "contacts", &args.token)?;
    let (analytics_channel, _) = channel(&args.analytics, "analytics", &args.token)?;
    let mut segments =
        SegmentServiceClient::with_interceptor(contacts_channel.clone(), interceptor.clone());
    let mut analytics =
        AnalyticsServiceClient::with_interceptor(analytics_channel, interceptor.clone());
    let contacts = ContactServiceClient::with_interceptor(contacts_channel, interceptor);
    let segment = segment_id(&mut segments, &args.tenant, &args.segment).await?;

    // New friends each run: the campaign starts once per friend.
    let first_user = (chrono::Utc::now().timestamp_millis() as u64) << 16;
    let spec = StormSpec {
        url: format!(
            "{}/line/webhook/{}",
            args.gateway.trim_end_matches('/'),
            args.channel
        ),
        channel_id: args.channel.clone(),
        users: args.users,
        first_user,
        rate: args.rate,
        kinds: vec![EventKind::Postback],
        postback_data: args.postback_data.clone(),
        connections: args.connections,
        ..StormSpec::default()
    };
    let http = reqwest::Client::new();
    let admin = args.line_sim_admin.trim_end_matches('/');
    let started: serde_json::Value = http
        .post(format!("{admin}/storms"))
        .json(&spec)
        .send()
        .await
        .map_err(|e| format!("line-sim at {admin}: {e}"))?
        .error_for_status()
        .map_err(|e| format!("line-sim refused the storm: {e}"))?
        .json()
        .await
        .map_err(|e| format!("line-sim's answer: {e}"))?;
    let id = started["storm_id"]
        .as_u64()
        .ok_or_else(|| format!("line-sim's answer has no storm_id: {started}"))?;
    println!(
        "storm {id}: {} new friends tap {:?} at {}/s → {}",
        args.users, args.postback_data, args.rate, spec.url
    );

    // Until every accepted tap is linked and messaged, or nothing moves.
    let begun = Instant::now();
    let mut posted_at = None;
    let mut last = (0u64, Instant::now());
    let mut printed = Instant::now() - Duration::from_secs(1);
    let report = loop {
        let report: StormReport = http
            .get(format!("{admin}/storms/{id}"))
            .send()
            .await
            .map_err(|e| format!("line-sim at {admin}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("line-sim's storm report: {e}"))?;
        let chain = report.chain.clone().unwrap_or_default();
        if report.done && posted_at.is_none() {
            posted_at = Some(Instant::now());
        }
        let progress = chain.users + chain.linked + chain.messaged;
        if progress != last.0 {
            last = (progress, Instant::now());
        }
        if printed.elapsed() >= Duration::from_secs(1) {
            printed = Instant::now();
            println!(
                "  {:>6.1} s  accepted {:>8}  linked {:>8}  messaged {:>8}",
                begun.elapsed().as_secs_f64(),
                chain.users,
                chain.linked,
                chain.messaged
            );
        }
        if report.done && chain.linked >= report.accepted && chain.messaged >= report.accepted {
            break report;
        }
        if last.1.elapsed() > Duration::from_secs(args.stall_secs) {
            println!("  nothing moved for {} s: stopping here", args.stall_secs);
            break report;
        }
        // Often enough that the convergence time below is within a quarter
        // second; each read makes line-sim walk its ledger, so not more.
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let chain = report.chain.clone().unwrap_or_default();

    // analytics converges on contacts' count.
    let converge = Instant::now();
    let (truth, live) = loop {
        let (truth, live) = counts(&mut segments, &mut analytics, &args.tenant, &segment).await?;
        if live == Some(truth) || converge.elapsed() > Duration::from_secs(args.stall_secs) {
            break (truth, live);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let converged = posted_at.map(|t| t.elapsed()).unwrap_or_default();

    // Every friend: the tag (contacts), the menu and one message (line-sim).
    let mut missing = Vec::new();
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let checks: Vec<_> = (0..args.users)
        .map(|i| {
            let (mut contacts, limit, tenant, tag) = (
                contacts.clone(),
                limit.clone(),
                args.tenant.clone(),
                args.tag.clone(),
            );
            tokio::spawn(async move {
                let _permit = limit.acquire().await;
                let user = user_id(first_user + i);
                let tags = contacts
                    .get_contact(GetContactRequest {
                        contact: Some(ContactRef {
                            tenant_id: tenant,
                            line_user_id: user.clone(),
                        }),
                    })
                    .await
                    .map(|c| c.into_inner().tags)
                    .unwrap_or_default();
                (!tags.contains(&tag)).then_some(user)
            })
        })
        .collect();
    for c in checks {
        if let Some(user) = c.await.map_err(|e| format!("a check failed: {e}"))? {
            missing.push(format!("{user}: no tag {:?}", args.tag));
        }
    }

    let seconds = report.seconds.max(f64::EPSILON);
    println!(
        "\nwebhooks: {} posted, {} accepted in {:.1} s ({:.0}/s); gateway answer p50 {:.1} ms, p99 {:.1} ms; by status {:?}",
        report.sent,
        report.accepted,
        seconds,
        report.accepted as f64 / seconds,
        report.p50_ms,
        report.p99_ms,
        report.statuses
    );
    println!(
        "rich menus: {} of {} linked ({:.0}/s between the 10th and 90th percentile); webhook → link accepted by LINE: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        chain.linked,
        chain.users,
        chain.link_rate,
        chain.link_p50_ms,
        chain.link_p99_ms,
        chain.link_max_ms
    );
    println!(
        "messages: {} of {} friends got one ({} got more than one)",
        chain.messaged, chain.users, chain.messaged_twice
    );
    match live {
        Some(live) if live == truth => println!(
            "segment {:?}: {truth} in contacts and in analytics, equal {:.2} s after the last webhook",
            args.segment,
            converged.as_secs_f64()
        ),
        other => missing.push(format!(
            "segment {:?}: analytics counts {other:?}, contacts {truth}",
            args.segment
        )),
    }
    if report.accepted < report.sent {
        missing.push(format!(
            "{} webhooks not accepted: {:?}",
            report.sent - report.accepted,
            report.statuses
        ));
    }
    if chain.linked < chain.users {
        missing.push(format!(
            "{} friends without the campaign menu",
            chain.users - chain.linked
        ));
    }
    if chain.messaged < chain.users || chain.messaged_twice > 0 {
        missing.push(format!(
            "{} friends without a message, {} with more than one",
            chain.users - chain.messaged,
            chain.messaged_twice
        ));
    }
    Ok(missing)
}

pub async fn run(args: StormArgs) -> ExitCode {
    match storm(&args).await {
        Ok(missing) if missing.is_empty() => {
            println!("every friend: tagged, switched, thanked once");
            ExitCode::SUCCESS
        }
        Ok(missing) => {
            eprintln!("\nhibiki storm: FAILED");
            for m in missing.iter().take(20) {
                eprintln!("  {m}");
            }
            if missing.len() > 20 {
                eprintln!("  … and {} more", missing.len() - 20);
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("hibiki storm: {e}");
            ExitCode::from(2)
        }
    }
}
