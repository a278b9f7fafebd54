//! The event log against the real Redis: a user's events land on one shard
//! in order, a repeated event id is acknowledged but not appended again, a
//! full shard refuses, and a Redis that forgot the append script is handled.
//! Consumers share the shards of their group, deliver every entry once and
//! in order per shard, take over a dead consumer's pending entries, trim
//! what every group has acknowledged, and wait in Redis while the log is
//! quiet instead of polling it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use hibiki_runtime::config::{RedisConfig, Secret};
use hibiki_runtime::eventlog::{Appended, Consumer, ConsumerConfig, Delivery, Event, EventLog};
use hibiki_runtime::redis::{Redis, redis};
use hibiki_testkit::{RedisCluster, RedisKeys, RedisServer, redis_of_its_own};

/// A log of 4 shards under a fresh prefix, deleted when the guard drops.
fn log(max_len: u64) -> (EventLog, Redis, RedisKeys) {
    let (redis, keys) = redis_of_its_own();
    (
        EventLog::new(redis.clone(), 4, max_len, Duration::from_secs(60)),
        redis,
        keys,
    )
}

fn event<'a>(user: &'a str, id: &'a str, payload: &'a [u8]) -> Event<'a> {
    Event {
        channel_id: "1000000001",
        user_id: user,
        event_id: id,
        timestamp_ms: chrono::Utc::now().timestamp_millis(),
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
    let (log, redis, _keys) = log(1000);
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
    let (log, redis, _keys) = log(2);
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
    let (log, redis, _keys) = log(100);
    let mut conn = redis.pool().get().await.unwrap();
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut *conn)
        .await
        .unwrap();
    let outcomes = log.append(&[event("Ua", "e1", b"1")]).await.unwrap();
    assert!(matches!(outcomes[0], Appended::Added(_)), "{outcomes:?}");
}

fn consumer_config(group: &str, name: &str, lease_ms: u64) -> ConsumerConfig {
    ConsumerConfig {
        name: name.into(),
        lease: Duration::from_millis(lease_ms),
        batch: 7,
        poll_interval: Duration::from_millis(5),
        max_wait: Duration::from_millis(50),
        ..ConsumerConfig::new(group)
    }
}

/// Appends events `rounds` for each of `users`, in rounds (u0 #0, u1 #0,
/// …, u0 #1, …); payloads are "user/n".
async fn append_rounds(
    log: &EventLog,
    users: &[String],
    rounds: std::ops::Range<usize>,
    tag: &str,
) {
    for i in rounds {
        let payloads: Vec<String> = users.iter().map(|u| format!("{u}/{i}")).collect();
        let ids: Vec<String> = users.iter().map(|u| format!("{tag}-{u}-{i}")).collect();
        let batch: Vec<Event<'_>> = users
            .iter()
            .zip(&payloads)
            .zip(&ids)
            .map(|((u, p), id)| event(u, id, p.as_bytes()))
            .collect();
        let outcomes = log.append(&batch).await.unwrap();
        assert!(outcomes.iter().all(|o| matches!(o, Appended::Added(_))));
    }
}

/// Checks that each user's payloads arrived in append order, and returns
/// how many arrived per user.
fn per_user_order(seen: &[String]) -> BTreeMap<String, usize> {
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    for p in seen {
        let (user, n) = p.rsplit_once('/').unwrap();
        let n: usize = n.parse().unwrap();
        let want = next.entry(user.to_owned()).or_default();
        assert_eq!(n, *want, "{user}'s events out of order: {seen:?}");
        *want += 1;
    }
    next
}

async fn total_length(log: &EventLog) -> u64 {
    log.stats().await.unwrap().iter().map(|s| s.length).sum()
}

/// Reads with `consumer` until `until` holds for what was seen, acking
/// each batch; panics after 10 s.
async fn drain(
    consumer: &Consumer,
    seen: &mut Vec<String>,
    until: impl Fn(&[String]) -> bool,
) -> Vec<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut all = Vec::new();
    while !until(seen) {
        assert!(Instant::now() < deadline, "gave up; seen {seen:?}");
        let batch = consumer.next().await.unwrap();
        seen.extend(
            batch
                .iter()
                .map(|d| String::from_utf8(d.payload.clone()).unwrap()),
        );
        consumer.ack(&batch).await.unwrap();
        all.extend(batch);
    }
    all
}

