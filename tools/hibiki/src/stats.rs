//! `hibiki stats` and `hibiki watch`: a tenant's live figures from analytics
//! in a terminal.
//!
//! ```text
//! hibiki stats --tenant demo [--minutes 60]   # counts, event rates, deliveries
//! hibiki watch --tenant demo [--segment seg_…] # segment counts as they change
//! ```

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;

use hibiki_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use hibiki_proto::analytics::v1::{
    GetDeliveryStatsRequest, GetEventRatesRequest, GetSegmentCountsRequest, TimeRange,
    WatchSegmentCountsRequest,
};
use hibiki_runtime::config::{DEV_SERVICE_TOKEN, Secret};
use hibiki_runtime::grpc::{self, ClientInterceptor};
use hibiki_runtime::timestamp;

/// Where analytics is and who asks.
#[derive(Debug, clap::Args)]
pub struct Connection {
    /// The analytics service.
    #[arg(
        long,
        env = "HIBIKI_ANALYTICS_URL",
        default_value = "http://127.0.0.1:50055"
    )]
    analytics: String,
    /// Bearer token (an operator token of the tenant, or a service token).
    #[arg(long, env = "HIBIKI_TOKEN", default_value = DEV_SERVICE_TOKEN, hide_default_value = true)]
    token: String,
}

/// Options of `hibiki stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// Events and deliveries over this many last minutes.
    #[arg(long, default_value_t = 60)]
    minutes: i64,
    #[command(flatten)]
    connection: Connection,
}

/// Options of `hibiki watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// Only these segments (all when none is given).
    #[arg(long = "segment")]
    segments: Vec<String>,
    #[command(flatten)]
    connection: Connection,
}

type Client = AnalyticsServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientInterceptor>,
>;

fn client(c: &Connection) -> Result<Client, String> {
    let channel =
        grpc::channel(&c.analytics).map_err(|e| format!("--analytics {}: {e}", c.analytics))?;
    let interceptor = ClientInterceptor::new(&Secret::new(c.token.clone()))
        .map_err(|e| format!("--token: {e}"))?;
    Ok(AnalyticsServiceClient::with_interceptor(
        channel,
        interceptor,
    ))
}

fn failed(command: &str, status: &tonic::Status, at: &str) -> ExitCode {
    eprintln!(
        "hibiki {command}: {:?}: {} (analytics at {at})",
        status.code(),
        status.message()
    );
    ExitCode::FAILURE
}

async fn stats(client: &mut Client, args: &StatsArgs) -> Result<(), tonic::Status> {
    let now = chrono::Utc::now();
    let range = TimeRange {
        start: Some(timestamp::to_proto(
            now - chrono::Duration::minutes(args.minutes.max(1)),
        )),
        end: Some(timestamp::to_proto(now)),
    };
    let counts = client
        .get_segment_counts(GetSegmentCountsRequest {
            tenant_id: args.tenant.clone(),
            segment_ids: vec![],
        })
        .await?
        .into_inner()
        .counts;
    println!("segments of {}", args.tenant);
    if counts.is_empty() {
        println!("  (none counted yet)");
    }
    for c in &counts {
        println!("  {:<28} {:>10}", c.segment_id, c.member_count);
    }

    let points = client
        .get_event_rates(GetEventRatesRequest {
            tenant_id: args.tenant.clone(),
            range: Some(range),
            step: None,
            event_types: vec![],
        })
        .await?
        .into_inner()
        .points;
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    for p in &points {
        for (kind, n) in &p.counts {
            *totals.entry(kind.clone()).or_default() += n;
        }
    }
    let last: HashMap<String, i64> = points
        .iter()
        .rev()
        .find(|p| !p.counts.is_empty())
        .map(|p| p.counts.clone().into_iter().collect())
        .unwrap_or_default();
    println!(
        "events, last {} min (and in the last busy minute)",
        args.minutes
    );
    if totals.is_empty() {
        println!("  (none)");
    }
    for (kind, n) in &totals {
        println!(
            "  {kind:<28} {n:>10}   ({}/min)",
            last.get(kind).copied().unwrap_or(0)
        );
    }

    let endpoints = client
        .get_delivery_stats(GetDeliveryStatsRequest {
            tenant_id: args.tenant.clone(),
            range: Some(range),
            channel_id: String::new(),
        })
        .await?
        .into_inner()
        .endpoints;
    println!("deliveries, last {} min", args.minutes);
    if endpoints.is_empty() {
        println!("  (none)");
    }
    for e in &endpoints {
        println!(
            "  {:<36} accepted {:>8} (+{} before)  retrying {:>6}  dead {:>6}  recipients {:>8}",
            e.endpoint, e.accepted, e.already_accepted, e.retrying, e.dead_lettered, e.recipients
        );
    }
    Ok(())
}

async fn watch(client: &mut Client, args: &WatchArgs) -> Result<(), tonic::Status> {
    let mut stream = client
        .watch_segment_counts(WatchSegmentCountsRequest {
            tenant_id: args.tenant.clone(),
            segment_ids: args.segments.clone(),
        })
        .await?
        .into_inner();
    let mut last: HashMap<String, i64> = HashMap::new();
    eprintln!(
        "watching segment counts of {} (Ctrl-C to stop)",
        args.tenant
    );
    while let Some(update) = stream.message().await? {
        let at = chrono::Local::now().format("%H:%M:%S%.3f");
        let change = match last.insert(update.segment_id.clone(), update.member_count) {
            Some(before) => format!("{:+}", update.member_count - before),
            None => String::new(),
        };
        println!(
            "{at}  {:<28} {:>10}  {change}",
            update.segment_id, update.member_count
        );
    }
    Ok(())
}

pub async fn run_stats(args: StatsArgs) -> ExitCode {
    let mut client = match client(&args.connection) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hibiki stats: {e}");
            return ExitCode::from(2);
        }
    };
    match stats(&mut client, &args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(s) => failed("stats", &s, &args.connection.analytics),
    }
}

pub async fn run_watch(args: WatchArgs) -> ExitCode {
    let mut client = match client(&args.connection) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hibiki watch: {e}");
            return ExitCode::from(2);
        }
    };
    let watched = tokio::select! {
        r = watch(&mut client, &args) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    match watched {
        Ok(()) => ExitCode::SUCCESS,
        Err(s) => failed("watch", &s, &args.connection.analytics),
    }
}
