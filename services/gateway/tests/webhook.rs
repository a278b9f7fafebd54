//! The gateway over real HTTP, with contacts over real gRPC on loopback and
//! the real Redis: what LINE's webhooks get as answers, and what lands in the
//! event log (read back through the shared consumer API).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hibiki_gateway::line;
use hibiki_proto::common::v1::InboundEvent;
use hibiki_proto::common::v1::inbound_event::Payload;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{CreateTenantRequest, PutChannelRequest};
use hibiki_runtime::app::Service;
use hibiki_runtime::config::{RedisConfig, Secret};
use hibiki_runtime::eventlog::{Consumer, ConsumerConfig, EventLog};
use hibiki_runtime::redis::Redis;
use hibiki_runtime::{HostError, Shutdown};
use hibiki_testkit::{
    HttpConnection, RedisKeys, RedisServer, SERVICE_TOKEN, TestDatabase, authorized, lifecycle,
    random_id, scrape_metrics, service_env,
};
use prost::Message;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::task::JoinHandle;

const TENANT: &str = "acme";
const CHANNEL: &str = "1000000001";
const SECRET: &str = "acme-channel-secret";
const SHARDS: u32 = 4;

/// A running gateway.
struct Gateway {
    http: SocketAddr,
    metrics: SocketAddr,
    shutdown: Shutdown,
    task: JoinHandle<Result<(), HostError>>,
}

impl Gateway {
    async fn start(env: &HashMap<String, String>) -> Self {
        let config = hibiki_gateway::Application::config_from_env(env).expect("a valid config");
        let app = hibiki_gateway::Application::build(config)
            .await
            .expect("the gateway builds");
        let (http, metrics) = (app.http_addr(), app.metrics_addr());
        let shutdown = Shutdown::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Self {
            http,
            metrics,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.expect("no panic").expect("a clean stop");
    }
}

/// contacts with the test tenant and its channel, a gateway following it,
/// and the event log the gateway appends to.
struct Mesh {
    _database: TestDatabase,
    _keys: [RedisKeys; 2],
    contacts_url: String,
    contacts: Option<Shutdown>,
    env: HashMap<String, String>,
    gateway: Gateway,
    log: EventLog,
}

impl Mesh {
    async fn start() -> Self {
        Self::start_with(&[], None).await
    }

    /// With extra gateway settings, and the gateway on `redis_url` (the
    /// shared Redis when `None`).
    async fn start_with(settings: &[(&str, &str)], redis_url: Option<&str>) -> Self {
        let database = TestDatabase::create().await;
        let contacts_env = service_env(&database, None);
        let (contacts_url, contacts, _task) =
            lifecycle::start::<hibiki_contacts::Application>(&contacts_env).await;
        hibiki_testkit::wait_for_health(&contacts_url, tonic_health::ServingStatus::Serving).await;
        let mut tenants = TenantServiceClient::new(authorized(&contacts_url, SERVICE_TOKEN));
        tenants
            .create_tenant(CreateTenantRequest {
                tenant_id: TENANT.into(),
                ..Default::default()
            })
            .await
            .expect("the tenant is created");
        put_channel(&contacts_url, CHANNEL, SECRET).await;

        let mut env = service_env(&database, redis_url);
        env.insert("HIBIKI_CONTACTS_URL".into(), contacts_url.clone());
        env.insert("HIBIKI_EVENTLOG_SHARDS".into(), SHARDS.to_string());
        env.insert("HIBIKI_EVENTLOG_STATS_MS".into(), "100".into());
        for (k, v) in settings {
            env.insert((*k).into(), (*v).into());
        }
        let gateway = Gateway::start(&env).await;
        let log = event_log(&env);
        let mesh = Self {
            _keys: [
                RedisKeys::new(&env["HIBIKI_REDIS_URL"], &env["HIBIKI_REDIS_PREFIX"]),
                RedisKeys::new(
                    &contacts_env["HIBIKI_REDIS_URL"],
                    &contacts_env["HIBIKI_REDIS_PREFIX"],
                ),
            ],
            _database: database,
            contacts_url,
            contacts: Some(contacts),
            env,
            gateway,
            log,
        };
        mesh.wait_for_channel(CHANNEL).await;
        mesh
    }

