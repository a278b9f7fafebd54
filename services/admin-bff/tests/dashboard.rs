//! admin-bff against the real contacts, scenario and analytics (in this
//! process, over real gRPC on loopback) and the real PostgreSQL and Redis:
//! sign-in answers, the overview of one tenant only, and a head count that
//! changes in contacts arriving on the Server-Sent-Events stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hibiki_proto::common::v1::ContactRef;
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{
    AddTagsRequest, CreateSegmentRequest, CreateTenantRequest, HasTag, SegmentRule,
    segment_rule::Node,
};
use hibiki_runtime::Shutdown;
use hibiki_testkit::{
    SERVICE_TOKEN, TestDatabase, authorized, free_port, lifecycle, operator_token, service_env,
    wait_for_health,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic_health::ServingStatus;

struct Mesh {
    _database: TestDatabase,
    contacts: String,
    dashboard: SocketAddr,
    segment: String,
    stops: Vec<Shutdown>,
    /// analytics' settings (a fixed port) and how to stop it, so that a test
    /// can restart it where the BFF expects it.
    analytics_env: HashMap<String, String>,
    analytics: Option<(
        Shutdown,
        tokio::task::JoinHandle<Result<(), hibiki_runtime::HostError>>,
    )>,
}

impl Mesh {
    /// Stops analytics (as a rolling restart would) and starts it again on
    /// the same port.
    async fn restart_analytics(&mut self) {
        let (stop, task) = self.analytics.take().expect("analytics runs");
        stop.trigger();
        task.await.expect("no panic").expect("a clean stop");
        let (url, stop, task) =
            lifecycle::start::<hibiki_analytics::Application>(&self.analytics_env).await;
        wait_for_health(&url, ServingStatus::Serving).await;
        self.analytics = Some((stop, task));
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for s in &self.stops {
            s.trigger();
        }
        if let Some((stop, _)) = &self.analytics {
            stop.trigger();
        }
    }
}

async fn mesh() -> Mesh {
    let database = TestDatabase::create().await;
    let env = service_env(&database, None);
    let mut stops = Vec::new();
    let (contacts, stop, _t) = lifecycle::start::<hibiki_contacts::Application>(&env).await;
    stops.push(stop);
    wait_for_health(&contacts, ServingStatus::Serving).await;
    let with = |pairs: &[(&str, &str)]| {
        let mut e: HashMap<String, String> = env.clone();
        for (k, v) in pairs {
            e.insert((*k).into(), (*v).into());
        }
        e
    };
    let (scenario, stop, _t) = lifecycle::start::<hibiki_scenario::Application>(&with(&[(
        "HIBIKI_CONTACTS_URL",
        &contacts,
    )]))
    .await;
    stops.push(stop);
    let analytics_env = with(&[
        ("HIBIKI_SCENARIO_URL", &scenario),
        ("HIBIKI_GRPC_ADDR", &format!("127.0.0.1:{}", free_port())),
    ]);
    let (analytics, analytics_stop, analytics_task) =
        lifecycle::start::<hibiki_analytics::Application>(&analytics_env).await;
    wait_for_health(&analytics, ServingStatus::Serving).await;
    let dashboard = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (bff, stop, _t) = lifecycle::start::<hibiki_admin_bff::Application>(&with(&[
        ("HIBIKI_HTTP_ADDR", &dashboard.to_string()),
        ("HIBIKI_ANALYTICS_URL", &analytics),
        ("HIBIKI_CONTACTS_URL", &contacts),
        ("HIBIKI_SCENARIO_URL", &scenario),
    ]))
    .await;
    stops.push(stop);
    wait_for_health(&bff, ServingStatus::Serving).await;

    let mut tenants = TenantServiceClient::new(authorized(&contacts, SERVICE_TOKEN));
    for tenant in ["acme", "globex"] {
        tenants
            .create_tenant(CreateTenantRequest {
                tenant_id: tenant.into(),
                display_name: tenant.into(),
                time_zone: "Asia/Tokyo".into(),
            })
            .await
            .unwrap();
    }
    let segment = SegmentServiceClient::new(authorized(&contacts, SERVICE_TOKEN))
        .create_segment(CreateSegmentRequest {
            tenant_id: "acme".into(),
            name: "vip friends".into(),
            description: String::new(),
            rule: Some(SegmentRule {
                node: Some(Node::HasTag(HasTag { tag: "vip".into() })),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .segment_id;
    Mesh {
        _database: database,
        contacts,
        dashboard,
        segment,
        stops,
        analytics_env,
        analytics: Some((analytics_stop, analytics_task)),
    }
}

/// Opens `/api/stream` with `cookie`; returns its lines after the status.
async fn open_stream(
    mesh: &Mesh,
    cookie: &str,
) -> tokio::io::Lines<BufReader<tokio::net::TcpStream>> {
    let mut stream = tokio::net::TcpStream::connect(mesh.dashboard)
        .await
        .unwrap();
    stream
        .write_all(
            format!(
                "GET /api/stream HTTP/1.1\r\nhost: {}\r\ncookie: {cookie}\r\naccept: text/event-stream\r\n\r\n",
                mesh.dashboard
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut lines = BufReader::new(stream).lines();
    let status = lines.next_line().await.unwrap().unwrap();
    assert!(status.contains(" 200 "), "{status}");
    lines
}

/// Tags friend `n` of acme `vip` through contacts.
async fn tag_vip(mesh: &Mesh, n: u64) {
    ContactServiceClient::new(authorized(&mesh.contacts, &operator_token("acme")))
        .add_tags(AddTagsRequest {
            contact: Some(ContactRef {
                tenant_id: "acme".into(),
                line_user_id: format!("U{n:032x}"),
            }),
            tags: vec!["vip".into()],
            idempotency_key: format!("dashboard-test-{n}"),
        })
        .await
        .unwrap();
}

/// Reads the stream until a count of `want` for `segment`; panics after 20 s.
async fn until_count(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
    segment: &str,
    want: i64,
) {
    let needle = format!("\"member_count\":{want}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no count of {want} on the stream within 20 s"))
            .unwrap()
            .expect("the stream stays open");
        if line.starts_with("data:") && line.contains(&needle) && line.contains(segment) {
            return;
        }
    }
}

/// One HTTP/1.1 request on its own connection: (status, headers, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response)
        .await
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

async fn sign_in(mesh: &Mesh, tenant: &str, token: &str) -> (u16, String, String) {
    let body = serde_json::json!({ "tenant": tenant, "token": token }).to_string();
    http(
        mesh.dashboard,
        "POST",
        "/api/session",
        &[("content-type", "application/json")],
        &body,
    )
    .await
}

fn cookie_of(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned()
}

#[tokio::test]
async fn operators_see_their_tenant_only_and_counts_arrive_live() {
    let mesh = mesh().await;

    // The page and its assets are served.
    let (status, _, page) = http(mesh.dashboard, "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(page.contains("/app.js"), "{page}");
    let (status, head, _) = http(mesh.dashboard, "GET", "/app.js", &[], "").await;
    assert_eq!(status, 200);
    assert!(head.contains("text/javascript"), "{head}");

    // Sign-in: malformed, unknown token, another tenant's token, then right.
    let (status, _, body) = http(mesh.dashboard, "POST", "/api/session", &[], "{nope").await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = sign_in(&mesh, "acme", "not-a-token-of-this-mesh").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unknown token"), "{body}");
    let (status, _, body) = sign_in(&mesh, "acme", &operator_token("globex")).await;
    assert_eq!(status, 403, "{body}");
    let (status, head, _) = sign_in(&mesh, "acme", &operator_token("acme")).await;
    assert_eq!(status, 204, "{head}");
    assert!(head.to_lowercase().contains("httponly"), "{head}");
    let cookie = cookie_of(&head);

    // No session, no data; a made-up session neither.
    let (status, _, _) = http(mesh.dashboard, "GET", "/api/overview", &[], "").await;
    assert_eq!(status, 401);
    let (status, _, _) = http(
        mesh.dashboard,
        "GET",
        "/api/overview",
        &[("cookie", "hibiki_session=0123")],
        "",
    )
    .await;
    assert_eq!(status, 401);
    // A bearer token of another tenant is refused by the services behind.
    let bearer = format!("Bearer {}", operator_token("globex"));
    let (status, _, _) = http(
        mesh.dashboard,
        "GET",
        "/api/overview?tenant=acme",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(status, 403);

    // The overview names acme's segment.
    let (status, _, body) = http(
        mesh.dashboard,
        "GET",
        "/api/overview",
        &[("cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["tenant"], "acme");
    let segments = view["segments"].as_array().unwrap();
    assert_eq!(segments.len(), 1, "{view}");
    assert_eq!(segments[0]["name"], "vip friends");
    assert_eq!(segments[0]["id"], mesh.segment.as_str());

    // The stream: a friend tagged vip in contacts shows up as a count of 1.
    let mut lines = open_stream(&mesh, &cookie).await;
    tag_vip(&mesh, 7).await;
    until_count(&mut lines, &mesh.segment, 1).await;

    // Signing out drops the browser's cookie.
    let (status, head, _) = http(
        mesh.dashboard,
        "DELETE",
        "/api/session",
        &[("cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(status, 204);
    assert!(
        head.contains("set-cookie: hibiki_session=;") && head.contains("Max-Age=0"),
        "{head}"
    );

    // A session cookie whose tenant was changed opens nothing.
    let value = cookie.trim_start_matches("hibiki_session=");
    let (_, signature) = value.split_once('.').unwrap();
    let forged = format!(
        "hibiki_session={}.{signature}",
        base64_url(r#"{"t":"globex","k":"x","e":9999999999}"#)
    );
    let (status, _, _) = http(
        mesh.dashboard,
        "GET",
        "/api/overview",
        &[("cookie", &forged)],
        "",
    )
    .await;
    assert_eq!(status, 401);
}

fn base64_url(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[tokio::test]
async fn the_stream_goes_on_across_a_restart_of_analytics() {
    let mut mesh = mesh().await;
    let (status, head, _) = sign_in(&mesh, "acme", &operator_token("acme")).await;
    assert_eq!(status, 204, "{head}");
    let cookie = cookie_of(&head);
    let mut lines = open_stream(&mesh, &cookie).await;
    tag_vip(&mesh, 1).await;
    until_count(&mut lines, &mesh.segment, 1).await;

    // analytics goes away and comes back: the page's stream stays open, and
    // the BFF follows the new analytics.
    mesh.restart_analytics().await;
    tag_vip(&mesh, 2).await;
    until_count(&mut lines, &mesh.segment, 2).await;
}
