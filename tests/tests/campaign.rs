//! The campaign chain end to end: the mesh `hibiki dev` runs (gateway,
//! contacts, scenario, delivery, analytics, in this process, over real gRPC
//! on loopback) with line-sim as LINE, against the real PostgreSQL and
//! Redis. A thousand friends tap the spring campaign's postback, some of
//! them twice (LINE's redeliveries): each is tagged once, the segment counts
//! exactly a thousand in contacts and in analytics, a watcher sees the count
//! rise to it, each friend has the campaign menu in line-sim and got one
//! thank-you. Then the same with the scenario executor killed mid-storm and
//! started again.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hibiki_line::signature::{SIGNATURE_HEADER, sign};
use hibiki_line_sim::storm::{EventKind, StormSpec, destination, event};
use hibiki_line_sim::{LineSim, SimChannel, SimConfig};
use hibiki_proto::analytics::v1::WatchSegmentCountsRequest;
use hibiki_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use hibiki_proto::common::v1::ContactRef;
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::segment_rule::Node;
use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{
    CreateSegmentRequest, CreateTenantRequest, GetContactRequest, HasTag, PutChannelRequest,
    SegmentRule,
};
use hibiki_proto::scenario::v1::scenario_service_client::ScenarioServiceClient;
use hibiki_proto::scenario::v1::{ApplyRequest, ListRunsRequest, apply_request};
use hibiki_runtime::Shutdown;
use hibiki_runtime::app::Service;
use hibiki_testkit::{
    HttpConnection, RedisKeys, SERVICE_TOKEN, TestDatabase, authorized, free_port, lifecycle,
    service_env, wait_for_health,
};
use tonic_health::ServingStatus;

const TENANT: &str = "acme";
const CHANNEL: &str = "1000000001";
const SECRET: &str = "spring-secret";
const TOKEN: &str = "spring-token";
const USERS: u64 = 1_000;
const TAG: &str = "campaign:spring";

fn user(n: u64) -> String {
    format!("U{n:032x}")
}

/// A service in a runtime of its own, so the test can kill it the way a
/// crash would: every task stops where it stands, nothing is drained,
/// acknowledged or released.
struct Killable {
    runtime: Option<tokio::runtime::Runtime>,
    url: String,
}

impl Killable {
    fn start<S: Service>(env: HashMap<String, String>) -> Self {
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime");
            let (url, _stop, _task) = runtime.block_on(lifecycle::start::<S>(&env));
            Self {
                runtime: Some(runtime),
                url,
            }
        })
        .join()
        .expect("the service starts")
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Mesh {
    _database: TestDatabase,
    _keys: RedisKeys,
    env: HashMap<String, String>,
    sim: LineSim,
    menu: String,
    contacts: String,
    analytics: String,
    scenario: Killable,
    webhooks: SocketAddr,
    segment: String,
    stops: Vec<Shutdown>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for s in &self.stops {
            s.trigger();
        }
    }
}