    /// Waits until the gateway accepts webhooks for `channel_id` (an empty
    /// body, LINE's URL check, answers 200 only for a known channel).
    async fn wait_for_channel(&self, channel_id: &str) {
        let body = br#"{"destination":"Ubot","events":[]}"#;
        until_accepted(&mut self.connection(), channel_id, body).await;
    }

    fn connection(&self) -> HttpConnection {
        HttpConnection::new(self.gateway.http)
    }

    /// Every event in the log, read through a consumer group of the test's
    /// own, until `n` have come (or 10 s passed).
    async fn consume(&self, group: &str, n: usize) -> Vec<(u32, InboundEvent)> {
        let consumer = Consumer::start(
            self.log.clone(),
            ConsumerConfig {
                max_wait: Duration::from_millis(50),
                ..ConsumerConfig::new(group)
            },
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut events = Vec::new();
        while events.len() < n && Instant::now() < deadline {
            let batch = consumer.next().await.expect("the log is readable");
            for d in &batch {
                events.push((
                    d.shard,
                    InboundEvent::decode(d.payload.as_slice()).expect("an InboundEvent"),
                ));
            }
            consumer.ack(&batch).await.expect("acknowledged");
        }
        consumer.stop().await;
        events
    }

    /// Entries in the log, over every shard.
    async fn length(&self) -> u64 {
        self.log
            .stats()
            .await
            .expect("stats")
            .iter()
            .map(|s| s.length)
            .sum()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.gateway.shutdown.trigger();
        if let Some(c) = &self.contacts {
            c.trigger();
        }
    }
}

async fn put_channel(contacts_url: &str, channel_id: &str, secret: &str) {
    TenantServiceClient::new(authorized(contacts_url, SERVICE_TOKEN))
        .put_channel(PutChannelRequest {
            tenant_id: TENANT.into(),
            channel_id: channel_id.into(),
            channel_secret: secret.into(),
            access_token: "acme-access-token".into(),
            ..Default::default()
        })
        .await
        .expect("the channel is stored");
}

fn event_log(env: &HashMap<String, String>) -> EventLog {
    let redis = Redis::connect_lazy(&RedisConfig {
        url: Secret::new(env["HIBIKI_REDIS_URL"].clone()),
        cluster: false,
        key_prefix: env["HIBIKI_REDIS_PREFIX"].clone(),
        pool_size: 2,
    })
    .expect("a pool");
    EventLog::new(redis, SHARDS, 100_000, Duration::from_secs(3600))
}

async fn post_signed(
    conn: &mut HttpConnection,
    channel_id: &str,
    secret: &str,
    body: &[u8],
) -> (u16, String) {
    let signature = line::sign(secret.as_bytes(), body);
    conn.post(
        &format!("/line/webhook/{channel_id}"),
        &[
            ("content-type", "application/json"),
            (line::SIGNATURE_HEADER, &signature),
        ],
        body.to_vec(),
    )
    .await
    .expect("the gateway answers")
}

/// Posts `body`, signed, until the gateway answers 200 (10 s at most).
async fn until_accepted(conn: &mut HttpConnection, channel_id: &str, body: &[u8]) {
    let signature = line::sign(SECRET.as_bytes(), body);
    if let Err(last) = conn
        .post_until_ok(
            &format!("/line/webhook/{channel_id}"),
            &[(line::SIGNATURE_HEADER, &signature)],
            body.to_vec(),
            Duration::from_secs(10),
        )
        .await
    {
        panic!("channel {channel_id} did not accept the webhook: {last}");
    }
}

/// A one-event webhook: a postback from `user` with id `event_id`.
fn postback(user: &str, event_id: &str, data: &str, redelivery: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "destination": "Ubot",
        "events": [{
            "type": "postback",
            "mode": "active",
            "timestamp": 1_767_000_000_000_i64,
            "webhookEventId": event_id,
            "deliveryContext": { "isRedelivery": redelivery },
            "source": { "type": "user", "userId": user },
            "replyToken": "r",
            "postback": { "data": data }
        }]
    }))
    .unwrap()
}

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/line/webhook-events.json"
    );
    serde_json::from_slice(&std::fs::read(path).expect("the LINE fixture")).unwrap()
}

