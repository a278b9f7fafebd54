//! The gRPC server stack over real gRPC on loopback: token rules, open
//! health and reflection, load shedding at the concurrency limit, and the
//! request timeout. The RPC under the stack is testkit's probe, which makes
//! the check every hibiki handler makes: may this caller act on this tenant?

use std::time::Duration;

use hibiki_proto::common::v1::TenantRef;
use hibiki_runtime::Shutdown;
use hibiki_runtime::auth::Authenticator;
use hibiki_runtime::config::{AuthConfig, Secret, ServerConfig};
use hibiki_runtime::grpc::{self, GrpcRoutes};
use hibiki_testkit::probe::{HOLD, Probe, ProbeClient};
use tonic::{Code, Status};

const SERVICE_TOKEN: &str = "service-token-0123456789";
const ACME_TOKEN: &str = "acme-operator-token-0123";

struct Server {
    url: String,
    probe: Probe,
    shutdown: Shutdown,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn start(concurrency_limit: usize, request_timeout: Duration) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let probe = Probe::new();
    let mut routes = GrpcRoutes::new();
    routes.add(probe.clone());
    let health = tonic_health::server::health_reporter().1;
    let routes = routes.finish(health);
    let config = ServerConfig {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        request_timeout,
        concurrency_limit,
        shutdown_grace: Duration::from_secs(1),
    };
    let authenticator = Authenticator::new(&AuthConfig {
        service_tokens: vec![Secret::new(SERVICE_TOKEN)],
        operator_tokens: vec![("acme".into(), Secret::new(ACME_TOKEN))],
    });
    let shutdown = Shutdown::new();
    let stop = shutdown.wait();
    tokio::spawn(async move {
        grpc::serve(
            listener,
            routes,
            &config,
            authenticator,
            "test",
            grpc::Readiness::now(),
            stop,
        )
        .await
        .expect("the server runs");
    });
    Server {
        url,
        probe,
        shutdown,
    }
}

/// Calls the probe about `tenant`, presenting `token` (none when `None`).
async fn check(url: &str, token: Option<&str>, tenant: &str) -> Result<TenantRef, Status> {
    ProbeClient::new(url, token).check(tenant).await
}

#[tokio::test]
async fn a_call_without_a_token_is_unauthenticated() {
    let server = start(16, Duration::from_secs(5)).await;
    let err = check(&server.url, None, "acme").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
}

#[tokio::test]
async fn a_call_with_an_unknown_token_is_unauthenticated() {
    let server = start(16, Duration::from_secs(5)).await;
    let err = check(&server.url, Some("not-a-token-we-issued"), "acme")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
}

#[tokio::test]
async fn an_operator_may_act_on_its_own_tenant_only() {
    let server = start(16, Duration::from_secs(5)).await;
    let own = check(&server.url, Some(ACME_TOKEN), "acme").await.unwrap();
    assert_eq!(own.tenant_id, "acme");

    let err = check(&server.url, Some(ACME_TOKEN), "globex")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("globex"), "{err}");
}

#[tokio::test]
async fn a_service_token_may_act_on_any_tenant() {
    let server = start(16, Duration::from_secs(5)).await;
    for tenant in ["acme", "globex"] {
        let answer = check(&server.url, Some(SERVICE_TOKEN), tenant)
            .await
            .unwrap();
        assert_eq!(answer.tenant_id, tenant);
    }
}

#[tokio::test]
async fn health_and_reflection_need_no_token() {
    let server = start(16, Duration::from_secs(5)).await;
    let status = grpc::health_status(&server.url, "").await.unwrap();
    assert_eq!(status, tonic_health::ServingStatus::Serving);
    let services = hibiki_testkit::reflected_services(&server.url).await;
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "hibiki.test.v1.Probe"
        ]
    );
}

#[tokio::test]
async fn calls_beyond_the_concurrency_limit_are_shed_at_once() {
    let server = start(1, Duration::from_secs(30)).await;
    let url = server.url.clone();
    let held = tokio::spawn(async move { check(&url, Some(SERVICE_TOKEN), HOLD).await });
    // Wait until the held call occupies the only slot: then every other call
    // is refused without waiting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let shed = loop {
        match check(&server.url, Some(SERVICE_TOKEN), "acme").await {
            Err(e) if e.code() == Code::ResourceExhausted => break e,
            _ if tokio::time::Instant::now() > deadline => panic!("no call was shed"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    assert_eq!(shed.code(), Code::ResourceExhausted);

    server.probe.release(1);
    let released = held.await.unwrap().unwrap();
    assert_eq!(released.tenant_id, HOLD);
    // The slot is free again.
    check(&server.url, Some(SERVICE_TOKEN), "acme")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_channel_queues_calls_beyond_its_own_limit_instead_of_being_shed() {
    // The server takes exactly as many calls at once as a channel sends.
    let server = start(grpc::CLIENT_CONCURRENCY, Duration::from_secs(30)).await;
    let client = ProbeClient::new(&server.url, Some(SERVICE_TOKEN));
    let hold = |client: &ProbeClient| {
        let mut client = client.clone();
        tokio::spawn(async move { client.check(HOLD).await })
    };
    // The channel's worth of calls fills the server.
    let first: Vec<_> = (0..grpc::CLIENT_CONCURRENCY)
        .map(|_| hold(&client))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.probe.held() < grpc::CLIENT_CONCURRENCY {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} held",
            server.probe.held()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // More calls on the same channel: a full server would shed them at once;
    // the channel keeps them until a slot frees.
    let mut more: Vec<_> = (0..20).map(|_| hold(&client)).collect();
    let early = tokio::time::timeout(
        Duration::from_millis(500),
        futures::future::select_all(more.iter_mut()),
    )
    .await;
    if let Ok((answer, _, _)) = early {
        panic!("a call beyond the channel's limit came back before any slot freed: {answer:?}");
    }
    server.probe.release(grpc::CLIENT_CONCURRENCY + 20);
    for call in first.into_iter().chain(more) {
        let answer = call.await.unwrap();
        assert!(answer.is_ok(), "a call was refused: {answer:?}");
    }
}

#[tokio::test]
async fn a_call_running_past_the_timeout_gets_deadline_exceeded() {
    let server = start(16, Duration::from_millis(200)).await;
    let err = check(&server.url, Some(SERVICE_TOKEN), HOLD)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
}
