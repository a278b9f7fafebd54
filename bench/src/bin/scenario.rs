//! One tap, end to end, many times: postbacks from distinct users through
//! gateway → event log → scenario → contacts → delivery → line-sim.
//!
//! Runs the release `hibiki-contacts`, `hibiki-gateway`, `hibiki-delivery`
//! and `hibiki-scenario` binaries on a fresh database and Redis key prefix,
//! with line-sim (LINE's limits) in this process, and the spring campaign
//! (`examples/spring-campaign.yaml`: tag, rich menu, thank-you reply)
//! applied. It posts `--users` signed postback webhooks, one per user, at
//! `--rate` a second, and reports:
//! - the sustained rate: users whose rich menu was switched, per second,
//!   between the 10th and 90th percentile of switch times;
//! - the latency from posting the webhook to line-sim's acceptance of the
//!   user's rich-menu link (p50, p99);
//! - the check: every user tagged... (through line-sim: every user's menu
//!   switched exactly once and one reply each).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hibiki_bench::{Latencies, ms};
use hibiki_line::signature::{SIGNATURE_HEADER, sign};
use hibiki_line_sim::storm::{EventKind, StormSpec, destination, event};
use hibiki_line_sim::{LineSim, SimChannel, SimConfig};
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{CreateTenantRequest, PutChannelRequest};
use hibiki_proto::scenario::v1::scenario_service_client::ScenarioServiceClient;
use hibiki_proto::scenario::v1::{ApplyRequest, apply_request};
use hibiki_testkit::{
    HttpConnection, SERVICE_TOKEN, ServiceProcess, TestDatabase, authorized, free_port, service_env,
};

const TENANT: &str = "bench";
const CHANNEL: &str = "1000000001";
const SECRET: &str = "bench-secret";
const TOKEN: &str = "bench-token";

/// Measures the whole mesh on the spring campaign.
#[derive(Debug, Parser)]
struct Args {
    /// Users, one tap each.
    #[arg(long, default_value_t = 50_000)]
    users: u64,
    /// Webhooks a second.
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// Connections posting webhooks.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds between the autovacuum stand-in's VACUUM (ANALYZE) runs
    /// (PostgreSQL's autovacuum visits a database once a minute by default).
    #[arg(long, default_value_t = 60)]
    autovacuum_secs: u64,
}