#[derive(serde::Deserialize)]
struct Envelope {
    events: Vec<Box<RawValue>>,
}

#[tokio::test]
async fn the_28_event_fixture_round_trips_through_the_log() {
    let mesh = Mesh::start().await;
    // The fixture's events all carry LINE's sample id; give each its own,
    // as LINE does.
    let mut body = fixture();
    for (i, e) in body["events"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        e["webhookEventId"] = Value::String(format!("01JFIXTURE{i:016}"));
    }
    let body = serde_json::to_vec(&body).unwrap();
    let sent: Envelope = serde_json::from_slice(&body).unwrap();
    let (status, text) = post_signed(&mut mesh.connection(), CHANNEL, SECRET, &body).await;
    assert_eq!(status, 200, "{text}");

    let received = mesh.consume("round-trip", 28).await;
    assert_eq!(received.len(), 28);
    let mut by_id: HashMap<String, (u32, InboundEvent)> = received
        .into_iter()
        .map(|(shard, e)| (e.webhook_event_id.clone(), (shard, e)))
        .collect();
    let fixture = fixture();
    let mut user_shard_order: Vec<(u32, String)> = Vec::new();
    for (i, raw) in sent.events.iter().enumerate() {
        let (shard, e) = by_id
            .remove(&format!("01JFIXTURE{i:016}"))
            .unwrap_or_else(|| panic!("event {i} is not in the log"));
        let want = &fixture["events"][i];
        assert_eq!(e.r#type, want["type"].as_str().unwrap(), "event {i}");
        assert_eq!(e.raw, raw.get().as_bytes(), "event {i}'s raw bytes");
        assert_eq!(e.tenant_id, TENANT);
        assert_eq!(e.channel_id, CHANNEL);
        assert_eq!(e.destination, "U123");
        assert!(e.received_at.is_some(), "event {i} has no receive time");
        assert!(e.trace.is_some(), "event {i} has no trace context");
        let user = want["source"]["userId"].as_str().unwrap_or("");
        assert_eq!(
            e.source.as_ref().map(|s| s.user_id.as_str()).unwrap_or(""),
            user,
            "event {i}'s user"
        );
        if want["type"] == "undefined" {
            assert!(matches!(e.payload, Some(Payload::Unknown(_))), "{e:?}");
        }
        if user == "U206d25c2ea6bd87c17655609a1c37cb8" {
            user_shard_order.push((shard, e.webhook_event_id.clone()));
        }
    }
    assert!(by_id.is_empty());
    // One user's events share a shard.
    assert!(
        user_shard_order
            .iter()
            .all(|(s, _)| *s == user_shard_order[0].0)
    );

    // Posted as LINE's sample has it (every event with the same id), the
    // body is accepted; posted again, it is a redelivery and adds nothing.
    let verbatim = serde_json::to_vec(&fixture).unwrap();
    let before = mesh.length().await;
    let (status, text) = post_signed(&mut mesh.connection(), CHANNEL, SECRET, &verbatim).await;
    assert_eq!(status, 200, "{text}");
    let once = mesh.length().await;
    assert!(once > before, "nothing appended");
    let (status, text) = post_signed(&mut mesh.connection(), CHANNEL, SECRET, &verbatim).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        mesh.length().await,
        once,
        "a redelivered body was appended again"
    );
}

