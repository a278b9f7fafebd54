//! `hibiki stats` prints a tenant's figures from a running analytics, and
//! `hibiki watch` follows its segment counts as contacts change them.

mod common;

use common::hibiki;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hibiki_proto::common::v1::ContactRef;
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::segment_rule::Node;
use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{
    AddTagsRequest, CreateSegmentRequest, CreateTenantRequest, HasTag, SegmentRule,
};
use hibiki_testkit::{
    SERVICE_TOKEN, TestDatabase, authorized, lifecycle, operator_token, service_env,
    wait_for_health,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tonic_health::ServingStatus;

async fn tag(contacts: &str, n: u64) {
    ContactServiceClient::new(authorized(contacts, SERVICE_TOKEN))
        .add_tags(AddTagsRequest {
            contact: Some(ContactRef {
                tenant_id: "acme".into(),
                line_user_id: format!("U{n:032x}"),
            }),
            tags: vec!["campaign:spring".into()],
            idempotency_key: format!("spring-{n}"),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn stats_prints_the_counts_and_watch_follows_them() {
    let database = TestDatabase::create().await;
    let env = service_env(&database, None);
    let (contacts, _stop_contacts, _t) =
        lifecycle::start::<hibiki_contacts::Application>(&env).await;
    wait_for_health(&contacts, ServingStatus::Serving).await;
    let (analytics, _stop_analytics, _t) =
        lifecycle::start::<hibiki_analytics::Application>(&env).await;
    wait_for_health(&analytics, ServingStatus::Serving).await;
    TenantServiceClient::new(authorized(&contacts, SERVICE_TOKEN))
        .create_tenant(CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let segment = SegmentServiceClient::new(authorized(&contacts, SERVICE_TOKEN))
        .create_segment(CreateSegmentRequest {
            tenant_id: "acme".into(),
            name: "spring".into(),
            description: String::new(),
            rule: Some(SegmentRule {
                node: Some(Node::HasTag(HasTag {
                    tag: "campaign:spring".into(),
                })),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .segment_id;
    for n in 0..3 {
        tag(&contacts, n).await;
    }

    let common = ["--analytics", &analytics, "--token", SERVICE_TOKEN];
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let (ok, out, err) = hibiki(&[&["stats", "--tenant", "acme"][..], &common].concat()).await;
        assert!(ok, "{err}");
        let counted = out
            .lines()
            .any(|l| l.contains(&segment) && l.trim_end().ends_with(" 3"));
        if counted {
            break out;
        }
        assert!(Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(out.contains("events, last 60 min"), "{out}");
    assert!(out.contains("deliveries, last 60 min"), "{out}");

    // Another tenant's operator token gets no figures.
    let other = operator_token("globex");
    let (ok, _, err) = hibiki(&[
        "stats",
        "--tenant",
        "acme",
        "--analytics",
        &analytics,
        "--token",
        &other,
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("PermissionDenied"), "{err}");

    // watch: the current count, then the change.
    let mut child = Command::new(env!("CARGO_BIN_EXE_hibiki"))
        .args([&["watch", "--tenant", "acme"][..], &common].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the current count")
        .unwrap()
        .unwrap();
    assert!(first.contains(&segment) && first.contains(" 3"), "{first}");
    tag(&contacts, 3).await;
    let next = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the new count")
        .unwrap()
        .unwrap();
    assert!(
        next.contains(&segment) && next.contains(" 4") && next.ends_with("+1"),
        "{next}"
    );
    child.kill().await.unwrap();
}
