//! The campaign storm on this machine, everything included: the release
//! `hibiki dev` (all five services and line-sim in one process, as an
//! operator runs it) on a fresh database and Redis key prefix, `hibiki trace
//! collect` receiving its spans, and `hibiki storm` posting `--users` signed
//! postbacks at `--rate` a second through line-sim's webhook generator and
//! checking every friend (tag, campaign menu, one message, the live count).
//! Then `hibiki trace report` of the run.
//!
//! With `--sampling-check`, it measures instead what tracing costs: the
//! storm at a rate above what the mesh takes, `--rounds` times without
//! tracing and `--rounds` times sampling `--sample-ratio` of the taps
//! (exported to the collector), alternating, and prints the sustained rates
//! and their ratio.
//!
//! ```text
//! bash bench/run storm --users 100000 --rate 2000
//! bash bench/run storm --sampling-check --users 20000 --rate 1500
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use hibiki_testkit::{RedisKeys, TestDatabase, free_port, free_port_run, random_id};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The storm of `hibiki storm` against `hibiki dev`, with its trace report.
#[derive(Debug, Parser)]
struct Args {
    /// New friends, one tap each.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Webhooks a second.
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,
    /// Webhooks in flight at most.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// The fraction of taps traced (HIBIKI_TRACE_SAMPLE_RATIO).
    #[arg(long, default_value_t = 0.01)]
    sample_ratio: f64,
    /// Seconds between the autovacuum stand-in's VACUUM (ANALYZE) runs.
    #[arg(long, default_value_t = 60)]
    autovacuum_secs: u64,
    /// Where the collected spans go (kept for `hibiki trace report`).
    #[arg(long, default_value = "target/storm.spans")]
    spans: PathBuf,
    /// Measure tracing's cost instead: throughput without tracing against
    /// throughput at --sample-ratio.
    #[arg(long)]
    sampling_check: bool,
    /// Runs of each kind in --sampling-check.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

/// A run's figures, read from `hibiki storm`'s summary.
struct Run {
    /// Rich menus linked a second between the 10th and 90th percentile.
    linked_per_sec: f64,
    summary: String,
}

fn release(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name)
}

fn hibiki() -> Command {
    let mut cmd = Command::new(release("hibiki"));
    cmd.kill_on_drop(true);
    cmd
}

async fn terminate(child: &mut Child, what: &str) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        other => eprintln!("{what} did not stop cleanly: {other:?}"),
    }
}

/// Waits until `child` prints a line containing `marker`; panics with what
/// it printed if it exits first.
async fn wait_for_line(child: &mut Child, marker: &str) {
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut seen = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        let done = line.contains(marker);
        seen.push(line);
        if done {
            // Keep draining so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return;
        }
    }
    panic!("never printed {marker:?}:\n{}", seen.join("\n"));
}