#[tokio::test]
async fn bad_requests_get_precise_answers_and_append_nothing() {
    let mesh = Mesh::start_with(&[("HIBIKI_WEBHOOK_MAX_BODY_BYTES", "4096")], None).await;
    let mut conn = mesh.connection();
    let good = postback("Ua", "01JBAD0000000000000000001", "x", false);
    let path = format!("/line/webhook/{CHANNEL}");

    let (status, text) = conn.post(&path, &[], good.clone()).await.unwrap();
    assert_eq!(status, 401, "{text}");
    assert!(
        text.contains("bad_signature") && text.contains("missing"),
        "{text}"
    );

    let wrong = line::sign(b"another secret", &good);
    let (status, text) = conn
        .post(&path, &[(line::SIGNATURE_HEADER, &wrong)], good.clone())
        .await
        .unwrap();
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("does not match"), "{text}");

    // Signed with the right secret but changed afterwards.
    let signature = line::sign(SECRET.as_bytes(), &good);
    let mut tampered = good.clone();
    *tampered.last_mut().unwrap() = b' ';
    let (status, _) = conn
        .post(&path, &[(line::SIGNATURE_HEADER, &signature)], tampered)
        .await
        .unwrap();
    assert_eq!(status, 401);

    let (status, text) = post_signed(&mut conn, "2000000002", SECRET, &good).await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("unknown_channel"), "{text}");

    let big = vec![b' '; 5000];
    let (status, text) = post_signed(&mut conn, CHANNEL, SECRET, &big).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("too_large"), "{text}");

    let (status, text) = post_signed(&mut conn, CHANNEL, SECRET, b"{\"events\": [").await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("malformed"), "{text}");

    let no_id = br#"{"destination":"Ubot","events":[{"type":"follow","timestamp":1,"mode":"active","source":{"type":"user","userId":"Ua"}}]}"#;
    let (status, text) = post_signed(&mut conn, CHANNEL, SECRET, no_id).await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("events[0]") && text.contains("webhookEventId"),
        "{text}"
    );

    let (status, text) = post_signed(&mut conn, CHANNEL, SECRET, br#"{"events": []}"#).await;
    assert_eq!(status, 200, "{text}");

    assert_eq!(
        mesh.length().await,
        0,
        "a refused webhook appended something"
    );

    // And a good one still goes through.
    let (status, text) = post_signed(&mut conn, CHANNEL, SECRET, &good).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(mesh.length().await, 1);
}

#[tokio::test]
async fn a_redelivery_after_a_gateway_restart_is_acknowledged_and_not_appended_again() {
    let mut mesh = Mesh::start().await;
    let first = postback("Ua", "01JREDELIVERY000000000001", "buy", false);
    let (status, _) = post_signed(&mut mesh.connection(), CHANNEL, SECRET, &first).await;
    assert_eq!(status, 200);

    let old = std::mem::replace(&mut mesh.gateway, Gateway::start(&mesh.env).await);
    old.stop().await;
    mesh.wait_for_channel(CHANNEL).await;

    let redelivered = postback("Ua", "01JREDELIVERY000000000001", "buy", true);
    let (status, text) = post_signed(&mut mesh.connection(), CHANNEL, SECRET, &redelivered).await;
    assert_eq!(status, 200, "{text}");
    let events = mesh.consume("redelivery", 2).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        !events[0].1.is_redelivery,
        "the first delivery is the one kept"
    );
}

#[tokio::test]
async fn without_redis_webhooks_get_503_and_are_accepted_again_once_it_is_back() {
    let mut redis = RedisServer::start().await;
    let mesh = Mesh::start_with(&[], Some(&redis.url())).await;
    let mut conn = mesh.connection();
    let before = postback("Ua", "01JREDIS00000000000000001", "a", false);
    assert_eq!(
        post_signed(&mut conn, CHANNEL, SECRET, &before).await.0,
        200
    );

    redis.stop();
    let during = postback("Ua", "01JREDIS00000000000000002", "b", false);
    let (status, text) = post_signed(&mut conn, CHANNEL, SECRET, &during).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("unavailable"), "{text}");

    // A fresh Redis (this test's keeps nothing on disk): LINE's redelivery
    // of the refused event goes in, with no restart of the gateway.
    redis.restart().await;
    until_accepted(&mut conn, CHANNEL, &during).await;
    let events = mesh.consume("recovery", 1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1.webhook_event_id, "01JREDIS00000000000000002");
}

