//! `hibiki dlq list` shows a tenant's dead letters from a running delivery,
//! and `hibiki dlq replay` sends them again.

mod common;

use common::hibiki;
use std::time::{Duration, Instant};

use hibiki_line_sim::{LineSim, SimChannel, SimConfig};
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{CreateTenantRequest, PutChannelRequest};
use hibiki_proto::delivery::v1::delivery_service_client::DeliveryServiceClient;
use hibiki_proto::delivery::v1::{GetJobRequest, JobStatus, SendRequest, send_request};
use hibiki_testkit::{SERVICE_TOKEN, TestDatabase, authorized, lifecycle, service_env};
use tonic_health::ServingStatus;

#[tokio::test]
async fn dlq_lists_a_dead_letter_and_replays_it() {
    let database = TestDatabase::create().await;
    let mut env = service_env(&database, None);
    let (contacts, stop_contacts, _task) =
        lifecycle::start::<hibiki_contacts::Application>(&env).await;
    hibiki_testkit::wait_for_health(&contacts, ServingStatus::Serving).await;
    let mut tenants = TenantServiceClient::new(authorized(&contacts, SERVICE_TOKEN));
    tenants
        .create_tenant(CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    tenants
        .put_channel(PutChannelRequest {
            tenant_id: "acme".into(),
            channel_id: "1000000001".into(),
            channel_secret: "secret".into(),
            access_token: "token-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // LINE knows the channel under another token: every call is a 401.
    let loopback = "127.0.0.1:0".parse().unwrap();
    let sim = LineSim::start(
        SimConfig {
            channels: vec![SimChannel {
                channel_id: "1000000001".into(),
                access_token: "rotated".into(),
                secret: "secret".into(),
            }],
            ..SimConfig::default()
        },
        loopback,
        loopback,
    )
    .await
    .unwrap();
    env.insert("HIBIKI_CONTACTS_URL".into(), contacts);
    env.insert("HIBIKI_LINE_API_URL".into(), sim.api_url());
    let (delivery, stop_delivery, _task) =
        lifecycle::start::<hibiki_delivery::Application>(&env).await;
    hibiki_testkit::wait_for_health(&delivery, ServingStatus::Serving).await;
    let mut client = DeliveryServiceClient::new(authorized(&delivery, SERVICE_TOKEN));
    let job = client
        .send(SendRequest {
            tenant_id: "acme".into(),
            channel_id: "1000000001".into(),
            idempotency_key: "welcome".into(),
            target: Some(send_request::Target::PushTo(format!("U{:032x}", 1))),
            messages_json: vec![r#"{"type":"text","text":"hi"}"#.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = |c: &mut DeliveryServiceClient<_>| {
        let mut c = c.clone();
        let id = job.job_id.clone();
        async move {
            c.get_job(GetJobRequest {
                tenant_id: "acme".into(),
                job_id: id,
            })
            .await
            .unwrap()
            .into_inner()
            .status()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&mut client).await != JobStatus::Failed {
        assert!(
            Instant::now() < deadline,
            "the push was never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let common = ["--delivery", &delivery, "--token", SERVICE_TOKEN];
    let (ok, out, err) =
        hibiki(&[&["dlq", "list", "--tenant", "acme"][..], &common].concat()).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("push  LINE 401"), "{out}");
    assert!(out.contains(&job.job_id), "{out}");
    let id = out.split_whitespace().next().unwrap().to_owned();
    assert!(id.starts_with("dl-"), "{out}");

    let (ok, _, err) =
        hibiki(&[&["dlq", "replay", "--tenant", "acme"][..], &common].concat()).await;
    assert!(!ok, "replay without ids or --all is refused");
    assert!(err.contains("--all"), "{err}");

    sim.sim().lock().put_channel(SimChannel {
        channel_id: "1000000001".into(),
        access_token: "token-a".into(),
        secret: "secret".into(),
    });
    let (ok, out, err) =
        hibiki(&[&["dlq", "replay", "--tenant", "acme", &id][..], &common].concat()).await;
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "replayed 1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&mut client).await != JobStatus::Succeeded {
        assert!(Instant::now() < deadline, "the replay was never sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.sim().lock().sent.len(), 1);
    let (ok, out, _) = hibiki(&[&["dlq", "list", "--tenant", "acme"][..], &common].concat()).await;
    assert!(ok);
    assert!(out.contains("no dead letters"), "{out}");
    // An unknown id is named.
    let (ok, _, err) = hibiki(
        &[
            &["dlq", "replay", "--tenant", "acme", "dl-nope"][..],
            &common,
        ]
        .concat(),
    )
    .await;
    assert!(!ok);
    assert!(err.contains("NotFound") && err.contains("dl-nope"), "{err}");

    stop_delivery.trigger();
    stop_contacts.trigger();
}
