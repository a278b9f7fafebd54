//! The delivery binary and application start, report health by their
//! stores and the channel registry, and stop cleanly.

use std::path::Path;

use hibiki_delivery::Application;
use hibiki_runtime::Shutdown;
use hibiki_testkit::{TestDatabase, lifecycle, service_env, wait_for_health};
use tonic_health::ServingStatus;

/// A contacts service for delivery to load its channels from.
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
        Path::new(env!("CARGO_BIN_EXE_hibiki-delivery")),
        &["hibiki.delivery.v1.DeliveryService"],
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
async fn health_is_not_serving_while_postgres_is_unreachable_and_recovers() {
    let (_database, contacts, stop) = contacts().await;
    lifecycle::health_follows_postgres_with::<Application>(&[("HIBIKI_CONTACTS_URL", &contacts)])
        .await;
    stop.trigger();
}
