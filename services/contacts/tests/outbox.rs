//! The outbox publishes a membership change once its transaction commits,
//! and never one whose transaction rolled back.

mod common;

use hibiki_contacts::outbox;
use hibiki_contacts::store;
use hibiki_proto::common::v1::TraceContext;
use hibiki_proto::contacts::v1::{MembershipChange, MembershipChangeRecord};
use hibiki_runtime::config::{RedisConfig, Secret};
use hibiki_runtime::redis::Redis;
use hibiki_testkit::{TestDatabase, stream_payloads};
use prost::Message;

fn change(user: &str) -> MembershipChange {
    MembershipChange {
        segment_id: "seg_1".into(),
        line_user_id: user.into(),
        entered: true,
        count_after: 1,
    }
}

async fn stream(key: &str) -> Vec<MembershipChangeRecord> {
    stream_payloads("redis://127.0.0.1:6379", key)
        .await
        .iter()
        .map(|p| MembershipChangeRecord::decode(p.as_slice()).unwrap())
        .collect()
}

/// contacts' migrated database and a Redis under its prefix (the keys go
/// with the database).
async fn relay_stores() -> (TestDatabase, sqlx::PgPool, Redis) {
    let database = TestDatabase::create().await;
    let pool = common::migrated_pool(&database).await;
    let redis = Redis::connect_lazy(&RedisConfig {
        url: Secret::new("redis://127.0.0.1:6379"),
        cluster: false,
        key_prefix: database.redis_prefix().to_owned(),
        pool_size: 2,
    })
    .unwrap();
    (database, pool, redis)
}

#[tokio::test]
async fn only_committed_changes_are_published_and_each_once() {
    let (_database, pool, redis) = relay_stores().await;
    let key = outbox::stream_key(&redis);

    let mut rolled_back = pool.begin().await.unwrap();
    store::write_outbox(
        &mut rolled_back,
        "acme",
        &[change("U-rolled-back")],
        &TraceContext::default(),
    )
    .await
    .unwrap();
    rolled_back.rollback().await.unwrap();
    assert_eq!(outbox::publish_batch(&pool, &redis, &key).await.unwrap(), 0);

    let mut committed = pool.begin().await.unwrap();
    store::write_outbox(
        &mut committed,
        "acme",
        &[change("U-committed")],
        &TraceContext::default(),
    )
    .await
    .unwrap();
    // Not yet committed: invisible to the relay.
    assert_eq!(outbox::publish_batch(&pool, &redis, &key).await.unwrap(), 0);
    committed.commit().await.unwrap();
    assert_eq!(outbox::publish_batch(&pool, &redis, &key).await.unwrap(), 1);
    assert_eq!(outbox::publish_batch(&pool, &redis, &key).await.unwrap(), 0);

    let records = stream(&key).await;
    let users: Vec<&str> = records
        .iter()
        .map(|r| r.change.as_ref().unwrap().line_user_id.as_str())
        .collect();
    assert_eq!(users, ["U-committed"]);
    assert_eq!(records[0].tenant_id, "acme");
}

#[tokio::test]
async fn rows_published_before_are_skipped_and_an_id_used_again_for_another_record_is_not() {
    let (_database, pool, redis) = relay_stores().await;
    let key = outbox::stream_key(&redis);
    let mut tx = pool.begin().await.unwrap();
    let users = ["U-a", "U-b", "U-c"];
    let changes: Vec<_> = users.iter().map(|u| change(u)).collect();
    store::write_outbox(&mut tx, "acme", &changes, &TraceContext::default())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as("SELECT id, payload FROM outbox ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(outbox::publish_batch(&pool, &redis, &key).await.unwrap(), 3);

    // The rows back, as a relay that crashed between putting them on the
    // stream and deleting them leaves them: taken, and not published again.
    for (id, payload) in &rows {
        sqlx::query("INSERT INTO outbox (tenant_id, id, payload) VALUES ('acme', $1, $2)")
            .bind(id)
            .bind(payload)
            .execute(&pool)
            .await
            .unwrap();
    }
    assert_eq!(outbox::publish_batch(&pool, &redis, &key).await.unwrap(), 3);
    let on_stream = |records: Vec<MembershipChangeRecord>| -> Vec<String> {
        records
            .iter()
            .map(|r| r.change.as_ref().unwrap().line_user_id.clone())
            .collect()
    };
    assert_eq!(on_stream(stream(&key).await), users);

    // The first id again for another change (a database restored from a
    // backup hands out ids again): a new record, published.
    let other = MembershipChangeRecord {
        tenant_id: "acme".into(),
        change_id: format!("m{}", rows[0].0),
        change: Some(change("U-after-restore")),
        ..Default::default()
    };
    sqlx::query("INSERT INTO outbox (tenant_id, id, payload) VALUES ('acme', $1, $2)")
        .bind(rows[0].0)
        .bind(other.encode_to_vec())
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(outbox::publish_batch(&pool, &redis, &key).await.unwrap(), 1);
    assert_eq!(
        on_stream(stream(&key).await),
        ["U-a", "U-b", "U-c", "U-after-restore"]
    );
}
