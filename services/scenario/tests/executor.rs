//! The executor against the real event log (Redis), contacts, delivery and
//! line-sim: a tap becomes a tag, a rich-menu switch and a thank-you reply;
//! a redelivered event changes nothing; waits resume from PostgreSQL;
//! re-entry policies hold.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hibiki_line_sim::{LineSim, SimChannel, SimConfig};
use hibiki_proto::common::v1::{
    ContactRef, FollowEvent, InboundEvent, MessageContent, MessageEvent, PostbackEvent, Source,
    SourceType, TextMessage, UnfollowEvent, inbound_event::Payload, message_content, value,
};
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{
    Contact, CreateTenantRequest, GetContactRequest, PutChannelRequest,
};
use hibiki_proto::scenario::v1::scenario_service_client::ScenarioServiceClient;
use hibiki_proto::scenario::v1::{
    ApplyRequest, GetRunRequest, ListRunsRequest, Run, RunStatus, apply_request,
};
use hibiki_runtime::Shutdown;
use hibiki_runtime::config::{RedisConfig, Secret};
use hibiki_runtime::eventlog::{Event, EventLog};
use hibiki_runtime::redis::Redis;
use hibiki_testkit::{
    SERVICE_TOKEN, TestDatabase, authorized, lifecycle, service_env, wait_for_health,
};
use prost::Message;
use tonic_health::ServingStatus;

const CHANNEL: &str = "1000000001";

fn user(n: u64) -> String {
    format!("U{n:032x}")
}

struct Mesh {
    database: TestDatabase,
    env: HashMap<String, String>,
    sim: LineSim,
    log: EventLog,
    contacts: String,
    scenario: String,
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
    mesh_with(true).await
}

