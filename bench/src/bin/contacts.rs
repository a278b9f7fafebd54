//! contacts under a bulk sync and a campaign storm.
//!
//! Runs the release `hibiki-contacts` binary against a fresh database on the
//! local PostgreSQL and Redis, with a tenant holding 10 segments over the
//! imported tags and attributes, then measures:
//!
//! 1. **import**: `--rows` synthetic contacts (3 attributes, 1 tag) end to
//!    end through `hibiki import`, against a raw `psql \copy` of the same
//!    rows into a table shaped like contacts (same keys, same GIN index),
//!    run first; prints both rows/s and the ratio (target ≥ 0.5);
//! 2. **apply, saturated**: `ApplyEvents` batches of follow events of
//!    distinct new users, each moving its user into a segment that already
//!    has about a tenth of the imported contacts (100,000 at the default
//!    size), as fast as `--callers` callers can go: events/s and p50/p99 per
//!    batch (target ≥ 5,000 events/s);
//! 3. **apply at the storm rate, idle and during an import**: the same
//!    batches offered at a fixed `--rate` (default 2,000 events/s, above the
//!    product's storm of 100,000 taps a minute), first alone, then while a
//!    second file of the same size is imported (the same contacts, every one
//!    with changed attributes, so every row is an update and many contacts
//!    change segments); p99 during the import against the idle p99 (target
//!    within 2×). Latency is measured
//!    from each batch's scheduled start, so a stall that delays later
//!    batches counts against them too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hibiki_bench::{Latencies, ms};
use hibiki_proto::common::v1::inbound_event::Payload;
use hibiki_proto::common::v1::{FollowEvent, InboundEvent, Source, SourceType, Value, value::Kind};
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{
    ApplyEventsRequest, AttributeCondition, Comparison, CreateSegmentRequest, CreateTenantRequest,
    FollowState, GetSegmentCountsRequest, HasTag, RuleList, SegmentRule, segment_rule::Node,
};
use hibiki_testkit::{
    SERVICE_TOKEN, ServiceProcess, TestDatabase, authorized, random_id, service_env,
};

const TENANT: &str = "bench";
const TAGS: usize = 10;
const CITIES: [&str; 5] = ["tokyo", "osaka", "nagoya", "fukuoka", "sapporo"];

/// Measures contacts' bulk import and ApplyEvents, alone and together.
#[derive(Debug, Clone, Parser)]
struct Args {
    /// Contacts in the synthetic file.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Events per ApplyEvents call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent ApplyEvents callers.
    #[arg(long, default_value_t = 4)]
    callers: usize,
    /// Seconds of each idle ApplyEvents phase.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Offered events per second of the storm-rate phases.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
}

fn user(prefix: char, n: u64) -> String {
    format!("U{prefix}{n:031x}")
}

/// The synthetic sync file; `shift` moves every row's attributes (so a
/// second file with another shift updates every contact and moves many of
/// them between segments).
fn write_csv(path: &Path, rows: u64, shift: u64) -> std::io::Result<u64> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    writeln!(
        out,
        "line_user_id,display_name,tags,age:number,city,vip:bool"
    )?;
    for n in 0..rows {
        writeln!(
            out,
            "{},customer {n},tag{},{},{},{}",
            user('0', n),
            n % TAGS as u64,
            (n + shift) % 80,
            CITIES[((n + shift) % 5) as usize],
            (n + shift).is_multiple_of(7)
        )?;
    }
    out.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

fn num(n: f64) -> Option<Value> {
    Some(Value {
        kind: Some(Kind::NumberValue(n)),
    })
}

fn str_value(s: &str) -> Option<Value> {
    Some(Value {
        kind: Some(Kind::StringValue(s.into())),
    })
}

fn attr(key: &str, op: Comparison, value: Option<Value>) -> SegmentRule {
    SegmentRule {
        node: Some(Node::Attribute(AttributeCondition {
            key: key.into(),
            op: op as i32,
            value,
            values: vec![],
        })),
    }
}

