//! analytics' folds against the real PostgreSQL: each stream's position
//! makes an entry count once, whether it is read again later, read by two
//! replicas at once, or was counted (in `folded`) before positions were kept.

use std::sync::Arc;

use hibiki_analytics::fold::{Fold, Read};
use hibiki_proto::common::v1::InboundEvent;
use hibiki_runtime::config::{PostgresConfig, Secret};
use hibiki_runtime::postgres;
use hibiki_testkit::TestDatabase;
use sqlx::PgPool;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const T: &str = "acme";
/// A whole minute, so that every event falls in one bucket.
const MINUTE: i64 = 1_767_225_600_000;

async fn fold() -> (TestDatabase, PgPool, Fold) {
    let database = TestDatabase::create().await;
    let pool = postgres::connect_lazy(
        &PostgresConfig {
            url: Secret::new(database.url().to_owned()),
            max_connections: 4,
        },
        "analytics",
    )
    .unwrap();
    postgres::migrate(&pool, "analytics", &MIGRATOR)
        .await
        .unwrap();
    (database, pool.clone(), Fold::new(pool))
}

/// A postback `n` on `stream` at entry `ms-seq`.
fn postback(stream: &str, (ms, seq): (i64, i64), n: u32) -> Read<InboundEvent> {
    Read {
        stream: stream.to_owned(),
        at: (ms, seq),
        record: InboundEvent {
            tenant_id: T.into(),
            webhook_event_id: format!("01POS{n:021}"),
            r#type: "postback".into(),
            timestamp_ms: MINUTE + 1_000,
            ..Default::default()
        },
    }
}

async fn postbacks_counted(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(count), 0)::bigint FROM event_minutes
          WHERE tenant_id = $1 AND event_type = 'postback'",
    )
    .bind(T)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_entry_read_again_counts_once_and_each_stream_keeps_its_own_position() {
    let (_db, pool, fold) = fold().await;
    let a = "acme:events:{0}";
    let b = "acme:events:{1}";
    let first = vec![
        postback(a, (100, 0), 1),
        postback(a, (100, 1), 2),
        postback(b, (50, 0), 3),
    ];
    assert_eq!(fold.events(first.clone()).await.unwrap(), 3);
    // The same batch again (not acknowledged, read again): nothing.
    assert_eq!(fold.events(first).await.unwrap(), 0);
    // Part old, part new; stream b's position is its own (60 is after its
    // 50, though before a's 100).
    let mixed = vec![
        postback(a, (100, 1), 2),
        postback(a, (101, 0), 4),
        postback(b, (50, 0), 3),
        postback(b, (60, 0), 5),
    ];
    assert_eq!(fold.events(mixed).await.unwrap(), 2);
    assert_eq!(postbacks_counted(&pool).await, 5);
    let positions: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT stream, ms, seq FROM stream_positions ORDER BY stream")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        positions,
        vec![(a.to_owned(), 101, 0), (b.to_owned(), 60, 0)]
    );
}

#[tokio::test]
async fn two_replicas_folding_the_same_entries_at_once_count_them_once() {
    let (_db, pool, fold) = fold().await;
    let fold = Arc::new(fold);
    // A replica whose lease ran out and the one that took the stream over,
    // both with the same 200 entries, many times over.
    for round in 0..10u32 {
        let batch: Vec<_> = (0..200u32)
            .map(|i| {
                postback(
                    "acme:events:{0}",
                    (1_000 + round as i64, i as i64),
                    round * 200 + i,
                )
            })
            .collect();
        let (x, y) = tokio::join!(
            {
                let (fold, batch) = (fold.clone(), batch.clone());
                async move { fold.events(batch).await.unwrap() }
            },
            {
                let (fold, batch) = (fold.clone(), batch.clone());
                async move { fold.events(batch).await.unwrap() }
            }
        );
        assert_eq!(x + y, 200, "round {round}: {x} + {y}");
    }
    assert_eq!(postbacks_counted(&pool).await, 2_000);
}

#[tokio::test]
async fn a_streams_first_fold_skips_what_was_counted_before_positions_were_kept() {
    let (_db, pool, fold) = fold().await;
    // Folded and remembered by id, but not acknowledged, before the upgrade.
    for n in [1u32, 2] {
        sqlx::query("INSERT INTO folded (tenant_id, source, id) VALUES ($1, 'event', $2)")
            .bind(T)
            .bind(format!("01POS{n:021}"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let s = "acme:events:{0}";
    let batch = vec![
        postback(s, (10, 0), 1),
        postback(s, (10, 1), 2),
        postback(s, (11, 0), 3),
    ];
    assert_eq!(fold.events(batch).await.unwrap(), 1);
    // Later folds go by position alone: an id in `folded` after it counts.
    sqlx::query("INSERT INTO folded (tenant_id, source, id) VALUES ($1, 'event', $2)")
        .bind(T)
        .bind("01POS000000000000000000004")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(fold.events(vec![postback(s, (12, 0), 4)]).await.unwrap(), 1);
    assert_eq!(postbacks_counted(&pool).await, 2);
}