/// The mesh; scenario in this process when `in_process`, else only its
/// settings (`env`) for a binary the test starts.
async fn mesh_with(in_process: bool) -> Mesh {
    let database = TestDatabase::create().await;
    let mut env = service_env(&database, None);
    let (contacts, stop_contacts, _t) =
        lifecycle::start::<hibiki_contacts::Application>(&env).await;
    wait_for_health(&contacts, ServingStatus::Serving).await;
    let mut tenants = TenantServiceClient::new(authorized(&contacts, SERVICE_TOKEN));
    tenants
        .create_tenant(CreateTenantRequest {
            tenant_id: "acme".into(),
            display_name: "Acme".into(),
            time_zone: "Asia/Tokyo".into(),
        })
        .await
        .unwrap();
    tenants
        .put_channel(PutChannelRequest {
            tenant_id: "acme".into(),
            channel_id: CHANNEL.into(),
            channel_secret: "secret".into(),
            access_token: "token-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let loopback = "127.0.0.1:0".parse().unwrap();
    let sim = LineSim::start(
        SimConfig {
            channels: vec![SimChannel {
                channel_id: CHANNEL.into(),
                access_token: "token-a".into(),
                secret: "secret".into(),
            }],
            ..SimConfig::default()
        },
        loopback,
        loopback,
    )
    .await
    .unwrap();
    sim.sim()
        .create_rich_menu(CHANNEL, "campaign", Some("campaign"));
    env.insert("HIBIKI_CONTACTS_URL".into(), contacts.clone());
    env.insert("HIBIKI_LINE_API_URL".into(), sim.api_url());
    env.insert("HIBIKI_SCENARIO_LEASE_MS".into(), "1000".into());
    let (delivery, stop_delivery, _t) =
        lifecycle::start::<hibiki_delivery::Application>(&env).await;
    wait_for_health(&delivery, ServingStatus::Serving).await;
    env.insert("HIBIKI_DELIVERY_URL".into(), delivery);
    let mut stops = vec![stop_delivery, stop_contacts];
    let scenario = if in_process {
        let (scenario, stop_scenario, _t) =
            lifecycle::start::<hibiki_scenario::Application>(&env).await;
        wait_for_health(&scenario, ServingStatus::Serving).await;
        stops.insert(0, stop_scenario);
        scenario
    } else {
        String::new()
    };
    let redis = Redis::connect_lazy(&RedisConfig {
        url: Secret::new(env["HIBIKI_REDIS_URL"].clone()),
        cluster: false,
        key_prefix: env["HIBIKI_REDIS_PREFIX"].clone(),
        pool_size: 2,
    })
    .unwrap();
    let log = EventLog::from_config(
        redis,
        &hibiki_runtime::eventlog::EventLogConfig::from_env(&hibiki_runtime::ProcessEnv).unwrap(),
    );
    Mesh {
        database,
        env,
        sim,
        log,
        contacts,
        scenario,
        stops,
    }
}

impl Mesh {
    fn client(
        &self,
    ) -> ScenarioServiceClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            hibiki_runtime::grpc::ClientInterceptor,
        >,
    > {
        self.client_at(&self.scenario)
    }

    fn client_at(
        &self,
        url: &str,
    ) -> ScenarioServiceClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            hibiki_runtime::grpc::ClientInterceptor,
        >,
    > {
        ScenarioServiceClient::new(authorized(url, SERVICE_TOKEN))
    }

    async fn apply(&self, yaml: &str) -> String {
        self.client()
            .apply(ApplyRequest {
                tenant_id: "acme".into(),
                source: Some(apply_request::Source::Yaml(yaml.into())),
                start_disabled: false,
            })
            .await
            .expect("the scenario applies")
            .into_inner()
            .scenario_id
    }

    /// Appends an event to the log as the gateway would.
    async fn append(&self, event: &InboundEvent) {
        let payload = event.encode_to_vec();
        let user = event.source.as_ref().unwrap().user_id.clone();
        self.log
            .append(&[Event {
                channel_id: CHANNEL,
                user_id: &user,
                event_id: &event.webhook_event_id,
                timestamp_ms: event.timestamp_ms,
                payload: &payload,
            }])
            .await
            .expect("appended");
    }

    async fn runs_of(&self, u: &str) -> Vec<Run> {
        self.client()
            .list_runs(ListRunsRequest {
                tenant_id: "acme".into(),
                line_user_id: u.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .runs
    }

    async fn tags(&self, u: &str) -> Vec<String> {
        self.contact(u).await.map(|c| c.tags).unwrap_or_default()
    }

    async fn contact(&self, u: &str) -> Option<Contact> {
        ContactServiceClient::new(authorized(&self.contacts, SERVICE_TOKEN))
            .get_contact(GetContactRequest {
                contact: Some(ContactRef {
                    tenant_id: "acme".into(),
                    line_user_id: u.into(),
                }),
            })
            .await
            .ok()
            .map(|c| c.into_inner())
    }
}

fn event(id: &str, u: &str, payload: Payload, reply_token: &str) -> InboundEvent {
    InboundEvent {
        tenant_id: "acme".into(),
        channel_id: CHANNEL.into(),
        webhook_event_id: id.into(),
        r#type: match payload {
            Payload::Follow(_) => "follow",
            Payload::Unfollow(_) => "unfollow",
            Payload::Message(_) => "message",
            _ => "postback",
        }
        .into(),
        timestamp_ms: chrono::Utc::now().timestamp_millis(),
        source: Some(Source {
            r#type: SourceType::User as i32,
            user_id: u.into(),
            ..Default::default()
        }),
        reply_token: reply_token.into(),
        payload: Some(payload),
        ..Default::default()
    }
}

fn tap(id: &str, u: &str, reply_token: &str) -> InboundEvent {
    event(
        id,
        u,
        Payload::Postback(PostbackEvent {
            data: "action=join&campaign=spring".into(),
            ..Default::default()
        }),
        reply_token,
    )
}

async fn until<F: FnMut() -> bool>(what: &str, within: Duration, mut done: F) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn until_run(mesh: &Mesh, u: &str, status: RunStatus) -> Run {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let runs = mesh.runs_of(u).await;
        if let Some(r) = runs.iter().find(|r| r.status() == status) {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {status:?} run for {u}: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SPRING: &str = include_str!("../../../examples/spring-campaign.yaml");

#[tokio::test]
async fn a_tap_tags_switches_the_menu_and_replies_once_even_when_redelivered() {
    let mesh = mesh().await;
    let scenario_id = mesh.apply(SPRING).await;
    let u = user(1);
    let token = mesh.sim.sim().lock().issue_reply_token(CHANNEL, &u);
    let first = tap("01TAP00000000000000000001", &u, &token);
    mesh.append(&first).await;
    let run = until_run(&mesh, &u, RunStatus::Completed).await;
    assert_eq!(run.scenario_id, scenario_id);
    assert_eq!(run.trigger_event_id, "01TAP00000000000000000001");
    assert_eq!(mesh.tags(&u).await, ["campaign:spring"]);
    let sim = mesh.sim.sim().clone();
    until(
        "the menu switch and the reply",
        Duration::from_secs(10),
        || {
            let s = sim.lock();
            s.user_menus.contains_key(&(CHANNEL.to_owned(), u.clone())) && !s.sent.is_empty()
        },
    )
    .await;
    {
        let s = sim.lock();
        assert_eq!(s.sent.len(), 1);
        assert_eq!(
            s.sent[0].endpoint,
            hibiki_line::api::Endpoint::Reply,
            "the tap's reply token is used"
        );
        assert_eq!(s.sent[0].recipient, u);
    }
    let history = mesh
        .client()
        .get_run(GetRunRequest {
            tenant_id: "acme".into(),
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .history;
    let steps: Vec<&str> = history.iter().map(|s| s.step_id.as_str()).collect();
    assert_eq!(steps, ["tag", "menu", "thanks"]);

    // LINE redelivers the same event: nothing new happens.
    mesh.append(&first).await; // deduped by the log
    let mut again = first.clone();
    again.webhook_event_id = "01TAP00000000000000000001".into();
    let payload = again.encode_to_vec();
    // Even if it reached the executor again (another copy in the log):
    mesh.log
        .append(&[Event {
            channel_id: "other-channel-copy",
            user_id: &u,
            event_id: &again.webhook_event_id,
            timestamp_ms: again.timestamp_ms,
            payload: &payload,
        }])
        .await
        .unwrap();
    // The same user taps again (a new event): re-entry ONCE keeps it out.
    mesh.append(&tap("01TAP00000000000000000002", &u, "")).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        mesh.runs_of(&u).await.len(),
        1,
        "one run per contact (once)"
    );
    assert_eq!(sim.lock().sent.len(), 1, "one reply in all");
    assert_eq!(
        sim.lock()
            .menu_changes
            .iter()
            .filter(|c| c.user_id == u)
            .count(),
        1
    );
}

#[tokio::test]
async fn a_wait_parks_the_run_and_the_timer_resumes_it() {
    let mesh = mesh().await;
    mesh.apply(
        "name: welcome\ntrigger: { follow: {} }\nsteps:\n\
         - { id: hello, send_messages: { messages: [{ type: text, text: hello }] } }\n\
         - { id: pause, wait: { duration: 2s } }\n\
         - { id: tip, send_messages: { messages: [{ type: text, text: tip }] } }\n\
         - id: check\n  branch:\n    if: { has_tag: vip }\n    then: [{ id: vip, add_tags: [gold] }]\n    else: [{ id: regular, add_tags: [silver] }]\n",
    )
    .await;
    let u = user(2);
    mesh.append(&event(
        "01FOLLOW0000000000000001",
        &u,
        Payload::Follow(FollowEvent {
            is_unblocked: false,
        }),
        "",
    ))
    .await;
    let waiting = until_run(&mesh, &u, RunStatus::Waiting).await;
    assert_eq!(waiting.current_step_id, "pause");
    assert!(waiting.resume_at.is_some());
    let sim = mesh.sim.sim().clone();
    until("the first message", Duration::from_secs(10), || {
        sim.lock().sent.len() == 1
    })
    .await;
    let done = until_run(&mesh, &u, RunStatus::Completed).await;
    assert_eq!(done.run_id, waiting.run_id);
    until("the second message", Duration::from_secs(10), || {
        sim.lock().sent.len() == 2
    })
    .await;
    let texts: Vec<String> = sim
        .lock()
        .sent
        .iter()
        .map(|m| m.messages[0]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["hello", "tip"]);
    // The branch went the `else` way (no vip tag).
    assert_eq!(mesh.tags(&u).await, ["silver"]);
    let history = mesh
        .client()
        .get_run(GetRunRequest {
            tenant_id: "acme".into(),
            run_id: done.run_id,
        })
        .await
        .unwrap()
        .into_inner()
        .history;
    let steps: Vec<&str> = history.iter().map(|s| s.step_id.as_str()).collect();
    assert_eq!(steps, ["hello", "pause", "tip", "check", "regular"]);
}

#[tokio::test]
async fn re_entry_policies_decide_whether_a_contact_starts_again() {
    let mesh = mesh().await;
    for (name, policy) in [("every", "every_time"), ("while", "not_while_running")] {
        mesh.apply(&format!(
            "name: {name}\ntrigger: {{ postback: {{ exact: '{name}' }} }}\n\
             steps:\n - {{ id: t, add_tags: ['{name}'] }}\n - {{ id: w, wait: {{ duration: 1h }} }}\n\
             options: {{ reentry: {policy} }}\n"
        ))
        .await;
    }
    let u = user(3);
    for (i, data) in ["every", "every", "while", "while"].iter().enumerate() {
        mesh.append(&event(
            &format!("01REENTRY00000000000000{i:02}"),
            &u,
            Payload::Postback(PostbackEvent {
                data: (*data).into(),
                ..Default::default()
            }),
            "",
        ))
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let runs = mesh.runs_of(&u).await;
        let per: HashMap<String, usize> = runs.iter().fold(HashMap::new(), |mut m, r| {
            *m.entry(r.scenario_id.clone()).or_default() += 1;
            m
        });
        if runs.len() >= 3 {
            // every_time: two runs; not_while_running: one (the first waits).
            let mut counts: Vec<usize> = per.values().copied().collect();
            counts.sort_unstable();
            assert_eq!(counts, [1, 2], "{runs:?}");
            break;
        }
        assert!(Instant::now() < deadline, "runs: {runs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mesh.runs_of(&u).await.len(), 3, "no fourth run");
}

#[tokio::test]
async fn two_executors_share_the_log_and_the_timers_and_do_nothing_twice() {
    let mesh = mesh().await;
    // A second replica of scenario on the same stores.
    let (second, stop_second, _t) =
        lifecycle::start::<hibiki_scenario::Application>(&mesh.env).await;
    wait_for_health(&second, ServingStatus::Serving).await;
    let scenario_id = mesh
        .apply(
            "name: welcome\ntrigger: { follow: {} }\nsteps:\n\
             - { id: tag, add_tags: [friend] }\n\
             - { id: pause, wait: { duration: 1s } }\n\
             - { id: hello, send_messages: { messages: [{ type: text, text: hello }] } }\n",
        )
        .await;
    let users: Vec<String> = (100..140).map(user).collect();
    for (i, u) in users.iter().enumerate() {
        mesh.append(&event(
            &format!("01SHARE0000000000000000{i:03}"),
            u,
            Payload::Follow(FollowEvent {
                is_unblocked: false,
            }),
            "",
        ))
        .await;
    }
    let sim = mesh.sim.sim().clone();
    until("every welcome", Duration::from_secs(30), || {
        sim.lock().sent.len() >= 40
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = sim.lock().sent.clone();
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for m in &sent {
        *per_user.entry(m.recipient.clone()).or_default() += 1;
    }
    assert_eq!(per_user.len(), 40);
    assert!(per_user.values().all(|n| *n == 1), "{per_user:?}");
    let runs = mesh
        .client_at(&second)
        .list_runs(ListRunsRequest {
            tenant_id: "acme".into(),
            scenario_id: scenario_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 40, "one run per follow");
    let done = runs
        .iter()
        .filter(|r| r.status() == RunStatus::Completed)
        .count();
    assert_eq!(done, 40);
    stop_second.trigger();
}

#[tokio::test]
async fn an_executor_killed_mid_run_is_replaced_and_nothing_is_lost_or_repeated() {
    let mesh = mesh_with(false).await;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_hibiki-scenario"));
    let first = hibiki_testkit::ServiceProcess::spawn(binary, mesh.env.clone());
    wait_for_health(&first.url, ServingStatus::Serving).await;
    let client = |url: &str| mesh.client_at(url);
    client(&first.url)
        .apply(ApplyRequest {
            tenant_id: "acme".into(),
            source: Some(apply_request::Source::Yaml(
                "name: drip\ntrigger: { follow: {} }\nsteps:\n\
                 - { id: hello, send_messages: { messages: [{ type: text, text: hello }] } }\n\
                 - { id: pause, wait: { duration: 2s } }\n\
                 - { id: tag, add_tags: [dripped] }\n\
                 - { id: bye, send_messages: { messages: [{ type: text, text: bye }] } }\n"
                    .into(),
            )),
            start_disabled: false,
        })
        .await
        .unwrap();
    let u = user(7);
    mesh.append(&event(
        "01KILL000000000000000001",
        &u,
        Payload::Follow(FollowEvent {
            is_unblocked: false,
        }),
        "",
    ))
    .await;
    let sim = mesh.sim.sim().clone();
    until("the first message", Duration::from_secs(10), || {
        sim.lock().sent.len() == 1
    })
    .await;
    // kill -9 while the run waits.
    drop(first);
    let second = hibiki_testkit::ServiceProcess::spawn(binary, mesh.env.clone());
    wait_for_health(&second.url, ServingStatus::Serving).await;
    until("the second message", Duration::from_secs(20), || {
        sim.lock().sent.len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let texts: Vec<String> = sim
        .lock()
        .sent
        .iter()
        .map(|m| m.messages[0]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["hello", "bye"], "nothing lost, nothing twice");
    assert_eq!(mesh.tags(&u).await, ["dripped"]);
    let runs = client(&second.url)
        .list_runs(ListRunsRequest {
            tenant_id: "acme".into(),
            line_user_id: u.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status(), RunStatus::Completed);
}

#[tokio::test]
async fn a_send_in_quiet_hours_is_held_to_the_end_of_the_window() {
    let mesh = mesh().await;
    // A window around now in the tenant's zone (Asia/Tokyo, UTC+9).
    let local = chrono::Utc::now() + chrono::Duration::hours(9);
    let start = (local - chrono::Duration::hours(1)).format("%H:%M");
    let end = (local + chrono::Duration::hours(2)).format("%H:%M");
    mesh.apply(&format!(
        "name: night\ntrigger: {{ follow: {{}} }}\nsteps:\n\
         - {{ id: hello, send_messages: {{ messages: [{{ type: text, text: hello }}] }} }}\n\
         options: {{ quiet_hours: {{ start: '{start}', end: '{end}' }} }}\n"
    ))
    .await;
    let u = user(9);
    mesh.append(&event(
        "01QUIET00000000000000001",
        &u,
        Payload::Follow(FollowEvent {
            is_unblocked: false,
        }),
        "",
    ))
    .await;
    let run = until_run(&mesh, &u, RunStatus::Completed).await;
    let history = mesh
        .client()
        .get_run(GetRunRequest {
            tenant_id: "acme".into(),
            run_id: run.run_id,
        })
        .await
        .unwrap()
        .into_inner()
        .history;
    assert!(
        history[0].detail.contains("held for quiet hours until"),
        "{history:?}"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        mesh.sim.sim().lock().sent.is_empty(),
        "nothing leaves in quiet hours"
    );
}

#[tokio::test]
async fn entering_a_segment_starts_the_scenarios_it_triggers() {
    use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
    use hibiki_proto::contacts::v1::{
        CreateSegmentRequest, HasTag, SegmentRule, segment_rule::Node,
    };
    let mesh = mesh().await;
    let segment = SegmentServiceClient::new(authorized(&mesh.contacts, SERVICE_TOKEN))
        .create_segment(CreateSegmentRequest {
            tenant_id: "acme".into(),
            name: "vips".into(),
            description: String::new(),
            rule: Some(SegmentRule {
                node: Some(Node::HasTag(HasTag { tag: "vip".into() })),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .segment_id;
    mesh.apply(
        "name: upgrade\ntrigger: { postback: { exact: upgrade } }\nsteps: [{ id: tag, add_tags: [vip] }]\n",
    )
    .await;
    mesh.apply(&format!(
        "name: vip welcome\ntrigger: {{ segment_entered: {{ segment_id: '{segment}' }} }}\n\
         steps: [{{ id: hi, send_messages: {{ messages: [{{ type: text, text: 'welcome, VIP' }}] }} }}]\n"
    ))
    .await;
    let u = user(11);
    mesh.append(&event(
        "01SEGMENT000000000000001",
        &u,
        Payload::Postback(PostbackEvent {
            data: "upgrade".into(),
            ..Default::default()
        }),
        "",
    ))
    .await;
    let sim = mesh.sim.sim().clone();
    until("the VIP welcome", Duration::from_secs(15), || {
        !sim.lock().sent.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = sim.lock().sent.clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].messages[0]["text"], "welcome, VIP");
    assert_eq!(sent[0].recipient, u);
    let runs = mesh.runs_of(&u).await;
    assert_eq!(runs.len(), 2, "the tap's run and the segment's: {runs:?}");
}

#[tokio::test]
async fn a_manual_start_runs_for_a_contact_or_every_member_of_a_segment_once() {
    use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
    use hibiki_proto::contacts::v1::{
        CreateSegmentRequest, HasTag, SegmentRule, UpsertContactRequest, segment_rule::Node,
    };
    use hibiki_proto::scenario::v1::{DisableRequest, StartRunRequest, start_run_request};
    let mesh = mesh().await;
    let mut contacts = ContactServiceClient::new(authorized(&mesh.contacts, SERVICE_TOKEN));
    for n in 20..23 {
        contacts
            .upsert_contact(UpsertContactRequest {
                contact: Some(ContactRef {
                    tenant_id: "acme".into(),
                    line_user_id: user(n),
                }),
                add_tags: vec!["newsletter".into()],
                idempotency_key: format!("seed{n}"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let segment = SegmentServiceClient::new(authorized(&mesh.contacts, SERVICE_TOKEN))
        .create_segment(CreateSegmentRequest {
            tenant_id: "acme".into(),
            name: "newsletter".into(),
            description: String::new(),
            rule: Some(SegmentRule {
                node: Some(Node::HasTag(HasTag {
                    tag: "newsletter".into(),
                })),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .segment_id;
    let id = mesh
        .apply(
            "name: issue 12\ntrigger: { manual: {} }\n\
             steps: [{ id: send, send_messages: { messages: [{ type: text, text: 'issue 12' }] } }]\n\
             options: { reentry: every_time }\n",
        )
        .await;
    let start = |target: start_run_request::Target, key: &str| StartRunRequest {
        tenant_id: "acme".into(),
        scenario_id: id.clone(),
        target: Some(target),
        idempotency_key: key.into(),
    };
    let mut client = mesh.client();
    let all = client
        .start_run(start(
            start_run_request::Target::SegmentId(segment.clone()),
            "issue-12",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.started, 3);
    let again = client
        .start_run(start(
            start_run_request::Target::SegmentId(segment),
            "issue-12",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.started, 0, "the same key starts nothing twice");
    let one = client
        .start_run(start(
            start_run_request::Target::LineUserId(user(20)),
            "resend-20",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.started, 1);
    assert!(one.run_id.starts_with("run_"));
    let sim = mesh.sim.sim().clone();
    until("four sends", Duration::from_secs(15), || {
        sim.lock().sent.len() >= 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sim.lock().sent.len(), 4);

    let e = client
        .start_run(start(
            start_run_request::Target::LineUserId(user(99)),
            "nobody",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let tap = mesh.apply(SPRING).await;
    let e = client
        .start_run(StartRunRequest {
            scenario_id: tap,
            ..start(start_run_request::Target::LineUserId(user(20)), "x")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    client
        .disable(DisableRequest {
            tenant_id: "acme".into(),
            scenario_id: id.clone(),
            stop_running: false,
        })
        .await
        .unwrap();
    let e = client
        .start_run(start(start_run_request::Target::LineUserId(user(20)), "y"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn a_dry_run_shows_what_an_event_would_do_and_does_nothing() {
    use hibiki_proto::scenario::v1::DryRunRequest;
    let mesh = mesh().await;
    let id = mesh.apply(SPRING).await;
    let u = user(30);
    let tap_event = tap("01DRY0000000000000000001", &u, "reply-token");
    let plan = mesh
        .client()
        .dry_run(DryRunRequest {
            tenant_id: "acme".into(),
            event: Some(tap_event.clone()),
            scenario_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plan.runs.len(), 1, "{plan:?}");
    assert_eq!(plan.runs[0].scenario_id, id);
    let steps: Vec<(&str, &str)> = plan.runs[0]
        .steps
        .iter()
        .map(|s| (s.step_id.as_str(), s.description.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            ("tag", "add tags campaign:spring"),
            ("menu", "switch the rich menu to alias campaign"),
            ("thanks", "send 1 message(s) as a reply"),
        ]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(mesh.tags(&u).await.is_empty(), "a dry run changes nothing");
    assert!(mesh.sim.sim().lock().sent.is_empty());
    assert!(mesh.runs_of(&u).await.is_empty());

    // After a real run, the re-entry policy would keep the next tap out.
    mesh.append(&tap_event).await;
    until_run(&mesh, &u, RunStatus::Completed).await;
    let plan = mesh
        .client()
        .dry_run(DryRunRequest {
            tenant_id: "acme".into(),
            event: Some(tap("01DRY0000000000000000002", &u, "")),
            scenario_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(plan.runs.is_empty());
    assert_eq!(plan.skipped.len(), 1);
    assert!(plan.skipped[0].reason.contains("ONCE"), "{plan:?}");
}

#[tokio::test]
async fn a_branch_on_segment_membership_takes_the_way_the_contact_is_in() {
    use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
    use hibiki_proto::contacts::v1::{
        CreateSegmentRequest, HasTag, SegmentRule, UpsertContactRequest, segment_rule::Node,
    };
    let mesh = mesh().await;
    let segment = SegmentServiceClient::new(authorized(&mesh.contacts, SERVICE_TOKEN))
        .create_segment(CreateSegmentRequest {
            tenant_id: "acme".into(),
            name: "gold".into(),
            description: String::new(),
            rule: Some(SegmentRule {
                node: Some(Node::HasTag(HasTag { tag: "gold".into() })),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .segment_id;
    ContactServiceClient::new(authorized(&mesh.contacts, SERVICE_TOKEN))
        .upsert_contact(UpsertContactRequest {
            contact: Some(ContactRef {
                tenant_id: "acme".into(),
                line_user_id: user(40),
            }),
            add_tags: vec!["gold".into()],
            idempotency_key: "seed40".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    mesh.apply(&format!(
        "name: check\ntrigger: {{ postback: {{ exact: check }} }}\nsteps:\n\
         - id: which\n  branch:\n    if: {{ in_segment: '{segment}' }}\n\
         \x20   then: [{{ id: inside, add_tags: [inside] }}]\n\
         \x20   else: [{{ id: outside, add_tags: [outside] }}]\n"
    ))
    .await;
    for (i, n) in [40u64, 41].iter().enumerate() {
        mesh.append(&event(
            &format!("01INSEG00000000000000000{i}"),
            &user(*n),
            Payload::Postback(PostbackEvent {
                data: "check".into(),
                ..Default::default()
            }),
            "",
        ))
        .await;
    }
    until_run(&mesh, &user(40), RunStatus::Completed).await;
    until_run(&mesh, &user(41), RunStatus::Completed).await;
    assert_eq!(mesh.tags(&user(40)).await, ["gold", "inside"]);
    assert_eq!(mesh.tags(&user(41)).await, ["outside"]);
}

#[tokio::test]
async fn a_run_finishes_on_the_version_it_started_with() {
    let mesh = mesh().await;
    let v1 = "name: pinned\ntrigger: { follow: {} }\nsteps:\n\
              - { id: pause, wait: { duration: 2s } }\n\
              - { id: say, send_messages: { messages: [{ type: text, text: one }] } }\n";
    mesh.apply(v1).await;
    let u = user(50);
    mesh.append(&event(
        "01PIN0000000000000000001",
        &u,
        Payload::Follow(FollowEvent {
            is_unblocked: false,
        }),
        "",
    ))
    .await;
    let waiting = until_run(&mesh, &u, RunStatus::Waiting).await;
    assert_eq!(waiting.version, 1);
    // Version 2 changes the message while the run waits.
    mesh.apply(&v1.replace("text: one", "text: two")).await;
    let done = until_run(&mesh, &u, RunStatus::Completed).await;
    assert_eq!(done.version, 1);
    let sim = mesh.sim.sim().clone();
    until("the message", Duration::from_secs(10), || {
        !sim.lock().sent.is_empty()
    })
    .await;
    assert_eq!(sim.lock().sent[0].messages[0]["text"], "one");
    // A new run starts on version 2.
    let u2 = user(51);
    mesh.append(&event(
        "01PIN0000000000000000002",
        &u2,
        Payload::Follow(FollowEvent {
            is_unblocked: false,
        }),
        "",
    ))
    .await;
    let second = until_run(&mesh, &u2, RunStatus::Waiting).await;
    assert_eq!(second.version, 2);
}

fn text(id: &str, u: &str, words: &str, reply_token: &str) -> InboundEvent {
    event(
        id,
        u,
        Payload::Message(MessageEvent {
            message: Some(MessageContent {
                id: format!("m{id}"),
                r#type: "text".into(),
                content: Some(message_content::Content::Text(TextMessage {
                    text: words.into(),
                    ..Default::default()
                })),
                ..Default::default()
            }),
        }),
        reply_token,
    )
}

#[tokio::test]
async fn a_keyword_is_answered_with_a_reply_and_other_words_start_nothing() {
    let mesh = mesh().await;
    mesh.apply(include_str!("../../../examples/keyword-reply.yaml"))
        .await;
    let asker = user(60);
    let token = mesh.sim.sim().lock().issue_reply_token(CHANNEL, &asker);
    let other = user(61);
    mesh.append(&text(
        "01TEXT000000000000000001",
        &other,
        "see you soon",
        "",
    ))
    .await;
    mesh.append(&text(
        "01TEXT000000000000000002",
        &asker,
        "What are your HOURS today?",
        &token,
    ))
    .await;
    let run = until_run(&mesh, &asker, RunStatus::Completed).await;
    assert_eq!(run.trigger_event_id, "01TEXT000000000000000002");
    let sim = mesh.sim.sim().clone();
    until("the answer", Duration::from_secs(10), || {
        !sim.lock().sent.is_empty()
    })
    .await;
    {
        let s = sim.lock();
        assert_eq!(s.sent.len(), 1);
        assert_eq!(s.sent[0].endpoint, hibiki_line::api::Endpoint::Reply);
        assert_eq!(s.sent[0].recipient, asker);
        assert_eq!(
            s.sent[0].messages[0]["text"],
            "We are open every day from 10:00 to 20:00."
        );
    }
    // every_time: the same words again start a second run (a push now,
    // the token is spent).
    mesh.append(&text("01TEXT000000000000000003", &asker, "hours?", ""))
        .await;
    until("the second answer", Duration::from_secs(10), || {
        sim.lock().sent.len() == 2
    })
    .await;
    assert_eq!(
        sim.lock().sent[1].endpoint,
        hibiki_line::api::Endpoint::Push
    );
    assert_eq!(mesh.runs_of(&asker).await.len(), 2);
    assert!(
        mesh.runs_of(&other).await.is_empty(),
        "words without the keyword start nothing"
    );
}

#[tokio::test]
async fn an_unfollow_removes_tags_and_sets_attributes() {
    let mesh = mesh().await;
    mesh.apply(
        "name: join\ntrigger: { follow: {} }\nsteps:\n\
         - { id: tag, add_tags: [member, newsletter] }\n\
         - { id: mark, set_attributes: { status: friend, visits: 1 } }\n",
    )
    .await;
    mesh.apply(
        "name: leave\ntrigger: { unfollow: {} }\nsteps:\n\
         - { id: untag, remove_tags: [newsletter] }\n\
         - { id: mark, set_attributes: { status: blocked, churned: true } }\n",
    )
    .await;
    let u = user(62);
    mesh.append(&event(
        "01UNFOLLOW00000000000001",
        &u,
        Payload::Follow(FollowEvent {
            is_unblocked: false,
        }),
        "",
    ))
    .await;
    until_run(&mesh, &u, RunStatus::Completed).await;
    let joined = mesh.contact(&u).await.expect("the contact");
    let mut tags = joined.tags.clone();
    tags.sort();
    assert_eq!(tags, ["member", "newsletter"]);
    assert_eq!(
        joined.attributes["status"].kind,
        Some(value::Kind::StringValue("friend".into()))
    );
    assert_eq!(
        joined.attributes["visits"].kind,
        Some(value::Kind::NumberValue(1.0))
    );

    mesh.append(&event(
        "01UNFOLLOW00000000000002",
        &u,
        Payload::Unfollow(UnfollowEvent {}),
        "",
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while mesh
        .runs_of(&u)
        .await
        .iter()
        .filter(|r| r.status() == RunStatus::Completed)
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "the unfollow's run did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = mesh.contact(&u).await.expect("the contact");
    assert_eq!(left.tags, ["member"]);
    assert_eq!(
        left.attributes["status"].kind,
        Some(value::Kind::StringValue("blocked".into()))
    );
    assert_eq!(
        left.attributes["churned"].kind,
        Some(value::Kind::BoolValue(true))
    );
    assert_eq!(
        left.attributes["visits"].kind,
        Some(value::Kind::NumberValue(1.0)),
        "attributes not named are kept"
    );
}

#[tokio::test]
async fn a_time_of_day_wait_resumes_at_that_time_in_the_tenant_zone() {
    use chrono::{Duration as Span, FixedOffset, Timelike, Utc};
    let mesh = mesh().await;
    // The tenant is in Asia/Tokyo (UTC+9, no daylight saving): wait for the
    // local time two hours from now, which is later today or tomorrow.
    let tokyo = FixedOffset::east_opt(9 * 3600).unwrap();
    let target = (Utc::now() + Span::hours(2)).with_timezone(&tokyo);
    let (hour, minute) = (target.hour(), target.minute());
    mesh.apply(&format!(
        "name: at-time\ntrigger: {{ follow: {{}} }}\nsteps:\n\
         - {{ id: until, wait: {{ time_of_day: '{hour:02}:{minute:02}' }} }}\n\
         - {{ id: say, send_messages: {{ messages: [{{ type: text, text: good morning }}] }} }}\n"
    ))
    .await;
    let u = user(63);
    mesh.append(&event(
        "01TIMEOFDAY0000000000001",
        &u,
        Payload::Follow(FollowEvent {
            is_unblocked: false,
        }),
        "",
    ))
    .await;
    let waiting = until_run(&mesh, &u, RunStatus::Waiting).await;
    let resume = waiting.resume_at.expect("a resume time");
    let resume = chrono::DateTime::from_timestamp(resume.seconds, resume.nanos as u32)
        .unwrap()
        .with_timezone(&tokyo);
    assert_eq!(
        (resume.hour(), resume.minute(), resume.second()),
        (hour, minute, 0)
    );
    let ahead = resume.with_timezone(&Utc) - Utc::now();
    assert!(
        ahead > Span::minutes(118) && ahead <= Span::minutes(120),
        "the next {hour:02}:{minute:02} in Tokyo is {ahead} away"
    );
    // Two hours pass: the timer in PostgreSQL comes due.
    let pool = sqlx::PgPool::connect(mesh.database.url()).await.unwrap();
    sqlx::query("UPDATE scenario.runs SET lease_until = now() WHERE run_id = $1")
        .bind(&waiting.run_id)
        .execute(&pool)
        .await
        .unwrap();
    let done = until_run(&mesh, &u, RunStatus::Completed).await;
    assert_eq!(done.run_id, waiting.run_id);
    let sim = mesh.sim.sim().clone();
    until("the message", Duration::from_secs(10), || {
        !sim.lock().sent.is_empty()
    })
    .await;
    assert_eq!(sim.lock().sent[0].messages[0]["text"], "good morning");
}

#[tokio::test]
async fn a_refollow_starts_its_scenario_and_a_stop_ends_the_run_there() {
    let mesh = mesh().await;
    mesh.apply(
        "name: welcome back\ntrigger: { follow: { kind: refollow } }\nsteps:\n\
         - { id: back, add_tags: [returned] }\n\
         - { id: halt, stop: {} }\n\
         - { id: never, add_tags: [unreachable] }\n",
    )
    .await;
    let first = mesh
        .apply("name: first follow\ntrigger: { follow: { kind: new } }\nsteps:\n - { id: hi, add_tags: [new] }\n")
        .await;
    let new_friend = user(64);
    let returning = user(65);
    for (id, u, unblocked) in [
        ("01REFOLLOW00000000000001", &new_friend, false),
        ("01REFOLLOW00000000000002", &returning, true),
    ] {
        mesh.append(&event(
            id,
            u,
            Payload::Follow(FollowEvent {
                is_unblocked: unblocked,
            }),
            "",
        ))
        .await;
    }
    let run = until_run(&mesh, &returning, RunStatus::Stopped).await;
    assert_eq!(mesh.tags(&returning).await, ["returned"]);
    let history = mesh
        .client()
        .get_run(GetRunRequest {
            tenant_id: "acme".into(),
            run_id: run.run_id,
        })
        .await
        .unwrap()
        .into_inner()
        .history;
    let steps: Vec<&str> = history.iter().map(|s| s.step_id.as_str()).collect();
    assert_eq!(steps, ["back", "halt"]);
    // The first follow ran only the scenario for new friends.
    until_run(&mesh, &new_friend, RunStatus::Completed).await;
    let runs = mesh.runs_of(&new_friend).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].scenario_id, first);
    assert_eq!(mesh.tags(&new_friend).await, ["new"]);
    assert_eq!(
        mesh.runs_of(&returning).await.len(),
        1,
        "a re-follow is not a first follow"
    );
}

#[tokio::test]
async fn a_funnel_counts_runs_by_how_far_they_went_in_scenario_and_in_analytics() {
    use hibiki_proto::analytics::v1::GetScenarioFunnelRequest;
    use hibiki_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
    use hibiki_proto::scenario::v1::GetFunnelRequest;
    let mesh = mesh().await;
    let scenario_id = mesh
        .apply(
            "name: sort\ntrigger: { postback: { prefix: 'sort' } }\nsteps:\n\
             - { id: seen, add_tags: [seen] }\n\
             - { id: vip, branch: { if: { has_tag: vip }, \
                 then: [{ id: gold, add_tags: [gold] }, { id: end, stop: {} }], \
                 else: [{ id: silver, add_tags: [silver] }] } }\n\
             - { id: last, add_tags: [done] }\n",
        )
        .await;
    // One VIP (stopped early), two regular friends (completed).
    ContactServiceClient::new(authorized(&mesh.contacts, SERVICE_TOKEN))
        .add_tags(hibiki_proto::contacts::v1::AddTagsRequest {
            contact: Some(ContactRef {
                tenant_id: "acme".into(),
                line_user_id: user(70),
            }),
            tags: vec!["vip".into()],
            idempotency_key: "vip-70".into(),
        })
        .await
        .unwrap();
    for n in 70..73 {
        mesh.append(&event(
            &format!("01FUNNEL0000000000000{n:03}"),
            &user(n),
            Payload::Postback(PostbackEvent {
                data: "sort".into(),
                ..Default::default()
            }),
            "",
        ))
        .await;
    }
    until_run(&mesh, &user(70), RunStatus::Stopped).await;
    until_run(&mesh, &user(71), RunStatus::Completed).await;
    until_run(&mesh, &user(72), RunStatus::Completed).await;

    let funnel = mesh
        .client()
        .get_funnel(GetFunnelRequest {
            tenant_id: "acme".into(),
            scenario_id: scenario_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let steps: Vec<(&str, i64)> = funnel
        .steps
        .iter()
        .map(|s| (s.step_id.as_str(), s.reached))
        .collect();
    assert_eq!(
        steps,
        [
            ("seen", 3),
            ("vip", 3),
            ("gold", 1),
            ("end", 1),
            ("silver", 2),
            ("last", 2)
        ]
    );
    assert_eq!(
        (funnel.entered, funnel.completed, funnel.ended_early),
        (3, 2, 1)
    );

    // analytics serves the same funnel to dashboards.
    let mut env = mesh.env.clone();
    env.insert("HIBIKI_SCENARIO_URL".into(), mesh.scenario.clone());
    let (analytics, stop, _t) = lifecycle::start::<hibiki_analytics::Application>(&env).await;
    wait_for_health(&analytics, ServingStatus::Serving).await;
    let served = AnalyticsServiceClient::new(authorized(&analytics, SERVICE_TOKEN))
        .get_scenario_funnel(GetScenarioFunnelRequest {
            tenant_id: "acme".into(),
            scenario_id: scenario_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let served_steps: Vec<(&str, i64)> = served
        .steps
        .iter()
        .map(|s| (s.step_id.as_str(), s.reached))
        .collect();
    assert_eq!(served_steps, steps);
    assert_eq!(
        (served.entered, served.completed, served.ended_early),
        (3, 2, 1)
    );
    // A range before the runs started counts none.
    let none = mesh
        .client()
        .get_funnel(GetFunnelRequest {
            tenant_id: "acme".into(),
            scenario_id: scenario_id.clone(),
            started_before: Some(hibiki_runtime::timestamp::to_proto(
                chrono::Utc::now() - chrono::Duration::hours(1),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.entered, 0);
    assert!(none.steps.iter().all(|s| s.reached == 0));
    let unknown = mesh
        .client()
        .get_funnel(GetFunnelRequest {
            tenant_id: "acme".into(),
            scenario_id: "sc_unknown".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    stop.trigger();
}