fn tag(t: &str) -> SegmentRule {
    SegmentRule {
        node: Some(Node::HasTag(HasTag { tag: t.into() })),
    }
}

fn all(rules: Vec<SegmentRule>) -> SegmentRule {
    SegmentRule {
        node: Some(Node::All(RuleList { rules })),
    }
}

fn any(rules: Vec<SegmentRule>) -> SegmentRule {
    SegmentRule {
        node: Some(Node::Any(RuleList { rules })),
    }
}

/// The tenant's 10 segments; the first is the one the follow events enter.
fn segments() -> Vec<(&'static str, SegmentRule)> {
    let following = SegmentRule {
        node: Some(Node::FollowState(FollowState::Following as i32)),
    };
    vec![
        (
            "campaign (tag0 or following)",
            any(vec![tag("tag0"), following]),
        ),
        ("tag1", tag("tag1")),
        (
            "tag2 adults",
            all(vec![tag("tag2"), attr("age", Comparison::Ge, num(20.0))]),
        ),
        ("adults", attr("age", Comparison::Ge, num(20.0))),
        ("under 30", attr("age", Comparison::Lt, num(30.0))),
        ("tokyo", attr("city", Comparison::Eq, str_value("tokyo"))),
        (
            "not osaka",
            attr("city", Comparison::Ne, str_value("osaka")),
        ),
        (
            "vip",
            attr(
                "vip",
                Comparison::Eq,
                Some(Value {
                    kind: Some(Kind::BoolValue(true)),
                }),
            ),
        ),
        ("kyo", attr("city", Comparison::Contains, str_value("kyo"))),
        ("tag3 or tag4", any(vec![tag("tag3"), tag("tag4")])),
    ]
}

/// The baseline: the same rows, already in contacts' own shape, loaded with
/// `psql \copy` into a table like `contacts.contacts` (same primary key,
/// same GIN index on tags). That is what storing the rows costs at all.
async fn raw_copy(database: &TestDatabase, rows: u64) -> f64 {
    let native = std::env::temp_dir().join(format!("hibiki-bench-{}.tsv", random_id()));
    {
        let mut out =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&native).unwrap());
        for n in 0..rows {
            writeln!(
                out,
                "{TENANT}\t{}\tcustomer {n}\t{{tag{}}}\t{{\"age\": {}, \"city\": \"{}\", \"vip\": {}}}",
                user('0', n),
                n % TAGS as u64,
                n % 80,
                CITIES[(n % 5) as usize],
                n % 7 == 0
            )
            .unwrap();
        }
        out.flush().unwrap();
    }
    let table = format!("raw_copy_{}", random_id());
    let psql = |sql: String| {
        let url = database.url().to_owned();
        async move {
            let status = tokio::process::Command::new("psql")
                .args([url.as_str(), "-q", "-v", "ON_ERROR_STOP=1", "-c", &sql])
                .status()
                .await
                .expect("psql runs");
            assert!(status.success(), "psql failed: {sql}");
        }
    };
    psql(format!(
        "CREATE TABLE public.{table} (LIKE contacts.contacts INCLUDING ALL)"
    ))
    .await;
    let started = Instant::now();
    psql(format!(
        "\\copy public.{table} (tenant_id, line_user_id, display_name, tags, attributes) FROM '{}'",
        native.display()
    ))
    .await;
    let elapsed = started.elapsed();
    psql(format!("DROP TABLE public.{table}")).await;
    let _ = std::fs::remove_file(&native);
    elapsed.as_secs_f64()
}

async fn hibiki_import(hibiki: &Path, csv: &Path, url: &str, import_id: &str) -> f64 {
    let started = Instant::now();
    let output = tokio::process::Command::new(hibiki)
        .args([
            "import",
            csv.to_str().unwrap(),
            "--tenant",
            TENANT,
            "--quiet",
        ])
        .args([
            "--contacts",
            url,
            "--token",
            SERVICE_TOKEN,
            "--import-id",
            import_id,
        ])
        .stdout(Stdio::piped())
        .output()
        .await
        .expect("hibiki import runs");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "hibiki import failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    elapsed
}

