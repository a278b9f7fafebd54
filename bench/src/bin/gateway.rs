//! How many LINE webhooks a second the gateway takes, against the ceiling of
//! a no-op axum handler on the same machine.
//!
//! Runs the release `hibiki-contacts` (holding the channel registry) and
//! `hibiki-gateway` binaries on a fresh database and Redis key prefix, and a
//! no-op axum server (this binary again, in its own process, answering 200
//! to any POST after reading the body). The load generator posts realistic
//! signed single-event postback bodies, each for a distinct user, over
//! keep-alive HTTP/1.1 connections:
//!
//! 1. **Maximum rate**: `--connections` closed-loop senders for `--seconds`
//!    after `--warmup`, against the no-op server and then the gateway, for
//!    `--rounds` alternating rounds (this machine's speed drifts by 10-15 %
//!    between minutes). Printed: each round's requests/s, then the medians,
//!    p50 and p99 over all rounds, and the gateway's ratio of medians.
//! 2. **At 70 % of the gateway's maximum**: `--paced-connections` paced to
//!    0.7 × the measured rate in all (open loop; latency counted from each
//!    request's scheduled time, so queueing shows; the slots are handed out
//!    by a microsecond-precise pacer thread, not tokio's millisecond timer,
//!    which would bunch them into bursts). Printed: p50, p99, and the same
//!    paced load on the no-op server: what the load generator and the busy
//!    machine add to any server's latency at that rate. Also printed: the CPU time the gateway and Redis spent per webhook in
//!    this phase (from /proc), a steadier figure than rates on a shared
//!    machine.
//! 3. **Check**: the event log holds exactly one entry per webhook the
//!    gateway answered 200 (every event id is distinct).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hibiki_bench::{Latencies, ms, pace};
use hibiki_gateway::line;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{CreateTenantRequest, PutChannelRequest};
use hibiki_runtime::config::{RedisConfig, Secret};
use hibiki_runtime::eventlog::EventLog;
use hibiki_runtime::redis::Redis;
use hibiki_testkit::{
    HttpConnection, SERVICE_TOKEN, ServiceProcess, TestDatabase, authorized, free_port, service_env,
};

const TENANT: &str = "bench";
const CHANNEL: &str = "1000000001";
const SECRET: &str = "bench-channel-secret";
const SHARDS: u32 = 16;

/// Measures the gateway's webhook rate and latency against a no-op ceiling.
#[derive(Debug, Parser)]
struct Args {
    /// Keep-alive connections posting at once.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds of (ceiling, gateway) at the maximum rate, alternated so that
    /// both see the same machine; the medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Warm-up seconds before each maximum-rate phase (not measured).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Connections of the paced phase (more connections cost the shared
    /// machine more: 256 gave a worse p99 than 64 here).
    #[arg(long, default_value_t = 64)]
    paced_connections: usize,
    /// The paced phase's rate as a fraction of the gateway's maximum.
    #[arg(long, default_value_t = 0.7)]
    load: f64,
    /// Internal: serve the no-op handler on this port (the ceiling).
    #[arg(long, hide = true)]
    serve_noop: Option<u16>,
}

/// The ceiling: reads the body, answers 200.
async fn serve_noop(port: u16) {
    use axum::serve::ListenerExt;
    let app = axum::Router::new().route(
        "/line/webhook/{channel_id}",
        axum::routing::post(|_body: axum::body::Bytes| async { "{}" }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the no-op port is free")
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    axum::serve(listener, app).await.expect("the no-op server");
}

/// A signed one-postback webhook for user number `n`.
fn webhook(n: u64) -> (Vec<u8>, String) {
    let body = format!(
        concat!(
            r#"{{"destination":"U0123456789abcdef0123456789abcdef","events":[{{"type":"postback","#,
            r#""mode":"active","timestamp":{ts},"webhookEventId":"01BENCH{n:019}","#,
            r#""deliveryContext":{{"isRedelivery":false}},"source":{{"type":"user","userId":"U{n:032x}"}},"#,
            r#""replyToken":"{n:032x}","postback":{{"data":"action=join&campaign=spring"}}}}]}}"#
        ),
        ts = 1_767_000_000_000_u64 + n,
        n = n,
    );
    let signature = line::sign(SECRET.as_bytes(), body.as_bytes());
    (body.into_bytes(), signature)
}

struct Figures {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    ok: u64,
    other: u64,
}

/// Posts from `connections` senders for `seconds`; paced to `rate` requests
/// a second in all when given (latency from the scheduled time), else as
/// fast as answers come.
async fn load(
    addr: SocketAddr,
    connections: usize,
    seconds: f64,
    rate: Option<f64>,
    next: Arc<AtomicU64>,
) -> Figures {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut slots = rate.map(|r| pace(r, connections, deadline).into_iter());
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let next = next.clone();
            let mut slots = slots.as_mut().and_then(Iterator::next);
            tokio::spawn(async move {
                let mut conn = HttpConnection::new(addr);
                let mut latencies = Latencies::default();
                let (mut ok, mut other) = (0u64, 0u64);
                let path = format!("/line/webhook/{CHANNEL}");
                loop {
                    let due = match slots.as_mut() {
                        Some(slots) => match slots.recv().await {
                            Some(due) => due,
                            None => break,
                        },
                        None if Instant::now() < deadline => Instant::now(),
                        None => break,
                    };
                    let (body, signature) = webhook(next.fetch_add(1, Ordering::Relaxed));
                    let answer = conn
                        .post(
                            &path,
                            &[
                                ("content-type", "application/json"),
                                (line::SIGNATURE_HEADER, &signature),
                            ],
                            body,
                        )
                        .await;
                    latencies.record(due.elapsed());
                    match answer {
                        Ok((200, _)) => ok += 1,
                        _ => other += 1,
                    }
                }
                (latencies, ok, other)
            })
        })
        .collect();
    let mut all = Latencies::default();
    let (mut ok, mut other) = (0, 0);
    for t in tasks {
        let (l, o, x) = t.await.expect("a sender");
        all.merge(l);
        ok += o;
        other += x;
    }
    Figures {
        per_second: (ok + other) as f64 / seconds,
        p50: all.quantile(0.5),
        p99: all.quantile(0.99),
        ok,
        other,
    }
}

