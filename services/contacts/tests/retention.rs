//! Idempotency records are forgotten after the retention window, and not
//! before.

mod common;

use std::time::Duration;

use hibiki_contacts::retention;
use hibiki_testkit::TestDatabase;

#[tokio::test]
async fn records_older_than_the_window_are_purged_and_newer_ones_kept() {
    let database = TestDatabase::create().await;
    let pool = common::migrated_pool(&database).await;
    sqlx::query(
        "INSERT INTO applied_events (tenant_id, webhook_event_id, applied_at) VALUES \
         ('acme', 'old', now() - interval '8 days'), ('acme', 'new', now() - interval '1 day')",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO mutation_results (tenant_id, idempotency_key, operation, response, created_at) VALUES \
         ('acme', 'old', 'AddTags', '', now() - interval '8 days'), ('acme', 'new', 'AddTags', '', now())",
    )
    .execute(&pool)
    .await
    .unwrap();

    let purged = retention::purge(&pool, Duration::from_secs(7 * 24 * 3600))
        .await
        .unwrap();
    assert_eq!(purged, 2);
    let events: Vec<String> = sqlx::query_scalar("SELECT webhook_event_id FROM applied_events")
        .fetch_all(&pool)
        .await
        .unwrap();
    let keys: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM mutation_results")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        (events, keys),
        (vec!["new".to_owned()], vec!["new".to_owned()])
    );
}