/// Runs ApplyEvents load until `stop`, as fast as the callers go or, with
/// `rate`, at that many events per second; returns per-batch latencies and
/// events.
async fn apply_load(
    url: &str,
    args: &Args,
    rate: Option<u64>,
    next_user: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> (Latencies, u64) {
    let tasks: Vec<_> = (0..args.callers)
        .map(|caller| {
            let mut client = ContactServiceClient::new(authorized(url, SERVICE_TOKEN));
            let next_user = next_user.clone();
            let stop = stop.clone();
            let batch = args.batch;
            // Each caller's share of the rate, as one batch per period, the
            // callers' periods staggered so that batches arrive evenly.
            let mut schedule = rate.map(|r| {
                let period = Duration::from_secs_f64((args.callers * batch) as f64 / r as f64);
                let offset = period.mul_f64(caller as f64 / args.callers as f64);
                tokio::time::interval_at(tokio::time::Instant::now() + offset, period)
            });
            tokio::spawn(async move {
                let mut latencies = Latencies::default();
                let mut events = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let due = match schedule.as_mut() {
                        Some(s) => s.tick().await.into_std(),
                        None => Instant::now(),
                    };
                    let first = next_user.fetch_add(batch as u64, Ordering::Relaxed);
                    let batch: Vec<InboundEvent> = (first..first + batch as u64)
                        .map(|n| InboundEvent {
                            tenant_id: TENANT.into(),
                            channel_id: "1000000001".into(),
                            webhook_event_id: format!("ev{n}"),
                            r#type: "follow".into(),
                            timestamp_ms: 1_800_000_000_000,
                            source: Some(Source {
                                r#type: SourceType::User as i32,
                                user_id: user('f', n),
                                ..Default::default()
                            }),
                            payload: Some(Payload::Follow(FollowEvent {
                                is_unblocked: false,
                            })),
                            ..Default::default()
                        })
                        .collect();
                    let n = batch.len() as u64;
                    client
                        .apply_events(ApplyEventsRequest {
                            tenant_id: TENANT.into(),
                            events: batch,
                        })
                        .await
                        .expect("ApplyEvents succeeds");
                    latencies.record(due.elapsed());
                    events += n;
                }
                (latencies, events)
            })
        })
        .collect();
    let mut all = Latencies::default();
    let mut events = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.merge(l);
        events += e;
    }
    (all, events)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let release = root.join("target/release");
    let database = TestDatabase::create().await;
    let mut env = service_env(&database, None);
    // HIBIKI_BENCH_LOG (e.g. `warn,sqlx::query=debug`) shows the service's
    // statements and their times.
    let log = std::env::var("HIBIKI_BENCH_LOG").unwrap_or_else(|_| "error".into());
    env.insert("HIBIKI_LOG".into(), log);
    // HIBIKI_IMPORT_* settings given to the bench reach the service.
    for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("HIBIKI_IMPORT_")) {
        env.insert(k, v);
    }
    let contacts = ServiceProcess::spawn(&release.join("hibiki-contacts"), env);
    hibiki_testkit::wait_for_health(&contacts.url, tonic_health::ServingStatus::Serving).await;
    let url = contacts.url.clone();

    TenantServiceClient::new(authorized(&url, SERVICE_TOKEN))
        .create_tenant(CreateTenantRequest {
            tenant_id: TENANT.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut segment_client = SegmentServiceClient::new(authorized(&url, SERVICE_TOKEN));
    let mut campaign = String::new();
    for (name, rule) in segments() {
        let s = segment_client
            .create_segment(CreateSegmentRequest {
                tenant_id: TENANT.into(),
                name: name.into(),
                description: String::new(),
                rule: Some(rule),
            })
            .await
            .unwrap()
            .into_inner();
        if campaign.is_empty() {
            campaign = s.segment_id;
        }
    }

    let csv = std::env::temp_dir().join(format!("hibiki-bench-{}.csv", random_id()));
    let bytes = write_csv(&csv, args.rows, 0).expect("writing the CSV");
    let changes = std::env::temp_dir().join(format!("hibiki-bench-{}.csv", random_id()));
    write_csv(&changes, args.rows, 1).expect("writing the second CSV");
    println!(
        "contacts: {} rows ({:.1} MB), 10 segments",
        args.rows,
        bytes as f64 / 1e6
    );

    // 1. Import against raw \copy.
    let raw = raw_copy(&database, args.rows).await;
    let hibiki = hibiki_import(&release.join("hibiki"), &csv, &url, "bench-1").await;
    let (raw_rate, hibiki_rate) = (args.rows as f64 / raw, args.rows as f64 / hibiki);
    println!("  import     psql \\copy (baseline)  {raw_rate:>9.0} rows/s   ({raw:.1} s)");
    println!("  import     hibiki import         {hibiki_rate:>9.0} rows/s   ({hibiki:.1} s)");
    println!(
        "  import     hibiki / \\copy        {:.2}",
        hibiki_rate / raw_rate
    );
    let members = segment_client
        .get_segment_counts(GetSegmentCountsRequest {
            tenant_id: TENANT.into(),
            segment_ids: vec![campaign.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .counts[0]
        .member_count;
    println!("  campaign segment before the storm: {members} members");
    // Settle what the import left for autovacuum (statistics, visibility
    // map) and checkpoint, so that the idle phases measure ApplyEvents, not
    // background maintenance of the import.
    let settle = tokio::process::Command::new("psql")
        .args([database.url(), "-q", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-c",
            "VACUUM (ANALYZE) contacts.contacts",
            "-c",
            "CHECKPOINT",
        ])
        .status()
        .await
        .expect("psql runs");
    assert!(settle.success(), "VACUUM / CHECKPOINT failed");

    // 2. ApplyEvents, saturated.
    let next_user = Arc::new(AtomicU64::new(0));
    let run = |rate: Option<u64>, stop: Arc<AtomicBool>| {
        let (url, next_user, args) = (url.clone(), next_user.clone(), args.clone());
        tokio::spawn(async move { apply_load(&url, &args, rate, next_user, stop).await })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = run(None, stop.clone());
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut saturated, saturated_events) = load.await.unwrap();
    println!(
        "  apply      saturated             {:>9.0} events/s   batch p50 {}   p99 {}",
        saturated_events as f64 / args.seconds as f64,
        ms(saturated.quantile(0.5)),
        ms(saturated.quantile(0.99))
    );

    // 3. ApplyEvents at the storm rate, alone and while the second file is
    // imported.
    let stop = Arc::new(AtomicBool::new(false));
    let load = run(Some(args.rate), stop.clone());
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut idle, idle_events) = load.await.unwrap();
    let idle_p99 = idle.quantile(0.99);
    println!(
        "  apply      {:>5}/s idle          {:>9.0} events/s   batch p50 {}   p99 {}",
        args.rate,
        idle_events as f64 / args.seconds as f64,
        ms(idle.quantile(0.5)),
        ms(idle_p99)
    );
    let stop = Arc::new(AtomicBool::new(false));
    let load = run(Some(args.rate), stop.clone());
    let started = Instant::now();
    let during_import = hibiki_import(&release.join("hibiki"), &changes, &url, "bench-2").await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let (mut busy, busy_events) = load.await.unwrap();
    let busy_p99 = busy.quantile(0.99);
    println!(
        "  apply      {:>5}/s during import {:>9.0} events/s   batch p50 {}   p99 {}   (import {:.0} rows/s)",
        args.rate,
        busy_events as f64 / elapsed,
        ms(busy.quantile(0.5)),
        ms(busy_p99),
        args.rows as f64 / during_import
    );
    println!(
        "  apply      p99 during import / idle p99: {:.2}",
        busy_p99.as_secs_f64() / idle_p99.as_secs_f64()
    );
    let _ = std::fs::remove_file(&csv);
    let _ = std::fs::remove_file(&changes);
    drop(contacts);
}
