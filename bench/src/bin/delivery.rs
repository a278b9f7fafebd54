//! delivery against line-sim with LINE's limits: coalescing, sustained rate,
//! and exactly-once under faults.
//!
//! Runs the release `hibiki-contacts` and `hibiki-delivery` binaries on a
//! fresh database and Redis key prefix, with line-sim (LINE's limits: push,
//! links and bulk links 2,000 requests/s per channel) in this process, and
//! three phases, each on a channel of its own:
//!
//! 1. **Rich-menu switches**: `--switches` (100,000) `LinkRichMenu` calls
//!    for distinct users to one menu, from `--callers` concurrent callers.
//!    Printed: how long the requests took to submit, when the last user was
//!    linked, how many users left in bulk links (target ≥ 95 %), and the
//!    time against the least LINE's limits allow: all users in bulk links of
//!    500 at 2,000 requests/s (target ≤ 2×), and, for scale, one link each.
//! 2. **Pushes at the limit**: `--pushes` (20,000) pushes, each with its own
//!    text (so none merge), for distinct users. Printed: the sustained rate
//!    between the 10th and 90th percentile of LINE's acceptance times
//!    (target ≥ 95 % of 2,000/s) and the 429s LINE answered (target 0).
//! 3. **The same under faults**: 10 % of requests answered 500/503 and 5 %
//!    never answered (each processed by LINE first half the time). Printed:
//!    the rate, the retries, and the ledger check: every push accepted
//!    exactly once (none lost, none twice).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hibiki_line::api::Endpoint;
use hibiki_line_sim::{Faults, LineSim, SimChannel, SimConfig};
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{CreateTenantRequest, PutChannelRequest};
use hibiki_proto::delivery::v1::delivery_service_client::DeliveryServiceClient;
use hibiki_proto::delivery::v1::{
    LinkRichMenuRequest, SendRequest, link_rich_menu_request, send_request,
};
use hibiki_testkit::{SERVICE_TOKEN, ServiceProcess, TestDatabase, authorized, service_env};

const TENANT: &str = "bench";

/// Measures delivery against line-sim with LINE's limits.
#[derive(Debug, Parser)]
struct Args {
    /// Rich-menu switches in phase 1.
    #[arg(long, default_value_t = 100_000)]
    switches: u64,
    /// Pushes in phases 2 and 3.
    #[arg(long, default_value_t = 20_000)]
    pushes: u64,
    /// Concurrent gRPC callers submitting requests.
    #[arg(long, default_value_t = 64)]
    callers: u64,
}

type Client = DeliveryServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        hibiki_runtime::grpc::ClientInterceptor,
    >,
>;

fn user(n: u64) -> String {
    format!("U{n:032x}")
}

/// Calls `request(n)` for n in 0..count from `callers` tasks; returns the
/// seconds it took.
async fn submit<F, Fut>(callers: u64, count: u64, request: F) -> f64
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let request = Arc::new(request);
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (next, request) = (next.clone(), request.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        return;
                    }
                    request(n).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a caller");
    }
    started.elapsed().as_secs_f64()
}

/// Waits until `done()` or `within`; returns whether it happened.
async fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// (time of the 10th, 90th percentile acceptance) in ms, and the rate
/// between them.
fn sustained(mut at_ms: Vec<u64>) -> (f64, f64) {
    at_ms.sort_unstable();
    if at_ms.len() < 10 {
        return (0.0, 0.0);
    }
    let (lo, hi) = (at_ms.len() / 10, at_ms.len() * 9 / 10);
    let span = (at_ms[hi] - at_ms[lo]) as f64 / 1000.0;
    let rate = (hi - lo) as f64 / span.max(1e-3);
    (span, rate)
}

