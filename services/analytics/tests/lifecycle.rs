//! The analytics binary and application start, report health by their stores, and
//! stop cleanly.

use std::path::Path;

use hibiki_analytics::Application;
use hibiki_testkit::lifecycle;

#[tokio::test]
async fn the_binary_reports_serving_lists_its_services_and_exits_on_sigterm() {
    lifecycle::binary_serves_and_stops_on_sigterm(
        Path::new(env!("CARGO_BIN_EXE_hibiki-analytics")),
        &["hibiki.analytics.v1.AnalyticsService"],
    )
    .await;
}

#[tokio::test]
async fn health_goes_not_serving_without_redis_and_recovers_when_it_is_back() {
    lifecycle::health_follows_redis::<Application>().await;
}

#[tokio::test]
async fn health_is_not_serving_while_postgres_is_unreachable_and_recovers() {
    lifecycle::health_follows_postgres::<Application>().await;
}
