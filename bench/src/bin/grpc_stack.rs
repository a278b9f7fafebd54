//! What hibiki's gRPC server stack costs per call.
//!
//! Two servers run in this process on loopback, each serving testkit's probe
//! RPC: a bare tonic server (the baseline), and the stack every hibiki
//! service runs (timeout, telemetry span and metrics, bearer-token auth with
//! the tenant check, load shed at the concurrency limit), called through the
//! mesh's client interceptor (token and trace context). The same load runs
//! against each in turn: `--concurrency` callers spread over `--connections`
//! HTTP/2 connections, for `--seconds` after a warm-up. Printed: calls per second,
//! p50 and p99 latency of each, and the stack's throughput as a fraction of
//! the baseline's.

use std::time::{Duration, Instant};

use clap::Parser;
use hibiki_bench::{Latencies, ms};
use hibiki_runtime::auth::Authenticator;
use hibiki_runtime::config::{AuthConfig, LogFormat, Secret, ServerConfig, TelemetryConfig};
use hibiki_runtime::grpc::{self, GrpcRoutes};
use hibiki_runtime::telemetry;
use hibiki_testkit::probe::{Probe, ProbeClient};

const TOKEN: &str = "bench-service-token-0123456789";

/// Measures the per-call cost of hibiki's gRPC server stack.
#[derive(Debug, Parser)]
struct Args {
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the callers spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured seconds per server.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Warm-up seconds per server (not measured).
    #[arg(long, default_value_t = 1)]
    warmup: u64,
}

struct Figures {
    calls_per_second: f64,
    p50: Duration,
    p99: Duration,
}

async fn load(url: &str, token: Option<&str>, args: &Args) -> Figures {
    let clients: Vec<ProbeClient> = (0..args.connections.max(1))
        .map(|_| ProbeClient::new(url, token))
        .collect();
    let run = |seconds: u64| {
        let clients = clients.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let tasks: Vec<_> = (0..args.concurrency)
                .map(|i| {
                    let mut client = clients[i % clients.len()].clone();
                    tokio::spawn(async move {
                        let mut latencies = Latencies::default();
                        while Instant::now() < deadline {
                            let started = Instant::now();
                            client.check("bench").await.expect("the probe answers");
                            latencies.record(started.elapsed());
                        }
                        latencies
                    })
                })
                .collect();
            let mut all = Latencies::default();
            for t in tasks {
                all.merge(t.await.expect("a load task"));
            }
            all
        }
    };
    run(args.warmup).await;
    let mut latencies = run(args.seconds).await;
    Figures {
        calls_per_second: latencies.count() as f64 / args.seconds as f64,
        p50: latencies.quantile(0.50),
        p99: latencies.quantile(0.99),
    }
}

fn routes(probe: Probe) -> tonic::service::Routes {
    let mut routes = GrpcRoutes::new();
    routes.add(probe);
    routes.finish(tonic_health::server::health_reporter().1)
}

async fn baseline_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let routes = routes(Probe::without_authorization());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
            .expect("the baseline server runs");
    });
    url
}

async fn hibiki_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = ServerConfig {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        request_timeout: Duration::from_secs(10),
        concurrency_limit: 1024,
        shutdown_grace: Duration::from_secs(1),
    };
    let authenticator = Authenticator::new(&AuthConfig {
        service_tokens: vec![Secret::new(TOKEN)],
        operator_tokens: vec![],
    });
    let routes = routes(Probe::new());
    tokio::spawn(async move {
        grpc::serve(
            listener,
            routes,
            &config,
            authenticator,
            "bench",
            grpc::Readiness::now(),
            std::future::pending(),
        )
        .await
        .expect("the hibiki server runs");
    });
    url
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // Telemetry as a service runs it, minus export: every call gets a span
    // with trace context; logs at warn so the run is not measuring stderr.
    let _telemetry = telemetry::init(&TelemetryConfig {
        service_name: "hibiki-bench".into(),
        log_format: LogFormat::Pretty,
        log_filter: "warn".into(),
        otlp_endpoint: None,
        sample_ratio: 1.0,
    })
    .expect("telemetry starts");
    hibiki_runtime::metrics::recorder();

    println!(
        "grpc_stack: {} callers over {} HTTP/2 connections, {} s measured per server",
        args.concurrency, args.connections, args.seconds
    );
    let baseline = load(&baseline_server().await, None, &args).await;
    let hibiki = load(&hibiki_server().await, Some(TOKEN), &args).await;
    for (name, f) in [
        ("bare tonic (baseline)", &baseline),
        ("hibiki stack", &hibiki),
    ] {
        println!(
            "  {name:<22} {:>9.0} calls/s   p50 {:>10}   p99 {:>10}",
            f.calls_per_second,
            ms(f.p50),
            ms(f.p99)
        );
    }
    println!(
        "  hibiki stack / baseline throughput: {:.2}",
        hibiki.calls_per_second / baseline.calls_per_second
    );
}
