//! The campaign chain end to end: the mesh `hibiki dev` runs (gateway,
//! contacts, scenario, delivery, analytics, in this process, over real gRPC
//! on loopback) with line-sim as LINE, against the real PostgreSQL and
//! Redis. A thousand friends tap the spring campaign's postback, some of
//! them twice (LINE's redeliveries): each is tagged once, the segment counts
//! exactly a thousand in contacts and in analytics, a watcher sees the count
//! rise to it, each friend has the campaign menu in line-sim and got one
//! thank-you. Then the same with the scenario executor killed mid-storm and
//! started again, and the same on a Redis Cluster of three nodes.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use hibiki_proto::analytics::v1::WatchSegmentCountsRequest;
use hibiki_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use hibiki_proto::common::v1::ContactRef;
use hibiki_proto::contacts::v1::GetContactRequest;
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
use hibiki_proto::scenario::v1::ListRunsRequest;
use hibiki_proto::scenario::v1::scenario_service_client::ScenarioServiceClient;
use hibiki_testkit::{RedisCluster, SERVICE_TOKEN, authorized, wait_for_health};
use support::{CHANNEL, Killable, Mesh, TAG, TENANT, USERS, mesh, mesh_on, taps, user};
use tonic_health::ServingStatus;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_on_a_redis_cluster_of_three_nodes() {
    let cluster = RedisCluster::start().await;
    let mesh = mesh_on(Some(&cluster)).await;
    let watched = watch(&mesh).await;
    taps(&mesh, 0, USERS).await;
    check(&mesh, watched).await;
    // The event log, delivery's queues and the counters are spread over
    // the nodes, not piled on one.
    for url in cluster.node_urls() {
        let keys = RedisCluster::keys_on(&url).await;
        assert!(keys > 0, "{url} holds no key");
    }
}
