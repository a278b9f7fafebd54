//! The mesh the end-to-end tests run: gateway, contacts, scenario (in a
//! runtime of its own, so it can be killed), delivery and analytics in this
//! process over real gRPC on loopback, line-sim as LINE, a fresh database
//! and Redis prefix; and signed taps posted to the gateway.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hibiki_line::signature::{SIGNATURE_HEADER, sign};
use hibiki_line_sim::storm::{EventKind, StormSpec, destination, event};
use hibiki_line_sim::{LineSim, SimChannel, SimConfig};
use hibiki_proto::contacts::v1::segment_rule::Node;
use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{
    CreateSegmentRequest, CreateTenantRequest, HasTag, PutChannelRequest, SegmentRule,
};
use hibiki_proto::scenario::v1::scenario_service_client::ScenarioServiceClient;
use hibiki_proto::scenario::v1::{ApplyRequest, apply_request};
use hibiki_runtime::Shutdown;
use hibiki_runtime::app::Service;
use hibiki_testkit::{
    HttpConnection, RedisCluster, SERVICE_TOKEN, TestDatabase, authorized, free_port, lifecycle,
    service_env, wait_for_health,
};
use tonic_health::ServingStatus;

pub const TENANT: &str = "acme";
pub const CHANNEL: &str = "1000000001";
pub const SECRET: &str = "spring-secret";
pub const TOKEN: &str = "spring-token";
pub const USERS: u64 = 1_000;
pub const TAG: &str = "campaign:spring";

pub fn user(n: u64) -> String {
    format!("U{n:032x}")
}

/// A service in a runtime of its own, so the test can kill it the way a
/// crash would: every task stops where it stands, nothing is drained,
/// acknowledged or released.
pub struct Killable {
    pub runtime: Option<tokio::runtime::Runtime>,
    pub url: String,
}

impl Killable {
    pub fn start<S: Service>(env: HashMap<String, String>) -> Self {
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

    pub fn kill(&mut self) {
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

pub struct Mesh {
    pub _database: TestDatabase,
    pub env: HashMap<String, String>,
    pub sim: LineSim,
    pub menu: String,
    pub contacts: String,
    pub analytics: String,
    pub scenario: Killable,
    pub webhooks: SocketAddr,
    pub segment: String,
    pub stops: Vec<Shutdown>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for s in &self.stops {
            s.trigger();
        }
    }
}

pub async fn mesh() -> Mesh {
    mesh_on(None).await
}

/// The mesh on the shared Redis, or on `cluster`, a Redis Cluster of the
/// test's own.
pub async fn mesh_on(cluster: Option<&RedisCluster>) -> Mesh {
    let database = TestDatabase::create().await;
    let mut env = service_env(&database, None);
    if let Some(cluster) = cluster {
        env.extend(cluster.settings());
    }
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
                include_str!("../../../examples/spring-campaign.yaml").into(),
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
pub async fn post(conn: &mut HttpConnection, body: &str) {
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
pub async fn taps(mesh: &Mesh, from: u64, to: u64) {
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