#[tokio::test]
async fn two_consumers_share_the_shards_and_deliver_each_entry_once_in_order() {
    let (log, _redis, _keys) = log(10_000);
    consumers_share_the_shards(log).await;
}

#[tokio::test]
async fn on_redis_cluster_the_shards_spread_over_the_nodes_and_consumers_share_them() {
    let cluster = RedisCluster::start().await;
    let redis = Redis::connect_lazy(&RedisConfig {
        url: Secret::new(cluster.url()),
        cluster: true,
        key_prefix: "hibiki".into(),
        pool_size: 2,
    })
    .expect("a cluster handle");
    assert!(redis.is_cluster());
    redis.ping().await.expect("every primary answers");
    let log = EventLog::new(redis, 4, 10_000, Duration::from_secs(60));
    consumers_share_the_shards(log).await;
    let mut holding = 0;
    for url in cluster.node_urls() {
        if RedisCluster::keys_on(&url).await > 0 {
            holding += 1;
        }
    }
    assert!(holding >= 2, "the log's keys sit on {holding} of 3 nodes");
}

/// Two consumers of one group split the shards, see every entry once and
/// each user's entries in order, and trim what they acknowledged.
async fn consumers_share_the_shards(log: EventLog) {
    let users: Vec<String> = (0..24).map(|n| format!("U{n:02}")).collect();
    append_rounds(&log, &users, 0..5, "a").await;

    let a = Consumer::start(log.clone(), consumer_config("scenario", "a", 600));
    let b = Consumer::start(log.clone(), consumer_config("scenario", "b", 600));
    // Both join; within a couple of lease ticks each holds half.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(a.shards().len() == 2 && b.shards().len() == 2) {
        assert!(
            Instant::now() < deadline,
            "a {:?} b {:?}",
            a.shards(),
            b.shards()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (sa, sb): (BTreeSet<u32>, BTreeSet<u32>) = (
        a.shards().into_iter().collect(),
        b.shards().into_iter().collect(),
    );
    assert!(sa.is_disjoint(&sb), "a {sa:?} b {sb:?}");

    append_rounds(&log, &users, 5..10, "b").await;
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    let total = |a: &[String], b: &[String]| a.len() + b.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while total(&seen_a, &seen_b) < 240 {
        assert!(
            Instant::now() < deadline,
            "{} of 240",
            total(&seen_a, &seen_b)
        );
        for (c, seen) in [(&a, &mut seen_a), (&b, &mut seen_b)] {
            let batch = c.next().await.unwrap();
            assert!(batch.iter().all(|d| c.shards().contains(&d.shard)));
            seen.extend(
                batch
                    .iter()
                    .map(|d| String::from_utf8(d.payload.clone()).unwrap()),
            );
            c.ack(&batch).await.unwrap();
        }
    }
    let (per_a, per_b) = (per_user_order(&seen_a), per_user_order(&seen_b));
    assert!(
        per_a.keys().all(|u| !per_b.contains_key(u)),
        "a user's events went to both consumers"
    );
    assert!(per_a.values().chain(per_b.values()).all(|n| *n == 10));
    assert_eq!(per_a.len() + per_b.len(), 24);

    // Everything is acknowledged: the holders trim it away.
    let deadline = Instant::now() + Duration::from_secs(10);
    while total_length(&log).await > 0 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            log.stats().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = log.stats().await.unwrap();
    assert!(
        stats
            .iter()
            .all(|s| s.groups.len() == 1 && s.groups[0].lag == 0 && s.groups[0].pending == 0),
        "{stats:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_dead_consumers_pending_entries_are_taken_over_first_and_in_order() {
    let (log, redis, _keys) = log(10_000);
    let users: Vec<String> = vec!["Ua".into()];
    let shard = log.shard_of("1000000001", "Ua");
    let key = log.stream_key(shard);
    append_rounds(&log, &users, 0..6, "old").await;

    // A consumer of the group read the first four entries and died before
    // acknowledging them: its lease and heartbeat are left to run out.
    let mut conn = redis.pool().get().await.unwrap();
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg("scenario")
        .arg("0")
        .query_async::<()>(&mut *conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("scenario")
        .arg("dead")
        .arg("COUNT")
        .arg(4)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query_async(&mut *conn)
        .await
        .unwrap();
    redis::cmd("SET")
        .arg(format!(
            "{}:events:{{{shard}}}:lease:scenario",
            redis.prefix()
        ))
        .arg("dead")
        .arg("PX")
        .arg(800)
        .query_async::<()>(&mut *conn)
        .await
        .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    redis::cmd("ZADD")
        .arg(format!("{}:eventlog:consumers:scenario", redis.prefix()))
        .arg(now_ms + 800)
        .arg("dead")
        .query_async::<()>(&mut *conn)
        .await
        .unwrap();

    let survivor = Consumer::start(log.clone(), consumer_config("scenario", "survivor", 300));
    // New events of the same user arrive while the shard is still leased.
    append_rounds(&log, &users, 6..8, "new").await;
    let mut seen = Vec::new();
    let deliveries = drain(&survivor, &mut seen, |s| s.len() >= 8).await;
    assert_eq!(
        seen,
        (0..8).map(|i| format!("Ua/{i}")).collect::<Vec<_>>(),
        "the dead consumer's four, then the two it never read, then the new ones"
    );
    assert!(deliveries.iter().all(|d| d.shard == shard));
    assert_eq!(survivor.shards().len(), 4, "the survivor holds every shard");

    let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(&key)
        .arg("scenario")
        .query_async(&mut *conn)
        .await
        .unwrap();
    assert_eq!(pending.0, 0, "everything taken over was acknowledged");
    survivor.stop().await;
}

#[tokio::test]
async fn a_stopped_consumer_hands_its_shards_over_at_once() {
    let (log, _redis, _keys) = log(10_000);
    // A long lease: only an explicit hand-over can move the shards in time.
    let first = Consumer::start(log.clone(), consumer_config("scenario", "first", 60_000));
    let deadline = Instant::now() + Duration::from_secs(5);
    while first.shards().len() < 4 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let users: Vec<String> = (0..8).map(|n| format!("U{n}")).collect();
    append_rounds(&log, &users, 0..3, "x").await;
    let mut seen = Vec::new();
    drain(&first, &mut seen, |s| s.len() >= 10).await;
    first.stop().await;

    let second = Consumer::start(log.clone(), consumer_config("scenario", "second", 60_000));
    drain(&second, &mut seen, |s| s.len() >= 24).await;
    assert_eq!(seen.len(), 24, "{seen:?}");
    let per_user = per_user_order(&seen);
    assert!(per_user.values().all(|n| *n == 3), "{per_user:?}");
    second.stop().await;
}

#[tokio::test]
async fn event_ids_are_remembered_by_the_day_of_the_event_for_the_dedupe_window() {
    let (_, redis, _keys) = log(100);
    let log = EventLog::new(redis.clone(), 4, 100, Duration::from_secs(48 * 3600));
    let yesterday = chrono::Utc::now().timestamp_millis() - 86_400_000;
    let day = yesterday.div_euclid(86_400_000);
    let mut e = event("Ua", "e1", b"1");
    e.timestamp_ms = yesterday;
    assert!(matches!(
        log.append(&[e.clone()]).await.unwrap()[0],
        Appended::Added(_)
    ));
    // LINE redelivers it today, with the event's own timestamp: the same
    // day's hash knows it.
    assert_eq!(log.append(&[e]).await.unwrap(), [Appended::Duplicate]);

    let shard = log.shard_of("1000000001", "Ua");
    let hash = format!("{}:events:{{{shard}}}:seen:{day}", redis.prefix());
    let mut conn = redis.pool().get().await.unwrap();
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&hash)
        .query_async(&mut *conn)
        .await
        .unwrap();
    assert_eq!(fields, ["1000000001:e1"]);
    // Kept until the window (48 h) after that day ends.
    let expires_at: i64 = redis::cmd("EXPIRETIME")
        .arg(&hash)
        .query_async(&mut *conn)
        .await
        .unwrap();
    assert_eq!(expires_at, (day + 1) * 86_400 + 48 * 3600);

    // An event stamped before the window is remembered under the day it
    // arrived, not under a day whose hash is long gone.
    let mut old = event("Ua", "e2", b"2");
    old.timestamp_ms = 1_000;
    assert!(matches!(
        log.append(&[old.clone()]).await.unwrap()[0],
        Appended::Added(_)
    ));
    assert_eq!(log.append(&[old]).await.unwrap(), [Appended::Duplicate]);
}

#[tokio::test]
async fn a_stopped_follower_holds_the_log_back_only_for_its_retention() {
    let (log, _redis, _keys) = log(10_000);
    let log = log.with_followers(vec!["analytics".into()], Duration::from_millis(1500));
    let users: Vec<String> = (0..8).map(|n| format!("U{n:02}")).collect();
    append_rounds(&log, &users, 0..3, "a").await;
    // analytics reads a little and stops; scenario reads everything.
    let follower = Consumer::start(log.clone(), consumer_config("analytics", "f", 600));
    let first = follower.next().await.unwrap();
    assert!(!first.is_empty());
    follower.stop().await;
    let scenario = Consumer::start(log.clone(), consumer_config("scenario", "s", 600));
    let mut seen = Vec::new();
    drain(&scenario, &mut seen, |s| s.len() == 24).await;
    // Within its retention the follower's entries are kept for it...
    assert!(total_length(&log).await > 0, "trimmed under the follower");
    // ...and after it, trimmed: the log does not wait for the follower.
    let deadline = Instant::now() + Duration::from_secs(10);
    while total_length(&log).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the follower holds the log: {:?}",
            log.stats().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An ordinary group that stops holds the log as long as it needs.
    append_rounds(&log, &users, 3..4, "b").await;
    scenario.stop().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let other = Consumer::start(log.clone(), consumer_config("scenario", "t", 600));
    assert_eq!(total_length(&log).await, 8, "kept for scenario");
    let mut seen = Vec::new();
    drain(&other, &mut seen, |s| s.len() == 8).await;
    other.stop().await;
}

/// How many `XREADGROUP` calls `redis` has answered since it started.
async fn group_reads(redis: &Redis) -> u64 {
    let info: String = redis
        .command(redis::cmd("INFO").arg("commandstats"))
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_xreadgroup:calls="))
        .and_then(|rest| rest.split(',').next())
        .map(|n| n.parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test]
async fn an_idle_consumer_waits_in_redis_instead_of_polling() {
    // A Redis of the test's own, so that its command counts are this
    // consumer's alone.
    let server = RedisServer::start().await;
    let redis = Redis::connect_lazy(&RedisConfig {
        url: Secret::new(server.url()),
        cluster: false,
        key_prefix: "hibiki".into(),
        pool_size: 2,
    })
    .expect("a pool");
    let log = EventLog::new(redis.clone(), 4, 10_000, Duration::from_secs(60));
    let consumer = Consumer::start(
        log.clone(),
        ConsumerConfig {
            max_wait: Duration::from_secs(1),
            ..consumer_config("scenario", "quiet", 10_000)
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while consumer.shards().len() < 4 {
        assert!(Instant::now() < deadline, "never took the shards");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A quiet second: one read of the 4 shards, then a blocking read per
    // 200 ms, about 10 in all; polling them every 5 ms would make about
    // 800.
    let before = group_reads(&redis).await;
    assert!(consumer.next().await.unwrap().is_empty());
    let reads = group_reads(&redis).await - before;
    assert!(
        reads <= 40,
        "{reads} reads of a quiet log in one wait: it polled"
    );

    // An entry appended while the consumer waits comes out of that wait.
    let appended = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        log.append(&[event("U1", "quiet-1", b"hello")])
            .await
            .unwrap()
    };
    let (batch, outcome) = tokio::join!(consumer.next(), appended);
    assert!(matches!(outcome[0], Appended::Added(_)));
    let batch = batch.unwrap();
    assert_eq!(
        batch
            .iter()
            .map(|d| d.payload.as_slice())
            .collect::<Vec<_>>(),
        [b"hello".as_slice()]
    );
    // Delivered once: acknowledged, nothing more comes.
    consumer.ack(&batch).await.unwrap();
    assert!(consumer.next().await.unwrap().is_empty());
    consumer.stop().await;
}