/// One storm on a fresh mesh. `trace` is the sample ratio and the spans
/// file, or `None` for a mesh that exports nothing.
async fn storm(args: &Args, trace: Option<(f64, &Path)>) -> Run {
    let database = TestDatabase::reserve();
    let prefix = format!("test-{}", random_id());
    let _keys = RedisKeys::new("redis://127.0.0.1:6379", &prefix);
    let grpc = free_port_run(6);
    let metrics = free_port_run(6);
    let http = free_port();
    let dashboard = free_port();
    let sim = free_port_run(2);

    let mut collector = None;
    let mut dev = hibiki();
    dev.args(["dev", "--grpc-port", &grpc.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .args(["--http-port", &http.to_string()])
        .args(["--dashboard-port", &dashboard.to_string()])
        .args(["--line-sim-port", &sim.to_string()])
        .env("HIBIKI_DATABASE_URL", database.url())
        .env("HIBIKI_REDIS_PREFIX", &prefix)
        .env("HIBIKI_LOG", "error")
        .stdout(Stdio::piped());
    if let Some((ratio, file)) = trace {
        let otlp = free_port();
        let mut c = hibiki()
            .args(["trace", "collect", "--listen", &format!("127.0.0.1:{otlp}")])
            .arg("--out")
            .arg(file)
            .stdout(Stdio::piped())
            .spawn()
            .expect("hibiki trace collect starts");
        wait_for_line(&mut c, "OTLP/gRPC on").await;
        collector = Some(c);
        dev.env("HIBIKI_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp}"))
            .env("HIBIKI_TRACE_SAMPLE_RATIO", ratio.to_string())
            // A storm's spans outrun the default 2,048-span export queue.
            .env("OTEL_BSP_MAX_QUEUE_SIZE", "262144")
            .env("OTEL_BSP_SCHEDULE_DELAY", "1000");
    }
    let mut dev = dev.spawn().expect("hibiki dev starts");
    wait_for_line(&mut dev, "hibiki dev: ready").await;
    // This machine's PostgreSQL runs without autovacuum; do its work at its
    // pace (by default once a minute, autovacuum's default naptime).
    let vacuum = hibiki_bench::autovacuum(
        database.url(),
        Duration::from_secs(args.autovacuum_secs.max(1)),
    );

    let out = hibiki()
        .args(["storm", "--users", &args.users.to_string()])
        .args(["--rate", &args.rate.to_string()])
        .args(["--connections", &args.connections.to_string()])
        .args(["--gateway", &format!("http://127.0.0.1:{http}")])
        .args(["--line-sim-admin", &format!("http://127.0.0.1:{}", sim + 1)])
        .args(["--contacts", &format!("http://127.0.0.1:{}", grpc + 1)])
        .args(["--analytics", &format!("http://127.0.0.1:{}", grpc + 4)])
        .args(["--stall-secs", "60"])
        .stderr(Stdio::inherit())
        .output()
        .await
        .expect("hibiki storm runs");
    vacuum.abort();
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    terminate(&mut dev, "hibiki dev").await;
    if let Some(mut c) = collector {
        terminate(&mut c, "hibiki trace collect").await;
    }
    assert!(out.status.success(), "hibiki storm failed:\n{summary}");
    let linked_per_sec = summary
        .lines()
        .find(|l| l.starts_with("rich menus:"))
        .and_then(|l| l.split_once(" linked ("))
        .and_then(|(_, rest)| rest.split_once("/s"))
        .and_then(|(rate, _)| rate.trim().parse().ok())
        .unwrap_or_else(|| panic!("no linking rate in hibiki storm's summary:\n{summary}"));
    Run {
        linked_per_sec,
        summary,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.sampling_check {
        let mut off = Vec::new();
        let mut on = Vec::new();
        let spans = args.spans.with_extension("check.spans");
        for round in 1..=args.rounds {
            let run = storm(&args, None).await;
            println!(
                "round {round}, tracing off: {:.0} taps/s linked",
                run.linked_per_sec
            );
            off.push(run.linked_per_sec);
            let run = storm(&args, Some((args.sample_ratio, &spans))).await;
            println!(
                "round {round}, {} % of taps traced: {:.0} taps/s linked",
                args.sample_ratio * 100.0,
                run.linked_per_sec
            );
            on.push(run.linked_per_sec);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (off, on) = (mean(&off), mean(&on));
        println!(
            "\nsustained: {off:.0} taps/s without tracing, {on:.0} taps/s with {} % traced: \
             ratio {:.3} ({:+.1} %)",
            args.sample_ratio * 100.0,
            on / off,
            (on / off - 1.0) * 100.0
        );
        let _ = std::fs::remove_file(&spans);
        return;
    }

    let run = storm(&args, Some((args.sample_ratio, &args.spans))).await;
    println!("{}", run.summary);
    println!(
        "== hibiki trace report --root webhook {} ({} % of taps traced)",
        args.spans.display(),
        args.sample_ratio * 100.0
    );
    let report = hibiki()
        .args(["trace", "report", "--root", "webhook"])
        .arg(&args.spans)
        .stderr(Stdio::inherit())
        .output()
        .await
        .expect("hibiki trace report runs");
    print!("{}", String::from_utf8_lossy(&report.stdout));
}