#[tokio::test]
async fn a_full_shard_answers_503_until_its_entries_are_consumed() {
    let mesh = Mesh::start_with(&[("HIBIKI_EVENTLOG_MAX_LEN", "3")], None).await;
    let mut conn = mesh.connection();
    for n in 0..3 {
        let body = postback("Ua", &format!("01JFULL{n:018}"), "x", false);
        assert_eq!(post_signed(&mut conn, CHANNEL, SECRET, &body).await.0, 200);
    }
    let refused = postback("Ua", "01JFULL999999999999999999", "x", false);
    let (status, text) = post_signed(&mut conn, CHANNEL, SECRET, &refused).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("back-pressure"), "{text}");

    // A consumer takes and acknowledges the three; its trimming frees the
    // shard, and LINE's redelivery goes in.
    assert_eq!(mesh.consume("drain", 3).await.len(), 3);
    until_accepted(&mut conn, CHANNEL, &refused).await;
}

#[tokio::test]
async fn each_users_events_keep_their_order_in_the_log() {
    let mesh = Mesh::start().await;
    let users: Vec<String> = (0..6).map(|u| format!("U{u:032x}")).collect();
    let mut senders = Vec::new();
    for user in users.clone() {
        let mut conn = mesh.connection();
        senders.push(tokio::spawn(async move {
            for n in 0..20 {
                let body = postback(&user, &format!("{user}-{n:03}"), &n.to_string(), false);
                let (status, text) = post_signed(&mut conn, CHANNEL, SECRET, &body).await;
                assert_eq!(status, 200, "{text}");
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let events = mesh.consume("order", 120).await;
    assert_eq!(events.len(), 120);
    for user in &users {
        let mine: Vec<&str> = events
            .iter()
            .filter(|(_, e)| e.source.as_ref().unwrap().user_id == *user)
            .map(|(_, e)| e.webhook_event_id.as_str())
            .collect();
        let want: Vec<String> = (0..20).map(|n| format!("{user}-{n:03}")).collect();
        assert_eq!(mine, want, "{user}'s events out of order");
    }
}

#[tokio::test]
async fn known_channels_are_served_while_contacts_is_down_and_new_ones_are_picked_up() {
    let mut mesh = Mesh::start().await;
    // A channel created after the gateway started is accepted without a
    // restart.
    put_channel(&mesh.contacts_url, "1000000002", SECRET).await;
    mesh.wait_for_channel("1000000002").await;

    mesh.contacts.take().unwrap().trigger();
    // Until contacts is really gone the stream may still be open: wait for
    // its health to fail.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hibiki_runtime::grpc::health_status(&mesh.contacts_url, "")
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "contacts did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = mesh.connection();
    for (n, channel) in ["1000000001", "1000000002"].iter().enumerate() {
        let body = postback("Ua", &format!("01JDOWN{n:018}"), "x", false);
        let (status, text) = post_signed(&mut conn, channel, SECRET, &body).await;
        assert_eq!(status, 200, "{channel}: {text}");
    }
    let (status, _) = post_signed(&mut conn, "3000000003", SECRET, b"{}").await;
    assert_eq!(status, 404, "an unknown channel is still unknown");
    assert_eq!(mesh.consume("contacts-down", 2).await.len(), 2);
}

#[tokio::test]
async fn overload_and_slowness_are_answered_503_by_the_tower_stack() {
    let redis = RedisServer::start().await;
    let mesh = Mesh::start_with(
        &[
            ("HIBIKI_WEBHOOK_CONCURRENCY", "1"),
            ("HIBIKI_WEBHOOK_TIMEOUT_MS", "500"),
        ],
        Some(&redis.url()),
    )
    .await;
    // Redis stops answering for two seconds: the first webhook holds the
    // one slot until its timeout, the second is shed at once.
    let client = hibiki_runtime::redis::redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    hibiki_runtime::redis::redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("ALL")
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let mut slow = mesh.connection();
    let first = tokio::spawn(async move {
        let body = postback("Ua", "01JSLOW000000000000000001", "x", false);
        post_signed(&mut slow, CHANNEL, SECRET, &body).await
    });
    let mut conn = mesh.connection();
    let deadline = Instant::now() + Duration::from_secs(5);
    let shed = loop {
        let body = postback("Ub", "01JSLOW000000000000000002", "x", false);
        let (status, text) = post_signed(&mut conn, CHANNEL, SECRET, &body).await;
        if text.contains("overloaded") {
            break (status, text);
        }
        assert!(Instant::now() < deadline, "never shed: {status} {text}");
    };
    assert_eq!(shed.0, 503, "{}", shed.1);
    let (status, text) = first.await.unwrap();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("timeout"), "{text}");
}

#[tokio::test]
async fn metrics_count_outcomes_dedupe_hits_and_shard_lengths() {
    let mesh = Mesh::start().await;
    let mut conn = mesh.connection();
    let body = postback("Ua", &format!("01JMETRICS-{}", random_id()), "x", false);
    assert_eq!(post_signed(&mut conn, CHANNEL, SECRET, &body).await.0, 200);
    assert_eq!(post_signed(&mut conn, CHANNEL, SECRET, &body).await.0, 200);
    assert_eq!(post_signed(&mut conn, CHANNEL, "wrong", &body).await.0, 401);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = scrape_metrics(mesh.gateway.metrics).await;
        let all = [
            r#"hibiki_gateway_webhooks_total{outcome="accepted"}"#,
            r#"hibiki_gateway_webhooks_total{outcome="duplicate"}"#,
            r#"hibiki_gateway_webhooks_total{outcome="bad_signature"}"#,
            r#"hibiki_gateway_events_total{result="duplicate"}"#,
            "hibiki_eventlog_append_seconds_bucket",
            r#"hibiki_eventlog_length{shard="0"}"#,
            "hibiki_channels_known",
        ];
        let missing: Vec<&str> = all.iter().copied().filter(|m| !text.contains(m)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "missing {missing:?} in\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_binary_continues_the_callers_trace_into_the_log_even_with_logs_at_warn() {
    let mesh = Mesh::start().await;
    let mut env = mesh.env.clone();
    let http = SocketAddr::from(([127, 0, 0, 1], hibiki_testkit::free_port()));
    env.insert("HIBIKI_HTTP_ADDR".into(), http.to_string());
    env.insert("HIBIKI_LOG".into(), "warn".into());
    let _gateway = hibiki_testkit::ServiceProcess::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_hibiki-gateway")),
        env,
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let body = postback("Ua", "01JTRACE00000000000000001", "x", false);
    let signature = line::sign(SECRET.as_bytes(), &body);
    HttpConnection::new(http)
        .post_until_ok(
            &format!("/line/webhook/{CHANNEL}"),
            &[
                (line::SIGNATURE_HEADER, &signature),
                ("traceparent", &traceparent),
            ],
            body,
            Duration::from_secs(20),
        )
        .await
        .expect("the binary accepts the webhook");
    let events = mesh.consume("trace", 1).await;
    assert_eq!(events.len(), 1);
    let trace = events[0].1.trace.clone().unwrap_or_default();
    assert!(
        trace.traceparent.starts_with(&format!("00-{trace_id}-")),
        "the event's trace context {trace:?} does not continue the caller's trace"
    );
    assert!(
        !trace.traceparent.ends_with("00f067aa0ba902b7-01"),
        "the gateway's own span is the parent of what follows"
    );
}