async fn pushes(
    sim: &LineSim,
    client: &Client,
    channel: &'static str,
    args: &Args,
    label: &str,
) -> (f64, f64) {
    // Counted by the ledger's length (phases run one after the other):
    // scanning it every 20 ms would slow line-sim.
    let before = sim.sim().lock().sent.len() as u64;
    let client = client.clone();
    let submit_s = submit(args.callers, args.pushes, move |n| {
        let mut client = client.clone();
        async move {
            client
                .send(SendRequest {
                    tenant_id: TENANT.into(),
                    channel_id: channel.into(),
                    idempotency_key: format!("{channel}-push-{n}"),
                    target: Some(send_request::Target::PushTo(user(n))),
                    messages_json: vec![format!(r#"{{"type":"text","text":"offer {n}"}}"#)],
                    ..Default::default()
                })
                .await
                .expect("delivery takes the push");
        }
    })
    .await;
    let sent_on = |sim: &LineSim| sim.sim().lock().sent.len() as u64 - before;
    let all = wait_until(Duration::from_secs(600), || sent_on(sim) >= args.pushes).await;
    let at: Vec<u64> = sim
        .sim()
        .lock()
        .sent
        .iter()
        .filter(|m| m.channel_id == channel)
        .map(|m| m.at_ms)
        .collect();
    let (span, rate) = sustained(at);
    println!(
        "{label}: {} pushes submitted in {submit_s:.1} s ({:.0}/s); {} accepted by LINE{}; between the 10th and 90th percentile: {rate:.0}/s over {span:.1} s ({:.1} % of LINE's 2,000/s)",
        args.pushes,
        args.pushes as f64 / submit_s,
        sent_on(sim),
        if all { "" } else { " (NOT ALL within 10 min)" },
        rate / 2000.0 * 100.0
    );
    (rate, submit_s)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let release = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    let channels = [
        ("1000000001", "token-switch"),
        ("1000000002", "token-push"),
        ("1000000003", "token-fault"),
        ("1000000004", "token-backlog"),
    ];
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let sim = LineSim::start(
        SimConfig {
            channels: channels
                .iter()
                .map(|(id, token)| SimChannel {
                    channel_id: (*id).into(),
                    access_token: (*token).into(),
                    secret: "secret".into(),
                })
                .collect(),
            timeout_hold: Duration::from_secs(5),
            ..SimConfig::default()
        },
        loopback,
        loopback,
    )
    .await
    .expect("line-sim starts");
    let menu = sim
        .sim()
        .create_rich_menu(channels[0].0, "campaign", Some("campaign"));
    let backlog_menu = sim
        .sim()
        .create_rich_menu(channels[3].0, "campaign", Some("campaign"));

    let database = TestDatabase::create().await;
    let mut env = service_env(&database, None);
    env.insert("HIBIKI_LOG".into(), "error".into());
    let contacts = ServiceProcess::spawn(&release.join("hibiki-contacts"), env.clone());
    hibiki_testkit::wait_for_health(&contacts.url, tonic_health::ServingStatus::Serving).await;
    let mut tenants = TenantServiceClient::new(authorized(&contacts.url, SERVICE_TOKEN));
    tenants
        .create_tenant(CreateTenantRequest {
            tenant_id: TENANT.into(),
            ..Default::default()
        })
        .await
        .expect("the tenant");
    for (id, token) in channels {
        tenants
            .put_channel(PutChannelRequest {
                tenant_id: TENANT.into(),
                channel_id: id.into(),
                channel_secret: "secret".into(),
                access_token: token.into(),
                ..Default::default()
            })
            .await
            .expect("a channel");
    }
    env.insert("HIBIKI_CONTACTS_URL".into(), contacts.url.clone());
    env.insert("HIBIKI_LINE_API_URL".into(), sim.api_url());
    // Timeouts (phase 3) are noticed after a second.
    env.insert("HIBIKI_LINE_TIMEOUT_MS".into(), "1000".into());
    env.insert("HIBIKI_DELIVERY_BACKOFF_MS".into(), "100".into());
    env.insert("HIBIKI_DELIVERY_BACKOFF_CAP_MS".into(), "2000".into());
    env.insert("HIBIKI_DELIVERY_MAX_ATTEMPTS".into(), "20".into());
    for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("HIBIKI_DELIVERY_")) {
        env.insert(k, v);
    }
    // One replica takes the requests, another sends (so that phase 1b can
    // fill a queue with nobody sending, then start a sender).
    let mut api_env = env.clone();
    api_env.insert("HIBIKI_DELIVERY_WORKERS".into(), "false".into());
    let delivery = ServiceProcess::spawn(&release.join("hibiki-delivery"), api_env);
    hibiki_testkit::wait_for_health(&delivery.url, tonic_health::ServingStatus::Serving).await;
    let mut sender = ServiceProcess::spawn(&release.join("hibiki-delivery"), env.clone());
    hibiki_testkit::wait_for_health(&sender.url, tonic_health::ServingStatus::Serving).await;
    let client: Client = DeliveryServiceClient::new(authorized(&delivery.url, SERVICE_TOKEN));
    println!(
        "delivery bench: line-sim with LINE's limits; {} callers submitting over gRPC\n",
        args.callers
    );

    // 1. Rich-menu switches.
    let started = Instant::now();
    let c = client.clone();
    let menu_id = menu.clone();
    let submit_s = submit(args.callers, args.switches, move |n| {
        let mut client = c.clone();
        let menu = menu_id.clone();
        async move {
            client
                .link_rich_menu(LinkRichMenuRequest {
                    tenant_id: TENANT.into(),
                    channel_id: "1000000001".into(),
                    idempotency_key: format!("switch-{n}"),
                    user_id: user(n),
                    menu: Some(link_rich_menu_request::Menu::RichMenuId(menu)),
                })
                .await
                .expect("delivery takes the switch");
        }
    })
    .await;
    let linked = |sim: &LineSim| sim.sim().lock().menu_changes.len() as u64;
    wait_until(Duration::from_secs(600), || linked(&sim) >= args.switches).await;
    let total_s = started.elapsed().as_secs_f64();
    let (bulk_users, single, users) = {
        let s = sim.sim().lock();
        let bulk = s
            .menu_changes
            .iter()
            .filter(|c| c.endpoint == Endpoint::BulkLinkRichMenu)
            .count();
        let mut per_user: HashMap<&str, usize> = HashMap::new();
        for c in &s.menu_changes {
            *per_user.entry(c.user_id.as_str()).or_default() += 1;
        }
        let right = s
            .menu_changes
            .iter()
            .all(|c| c.rich_menu_id.as_deref() == Some(menu.as_str()));
        assert!(right, "a user was linked to another menu");
        (
            bulk as u64,
            (s.menu_changes.len() - bulk) as u64,
            per_user.len(),
        )
    };
    let bulk_calls = sim
        .sim()
        .lock()
        .counts
        .get(&Endpoint::BulkLinkRichMenu)
        .map_or(0, |c| c.values().sum::<u64>());
    let bulk_minimum = (args.switches as f64 / 500.0).ceil() / 2000.0;
    let single_minimum = args.switches as f64 / 2000.0;
    println!(
        "switches: {} submitted in {submit_s:.1} s ({:.0}/s); last user linked after {total_s:.1} s; {users} users linked, {bulk_users} in {bulk_calls} bulk links ({:.1} %), {single} alone",
        args.switches,
        args.switches as f64 / submit_s,
        bulk_users as f64 / args.switches as f64 * 100.0,
    );
    println!(
        "  least time LINE's limits allow: {bulk_minimum:.2} s all in bulk links of 500 (ratio {:.0}), {single_minimum:.0} s one link each (ratio {:.2}); after the last request was submitted, the links finished in {:.2} s",
        total_s / bulk_minimum,
        total_s / single_minimum,
        (total_s - submit_s).max(0.0)
    );

    // 1b. The same switches queued with nobody sending, then a sender
    // starts: delivery's own pace through a backlog.
    sender.terminate();
    sender.wait_exit(Duration::from_secs(30)).await;
    let c = client.clone();
    let menu_id = backlog_menu.clone();
    let submit_s = submit(args.callers, args.switches, move |n| {
        let mut client = c.clone();
        let menu = menu_id.clone();
        async move {
            client
                .link_rich_menu(LinkRichMenuRequest {
                    tenant_id: TENANT.into(),
                    channel_id: "1000000004".into(),
                    idempotency_key: format!("backlog-{n}"),
                    user_id: user(n),
                    menu: Some(link_rich_menu_request::Menu::RichMenuId(menu)),
                })
                .await
                .expect("delivery takes the switch");
        }
    })
    .await;
    // Counted by the ledger's length: scanning it every 20 ms would hold
    // line-sim's lock long enough to slow what is measured.
    let before = sim.sim().lock().menu_changes.len() as u64;
    let on_backlog = |sim: &LineSim| sim.sim().lock().menu_changes.len() as u64 - before;
    let started = Instant::now();
    sender = ServiceProcess::spawn(&release.join("hibiki-delivery"), env.clone());
    wait_until(Duration::from_secs(600), || {
        on_backlog(&sim) >= args.switches
    })
    .await;
    let from_start = started.elapsed().as_secs_f64();
    let (first, last, bulk, calls) = {
        let s = sim.sim().lock();
        let mine: Vec<_> = s
            .menu_changes
            .iter()
            .filter(|c| c.channel_id == "1000000004")
            .collect();
        let first = mine.iter().map(|c| c.at_ms).min().unwrap_or(0);
        let last = mine.iter().map(|c| c.at_ms).max().unwrap_or(0);
        let bulk = mine
            .iter()
            .filter(|c| c.endpoint == Endpoint::BulkLinkRichMenu)
            .count();
        let calls: std::collections::HashSet<&str> =
            mine.iter().map(|c| c.request_id.as_str()).collect();
        (first, last, bulk, calls.len())
    };
    let drain_s = (last - first) as f64 / 1000.0;
    println!(
        "switches from a backlog: {} queued in {submit_s:.1} s with no sender; a sender started and linked them all {from_start:.2} s later (process start included); first to last link {drain_s:.2} s; {} in bulk links ({:.1} %) over {calls} calls",
        args.switches,
        bulk,
        bulk as f64 / args.switches as f64 * 100.0
    );
    println!(
        "  least time LINE's limits allow: {bulk_minimum:.2} s; first to last link / least: {:.1}",
        drain_s / bulk_minimum
    );

    // 2. Pushes at the limit.
    let (_, _) = pushes(&sim, &client, "1000000002", &args, "pushes").await;
    let limited = sim
        .sim()
        .lock()
        .counts
        .get(&Endpoint::Push)
        .and_then(|c| c.get(&429))
        .copied()
        .unwrap_or(0);
    println!("  429s from LINE: {limited}");

    // 3. The same under faults.
    sim.sim().lock().config.faults = Faults {
        error_rate: 0.10,
        timeout_rate: 0.05,
        processed_rate: 0.5,
        endpoints: vec![Endpoint::Push],
        ..Faults::default()
    };
    let before: HashMap<u16, u64> = sim
        .sim()
        .lock()
        .counts
        .get(&Endpoint::Push)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .collect();
    pushes(
        &sim,
        &client,
        "1000000003",
        &args,
        "pushes with 10 % 5xx and 5 % timeouts",
    )
    .await;
    {
        let s = sim.sim().lock();
        let after = s.counts.get(&Endpoint::Push).cloned().unwrap_or_default();
        let delta = |status: u16| {
            after.get(&status).copied().unwrap_or(0) - before.get(&status).copied().unwrap_or(0)
        };
        let mut per_user: HashMap<&str, usize> = HashMap::new();
        for m in s.sent.iter().filter(|m| m.channel_id == "1000000003") {
            *per_user.entry(m.recipient.as_str()).or_default() += 1;
        }
        let twice = per_user.values().filter(|n| **n > 1).count();
        let lost = args.pushes as usize - per_user.len();
        println!(
            "  LINE answered 500: {}, 503: {}, no answer: {}, 409 (a retry of an accepted push): {}",
            delta(500),
            delta(503),
            delta(0),
            delta(409)
        );
        println!(
            "  ledger check: {} users, {} pushes accepted; {}",
            per_user.len(),
            per_user.values().sum::<usize>(),
            if twice == 0 && lost == 0 {
                "every push exactly once".to_owned()
            } else {
                format!("MISMATCH: {twice} users twice, {lost} lost")
            }
        );
    }
    drop(sender);
    drop(delivery);
    drop(contacts);
    sim.stop().await;
}
