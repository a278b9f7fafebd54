//! The gateway binary and application start, report health by their stores
//! and the channel registry, and stop cleanly.

use std::path::Path;

use hibiki_gateway::Application;
use hibiki_runtime::Shutdown;
use hibiki_testkit::{TestDatabase, lifecycle, service_env, wait_for_health};
use tonic_health::ServingStatus;

/// A contacts service for the gateway to load its channels from.
async fn contacts() -> (TestDatabase, String, Shutdown) {
    let database = TestDatabase::create().await;
    let (url, shutdown, _task) =
        lifecycle::start::<hibiki_contacts::Application>(&service_env(&database, None)).await;
    wait_for_health(&url, ServingStatus::Serving).await;
    (database, url, shutdown)
}

#[tokio::test]
async fn the_binary_reports_serving_lists_its_services_and_exits_on_sigterm() {
    let (_database, contacts, stop) = contacts().await;
    lifecycle::binary_serves_and_stops_on_sigterm_with(
        Path::new(env!("CARGO_BIN_EXE_hibiki-gateway")),
        &[],
        &[("HIBIKI_CONTACTS_URL", &contacts)],
    )
    .await;
    stop.trigger();
}

#[tokio::test]
async fn health_goes_not_serving_without_redis_and_recovers_when_it_is_back() {
    let (_database, contacts, stop) = contacts().await;
    lifecycle::health_follows_redis_with::<Application>(&[("HIBIKI_CONTACTS_URL", &contacts)])
        .await;
    stop.trigger();
}

#[tokio::test]
async fn the_gateway_is_not_serving_until_its_channels_are_loaded_then_stays_serving() {
    let database = TestDatabase::create().await;
    let contacts_port = hibiki_testkit::free_port();
    let contacts_url = format!("http://127.0.0.1:{contacts_port}");
    let mut env = service_env(&database, None);
    env.insert("HIBIKI_CONTACTS_URL".into(), contacts_url.clone());
    let (gateway, stop_gateway, task) = lifecycle::start::<Application>(&env).await;
    // Redis answers, but contacts is not there: no channel can be checked.
    wait_for_health(&gateway, ServingStatus::NotServing).await;

    let mut contacts_env = service_env(&database, None);
    contacts_env.insert(
        "HIBIKI_GRPC_ADDR".into(),
        format!("127.0.0.1:{contacts_port}"),
    );
    let (_, stop_contacts, _task) =
        lifecycle::start::<hibiki_contacts::Application>(&contacts_env).await;
    wait_for_health(&gateway, ServingStatus::Serving).await;

    // Contacts goes away again: the gateway serves the channels it knows.
    stop_contacts.trigger();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while hibiki_runtime::grpc::health_status(&contacts_url, "")
        .await
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "contacts did not stop"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Over the next two health rounds (500 ms each), every answer is SERVING.
    let watch_until = std::time::Instant::now() + std::time::Duration::from_millis(1200);
    while std::time::Instant::now() < watch_until {
        assert_eq!(
            hibiki_runtime::grpc::health_status(&gateway, "")
                .await
                .expect("the gateway answers"),
            ServingStatus::Serving
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop_gateway.trigger();
    task.await.expect("no panic").expect("a clean stop");
}
