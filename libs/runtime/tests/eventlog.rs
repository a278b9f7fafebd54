//! The event log against the real Redis: a user's events land on one shard
//! in order, a repeated event id is acknowledged but not appended again, a
//! full shard refuses, and a Redis that forgot the append script is handled.

use std::time::Duration;

use hibiki_runtime::config::{RedisConfig, Secret};
use hibiki_runtime::eventlog::{Appended, Event, EventLog};
use hibiki_runtime::redis::{Redis, redis};
use hibiki_testkit::random_id;

fn log(max_len: u64) -> (EventLog, Redis) {
    let redis = Redis::connect_lazy(&RedisConfig {
        url: Secret::new("redis://127.0.0.1:6379"),
        key_prefix: format!("test-{}", random_id()),
        pool_size: 2,
    })
    .expect("a pool");
    (
        EventLog::new(redis.clone(), 4, max_len, Duration::from_secs(60)),
        redis,
    )
}

fn event<'a>(user: &'a str, id: &'a str, payload: &'a [u8]) -> Event<'a> {
    Event {
        channel_id: "1000000001",
        user_id: user,
        event_id: id,
        payload,
    }
}

/// A stream entry: its id and its (field, value) pairs.
type Entry = (String, Vec<(String, Vec<u8>)>);

async fn entries(redis: &Redis, key: &str) -> Vec<Vec<u8>> {
    let mut conn = redis.pool().get().await.unwrap();
    let range: Vec<Entry> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut *conn)
        .await
        .unwrap();
    range
        .into_iter()
        .map(|(_, mut fields)| fields.remove(0).1)
        .collect()
}

#[tokio::test]
async fn a_users_events_keep_their_order_and_a_redelivery_is_not_appended_again() {
    let (log, redis) = log(1000);
    let batch = [
        event("Ua", "e1", b"one"),
        event("Ub", "e2", b"other user"),
        event("Ua", "e3", b"two"),
        event("Ua", "e4", b"three"),
    ];
    let outcomes = log.append(&batch).await.unwrap();
    assert!(
        outcomes.iter().all(|o| matches!(o, Appended::Added(_))),
        "{outcomes:?}"
    );
    let shard = log.stream_key(log.shard_of("1000000001", "Ua"));
    let mine: Vec<Vec<u8>> = entries(&redis, &shard)
        .await
        .into_iter()
        .filter(|p| p != b"other user")
        .collect();
    assert_eq!(mine, [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);

    // LINE delivers e3 again, alongside a new event.
    let again = log
        .append(&[event("Ua", "e3", b"two"), event("Ua", "e5", b"four")])
        .await
        .unwrap();
    assert_eq!(again[0], Appended::Duplicate);
    assert!(matches!(again[1], Appended::Added(_)));
    assert_eq!(
        entries(&redis, &shard)
            .await
            .iter()
            .filter(|p| p.as_slice() == b"two")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_full_shard_refuses_and_nothing_is_remembered_for_the_refused() {
    let (log, redis) = log(2);
    let first = log
        .append(&[event("Ua", "e1", b"1"), event("Ua", "e2", b"2")])
        .await
        .unwrap();
    assert!(first.iter().all(|o| matches!(o, Appended::Added(_))));
    let refused = log.append(&[event("Ua", "e3", b"3")]).await.unwrap();
    assert_eq!(refused, [Appended::Full]);
    // Once the shard drains, the refused event goes in: it was not marked
    // as seen.
    let shard = log.stream_key(log.shard_of("1000000001", "Ua"));
    let mut conn = redis.pool().get().await.unwrap();
    redis::cmd("XTRIM")
        .arg(&shard)
        .arg("MAXLEN")
        .arg(0)
        .query_async::<i64>(&mut *conn)
        .await
        .unwrap();
    let retried = log.append(&[event("Ua", "e3", b"3")]).await.unwrap();
    assert!(matches!(retried[0], Appended::Added(_)), "{retried:?}");
}

#[tokio::test]
async fn a_redis_that_forgot_the_script_still_takes_appends() {
    let (log, redis) = log(100);
    let mut conn = redis.pool().get().await.unwrap();
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut *conn)
        .await
        .unwrap();
    let outcomes = log.append(&[event("Ua", "e1", b"1")]).await.unwrap();
    assert!(matches!(outcomes[0], Appended::Added(_)), "{outcomes:?}");
}