fn user(n: u64) -> String {
    format!("U{n:032x}")
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let release = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let sim = LineSim::start(
        SimConfig {
            channels: vec![SimChannel {
                channel_id: CHANNEL.into(),
                access_token: TOKEN.into(),
                secret: SECRET.into(),
            }],
            ..SimConfig::default()
        },
        loopback,
        loopback,
    )
    .await
    .expect("line-sim starts");
    sim.sim()
        .create_rich_menu(CHANNEL, "campaign", Some("campaign"));

    let database = TestDatabase::create().await;
    // This machine's PostgreSQL runs without autovacuum; do its work at its
    // pace (by default, as autovacuum's default naptime: once a minute).
    let _autovacuum = hibiki_bench::autovacuum(
        database.url(),
        Duration::from_secs(args.autovacuum_secs.max(1)),
    );
    let mut env = service_env(&database, None);
    env.insert("HIBIKI_LOG".into(), "error".into());
    // Settings given to the bench reach the services (e.g.
    // HIBIKI_SCENARIO_CONSUMERS, HIBIKI_DATABASE_MAX_CONNECTIONS).
    for (k, v) in std::env::vars().filter(|(k, _)| {
        [
            "HIBIKI_SCENARIO_",
            "HIBIKI_EVENTLOG_",
            "HIBIKI_DATABASE_MAX",
            "HIBIKI_DELIVERY_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
    }) {
        env.insert(k, v);
    }
    let contacts = ServiceProcess::spawn(&release.join("hibiki-contacts"), env.clone());
    hibiki_testkit::wait_for_health(&contacts.url, tonic_health::ServingStatus::Serving).await;
    let mut tenants = TenantServiceClient::new(authorized(&contacts.url, SERVICE_TOKEN));
    tenants
        .create_tenant(CreateTenantRequest {
            tenant_id: TENANT.into(),
            display_name: "Bench".into(),
            time_zone: "Asia/Tokyo".into(),
        })
        .await
        .expect("the tenant");
    tenants
        .put_channel(PutChannelRequest {
            tenant_id: TENANT.into(),
            channel_id: CHANNEL.into(),
            channel_secret: SECRET.into(),
            access_token: TOKEN.into(),
            ..Default::default()
        })
        .await
        .expect("the channel");
    env.insert("HIBIKI_CONTACTS_URL".into(), contacts.url.clone());
    env.insert("HIBIKI_LINE_API_URL".into(), sim.api_url());
    let delivery = ServiceProcess::spawn(&release.join("hibiki-delivery"), env.clone());
    hibiki_testkit::wait_for_health(&delivery.url, tonic_health::ServingStatus::Serving).await;
    env.insert("HIBIKI_DELIVERY_URL".into(), delivery.url.clone());
    let http_port = free_port();
    let mut gateway_env = env.clone();
    gateway_env.insert("HIBIKI_HTTP_ADDR".into(), format!("127.0.0.1:{http_port}"));
    let gateway = ServiceProcess::spawn(&release.join("hibiki-gateway"), gateway_env);
    hibiki_testkit::wait_for_health(&gateway.url, tonic_health::ServingStatus::Serving).await;
    let scenario = ServiceProcess::spawn(&release.join("hibiki-scenario"), env.clone());
    hibiki_testkit::wait_for_health(&scenario.url, tonic_health::ServingStatus::Serving).await;
    ScenarioServiceClient::new(authorized(&scenario.url, SERVICE_TOKEN))
        .apply(ApplyRequest {
            tenant_id: TENANT.into(),
            source: Some(apply_request::Source::Yaml(
                include_str!("../../../examples/spring-campaign.yaml").into(),
            )),
            start_disabled: false,
        })
        .await
        .expect("the spring campaign applies");
    println!(
        "scenario bench: {} users tap the spring campaign's postback at {}/s over {} connections; gateway → scenario → contacts → delivery → line-sim (release binaries, one machine)\n",
        args.users, args.rate, args.connections
    );

    // Post the taps, paced, remembering when each user's left.
    let posted: Arc<std::sync::Mutex<HashMap<String, u64>>> = Arc::default();
    let next = Arc::new(AtomicU64::new(0));
    let spec = Arc::new(StormSpec {
        channel_id: CHANNEL.into(),
        ..StormSpec::default()
    });
    let started = Instant::now();
    let gateway_addr = SocketAddr::from(([127, 0, 0, 1], http_port));
    let senders: Vec<_> = (0..args.connections)
        .map(|_| {
            let (posted, next, spec, sim) = (
                posted.clone(),
                next.clone(),
                spec.clone(),
                sim.sim().clone(),
            );
            let (users, rate) = (args.users, args.rate);
            tokio::spawn(async move {
                let mut conn = HttpConnection::new(gateway_addr);
                let mut refused = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= users {
                        return refused;
                    }
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    let u = user(i);
                    let token = sim.lock().issue_reply_token(CHANNEL, &u);
                    let body = serde_json::json!({
                        "destination": destination(CHANNEL),
                        "events": [event(&spec, EventKind::Postback, &u, &token)],
                    })
                    .to_string();
                    let signature = sign(SECRET.as_bytes(), body.as_bytes());
                    let at = hibiki_line_sim::state::now_ms();
                    match conn
                        .post(
                            &format!("/line/webhook/{CHANNEL}"),
                            &[
                                ("content-type", "application/json"),
                                (SIGNATURE_HEADER, &signature),
                            ],
                            body.into_bytes(),
                        )
                        .await
                    {
                        Ok((200, _)) => {
                            posted.lock().unwrap().insert(u, at);
                        }
                        _ => refused += 1,
                    }
                }
            })
        })
        .collect();
    let mut refused = 0;
    for s in senders {
        refused += s.await.expect("a sender");
    }
    let post_s = started.elapsed().as_secs_f64();
    let accepted = posted.lock().unwrap().len() as u64;
    println!(
        "posted {} webhooks in {post_s:.1} s ({:.0}/s); the gateway accepted {accepted}, refused {refused}",
        args.users,
        args.users as f64 / post_s
    );

    // Wait for every accepted user's menu switch and thank-you (or for
    // progress to stop).
    let switched = |sim: &LineSim| {
        let s = sim.sim().lock();
        (s.menu_changes.len() as u64).min(s.sent.len() as u64)
    };
    let mut last = (0, Instant::now());
    while switched(&sim) < accepted {
        let now = switched(&sim);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) {
            println!("no progress for 30 s: stopping at {now} of {accepted}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total_s = started.elapsed().as_secs_f64();
    let (mut latencies, mut at, per_user, messages) = {
        let s = sim.sim().lock();
        let posted = posted.lock().unwrap();
        let mut latencies = Latencies::default();
        let mut at = Vec::new();
        let mut per_user: HashMap<&str, usize> = HashMap::new();
        for c in &s.menu_changes {
            *per_user.entry(c.user_id.as_str()).or_default() += 1;
            at.push(c.at_ms);
            if let Some(sent) = posted.get(&c.user_id) {
                latencies.record(Duration::from_millis(c.at_ms.saturating_sub(*sent)));
            }
        }
        // One thank-you each: a reply, or a push when the reply token had
        // expired by the time it left.
        let mut messages: HashMap<&str, usize> = HashMap::new();
        for m in &s.sent {
            *messages.entry(m.recipient.as_str()).or_default() += 1;
        }
        let replies = s
            .sent
            .iter()
            .filter(|m| m.endpoint == hibiki_line::api::Endpoint::Reply)
            .count();
        let once = messages.values().filter(|n| **n == 1).count();
        let messages = (replies, s.sent.len() - replies, once);
        let per_user: HashMap<String, usize> = per_user
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        (latencies, at, per_user, messages)
    };
    at.sort_unstable();
    let (lo, hi) = (at.len() / 10, (at.len() * 9 / 10).max(1) - 1);
    let rate = if at.len() >= 10 {
        (hi - lo) as f64 / ((at[hi] - at[lo]) as f64 / 1000.0).max(1e-3)
    } else {
        0.0
    };
    println!(
        "menus switched: {} in {total_s:.1} s; sustained {rate:.0} taps/s (10th to 90th percentile)",
        at.len()
    );
    println!(
        "latency, webhook posted → rich-menu link accepted by line-sim: p50 {}, p99 {}",
        ms(latencies.quantile(0.5)),
        ms(latencies.quantile(0.99))
    );
    let twice = per_user.values().filter(|n| **n > 1).count();
    let (replies, pushes, once) = messages;
    println!(
        "check: {} users switched ({} twice); thank-yous: {replies} replies, {pushes} pushes (the reply token had expired), {once} users got exactly one; {}",
        per_user.len(),
        twice,
        if per_user.len() as u64 == accepted && twice == 0 && once as u64 == accepted {
            "every accepted tap switched once and was thanked once"
        } else {
            "MISMATCH"
        }
    );
    drop(scenario);
    drop(gateway);
    drop(delivery);
    drop(contacts);
    sim.stop().await;
}