/// CPU seconds (user + system) process `pid` has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ")".
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15, in clock ticks of 1/100 s.
    (ticks(11) + ticks(12)) / 100.0
}

/// The process id of the Redis server at `url`.
async fn redis_pid(url: &str) -> u32 {
    let client = hibiki_runtime::redis::redis::Client::open(url).expect("a Redis URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let info: String = hibiki_runtime::redis::redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .expect("INFO answers");
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("INFO lists the process id")
}

/// The figures of the round with the median rate.
fn median(mut rounds: Vec<Figures>) -> Figures {
    rounds.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
    let middle = rounds.len() / 2;
    rounds.swap_remove(middle)
}

fn row(name: &str, f: &Figures) {
    println!(
        "| {name} | {:.0} | {} | {} | {} | {} |",
        f.per_second,
        ms(f.p50),
        ms(f.p99),
        f.ok,
        f.other
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Some(port) = args.serve_noop {
        serve_noop(port).await;
        return;
    }
    let release = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release");

    // The ceiling, in its own process like the gateway.
    let noop_port = free_port();
    let mut noop = std::process::Command::new(std::env::current_exe().expect("this binary"))
        .args(["--serve-noop", &noop_port.to_string()])
        .spawn()
        .expect("the no-op server starts");

    // contacts with the bench tenant and channel, then the gateway.
    let database = TestDatabase::create().await;
    let mut env = service_env(&database, None);
    // Nothing of the run stays in the shared Redis (dropped last).
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
        .expect("the tenant is created");
    tenants
        .put_channel(PutChannelRequest {
            tenant_id: TENANT.into(),
            channel_id: CHANNEL.into(),
            channel_secret: SECRET.into(),
            access_token: "bench-access-token".into(),
            ..Default::default()
        })
        .await
        .expect("the channel is stored");
    let http_port = free_port();
    let gateway_addr = SocketAddr::from(([127, 0, 0, 1], http_port));
    env.insert("HIBIKI_HTTP_ADDR".into(), gateway_addr.to_string());
    env.insert("HIBIKI_CONTACTS_URL".into(), contacts.url.clone());
    env.insert("HIBIKI_EVENTLOG_SHARDS".into(), SHARDS.to_string());
    // No back-pressure during the bench: nothing consumes the log.
    env.insert("HIBIKI_EVENTLOG_MAX_LEN".into(), "100000000".into());
    // The gateway logs as in production (info); its per-webhook span, which
    // carries the trace context into the log, is part of what is measured.
    env.insert("HIBIKI_LOG".into(), "info".into());
    // Settings given to the bench for the gateway (HIBIKI_WEBHOOK_*,
    // HIBIKI_EVENTLOG_*) reach it; HIBIKI_BENCH_GATEWAY_WORKERS sets its
    // tokio worker threads (default: one per core).
    for (k, v) in std::env::vars()
        .filter(|(k, _)| k.starts_with("HIBIKI_WEBHOOK_") || k.starts_with("HIBIKI_EVENTLOG_"))
    {
        env.insert(k, v);
    }
    if let Ok(workers) = std::env::var("HIBIKI_BENCH_GATEWAY_WORKERS") {
        env.insert("TOKIO_WORKER_THREADS".into(), workers);
    }
    let gateway = ServiceProcess::spawn(&release.join("hibiki-gateway"), env.clone());
    hibiki_testkit::wait_for_health(&gateway.url, tonic_health::ServingStatus::Serving).await;

    // Both servers answer before anything is measured.
    for addr in [SocketAddr::from(([127, 0, 0, 1], noop_port)), gateway_addr] {
        let body = br#"{"destination":"U0","events":[]}"#;
        let signature = line::sign(SECRET.as_bytes(), body);
        if let Err(last) = HttpConnection::new(addr)
            .post_until_ok(
                &format!("/line/webhook/{CHANNEL}"),
                &[(line::SIGNATURE_HEADER, &signature)],
                body.to_vec(),
                Duration::from_secs(20),
            )
            .await
        {
            panic!("{addr} does not answer: {last}");
        }
    }

    let next = Arc::new(AtomicU64::new(0));
    let noop_addr = SocketAddr::from(([127, 0, 0, 1], noop_port));
    let seconds = args.seconds as f64;
    println!(
        "gateway bench: {} keep-alive connections, {} s per phase after {} s warm-up, signed single-postback bodies for distinct users, {} shards\n",
        args.connections, args.seconds, args.warmup, env["HIBIKI_EVENTLOG_SHARDS"]
    );
    // Every webhook the gateway was sent, and how many it answered 200.
    let (mut sent, mut accepted) = (0u64, 0u64);
    let mut count = |f: &Figures| {
        sent += f.ok + f.other;
        accepted += f.ok;
    };
    load(
        noop_addr,
        args.connections,
        args.warmup as f64,
        None,
        next.clone(),
    )
    .await;
    count(
        &load(
            gateway_addr,
            args.connections,
            args.warmup as f64,
            None,
            next.clone(),
        )
        .await,
    );
    let redis_pid = redis_pid(&env["HIBIKI_REDIS_URL"]).await;
    let cpu = || (cpu_seconds(gateway.pid()), cpu_seconds(redis_pid));
    let per_webhook = |before: (f64, f64), after: (f64, f64), n: u64| {
        let n = n.max(1) as f64;
        (
            (after.0 - before.0) * 1e6 / n,
            (after.1 - before.1) * 1e6 / n,
        )
    };
    let mut ceilings = Vec::new();
    let mut maxima = Vec::new();
    for round in 1..=args.rounds.max(1) {
        let c = load(noop_addr, args.connections, seconds, None, next.clone()).await;
        let before = cpu();
        let g = load(gateway_addr, args.connections, seconds, None, next.clone()).await;
        let (gw, rd) = per_webhook(before, cpu(), g.ok);
        count(&g);
        println!(
            "round {round}: ceiling {:.0}/s, gateway {:.0}/s ({:.2}); CPU per webhook: gateway {gw:.1} µs, Redis {rd:.1} µs",
            c.per_second,
            g.per_second,
            g.per_second / c.per_second
        );
        ceilings.push(c);
        maxima.push(g);
    }
    let ceiling = median(ceilings);
    let max = median(maxima);
    let rate = max.per_second * args.load;
    let cpu_before = cpu();
    let paced = load(
        gateway_addr,
        args.paced_connections,
        seconds,
        Some(rate),
        next.clone(),
    )
    .await;
    let cpu_after = cpu();
    count(&paced);
    // The same paced load on the no-op server: what the load generator and
    // a busy machine add to every latency at this rate, whatever answers.
    let paced_noop = load(
        noop_addr,
        args.paced_connections,
        seconds,
        Some(rate),
        next.clone(),
    )
    .await;

    println!("| server | requests/s | p50 | p99 | 200 | other |");
    println!("|---|---|---|---|---|---|");
    row("no-op axum (ceiling), median round", &ceiling);
    row("hibiki gateway, median round", &max);
    row(
        &format!("gateway at {:.0} % ({rate:.0}/s)", args.load * 100.0),
        &paced,
    );
    row(
        &format!("no-op axum at the same rate ({rate:.0}/s)"),
        &paced_noop,
    );
    println!(
        "\ngateway / ceiling throughput: {:.2}",
        max.per_second / ceiling.per_second
    );
    let (gw, rd) = per_webhook(cpu_before, cpu_after, paced.ok);
    println!(
        "CPU per webhook at {:.0} %: gateway {gw:.1} µs, Redis {rd:.1} µs",
        args.load * 100.0,
    );

    // Exactly one log entry per accepted webhook.
    let redis = Redis::connect_lazy(&RedisConfig {
        url: Secret::new(env["HIBIKI_REDIS_URL"].clone()),
        cluster: false,
        key_prefix: env["HIBIKI_REDIS_PREFIX"].clone(),
        pool_size: 1,
    })
    .expect("a Redis pool");
    let shards: u32 = env["HIBIKI_EVENTLOG_SHARDS"]
        .parse()
        .expect("a shard count");
    let log = EventLog::new(redis, shards, 0, Duration::from_secs(1));
    let entries: u64 = log
        .stats()
        .await
        .expect("the log's stats")
        .iter()
        .map(|s| s.length)
        .sum();
    println!(
        "log check: {sent} webhooks sent to the gateway, {accepted} answered 200, {entries} log entries: {}",
        if entries == accepted {
            "exactly one per accepted event"
        } else {
            "MISMATCH"
        }
    );

    drop(gateway);
    drop(contacts);
    let _ = noop.kill();
    let _ = noop.wait();
}
