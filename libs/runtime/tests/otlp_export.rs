//! With `HIBIKI_OTLP_ENDPOINT` set, spans are exported over OTLP/gRPC, and a
//! call through the gRPC stack continues the caller's trace: the server's
//! span is a child of the client's, in the same trace. (Its own test binary:
//! telemetry installs the process-wide subscriber.)

use std::time::Duration;

use hibiki_runtime::auth::Authenticator;
use hibiki_runtime::config::{AuthConfig, LogFormat, Secret, ServerConfig, TelemetryConfig};
use hibiki_runtime::grpc::{self, GrpcRoutes};
use hibiki_runtime::telemetry;
use hibiki_testkit::otlp::Receiver;
use hibiki_testkit::probe::{PATH, Probe, ProbeClient};
use tracing::Instrument;

const TOKEN: &str = "service-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_and_a_call_continues_the_callers_trace() {
    let receiver = Receiver::start().await;
    let guard = telemetry::init(&TelemetryConfig {
        service_name: "hibiki-test".into(),
        log_format: LogFormat::Json,
        log_filter: "info".into(),
        otlp_endpoint: Some(receiver.url().to_owned()),
        sample_ratio: 1.0,
    })
    .expect("telemetry starts");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut routes = GrpcRoutes::new();
    routes.add(Probe::new());
    let routes = routes.finish(tonic_health::server::health_reporter().1);
    let config = ServerConfig {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        request_timeout: Duration::from_secs(5),
        concurrency_limit: 16,
        shutdown_grace: Duration::from_secs(1),
    };
    let authenticator = Authenticator::new(&AuthConfig {
        service_tokens: vec![Secret::new(TOKEN)],
        operator_tokens: vec![],
    });
    tokio::spawn(async move {
        grpc::serve(
            listener,
            routes,
            &config,
            authenticator,
            "test",
            grpc::Readiness::now(),
            std::future::pending(),
        )
        .await
        .unwrap();
    });

    let mut client = ProbeClient::new(&url, Some(TOKEN));
    client
        .check("acme")
        .instrument(tracing::info_span!("test.client"))
        .await
        .expect("the probe answers");

    // Flushes the batch exporter.
    tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .unwrap();

    let spans = receiver.spans();
    let client = spans
        .iter()
        .find(|s| s.name == "test.client")
        .unwrap_or_else(|| panic!("client span not exported: {spans:?}"));
    let server = spans
        .iter()
        .find(|s| s.name == PATH)
        .unwrap_or_else(|| panic!("server span not exported: {spans:?}"));
    assert_eq!(client.service_name, "hibiki-test");
    assert_eq!(
        server.trace_id, client.trace_id,
        "one trace across the call"
    );
    assert_eq!(
        server.parent_span_id, client.span_id,
        "the server span is the client's child"
    );
}