async fn mesh() -> Mesh {
    let database = TestDatabase::create().await;
    let mut env = service_env(&database, None);
    let keys = RedisKeys::new(&env["HIBIKI_REDIS_URL"], &env["HIBIKI_REDIS_PREFIX"]);
    // A killed executor's runs are taken up within 2 s.
    env.insert("HIBIKI_SCENARIO_LEASE_MS".into(), "2000".into());
    let loopback = "127.0.0.1:0".parse().unwrap();
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
    let menu = sim
        .sim()
        .create_rich_menu(CHANNEL, "Spring campaign menu", Some("campaign"));

    let (contacts, stop_contacts, _t) =
        lifecycle::start::<hibiki_contacts::Application>(&env).await;
    wait_for_health(&contacts, ServingStatus::Serving).await;
    let mut tenants = TenantServiceClient::new(authorized(&contacts, SERVICE_TOKEN));
    tenants
        .create_tenant(CreateTenantRequest {
            tenant_id: TENANT.into(),
            display_name: "Acme".into(),
            time_zone: "Asia/Tokyo".into(),
        })
        .await
        .unwrap();
    tenants
        .put_channel(PutChannelRequest {
            tenant_id: TENANT.into(),
            channel_id: CHANNEL.into(),
            channel_secret: SECRET.into(),
            access_token: TOKEN.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let segment = SegmentServiceClient::new(authorized(&contacts, SERVICE_TOKEN))
        .create_segment(CreateSegmentRequest {
            tenant_id: TENANT.into(),
            name: "spring campaign".into(),
            description: String::new(),
            rule: Some(SegmentRule {
                node: Some(Node::HasTag(HasTag { tag: TAG.into() })),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .segment_id;

    env.insert("HIBIKI_CONTACTS_URL".into(), contacts.clone());
    env.insert("HIBIKI_LINE_API_URL".into(), sim.api_url());
    let (delivery, stop_delivery, _t) =
        lifecycle::start::<hibiki_delivery::Application>(&env).await;
    wait_for_health(&delivery, ServingStatus::Serving).await;
    env.insert("HIBIKI_DELIVERY_URL".into(), delivery);
    let scenario = Killable::start::<hibiki_scenario::Application>(env.clone());
    wait_for_health(&scenario.url, ServingStatus::Serving).await;
    ScenarioServiceClient::new(authorized(&scenario.url, SERVICE_TOKEN))
        .apply(ApplyRequest {
            tenant_id: TENANT.into(),
            source: Some(apply_request::Source::Yaml(
                include_str!("../../examples/spring-campaign.yaml").into(),
            )),
            start_disabled: false,
        })
        .await
        .expect("the spring campaign applies");
    env.insert("HIBIKI_SCENARIO_URL".into(), scenario.url.clone());
    let (analytics, stop_analytics, _t) =
        lifecycle::start::<hibiki_analytics::Application>(&env).await;
    wait_for_health(&analytics, ServingStatus::Serving).await;
    let webhooks = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut gateway_env = env.clone();
    gateway_env.insert("HIBIKI_HTTP_ADDR".into(), webhooks.to_string());
    let (gateway, stop_gateway, _t) =
        lifecycle::start::<hibiki_gateway::Application>(&gateway_env).await;
    wait_for_health(&gateway, ServingStatus::Serving).await;
    Mesh {
        _database: database,
        _keys: keys,
        env,
        sim,
        menu,
        contacts,
        analytics,
        scenario,
        webhooks,
        segment,
        stops: vec![stop_gateway, stop_analytics, stop_delivery, stop_contacts],
    }
}

/// Posts one signed webhook until the gateway takes it (it learns the
/// channel from contacts within a second of its creation).
async fn post(conn: &mut HttpConnection, body: &str) {
    let signature = sign(SECRET.as_bytes(), body.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = conn
            .post(
                &format!("/line/webhook/{CHANNEL}"),
                &[
                    ("content-type", "application/json"),
                    (SIGNATURE_HEADER, &signature),
                ],
                body.as_bytes().to_vec(),
            )
            .await;
        match answer {
            Ok((200, _)) => return,
            other => {
                assert!(Instant::now() < deadline, "the gateway answered {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Users `from..to` tap once each; every tenth user's tap comes twice (a
/// LINE redelivery: the same webhookEventId).
async fn taps(mesh: &Mesh, from: u64, to: u64) {
    let spec = Arc::new(StormSpec {
        channel_id: CHANNEL.into(),
        postback_data: "action=join&campaign=spring".into(),
        ..StormSpec::default()
    });
    let next = Arc::new(AtomicU64::new(from));
    let posters: Vec<_> = (0..8)
        .map(|_| {
            let (next, spec, sim, addr) = (
                next.clone(),
                spec.clone(),
                mesh.sim.sim().clone(),
                mesh.webhooks,
            );
            tokio::spawn(async move {
                let mut conn = HttpConnection::new(addr);
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= to {
                        return;
                    }
                    let u = user(n);
                    let token = sim.lock().issue_reply_token(CHANNEL, &u);
                    let mut e = event(&spec, EventKind::Postback, &u, &token);
                    let body = serde_json::json!({
                        "destination": destination(CHANNEL),
                        "events": [e.clone()],
                    })
                    .to_string();
                    post(&mut conn, &body).await;
                    if n % 10 == 0 {
                        e["deliveryContext"]["isRedelivery"] = true.into();
                        let again = serde_json::json!({
                            "destination": destination(CHANNEL),
                            "events": [e],
                        })
                        .to_string();
                        post(&mut conn, &again).await;
                    }
                }
            })
        })
        .collect();
    for p in posters {
        p.await.unwrap();
    }
}

/// Waits for the chain to finish, then checks every promise of the
/// campaign.
async fn check(mesh: &Mesh, watched: tokio::task::JoinHandle<Vec<i64>>) {
    let sim = mesh.sim.sim().clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (menus, sent) = {
            let s = sim.lock();
            (s.user_menus.len(), s.sent.len())
        };
        if menus as u64 >= USERS && sent as u64 >= USERS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 120 s: {menus} menus switched, {sent} messages sent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing more arrives late (a second message, a second switch).
    tokio::time::sleep(Duration::from_secs(1)).await;

    // line-sim: the campaign menu and exactly one thank-you each.
    {
        let s = sim.lock();
        let mut per_user: HashMap<&str, usize> = HashMap::new();
        for m in &s.sent {
            assert_eq!(m.channel_id, CHANNEL);
            *per_user.entry(m.recipient.as_str()).or_default() += 1;
        }
        for n in 0..USERS {
            let u = user(n);
            assert_eq!(
                s.user_menus.get(&(CHANNEL.to_owned(), u.clone())),
                Some(&mesh.menu),
                "{u}'s rich menu"
            );
            assert_eq!(per_user.get(u.as_str()), Some(&1), "{u}'s thank-yous");
        }
        assert_eq!(s.sent.len() as u64, USERS, "one message per friend");
        let switched: HashSet<&str> = s.menu_changes.iter().map(|c| c.user_id.as_str()).collect();
        assert_eq!(switched.len() as u64, USERS);
    }

    // contacts: tagged once each, one run each, the segment exact.
    let mut contacts = ContactServiceClient::new(authorized(&mesh.contacts, SERVICE_TOKEN));
    let mut scenario = ScenarioServiceClient::new(authorized(&mesh.scenario.url, SERVICE_TOKEN));
    for n in 0..USERS {
        let u = user(n);
        let contact = contacts
            .get_contact(GetContactRequest {
                contact: Some(ContactRef {
                    tenant_id: TENANT.into(),
                    line_user_id: u.clone(),
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(contact.tags, [TAG], "{u}'s tags");
        let runs = scenario
            .list_runs(ListRunsRequest {
                tenant_id: TENANT.into(),
                line_user_id: u.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .runs;
        assert_eq!(runs.len(), 1, "{u}'s runs: {runs:?}");
    }
    let in_contacts = SegmentServiceClient::new(authorized(&mesh.contacts, SERVICE_TOKEN))
        .get_segment_counts(hibiki_proto::contacts::v1::GetSegmentCountsRequest {
            tenant_id: TENANT.into(),
            segment_ids: vec![mesh.segment.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .counts[0]
        .member_count;
    assert_eq!(in_contacts, USERS as i64);

    // analytics: the same count, and the watcher saw it rise to it.
    let seen = tokio::time::timeout(Duration::from_secs(30), watched)
        .await
        .expect("the watcher sees the count reach 1,000")
        .unwrap();
    assert_eq!(seen.last(), Some(&(USERS as i64)), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "rises: {seen:?}");
    let in_analytics = AnalyticsServiceClient::new(authorized(&mesh.analytics, SERVICE_TOKEN))
        .get_segment_counts(hibiki_proto::analytics::v1::GetSegmentCountsRequest {
            tenant_id: TENANT.into(),
            segment_ids: vec![mesh.segment.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .counts[0]
        .member_count;
    assert_eq!(in_analytics, USERS as i64);
}

/// Watches the campaign segment's count until it reaches every user.
async fn watch(mesh: &Mesh) -> tokio::task::JoinHandle<Vec<i64>> {
    let mut stream = AnalyticsServiceClient::new(authorized(&mesh.analytics, SERVICE_TOKEN))
        .watch_segment_counts(WatchSegmentCountsRequest {
            tenant_id: TENANT.into(),
            segment_ids: vec![mesh.segment.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(u)) = stream.message().await {
            seen.push(u.member_count);
            if u.member_count == USERS as i64 {
                break;
            }
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_taps_tag_count_switch_and_thank_each_friend_once() {
    let mesh = mesh().await;
    let watched = watch(&mesh).await;
    taps(&mesh, 0, USERS).await;
    check(&mesh, watched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_end_state_when_the_executor_is_killed_mid_storm_and_restarted() {
    let mut mesh = mesh().await;
    let watched = watch(&mesh).await;
    taps(&mesh, 0, USERS / 2).await;
    // Once the executor is at work on the first half: kill -9, and a new
    // executor on the same stores; then the second half.
    let sim = mesh.sim.sim().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while sim.lock().menu_changes.len() < 50 {
        assert!(Instant::now() < deadline, "the executor does not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    mesh.scenario.kill();
    let done_at_kill = sim.lock().menu_changes.len();
    mesh.scenario = Killable::start::<hibiki_scenario::Application>(mesh.env.clone());
    wait_for_health(&mesh.scenario.url, ServingStatus::Serving).await;
    taps(&mesh, USERS / 2, USERS).await;
    check(&mesh, watched).await;
    eprintln!("killed with {done_at_kill} of {USERS} menus switched");
}
